//! FRR bfdd as a real BFD peer in a network namespace ([`Bfdd`], killed by PID on drop), a
//! two-namespace lab joined by a veth pair ([`BfdLab`]) and the timing helpers of the "peer death
//! to Down report" measurement ([`kill_to_down_latencies`], [`Percentiles`]), shared by
//! tests/tests/bfd_frr.rs and benchmarks. Needs root and Debian's `frr` package.

use std::fmt;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::netns::{Netns, ip};

/// Where Debian's frr package puts the daemon.
pub const BFDD: &str = "/usr/lib/frr/bfdd";

/// Two namespaces, `{prefix}-lb` (the load balancer: our BFD sessions) and `{prefix}-gw` (the
/// gateway: bfdd), joined by a veth pair named `eth0` on both sides, with IPv4 and IPv6 addresses.
pub struct BfdLab {
    pub lb: Netns,
    pub gw: Netns,
    pub lb_v4: IpAddr,
    pub gw_v4: IpAddr,
    pub lb_v6: IpAddr,
    pub gw_v6: IpAddr,
}

impl BfdLab {
    /// `prefix` must start with `vpnlb`; `subnet` picks 10.77.`subnet`.0/24 and fd00:77:`subnet`::/64
    /// so labs can coexist.
    pub fn new(prefix: &str, subnet: u8) -> BfdLab {
        let lb = Netns::new(&format!("{prefix}-lb"));
        let gw = Netns::new(&format!("{prefix}-gw"));
        ip(&[
            "-n",
            lb.name(),
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            gw.name(),
        ]);
        let lab = BfdLab {
            lb_v4: format!("10.77.{subnet}.1").parse().unwrap(),
            gw_v4: format!("10.77.{subnet}.2").parse().unwrap(),
            lb_v6: format!("fd00:77:{subnet}::1").parse().unwrap(),
            gw_v6: format!("fd00:77:{subnet}::2").parse().unwrap(),
            lb,
            gw,
        };
        for (ns, v4, v6) in [
            (&lab.lb, lab.lb_v4, lab.lb_v6),
            (&lab.gw, lab.gw_v4, lab.gw_v6),
        ] {
            ns.sh(&format!(
                "ip addr add {v4}/24 dev eth0 && ip -6 addr add {v6}/64 dev eth0 nodad && ip link set eth0 up"
            ));
        }
        lab
    }

    /// Sets the gateway's end of the veth down or up (ours loses carrier with it).
    pub fn set_gw_link(&self, up: bool) {
        self.gw.sh(&format!(
            "ip link set eth0 {}",
            if up { "up" } else { "down" }
        ));
    }
}

/// One `peer` block of bfdd's configuration.
#[derive(Clone, Debug)]
pub struct BfddPeer {
    pub peer: IpAddr,
    pub local: IpAddr,
    pub tx_ms: u32,
    pub rx_ms: u32,
    pub detect_mult: u8,
    pub passive: bool,
}

impl BfddPeer {
    /// 50 ms x 3, active: the VPN-gateway profile.
    pub fn fast(peer: IpAddr, local: IpAddr) -> BfddPeer {
        BfddPeer {
            peer,
            local,
            tx_ms: 50,
            rx_ms: 50,
            detect_mult: 3,
            passive: false,
        }
    }
}

/// FRR's bfdd run by hand in a namespace, every path private (docs/bfd.md, TESTBED.md). Only the
/// PID it wrote is ever signalled; dropping it kills that PID and removes the directory.
pub struct Bfdd {
    ns: String,
    dir: PathBuf,
    peers: Vec<BfddPeer>,
    pid: Option<i32>,
}

impl Bfdd {
    /// Writes the configuration into a fresh private directory and starts bfdd in `ns`.
    pub fn start(ns: &Netns, peers: &[BfddPeer]) -> Bfdd {
        assert!(
            Path::new(BFDD).exists(),
            "{BFDD} missing: apt-get install -y frr"
        );
        let dir = std::env::temp_dir().join(format!("{}-bfdd-{}", ns.name(), std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let mut conf = String::from("bfd\n");
        for p in peers {
            conf += &format!(
                " peer {} local-address {}\n  transmit-interval {}\n  receive-interval {}\n  detect-multiplier {}\n{}",
                p.peer,
                p.local,
                p.tx_ms,
                p.rx_ms,
                p.detect_mult,
                if p.passive { "  passive-mode\n" } else { "" }
            );
        }
        fs::write(dir.join("frr.conf"), conf).expect("write frr.conf");
        run_ok(Command::new("chown").args(["-R", "frr:frr"]).arg(&dir));
        let mut b = Bfdd {
            ns: ns.name().to_string(),
            dir,
            peers: peers.to_vec(),
            pid: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        assert!(self.pid.is_none(), "bfdd already running");
        // bfdd -d forks away from `ip netns exec`; as a subreaper we inherit it and can reap it
        // after a kill instead of leaving a zombie to an init that may not reap.
        // SAFETY: prctl with integer arguments only.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        let d = self.dir.display().to_string();
        let pidfile = self.dir.join("bfdd.pid");
        let _ = fs::remove_file(&pidfile);
        run_ok(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns,
            BFDD,
            "-d",
            "-f",
            &format!("{d}/frr.conf"),
            "-i",
            &format!("{d}/bfdd.pid"),
            "--bfdctl",
            &format!("{d}/bfdd.sock"),
            "--vty_socket",
            &d,
            "-z",
            &format!("{d}/zserv.api"),
            "-P",
            "0",
        ]));
        let t = Instant::now();
        loop {
            if let Some(pid) = fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
                && is_bfdd(pid)
            {
                self.pid = Some(pid);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "bfdd did not write {}",
                pidfile.display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The vty socket is up shortly after the pid file.
        while !self.dir.join("bfdd.vty").exists() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn peers(&self) -> &[BfddPeer] {
        &self.peers
    }

    /// `kill -9` of our bfdd (it sends nothing on the way out); returns the instant just before
    /// the signal.
    pub fn kill9(&mut self) -> Instant {
        let pid = self.pid.take().expect("bfdd not running");
        let at = Instant::now();
        // SAFETY: kill(2) on the PID this bfdd wrote, checked to be a bfdd process.
        let rc = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
        reap(pid);
        at
    }

    /// Starts bfdd again (after [`Bfdd::kill9`]) with the same configuration.
    pub fn restart(&mut self) {
        self.spawn();
    }

    /// Runs a vtysh command against this bfdd.
    pub fn vtysh(&self, cmds: &[&str]) -> String {
        let mut c = Command::new("vtysh");
        c.arg("--vty_socket").arg(&self.dir);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let out = c.output().expect("running vtysh");
        assert!(
            out.status.success(),
            "vtysh {cmds:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `show bfd peers json`: one object per peer ("peer", "status", "id", "remote-id",
    /// "transmit-interval", "remote-transmit-interval", "diagnostic", ...).
    pub fn peers_json(&self) -> Vec<serde_json::Value> {
        let s = self.vtysh(&["show bfd peers json"]);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("bfdd json: {e}: {s}"))
    }

    /// The JSON object of `peer`.
    pub fn peer_json(&self, peer: IpAddr) -> serde_json::Value {
        self.peers_json()
            .into_iter()
            .find(|p| p["peer"].as_str() == Some(&peer.to_string()))
            .unwrap_or_else(|| panic!("bfdd has no peer {peer}"))
    }

    /// Sets `shutdown` (AdminDown) or `no shutdown` on `peer`.
    pub fn set_shutdown(&self, peer: &BfddPeer, shutdown: bool) {
        self.vtysh(&[
            "configure terminal",
            "bfd",
            &format!("peer {} local-address {}", peer.peer, peer.local),
            if shutdown { "shutdown" } else { "no shutdown" },
        ]);
    }
}

impl Drop for Bfdd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take()
            && is_bfdd(pid)
        {
            // SAFETY: kill(2) on the PID our bfdd wrote, checked to still be a bfdd.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Waits for our killed bfdd to exit (it is our child through the subreaper, else ECHILD).
fn reap(pid: i32) {
    let mut status = 0;
    // SAFETY: waitpid on one PID with a valid status pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// `pid` is a live (not zombie) bfdd process.
fn is_bfdd(pid: i32) -> bool {
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    comm.trim() == "bfdd" && !zombie
}

fn run_ok(c: &mut Command) {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills bfdd `reps` times and measures, each time, from the signal to the Down report.
/// `wait(up, timeout)` observes the session: with `up == false` it returns the instant it saw the
/// Down; with `up == true` (after bfdd was restarted) it returns once the session is Up again at
/// its fast rate. The session must be Up at its fast rate on entry.
pub fn kill_to_down_latencies(
    bfdd: &mut Bfdd,
    reps: usize,
    mut wait: impl FnMut(bool, Duration) -> Instant,
) -> Vec<Duration> {
    let mut out = Vec::with_capacity(reps);
    for _ in 0..reps {
        // Let some fast-rate packets flow, and land the kill at a random phase.
        std::thread::sleep(Duration::from_millis(200 + rand_ms(100)));
        let killed = bfdd.kill9();
        let seen = wait(false, Duration::from_secs(5));
        out.push(seen.saturating_duration_since(killed));
        bfdd.restart();
        wait(true, Duration::from_secs(10));
    }
    out
}

fn rand_ms(max: u64) -> u64 {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    n % max
}

/// p50 / p99 / max of a set of latencies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Percentiles {
    pub n: usize,
    pub min: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Percentiles {
    /// Nearest-rank percentiles; panics on an empty set.
    pub fn of(samples: &[Duration]) -> Percentiles {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort();
        let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
        Percentiles {
            n: s.len(),
            min: s[0],
            p50: rank(0.50),
            p99: rank(0.99),
            max: s[s.len() - 1],
        }
    }
}

impl fmt::Display for Percentiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "n={} min={:.1}ms p50={:.1}ms p99={:.1}ms max={:.1}ms",
            self.n,
            self.min.as_secs_f64() * 1e3,
            self.p50.as_secs_f64() * 1e3,
            self.p99.as_secs_f64() * 1e3,
            self.max.as_secs_f64() * 1e3
        )
    }
}
