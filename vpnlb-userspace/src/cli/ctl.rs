//! `vpnlb drain|undrain|disable|enable BACKEND`, `vpnlb reload`, `vpnlb status`: requests to the
//! agent's control socket. When the agent is not running these fail with a plain message (the
//! caller exits non-zero).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Result, anyhow};
use serde_json::Value;

use super::render::Table;
use crate::agent::control::{self, Request};

/// Sends `req`; the agent's `result`, or an error that says plainly what went wrong.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Value> {
    let r = control::request(socket, req, timeout).map_err(|e| anyhow!(e))?;
    if r.ok {
        Ok(r.result)
    } else {
        Err(anyhow!(
            "the agent refused: {}",
            r.error.unwrap_or_else(|| "no reason given".into())
        ))
    }
}

/// Text for an admin command's answer: `gw2: draining (changed)`.
pub fn admin_text(result: &Value) -> String {
    let changed = if result["changed"].as_bool() == Some(true) {
        "changed"
    } else {
        "unchanged: it already was"
    };
    format!(
        "{}: {} ({changed})\n",
        result["backend"].as_str().unwrap_or("?"),
        result["state"].as_str().unwrap_or("?")
    )
}

pub fn reload_text(result: &Value) -> String {
    let list = |v: &Value| -> String {
        let names: Vec<&str> = v
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    };
    format!(
        "config reloaded; checks restarted: {}; backends removed: {}\n",
        list(&result["restarted_checks"]),
        list(&result["removed_backends"])
    )
}

fn ago(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1}h", s / 3600.0)
    } else {
        format!("{:.1}d", s / 86400.0)
    }
}

fn since_text(b: &Value) -> String {
    let age = b["since_s"].as_f64().or_else(|| {
        let t = b["since"].as_f64()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()?
            .as_secs_f64();
        Some(now - t)
    });
    match age {
        Some(a) => format!("{} ago", ago(a.max(0.0))),
        None => "-".into(),
    }
}

fn check_text(c: &Value) -> String {
    let up = match c["up"].as_bool() {
        Some(true) => "up",
        Some(false) => "down",
        None => "pending",
    };
    let last = match c["last_ok"].as_bool() {
        Some(true) => "ok",
        Some(false) => "fail",
        None => "no result yet",
    };
    let mut s = format!("{} {up} (last {last}", c["check"].as_str().unwrap_or("?"));
    if let Some(ms) = c["last_latency_ms"].as_f64() {
        s.push_str(&format!(" {ms:.1}ms"));
    }
    if let Some(age) = c["last_age_s"].as_f64() {
        s.push_str(&format!(", {} ago", ago(age)));
    }
    if let Some(d) = c["last_detail"].as_str()
        && !d.is_empty()
        && c["last_ok"].as_bool() == Some(false)
    {
        s.push_str(&format!(": {d}"));
    }
    s.push_str(&format!(
        "; {}/{} failed)",
        c["failures"].as_u64().unwrap_or(0),
        c["results"].as_u64().unwrap_or(0)
    ));
    s
}

/// `status` as tables: every backend's health with its checks, and the pool serving each VIP.
pub fn status_text(st: &Value) -> String {
    let mut out = String::new();
    let a = &st["agent"];
    out.push_str(&format!(
        "agent pid {} config {} pin_dir {}\n\n",
        a["pid"],
        a["config"].as_str().unwrap_or("?"),
        a["pin_dir"].as_str().unwrap_or("?")
    ));
    let mut t = Table::new(&[
        "BACKEND", "ID", "ADDRESS", "STATE", "ADMIN", "SINCE", "CHANGES", "CHECKS",
    ]);
    for b in st["backends"].as_array().into_iter().flatten() {
        let checks: Vec<String> = b["checks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(check_text)
            .collect();
        t.row(vec![
            b["name"].as_str().unwrap_or("?").to_string(),
            b["id"].to_string(),
            b["address"].as_str().unwrap_or("?").to_string(),
            b["state"].as_str().unwrap_or("?").to_string(),
            b["admin"].as_str().unwrap_or("none").to_string(),
            since_text(b),
            b["transitions"].to_string(),
            if checks.is_empty() {
                "(no checks)".into()
            } else {
                checks.join(" | ")
            },
        ]);
    }
    out.push_str(&t.render());
    let mut vt = Table::new(&["VIP", "ADDRESS", "CLASS", "SERVING POOL", "POOL ORDER"]);
    for v in st["vips"].as_array().into_iter().flatten() {
        let addr = format!(
            "{} {}:{}",
            v["protocol"].as_str().unwrap_or("?"),
            v["address"].as_str().unwrap_or("?"),
            v["port"]
        );
        let default_order: Vec<String> = v["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["name"].as_str().map(str::to_string))
            .collect();
        for p in v["active_pools"].as_array().into_iter().flatten() {
            let class = p["class"].as_str();
            let order: Vec<String> = match class {
                None => default_order.clone(),
                Some(c) => v["classes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|x| x["name"] == c)
                    .and_then(|x| x["pool_order"].as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            let serving = p["pool"].as_str();
            let cell = match serving {
                Some(s) if order.first().is_some_and(|f| f != s) => {
                    format!("{s} (pool failover)")
                }
                Some(s) => s.to_string(),
                None => "none (no member up: new flows dropped)".into(),
            };
            vt.row(vec![
                v["name"].as_str().unwrap_or("?").to_string(),
                addr.clone(),
                class.unwrap_or("-").to_string(),
                cell,
                if order.is_empty() {
                    "-".into()
                } else {
                    order.join(" > ")
                },
            ]);
        }
    }
    if !vt.is_empty() {
        out.push('\n');
        out.push_str(&vt.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn status_tables_show_checks_and_failover() {
        let st = json!({
            "agent": {"pid": 7, "config": "/etc/vpnlb/vpnlb.toml", "pin_dir": "/sys/fs/bpf/vpnlb/v1"},
            "backends": [{
                "name": "gw1", "id": 1, "address": "10.0.0.1", "state": "down", "admin": "none",
                "since_s": 300.0, "transitions": 2,
                "checks": [{"check": "tcp:443", "up": false, "last_ok": false,
                            "last_detail": "connection refused", "last_latency_ms": null,
                            "last_age_s": 1.0, "results": 10, "failures": 3}],
            }],
            "vips": [{
                "name": "wg", "address": "203.0.113.10", "port": 51820, "protocol": "udp",
                "active_pools": [{"vip": "wg", "class": null, "pool": "standby"}],
                "pools": [{"name": "primary"}, {"name": "standby"}],
                "classes": [],
            }],
        });
        let t = status_text(&st);
        assert!(t.contains("gw1      1   10.0.0.1  down"), "{t}");
        assert!(t.contains("5m ago"), "{t}");
        assert!(
            t.contains("tcp:443 down (last fail, 1s ago: connection refused; 3/10 failed)"),
            "{t}"
        );
        assert!(
            t.contains("standby (pool failover)  primary > standby"),
            "{t}"
        );
        assert_eq!(
            admin_text(&json!({"backend": "gw1", "state": "draining", "changed": true})),
            "gw1: draining (changed)\n"
        );
        assert_eq!(
            reload_text(&json!({"restarted_checks": ["gw2"], "removed_backends": []})),
            "config reloaded; checks restarted: gw2; backends removed: none\n"
        );
    }
}
