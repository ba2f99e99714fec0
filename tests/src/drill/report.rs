//! The drill's report: one [`ScenarioReport`] per scenario, written as report.json (the interface
//! of issue #5: `{"scenarios":[{"name", "detect_ms", "map_write_ms", "lb_recovery_ms",
//! "tunnel_recovery_ms", "healthy_flows_lost_packets", ...}]}`) and summary.md.
//!
//! Every time is in milliseconds from the fault injection (the kill of the gateway's VPN daemons,
//! the cable cut, the nft rule, the first long outage of the flap, the agent's kill -9, the reload
//! request). A metric that does not apply is null, and the scenario's `notes` say why.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

/// Tunnel-level recovery of one protocol: first reply through each moved client's tunnel.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelRecovery {
    pub p50: Option<f64>,
    pub max: Option<f64>,
    /// Clients that had to move.
    pub clients: usize,
    /// Of those, clients whose tunnel carried a reply again before the drill stopped waiting.
    pub recovered: usize,
}

/// Pings of the untouched clients of one protocol: lost, and sent over the same span.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Loss {
    pub lost: u64,
    pub sent: u64,
}

/// How a protocol's own probe saw a gateway fault.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeCatch {
    /// The check's label (`wireguard:51820`, `ikev2:500`, `udp:1194`).
    pub check: String,
    /// Fault -> the agent's status shows that check down (None: it never did).
    pub down_ms: Option<f64>,
}

/// A point of the scenario's timeline (ms from the fault), for the plot and the summary.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub t_ms: f64,
    pub what: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScenarioReport {
    pub name: String,
    /// Every expectation of the scenario held (see `problems`).
    pub ok: bool,
    /// Fault -> the agent's state change (the hook event's wall-clock time).
    pub detect_ms: Option<f64>,
    /// Fault -> the change visible in the pinned maps (backend state, or the ring on a reload).
    pub map_write_ms: Option<f64>,
    /// Fault -> every session of the victim's clients points to a healthy gateway (the data plane
    /// forwards their next packet there).
    pub lb_recovery_ms: Option<f64>,
    /// Per protocol: `{"wireguard": {"p50": .., "max": .., ..}, "ipsec": {..}, "openvpn": {..}}`.
    pub tunnel_recovery_ms: Option<BTreeMap<String, TunnelRecovery>>,
    /// Pings lost by clients whose gateway was not touched (all clients when no gateway is).
    pub healthy_flows_lost_packets: u64,
    /// Pings those clients sent over the same span.
    pub healthy_flows_sent_packets: u64,
    /// The same two numbers per protocol.
    pub healthy_flows_by_protocol: BTreeMap<String, Loss>,
    pub victim: Option<String>,
    /// Checks that were failing when the agent took the victim down.
    pub caught_by: Vec<String>,
    /// Checks that still passed at that moment (what alone would have missed the fault).
    pub missed_by: Vec<String>,
    /// Per protocol, its probe's verdict on the victim (gateway-kill and gateway-blackhole).
    pub caught_by_protocol: BTreeMap<String, ProbeCatch>,
    pub clients: usize,
    pub clients_moved: usize,
    /// State changes seen through the hook: "gw2 up -> down (reason)".
    pub transitions: Vec<Event>,
    pub timeline: Vec<Event>,
    /// Scenario-specific facts and why a metric is null.
    pub notes: Vec<String>,
    /// Expectations that did not hold.
    pub problems: Vec<String>,
    /// The scenario could not run to the end.
    pub error: Option<String>,
    pub duration_s: f64,
    /// The timeline plot, relative to the output directory.
    pub plot: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub scenarios: Vec<ScenarioReport>,
    pub testbed: String,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.scenarios.iter().all(|s| s.ok)
    }

    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serializes")
    }

    /// Writes report.json and summary.md into `out`.
    pub fn write(&self, out: &Path) -> Result<()> {
        std::fs::write(out.join("report.json"), self.json() + "\n")
            .with_context(|| format!("write {}", out.join("report.json").display()))?;
        std::fs::write(out.join("summary.md"), self.markdown())
            .with_context(|| format!("write {}", out.join("summary.md").display()))?;
        Ok(())
    }

    pub fn markdown(&self) -> String {
        let mut s = String::from("# vpnlb drill\n\n");
        let _ = writeln!(s, "{}\n", self.testbed);
        s.push_str(
            "Times in ms from the fault. detect: the agent's state change; map write: the change in \
             the pinned maps; LB recovery: every session of the victim's clients on a healthy \
             gateway; tunnel: first ping reply through each moved client's tunnel, per protocol \
             (p50 / max, over that protocol's moved clients); healthy lost: pings lost by clients of \
             untouched gateways, all protocols (per protocol under each scenario).\n\n",
        );
        s.push_str("| scenario | ok | detect | map write | LB recovery | tunnel wireguard p50 / max | tunnel ipsec p50 / max | tunnel openvpn p50 / max | moved | healthy lost / sent | caught by |\n");
        s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for r in &self.scenarios {
            let tunnel = |proto: &str| {
                r.tunnel_recovery_ms
                    .as_ref()
                    .and_then(|m| m.get(proto))
                    .map(|t| format!("{} / {} ({})", ms(t.p50), ms(t.max), t.clients))
                    .unwrap_or_else(|| "n/a".into())
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} of {} | {} / {} | {} |",
                r.name,
                if r.ok { "yes" } else { "NO" },
                ms(r.detect_ms),
                ms(r.map_write_ms),
                ms(r.lb_recovery_ms),
                tunnel("wireguard"),
                tunnel("ipsec"),
                tunnel("openvpn"),
                r.clients_moved,
                r.clients,
                r.healthy_flows_lost_packets,
                r.healthy_flows_sent_packets,
                if r.caught_by.is_empty() {
                    "-".to_string()
                } else {
                    r.caught_by.join(", ")
                },
            );
        }
        for r in &self.scenarios {
            let _ = writeln!(s, "\n## {}\n", r.name);
            if let Some(e) = &r.error {
                let _ = writeln!(s, "**Did not complete:** {e}\n");
            }
            for p in &r.problems {
                let _ = writeln!(s, "- **Expectation failed:** {p}");
            }
            for n in &r.notes {
                let _ = writeln!(s, "- {n}");
            }
            if !r.healthy_flows_by_protocol.is_empty() {
                let per: Vec<String> = r
                    .healthy_flows_by_protocol
                    .iter()
                    .map(|(p, l)| format!("{p} {} of {}", l.lost, l.sent))
                    .collect();
                let _ = writeln!(
                    s,
                    "- Pings lost by clients of untouched gateways: {}.",
                    per.join(", ")
                );
            }
            if !r.missed_by.is_empty() {
                let _ = writeln!(
                    s,
                    "- Still passing when the agent took {} down: {} (these alone would not have caught it).",
                    r.victim.as_deref().unwrap_or("?"),
                    r.missed_by.join(", ")
                );
            }
            if !r.timeline.is_empty() {
                s.push_str("\n| t (ms) | event |\n|---:|---|\n");
                for e in &r.timeline {
                    let _ = writeln!(s, "| {:.0} | {} |", e.t_ms, e.what);
                }
            }
            if let Some(p) = &r.plot {
                let _ = writeln!(s, "\n![{} timeline]({p})", r.name);
            }
        }
        s
    }
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{v:.0}"))
}

/// p50 and max of `v` (None when empty).
pub fn p50_max(v: &[f64]) -> (Option<f64>, Option<f64>) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (
        v.get(v.len().saturating_sub(1) / 2).copied(),
        v.last().copied(),
    )
}
