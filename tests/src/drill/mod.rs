//! `cargo xtask drill`: chaos drills over a real WireGuard, IPsec and OpenVPN testbed, with a
//! failover report.
//!
//! Each scenario gets a fresh testbed ([`bed::DrillBed`]: the real agent in an LB namespace, three
//! gateways behind the VIP with L2 DSR, each running `wireguard-go`, strongSwan's `charon` and
//! `openvpn`; 18 WireGuard, 6 IPsec and 6 OpenVPN client tunnels pinging through it; the agent
//! checks every gateway with `icmp` and one probe per protocol and reports every state change
//! through an exec hook). A [`monitor::Monitor`] samples the pinned maps every few milliseconds
//! (backend states, per-backend packet counters, the clients' sessions, a fingerprint of the Maglev
//! ring) while [`scenario`] injects one fault, and the numbers come from those samples, the hook
//! events, the agent's status and the pings' own logs, per protocol where the protocols differ.
//! [`report`] writes report.json and summary.md, [`plot`] an SVG timeline per scenario.
//!
//! Root only; needs `VPNLB_BIN`/`VPNLB_EBPF_OBJ` (set by xtask), wireguard-go, wireguard-tools,
//! strongSwan (charon, swanctl), openvpn, easy-rsa, iputils-ping and nftables.

pub mod bed;
pub mod monitor;
pub mod plot;
pub mod report;
pub mod scenario;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

static STOP: AtomicBool = AtomicBool::new(false);

/// Asks every running drill wait to give up (Ctrl-C): the scenario returns an error and its
/// testbed is torn down by its guards.
pub fn request_stop() {
    STOP.store(true, Ordering::Relaxed);
}

pub fn interrupted() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// Sleeps `d`, waking every 50 ms to honour [`request_stop`].
pub fn pause(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        if interrupted() {
            bail!("interrupted");
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Polls `f` every `every` until it returns Some, `timeout` passes (None) or the drill is
/// interrupted (error).
pub fn poll<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<Option<T>> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(Some(v));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        pause(every)?;
    }
}

/// Progress lines on stderr (stdout carries the report), with the time since the drill started.
pub struct Progress {
    t0: Instant,
}

impl Progress {
    pub fn new() -> Progress {
        Progress { t0: Instant::now() }
    }

    pub fn step(&self, msg: &str) {
        eprintln!("[{:>6.1}s] {msg}", self.t0.elapsed().as_secs_f64());
    }
}

impl Default for Progress {
    fn default() -> Self {
        Progress::new()
    }
}
