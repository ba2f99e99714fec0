//! A thread that samples the agent's pinned maps while a scenario runs, every [`PERIOD`]: each
//! gateway's state in `BACKENDS` and its forwarded-packet counter in the per-backend stats, the
//! backend each client's session points to in `SESSIONS`, and a fingerprint of sampled Maglev ring
//! slots. The maps are the data plane's truth: they work while the agent is dead and tell when a
//! rewrite landed, not when the agent decided it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb_common::FlowKey;

use crate::wg::now_epoch;

pub const PERIOD: Duration = Duration::from_millis(10);
/// Ring slots in the fingerprint: a weight change moves a sixth of the slots or more here, so 64
/// samples all staying put by chance is ~1e-5.
const RING_PROBES: u32 = 64;

/// One look at the maps.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Epoch seconds.
    pub t: f64,
    /// `BACKEND_*` state per gateway (0 when unreadable).
    pub states: Vec<u32>,
    /// Packets forwarded to each gateway so far.
    pub packets: Vec<u64>,
    /// Backend id of each client's session (None: no session).
    pub sessions: Vec<Option<u32>>,
    /// Hash of the backend ids in [`RING_PROBES`] spread ring slots.
    pub ring: u64,
}

pub struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<Sample>>>,
}

impl Monitor {
    /// Starts sampling the maps pinned in `pin_dir` for backends `ids` and the sessions `keys`.
    pub fn start(pin_dir: PathBuf, ids: Vec<u32>, keys: Vec<FlowKey>) -> Result<Monitor> {
        let maps = AyaMaps::open_pinned(&pin_dir)
            .with_context(|| format!("open the pinned maps in {}", pin_dir.display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !s.load(Ordering::Relaxed) {
                out.push(sample(&maps, &ids, &keys));
                std::thread::sleep(PERIOD);
            }
            out
        });
        Ok(Monitor {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sampling and returns the samples in time order.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sample(maps: &AyaMaps, ids: &[u32], keys: &[FlowKey]) -> Sample {
    let t = now_epoch();
    let states = ids
        .iter()
        .map(|&id| maps.backend(id).map(|b| b.state).unwrap_or(0))
        .collect();
    let packets = ids
        .iter()
        .map(|&id| maps.backend_stats(id).map(|s| s.packets).unwrap_or(0))
        .collect();
    let sessions = keys
        .iter()
        .map(|k| maps.session(k).ok().flatten().map(|s| s.backend_id))
        .collect();
    Sample {
        t,
        states,
        packets,
        sessions,
        ring: ring_fingerprint(maps),
    }
}

fn ring_fingerprint(maps: &AyaMaps) -> u64 {
    let Ok(vips) = maps.vips() else { return 0 };
    let Some((_, meta)) = vips.first() else {
        return 0;
    };
    let step = (meta.ring_size / RING_PROBES).max(1);
    (0..RING_PROBES).fold(0xcbf2_9ce4_8422_2325u64, |h, i| {
        let id = maps.ring_slot(meta.ring_id, i * step).unwrap_or(u32::MAX);
        (h ^ u64::from(id)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The first sample at or after epoch `t0` where `f` holds.
pub fn first_after(samples: &[Sample], t0: f64, f: impl Fn(&Sample) -> bool) -> Option<&Sample> {
    samples.iter().find(|s| s.t >= t0 && f(s))
}

/// Packets per second to each gateway over `bin`-wide windows: (window end, rates).
pub fn rates(samples: &[Sample], bin: Duration) -> Vec<(f64, Vec<f64>)> {
    let mut out = Vec::new();
    let Some(mut prev) = samples.first() else {
        return out;
    };
    for s in samples {
        let dt = s.t - prev.t;
        if dt >= bin.as_secs_f64() {
            let r = s
                .packets
                .iter()
                .zip(&prev.packets)
                .map(|(a, b)| a.saturating_sub(*b) as f64 / dt)
                .collect();
            out.push((s.t, r));
            prev = s;
        }
    }
    out
}
