//! `vpnlb status`: the agent's state as JSON (the CLI renders it), computed from the core at a
//! given time.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::agent::reconcile::PoolChoice;
use crate::agent::state::Health;
use crate::config::Config;

/// What the status shows, borrowed from the core.
pub struct Input<'a> {
    pub cfg: &'a Config,
    pub config_path: &'a Path,
    pub health: &'a Health,
    pub choices: &'a [PoolChoice],
    pub attach_errors: &'a BTreeMap<String, String>,
    pub pid: u32,
    pub started_wall: SystemTime,
    /// The cluster part, for a member.
    pub cluster: Option<serde_json::Value>,
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The status document: the agent, every backend with its checks, every VIP with its pools.
pub fn render(core: &Input, now: Instant) -> serde_json::Value {
    let age = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
    let backends: Vec<serde_json::Value> = core
        .cfg
        .backends
        .iter()
        .filter_map(|b| core.health.backends.get(&b.name).map(|h| (b, h)))
        .map(|(b, h)| {
            json!({
                "name": b.name,
                "id": h.id,
                "address": b.address,
                "weight": b.weight,
                "state": h.state,
                "admin": h.admin,
                "since": unix(h.since_wall),
                "since_s": age(h.since),
                "transitions": h.transitions,
                "checks": h.checks.iter().map(|c| json!({
                    "check": c.label,
                    "up": c.up,
                    "last_ok": c.last_ok,
                    "last_detail": c.last_detail,
                    "last_latency_ms": c.last_latency_ms,
                    "last_phases_ms": c.last_phases_ms.iter().map(|(n, ms)| (n.clone(), json!(ms))).collect::<serde_json::Map<String, serde_json::Value>>(),
                    "last_age_s": c.last_at.map(age),
                    "results": c.results,
                    "failures": c.failures,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let vips: Vec<serde_json::Value> = core
        .cfg
        .vips
        .iter()
        .map(|v| {
            let pools: Vec<_> = core.choices.iter().filter(|c| c.vip == v.name).collect();
            json!({
                "name": v.name,
                "address": v.address,
                "port": v.port.unwrap_or(0),
                "protocol": v.protocol.as_str(),
                "forwarding": v.forwarding.as_str(),
                "active_pools": pools,
                // Serving order (for `vpnlb status` / `simulate`: "pool failover").
                "pools": v.pool_order(None).iter().map(|p| json!({
                    "name": p.name, "priority": p.priority, "backends": p.backends,
                })).collect::<Vec<_>>(),
                "classes": v.classes.iter().map(|c| json!({
                    "name": c.name, "dscp": c.dscp, "pool_order": c.pool_order,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "agent": {
            "pid": core.pid,
            "config": core.config_path,
            "started": unix(core.started_wall),
            "pin_dir": core.cfg.agent.pin_dir,
            "interfaces": core.cfg.interfaces.iter().map(|i| &i.name).collect::<Vec<_>>(),
            "attach_errors": core.attach_errors,
        },
        "backends": backends,
        "vips": vips,
        "cluster": core.cluster,
    })
}
