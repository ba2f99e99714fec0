//! `cargo xtask`: builds the eBPF object, runs every test, the benchmarks and the demo. Each command
//! first installs what a fresh Debian 12 machine lacks (see toolchain.rs).

mod toolchain;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "vpnlb build, test, bench and demo tasks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (installs the toolchain first when missing).
    BuildEbpf {
        /// Print only the object's path on stdout.
        #[arg(long)]
        quiet: bool,
    },
    /// Build the `vpnlb` binary in release mode with the eBPF object embedded.
    Build,
    /// Build the Debian 12 package (target/debian/vpnlb_*.deb): /usr/sbin/vpnlb with the eBPF
    /// object embedded, the systemd unit, /etc/vpnlb/vpnlb.toml, man pages, completions.
    Package,
    /// Run every test: unit tests, then the root-only data-plane tests.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks (ns/packet via BPF_PROG_TEST_RUN, ratios to a trivial program measured in the same run).
    Bench {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Build the eBPF object of revision REV too (in a git worktree under target/baseline/) and
        /// measure it row by row beside the current one, printing new/old per row. Runs the
        /// per-packet benchmark only.
        #[arg(long, value_name = "REV")]
        baseline: Option<String>,
        /// Extra arguments for the bench binary.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy -D warnings for the workspace and the eBPF crate.
    Clippy,
    /// Bring up a testbed in network namespaces, send flows through the load balancer, fail a gateway.
    Demo {
        /// Leave the testbed running.
        #[arg(long)]
        keep: bool,
    },
    /// Chaos drills over the WireGuard testbed: gateway kill, link down, black hole, flap, path to
    /// the inside network broken, agent kill, reload; writes report.json, summary.md and a
    /// timeline plot per scenario.
    Drill {
        /// Which scenario (checked here, before anything is built).
        #[arg(long, default_value = "all", value_parser = [
            "all", "gateway-kill", "gateway-link-down", "gateway-blackhole", "gateway-flap",
            "gateway-inside-broken", "agent-kill", "config-reload",
        ])]
        scenario: String,
        /// Output directory (default target/drill).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Print the JSON report on stdout.
        #[arg(long)]
        json: bool,
        /// Run the remaining scenarios after one fails.
        #[arg(long)]
        keep_going: bool,
        /// Do not fence a gateway the agent takes down (shows why gateways need fencing).
        #[arg(long)]
        no_fence: bool,
    },
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn bench_object() -> PathBuf {
    root_dir().join("vpnlb-ebpf/target/bpfel-unknown-none/release/vpnlb-bench-progs")
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Builds vpnlb-ebpf with Debian's rustc (prebuilt bpfel core) and rustup's cargo, as TOOLCHAIN.md says.
fn build_ebpf(quiet: bool) -> Result<PathBuf> {
    build_ebpf_in(&root_dir(), quiet)
}

/// [`build_ebpf`] for the checkout at `root` (this one, or a baseline worktree); returns the path
/// of its production object.
fn build_ebpf_in(root: &Path, quiet: bool) -> Result<PathBuf> {
    toolchain::ensure_build_prereqs()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("vpnlb-ebpf"))
        .args(["build", "--release"])
        .env("RUSTC", "/usr/bin/rustc")
        // aya-ebpf uses #![feature]s; Debian's rustc is a stable build.
        .env("RUSTC_BOOTSTRAP", "1");
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    if quiet {
        cmd.arg("--quiet");
    }
    run(&mut cmd).context("building the eBPF object")?;
    let obj = root.join("vpnlb-ebpf/target/bpfel-unknown-none/release/vpnlb");
    if !obj.exists() {
        bail!("eBPF build succeeded but {} is missing", obj.display());
    }
    if !quiet {
        eprintln!("xtask: eBPF object at {}", obj.display());
    }
    Ok(obj)
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"))
}

/// A `cargo` command run in the workspace root with the object path exported for tests and builds,
/// and `VPNLB_BIN`: the `vpnlb` binary (debug build) that root tests run as a real agent process.
fn cargo_with_object(obj: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root_dir())
        .env("VPNLB_EBPF_OBJ", obj)
        .env("VPNLB_BENCH_OBJ", bench_object())
        .env("VPNLB_BIN", target_dir().join("debug/vpnlb"));
    cmd
}

/// Lints both workspaces. The eBPF crate is linted with Debian's clippy, which matches the rustc
/// that has the prebuilt bpfel core (rustup's clippy cannot check a bpfel-unknown-none crate here).
fn clippy() -> Result<()> {
    toolchain::ensure_build_prereqs()?;
    toolchain::ensure_packages(&[(
        "rust-web-clippy",
        "clippy for Debian's rustc: lints the eBPF crate",
    )])?;
    run(Command::new("cargo")
        .current_dir(root_dir())
        .args(["fmt", "--all", "--", "--check"]))?;
    run(Command::new("cargo")
        .current_dir(root_dir().join("vpnlb-ebpf"))
        .args(["fmt", "--", "--check"]))?;
    run(Command::new("cargo").current_dir(root_dir()).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let mut cmd = Command::new("/usr/bin/cargo-clippy");
    cmd.current_dir(root_dir().join("vpnlb-ebpf"))
        .args(["clippy", "--release", "--", "-D", "warnings"])
        .env("RUSTC", "/usr/bin/rustc")
        .env("RUSTC_WORKSPACE_WRAPPER", "/usr/bin/clippy-driver")
        .env("RUSTC_BOOTSTRAP", "1");
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTUP_TOOLCHAIN",
        "CARGO_TARGET_DIR",
    ] {
        cmd.env_remove(var);
    }
    run(&mut cmd)
}

/// The release binary with `obj` embedded.
fn build_release(obj: &Path) -> Result<PathBuf> {
    run(cargo_with_object(obj).env("VPNLB_EMBED_EBPF", obj).args([
        "build",
        "--release",
        "-p",
        "vpnlb-userspace",
    ]))?;
    Ok(target_dir().join("release/vpnlb"))
}

/// Builds the Debian package: the release binary with the object embedded, its man pages and
/// completions under target/package/, then cargo-deb (assets and unit in
/// vpnlb-userspace/Cargo.toml and vpnlb-userspace/debian/). Returns the .deb's path.
fn package(obj: &Path) -> Result<PathBuf> {
    toolchain::ensure_cargo_deb()?;
    let bin = build_release(obj)?;
    let out = target_dir().join("package");
    let _ = std::fs::remove_dir_all(&out);
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    run(Command::new(&bin)
        .arg("manpages")
        .arg("--out")
        .arg(out.join("man")))?;
    for (shell, file) in [
        ("bash", "vpnlb.bash"),
        ("zsh", "_vpnlb"),
        ("fish", "vpnlb.fish"),
    ] {
        let o = Command::new(&bin)
            .args(["completions", shell])
            .output()
            .with_context(|| format!("vpnlb completions {shell}"))?;
        if !o.status.success() {
            bail!("vpnlb completions {shell} failed");
        }
        std::fs::write(completions.join(file), o.stdout)?;
    }
    let debs = target_dir().join("debian");
    let _ = std::fs::remove_dir_all(&debs);
    run(Command::new("cargo")
        .current_dir(root_dir())
        .args([
            "deb",
            "-p",
            "vpnlb-userspace",
            "--no-build",
            "--strip",
            "--output",
        ])
        .arg(&debs))?;
    let deb = std::fs::read_dir(&debs)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("cargo deb wrote no .deb")?;
    eprintln!("xtask: {}", deb.display());
    Ok(deb)
}

fn test(args: &[String]) -> Result<()> {
    toolchain::require_root("cargo xtask test")?;
    toolchain::ensure_runtime_prereqs()?;
    let obj = build_ebpf(false)?;
    // The package test installs it (tests/tests/package.rs).
    let deb = package(&obj)?;
    eprintln!("xtask: unit tests (no root needed)");
    run(cargo_with_object(&obj)
        .args(["test", "--workspace", "--"])
        .args(args))?;
    // The agent tests run this binary as a real process (VPNLB_BIN).
    run(cargo_with_object(&obj).args(["build", "-p", "vpnlb-userspace", "--bin", "vpnlb"]))?;
    eprintln!(
        "xtask: root-only tests: real eBPF object, BPF_PROG_TEST_RUN, pinned maps, network namespaces"
    );
    // One at a time: these tests share the kernel (bpffs, netns names, per-CPU pinning).
    run(cargo_with_object(&obj)
        .env("VPNLB_DEB", &deb)
        .args(["test", "--workspace", "--", "--ignored", "--test-threads=1"])
        .args(args))?;
    Ok(())
}

/// Git's answer to `args` in the workspace root, trimmed.
fn git(args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .current_dir(root_dir())
        .args(args)
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds the eBPF object of revision `rev` in its own git worktree,
/// `target/baseline/<commit>` (kept for the next run), with the same toolchain route as the
/// current object; returns the object's path.
fn baseline_object(rev: &str) -> Result<PathBuf> {
    let commit = git(&["rev-parse", "--verify", &format!("{rev}^{{commit}}")])
        .with_context(|| format!("--baseline {rev}: not a revision"))?;
    let dir = target_dir().join("baseline").join(&commit[..12]);
    if dir.join(".git").exists() {
        let head = git(&["-C", &dir.to_string_lossy(), "rev-parse", "HEAD"])?;
        if head != commit {
            bail!(
                "{} is at {head}, not {commit}: remove it (git worktree remove --force)",
                dir.display()
            );
        }
    } else {
        eprintln!(
            "xtask: checking out {rev} ({}) in {}",
            &commit[..12],
            dir.display()
        );
        // A stale registration (the directory deleted by hand or by cargo clean) blocks `add`.
        git(&["worktree", "prune"])?;
        git(&[
            "worktree",
            "add",
            "--detach",
            &dir.to_string_lossy(),
            &commit,
        ])?;
    }
    eprintln!("xtask: building the baseline eBPF object ({rev})");
    build_ebpf_in(&dir, true).with_context(|| format!("building the eBPF object of {rev}"))
}

fn bench(json: bool, baseline: Option<&str>, args: &[String]) -> Result<()> {
    toolchain::require_root("cargo xtask bench")?;
    toolchain::ensure_runtime_prereqs()?;
    let obj = build_ebpf(true)?;
    let baseline = baseline.map(baseline_object).transpose()?;
    // The agent rows measure the release agent (what users run).
    run(cargo_with_object(&obj).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "vpnlb-userspace",
        "--bin",
        "vpnlb",
    ]))?;
    // A baseline compares two eBPF objects: only the per-packet benchmark runs them.
    let bins: &[&str] = if baseline.is_some() {
        &["vpnlb-bench"]
    } else {
        &[
            "vpnlb-bench",
            "vpnlb-agent-bench",
            "vpnlb-cluster-bench",
            "vpnlb-throughput-bench",
        ]
    };
    let mut merged: Vec<serde_json::Value> = Vec::new();
    let mut extra = serde_json::Map::new();
    for &bin in bins {
        let mut cmd = cargo_with_object(&obj);
        if let Some(b) = &baseline {
            cmd.env("VPNLB_BASELINE_OBJ", b);
        }
        cmd.env("VPNLB_BIN", target_dir().join("release/vpnlb"))
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "vpnlb-tests",
                "--bin",
                bin,
                "--",
            ]);
        if json {
            cmd.arg("--json");
        }
        cmd.args(args);
        if !json {
            run(&mut cmd)?;
            continue;
        }
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {bin}"))?;
        if !out.status.success() {
            bail!("{bin} failed with {}", out.status);
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "{bin} printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })?;
        if let serde_json::Value::Object(map) = v {
            for (k, val) in map {
                match (k.as_str(), val) {
                    ("results", serde_json::Value::Array(rows)) => merged.extend(rows),
                    (_, val) => {
                        extra.insert(k, val);
                    }
                }
            }
        }
    }
    if json {
        extra.insert("results".into(), serde_json::Value::Array(merged));
        println!("{}", serde_json::Value::Object(extra));
    }
    Ok(())
}

/// Builds what a testbed binary needs (the eBPF object, the release agent) and returns
/// `cargo run --release -p vpnlb-tests --bin BIN --` with `VPNLB_BIN` set to that agent; the
/// caller appends the binary's own flags. `what` names the xtask command in messages.
fn testbed_binary(what: &str, bin: &str) -> Result<Command> {
    toolchain::require_root(what)?;
    toolchain::ensure_runtime_prereqs()?;
    let obj = build_ebpf(true)?;
    eprintln!("xtask: building the agent and {bin} (release)");
    run(cargo_with_object(&obj).args([
        "build",
        "--quiet",
        "--release",
        "-p",
        "vpnlb-userspace",
        "--bin",
        "vpnlb",
    ]))?;
    let mut cmd = cargo_with_object(&obj);
    cmd.env("VPNLB_BIN", target_dir().join("release/vpnlb"))
        .args([
            "run",
            "--quiet",
            "--release",
            "-p",
            "vpnlb-tests",
            "--bin",
            bin,
            "--",
        ]);
    Ok(cmd)
}

fn demo(keep: bool) -> Result<()> {
    let mut cmd = testbed_binary("cargo xtask demo", "vpnlb-demo")?;
    if keep {
        cmd.arg("--keep");
    }
    run(&mut cmd)
}

/// `vpnlb-drill` with the release agent; its flags as given.
fn drill(scenario: &str, out: Option<PathBuf>, flags: &[(&str, bool)]) -> Result<()> {
    // The drill runs in the workspace root: a relative --out is the caller's.
    let out = match out {
        Some(p) => std::env::current_dir()?.join(p),
        None => target_dir().join("drill"),
    };
    let mut cmd = testbed_binary("cargo xtask drill", "vpnlb-drill")?;
    cmd.args(["--scenario", scenario]).arg("--out").arg(&out);
    cmd.args(flags.iter().filter(|f| f.1).map(|f| f.0));
    run(&mut cmd)
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf { quiet } => {
            let obj = build_ebpf(quiet)?;
            if quiet {
                println!("{}", obj.display());
            }
            Ok(())
        }
        Cmd::Build => {
            let obj = build_ebpf(false)?;
            let bin = build_release(&obj)?;
            eprintln!("xtask: {}", bin.display());
            Ok(())
        }
        Cmd::Package => {
            let obj = build_ebpf(false)?;
            let deb = package(&obj)?;
            println!("{}", deb.display());
            Ok(())
        }
        Cmd::Test { args } => test(&args),
        Cmd::Clippy => clippy(),
        Cmd::Bench {
            json,
            baseline,
            args,
        } => bench(json, baseline.as_deref(), &args),
        Cmd::Demo { keep } => demo(keep),
        Cmd::Drill {
            scenario,
            out,
            json,
            keep_going,
            no_fence,
        } => drill(
            &scenario,
            out,
            &[
                ("--json", json),
                ("--keep-going", keep_going),
                ("--no-fence", no_fence),
            ],
        ),
    }
}
