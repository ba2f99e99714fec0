//! Several vpnlb hosts with one desired state (root only; real etcd 3.4 members, real agents, one
//! per LB namespace with its own pin dir, gateways answering ICMP): the service pushed to etcd is
//! applied by every member with byte-identical rings; health by quorum; cluster-wide admin; etcd
//! member loss and a whole outage; bad input (unreachable etcd, wrong TLS, unreadable values, a
//! service a member cannot run).
//!
//! Topology (one bridge): etcd members 10.98.K.21-23 in one namespace, LB hosts lb1-3 at
//! 10.98.K.11-13, gateways gw1-3 at 10.98.K.31-33.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;
use vpnlb::agent::control::Request;
use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb_tests::agent::{AgentProcess, Scratch, backend_in, env_path, metric, wait_for};
use vpnlb_tests::etcd::{EtcdCluster, Tls, write_peer_key};
use vpnlb_tests::netns::{Netns, cable, switch};

static NET: AtomicU32 = AtomicU32::new(0);
const WAIT: Duration = Duration::from_secs(30);

/// The service every test pushes first: three gateways (neighbour-resolved MACs, ICMP checks
/// every 200 ms) behind one WireGuard VIP.
fn service(net: u32, weights: [u32; 3]) -> String {
    let mut s = String::new();
    for (i, w) in weights.iter().enumerate() {
        s.push_str(&format!(
            "[[backend]]\nname = \"gw{n}\"\naddress = \"10.98.{net}.3{n}\"\nweight = {w}\n\
             [[backend.check]]\ntype = \"icmp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n\n",
            n = i + 1
        ));
    }
    s.push_str(
        "[[vip]]\nname = \"wg\"\naddress = \"203.0.113.10\"\nport = 51820\nprotocol = \"udp\"\nring_size = 65537\n\
         [[vip.pool]]\nname = \"all\"\nbackends = [\"gw1\", \"gw2\", \"gw3\"]\n",
    );
    s
}

/// Three LB hosts, three gateways, an etcd namespace; drop order: agents, etcd, namespaces, files.
struct Bed {
    lbs: Vec<AgentProcess>,
    etcd: Option<EtcdCluster>,
    net: u32,
    // Namespaces are deleted before the scratch dirs (pins) are removed.
    ns_lb: Vec<Netns>,
    _ns_gw: Vec<Netns>,
    ns_etcd: Netns,
    _sw: Netns,
    scratch: Vec<Scratch>,
    tls: Option<Tls>,
}

fn host_body(net: u32, i: usize, etcd: &str, extra: &str, key: &str) -> String {
    format!(
        "[[interface]]\nname = \"eth0\"\nmode = \"generic\"\n\n[cluster]\nname = \"t\"\nmember = \"lb{n}\"\n{etcd}\
         peer_listen = \"10.98.{net}.1{n}:7946\"\npeer_key_file = \"{key}\"\nlease_ttl_s = 2\n{extra}",
        n = i + 1
    )
}

impl Bed {
    /// The namespaces and etcd (TLS when `tls`), without agents.
    fn network(tls: bool) -> Bed {
        let net = 40 + NET.fetch_add(1, Ordering::Relaxed);
        let tag = format!("vpnlbK{net}");
        let sw = switch(&format!("{tag}-sw"));
        let ns_etcd = Netns::new(&format!("{tag}-etcd"));
        cable(&sw, "p-etcd", &ns_etcd, &format!("10.98.{net}.21/24"));
        ns_etcd.sh(&format!(
            "ip addr add 10.98.{net}.22/24 dev eth0 && ip addr add 10.98.{net}.23/24 dev eth0"
        ));
        let ns_lb: Vec<Netns> = (1..=3)
            .map(|i| {
                let ns = Netns::new(&format!("{tag}-lb{i}"));
                cable(
                    &sw,
                    &format!("p-lb{i}"),
                    &ns,
                    &format!("10.98.{net}.1{i}/24"),
                );
                ns
            })
            .collect();
        let ns_gw: Vec<Netns> = (1..=3)
            .map(|i| {
                let ns = Netns::new(&format!("{tag}-gw{i}"));
                cable(
                    &sw,
                    &format!("p-gw{i}"),
                    &ns,
                    &format!("10.98.{net}.3{i}/24"),
                );
                ns
            })
            .collect();
        let scratch: Vec<Scratch> = (0..3).map(|_| Scratch::new()).collect();
        for s in &scratch {
            write_peer_key(&s.dir.join("peer.key"), 7);
        }
        let addrs: Vec<String> = (1..=3).map(|i| format!("10.98.{net}.2{i}")).collect();
        let addr_refs: Vec<&str> = addrs.iter().map(String::as_str).collect();
        let tls = tls.then(|| Tls::generate(&scratch[0].dir.join("tls"), &addr_refs));
        let etcd = EtcdCluster::start(&ns_etcd, &addr_refs, tls.as_ref(), &[]);
        Bed {
            lbs: Vec::new(),
            etcd: Some(etcd),
            net,
            ns_lb,
            _ns_gw: ns_gw,
            ns_etcd,
            _sw: sw,
            scratch,
            tls,
        }
    }

    fn etcd(&self) -> &EtcdCluster {
        self.etcd.as_ref().expect("etcd")
    }

    /// Starts the agent of LB host `i` with `[cluster]` naming `etcd_toml` (+ `extra` lines).
    fn start_lb(&mut self, i: usize, etcd_toml: &str, extra: &str) {
        let key = self.scratch[i].dir.join("peer.key");
        let body = host_body(self.net, i, etcd_toml, extra, &key.display().to_string());
        let a = AgentProcess::start(&self.scratch[i], self.ns_lb[i].name(), &body);
        if self.lbs.len() > i {
            self.lbs[i] = a;
        } else {
            self.lbs.push(a);
        }
    }

    /// The network, etcd and three agents.
    fn up() -> Bed {
        let mut b = Bed::network(false);
        let toml = b.etcd().cluster_toml();
        for i in 0..3 {
            b.start_lb(i, &toml, "");
        }
        b
    }

    /// `vpnlb ARGS` run in LB host `i`'s namespace with its config as `--host-config`.
    fn vpnlb(&self, i: usize, args: &[&str]) -> std::process::Output {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns_lb[i].name()))
            .arg(env_path("VPNLB_BIN"))
            .args(args)
            .arg("--host-config")
            .arg(&self.lbs[i].config)
            .output()
            .expect("run vpnlb")
    }

    /// Pushes `text` as the service from LB host 0; returns the new revision.
    fn push(&self, text: &str) -> i64 {
        let f = self.scratch[0].dir.join("service.toml");
        std::fs::write(&f, text).unwrap();
        let out = self.vpnlb(
            0,
            &["cluster", "push", "--config", f.to_str().unwrap(), "--json"],
        );
        assert!(
            out.status.success(),
            "push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["revision"].as_i64().unwrap()
    }

    fn cluster_status(&self, i: usize) -> Value {
        let out = self.vpnlb(i, &["cluster", "status", "--json"]);
        assert!(
            out.status.success(),
            "cluster status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until every running agent runs `revision`.
    fn wait_revision(&self, revision: i64) {
        for a in &self.lbs {
            wait_for(WAIT, || {
                (a.status()["cluster"]["service_revision"].as_i64() == Some(revision)).then_some(())
            })
            .unwrap_or_else(|| {
                panic!(
                    "{} never ran revision {revision}: {:#}\nlog:\n{}",
                    a.ns,
                    a.status()["cluster"],
                    a.log()
                )
            });
        }
    }

    fn wait_state_all(&self, backend: &str, state: &str) {
        for a in &self.lbs {
            a.wait_state(backend, state, WAIT);
        }
    }

    /// Each member's RINGS row of the VIP, read from its own pinned maps.
    fn pinned_rings(&self) -> Vec<Vec<u32>> {
        self.lbs
            .iter()
            .map(|a| {
                let m = AyaMaps::open_pinned(&a.pin_dir).expect("open pins");
                let (_, meta) = m.vips().unwrap().into_iter().next().expect("vip written");
                m.ring(meta.ring_id, meta.ring_size).unwrap()
            })
            .collect()
    }

    /// Every member's rings are byte-identical, and every member's published hashes agree.
    fn assert_rings_equal(&self, what: &str) {
        // The members publish after they write: wait until the published hashes agree, then
        // compare the maps themselves.
        let st = wait_for(WAIT, || {
            let st = self.cluster_status(0);
            let members = st["members"].as_array()?;
            let hashes: BTreeSet<String> = members
                .iter()
                .map(|m| m["rings"]["wg"].as_str().unwrap_or("").to_string())
                .collect();
            (members.len() == self.lbs.len() && st["rings_agree"] == true && hashes.len() == 1)
                .then_some(st)
        })
        .unwrap_or_else(|| panic!("{what}: ring hashes differ: {:#}", self.cluster_status(0)));
        let rings = self.pinned_rings();
        for (i, r) in rings.iter().enumerate().skip(1) {
            assert!(r == &rings[0], "{what}: lb{} and lb1 rings differ", i + 1);
        }
        println!(
            "{what}: rings byte-identical on {} members, hash {}",
            rings.len(),
            st["members"][0]["rings"]["wg"]
        );
    }

    /// Drops ICMP from LB host `i` to gateway `g` (its checks of `g` fail; nothing else does).
    fn cut(&self, i: usize, g: usize) {
        self.ns_lb[i].sh(&format!(
            "nft add table inet vpnlbcut && nft add chain inet vpnlbcut out '{{ type filter hook output priority 0; }}' ; \
             nft add rule inet vpnlbcut out ip daddr 10.98.{}.3{} icmp type echo-request drop",
            self.net,
            g + 1
        ));
    }

    fn uncut(&self, i: usize) {
        self.ns_lb[i].sh("nft delete table inet vpnlbcut");
    }
}

fn sees_down(st: &Value, peer: &str, backend: &str) -> bool {
    st["cluster"]["peers"][peer]["sees_down"]
        .as_array()
        .is_some_and(|a| a.iter().any(|b| b == backend))
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_pushed_service_runs_on_every_member_with_identical_rings() {
    let b = Bed::up();
    let r1 = b.push(&service(b.net, [1, 1, 1]));
    b.wait_revision(r1);
    for g in ["gw1", "gw2", "gw3"] {
        b.wait_state_all(g, "up");
    }
    b.assert_rings_equal("revision 1");
    // Every member says it is ready (service applied, checks concluded, peers' sessions copied).
    wait_for(WAIT, || {
        let st = b.cluster_status(0);
        let m = st["members"].as_array()?;
        (m.len() == 3 && m.iter().all(|m| m["role"] == "ready" && m["ready"] == true)).then_some(())
    })
    .unwrap_or_else(|| panic!("members not ready: {:#}", b.cluster_status(0)));
    // Pushing the same document again writes nothing.
    let f = b.scratch[0].dir.join("service.toml");
    let out = b.vpnlb(0, &["cluster", "push", "--config", f.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("unchanged"));
    // A weight change (a reload for every member).
    let r2 = b.push(&service(b.net, [1, 2, 1]));
    b.wait_revision(r2);
    b.assert_rings_equal("weights 1/2/1");
    // A drain on one member is cluster-wide.
    let r = b.lbs[1].request(Request::Drain {
        backend: "gw1".into(),
    });
    assert!(r.ok, "{r:?}");
    b.wait_state_all("gw1", "draining");
    b.assert_rings_equal("gw1 drained");
    assert_eq!(
        b.cluster_status(2)["admin"]["gw1"],
        "drain",
        "the override lives in etcd"
    );
    let r = b.lbs[2].request(Request::Undrain {
        backend: "gw1".into(),
    });
    assert!(r.ok, "{r:?}");
    b.wait_state_all("gw1", "up");
    // A health change seen by every member.
    for i in 0..3 {
        b.cut(i, 2);
    }
    b.wait_state_all("gw3", "down");
    b.assert_rings_equal("gw3 down everywhere");
    for i in 0..3 {
        b.uncut(i);
    }
    b.wait_state_all("gw3", "up");
    b.assert_rings_equal("gw3 back");
    // A service document with an error is refused by `push` with its line, and nothing changes.
    let bad = service(b.net, [1, 1, 1]).replace("backends = [\"gw1\"", "backends = [\"gw9\"");
    let f = b.scratch[0].dir.join("bad.toml");
    std::fs::write(&f, &bad).unwrap();
    let out = b.vpnlb(0, &["cluster", "push", "--config", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown backend \"gw9\""),
        "{err}"
    );
    assert!(err.contains("bad.toml:"), "{err}");
    assert_eq!(b.cluster_status(0)["service_revision"], r2);
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn a_gateway_one_member_cannot_reach_stays_in_service_two_take_it_out() {
    let b = Bed::up();
    let r = b.push(&service(b.net, [1, 1, 1]));
    b.wait_revision(r);
    b.wait_state_all("gw2", "up");
    // lb1's path to gw2 breaks: lb1's own check goes down...
    b.cut(0, 1);
    wait_for(WAIT, || {
        let st = b.lbs[1].status();
        sees_down(&st, "lb1", "gw2").then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "lb2 never heard lb1 see gw2 down: {:#}",
            b.lbs[1].status()["cluster"]
        )
    });
    wait_for(WAIT, || {
        sees_down(&b.lbs[2].status(), "lb1", "gw2").then_some(())
    })
    .expect("lb3 heard lb1");
    // ... and every member, lb1 included, keeps gw2 in service: 1 of 3 is no quorum.
    for a in &b.lbs {
        assert_eq!(
            a.state("gw2").as_deref(),
            Some("up"),
            "{}: {:#}",
            a.ns,
            a.status()
        );
        assert_eq!(
            backend_in(&a.status(), "gw2").unwrap()["checks"][0]["up"],
            if a.ns == b.ns_lb[0].name() {
                Value::Bool(false)
            } else {
                Value::Bool(true)
            },
        );
    }
    b.assert_rings_equal("gw2 cut from lb1 only");
    assert!(b.pinned_rings()[0].contains(&2), "gw2 still in lb1's ring");
    // lb2 loses it too: 2 of 3, it leaves every ring.
    b.cut(1, 1);
    b.wait_state_all("gw2", "down");
    b.assert_rings_equal("gw2 cut from lb1 and lb2");
    for r in b.pinned_rings() {
        assert!(!r.contains(&2), "gw2 left the ring");
    }
    let reason = b.lbs[2].log();
    assert!(
        reason.contains("2 of 3 members see it down (lb1, lb2)"),
        "lb3's log says why: {reason}"
    );
    // It comes back the same way.
    b.uncut(0);
    b.wait_state_all("gw2", "up");
    b.uncut(1);
    b.assert_rings_equal("gw2 back");
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn losing_etcd_members_or_all_of_etcd_never_stops_forwarding() {
    let mut b = Bed::up();
    let r = b.push(&service(b.net, [1, 1, 1]));
    b.wait_revision(r);
    for g in ["gw1", "gw2", "gw3"] {
        b.wait_state_all(g, "up");
    }
    let before = b.pinned_rings();
    // One member down: the others keep quorum; pushes and admin still work.
    b.etcd.as_mut().unwrap().kill(0);
    let r2 = b.push(&service(b.net, [2, 1, 1]));
    b.wait_revision(r2);
    b.assert_rings_equal("with 2 of 3 etcd members");
    // All of etcd down: members say so, keep their maps, refuse cluster-wide admin.
    let before_outage = b.pinned_rings();
    b.etcd.as_mut().unwrap().kill(1);
    b.etcd.as_mut().unwrap().kill(2);
    for a in &b.lbs {
        wait_for(WAIT, || {
            (a.status()["cluster"]["etcd"] == "lost").then_some(())
        })
        .unwrap_or_else(|| panic!("{} never noticed: {:#}", a.ns, a.status()["cluster"]));
        assert!(a.log().contains("etcd lost"), "{}", a.log());
    }
    let r = b.lbs[0].request(Request::Drain {
        backend: "gw1".into(),
    });
    assert!(
        !r.ok && r.error.as_deref().unwrap().contains("etcd is unreachable"),
        "{r:?}"
    );
    // A health change meanwhile is frozen (default on_etcd_loss): the maps stay as agreed.
    for i in 0..3 {
        b.cut(i, 0);
    }
    for a in &b.lbs {
        wait_for(WAIT, || {
            (backend_in(&a.status(), "gw1").unwrap()["checks"][0]["up"] == false).then_some(())
        })
        .expect("local check down");
        assert_eq!(a.state("gw1").as_deref(), Some("up"), "frozen");
    }
    assert_eq!(
        b.pinned_rings(),
        before_outage,
        "forwarding state unchanged"
    );
    // etcd back: members reconnect, publish, agree (gw1 is down for all three now).
    {
        let e = b.etcd.as_mut().unwrap();
        for i in 0..3 {
            e.restart(i);
        }
        e.wait_healthy();
    }
    for a in &b.lbs {
        wait_for(WAIT, || {
            (a.status()["cluster"]["etcd"] == "up").then_some(())
        })
        .unwrap_or_else(|| panic!("{} never reconnected: {}", a.ns, a.log()));
    }
    b.wait_state_all("gw1", "down");
    for i in 0..3 {
        b.uncut(i);
    }
    b.wait_state_all("gw1", "up");
    b.assert_rings_equal("after the outage");
    assert_ne!(before, b.pinned_rings(), "revision 2's weights in force");
}

#[test]
#[ignore = "needs root: run cargo xtask test"]
fn bad_input_is_reported_and_changes_nothing() {
    // A member started while etcd is unreachable comes up, says so, and joins when etcd does.
    let mut b = Bed::network(false);
    let dead = format!(
        "etcd_endpoints = [\"http://10.98.{}.29:2379\"]\netcd_timeout_ms = 300\n",
        b.net
    );
    b.start_lb(0, &dead, "");
    wait_for(WAIT, || {
        (b.lbs[0].status()["cluster"]["etcd"] == "lost").then_some(())
    })
    .expect("reports etcd lost");
    assert_eq!(b.lbs[0].status()["cluster"]["service_revision"], 0);
    assert!(b.lbs[0].running());
    let good = b.etcd().cluster_toml();
    b.lbs[0].write_config(&host_body(
        b.net,
        0,
        &good,
        "",
        &b.scratch[0].dir.join("peer.key").display().to_string(),
    ));
    b.lbs[0].restart();
    b.start_lb(1, &good, "");
    b.start_lb(2, &good, "");
    let r = b.push(&service(b.net, [1, 1, 1]));
    b.wait_revision(r);
    // An unreadable admin value written behind vpnlb's back: counted, logged, not applied.
    b.etcd().ctl(&["put", "/vpnlb/t/admin/gw1", "bogus"]);
    for a in &b.lbs {
        wait_for(WAIT, || {
            (a.status()["cluster"]["bad_values"].as_u64() >= Some(1)).then_some(())
        })
        .unwrap_or_else(|| panic!("{}: {:#}", a.ns, a.status()["cluster"]));
        assert!(a.log().contains("unreadable value in etcd ignored"));
        assert_eq!(backend_in(&a.status(), "gw1").unwrap()["admin"], "none");
    }
    // A service one member cannot run (a backend behind an interface only lb1 and lb2 have):
    // lb3 refuses it, says so in its status and in the cluster's, and keeps the old revision.
    for i in 0..2 {
        b.ns_lb[i].sh("ip link add eth1 type veth peer name eth1p && ip link set eth1 up && ip link set eth1p up");
    }
    let extra = service(b.net, [1, 1, 1]).replace(
        "[[vip]]",
        &format!(
            "[[backend]]\nname = \"gw4\"\naddress = \"10.98.{}.34\"\ninterface = \"eth1\"\n\n[[vip]]",
            b.net
        ),
    );
    let r2 = b.push(&extra);
    for a in &b.lbs[0..2] {
        wait_for(WAIT, || {
            (a.status()["cluster"]["service_revision"].as_i64() == Some(r2)).then_some(())
        })
        .expect("lb1, lb2 run it");
    }
    let lb3 = &b.lbs[2];
    let err = wait_for(WAIT, || {
        lb3.status()["cluster"]["service_error"]["error"]
            .as_str()
            .map(str::to_string)
    })
    .unwrap_or_else(|| panic!("lb3: {:#}", lb3.status()["cluster"]));
    assert!(err.contains("eth1"), "{err}");
    assert_eq!(lb3.status()["cluster"]["service_revision"], r);
    wait_for(WAIT, || {
        (metric(&lb3.metrics_text(), "vpnlb_cluster_service_refused") == Some(1.0)).then_some(())
    })
    .unwrap_or_else(|| panic!("metric: {}", lb3.metrics_text()));
    assert_eq!(
        metric(&b.lbs[0].metrics_text(), "vpnlb_cluster_service_refused"),
        Some(0.0)
    );
    let st = b.cluster_status(0);
    let m3 = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["member"] == "lb3")
        .cloned()
        .unwrap();
    assert!(
        m3["service_error"]
            .as_str()
            .unwrap()
            .contains(&format!("revision {r2}")),
        "{m3:#}"
    );
    let text = String::from_utf8_lossy(&b.vpnlb(0, &["cluster", "status"]).stdout).into_owned();
    assert!(text.contains("refused"), "{text}");
    drop(b);

    // TLS: a member that trusts the right CA joins; one with another CA says why it cannot.
    let mut b = Bed::network(true);
    let good = b.etcd().cluster_toml();
    b.start_lb(0, &good, "");
    let wrong = good.replace(
        &b.tls.as_ref().unwrap().ca().display().to_string(),
        &b.tls
            .as_ref()
            .unwrap()
            .dir
            .join("other-ca.pem")
            .display()
            .to_string(),
    );
    b.start_lb(1, &wrong, "");
    let r = b.push(&service(b.net, [1, 1, 1]));
    b.wait_revision_of(0, r);
    wait_for(WAIT, || {
        (b.lbs[1].status()["cluster"]["etcd"] == "lost").then_some(())
    })
    .expect("lb2 cannot connect");
    assert!(b.lbs[1].log().contains("etcd lost"), "{}", b.lbs[1].log());
    assert_eq!(b.lbs[1].status()["cluster"]["service_revision"], 0);
    let _ = &b.ns_etcd;
}

impl Bed {
    fn wait_revision_of(&self, i: usize, revision: i64) {
        let a = &self.lbs[i];
        wait_for(WAIT, || {
            (a.status()["cluster"]["service_revision"].as_i64() == Some(revision)).then_some(())
        })
        .unwrap_or_else(|| panic!("{} never ran {revision}: {}", a.ns, a.log()));
    }
}
