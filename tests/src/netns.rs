//! Network namespaces for root-only tests and the demo (all named or scoped so nothing leaks):
//! - [`ThreadNetns`]: a private namespace for the calling thread (`unshare(CLONE_NEWNET)`), with a
//!   veth pair, left on drop; it dies with its last user. `BPF_PROG_TEST_RUN` resolves
//!   `ingress_ifindex` and `TX_PORTS` entries in the caller's namespace, so redirect fixtures use it.
//! - [`Netns`]: a named namespace (`vpnlb*`, `ip netns add`) deleted on drop, also when a test
//!   panics; [`Netns::run`] runs code on a thread inside it, so sockets and XDP attachments are made
//!   there without child processes. [`switch`] and [`cable`] build bridged topologies.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output};

/// Runs `ip` with `args`, panicking with the command and its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    check(&format!("ip {}", args.join(" ")), out)
}

fn check(what: &str, out: Output) -> String {
    if !out.status.success() {
        panic!(
            "`{what}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace that is deleted when dropped.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `name` (which must start with `vpnlb`), deleting a stale one left by a killed run.
    pub fn new(name: &str) -> Netns {
        assert!(
            name.starts_with("vpnlb"),
            "test namespaces are named vpnlb*: {name}"
        );
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&["netns", "add", name]);
        let ns = Netns {
            name: name.to_string(),
        };
        ns.sh("ip link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs a shell command inside the namespace; panics on failure.
    pub fn sh(&self, cmd: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .expect("running ip netns exec");
        check(&format!("[{}] {cmd}", self.name), out)
    }

    /// Runs `f` on a thread that has entered this namespace; what it creates (sockets, XDP links by
    /// ifindex) stays in the namespace after it returns.
    pub fn run<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
                // CLONE_NEWNET changes only the calling thread's namespace, and this thread ends here.
                // SAFETY: setns on a valid netns fd for the calling thread only.
                let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread panicked")
        })
    }

    /// The interface's MAC address.
    pub fn mac(&self, ifname: &str) -> [u8; 6] {
        let s = self.sh(&format!("cat /sys/class/net/{ifname}/address"));
        parse_mac(s.trim())
    }

    /// The interface's index inside the namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        self.sh(&format!("cat /sys/class/net/{ifname}/ifindex"))
            .trim()
            .parse()
            .expect("ifindex")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub fn parse_mac(s: &str) -> [u8; 6] {
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    assert_eq!(parts.len(), 6, "bad MAC {s}");
    for (i, p) in parts.iter().enumerate() {
        mac[i] = u8::from_str_radix(p, 16).unwrap_or_else(|_| panic!("bad MAC {s}"));
    }
    mac
}

pub fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Connects `ns` to the bridge `br0` of `switch` with a veth pair: `eth0` in `ns`, `port` on the
/// bridge. Tx checksum offload is turned off on both ends: locally generated packets would otherwise
/// leave with partial checksums that a DSR gateway rejects.
pub fn cable(switch: &Netns, port: &str, ns: &Netns, addr_cidr: &str) {
    ip(&[
        "-n",
        switch.name(),
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        ns.name(),
    ]);
    switch.sh(&format!(
        "ip link set {port} master br0 up && ethtool -K {port} tx off >/dev/null"
    ));
    ns.sh(&format!("ip addr add {addr_cidr} dev eth0 && ip link set eth0 up && ethtool -K eth0 tx off >/dev/null"));
}

/// A switch namespace holding bridge `br0` (no STP, no learning delay).
pub fn switch(name: &str) -> Netns {
    let sw = Netns::new(name);
    sw.sh("ip link add br0 type bridge forward_delay 0 stp_state 0 && ip link set br0 up");
    sw
}

/// A private network namespace for the calling thread (see the module docs).
pub struct ThreadNetns {
    original: File,
    /// ifindex of each end of the veth pair (`vlbt0`, `vlbt1`).
    pub veth: (u32, u32),
}

impl ThreadNetns {
    /// Moves this thread into a fresh network namespace holding `lo` (up) and a veth pair.
    pub fn enter() -> Self {
        let original = File::open("/proc/thread-self/ns/net")
            .unwrap_or_else(|e| panic!("open /proc/thread-self/ns/net: {e}"));
        // SAFETY: unshare only changes this thread's namespace membership; no memory is involved.
        let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
        if rc != 0 {
            panic!(
                "unshare(CLONE_NEWNET): {} (needs root)",
                std::io::Error::last_os_error()
            );
        }
        // Children forked from this thread inherit its namespace.
        ip(&["link", "set", "lo", "up"]);
        ip(&[
            "link", "add", "vlbt0", "type", "veth", "peer", "name", "vlbt1",
        ]);
        ip(&["link", "set", "vlbt0", "up"]);
        ip(&["link", "set", "vlbt1", "up"]);
        let veth = (ifindex("vlbt0"), ifindex("vlbt1"));
        ThreadNetns { original, veth }
    }
}

impl Drop for ThreadNetns {
    fn drop(&mut self) {
        // SAFETY: setns with a namespace fd we opened; affects only this thread.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 && !std::thread::panicking() {
            panic!(
                "setns back to the original netns: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// ifindex of `name` in this thread's namespace.
pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("interface name");
    // SAFETY: c is a valid NUL-terminated string for the duration of the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if i == 0 {
        panic!(
            "if_nametoindex({name}): {}",
            std::io::Error::last_os_error()
        );
    }
    i
}
