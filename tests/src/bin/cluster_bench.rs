//! `cargo xtask bench` (cluster rows), with real etcd 3.4 members and real `vpnlb run` agents as
//! members of one cluster, in network namespaces:
//! - `config_push_to_all_applied_ms`: from `vpnlb cluster push` starting to every one of three
//!   members running the new revision (polled on their control sockets), median over pushes;
//! - `replication_lag_ms_p50` / `_p99`: new sessions created on member A by real packets at about
//!   2,000 per second (each a new flow to the VIP), from the agent reading A's `EVENTS` ring to
//!   member B acknowledging the write into its maps;
//! - `bulk_sync_1m_sessions_s`: member A holds 1,000,000 sessions; member B starts and joins: from
//!   its start to all of them written into its maps (its `synced_from` names A).

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::Serialize;
use vpnlb::dataplane::maps::{AyaMaps, MapReader, MapWriter};
use vpnlb_common::{FlowKey, Session};
use vpnlb_tests::agent::{AgentProcess, Scratch, env_path, wait_for};
use vpnlb_tests::etcd::{EtcdCluster, etcd_on_switch, write_peer_key};
use vpnlb_tests::netns::{Netns, cable};
use vpnlb_tests::testbed::{Topology, VIP, VIP_PORT, gw_addr};

#[derive(Serialize)]
struct Row {
    name: &'static str,
    value: f64,
    unit: &'static str,
    samples: usize,
    checked: bool,
}

const WAIT: Duration = Duration::from_secs(60);

fn service(weights: [u32; 3]) -> String {
    let mut s = String::new();
    for (i, w) in weights.iter().enumerate() {
        s.push_str(&format!(
            "[[backend]]\nname = \"gw{}\"\naddress = \"{}\"\nweight = {w}\n[[backend.check]]\n\
             type = \"icmp\"\ninterval_ms = 500\n\n",
            i + 1,
            gw_addr(i)
        ));
    }
    s.push_str(&format!(
        "[[vip]]\nname = \"wg\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\nprotocol = \"udp\"\n\
         ring_size = 65537\n[[vip.pool]]\nname = \"all\"\nbackends = [\"gw1\", \"gw2\", \"gw3\"]\n"
    ));
    s
}

/// Three LB namespaces (the topology's `lb` and two more), etcd, gateways, a client namespace.
struct Bed {
    lbs: Vec<Option<AgentProcess>>,
    etcd: EtcdCluster,
    extra: Vec<Netns>,
    _ns_etcd: Netns,
    topo: Topology,
    scratch: Vec<Scratch>,
}

const LB_ADDRS: [&str; 3] = ["10.77.0.1", "10.77.0.3", "10.77.0.4"];

impl Bed {
    fn new(max_sessions: u32) -> Bed {
        let topo = Topology::up("vpnlb-cbn", 3, 1);
        let extra: Vec<Netns> = [("lbb", 1), ("lbc", 2)]
            .iter()
            .map(|(name, i)| {
                let ns = Netns::new(&format!("vpnlb-cbn-{name}"));
                cable(&topo.sw, name, &ns, &format!("{}/24", LB_ADDRS[*i]));
                ns
            })
            .collect();
        let (ns_etcd, etcd) = etcd_on_switch(&topo.sw, "vpnlb-cbn", "10.77.0");
        let scratch: Vec<Scratch> = (0..3)
            .map(|_| {
                let mut s = Scratch::new();
                s.max_sessions = max_sessions;
                write_peer_key(&s.dir.join("peer.key"), 9);
                s
            })
            .collect();
        Bed {
            lbs: vec![None, None, None],
            etcd,
            extra,
            _ns_etcd: ns_etcd,
            topo,
            scratch,
        }
    }

    fn ns(&self, i: usize) -> &str {
        if i == 0 {
            self.topo.lb.name()
        } else {
            self.extra[i - 1].name()
        }
    }

    fn start(&mut self, i: usize) -> Duration {
        let body = format!(
            "[[interface]]\nname = \"eth0\"\nmode = \"generic\"\n\n[cluster]\nname = \"bench\"\n\
             member = \"lb{i}\"\n{}peer_listen = \"{}:7946\"\npeer_key_file = \"{}\"\n",
            self.etcd.cluster_toml(),
            LB_ADDRS[i],
            self.scratch[i].dir.join("peer.key").display()
        );
        let t0 = Instant::now();
        let ns = self.ns(i).to_string();
        self.lbs[i] = Some(AgentProcess::start(&self.scratch[i], &ns, &body));
        t0.elapsed()
    }

    fn agent(&self, i: usize) -> &AgentProcess {
        self.lbs[i].as_ref().expect("started")
    }

    /// `vpnlb cluster push` from member 0; returns the new revision.
    fn push(&self, text: &str) -> i64 {
        let f = self.scratch[0].dir.join("service.toml");
        std::fs::write(&f, text).unwrap();
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns(0)))
            .arg(env_path("VPNLB_BIN"))
            .args(["cluster", "push", "--json", "--config", f.to_str().unwrap()])
            .arg("--host-config")
            .arg(&self.agent(0).config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "push: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["revision"].as_i64().unwrap()
    }

    fn revision(&self, i: usize) -> Option<i64> {
        let r = vpnlb::agent::control::request(
            &self.agent(i).socket,
            &vpnlb::agent::control::Request::Status {},
            Duration::from_secs(2),
        )
        .ok()?;
        r.result["cluster"]["service_revision"].as_i64()
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Pushes alternating weights `n` times; per push the time until all members run it.
fn push_to_all(b: &Bed, n: usize) -> Vec<f64> {
    let mut out = Vec::new();
    for k in 0..n {
        let text = service(if k % 2 == 0 { [1, 2, 1] } else { [1, 1, 1] });
        let t0 = Instant::now();
        let r = b.push(&text);
        for i in 0..3 {
            wait_for(WAIT, || (b.revision(i) == Some(r)).then_some(()))
                .unwrap_or_else(|| panic!("member {i} never ran revision {r}"));
        }
        out.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// New flows from the client namespace to the VIP at `rate` per second for `secs`.
fn new_flows(b: &Bed, rate: u32, secs: u32) -> u32 {
    let client = b.topo.client_addrs[0];
    b.topo.client.run(move || {
        let dst = SocketAddr::from((VIP, VIP_PORT));
        let t0 = Instant::now();
        let mut sent = 0u32;
        for k in 0..rate * secs {
            let due = Duration::from_secs_f64(f64::from(k) / f64::from(rate));
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            // A fresh source port: a new flow, a new session on the member that sees it.
            if let Ok(s) = UdpSocket::bind((client, 20000 + (k % 40000) as u16))
                && s.send_to(b"hello", dst).is_ok()
            {
                sent += 1;
            }
        }
        sent
    })
}

/// Fills member `i`'s session table with `n` synthetic sessions (backends 1..3).
fn fill_sessions(b: &Bed, i: usize, n: u32) {
    let mut m = AyaMaps::open_pinned(&b.agent(i).pin_dir).expect("pins");
    for k in 0..n {
        let key = FlowKey {
            src: [
                u32::from_ne_bytes([10, 200, (k >> 16) as u8, (k >> 8) as u8]),
                0,
                0,
                0,
            ],
            dst: [u32::from_ne_bytes(VIP.octets()), 0, 0, 0],
            ports: u32::from_ne_bytes([(k as u8), 7, (VIP_PORT >> 8) as u8, VIP_PORT as u8]),
            proto: 17,
            family: 4,
            _pad: [0; 2],
        };
        m.set_session(
            &key,
            &Session {
                backend_id: 1 + k % 3,
                hash: k,
                last_seen_ns: 0,
            },
        )
        .expect("set_session");
    }
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    const N: u32 = 1_000_000;
    // Room for 1M sessions written from one CPU (the LRU's lists are per CPU).
    let ncpu = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
    let mut b = Bed::new((N * ncpu).next_power_of_two());
    for i in 0..3 {
        b.start(i);
    }
    let r = b.push(&service([1, 1, 1]));
    for i in 0..3 {
        wait_for(WAIT, || (b.revision(i) == Some(r)).then_some(())).expect("first revision");
    }
    let mut push = push_to_all(&b, 10);
    let push_ms = median(&mut push);
    let push_max = push.iter().cloned().fold(0.0, f64::max);

    // Replication lag: ~2,000 new sessions per second on member 0 for 5 s.
    for g in ["gw1", "gw2", "gw3"] {
        b.agent(0).wait_state(g, "up", WAIT);
    }
    let sent = new_flows(&b, 2000, 5);
    let lag = wait_for(WAIT, || {
        let st = b.agent(0).status();
        let r = &st["cluster"]["replication"];
        Some((
            r["lag_ms_p50"].as_f64()?,
            r["lag_ms_p99"].as_f64()?,
            r["sent"].as_u64()?,
        ))
    })
    .expect("replication lag measured");
    let replicated_ok = lag.2 >= u64::from(sent) * 9 / 10;

    // Bulk sync: member 2 leaves, member 0 gets 1M sessions, member 2 joins again with empty
    // maps (a new host): from its start to A's copy written.
    drop(b.lbs[2].take());
    let _ = std::fs::remove_dir_all(&b.scratch[2].pin_root);
    fill_sessions(&b, 0, N);
    let t0 = Instant::now();
    b.start(2);
    wait_for(Duration::from_secs(120), || {
        b.agent(2).status()["cluster"]["synced_from"]
            .as_array()
            .is_some_and(|a| a.iter().any(|m| m == "lb0"))
            .then_some(())
    })
    .expect("member 2 synced from member 0");
    let bulk_s = t0.elapsed().as_secs_f64();
    let held = AyaMaps::open_pinned(&b.agent(2).pin_dir)
        .unwrap()
        .sessions()
        .map(|s| s.len())
        .unwrap_or(0);
    let bulk_ok = held >= N as usize;

    let rows = vec![
        Row {
            name: "config_push_to_all_applied_ms",
            value: push_ms,
            unit: "ms",
            samples: push.len(),
            checked: true,
        },
        Row {
            name: "replication_lag_ms_p50",
            value: lag.0,
            unit: "ms",
            samples: sent as usize,
            checked: replicated_ok,
        },
        Row {
            name: "replication_lag_ms_p99",
            value: lag.1,
            unit: "ms",
            samples: sent as usize,
            checked: replicated_ok,
        },
        Row {
            name: "bulk_sync_1m_sessions_s",
            value: bulk_s,
            unit: "s",
            samples: 1,
            checked: bulk_ok,
        },
    ];
    if json {
        println!("{}", serde_json::json!({ "results": rows }));
    } else {
        println!();
        println!("vpnlb cluster benchmark (3 etcd members, 3 agents, in network namespaces)");
        println!(
            "config_push_to_all_applied: median {push_ms:.0} ms, max {push_max:.0} ms over {} pushes (3 members)",
            push.len()
        );
        println!(
            "replication_lag: p50 {:.1} ms, p99 {:.1} ms ({sent} new sessions at ~2,000/s; {} sent to peers)",
            lag.0, lag.1, lag.2
        );
        println!(
            "bulk_sync_1m_sessions: {bulk_s:.2} s from the joining member's start to {held} sessions written"
        );
    }
    if !(replicated_ok && bulk_ok) {
        eprintln!(
            "a cluster row did not check out: replicated_ok={replicated_ok} bulk_ok={bulk_ok}"
        );
        std::process::exit(1);
    }
}
