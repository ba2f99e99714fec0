//! The operator CLI (`vpnlb inspect|simulate|drain|...`) run as a real process (`$VPNLB_BIN`)
//! against known state: the production object loaded with its maps pinned in a throw-away
//! directory under /sys/fs/bpf, programmed through `Dataplane<AyaMaps>`, with packets run through
//! the real XDP program (`BPF_PROG_TEST_RUN`) on the same maps, and an ids.json next to a (fake)
//! control socket path so names resolve. The control commands are checked without an agent and
//! against the real agent (tests/src/agent.rs).
//!
//! Root ones: `cargo xtask test` (or VPNLB_BIN=... VPNLB_EBPF_OBJ=... cargo test -p vpnlb-tests
//! --test cli_maps -- --ignored --test-threads=1).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Output};
use std::time::Duration;

use aya::programs::{TestRun, TestRunOptions, Xdp};
use serde_json::Value;
use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb::dataplane::{BackendSpec, ClassSpec, VipSpec};
use vpnlb_common::*;
use vpnlb_tests::agent::{AgentBed, INTERFACE, backend, backend_in, env_path, vip};
use vpnlb_tests::harness::{XDP_PASS, XDP_TX, action_name, xdp_md};
use vpnlb_tests::packet::{Frame, arp_request};
use vpnlb_tests::pcap;
use vpnlb_tests::pins::PinnedObject;
use vpnlb_tests::testbed::{VIP, VIP_PORT};

const WG: &str = "203.0.113.10";
const WG_PORT: u16 = 51820;
const IKE: &str = "203.0.113.20";
const VOICE_DSCP: u8 = 46;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Runs `vpnlb ARGS`.
fn vpnlb(args: &[&str]) -> Output {
    let bin = env_path("VPNLB_BIN");
    Command::new(&bin)
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// The pinned production object (see `vpnlb_tests::pins`) with this file's state programmed.
struct Bed(PinnedObject);

impl std::ops::Deref for Bed {
    type Target = PinnedObject;
    fn deref(&self) -> &PinnedObject {
        &self.0
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut PinnedObject {
        &mut self.0
    }
}

impl Bed {
    fn new() -> Bed {
        Bed(PinnedObject::new("clitest", 4))
    }

    /// gw1 (weight 100), gw2 (200), gw3 (100) up, gw4 (100) draining; VIP `wg` (udp
    /// 203.0.113.10:51820, all four, class `voice` = DSCP 46 -> gw3 only) and `ike` (esp
    /// 203.0.113.20, gw1 and gw3).
    fn program(&mut self) {
        for (id, w, st) in [
            (1, 100, BACKEND_UP),
            (2, 200, BACKEND_UP),
            (3, 100, BACKEND_UP),
            (4, 100, BACKEND_DRAINING),
        ] {
            self.dp
                .upsert_backend(BackendSpec {
                    id,
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)),
                    mac: [2, 0, 0, 0, 0, id as u8],
                    src_mac: [2, 0, 0, 0, 0, 0x10],
                    ifindex: 0,
                    weight: w,
                    state: st,
                })
                .unwrap();
        }
        let base = VipSpec {
            key: VipKey::new(ip(WG), WG_PORT, PROTO_UDP),
            vip_id: 0,
            ring_id: 0,
            ring_size: DEFAULT_RING_SIZE,
            flags: 0,
            fwd_mode: FWD_MODE_L2DSR,
            mtu: 0,
            idle_timeout_ns: 0,
            gue_port: 0,
            backends: vec![1, 2, 3, 4],
            classes: vec![ClassSpec {
                dscp: vec![VOICE_DSCP],
                ring_id: 2,
                backends: vec![3],
            }],
        };
        self.dp.upsert_vip(base.clone()).unwrap();
        self.dp
            .upsert_vip(VipSpec {
                key: VipKey::new(ip(IKE), 0, PROTO_ESP),
                vip_id: 1,
                ring_id: 1,
                flags: VIP_F_HASH_SRC_ONLY,
                backends: vec![1, 3],
                classes: Vec::new(),
                ..base
            })
            .unwrap();
        let ids = serde_json::json!({
            "backends": {"gw1": 1, "gw2": 2, "gw3": 3, "gw4": 4},
            "vips": {"wg": 0, "ike": 1},
            "rings": [
                {"vip": "wg", "class": null, "id": 0},
                {"vip": "ike", "class": null, "id": 1},
                {"vip": "wg", "class": "voice", "id": 2},
            ],
        });
        std::fs::write(self.dir.join("ids.json"), ids.to_string()).unwrap();
    }

    /// Two more VIPs for the simulate test: IPv6 udp [2001:db8::10]:500 and tcp
    /// 203.0.113.30:443, both gw1 and gw2.
    fn program_extra(&mut self) {
        let base = VipSpec {
            key: VipKey::new(ip("2001:db8::10"), 500, PROTO_UDP),
            vip_id: 2,
            ring_id: 3,
            ring_size: 65521,
            flags: 0,
            fwd_mode: FWD_MODE_L2DSR,
            mtu: 0,
            idle_timeout_ns: 0,
            gue_port: 0,
            backends: vec![1, 2],
            classes: Vec::new(),
        };
        self.dp.upsert_vip(base.clone()).unwrap();
        // Same members, so it may share ring row 3 (like IKE 500/4500 of one address).
        self.dp
            .upsert_vip(VipSpec {
                key: VipKey::new(ip("203.0.113.30"), 443, PROTO_TCP),
                vip_id: 3,
                backends: vec![1, 2],
                ..base
            })
            .unwrap();
    }

    fn maps(&self) -> &AyaMaps {
        self.dp.writer()
    }

    /// One BPF_PROG_TEST_RUN of vpnlb_ingress: (action, output).
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let ctx = xdp_md(frame.len(), 1);
        let mut out = vec![0u8; frame.len() + 512];
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(prog_names::INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("test run: {e:?}"));
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// `vpnlb --pin-dir P --control-socket S ARGS`.
    fn cli(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = vec![
            "--pin-dir",
            self.pins.to_str().unwrap(),
            "--control-socket",
            self.socket.to_str().unwrap(),
        ];
        a.extend_from_slice(args);
        vpnlb(&a)
    }

    /// stdout of a successful run.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        let (out, err) = text(&o);
        assert!(o.status.success(), "vpnlb {args:?} failed: {err}\n{out}");
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.ok(args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vpnlb {args:?}: {e}: {out}"))
    }

    /// Backend id of each session, from the map.
    fn session_backends(&self) -> HashMap<FlowKey, u32> {
        self.maps()
            .sessions()
            .unwrap()
            .into_iter()
            .map(|(k, s)| (k, s.backend_id))
            .collect()
    }
}

/// With `VPNLB_CLITEST_PAUSE=SECONDS`, prints the pin dir and socket path and waits, so the state
/// can be looked at by hand (`vpnlb --pin-dir ... inspect ...`, `bpftool map dump pinned ...`).
fn pause(bed: &Bed) {
    pause_at(&format!(
        "--pin-dir {} --control-socket {}",
        bed.pins.display(),
        bed.socket.display()
    ));
}

fn pause_at(what: &str) {
    if let Some(s) = std::env::var("VPNLB_CLITEST_PAUSE")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        eprintln!("pausing {s}s: {what}");
        std::thread::sleep(Duration::from_secs(s));
    }
}

fn wg_flow(i: u8, dscp: u8) -> Frame {
    let mut f = Frame::udp(
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)),
        40000 + u16::from(i),
        ip(WG),
        WG_PORT,
        b"wireguard",
    );
    f.v4().tos = dscp << 2;
    f
}

fn ike_flow(i: u8) -> Frame {
    Frame::esp(
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100 + i)),
        ip(IKE),
        0x1000 + u32::from(i),
        1,
        &[0u8; 32],
    )
}

fn not_vip(i: u8) -> Frame {
    Frame::udp(
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, i)),
        5353,
        ip("203.0.113.99"),
        53,
        b"dns",
    )
}

/// Sends the known traffic: 40 wg flows (10 of them twice), 4 voice flows, 8 ike flows, 5
/// non-VIP packets and 3 ARP requests.
fn traffic(bed: &mut Bed) {
    for i in 1..=40u8 {
        let (a, _) = bed.run(&wg_flow(i, 0).bytes());
        assert_eq!(a, XDP_TX);
    }
    for i in 1..=10u8 {
        bed.run(&wg_flow(i, 0).bytes());
    }
    for i in 41..=44u8 {
        bed.run(&wg_flow(i, VOICE_DSCP).bytes());
    }
    for i in 0..8u8 {
        let (a, _) = bed.run(&ike_flow(i).bytes());
        assert_eq!(a, XDP_TX);
    }
    for i in 1..=5u8 {
        let (a, _) = bed.run(&not_vip(i).bytes());
        assert_eq!(a, XDP_PASS);
    }
    for i in 1..=3u8 {
        let f = arp_request(
            [2, 0, 0, 0, 0, i],
            Ipv4Addr::new(198, 51, 100, i),
            Ipv4Addr::new(198, 51, 100, 254),
        );
        bed.run(&f);
    }
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn inspect_vips_backends_ring_stats() {
    let mut bed = Bed::new();
    bed.program();
    traffic(&mut bed);

    // vips
    let v = bed.json(&["inspect", "vips", "--json"]);
    let vips = v.as_array().unwrap();
    assert_eq!(vips.len(), 2, "{v:#}");
    let wg = vips.iter().find(|x| x["name"] == "wg").expect("wg named");
    assert_eq!(wg["address"], WG);
    assert_eq!(wg["port"], WG_PORT);
    assert_eq!(wg["protocol"], "udp");
    assert_eq!(wg["ring_size"], DEFAULT_RING_SIZE);
    assert_eq!(wg["flags"], serde_json::json!(["classes"]));
    assert_eq!(wg["packets"], 54, "40 + 10 repeats + 4 voice");
    let ike = vips.iter().find(|x| x["name"] == "ike").expect("ike named");
    assert_eq!(ike["protocol"], "esp");
    assert_eq!(ike["packets"], 8);
    let t = bed.ok(&["inspect", "vips"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with("wg ") && l.contains("udp 203.0.113.10:51820")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("ike ") && l.contains("esp 203.0.113.20")),
        "{t}"
    );

    // backends
    let v = bed.json(&["inspect", "backends", "--json"]);
    let b = v.as_array().unwrap();
    assert_eq!(b.len(), 4, "{v:#}");
    for (name, id, st, w) in [
        ("gw1", 1, "up", 100),
        ("gw2", 2, "up", 200),
        ("gw3", 3, "up", 100),
        ("gw4", 4, "draining", 100),
    ] {
        let e = b.iter().find(|x| x["id"] == id).unwrap();
        assert_eq!(e["name"], name);
        assert_eq!(e["state"], st);
        assert_eq!(e["weight"], w);
        assert_eq!(e["address"], format!("10.0.0.{id}"));
        let st = bed.maps().backend_stats(id).unwrap();
        assert_eq!(e["packets"], st.packets);
        assert_eq!(e["bytes"], st.bytes);
    }
    let total: u64 = b.iter().map(|e| e["packets"].as_u64().unwrap()).sum();
    assert_eq!(total, 54 + 8);
    let t = bed.ok(&["inspect", "backends"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with("gw4 ") && l.contains("draining")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("gw2 ") && l.contains("10.0.0.2")),
        "{t}"
    );

    // ring: slots per backend equal the map's, shares follow weights, drained gw4 owns nothing.
    let v = bed.json(&["inspect", "ring", "--json"]);
    let rings = v.as_array().unwrap();
    assert_eq!(rings.len(), 3, "wg, wg/voice, ike: {v:#}");
    for r in rings {
        let ring_id = r["ring_id"].as_u64().unwrap() as u32;
        let slots = bed.maps().ring(ring_id, DEFAULT_RING_SIZE).unwrap();
        let mut want: BTreeMap<u32, u64> = BTreeMap::new();
        for s in slots {
            *want.entry(s).or_default() += 1;
        }
        assert_eq!(r["empty_slots"], want.remove(&0).unwrap_or(0));
        let got: BTreeMap<u32, u64> = r["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| {
                (
                    b["backend_id"].as_u64().unwrap() as u32,
                    b["slots"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "ring {ring_id}");
        for b in r["backends"].as_array().unwrap() {
            let (s, w) = (
                b["share"].as_f64().unwrap(),
                b["weight_share"].as_f64().unwrap(),
            );
            assert!((s - w).abs() < 0.02, "ring {ring_id}: {b}");
        }
    }
    let wg_ring = rings
        .iter()
        .find(|r| r["vip"] == "wg" && r["class"].is_null())
        .unwrap();
    let ids: Vec<u64> = wg_ring["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["backend_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3], "gw4 (draining) owns no slot");
    let gw2 = &wg_ring["backends"][1];
    assert!((gw2["share"].as_f64().unwrap() - 0.5).abs() < 0.02, "{gw2}");
    let voice = rings.iter().find(|r| r["class"] == "voice").unwrap();
    assert_eq!(voice["ring_id"], 2);
    assert_eq!(voice["dscp"], serde_json::json!([VOICE_DSCP]));
    assert_eq!(voice["backends"][0]["backend"], "gw3");
    assert_eq!(voice["backends"][0]["slots"], DEFAULT_RING_SIZE);
    let only_ike = bed.json(&["inspect", "ring", "--vip", "ike", "--json"]);
    assert_eq!(only_ike.as_array().unwrap().len(), 1);
    let t = bed.ok(&["inspect", "ring"]);
    assert!(
        t.lines().any(|l| l.starts_with("wg ")
            && l.contains("voice")
            && l.contains("gw3")
            && l.contains("100.0%")),
        "{t}"
    );

    // stats: every counter, equal to the map; the known pass reasons.
    let v = bed.json(&["inspect", "stats", "--json"]);
    let counters = bed.maps().counters().unwrap();
    let c = v["counters"].as_object().unwrap();
    assert_eq!(c.len(), COUNTER_NAMES.len());
    for (i, name) in COUNTER_NAMES.iter().enumerate() {
        assert_eq!(c[*name], counters[i], "{name}");
    }
    assert_eq!(c["pass_not_vip"], 5);
    assert_eq!(c["pass_not_ip"], 3);
    assert_eq!(c["session_hit"], 10);
    assert_eq!(c["session_insert"], 52);
    assert_eq!(c["fwd_l2dsr_tx"], 62);
    assert_eq!(v["ingress_packets"], 62 + 5 + 3);
    let wgs = v["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "wg")
        .unwrap();
    assert_eq!(wgs["packets"], 54);
    let t = bed.ok(&["inspect", "stats"]);
    assert!(
        t.lines()
            .any(|l| l.starts_with("pass_not_vip ") && l.trim_end().ends_with(" 5")),
        "{t}"
    );
    assert!(
        t.lines()
            .any(|l| l.starts_with("drop_no_backend ") && l.trim_end().ends_with(" 0")),
        "{t}"
    );
    assert!(t.contains("70 packets processed"), "{t}");
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn inspect_sessions_filters_and_counts() {
    let mut bed = Bed::new();
    bed.program();
    traffic(&mut bed);
    let map = bed.session_backends();
    assert_eq!(map.len(), 52);

    let all = bed.json(&["inspect", "sessions", "--json"]);
    assert_eq!(all["total"], 52);
    assert_eq!(all["sessions"].as_array().unwrap().len(), 52);
    for s in all["sessions"].as_array().unwrap() {
        let name = format!("gw{}", s["backend_id"]);
        assert_eq!(s["backend"], name.as_str());
    }

    let by_vip = |vip: &str| bed.json(&["inspect", "sessions", "--vip", vip, "--json"]);
    assert_eq!(by_vip("wg")["total"], 44);
    assert_eq!(by_vip("ike")["total"], 8);
    assert_eq!(by_vip(WG)["total"], 44);
    assert_eq!(by_vip("203.0.113.10:51820")["total"], 44);
    assert_eq!(by_vip("203.0.113.10:1")["total"], 0);
    for s in by_vip("ike")["sessions"].as_array().unwrap() {
        assert_eq!(s["vip"], "ike");
        assert_eq!(s["protocol"], "esp");
        assert!(s["spi"].as_str().unwrap().starts_with("0x0000100"), "{s}");
    }

    for id in 1..=4u32 {
        let want = map.values().filter(|b| **b == id).count();
        let v = bed.json(&[
            "inspect",
            "sessions",
            "--backend",
            &format!("gw{id}"),
            "--json",
        ]);
        assert_eq!(v["total"], want, "gw{id}");
        assert!(
            v["sessions"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["backend_id"] == id)
        );
        let v = bed.json(&[
            "inspect",
            "sessions",
            "--backend",
            &id.to_string(),
            "--json",
        ]);
        assert_eq!(v["total"], want, "id {id}");
    }
    assert_eq!(
        map.values().filter(|b| **b == 4).count(),
        0,
        "draining gets no new flow"
    );

    let c = bed.json(&["inspect", "sessions", "--client", "198.51.100.3", "--json"]);
    assert_eq!(c["total"], 1);
    assert_eq!(c["sessions"][0]["client_port"], 40003);
    assert_eq!(c["sessions"][0]["vip"], "wg");
    let want = map[&wg_flow(3, 0).flow_key()];
    assert_eq!(c["sessions"][0]["backend_id"], want);
    let c = bed.json(&[
        "inspect",
        "sessions",
        "--client",
        "198.51.100.3:40003",
        "--json",
    ]);
    assert_eq!(c["total"], 1);
    let c = bed.json(&[
        "inspect",
        "sessions",
        "--client",
        "198.51.100.3:1",
        "--json",
    ]);
    assert_eq!(c["total"], 0);

    let l = bed.json(&["inspect", "sessions", "--limit", "5", "--json"]);
    assert_eq!(l["total"], 52);
    assert_eq!(l["shown"], 5);
    assert_eq!(l["sessions"].as_array().unwrap().len(), 5);

    for vip in [None, Some("wg"), Some("ike")] {
        let mut args = vec!["inspect", "sessions", "--count-by-backend", "--json"];
        if let Some(v) = vip {
            args.extend(["--vip", v]);
        }
        let v = bed.json(&args);
        let mut want: BTreeMap<u64, u64> = BTreeMap::new();
        for (k, b) in &map {
            let dst = vpnlb_common::words_addr(k.dst, k.family).to_string();
            let keep = match vip {
                None => true,
                Some("wg") => dst == WG,
                _ => dst == IKE,
            };
            if keep {
                *want.entry(u64::from(*b)).or_default() += 1;
            }
        }
        let got: BTreeMap<u64, u64> = v["by_backend"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["backend_id"].as_u64().unwrap(),
                    e["sessions"].as_u64().unwrap(),
                )
            })
            .collect();
        assert_eq!(got, want, "{vip:?}");
        assert_eq!(v["total"], want.values().sum::<u64>());
    }

    let t = bed.ok(&["inspect", "sessions", "--client", "198.51.100.3"]);
    assert!(
        t.lines().any(|l| l.starts_with("198.51.100.3:40003 ")
            && l.contains("wg (203.0.113.10:51820)")
            && l.contains(&format!("gw{want}"))),
        "{t}"
    );
    assert!(t.contains("1 of 1 sessions shown"), "{t}");
    let t = bed.ok(&["inspect", "sessions", "--count-by-backend"]);
    assert!(t.contains("52 sessions"), "{t}");
    pause(&bed);
    // Unknown names are errors, not empty results.
    let o = bed.cli(&["inspect", "sessions", "--backend", "nosuch"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("unknown backend"), "{}", text(&o).1);
}

/// `simulate --json` for one flow (args after `simulate`).
fn simulate(bed: &Bed, args: &[&str]) -> Value {
    let mut a = vec!["simulate", "--json"];
    a.extend_from_slice(args);
    let out = bed.ok(&a);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    serde_json::from_str(lines[0]).unwrap()
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn simulate_matches_the_real_program() {
    let mut bed = Bed::new();
    bed.program();
    bed.program_extra();
    traffic(&mut bed);
    let sessions_before = bed.session_backends();
    let counters_before = bed.maps().counters().unwrap();

    // New flows: the simulated pick first, then the real program on the same maps.
    let mut sims = Vec::new();
    for i in 1..=30u8 {
        let src = format!("192.0.2.{i}:{}", 5000 + u16::from(i));
        let v = simulate(
            &bed,
            &[
                "--src",
                &src,
                "--dst",
                "203.0.113.10:51820",
                "--proto",
                "udp",
            ],
        );
        assert_eq!(v["reason"], "maglev_pick", "{v}");
        assert_eq!(v["vip"], "wg");
        assert_eq!(v["ring_id"], 0);
        assert!(
            v["why"]
                .as_str()
                .unwrap()
                .contains("Maglev pick: ring 0 slot"),
            "{v}"
        );
        sims.push((
            Frame::udp(
                ip(&format!("192.0.2.{i}")),
                5000 + u16::from(i),
                ip(WG),
                WG_PORT,
                b"x",
            ),
            v,
        ));
    }
    for i in 0..6u8 {
        let src = format!("192.0.2.{}", 100 + i);
        let spi = format!("{:#x}", 0x2000 + u32::from(i));
        let v = simulate(
            &bed,
            &["--src", &src, "--dst", IKE, "--proto", "esp", "--spi", &spi],
        );
        assert_eq!(v["reason"], "maglev_pick", "{v}");
        assert_eq!(v["vip"], "ike");
        sims.push((
            Frame::esp(ip(&src), ip(IKE), 0x2000 + u32::from(i), 1, &[0; 16]),
            v,
        ));
    }
    for i in 0..4u8 {
        let src = format!("192.0.2.{}:4500", 150 + i);
        let v = simulate(
            &bed,
            &[
                "--src",
                &src,
                "--dst",
                "203.0.113.10:51820",
                "--dscp",
                "46",
                "--vlan",
                "7",
            ],
        );
        assert_eq!(v["reason"], "class_ring", "{v}");
        assert_eq!(v["class"], "voice");
        assert_eq!(v["ring_id"], 2);
        assert_eq!(v["backend"], "gw3");
        let mut f = Frame::udp(
            ip(&format!("192.0.2.{}", 150 + i)),
            4500,
            ip(WG),
            WG_PORT,
            b"x",
        )
        .vlan(7);
        f.v4().tos = VOICE_DSCP << 2;
        sims.push((f, v));
    }
    for i in 0..6u16 {
        let src = format!("[2001:db8:1::{}]:{}", i + 1, 500 + i);
        let v = simulate(&bed, &["--src", &src, "--dst", "[2001:db8::10]:500"]);
        assert_eq!(v["reason"], "maglev_pick", "{v}");
        assert_eq!(v["vip"], "#2", "no name in ids.json: the id");
        let f = Frame::udp(
            ip(&format!("2001:db8:1::{}", i + 1)),
            500 + i,
            ip("2001:db8::10"),
            500,
            b"x",
        );
        sims.push((f, v));
        let src = format!("192.0.2.{}:{}", 210 + i, 30000 + i);
        let v = simulate(
            &bed,
            &["--src", &src, "--dst", "203.0.113.30:443", "--proto", "tcp"],
        );
        assert_eq!(v["reason"], "maglev_pick", "{v}");
        let f = Frame::tcp(
            ip(&format!("192.0.2.{}", 210 + i)),
            30000 + i,
            ip("203.0.113.30"),
            443,
            vpnlb_tests::packet::TCP_SYN,
            b"",
        );
        sims.push((f, v));
    }
    let v = simulate(
        &bed,
        &["--src", "192.0.2.200:1000", "--dst", "203.0.113.99:53"],
    );
    assert_eq!(v["reason"], "not_vip");
    assert_eq!(v["verdict"], "XDP_PASS");
    assert!(v["backend"].is_null());
    sims.push((
        Frame::udp(ip("192.0.2.200"), 1000, ip("203.0.113.99"), 53, b"x"),
        v,
    ));

    // Simulating wrote nothing.
    assert_eq!(bed.session_backends(), sessions_before);
    assert_eq!(bed.maps().counters().unwrap(), counters_before);

    let mut picked: BTreeMap<u64, usize> = BTreeMap::new();
    for (f, v) in &sims {
        let (action, _) = bed.run(&f.bytes());
        assert_eq!(v["verdict"], action_name(action), "{v}");
        let real = bed.session_backends().get(&f.flow_key()).copied();
        assert_eq!(v["backend_id"].as_u64(), real.map(u64::from), "{v}");
        if let Some(b) = real {
            *picked.entry(u64::from(b)).or_default() += 1;
        }
    }
    assert!(picked.len() >= 2, "flows spread over backends: {picked:?}");

    // The same flow again: a session hit, same backend.
    let (f0, v0) = &sims[0];
    let again = simulate(
        &bed,
        &["--src", "192.0.2.1:5001", "--dst", "203.0.113.10:51820"],
    );
    assert_eq!(again["reason"], "session_hit", "{again}");
    assert_eq!(again["backend_id"], v0["backend_id"]);
    assert_eq!(again["session_events"], serde_json::json!(["session_hit"]));
    assert!(bed.session_backends().contains_key(&f0.flow_key()));
    // Without the agent, the pool is unknown and said so.
    assert!(
        again["pool"]["unknown"]
            .as_str()
            .unwrap()
            .contains("not running"),
        "{again}"
    );

    // Table output.
    let t = bed.ok(&[
        "simulate",
        "--src",
        "192.0.2.1:5001",
        "--dst",
        "203.0.113.10:51820",
    ]);
    assert!(t.lines().next().unwrap().starts_with("#  FLOW"), "{t}");
    assert!(
        t.contains("udp 192.0.2.1:5001 -> 203.0.113.10:51820") && t.contains("session hit"),
        "{t}"
    );
    assert!(t.contains("pools unknown"), "{t}");

    // Bad input: a plain error.
    let o = bed.cli(&[
        "simulate",
        "--src",
        "192.0.2.1",
        "--dst",
        "203.0.113.10:51820",
    ]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("ADDR:PORT"), "{}", text(&o).1);

    // gw1 and gw2 down: the IPv6 VIP's ring empties. An existing session re-picks and finds no
    // backend, a new flow finds none; the program agrees (drop_no_backend).
    bed.dp.set_backend_state(1, BACKEND_DOWN).unwrap();
    bed.dp.set_backend_state(2, BACKEND_DOWN).unwrap();
    let v = simulate(
        &bed,
        &[
            "--src",
            "[2001:db8:1::1]:500",
            "--dst",
            "[2001:db8::10]:500",
        ],
    );
    assert_eq!(v["reason"], "no_backend", "{v}");
    assert_eq!(v["verdict"], "XDP_DROP");
    assert_eq!(v["outcome"], "drop_no_backend");
    assert!(
        v["why"]
            .as_str()
            .unwrap()
            .contains("re-picked (backend down)"),
        "{v}"
    );
    let v = simulate(
        &bed,
        &[
            "--src",
            "[2001:db8:1::99]:500",
            "--dst",
            "[2001:db8::10]:500",
        ],
    );
    assert_eq!(v["reason"], "no_backend", "{v}");
    let f = Frame::udp(ip("2001:db8:1::99"), 500, ip("2001:db8::10"), 500, b"x");
    assert_eq!(action_name(bed.run(&f.bytes()).0), "XDP_DROP");
    // Every wg session now on gw1 or gw2 re-picks among gw3 (gw4 is draining): same as the program.
    for (f, v) in sims.iter().take(30) {
        let old = v["backend_id"].as_u64().unwrap();
        if old == 3 {
            continue;
        }
        let (sport, _) = f.flow_key().ports_host();
        let src = format!("{}:{sport}", f.ip.src());
        let s = simulate(&bed, &["--src", &src, "--dst", "203.0.113.10:51820"]);
        assert_eq!(s["reason"], "maglev_pick", "{s}");
        assert!(
            s["why"].as_str().unwrap().starts_with("session to gw"),
            "{s}"
        );
        assert_eq!(s["backend"], "gw3", "{s}");
        bed.run(&f.bytes());
        assert_eq!(bed.session_backends()[&f.flow_key()], 3);
    }
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn simulate_pcap_matches_the_real_program() {
    let mut bed = Bed::new();
    bed.program();
    let mut frames: Vec<Vec<u8>> = Vec::new();
    for i in 1..=20u8 {
        frames.push(wg_flow(i, 0).bytes());
    }
    // Repeats (session hits in the simulation and in the program), voice, ESP, not a VIP, ARP.
    frames.push(wg_flow(1, 0).bytes());
    frames.push(wg_flow(2, 0).bytes());
    frames.push(wg_flow(60, VOICE_DSCP).bytes());
    frames.push(ike_flow(1).bytes());
    frames.push(not_vip(9).bytes());
    frames.push(arp_request(
        [2, 0, 0, 0, 0, 9],
        Ipv4Addr::new(198, 51, 100, 9),
        Ipv4Addr::new(198, 51, 100, 1),
    ));
    let path = bed.dir.join("flows.pcap");
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    pcap::write(&path, &refs).unwrap();

    let out = bed.ok(&["simulate", "--pcap", path.to_str().unwrap(), "--json"]);
    let sims: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sims.len(), frames.len(), "{out}");
    assert!(
        bed.session_backends().is_empty(),
        "simulate wrote no session"
    );

    for (i, (f, v)) in frames.iter().zip(&sims).enumerate() {
        assert_eq!(v["packet"], i + 1);
        let (action, _) = bed.run(f);
        assert_eq!(v["verdict"], action_name(action), "packet {}: {v}", i + 1);
        let key = vpnlb_tests::packet::parse(f).map(|p| p.flow_key(f));
        let real = key.and_then(|k| bed.session_backends().get(&k).copied());
        assert_eq!(
            v["backend_id"].as_u64(),
            real.map(u64::from),
            "packet {}: {v}",
            i + 1
        );
    }
    assert_eq!(sims[0]["reason"], "maglev_pick");
    assert_eq!(sims[20]["reason"], "session_hit", "{}", sims[20]);
    assert_eq!(sims[20]["backend_id"], sims[0]["backend_id"]);
    assert_eq!(sims[22]["reason"], "class_ring");
    assert_eq!(sims[22]["backend"], "gw3");
    assert_eq!(sims[23]["vip"], "ike");
    assert_eq!(sims[24]["reason"], "not_vip");
    assert_eq!(sims[25]["reason"], "pass");
    assert_eq!(sims[25]["outcome"], "pass_not_ip");

    let t = bed.ok(&["simulate", "--pcap", path.to_str().unwrap()]);
    assert_eq!(
        t.lines().filter(|l| l.contains("XDP_")).count(),
        frames.len(),
        "{t}"
    );
    assert!(t.contains("pass_not_ip"), "{t}");
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn inspect_and_simulate_session_ids() {
    let mut bed = Bed::new();
    bed.program();
    // The ESP VIP learns SPIs.
    let mut ike = bed
        .dp
        .vip(&VipKey::new(ip(IKE), 0, PROTO_ESP))
        .unwrap()
        .clone();
    ike.flags |= VIP_F_IDS_IPSEC;
    bed.dp.upsert_vip(ike).unwrap();
    let spi = 0xc100_0001u32;
    let home = Frame::esp(ip("192.0.2.200"), ip(IKE), spi, 1, &[0; 32]);
    bed.run(&home.bytes());
    let (a, out) = bed.run(&home.bytes());
    assert_eq!(a, XDP_TX);
    assert_eq!(
        bed.maps().counters().unwrap()[SESSION_ID_LEARNED as usize],
        1
    );
    let gw = format!("gw{}", out[5]);
    let v = bed.json(&["inspect", "session-ids", "--json"]);
    assert_eq!(
        v["learned"],
        serde_json::json!([{
            "vip_address": IKE, "kind": "esp", "id": "0xc1000001",
            "backend_id": out[5], "backend": gw,
        }]),
        "{v}"
    );
    let t = bed.ok(&["inspect", "session-ids"]);
    assert!(t.contains("0xc1000001") && t.contains(&gw), "{t}");
    assert!(t.contains("1 learned ids, 0 static range prefixes"), "{t}");
    // The peer from another address (MOBIKE): simulate says the SPI keeps it on gw.
    let v = simulate(
        &bed,
        &[
            "--src",
            "192.0.2.201",
            "--dst",
            IKE,
            "--proto",
            "esp",
            "--spi",
            "0xc1000001",
        ],
    );
    assert_eq!(v["reason"], "session_id", "{v}");
    assert_eq!(v["backend"], gw.as_str(), "{v}");
    assert_eq!(
        v["session_id"],
        serde_json::json!({"kind": "esp", "id": "0xc1000001"})
    );
    assert!(
        v["why"]
            .as_str()
            .unwrap()
            .contains("esp id 0xc1000001 is known (learned)"),
        "{v}"
    );
    // And the real program agrees.
    let moved = Frame::esp(ip("192.0.2.201"), ip(IKE), spi, 2, &[0; 32]);
    let (a, out) = bed.run(&moved.bytes());
    assert_eq!((a, format!("gw{}", out[5])), (XDP_TX, gw));
    assert_eq!(bed.maps().counters().unwrap()[SESSION_ID_USED as usize], 1);
    let o = bed.cli(&["inspect", "session-ids", "--backend", "nosuch"]);
    assert!(!o.status.success());
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn inspect_and_simulate_openvpn_peer_ids() {
    use vpnlb_tests::packet::vpn::openvpn_data_v2;
    let mut bed = Bed::new();
    bed.program();
    // The UDP VIP learns OpenVPN peer-ids (only the flag matters to the data plane).
    let key = VipKey::new(ip(WG), WG_PORT, PROTO_UDP);
    let mut s = bed.dp.vip(&key).unwrap().clone();
    s.flags |= VIP_F_IDS_OPENVPN;
    bed.dp.upsert_vip(s).unwrap();
    let data = openvpn_data_v2(5, 40);
    let home = Frame::udp(ip("192.0.2.200"), 40200, ip(WG), WG_PORT, &data);
    bed.run(&home.bytes());
    let (a, out) = bed.run(&home.bytes());
    assert_eq!(a, XDP_TX);
    let gw = format!("gw{}", out[5]);
    // Shown as the peer-id and the client address it is scoped to.
    let v = bed.json(&["inspect", "session-ids", "--json"]);
    assert_eq!(
        v["learned"],
        serde_json::json!([{
            "vip_address": WG, "kind": "openvpn", "id": "5 from 192.0.2.200",
            "backend_id": out[5], "backend": gw,
        }]),
        "{v}"
    );
    let t = bed.ok(&["inspect", "session-ids"]);
    assert!(t.contains("5 from 192.0.2.200") && t.contains(&gw), "{t}");
    // The NAT rebinds the client's port: simulate says the id keeps it on gw, the program agrees.
    let rebound = Frame::udp(ip("192.0.2.200"), 40201, ip(WG), WG_PORT, &data);
    let v = simulate_pcap_one(&bed, &rebound.bytes());
    assert_eq!(v["reason"], "session_id", "{v}");
    assert_eq!(v["backend"], gw.as_str(), "{v}");
    assert_eq!(
        v["session_id"],
        serde_json::json!({"kind": "openvpn", "id": "5 from 192.0.2.200"})
    );
    let (a, out) = bed.run(&rebound.bytes());
    assert_eq!((a, format!("gw{}", out[5])), (XDP_TX, gw));
    assert_eq!(bed.maps().counters().unwrap()[SESSION_ID_USED as usize], 1);
    // Peer-id 5 from another address is another client (its gateway numbers from 0 too).
    let other = Frame::udp(ip("192.0.2.201"), 40200, ip(WG), WG_PORT, &data);
    let v = simulate_pcap_one(&bed, &other.bytes());
    assert_eq!(v["reason"], "maglev_pick", "{v}");
    assert_eq!(
        v["session_id"],
        serde_json::json!({"kind": "openvpn", "id": "5 from 192.0.2.201"})
    );
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn simulate_explains_fragments_and_pmtu() {
    let mut bed = Bed::new();
    bed.program();
    let f = Frame::udp(ip("192.0.2.77"), 40077, ip(WG), WG_PORT, &[0x33; 100]);
    let frags = vpnlb_tests::packet::fragments(&f, 32, 0x1234);
    let path = bed.dir.join("frags.pcap");
    let refs: Vec<&[u8]> = frags.iter().map(Vec::as_slice).collect();
    pcap::write(&path, &refs).unwrap();
    let out = bed.ok(&["simulate", "--pcap", path.to_str().unwrap(), "--json"]);
    let sims: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sims.len(), 4, "{out}");
    assert_eq!(sims[0]["reason"], "maglev_pick", "{}", sims[0]);
    for v in &sims[1..] {
        assert_eq!(v["reason"], "fragment", "{v}");
        assert_eq!(v["backend_id"], sims[0]["backend_id"], "{v}");
        assert!(v["why"].as_str().unwrap().contains("later fragment"), "{v}");
    }
    // The real program sends every fragment where simulate said.
    for (i, frag) in frags.iter().enumerate() {
        let (a, out) = bed.run(frag);
        assert_eq!(a, XDP_TX, "fragment {i}");
        assert_eq!(
            u64::from(out[5]),
            sims[i]["backend_id"].as_u64().unwrap(),
            "fragment {i}"
        );
    }
    let c = bed.maps().counters().unwrap();
    assert_eq!((c[FRAG_RECORD as usize], c[FRAG_HIT as usize]), (1, 3));
    // A router's "fragmentation needed" quoting the gateway's reply to that flow: its session.
    let reply = Frame::udp(ip(WG), WG_PORT, ip("192.0.2.77"), 40077, &[0x44; 1400]).ip_bytes();
    let msg = vpnlb_tests::packet::icmp_too_big(ip("192.0.2.254"), ip(WG), 1280, &reply[..64]);
    let v = simulate_pcap_one(&bed, &msg.bytes());
    assert_eq!(v["reason"], "pmtu_session", "{v}");
    assert_eq!(v["backend_id"], sims[0]["backend_id"], "{v}");
    assert_eq!(
        v["flow"], "udp 192.0.2.77:40077 -> 203.0.113.10:51820",
        "{v}"
    );
    let (a, out) = bed.run(&msg.bytes());
    assert_eq!(
        (a, u64::from(out[5])),
        (XDP_TX, sims[0]["backend_id"].as_u64().unwrap())
    );
}

/// `simulate --pcap --json` of one frame.
fn simulate_pcap_one(bed: &Bed, frame: &[u8]) -> Value {
    let path = bed.dir.join("one.pcap");
    pcap::write(&path, &[frame]).unwrap();
    let out = bed.ok(&["simulate", "--pcap", path.to_str().unwrap(), "--json"]);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn bpftool_dumps_readable_keys() {
    let mut bed = Bed::new();
    bed.program();
    bed.run(&wg_flow(1, 0).bytes());
    let o = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(bed.pins.join("SESSIONS"))
        .output()
        .expect("bpftool (apt install bpftool)");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_str(&out).unwrap();
    let e = &v[0];
    // With BTF, bpftool prints the typed key/value ("formatted"), not only hex bytes.
    let f = &e["formatted"];
    assert!(
        f["key"]["proto"] == PROTO_UDP && f["key"]["family"] == FAMILY_V4,
        "{out}"
    );
    assert!(f["value"]["backend_id"].as_u64().is_some(), "{out}");
}

#[test]
fn control_commands_without_agent_fail_plainly() {
    let dir = std::env::temp_dir().join(format!("vpnlb-clitest-noagent-{}", std::process::id()));
    let sock = dir.join("control.sock");
    for args in [
        vec!["drain", "gw1"],
        vec!["undrain", "gw1"],
        vec!["disable", "gw1"],
        vec!["enable", "gw1"],
        vec!["reload"],
        vec!["status"],
        vec!["status", "--json"],
    ] {
        let mut a = vec!["--control-socket", sock.to_str().unwrap()];
        a.extend(args.iter());
        let o = vpnlb(&a);
        let (out, err) = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded: {out}");
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(err.contains("not running"), "{args:?}: {err}");
        assert!(out.is_empty(), "{args:?}: {out}");
    }
    // inspect without pins: plain, non-zero.
    let o = vpnlb(&["--pin-dir", dir.to_str().unwrap(), "inspect", "vips"]);
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("no vpnlb maps pinned"),
        "{}",
        text(&o).1
    );
}

#[test]
fn completions_bash_prints_a_script() {
    for shell in ["bash", "zsh", "fish"] {
        let o = vpnlb(&["completions", shell]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{shell}: {err}");
        assert!(
            out.contains("inspect") && out.contains("simulate") && out.contains("pin-dir"),
            "{shell}: no subcommands or global options in the script ({} bytes)",
            out.len()
        );
    }
    let (out, _) = text(&vpnlb(&["completions", "bash"]));
    assert!(
        out.contains("_vpnlb()") && out.contains("complete -F _vpnlb"),
        "{out}"
    );
}

#[test]
#[ignore = "needs root and the eBPF object: run cargo xtask test"]
fn control_round_trip_with_the_real_agent() {
    let bed = AgentBed::up("vpnlb-cli1", 2, 1, |t, _| {
        format!(
            "{INTERFACE}{}{}{}",
            backend(0, Some(t.gws[0].mac("eth0")), 1, &["tcp"]),
            backend(1, Some(t.gws[1].mac("eth0")), 1, &["tcp"]),
            vip(&[("primary", 200, &["gw1"]), ("standby", 100, &["gw2"])])
        )
    });
    bed.agent
        .wait_all_up(&["gw1", "gw2"], Duration::from_secs(20));
    let pins = bed.scratch.pin_dir.to_str().unwrap().to_string();
    let sock = bed.scratch.socket.to_str().unwrap().to_string();
    let cli = |args: &[&str]| -> Output {
        let mut a = vec![
            "--pin-dir",
            pins.as_str(),
            "--control-socket",
            sock.as_str(),
        ];
        a.extend_from_slice(args);
        vpnlb(&a)
    };
    let ok = |args: &[&str]| -> String {
        let o = cli(args);
        let (out, err) = text(&o);
        assert!(
            o.status.success(),
            "{args:?}: {err}\n{out}\nagent log:\n{}",
            bed.agent.log()
        );
        out
    };
    let json = |args: &[&str]| -> Value { serde_json::from_str(&ok(args)).unwrap() };
    let flow = ["simulate", "--json", "--src", "10.77.9.9:40000", "--dst"];
    let dst = format!("{VIP}:{VIP_PORT}");
    let sim = || -> Value {
        let mut a = flow.to_vec();
        a.push(&dst);
        serde_json::from_str(ok(&a).trim()).unwrap()
    };

    let st = json(&["status", "--json"]);
    assert_eq!(backend_in(&st, "gw1").unwrap()["state"], "up");
    let t = ok(&["status"]);
    assert!(
        t.lines().any(|l| l.starts_with("gw1 ")
            && l.contains(" up ")
            && l.contains("tcp:7001 up (last ok")),
        "{t}"
    );
    assert!(
        t.lines().any(|l| l.starts_with("wg ")
            && l.contains("primary")
            && l.contains("primary > standby")),
        "{t}"
    );
    let v = sim();
    assert_eq!(v["backend"], "gw1", "{v}");
    assert_eq!(v["pool"]["serving"], "primary", "{v}");
    assert_eq!(v["pool"]["failover"], false);

    // drain: the agent answers, the maps follow, names resolve from the agent's ids.json.
    let out = ok(&["drain", "gw1"]);
    assert_eq!(out.trim(), "gw1: draining (changed)");
    let st = json(&["status", "--json"]);
    assert_eq!(backend_in(&st, "gw1").unwrap()["state"], "draining");
    assert_eq!(backend_in(&st, "gw1").unwrap()["admin"], "drain");
    let b = json(&["inspect", "backends", "--json"]);
    let gw1 = b
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "gw1")
        .unwrap();
    assert_eq!(gw1["state"], "draining");
    let t = ok(&["status"]);
    assert!(t.contains("standby (pool failover)"), "{t}");
    pause_at(&format!("--pin-dir {pins} --control-socket {sock}"));
    let v = sim();
    assert_eq!(v["backend"], "gw2", "{v}");
    assert_eq!(v["pool"]["serving"], "standby");
    assert_eq!(v["pool"]["failover"], true);
    assert!(v["why"].as_str().unwrap().contains("pool failover"), "{v}");
    let again = ok(&["drain", "gw1", "--json"]);
    let again: Value = serde_json::from_str(&again).unwrap();
    assert_eq!(again["changed"], false);

    let out = ok(&["undrain", "gw1"]);
    assert_eq!(out.trim(), "gw1: up (changed)");
    let st = json(&["status", "--json"]);
    assert_eq!(backend_in(&st, "gw1").unwrap()["state"], "up");
    assert_eq!(sim()["pool"]["serving"], "primary");

    let out = ok(&["disable", "gw2"]);
    assert_eq!(out.trim(), "gw2: disabled (changed)");
    ok(&["enable", "gw2"]);
    bed.agent.wait_state("gw2", "up", Duration::from_secs(10));

    let out = ok(&["reload"]);
    assert!(out.starts_with("config reloaded"), "{out}");

    let o = cli(&["drain", "nosuch"]);
    assert!(!o.status.success());
    assert!(text(&o).1.contains("unknown backend"), "{}", text(&o).1);
}
