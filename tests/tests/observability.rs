//! The Grafana dashboard (docs/grafana/vpnlb.json) and the Prometheus alert rules
//! (docs/prometheus/vpnlb-rules.yml) against the code:
//! - `promtool check rules` on the rules, `promtool test rules` on their unit tests
//!   (vpnlb-rules.test.yml: sample series that must fire, and must not fire, each alert), and
//!   `promtool check rules` on every dashboard query wrapped as a recording rule (so each one is
//!   valid PromQL);
//! - a live agent (the real `vpnlb run` in a testbed namespace, L2 DSR to two gateways with icmp
//!   checks) is scraped, and every metric name the dashboard and the rules use must be among what
//!   it exports, every `counter="..."` they name among its data-plane counters: the dashboard and
//!   the alerts never drift from the code. A self-test shows the comparison can fail.
//!
//! Needs `promtool` (Debian `prometheus`), and root for the live agent (tests/src/agent.rs).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use vpnlb_tests::agent::{AgentBed, INTERFACE, backend, vip};

fn docs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs")
}

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("promtool (apt-get install prometheus): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

/// Every PromQL expression of the dashboard (panel targets and the templating query).
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(docs().join("grafana/vpnlb.json")).expect("dashboard");
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().expect("expr").to_string());
        }
    }
    for v in d["templating"]["list"].as_array().expect("templating") {
        // `label_values(METRIC_SELECTOR, LABEL)`: the selector is PromQL.
        if let Some(q) = v["definition"].as_str() {
            let inner = q.strip_prefix("label_values(").unwrap_or(q);
            out.push(
                inner
                    .rsplit_once(',')
                    .map_or(inner, |(sel, _)| sel)
                    .to_string(),
            );
        }
    }
    assert!(out.len() > 20, "dashboard queries: {out:?}");
    out
}

/// Every `expr:` of the rules file.
fn rule_exprs() -> Vec<String> {
    let text =
        std::fs::read_to_string(docs().join("prometheus/vpnlb-rules.yml")).expect("rules file");
    let out: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .map(|e| e.trim().to_string())
        .collect();
    assert!(out.len() >= 7, "alert rules: {out:?}");
    out
}

/// A dashboard query as plain PromQL: Grafana's variables replaced by values.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "1m")
        .replace("$job", "vpnlb")
        .replace("$instance", ".*")
}

/// Metric names in a PromQL expression: identifiers that are not functions, keywords, label
/// names or label values (what stands before `{`, `[`, `)` or an operator, outside quotes and
/// outside `by (...)`/`without (...)` lists).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "max",
        "min",
        "avg",
        "count",
        "rate",
        "increase",
        "irate",
        "changes",
        "absent",
        "histogram_quantile",
        "time",
        "by",
        "without",
        "or",
        "and",
        "unless",
        "on",
        "ignoring",
        "label_values",
        "bool",
        "offset",
    ];
    let mut names = BTreeSet::new();
    let b = expr.as_bytes();
    let (mut i, mut in_str, mut in_braces, mut in_grouping) = (0, false, false, false);
    let mut in_range = false;
    while i < b.len() {
        let c = b[i] as char;
        if in_str {
            if c == '"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => in_braces = true,
            '}' => in_braces = false,
            '[' => in_range = true,
            ']' => in_range = false,
            ')' => in_grouping = false,
            c if c.is_ascii_alphabetic() || c == '_' => {
                let start = i;
                while i < b.len() && ((b[i] as char).is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                let word = &expr[start..i];
                let rest = expr[i..].trim_start();
                let is_call = rest.starts_with('(');
                if word == "by" || word == "without" {
                    in_grouping = true;
                } else if !in_braces
                    && !in_range
                    && !in_grouping
                    && !is_call
                    && !NOT_METRICS.contains(&word)
                    && !word.chars().all(|c| c.is_ascii_digit())
                {
                    names.insert(word.to_string());
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    names
}

/// `counter="X"` values (exact matches) in an expression.
fn counters(expr: &str) -> BTreeSet<String> {
    expr.split("counter=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .map(str::to_string)
        .collect()
}

/// What an exposition offers: sample names, and the names a TYPE line implies (a counter's
/// `_total`, a histogram's `_bucket`, `_sum`, `_count`).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in text.lines() {
        if let Some(rest) = l.strip_prefix("# TYPE ") {
            let mut f = rest.split_whitespace();
            let (Some(name), Some(kind)) = (f.next(), f.next()) else {
                continue;
            };
            names.insert(name.to_string());
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for s in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{s}"));
                    }
                }
                _ => {}
            }
        } else if !l.starts_with('#') && !l.is_empty() {
            let end = l.find(['{', ' ']).unwrap_or(l.len());
            names.insert(l[..end].to_string());
        }
    }
    names
}

/// What the dashboard and the rules use that `text` does not export (`up` is Prometheus' own).
fn missing(text: &str, exprs: &[String]) -> (Vec<String>, Vec<String>) {
    let have = exported(text);
    let counters_have: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("vpnlb_datapath_total{counter=\""))
        .filter_map(|r| r.split('"').next())
        .map(str::to_string)
        .collect();
    let mut names = BTreeSet::new();
    let mut wanted_counters = BTreeSet::new();
    for e in exprs {
        names.extend(metric_names(e));
        wanted_counters.extend(counters(e));
    }
    names.remove("up");
    (
        names.into_iter().filter(|n| !have.contains(n)).collect(),
        wanted_counters
            .into_iter()
            .filter(|c| !counters_have.contains(c))
            .collect(),
    )
}

#[test]
fn metric_names_are_found_in_promql() {
    let e = r#"histogram_quantile(0.99, sum by (instance, le) (rate(vpnlb_map_write_seconds_bucket{job="vpnlb", counter=~"drop_.*"}[5m]))) > 0.05"#;
    assert_eq!(
        metric_names(e),
        BTreeSet::from(["vpnlb_map_write_seconds_bucket".to_string()])
    );
    let e = r#"up{job="vpnlb"} == 0 or absent(up{job="vpnlb"})"#;
    assert_eq!(metric_names(e), BTreeSet::from(["up".to_string()]));
    let e = r#"time() - vpnlb_agent_start_time_seconds{job="$job"} + rate(x[$__rate_interval])"#;
    assert_eq!(
        metric_names(e),
        BTreeSet::from([
            "vpnlb_agent_start_time_seconds".to_string(),
            "x".to_string()
        ])
    );
    assert_eq!(
        counters(r#"rate(x{counter="session_flood_skip"}[1m]) + y{counter="a"}"#),
        BTreeSet::from(["a".to_string(), "session_flood_skip".to_string()])
    );
    // The comparison can fail: a renamed metric and an unknown counter are both reported.
    let text = "# TYPE vpnlb_sessions gauge\nvpnlb_sessions 3\n# TYPE vpnlb_datapath counter\nvpnlb_datapath_total{counter=\"drop_no_backend\"} 0\n";
    let (names, ctrs) = missing(
        text,
        &[
            "vpnlb_sessions + vpnlb_session_count".to_string(),
            "rate(vpnlb_datapath_total{counter=\"drop_no_backend\"}[1m]) + rate(vpnlb_datapath_total{counter=\"drop_renamed\"}[1m])".to_string(),
        ],
    );
    assert_eq!(names, ["vpnlb_session_count"]);
    assert_eq!(ctrs, ["drop_renamed"]);
}

#[test]
#[ignore = "needs promtool (Debian prometheus): run cargo xtask test"]
fn alert_rules_and_dashboard_queries_pass_promtool() {
    let dir = docs().join("prometheus");
    let out = promtool(&["check", "rules", "vpnlb-rules.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    let out = promtool(&["test", "rules", "vpnlb-rules.test.yml"], &dir);
    assert!(out.contains("SUCCESS"), "{out}");
    println!("promtool test rules: {}", out.trim().replace('\n', " "));
    // Every dashboard query, as a recording rule: promtool parses each one.
    let tmp = std::env::temp_dir().join(format!("vpnlb-dash-rules-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let exprs = dashboard_exprs();
    for (i, e) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: vpnlb_dashboard_query_{i}\n        expr: {}\n",
            serde_json::to_string(&concrete(e)).expect("quote")
        ));
    }
    std::fs::write(tmp.join("dashboard.yml"), rules).expect("write");
    let out = promtool(&["check", "rules", "dashboard.yml"], &tmp);
    assert!(out.contains("SUCCESS"), "{out}");
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
#[ignore = "needs root and the agent binary: run cargo xtask test"]
fn dashboard_and_rules_use_only_what_a_live_agent_exports() {
    let bed = AgentBed::up("vpnlb-obs", 2, 1, |t, _| {
        let mut s = String::from(INTERFACE);
        for (i, g) in t.gws.iter().enumerate() {
            s.push_str(&backend(i, Some(g.mac("eth0")), 1, &["icmp"]));
        }
        s.push_str(&vip(&[
            ("primary", 100, &["gw1"]),
            ("standby", 50, &["gw2"]),
        ]));
        s
    });
    bed.agent
        .wait_all_up(&["gw1", "gw2"], Duration::from_secs(15));
    let text = bed.agent.metrics_text();
    let mut exprs = dashboard_exprs();
    exprs.extend(rule_exprs());
    let (names, ctrs) = missing(&text, &exprs);
    assert!(
        names.is_empty() && ctrs.is_empty(),
        "used by the dashboard or the rules but not exported by the agent: metrics {names:?}, \
         counters {ctrs:?}\n--- exposition ---\n{text}"
    );
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    println!(
        "{} metric names used by the dashboard and the rules, all exported: {used:?}",
        used.len()
    );
    // Panels of the issue's list are there.
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(docs().join("grafana/vpnlb.json")).expect("dashboard"),
    )
    .expect("json");
    let titles: Vec<&str> = d["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str())
        .collect();
    for want in [
        "Packets/s per VIP",
        "Bits/s per gateway",
        "Sessions",
        "Gateway state",
        "Pool failover",
        "Map-write latency",
        "Drops/s by reason",
        "Passed to the kernel/s by reason",
        "Flood guard",
        "Probe round trip",
        "End-to-end probe steps",
    ] {
        assert!(titles.contains(&want), "no panel {want:?} in {titles:?}");
    }
}
