//! Makes a fresh Debian 12 machine able to build and test vpnlb: installs the missing Debian packages
//! and bpf-linker, saying what it installs and why (the route verified in shared/TOOLCHAIN.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Debian packages, each with the reason it is needed.
const BUILD_PACKAGES: &[(&str, &str)] = &[
    (
        "rustc-web",
        "rustc 1.96 with LLVM 22: compiles the eBPF crate (rustup has no rust-src here)",
    ),
    (
        "cargo-web",
        "companion of rustc-web (the verified toolchain route)",
    ),
    (
        "libstd-rust-web-dev-bpf",
        "prebuilt core/alloc for bpfel-unknown-none (no -Z build-std needed)",
    ),
    ("llvm-22-dev", "libLLVM 22 that bpf-linker links against"),
    ("clang-22", "LLVM 22 tools used by bpf-linker's build"),
    (
        "protobuf-compiler",
        "protoc: the etcd client (etcd-client crate) compiles etcd's gRPC definitions",
    ),
    (
        "libprotobuf-dev",
        "the well-known .proto files protoc needs for etcd's definitions",
    ),
];

/// Packages the root-only tests and the demo use at run time.
const RUNTIME_PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "ip netns / ip link for the test namespaces"),
    ("tmux", "drives `vpnlb top` in a real terminal in its tests"),
    (
        "wireguard-go",
        "userspace WireGuard: the real VPN gateways and clients of the demo and tests",
    ),
    ("wireguard-tools", "wg: keys and WireGuard configuration"),
    (
        "iputils-ping",
        "ping through the tunnels in the WireGuard tests and demo",
    ),
    (
        "nftables",
        "the nftables DNAT load balancer the throughput benchmark compares against",
    ),
    (
        "strongswan-charon",
        "IKEv2 daemon: the real gateway of the ikev2 probe tests",
    ),
    ("strongswan-swanctl", "swanctl and charon's control plugin"),
    (
        "libcharon-extra-plugins",
        "charon's kernel-libipsec plugin (no kernel XFRM here)",
    ),
    (
        "libstrongswan-standard-plugins",
        "charon's openssl and gcm plugins",
    ),
    ("libstrongswan-extra-plugins", "charon's curve25519 plugin"),
    (
        "ethtool",
        "turns off veth tx checksum offload in datapath tests",
    ),
    (
        "frr",
        "FRR's bfdd: the real BFD peer of the BFD tests and benchmark",
    ),
    (
        "util-linux",
        "nsenter: runs the agent in a test namespace with the host's bpffs",
    ),
    (
        "bpftool",
        "checks that the pinned maps dump with BTF-typed keys (tests/cli_maps.rs)",
    ),
    (
        "openvpn",
        "OpenVPN 2.6: the real gateways and clients of the OpenVPN end-to-end tests",
    ),
    ("easy-rsa", "the OpenVPN test PKI"),
    (
        "procps",
        "sysctl: ARP, rp_filter and forwarding settings of the test namespaces",
    ),
    (
        "etcd-server",
        "etcd 3.4: the real etcd cluster of the cluster tests",
    ),
    (
        "etcd-client",
        "etcdctl: the cluster tests write and read etcd directly",
    ),
    ("openssl", "the throw-away CA of the etcd TLS test"),
    ("stress-ng", "a CPU hog for runs of the suite under load"),
    (
        "prometheus",
        "promtool: checks and unit-tests the alert rules (docs/prometheus/vpnlb-rules.yml)",
    ),
    (
        "man-db",
        "man -l: the package test renders an installed man page",
    ),
    (
        "systemd",
        "systemd-analyze verify: the package test checks the installed unit offline",
    ),
];

/// cargo-deb, which builds the Debian package (`cargo xtask package`); this release builds on
/// rustc 1.95 (rust-version 1.85).
const CARGO_DEB_VERSION: &str = "3.8.0";

const BPF_LINKER_VERSION: &str = "0.13.0";

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// Installs whichever of `pkgs` are missing, with one apt transaction.
pub fn ensure_packages(pkgs: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&(&str, &str)> = pkgs.iter().filter(|(p, _)| !dpkg_installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing missing Debian packages:");
    for (p, why) in &missing {
        eprintln!("  {p}: {why}");
    }
    if !is_root() {
        bail!(
            "installing packages needs root: run as root, or `apt-get install -y {}`",
            missing
                .iter()
                .map(|(p, _)| *p)
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        // Only what is named: recommends pulled a kernel image and an initramfs rebuild into a
        // fresh machine's test run.
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing.iter().map(|(p, _)| *p)))?;
    Ok(())
}

fn cargo_home_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    home.join("bin")
}

fn bpf_linker_ok(path: &Path) -> bool {
    Command::new(path)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false)
}

/// Installs bpf-linker 0.13.0 built against Debian's LLVM 22 unless it is already there.
pub fn ensure_bpf_linker() -> Result<()> {
    let bin = cargo_home_bin().join("bpf-linker");
    if bpf_linker_ok(&bin) {
        return Ok(());
    }
    eprintln!(
        "xtask: installing bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (links the eBPF object; takes about a minute)"
    );
    run(Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "--locked",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"]))?;
    if !bpf_linker_ok(&bin) {
        bail!(
            "bpf-linker installed but {} --version does not report {BPF_LINKER_VERSION}",
            bin.display()
        );
    }
    Ok(())
}

fn cargo_deb_ok() -> bool {
    Command::new(cargo_home_bin().join("cargo-deb"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_DEB_VERSION))
        .unwrap_or(false)
}

/// Installs cargo-deb (builds the Debian package) unless it is already there.
pub fn ensure_cargo_deb() -> Result<()> {
    if cargo_deb_ok() {
        return Ok(());
    }
    eprintln!(
        "xtask: installing cargo-deb {CARGO_DEB_VERSION} (builds the Debian package; takes about a minute)"
    );
    run(Command::new("cargo").args([
        "install",
        "--locked",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
    ]))?;
    if !cargo_deb_ok() {
        bail!("cargo-deb installed but does not report {CARGO_DEB_VERSION}");
    }
    Ok(())
}

/// Everything `build-ebpf` needs.
pub fn ensure_build_prereqs() -> Result<()> {
    ensure_packages(BUILD_PACKAGES)?;
    ensure_bpf_linker()
}

/// Everything the root-only tests and the demo need besides the build.
pub fn ensure_runtime_prereqs() -> Result<()> {
    ensure_packages(RUNTIME_PACKAGES)
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (XDP programs, BPF maps and network namespaces)");
    }
    Ok(())
}
