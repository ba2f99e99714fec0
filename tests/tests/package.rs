//! The Debian package (`cargo xtask package`, path in `$VPNLB_DEB`, else the newest
//! target/debian/vpnlb_*.deb), installed on this machine with `dpkg -i` and purged again: the
//! files land where the issue says (/usr/sbin/vpnlb with the eBPF object embedded, the systemd unit,
//! /etc/vpnlb/vpnlb.toml as a conffile, one man page per subcommand, bash/zsh/fish completions,
//! the dashboard, rules and probe examples), `systemd-analyze verify` accepts the unit offline,
//! `vpnlb --version` runs, `man -l` renders a page, `vpnlb check-config` accepts the installed
//! config, and `dpkg --purge` leaves none of the package's files, its config or unit links behind.
//!
//! Root only. It refuses to run if a `vpnlb` package is already installed (not ours to remove), and
//! purges what it installed also when it fails (a guard).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn deb() -> PathBuf {
    if let Some(p) = std::env::var_os("VPNLB_DEB").filter(|v| !v.is_empty()) {
        return PathBuf::from(p);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .max_by_key(|p| p.metadata().and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| {
            panic!(
                "no package in {}: run `cargo xtask package` (or set VPNLB_DEB)",
                dir.display()
            )
        })
}

fn run(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .env("MANWIDTH", "100")
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "`{cmd} {}` failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn installed() -> bool {
    String::from_utf8_lossy(&run("dpkg-query", &["-W", "-f=${Status}", "vpnlb"]).stdout)
        .contains("install ok installed")
}

/// dpkg with a bounded wait for its lock (another apt/dpkg run on the machine).
fn dpkg(args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = run("dpkg", args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return format!("{}{err}", String::from_utf8_lossy(&out.stdout));
        }
        if err.contains("lock") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        panic!("dpkg {} failed ({}): {err}", args.join(" "), out.status);
    }
}

/// Purges the package on drop (also when an assertion fails).
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        if installed() || std::thread::panicking() {
            let _ = Command::new("dpkg").args(["--purge", "vpnlb"]).output();
        }
    }
}

#[test]
#[ignore = "needs root and the package: run cargo xtask test (or cargo xtask package first)"]
fn package_installs_verifies_and_purges_cleanly() {
    let deb = deb();
    assert!(
        !installed(),
        "a vpnlb package is already installed on this machine: not touching it"
    );
    let info = ok("dpkg-deb", &["--info", deb.to_str().expect("utf-8")]);
    println!(
        "{} ({} bytes)",
        deb.display(),
        deb.metadata().map(|m| m.len()).unwrap_or(0)
    );
    assert!(info.contains("Package: vpnlb"), "{info}");
    let guard = Installed;
    dpkg(&["-i", deb.to_str().expect("utf-8")]);
    assert!(installed());

    let files: Vec<String> = ok("dpkg-query", &["-L", "vpnlb"])
        .lines()
        .map(str::to_string)
        .collect();
    let has = |p: &str| files.iter().any(|f| f == p);
    for p in [
        "/usr/sbin/vpnlb",
        "/etc/vpnlb/vpnlb.toml",
        "/usr/share/man/man1/vpnlb.1.gz",
        "/usr/share/man/man1/vpnlb-run.1.gz",
        "/usr/share/man/man1/vpnlb-inspect-sessions.1.gz",
        "/usr/share/man/man1/vpnlb-gateway-check.1.gz",
        "/usr/share/bash-completion/completions/vpnlb",
        "/usr/share/zsh/vendor-completions/_vpnlb",
        "/usr/share/fish/vendor_completions.d/vpnlb.fish",
        "/usr/share/doc/vpnlb/grafana/vpnlb.json",
        "/usr/share/doc/vpnlb/prometheus/vpnlb-rules.yml",
        "/usr/share/doc/vpnlb/examples/probes/ipsec-inside.sh",
    ] {
        assert!(has(p), "{p} not in the package: {files:#?}");
        assert!(Path::new(p).exists(), "{p} not installed");
    }
    let unit = files
        .iter()
        .find(|f| f.ends_with("/systemd/system/vpnlb.service"))
        .unwrap_or_else(|| panic!("no unit in the package: {files:#?}"))
        .clone();
    let man_pages = files.iter().filter(|f| f.contains("/man1/vpnlb")).count();
    assert!(man_pages >= 20, "one man page per subcommand: {man_pages}");
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", "vpnlb"]);
    assert!(
        conffiles.contains("/etc/vpnlb/vpnlb.toml"),
        "the config is a conffile: {conffiles:?}"
    );

    // The unit, offline (no systemd as init here): syntax, the executables, the man pages.
    let verify = run("systemd-analyze", &["verify", &unit]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    assert!(
        verify.status.success() && !said.contains("vpnlb.service:"),
        "systemd-analyze verify {unit}: {said}"
    );
    let unit_text = std::fs::read_to_string(&unit).expect("unit");
    for want in [
        "Type=notify",
        "ExecStart=/usr/sbin/vpnlb run --config /etc/vpnlb/vpnlb.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=always",
        "CapabilityBoundingSet=CAP_BPF",
        "ReadWritePaths=/sys/fs/bpf",
    ] {
        assert!(unit_text.contains(want), "{want} missing from the unit");
    }

    let version = ok("/usr/sbin/vpnlb", &["--version"]);
    assert_eq!(
        version.trim(),
        format!("vpnlb {}", env!("CARGO_PKG_VERSION")),
        "vpnlb --version"
    );
    let page = ok("man", &["-l", "/usr/share/man/man1/vpnlb-run.1.gz"]);
    assert!(
        page.contains("vpnlb-run") && page.contains("--config"),
        "man -l vpnlb-run: {page}"
    );
    let check = ok(
        "/usr/sbin/vpnlb",
        &["check-config", "/etc/vpnlb/vpnlb.toml"],
    );
    assert!(check.contains(": ok ("), "check-config: {check}");
    // The eBPF object is embedded: the installed binary loads without VPNLB_EBPF_OBJ (a plain
    // `cargo build` embeds an empty placeholder). The object's ELF magic is inside the binary.
    let bin = std::fs::read("/usr/sbin/vpnlb").expect("binary");
    let needle = b"vpnlb_ingress";
    assert!(
        bin.windows(needle.len()).any(|w| w == needle),
        "the program name of the embedded object is not in /usr/sbin/vpnlb"
    );
    let completion = std::fs::read_to_string("/usr/share/bash-completion/completions/vpnlb")
        .expect("completion");
    assert!(completion.contains("gateway-check"), "bash completion");

    dpkg(&["--purge", "vpnlb"]);
    assert!(!installed(), "still installed after --purge");
    let left: Vec<&String> = files
        .iter()
        .filter(|f| {
            // Directories shared with other packages stay, as they should.
            let p = Path::new(f.as_str());
            p.exists() && !p.is_dir()
        })
        .collect();
    assert!(left.is_empty(), "left behind by --purge: {left:?}");
    assert!(
        !Path::new("/etc/vpnlb").exists(),
        "/etc/vpnlb left behind by --purge"
    );
    assert!(
        !Path::new("/etc/systemd/system/multi-user.target.wants/vpnlb.service").exists(),
        "an enable link left behind"
    );
    println!(
        "installed {} files ({man_pages} man pages), unit verified, purged without a trace",
        files.len()
    );
    drop(guard);
}
