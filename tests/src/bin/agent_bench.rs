//! `cargo xtask bench` (agent rows), with the real `vpnlb run` agent in network namespaces:
//! - `detect_to_map_ms_p50` / `_p99`: from `kill -9` of a gateway's BFD peer (FRR bfdd, 50 ms x 3)
//!   to the backend's state in the pinned `BACKENDS` map turning down, watched directly through the
//!   pin (so it is detection plus the agent's map write), over repeated kills;
//! - `agent_cpu_1000_backends_pct`: the agent's CPU (% of one core, from /proc) over 10 s with 1,000
//!   backends probed by ICMP every second, checked against the number of probe results it reported.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use vpnlb_tests::agent::{AgentProcess, Scratch, bfd_detect_to_map};
use vpnlb_tests::bfd_peer::BfdLab;
use vpnlb_tests::netns::fmt_mac;

#[derive(Serialize)]
struct Row {
    name: &'static str,
    value: f64,
    unit: &'static str,
    samples: usize,
    checked: bool,
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the ")" of the command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn probe_results(agent: &AgentProcess) -> u64 {
    agent.status()["backends"]
        .as_array()
        .expect("backends")
        .iter()
        .flat_map(|b| b["checks"].as_array().cloned().unwrap_or_default())
        .map(|c| c["results"].as_u64().unwrap_or(0))
        .sum()
}

fn agent_cpu(n: usize, secs: u64) -> (f64, f64) {
    let lab = BfdLab::new("vpnlb-bcpu", 92);
    // n gateway addresses in 10.79.0.0/16 on the gateway's veth.
    let mut batch = String::new();
    let addrs: Vec<IpAddr> = (0..n)
        .map(|i| {
            format!("10.79.{}.{}", i / 250, i % 250 + 1)
                .parse()
                .unwrap()
        })
        .collect();
    for a in &addrs {
        batch.push_str(&format!("addr add {a}/32 dev eth0\n"));
    }
    std::fs::write("/tmp/vpnlb-bcpu.batch", &batch).unwrap();
    lab.gw.sh("ip -batch /tmp/vpnlb-bcpu.batch");
    // Routed through the gateway's own address: one neighbour entry instead of n (the neighbour
    // table's thresholds are global, not per namespace).
    lab.lb
        .sh(&format!("ip route add 10.79.0.0/16 via {}", lab.gw_v4));
    let mac = fmt_mac(&lab.gw.mac("eth0"));
    let mut body = String::from("[[interface]]\nname = \"eth0\"\n\n");
    for (i, a) in addrs.iter().enumerate() {
        body.push_str(&format!(
            "[[backend]]\nname = \"gw{i}\"\naddress = \"{a}\"\nmac = \"{mac}\"\n[[backend.check]]\ntype = \"icmp\"\ninterval_ms = 1000\ntimeout_ms = 500\n\n"
        ));
    }
    let names: Vec<String> = (0..n).map(|i| format!("\"gw{i}\"")).collect();
    body.push_str(&format!(
        "[[vip]]\nname = \"wg\"\naddress = \"10.99.0.1\"\nport = 51820\nprotocol = \"udp\"\n[[vip.pool]]\nname = \"all\"\nbackends = [{}]\n",
        names.join(", ")
    ));
    let scratch = Scratch::new();
    let agent = AgentProcess::start(&scratch, lab.lb.name(), &body);
    let all: Vec<String> = (0..n).map(|i| format!("gw{i}")).collect();
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    agent.wait_all_up(&refs, Duration::from_secs(30));
    // Settle (start-up work done), then measure.
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.pid();
    let hz = 100.0; // USER_HZ on Linux
    let (r0, c0, t0) = (probe_results(&agent), cpu_ticks(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(secs));
    let (c1, t1) = (cpu_ticks(pid), Instant::now());
    let r1 = probe_results(&agent);
    let wall = t1.duration_since(t0).as_secs_f64();
    let pct = (c1 - c0) as f64 / hz / wall * 100.0;
    let rate = (r1 - r0) as f64 / wall;
    drop(agent);
    let _ = std::fs::remove_file("/tmp/vpnlb-bcpu.batch");
    (pct, rate)
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let reps: usize = std::env::var("VPNLB_BENCH_BFD_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let (p, _) = bfd_detect_to_map("vpnlb-bbfd", 91, reps);
    let n = 1000;
    let (cpu, rate) = agent_cpu(n, 10);
    // The 1,000 probes per second must really have run for the CPU figure to mean anything.
    let probes_ok = rate > 0.8 * n as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let rows = vec![
        Row {
            name: "detect_to_map_ms_p50",
            value: ms(p.p50),
            unit: "ms",
            samples: p.n,
            checked: true,
        },
        Row {
            name: "detect_to_map_ms_p99",
            value: ms(p.p99),
            unit: "ms",
            samples: p.n,
            checked: true,
        },
        Row {
            name: "agent_cpu_1000_backends_pct",
            value: cpu,
            unit: "% of one core",
            samples: 1,
            checked: probes_ok,
        },
    ];
    if json {
        println!(
            "{}",
            serde_json::json!({ "results": rows, "agent_cpu_probe_results_per_s": rate })
        );
        return;
    }
    println!();
    println!("vpnlb agent benchmark (real `vpnlb run` in network namespaces)");
    println!(
        "detect_to_map: kill -9 of FRR bfdd (BFD 50 ms x 3) to BACKENDS[gw].state = down, {} kills: \
         min {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        p.n,
        ms(p.min),
        ms(p.p50),
        ms(p.p99),
        ms(p.max)
    );
    println!(
        "agent_cpu_1000_backends: {cpu:.1}% of one core with {n} backends probed by ICMP every second \
         ({rate:.0} probe results/s observed{})",
        if probes_ok {
            ""
        } else {
            ": FEWER THAN EXPECTED"
        }
    );
    if !probes_ok {
        std::process::exit(1);
    }
}
