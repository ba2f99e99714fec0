//! Periodic probes: [`spawn`] turns one [`CheckSpec`] + [`CheckTarget`] into a tokio task that
//! probes every `interval_ms` and sends one [`CheckResult`] per probe. The first probe waits a random
//! offset in `[0, interval)` and every period is jittered by ±10%, so a thousand backends configured
//! at once do not probe in lockstep. The schedule itself is pure ([`initial_offset`], [`jittered`],
//! [`next_deadline`]) and unit-tested; the per-kind probes live in [`icmp`], [`tcp`], [`http`],
//! [`udp`], [`wireguard`] and [`ikev2`]. BFD is not run here: its sessions belong to the BFD manager.

use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::mpsc::Sender;
use tokio::task::JoinHandle;

use super::probe::ProbeOk;
use super::spec::{CheckResult, CheckSpec, CheckTarget, CheckTiming};
use super::{exec, http, icmp, ikev2, tcp, udp, wireguard};

/// Errors that stop a check from being started (a failing probe is a result, not an error). The
/// messages are complete on their own (no source chain to print).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("bfd checks are run by the bfd session manager, not the probe runner")]
    Bfd,
    #[error("interval_ms must be at least 1")]
    ZeroInterval,
    #[error("timeout_ms {timeout_ms} must be between 1 and interval_ms {interval_ms}")]
    BadTimeout { timeout_ms: u64, interval_ms: u64 },
    #[error("no tokio runtime to run the check on")]
    NoRuntime,
    #[error(transparent)]
    Icmp(#[from] icmp::IcmpError),
    #[error(transparent)]
    Tcp(#[from] tcp::TcpError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Udp(#[from] udp::UdpError),
    #[error(transparent)]
    Wireguard(#[from] wireguard::WireguardError),
    #[error(transparent)]
    Ikev2(#[from] ikev2::Ikev2Error),
    #[error(transparent)]
    Exec(#[from] exec::ExecError),
}

/// A check prepared once (sockets shared, hex decoded, TLS configured) and probed many times.
#[derive(Debug)]
pub enum Probe {
    Icmp(icmp::IcmpProbe),
    Tcp(tcp::TcpProbe),
    Http(http::HttpProbe),
    Udp(udp::UdpProbe),
    Wireguard(wireguard::WireguardProbe),
    Ikev2(ikev2::Ikev2Probe),
    Exec(exec::ExecProbe),
}

impl Probe {
    /// Prepares `spec` against `target`. Opening the shared ICMP socket happens here, so call it
    /// from a thread in the network namespace the probes should run in.
    pub fn new(spec: &CheckSpec, target: &CheckTarget) -> Result<Probe, ProbeError> {
        Ok(match spec {
            CheckSpec::Icmp { .. } => Probe::Icmp(icmp::IcmpProbe::new(target)?),
            CheckSpec::Tcp { port, .. } => Probe::Tcp(tcp::TcpProbe::new(target, *port)),
            CheckSpec::Http { .. } | CheckSpec::Https { .. } => {
                Probe::Http(http::HttpProbe::new(spec, target)?)
            }
            CheckSpec::Udp { .. } => Probe::Udp(udp::UdpProbe::new(spec, target)?),
            CheckSpec::Wireguard { .. } => {
                Probe::Wireguard(wireguard::WireguardProbe::new(spec, target)?)
            }
            CheckSpec::Ikev2 { .. } => Probe::Ikev2(ikev2::Ikev2Probe::new(spec, target)?),
            CheckSpec::Exec { .. } => Probe::Exec(exec::ExecProbe::new(spec, target)?),
            CheckSpec::Bfd { .. } => return Err(ProbeError::Bfd),
        })
    }

    /// One probe bounded by `timeout`: the success, or the failure's short detail.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, String> {
        match self {
            Probe::Icmp(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
            Probe::Tcp(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
            Probe::Http(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
            Probe::Udp(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
            Probe::Wireguard(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
            Probe::Ikev2(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
            Probe::Exec(p) => p.probe(timeout).await.map_err(|e| e.to_string()),
        }
    }
}

/// Probes `spec` once against `target` with the spec's `timeout_ms` (for the CLI and tests).
pub async fn probe_once(spec: &CheckSpec, target: &CheckTarget) -> Result<CheckResult, ProbeError> {
    let timing = validate_timing(spec.timing())?;
    let probe = Probe::new(spec, target)?;
    let outcome = probe.probe(timing.1).await;
    Ok(to_result(target, outcome))
}

/// A running check; dropping it (or [`CheckHandle::abort`]) stops the task.
#[derive(Debug)]
pub struct CheckHandle {
    task: JoinHandle<()>,
}

impl CheckHandle {
    pub fn abort(&self) {
        self.task.abort();
    }

    /// True once the task has stopped (aborted, or the result channel was closed).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for CheckHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts probing `target` per `spec` on the current tokio runtime, sending every result on `tx`.
/// The task ends when the handle is dropped or `tx`'s receiver is gone.
pub fn spawn(
    spec: &CheckSpec,
    target: CheckTarget,
    tx: Sender<CheckResult>,
) -> Result<CheckHandle, ProbeError> {
    if matches!(spec, CheckSpec::Bfd { .. }) {
        return Err(ProbeError::Bfd);
    }
    let (interval, timeout) = validate_timing(spec.timing())?;
    let rt = tokio::runtime::Handle::try_current().map_err(|_| ProbeError::NoRuntime)?;
    let probe = Probe::new(spec, &target)?;
    let offset = initial_offset(interval, &mut rand::rng());
    let budget = spec.probe_budget();
    let task = rt.spawn(run(probe, target, interval, (timeout, budget), offset, tx));
    Ok(CheckHandle { task })
}

fn validate_timing(t: &CheckTiming) -> Result<(Duration, Duration), ProbeError> {
    if t.interval_ms == 0 {
        return Err(ProbeError::ZeroInterval);
    }
    if t.timeout_ms == 0 || t.timeout_ms > t.interval_ms {
        return Err(ProbeError::BadTimeout {
            timeout_ms: t.timeout_ms,
            interval_ms: t.interval_ms,
        });
    }
    Ok((
        Duration::from_millis(t.interval_ms),
        Duration::from_millis(t.timeout_ms),
    ))
}

async fn run(
    probe: Probe,
    target: CheckTarget,
    interval: Duration,
    (timeout, budget): (Duration, Duration),
    offset: Duration,
    tx: Sender<CheckResult>,
) {
    let mut start = tokio::time::Instant::now() + offset;
    loop {
        tokio::time::sleep_until(start).await;
        // A backstop on top of the probe's own deadlines (`budget`: all its steps): a probe never
        // holds up the schedule.
        let outcome =
            tokio::time::timeout(budget + Duration::from_millis(50), probe.probe(timeout))
                .await
                .unwrap_or_else(|_| Err(format!("timeout after {}ms", budget.as_millis())));
        if tx.send(to_result(&target, outcome)).await.is_err() {
            return;
        }
        let now = tokio::time::Instant::now();
        start = next_deadline(start.into_std(), now.into_std(), interval, &mut rand::rng()).into();
    }
}

fn to_result(target: &CheckTarget, outcome: Result<ProbeOk, String>) -> CheckResult {
    let (ok, latency, detail, phases) = match outcome {
        Ok(p) => (true, Some(p.latency), p.detail, p.phases),
        Err(detail) => (false, None, detail, Vec::new()),
    };
    CheckResult {
        backend_id: target.backend_id,
        check_index: target.check_index,
        generation: target.generation,
        ok,
        latency,
        phases,
        detail,
        at: Instant::now(),
    }
}

/// The delay before a check's first probe: uniform in `[0, interval)`.
pub fn initial_offset(interval: Duration, rng: &mut impl Rng) -> Duration {
    let ns = interval.as_nanos().min(u64::MAX as u128) as u64;
    if ns == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(rng.random_range(0..ns))
}

/// One period: uniform in `[0.9, 1.1] * interval`.
pub fn jittered(interval: Duration, rng: &mut impl Rng) -> Duration {
    let ns = interval.as_nanos().min(u64::MAX as u128 / 2) as u64;
    let spread = ns / 10;
    Duration::from_nanos(rng.random_range(ns - spread..=ns + spread))
}

/// When the probe after the one that started at `prev_start` starts: one jittered period later,
/// counted from the previous start so the cadence does not drift with probe latency, but never in the
/// past (a late runtime skips ahead instead of bursting).
pub fn next_deadline(
    prev_start: Instant,
    now: Instant,
    interval: Duration,
    rng: &mut impl Rng,
) -> Instant {
    let next = prev_start + jittered(interval, rng);
    if next < now {
        now + jittered(interval, rng) / 2
    } else {
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::CheckTiming;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn target() -> CheckTarget {
        CheckTarget {
            backend_id: 7,
            check_index: 1,
            generation: 0,
            addr: "127.0.0.1".parse().expect("addr"),
            source: None,
            interface: None,
        }
    }

    #[test]
    fn initial_offset_covers_the_interval_uniformly() {
        let mut rng = StdRng::seed_from_u64(1);
        let interval = Duration::from_millis(1000);
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            let o = initial_offset(interval, &mut rng);
            assert!(o < interval, "{o:?}");
            buckets[(o.as_millis() / 100) as usize] += 1;
        }
        // Each tenth of the interval gets ~1000 of 10,000 draws.
        for (i, b) in buckets.iter().enumerate() {
            assert!((850..1150).contains(b), "bucket {i}: {b} ({buckets:?})");
        }
        assert_eq!(initial_offset(Duration::ZERO, &mut rng), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_within_ten_percent_and_averages_out() {
        let mut rng = StdRng::seed_from_u64(2);
        let interval = Duration::from_millis(1000);
        let (mut lo, mut hi, mut sum) = (Duration::MAX, Duration::ZERO, Duration::ZERO);
        for _ in 0..10_000 {
            let j = jittered(interval, &mut rng);
            assert!(j >= Duration::from_millis(900) && j <= Duration::from_millis(1100));
            lo = lo.min(j);
            hi = hi.max(j);
            sum += j;
        }
        assert!(lo < Duration::from_millis(905) && hi > Duration::from_millis(1095));
        let mean = sum / 10_000;
        assert!(
            mean > Duration::from_millis(995) && mean < Duration::from_millis(1005),
            "{mean:?}"
        );
    }

    #[test]
    fn next_deadline_counts_from_the_previous_start_and_never_bursts() {
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let interval = Duration::from_millis(1000);
        // A probe that took 300 ms does not push the next one back.
        let next = next_deadline(t0, t0 + Duration::from_millis(300), interval, &mut rng);
        let d = next - t0;
        assert!(d >= Duration::from_millis(900) && d <= Duration::from_millis(1100));
        // A runtime stalled for 5 s schedules the next probe ahead of now, not in the past.
        let now = t0 + Duration::from_secs(5);
        let next = next_deadline(t0, now, interval, &mut rng);
        assert!(next > now && next - now <= Duration::from_millis(550));
    }

    #[test]
    fn thousand_checks_spread_over_the_interval() {
        // Simulates 1,000 checks for 10 periods: no 10 ms slot may hold a big share of the probes.
        let mut rng = StdRng::seed_from_u64(4);
        let interval = Duration::from_millis(1000);
        let t0 = Instant::now();
        let mut slots = vec![0u32; 1200];
        for _ in 0..1000 {
            let mut start = t0 + initial_offset(interval, &mut rng);
            for _ in 0..10 {
                let slot = ((start - t0).as_millis() / 10) as usize % slots.len();
                slots[slot] += 1;
                start = next_deadline(start, start, interval, &mut rng);
            }
        }
        let max = slots.iter().copied().max().unwrap_or(0);
        // 10,000 probes over ~1,100 slots: ~9 per slot on average.
        assert!(max < 40, "busiest 10 ms slot holds {max} probes");
    }

    #[test]
    fn timing_is_validated() {
        let t = |interval_ms, timeout_ms| CheckTiming {
            interval_ms,
            timeout_ms,
            ..CheckTiming::default()
        };
        assert!(matches!(
            validate_timing(&t(0, 0)),
            Err(ProbeError::ZeroInterval)
        ));
        assert!(matches!(
            validate_timing(&t(100, 200)),
            Err(ProbeError::BadTimeout { .. })
        ));
        assert!(matches!(
            validate_timing(&t(100, 0)),
            Err(ProbeError::BadTimeout { .. })
        ));
        assert_eq!(
            validate_timing(&t(1000, 500)).expect("valid"),
            (Duration::from_millis(1000), Duration::from_millis(500))
        );
    }

    #[test]
    fn bfd_is_refused_with_a_clear_error() {
        let spec = CheckSpec::Bfd {
            desired_min_tx_ms: 300,
            required_min_rx_ms: 300,
            detect_mult: 3,
            passive: false,
            timing: CheckTiming::default(),
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let err = spawn(&spec, target(), tx).expect_err("bfd must be refused");
        assert!(matches!(err, ProbeError::Bfd));
        assert!(err.to_string().contains("bfd session manager"));
    }

    #[tokio::test]
    async fn vpn_checks_are_dispatched_to_their_probes() {
        // A bad wireguard spec fails in WireguardProbe::new, surfaced as ProbeError::Wireguard.
        let wg = CheckSpec::Wireguard {
            port: 51820,
            public_key: "AAAA".into(),
            private_key: None,
            private_key_file: None,
            inside: None,
            timing: CheckTiming::default(),
        };
        let err = probe_once(&wg, &target()).await.expect_err("bad key");
        assert!(matches!(err, ProbeError::Wireguard(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "public_key: 3 bytes, a WireGuard key has 32"
        );
        // An ikev2 probe of a closed loopback port: the ICMP port unreachable comes back.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        let ike = CheckSpec::Ikev2 {
            port,
            timing: CheckTiming::default(),
        };
        let r = probe_once(&ike, &target()).await.expect("started");
        assert!(!r.ok);
        assert_eq!(r.detail, "connection refused");
        assert_eq!((r.backend_id, r.check_index), (7, 1));
    }

    #[test]
    fn spawn_outside_a_runtime_is_an_error() {
        let spec = CheckSpec::Tcp {
            port: 1,
            timing: CheckTiming::default(),
        };
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let err = spawn(&spec, target(), tx).expect_err("no runtime");
        assert!(matches!(err, ProbeError::NoRuntime));
    }

    #[tokio::test(start_paused = true)]
    async fn runner_probes_on_a_jittered_cadence() {
        // A TCP check bound to an interface that does not exist: every probe fails at once, before
        // any I/O (real I/O would race the paused clock's auto-advance), so the cadence is exact.
        let spec = CheckSpec::Tcp {
            port: 1,
            timing: CheckTiming {
                interval_ms: 100,
                timeout_ms: 50,
                ..CheckTiming::default()
            },
        };
        let target = CheckTarget {
            interface: Some("vpnlb-no-such".into()),
            ..target()
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let handle = spawn(&spec, target, tx).expect("spawn");
        let t0 = tokio::time::Instant::now();
        let mut at = Vec::new();
        while at.len() < 20 {
            let r = rx.recv().await.expect("result");
            assert!(!r.ok);
            assert_eq!((r.backend_id, r.check_index), (7, 1));
            assert_eq!(r.detail, "socket: no such interface");
            at.push(tokio::time::Instant::now() - t0);
        }
        assert!(
            at[0] < Duration::from_millis(100),
            "first probe {:?}",
            at[0]
        );
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        for g in &gaps {
            assert!(
                *g >= Duration::from_millis(89) && *g <= Duration::from_millis(111),
                "{gaps:?}"
            );
        }
        let (lo, hi) = (gaps.iter().min(), gaps.iter().max());
        assert!(lo != hi, "no jitter: {gaps:?}");
        drop(handle);
        // The task is gone: the channel closes once its sender is dropped.
        assert!(rx.recv().await.is_none());
    }
}
