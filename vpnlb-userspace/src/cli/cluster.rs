//! `vpnlb cluster push|status`: the cluster's desired service in etcd, and what every member
//! says about itself there. Both read `[cluster]` (etcd endpoints, TLS, prefix) from a host's
//! config file.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use serde_json::{Value, json};

use super::render::Table;
use crate::cluster::etcd::{self, Snapshot};
use crate::cluster::{Keys, MemberState};
use crate::config::{self, ClusterConfig};

fn cluster_of(host: &Path) -> Result<ClusterConfig> {
    let cfg = config::load(host)?;
    cfg.cluster.ok_or_else(|| {
        anyhow!(
            "{}: no [cluster] section (the etcd endpoints come from a member's config)",
            host.display()
        )
    })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")
}

/// Validates `service` (the service document) and writes it with its ids in one transaction,
/// unless it is what etcd already has. Returns the answer (revision before and after).
pub fn push(host: &Path, service: &Path) -> Result<Value> {
    let c = cluster_of(host)?;
    let origin = service.display().to_string();
    let text = std::fs::read_to_string(service).with_context(|| format!("reading {origin}"))?;
    let doc = config::parse_service(&text, &origin)?;
    let cfg = config::Config {
        backends: doc.backends.clone(),
        vips: doc.vips.clone(),
        ..config::Config::default()
    };
    let keys = Keys::new(&c.prefix());
    runtime()?.block_on(retrying(|| async {
        let mut client = etcd::connect(&c).await?;
        let snap = etcd::snapshot(&mut client, &keys).await?;
        let (previous, prev_ids, same) = match &snap.service {
            Some(s) => (s.revision, s.ids.clone(), s.text == text),
            None => (0, None, false),
        };
        if same {
            return Ok(json!({
                "revision": previous, "previous": previous, "changed": false,
                "backends": doc.backends.len(), "vips": doc.vips.len(),
            }));
        }
        // Ids are agreed here, once, for every member: names keep theirs.
        let ids = config::assign_ids(&cfg, prev_ids.as_ref());
        let revision = etcd::push_service(&mut client, &keys, &text, &ids, previous).await?;
        Ok::<_, etcd::EtcdError>(json!({
            "revision": revision, "previous": previous, "changed": true,
            "backends": doc.backends.len(), "vips": doc.vips.len(),
        }))
    }))
}

/// Runs `f` again while etcd answers with a transient error (an election after a member died, a
/// member that refuses connections): up to 5 tries over about 3 s. A conflict (the service
/// changed meanwhile) is not retried: the operator must look again.
async fn retrying<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd::EtcdError>>,
{
    let mut pause = std::time::Duration::from_millis(200);
    for attempt in 1.. {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e @ etcd::EtcdError::Conflict { .. }) => return Err(e.into()),
            Err(e) if attempt >= 5 => return Err(e.into()),
            Err(_) => {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
    }
    unreachable!("the loop returns")
}

pub fn push_text(v: &Value) -> String {
    if v["changed"] == true {
        format!(
            "service revision {} pushed (was {}): {} backends, {} vips\n",
            v["revision"], v["previous"], v["backends"], v["vips"]
        )
    } else {
        format!(
            "unchanged: etcd already has this service (revision {})\n",
            v["revision"]
        )
    }
}

/// Everything the members publish, with the service revision in etcd.
pub fn status(host: &Path) -> Result<Value> {
    let c = cluster_of(host)?;
    let keys = Keys::new(&c.prefix());
    let snap: Snapshot = runtime()?.block_on(retrying(|| async {
        let mut client = etcd::connect(&c).await?;
        etcd::snapshot(&mut client, &keys).await
    }))?;
    Ok(status_json(&c, &snap))
}

/// The status document from a snapshot (pure).
pub fn status_json(c: &ClusterConfig, snap: &Snapshot) -> Value {
    let revision = snap.service.as_ref().map_or(0, |s| s.revision);
    // For each ring, the hash most members with the latest revision have; others differ.
    let mut votes: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
    for m in snap
        .members
        .values()
        .filter(|m| m.service_revision == revision)
    {
        for (ring, h) in &m.rings {
            *votes.entry(ring).or_default().entry(h).or_default() += 1;
        }
    }
    let majority: BTreeMap<&str, &str> = votes
        .iter()
        .filter_map(|(r, hs)| hs.iter().max_by_key(|(_, n)| **n).map(|(h, _)| (*r, *h)))
        .collect();
    let members: Vec<Value> = snap
        .members
        .values()
        .map(|m: &MemberState| {
            let differ: Vec<&String> = m
                .rings
                .iter()
                .filter(|(r, h)| {
                    m.service_revision == revision
                        && majority.get(r.as_str()).is_some_and(|mh| mh != h)
                })
                .map(|(r, _)| r)
                .collect();
            let down: Vec<&String> = m
                .health
                .iter()
                .filter(|(_, s)| **s == crate::cluster::Seen::Down)
                .map(|(b, _)| b)
                .collect();
            json!({
                "member": m.member,
                "peer": m.peer,
                "pid": m.pid,
                "ready": m.ready,
                "role": m.role.as_str(),
                "replication_lag_ms_p50": m.replication_lag_ms_p50,
                "replication_lag_ms_p99": m.replication_lag_ms_p99,
                "service_revision": m.service_revision,
                "service_error": m.service_error,
                "sees_down": down,
                "health": m.health,
                "rings": m.rings,
                "rings_differ": differ,
                "agreed": m.agreed,
            })
        })
        .collect();
    let rings_agree = members
        .iter()
        .all(|m| m["rings_differ"].as_array().is_none_or(|a| a.is_empty()));
    json!({
        "cluster": c.name,
        "prefix": c.prefix(),
        "service_revision": revision,
        "admin": snap.admin,
        "members": members,
        "rings_agree": rings_agree,
        "bad_values": snap.bad.iter().map(|(k, r)| json!({"key": k, "reason": r})).collect::<Vec<_>>(),
    })
}

pub fn status_text(v: &Value) -> String {
    let mut out = format!(
        "cluster {} ({}): service revision {}, {} members, rings {}\n",
        v["cluster"].as_str().unwrap_or("?"),
        v["prefix"].as_str().unwrap_or("?"),
        v["service_revision"],
        v["members"].as_array().map_or(0, Vec::len),
        if v["rings_agree"] == true {
            "agree"
        } else {
            "DIFFER"
        },
    );
    let mut t = Table::new(&[
        "MEMBER",
        "PEER",
        "ROLE",
        "REVISION",
        "SEES DOWN",
        "RINGS",
        "REPL LAG p50/p99",
    ]);
    for m in v["members"].as_array().into_iter().flatten() {
        let rev = match m["service_error"].as_str() {
            Some(e) => format!("{} (refused: {e})", m["service_revision"]),
            None => m["service_revision"].to_string(),
        };
        let down: Vec<&str> = m["sees_down"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let differ: Vec<&str> = m["rings_differ"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let rings = if differ.is_empty() {
            format!("{} same", m["rings"].as_object().map_or(0, |o| o.len()))
        } else {
            format!("DIFFER: {}", differ.join(", "))
        };
        t.row(vec![
            m["member"].as_str().unwrap_or("?").to_string(),
            m["peer"].as_str().unwrap_or("").to_string(),
            m["role"].as_str().unwrap_or("?").to_string(),
            rev,
            if down.is_empty() {
                "-".into()
            } else {
                down.join(",")
            },
            rings,
            match (
                m["replication_lag_ms_p50"].as_f64(),
                m["replication_lag_ms_p99"].as_f64(),
            ) {
                (Some(a), Some(b)) => format!("{a} / {b} ms"),
                _ => "-".into(),
            },
        ]);
    }
    out.push_str(&t.render());
    if let Some(a) = v["admin"].as_object()
        && !a.is_empty()
    {
        let list: Vec<String> = a
            .iter()
            .map(|(b, s)| format!("{b}: {}", s.as_str().unwrap_or("?")))
            .collect();
        out.push_str(&format!("admin: {}\n", list.join(", ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Role;

    const HOST: &str = r#"
[[interface]]
name = "eth0"

[cluster]
name = "edge"
member = "lb1"
etcd_endpoints = ["http://127.0.0.1:2379"]
peer_listen = "10.0.0.1:7946"
peer_key_file = "/etc/vpnlb/peer.key"
"#;

    fn member(name: &str, role: Role, ring: &str, lag: Option<(f64, f64)>) -> MemberState {
        MemberState {
            member: name.into(),
            service_revision: 5,
            rings: BTreeMap::from([("wg".to_string(), ring.to_string())]),
            ready: role == Role::Ready,
            role,
            replication_lag_ms_p50: lag.map(|l| l.0),
            replication_lag_ms_p99: lag.map(|l| l.1),
            ..Default::default()
        }
    }

    #[test]
    fn status_shows_each_members_role_lag_and_the_ring_that_differs() {
        let c = config::parse(HOST, "host.toml").unwrap().cluster.unwrap();
        let snap = Snapshot {
            revision: 9,
            service: Some(crate::cluster::Service {
                revision: 5,
                text: String::new(),
                ids: None,
            }),
            members: BTreeMap::from([
                (
                    "lb1".into(),
                    member("lb1", Role::Ready, "aa", Some((0.6, 0.9))),
                ),
                ("lb2".into(), member("lb2", Role::Ready, "aa", None)),
                ("lb3".into(), member("lb3", Role::Syncing, "bb", None)),
            ]),
            ..Default::default()
        };
        let v = status_json(&c, &snap);
        assert_eq!(v["rings_agree"], false);
        let m = &v["members"];
        assert_eq!(m[0]["role"], "ready");
        assert_eq!(m[0]["replication_lag_ms_p99"], 0.9);
        assert_eq!(m[1]["replication_lag_ms_p50"], Value::Null);
        assert_eq!(m[2]["role"], "syncing");
        assert_eq!(m[2]["ready"], false);
        assert_eq!(m[2]["rings_differ"], json!(["wg"]));
        let text = status_text(&v);
        let line = |n: &str| text.lines().find(|l| l.starts_with(n)).unwrap().to_string();
        assert!(line("lb1").contains("ready") && line("lb1").contains("0.6 / 0.9 ms"));
        assert!(line("lb3").contains("syncing") && line("lb3").contains("DIFFER: wg"));
        assert!(text.contains("rings DIFFER"), "{text}");
    }

    #[test]
    fn a_member_state_of_a_later_version_is_read_with_its_new_fields_ignored() {
        let later = r#"{"member":"lb2","peer":"10.0.0.2:7946","pid":1,"started":0,
            "service_revision":5,"health":{},"agreed":"x","rings":{},"ready":true,
            "role":"ready","announcing":["203.0.113.10"]}"#;
        let m: MemberState = serde_json::from_str(later).unwrap();
        assert_eq!((m.member.as_str(), m.role), ("lb2", Role::Ready));
        // And one of an earlier version (no role, no lag): defaults.
        let earlier = r#"{"member":"lb3","peer":"10.0.0.3:7946","pid":1,"started":0,
            "service_revision":5,"health":{},"agreed":"x","rings":{},"ready":false}"#;
        let m: MemberState = serde_json::from_str(earlier).unwrap();
        assert_eq!((m.role, m.replication_lag_ms_p99), (Role::Waiting, None));
    }
}
