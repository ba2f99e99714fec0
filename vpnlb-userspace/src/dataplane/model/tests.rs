//! Hand-built packets through the model: every outcome reachable, exact encapsulation bytes,
//! session hit/repick/idle/drain/flood behaviour and the decap program.

use std::net::IpAddr;

use super::*;
use crate::dataplane::{BackendSpec, Dataplane, VipSpec};

const CLIENT: [u8; 4] = [198, 51, 100, 7];
const VIP4: [u8; 4] = [192, 0, 2, 10];
const VIP6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x21];
const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const IN_MACS: [u8; 12] = [0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x99];

// ---- packet builders (independent of the model's parser) ----

fn eth(et: u16, vlan: Option<u16>, l3: &[u8]) -> Vec<u8> {
    let mut f = IN_MACS.to_vec();
    if let Some(tci) = vlan {
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&et.to_be_bytes());
    f.extend_from_slice(l3);
    f
}

fn csum(h: &[u8]) -> u16 {
    let mut s = 0u32;
    for c in h.chunks(2) {
        s += (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0));
    }
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, tos: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, tos];
    h.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34, 0, 0, 61, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn ipv6(src: [u8; 16], dst: [u8; 16], nh: u8, tc: u8, payload: &[u8]) -> Vec<u8> {
    let w0 = (6u32 << 28) | (u32::from(tc) << 20) | 0x12345;
    let mut h = w0.to_be_bytes().to_vec();
    h.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    h.extend_from_slice(&[nh, 63]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    h.extend_from_slice(payload);
    h
}

fn udp(sp: u16, dp: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = sp.to_be_bytes().to_vec();
    u.extend_from_slice(&dp.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0xab, 0xcd]);
    u.extend_from_slice(payload);
    u
}

fn tcp(sp: u16, dp: u16, doff: u8) -> Vec<u8> {
    let mut t = sp.to_be_bytes().to_vec();
    t.extend_from_slice(&dp.to_be_bytes());
    t.extend_from_slice(&[
        0,
        0,
        0,
        1,
        0,
        0,
        0,
        0,
        doff << 4,
        0x02,
        0xff,
        0xff,
        0,
        0,
        0,
        0,
    ]);
    t
}

fn esp(spi: u32) -> Vec<u8> {
    let mut e = spi.to_be_bytes().to_vec();
    e.extend_from_slice(&[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]);
    e
}

fn v4_udp(sp: u16, dp: u16) -> Vec<u8> {
    eth(
        0x0800,
        None,
        &ipv4(CLIENT, VIP4, 17, 0xb8, &udp(sp, dp, b"wireguard!")),
    )
}

fn v6_udp(sp: u16, dp: u16, vlan: Option<u16>) -> Vec<u8> {
    eth(
        0x86dd,
        vlan,
        &ipv6(CLIENT6, VIP6, 17, 0x2e, &udp(sp, dp, b"hello")),
    )
}

// ---- map setup through the dataplane API ----

fn gw(id: u32, addr: &str, ifindex: u32) -> BackendSpec {
    BackendSpec {
        id,
        addr: addr.parse().unwrap(),
        mac: GW_MAC,
        src_mac: LB_MAC,
        ifindex,
        weight: 1,
        state: BACKEND_UP,
    }
}

fn vip4(port: u16, fwd_mode: u32, backends: Vec<u32>) -> VipSpec {
    VipSpec {
        key: VipKey::new(IpAddr::from(VIP4), port, PROTO_UDP),
        vip_id: 3,
        ring_id: 1,
        ring_size: 13,
        flags: 0,
        fwd_mode,
        mtu: 0,
        idle_timeout_ns: 0,
        gue_port: DEFAULT_GUE_PORT,
        backends,
        classes: Vec::new(),
    }
}

fn cfg() -> GlobalConfig {
    GlobalConfig {
        encap_src_v4: u32::from_ne_bytes([10, 9, 0, 0]),
        encap_src_v4_hash_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
        encap_src_v6: [
            u32::from_ne_bytes([0xfd, 0, 0, 0]),
            0,
            0,
            u32::from_ne_bytes([0, 0, 0xaa, 0]),
        ],
        encap_src_v6_hash_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
        flood_max_inserts_per_sec: 0,
        decap_gue_port: DEFAULT_GUE_PORT,
        replicate: 0,
        _pad: [0; 5],
    }
}

/// One VIP (udp :51820 over IPv4, mode `mode`) with one backend (id 1) at `gw_addr`.
fn setup(mode: u32, gw_addr: &str, ifindex: u32) -> MemMaps {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.set_config(cfg()).unwrap();
    dp.upsert_backend(gw(1, gw_addr, ifindex)).unwrap();
    dp.upsert_vip(vip4(51820, mode, vec![1])).unwrap();
    dp.into_writer()
}

const CTX: ModelCtx = ModelCtx {
    ingress_ifindex: 2,
    now_ns: 10_000_000_000,
};

fn run(m: &mut MemMaps, f: &[u8]) -> ModelResult {
    run_ingress(m, f, &CTX)
}

fn outcome_sum(m: &MemMaps) -> u64 {
    INGRESS_OUTCOMES
        .iter()
        .map(|i| m.counters[*i as usize])
        .sum()
}

// ---- stage 1 ----

#[test]
fn every_pass_reason_is_reachable_and_untouched() {
    let good_udp = udp(1000, 51820, b"x");
    let mut cases: Vec<(&str, Vec<u8>, u32)> = vec![
        ("short frame", vec![0; 13], PASS_L2_TRUNCATED),
        (
            "short vlan",
            {
                let mut f = IN_MACS.to_vec();
                f.extend_from_slice(&[0x81, 0x00, 0, 5]);
                f
            },
            PASS_L2_TRUNCATED,
        ),
        ("qinq", eth(0x88a8, None, &[0; 40]), PASS_VLAN_STACKED),
        (
            "double 802.1q",
            eth(0x8100, Some(7), &[0; 40]),
            PASS_VLAN_STACKED,
        ),
        (
            "vlan then 88a8",
            eth(0x88a8, Some(7), &[0; 40]),
            PASS_VLAN_STACKED,
        ),
        ("arp", eth(0x0806, None, &[0; 28]), PASS_NOT_IP),
        ("arp in vlan", eth(0x0806, Some(7), &[0; 28]), PASS_NOT_IP),
        (
            "v4 short",
            eth(0x0800, None, &[0x45; 19]),
            PASS_IPV4_TRUNCATED,
        ),
        (
            "v4 version",
            {
                let mut p = ipv4(CLIENT, VIP4, 17, 0, &good_udp);
                p[0] = 0x55;
                eth(0x0800, None, &p)
            },
            PASS_IPV4_BAD_VERSION,
        ),
        (
            "v4 ihl",
            {
                let mut p = ipv4(CLIENT, VIP4, 17, 0, &good_udp);
                p[0] = 0x44;
                eth(0x0800, None, &p)
            },
            PASS_IPV4_BAD_IHL,
        ),
        (
            "v4 options beyond frame",
            {
                let mut p = ipv4(CLIENT, VIP4, 17, 0, &[]);
                p[0] = 0x4f; // 60-byte header, 20 present
                eth(0x0800, None, &p)
            },
            PASS_IPV4_TRUNCATED,
        ),
        (
            "v4 totlen short",
            {
                let mut p = ipv4(CLIENT, VIP4, 17, 0, &good_udp);
                p[2..4].copy_from_slice(&19u16.to_be_bytes());
                eth(0x0800, None, &p)
            },
            PASS_IPV4_BAD_TOTLEN,
        ),
        (
            "v4 totlen long",
            {
                let mut p = ipv4(CLIENT, VIP4, 17, 0, &good_udp);
                let long = (p.len() + 1) as u16;
                p[2..4].copy_from_slice(&long.to_be_bytes());
                eth(0x0800, None, &p)
            },
            PASS_IPV4_BAD_TOTLEN,
        ),
        (
            "v4 icmp fragment",
            {
                let mut p = ipv4(CLIENT, VIP4, 1, 0, &good_udp);
                p[7] = 1;
                eth(0x0800, None, &p)
            },
            PASS_OTHER_PROTO,
        ),
        (
            "icmp",
            eth(
                0x0800,
                None,
                &ipv4(CLIENT, VIP4, 1, 0, &[8, 0, 0, 0, 0, 0, 0, 0]),
            ),
            PASS_OTHER_PROTO,
        ),
        (
            "v6 short",
            eth(0x86dd, None, &[0x60; 39]),
            PASS_IPV6_TRUNCATED,
        ),
        (
            "v6 version",
            {
                let mut p = ipv6(CLIENT6, VIP6, 17, 0, &good_udp);
                p[0] = 0x40;
                eth(0x86dd, None, &p)
            },
            PASS_IPV6_BAD_VERSION,
        ),
        (
            "v6 jumbo",
            eth(0x86dd, None, &ipv6(CLIENT6, VIP6, 17, 0, &[])),
            PASS_IPV6_BAD_PAYLOAD_LEN,
        ),
        (
            "v6 payload long",
            {
                let mut p = ipv6(CLIENT6, VIP6, 17, 0, &good_udp);
                p[4..6].copy_from_slice(&((good_udp.len() + 1) as u16).to_be_bytes());
                eth(0x86dd, None, &p)
            },
            PASS_IPV6_BAD_PAYLOAD_LEN,
        ),
        (
            "v6 fragment header truncated",
            eth(0x86dd, None, &ipv6(CLIENT6, VIP6, 44, 0, &[17, 0, 0, 1])),
            PASS_FRAGMENT,
        ),
        (
            "v6 icmp",
            eth(0x86dd, None, &ipv6(CLIENT6, VIP6, 58, 0, &good_udp)),
            PASS_OTHER_PROTO,
        ),
        (
            "udp short",
            eth(0x0800, None, &ipv4(CLIENT, VIP4, 17, 0, &[0; 7])),
            PASS_L4_TRUNCATED,
        ),
        (
            "tcp short",
            eth(0x0800, None, &ipv4(CLIENT, VIP4, 6, 0, &[0; 19])),
            PASS_L4_TRUNCATED,
        ),
        (
            "esp short",
            eth(0x86dd, None, &ipv6(CLIENT6, VIP6, 50, 0, &[1; 7])),
            PASS_L4_TRUNCATED,
        ),
        (
            "udp len 7",
            {
                let mut u = udp(1, 2, b"abc");
                u[4..6].copy_from_slice(&7u16.to_be_bytes());
                eth(0x0800, None, &ipv4(CLIENT, VIP4, 17, 0, &u))
            },
            PASS_UDP_BAD_LEN,
        ),
        (
            "udp len > L",
            {
                let mut u = udp(1, 2, b"abc");
                u[4..6].copy_from_slice(&12u16.to_be_bytes());
                eth(0x0800, None, &ipv4(CLIENT, VIP4, 17, 0, &u))
            },
            PASS_UDP_BAD_LEN,
        ),
        (
            "tcp doff 4",
            eth(0x0800, None, &ipv4(CLIENT, VIP4, 6, 0, &tcp(1, 443, 4))),
            PASS_TCP_BAD_DOFF,
        ),
        (
            "tcp doff > L",
            eth(0x0800, None, &ipv4(CLIENT, VIP4, 6, 0, &tcp(1, 443, 6))),
            PASS_TCP_BAD_DOFF,
        ),
        (
            "esp spi 0",
            eth(0x0800, None, &ipv4(CLIENT, VIP4, 50, 0, &esp(0))),
            PASS_ESP_BAD_SPI,
        ),
        ("not a vip port", v4_udp(1000, 51821), PASS_NOT_VIP),
        (
            "not a vip proto",
            eth(0x0800, None, &ipv4(CLIENT, VIP4, 6, 0, &tcp(1, 51820, 5))),
            PASS_NOT_VIP,
        ),
    ];
    for ext in [0u8, 43, 60, 135, 139, 140, 253, 254] {
        cases.push((
            "v6 ext header",
            eth(0x86dd, None, &ipv6(CLIENT6, VIP6, ext, 0, &good_udp)),
            PASS_IPV6_EXT_HDR,
        ));
    }
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    for (i, (name, f, want)) in cases.iter().enumerate() {
        let r = run(&mut m, f);
        assert_eq!(
            (r.action, COUNTER_NAMES[r.outcome as usize]),
            (XDP_PASS, COUNTER_NAMES[*want as usize]),
            "case {name}"
        );
        assert_eq!(&r.frame, f, "case {name}: PASS must not modify");
        assert!(r.events.is_empty(), "case {name}");
        assert_eq!(outcome_sum(&m), i as u64 + 1);
    }
    assert!(m.sessions.is_empty());
}

#[test]
fn ip_options_vlan_and_padding_are_accepted() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    // IPv4 with 4 bytes of options, in a VLAN, with Ethernet padding after the IP packet.
    let u = udp(1000, 51820, b"x");
    let mut p = vec![0x46, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&CLIENT);
    p.extend_from_slice(&VIP4);
    p.extend_from_slice(&[1, 1, 1, 0]);
    p.extend_from_slice(&u);
    let tot = p.len() as u16;
    p[2..4].copy_from_slice(&tot.to_be_bytes());
    p.extend_from_slice(&[0; 9]);
    let f = eth(0x0800, Some(100), &p);
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_TX, FWD_L2DSR_TX));
    let k = r.flow.unwrap();
    assert_eq!(
        k,
        FlowKey::new(
            IpAddr::from(CLIENT),
            IpAddr::from(VIP4),
            1000,
            51820,
            PROTO_UDP
        )
    );
    // Only the MACs change; the VLAN tag and the padding stay.
    assert_eq!(&r.frame[..6], &GW_MAC);
    assert_eq!(&r.frame[6..12], &LB_MAC);
    assert_eq!(&r.frame[12..], &f[12..]);
}

#[test]
fn esp_and_tcp_flow_keys() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.upsert_backend(gw(1, "10.1.0.1", 0)).unwrap();
    let mut v = vip4(0, FWD_MODE_L2DSR, vec![1]);
    v.key = VipKey::new(IpAddr::from(VIP6), 0, PROTO_ESP);
    dp.upsert_vip(v).unwrap();
    let mut v = vip4(443, FWD_MODE_L2DSR, vec![1]);
    v.key = VipKey::new(IpAddr::from(VIP4), 443, PROTO_TCP);
    dp.upsert_vip(v).unwrap();
    let mut m = dp.into_writer();
    let r = run(
        &mut m,
        &eth(0x86dd, None, &ipv6(CLIENT6, VIP6, 50, 0, &esp(0xc0ffee))),
    );
    assert_eq!(r.outcome, FWD_L2DSR_TX);
    assert_eq!(
        r.flow.unwrap(),
        FlowKey::esp(IpAddr::from(CLIENT6), IpAddr::from(VIP6), 0xc0ffee)
    );
    let r = run(
        &mut m,
        &eth(0x0800, None, &ipv4(CLIENT, VIP4, 6, 0, &tcp(5555, 443, 5))),
    );
    assert_eq!(r.outcome, FWD_L2DSR_TX);
    assert_eq!(r.flow.unwrap().ports_host(), (5555, 443));
}

// ---- drops ----

#[test]
fn every_drop_reason_is_reachable() {
    // No backend: every listed backend down, so the ring is empty.
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    let mut dp = Dataplane::new(MemMaps::new());
    dp.upsert_backend(BackendSpec {
        state: BACKEND_DOWN,
        ..gw(1, "10.1.0.1", 0)
    })
    .unwrap();
    dp.upsert_vip(vip4(51820, FWD_MODE_L2DSR, vec![1])).unwrap();
    let mut empty = dp.into_writer();
    let f = v4_udp(1000, 51820);
    let r = run(&mut empty, &f);
    assert_eq!(
        (r.action, r.outcome, r.events.clone()),
        (XDP_DROP, DROP_NO_BACKEND, vec![SESSION_MISS])
    );
    assert_eq!(r.frame, f);
    // ring_size 0 also means no backend.
    empty.vips.values_mut().for_each(|v| v.ring_size = 0);
    assert_eq!(run(&mut empty, &f).outcome, DROP_NO_BACKEND);

    // Backend down while the ring still names it (between a health event and the ring rewrite).
    m.backends[1].state = BACKEND_DOWN;
    let r = run(&mut m, &f);
    assert_eq!(
        (r.action, r.outcome, r.backend_id),
        (XDP_DROP, DROP_BACKEND_DOWN, Some(1))
    );
    assert!(m.sessions.is_empty(), "nothing recorded for a dead pick");

    // Backend with no family under encapsulation.
    let mut m = setup(FWD_MODE_IPIP, "10.1.0.1", 0);
    m.backends[1].family = 0;
    assert_eq!(run(&mut m, &f).outcome, DROP_BACKEND_BAD);
    // L2 DSR does not care about the family.
    m.vips
        .values_mut()
        .for_each(|v| v.fwd_mode = FWD_MODE_L2DSR);
    assert_eq!(run(&mut m, &f).outcome, FWD_L2DSR_TX);

    // An unknown forwarding mode drops after the session stage: the session is still recorded.
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    m.vips.values_mut().for_each(|v| v.fwd_mode = 7);
    let r = run(&mut m, &f);
    assert_eq!(
        (r.action, r.outcome, r.events.clone(), r.backend_id),
        (
            XDP_DROP,
            DROP_BACKEND_BAD,
            vec![SESSION_MISS, SESSION_INSERT],
            Some(1)
        )
    );
    assert_eq!(m.sessions.len(), 1, "recorded before stage 5 dropped it");
    let r = run(&mut m, &f);
    assert_eq!(
        (r.outcome, r.events.clone()),
        (DROP_BACKEND_BAD, vec![SESSION_HIT])
    );
    assert!(m.vip_stats.is_empty() && m.backend_stats.is_empty());

    // MTU: outer_len = inner + 20 (IPIP over IPv4).
    let mut m = setup(FWD_MODE_IPIP, "10.1.0.1", 0);
    let inner = (f.len() - 14) as u32;
    m.vips.values_mut().for_each(|v| v.mtu = inner + 20);
    assert_eq!(run(&mut m, &f).outcome, FWD_IPIP);
    m.vips.values_mut().for_each(|v| v.mtu = inner + 19);
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_DROP, DROP_ENCAP_TOO_BIG));
    assert_eq!(r.frame, f);

    // Head adjustment refused (no headroom).
    let mut m = setup(FWD_MODE_GUE, "2001:db8::21", 0);
    m.env.headroom = 47;
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_DROP, DROP_ADJUST_FAILED));
    m.env.headroom = 48;
    assert_eq!(run(&mut m, &f).outcome, FWD_GUE);

    // Redirect to an interface missing from TX_PORTS.
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 7);
    m.tx_ports.clear();
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_DROP, DROP_REDIRECT_FAILED));
    assert_eq!(m.vip_stats.get(&3), None, "no stats without a FWD outcome");
    assert_eq!(m.counters[DROP_REDIRECT_FAILED as usize], 1);
    assert_eq!(m.counters[FWD_L2DSR_REDIRECT as usize], 0);
}

// ---- forwarding ----

#[test]
fn l2dsr_tx_and_redirect() {
    let f = v4_udp(1000, 51820);
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_TX, FWD_L2DSR_TX));
    let mut want = f.clone();
    want[..6].copy_from_slice(&GW_MAC);
    want[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(r.frame, want);

    // Egress interface = ingress interface: TX, no TX_PORTS needed.
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", CTX.ingress_ifindex);
    m.tx_ports.clear();
    assert_eq!(run(&mut m, &f).action, XDP_TX);

    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 7);
    assert!(
        m.tx_ports.contains(&7),
        "the dataplane adds the backend's TX port"
    );
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_REDIRECT, FWD_L2DSR_REDIRECT));
    assert_eq!(r.frame, want);
    assert_eq!(
        m.vip_stats[&3],
        PktBytes {
            packets: 1,
            bytes: f.len() as u64
        }
    );
    assert_eq!(
        m.backend_stats[&1],
        PktBytes {
            packets: 1,
            bytes: f.len() as u64
        }
    );
}

#[test]
fn ipip_over_ipv4_exact_bytes() {
    let mut m = setup(FWD_MODE_IPIP, "10.1.0.1", 0);
    let mut f = v4_udp(40000, 51820);
    f.extend_from_slice(&[0; 3]); // Ethernet padding travels inside the tunnel
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_TX, FWD_IPIP));
    let hash = r.hash.unwrap();
    assert_eq!(hash, hash::hash_flow(&r.flow.unwrap()));
    let inner = &f[14..];
    let mut want = Vec::new();
    want.extend_from_slice(&GW_MAC);
    want.extend_from_slice(&LB_MAC);
    want.extend_from_slice(&[0x08, 0x00]);
    let mut h = vec![0x45, 0xb8];
    h.extend_from_slice(&((inner.len() + 20) as u16).to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0x00, 64, 4, 0, 0]);
    h.extend_from_slice(&[10, 9, 0, (hash >> 24) as u8]); // low byte on the wire = hash & 0xff000000 LE
    h.extend_from_slice(&[10, 1, 0, 1]);
    let c = csum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    want.extend_from_slice(&h);
    want.extend_from_slice(inner);
    assert_eq!(r.frame, want);
    assert_eq!(csum(&r.frame[14..34]), 0, "outer IPv4 checksum verifies");
}

#[test]
fn ipip_ipv6_in_ipv6_exact_bytes_with_vlan() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.set_config(cfg()).unwrap();
    dp.upsert_backend(gw(1, "2001:db8::21", 0)).unwrap();
    let mut v = vip4(4500, FWD_MODE_IPIP, vec![1]);
    v.key = VipKey::new(IpAddr::from(VIP6), 4500, PROTO_UDP);
    v.flags = VIP_F_HASH_SRC_ONLY;
    dp.upsert_vip(v).unwrap();
    let mut m = dp.into_writer();
    let f = v6_udp(4500, 4500, Some(0x0123));
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_TX, FWD_IPIP));
    let hash = r.hash.unwrap();
    assert_eq!(
        hash,
        hash::hash_src(&r.flow.unwrap()),
        "source-only hash under VIP_F_HASH_SRC_ONLY"
    );
    let inner = &f[18..];
    let mut want = GW_MAC.to_vec();
    want.extend_from_slice(&LB_MAC);
    want.extend_from_slice(&[0x81, 0x00, 0x01, 0x23, 0x86, 0xdd]);
    let w0 = (6u32 << 28) | (0x2e << 20) | (hash & 0xfffff);
    want.extend_from_slice(&w0.to_be_bytes());
    want.extend_from_slice(&(inner.len() as u16).to_be_bytes());
    want.extend_from_slice(&[41, 64]);
    want.extend_from_slice(&[
        0xfd,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0xaa,
        (hash >> 24) as u8,
    ]);
    want.extend_from_slice(
        &"2001:db8::21"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    want.extend_from_slice(inner);
    assert_eq!(r.frame, want);
}

#[test]
fn gue_exact_bytes_both_families() {
    let f = v4_udp(40000, 51820);
    let inner = &f[14..];
    // GUE over IPv4.
    let mut m = setup(FWD_MODE_GUE, "10.1.0.1", 0);
    let r = run(&mut m, &f);
    assert_eq!((r.action, r.outcome), (XDP_TX, FWD_GUE));
    let hash = r.hash.unwrap();
    let o = &r.frame;
    assert_eq!(o.len(), f.len() + 28);
    assert_eq!(&o[12..14], &[0x08, 0x00]);
    assert_eq!(
        &o[14..26],
        &[
            0x45,
            0xb8,
            0,
            (inner.len() + 28) as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
            o[24],
            o[25]
        ]
    );
    assert_eq!(csum(&o[14..34]), 0);
    let sport = 0xc000 | (hash & 0x3fff) as u16;
    let mut u = sport.to_be_bytes().to_vec();
    u.extend_from_slice(&DEFAULT_GUE_PORT.to_be_bytes());
    u.extend_from_slice(&((inner.len() + 8) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    assert_eq!(&o[34..42], &u[..]);
    assert_eq!(&o[42..], inner);

    // GUE over IPv6 carrying an IPv4 packet: next header UDP, payload length = 8 + inner.
    let mut m = setup(FWD_MODE_GUE, "2001:db8::21", 0);
    let r = run(&mut m, &f);
    let o = &r.frame;
    assert_eq!(r.outcome, FWD_GUE);
    assert_eq!(&o[12..14], &[0x86, 0xdd]);
    assert_eq!(o[14] >> 4, 6);
    assert_eq!(
        ((u16::from(o[14] & 0xf) << 4) | u16::from(o[15] >> 4)) as u8,
        0xb8,
        "traffic class = inner TOS"
    );
    assert_eq!(u16::from_be_bytes([o[18], o[19]]) as usize, inner.len() + 8);
    assert_eq!((o[20], o[21]), (17, 64));
    assert_eq!(&o[54..62], &u[..]);
    assert_eq!(&o[62..], inner);
}

// ---- sessions ----

#[test]
fn session_miss_insert_then_hit_and_touch() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    let f = v4_udp(1000, 51820);
    let t0 = 5 * NS_PER_SEC;
    let r = run_ingress(
        &mut m,
        &f,
        &ModelCtx {
            ingress_ifindex: 2,
            now_ns: t0,
        },
    );
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT]);
    let k = r.flow.unwrap();
    assert_eq!(
        m.sessions[&k],
        Session {
            backend_id: 1,
            // The flow hash is stored with the session (hits reuse it for encapsulation).
            hash: r.hash.unwrap(),
            last_seen_ns: t0
        }
    );
    assert_eq!(r.hash, Some(vpnlb_common::hash::pick_hash(&k, 0)));
    // Within a second: a hit that does not write.
    let r = run_ingress(
        &mut m,
        &f,
        &ModelCtx {
            ingress_ifindex: 2,
            now_ns: t0 + NS_PER_SEC - 1,
        },
    );
    assert_eq!(r.events, vec![SESSION_HIT]);
    assert_eq!(m.sessions[&k].last_seen_ns, t0);
    // A second later: refreshed in place.
    let r = run_ingress(
        &mut m,
        &f,
        &ModelCtx {
            ingress_ifindex: 2,
            now_ns: t0 + NS_PER_SEC,
        },
    );
    assert_eq!(r.events, vec![SESSION_HIT]);
    assert_eq!(m.sessions[&k].last_seen_ns, t0 + NS_PER_SEC);
    assert_eq!(m.counters[SESSION_HIT as usize], 2);
    assert_eq!(m.counters[SESSION_INSERT as usize], 1);
}

#[test]
fn session_sticks_even_when_the_ring_moves_and_while_draining() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.upsert_backend(gw(1, "10.1.0.1", 0)).unwrap();
    dp.upsert_backend(gw(2, "10.1.0.2", 0)).unwrap();
    dp.upsert_vip(vip4(51820, FWD_MODE_L2DSR, vec![1, 2]))
        .unwrap();
    let f = v4_udp(1000, 51820);
    let first = run(dp.writer_mut(), &f).backend_id.unwrap();
    let other = 3 - first;
    // Drain the chosen backend: the ring forgets it, the session does not.
    dp.set_backend_state(first, BACKEND_DRAINING).unwrap();
    assert!(dp.installed_ring(1).unwrap().iter().all(|id| *id == other));
    let r = run(dp.writer_mut(), &f);
    assert_eq!(
        (r.backend_id, r.events.clone()),
        (Some(first), vec![SESSION_HIT])
    );
    // A new flow goes to the other one.
    let r = run(dp.writer_mut(), &v4_udp(1001, 51820));
    assert_eq!(r.backend_id, Some(other));
    // Down: re-picked on the next packet.
    dp.set_backend_state(first, BACKEND_DOWN).unwrap();
    let r = run(dp.writer_mut(), &f);
    assert_eq!(r.events, vec![SESSION_REPICK_DOWN, SESSION_INSERT]);
    assert_eq!(r.backend_id, Some(other));
    assert_eq!(dp.writer().sessions[&r.flow.unwrap()].backend_id, other);
}

#[test]
fn session_idle_timeout_repicks() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    m.vips
        .values_mut()
        .for_each(|v| v.idle_timeout_ns = 30 * NS_PER_SEC);
    let f = v4_udp(1000, 51820);
    let at = |t: u64| ModelCtx {
        ingress_ifindex: 2,
        now_ns: t,
    };
    run_ingress(&mut m, &f, &at(NS_PER_SEC));
    // Exactly the timeout: still a hit.
    let r = run_ingress(&mut m, &f, &at(31 * NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_HIT]);
    let r = run_ingress(&mut m, &f, &at(61 * NS_PER_SEC + 1));
    assert_eq!(r.events, vec![SESSION_REPICK_IDLE, SESSION_INSERT]);
    assert_eq!(r.outcome, FWD_L2DSR_TX);
    assert_eq!(
        m.sessions[&r.flow.unwrap()].last_seen_ns,
        61 * NS_PER_SEC + 1
    );
    // A session pointing at an id outside BACKENDS is "not usable".
    m.sessions
        .values_mut()
        .for_each(|s| s.backend_id = MAX_BACKENDS + 5);
    assert_eq!(
        run_ingress(&mut m, &f, &at(62 * NS_PER_SEC)).events[0],
        SESSION_REPICK_DOWN
    );
}

#[test]
fn down_and_idle_counts_repick_down_and_cleared_backends_are_unusable() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    m.vips
        .values_mut()
        .for_each(|v| v.idle_timeout_ns = 30 * NS_PER_SEC);
    let f = v4_udp(1000, 51820);
    let at = |t: u64| ModelCtx {
        ingress_ifindex: 2,
        now_ns: t,
    };
    run_ingress(&mut m, &f, &at(NS_PER_SEC));
    // Both idle (100 s) and down: usability is checked first.
    m.backends[1].state = BACKEND_DOWN;
    let r = run_ingress(&mut m, &f, &at(101 * NS_PER_SEC));
    assert_eq!(
        (r.outcome, r.events.clone()),
        (DROP_BACKEND_DOWN, vec![SESSION_REPICK_DOWN])
    );
    // A cleared slot (state BACKEND_UNUSED) that the ring still names: not usable.
    m.backends[1] = Backend::default();
    m.sessions.clear();
    let r = run_ingress(&mut m, &f, &at(102 * NS_PER_SEC));
    assert_eq!(
        (r.action, r.outcome, r.events.clone()),
        (XDP_DROP, DROP_BACKEND_DOWN, vec![SESSION_MISS])
    );
    // A last_seen in the future is idle for a wrapped, huge time.
    m.backends[1].state = BACKEND_UP;
    m.backends[1].family = FAMILY_V4;
    let r = run_ingress(&mut m, &f, &at(103 * NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT]);
    m.sessions
        .values_mut()
        .for_each(|s| s.last_seen_ns = u64::MAX);
    let r = run_ingress(&mut m, &f, &at(104 * NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_REPICK_IDLE, SESSION_INSERT]);
}

#[test]
fn traffic_classes_pick_by_dscp_with_a_u32_index() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.upsert_backend(gw(1, "10.1.0.1", 0)).unwrap();
    dp.upsert_backend(gw(2, "10.1.0.2", 0)).unwrap();
    let mut v = vip4(51820, FWD_MODE_L2DSR, vec![1]);
    v.classes = vec![crate::dataplane::ClassSpec {
        dscp: vec![46],
        ring_id: 2,
        backends: vec![2],
    }];
    dp.upsert_vip(v).unwrap();
    let mut m = dp.into_writer();
    // TOS 0xb8 = DSCP 46: the class ring.
    assert_eq!(run(&mut m, &v4_udp(1000, 51820)).backend_id, Some(2));
    // DSCP 0: the VIP's own ring.
    let f = eth(
        0x0800,
        None,
        &ipv4(CLIENT, VIP4, 17, 0, &udp(1001, 51820, b"x")),
    );
    assert_eq!(run(&mut m, &f).backend_id, Some(1));
    // vip_id × 64 + DSCP wraps in u32: vip 3 + 2^26 reads vip 3's entries (no overflow panic).
    m.vips.values_mut().for_each(|v| v.vip_id += 1 << 26);
    assert_eq!(run(&mut m, &v4_udp(1002, 51820)).backend_id, Some(2));
    // An index past CLASS_RINGS reads as 0: the VIP's own ring.
    m.vips.values_mut().for_each(|v| v.vip_id = 200);
    assert_eq!(run(&mut m, &v4_udp(1003, 51820)).backend_id, Some(1));
}

#[test]
fn flood_guard_skips_inserts_but_forwards() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    m.config.flood_max_inserts_per_sec = 2;
    let at = |t: u64| ModelCtx {
        ingress_ifindex: 2,
        now_ns: t,
    };
    let t0 = 100 * NS_PER_SEC;
    let mut ev = Vec::new();
    for p in 0..4u16 {
        let r = run_ingress(&mut m, &v4_udp(2000 + p, 51820), &at(t0 + u64::from(p)));
        assert_eq!(r.outcome, FWD_L2DSR_TX, "still forwarded by hash");
        ev.push(r.events);
    }
    assert_eq!(ev[1], vec![SESSION_MISS, SESSION_INSERT]);
    assert_eq!(ev[2], vec![SESSION_MISS, SESSION_FLOOD_SKIP]);
    assert_eq!(m.sessions.len(), 2);
    assert_eq!(
        m.flood,
        FloodState {
            window_start_ns: t0,
            inserts: 2
        }
    );
    // A new window one second later.
    let r = run_ingress(&mut m, &v4_udp(2010, 51820), &at(t0 + NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT]);
    assert_eq!(
        m.flood,
        FloodState {
            window_start_ns: t0 + NS_PER_SEC,
            inserts: 1
        }
    );
    assert_eq!(m.counters[SESSION_FLOOD_SKIP as usize], 2);
}

#[test]
fn failed_insert_still_forwards() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    m.env.fail_session_insert = true;
    let r = run(&mut m, &v4_udp(1000, 51820));
    assert_eq!(
        (r.outcome, r.events),
        (FWD_L2DSR_TX, vec![SESSION_MISS, SESSION_INSERT_FAILED])
    );
}

#[test]
fn picks_follow_the_ring_and_stats_add_up() {
    let mut dp = Dataplane::new(MemMaps::new());
    for i in 1..=5 {
        dp.upsert_backend(gw(i, &format!("10.1.0.{i}"), 0)).unwrap();
    }
    let mut v = vip4(51820, FWD_MODE_L2DSR, (1..=5).collect());
    v.ring_size = 251;
    dp.upsert_vip(v).unwrap();
    let ring = dp.installed_ring(1).unwrap().to_vec();
    let mut m = dp.into_writer();
    let mut bytes = 0;
    for p in 0..500u16 {
        let f = v4_udp(10_000 + p, 51820);
        bytes += f.len() as u64;
        let r = run(&mut m, &f);
        assert_eq!(r.backend_id, Some(ring[(r.hash.unwrap() % 251) as usize]));
    }
    assert_eq!(
        m.vip_stats[&3],
        PktBytes {
            packets: 500,
            bytes
        }
    );
    let per_backend: u64 = (1..=5).map(|i| m.backend_stats[&i].packets).sum();
    assert_eq!(per_backend, 500);
    assert!(
        (1..=5).all(|i| m.backend_stats[&i].packets > 50),
        "spread: {:?}",
        m.backend_stats
    );
    assert_eq!(outcome_sum(&m), 500);
    assert_eq!(m.counters[SESSION_MISS as usize], 500);
}

// ---- decap ----

#[test]
fn decap_reverses_encap() {
    let f = v4_udp(40000, 51820);
    let f6 = v6_udp(4500, 51820, Some(9));
    for (mode, gw_addr, want) in [
        (FWD_MODE_IPIP, "10.1.0.1", DECAP_IPIP),
        (FWD_MODE_IPIP, "2001:db8::21", DECAP_IPIP),
        (FWD_MODE_GUE, "10.1.0.1", DECAP_GUE),
        (FWD_MODE_GUE, "2001:db8::21", DECAP_GUE),
    ] {
        let mut m = setup(mode, gw_addr, 0);
        let mut v = vip4(51820, mode, vec![1]);
        v.key = VipKey::new(IpAddr::from(VIP6), 51820, PROTO_UDP);
        v.ring_id = 2;
        let mut dp = Dataplane::new(m.clone());
        dp.upsert_backend(gw(1, gw_addr, 0)).unwrap();
        dp.upsert_vip(v).unwrap();
        m = dp.into_writer();
        for input in [&f, &f6] {
            let enc = run(&mut m, input);
            assert!(counters::is_forward(enc.outcome));
            let dec = run_decap(&mut m, &enc.frame);
            assert_eq!(
                (dec.action, dec.outcome),
                (XDP_PASS, want),
                "{mode} {gw_addr}"
            );
            let mut expect = input.clone();
            expect[..6].copy_from_slice(&GW_MAC);
            expect[6..12].copy_from_slice(&LB_MAC);
            assert_eq!(
                dec.frame, expect,
                "{mode} {gw_addr}: decap gives the client packet back"
            );
        }
    }
}

#[test]
fn decap_passes_what_is_not_ours() {
    let mut m = MemMaps::new();
    m.config.decap_gue_port = 6080;
    let inner = ipv4(CLIENT, VIP4, 17, 0, &udp(1, 2, b"x"));
    let ipip = |tweak: &dyn Fn(&mut Vec<u8>)| {
        let mut o = ipv4([10, 9, 0, 1], [10, 1, 0, 1], 4, 0, &inner);
        tweak(&mut o);
        eth(0x0800, None, &o)
    };
    let cases: Vec<(&str, Vec<u8>, u32, u32)> = vec![
        ("arp", eth(0x0806, None, &[0; 28]), XDP_PASS, DECAP_PASS),
        ("short", vec![0; 10], XDP_PASS, DECAP_PASS),
        ("qinq", eth(0x88a8, None, &inner), XDP_PASS, DECAP_PASS),
        (
            "truncated outer",
            eth(0x0800, None, &inner[..19]),
            XDP_PASS,
            DECAP_PASS,
        ),
        ("ihl 6", ipip(&|o| o[0] = 0x46), XDP_PASS, DECAP_PASS),
        ("fragment", ipip(&|o| o[6] = 0x20), XDP_PASS, DECAP_PASS),
        ("offset", ipip(&|o| o[7] = 0x08), XDP_PASS, DECAP_PASS),
        ("plain udp", v4_udp(1, 2), XDP_PASS, DECAP_PASS),
        (
            "udp to 6080 but short",
            eth(
                0x0800,
                None,
                &ipv4([1; 4], [2; 4], 17, 0, &[0x17, 0x70, 0x17, 0xc0]),
            ),
            XDP_PASS,
            DECAP_PASS,
        ),
        (
            "gre",
            eth(0x0800, None, &ipv4([1; 4], [2; 4], 47, 0, &inner)),
            XDP_PASS,
            DECAP_PASS,
        ),
        (
            "v6 short",
            eth(0x86dd, None, &[0x60; 39]),
            XDP_PASS,
            DECAP_PASS,
        ),
        (
            "v6 version",
            {
                let mut o = ipv6(CLIENT6, VIP6, 4, 0, &inner);
                o[0] = 0x50;
                eth(0x86dd, None, &o)
            },
            XDP_PASS,
            DECAP_PASS,
        ),
        (
            "ipip carrying v6",
            ipip(&|o| o[9] = 41),
            XDP_PASS,
            DECAP_BAD_INNER,
        ),
        (
            "no inner byte",
            eth(0x0800, None, &ipv4([1; 4], [2; 4], 4, 0, &[])),
            XDP_PASS,
            DECAP_BAD_INNER,
        ),
        (
            "gue inner garbage",
            eth(
                0x0800,
                None,
                &ipv4([1; 4], [2; 4], 17, 0, &udp(5, 6080, &[0x10; 20])),
            ),
            XDP_PASS,
            DECAP_BAD_INNER,
        ),
        (
            "v6-in-v6",
            eth(
                0x86dd,
                Some(3),
                &ipv6(
                    CLIENT6,
                    VIP6,
                    41,
                    0,
                    &ipv6(CLIENT6, VIP6, 17, 0, &udp(1, 2, b"")),
                ),
            ),
            XDP_PASS,
            DECAP_IPIP,
        ),
    ];
    for (name, f, action, outcome) in cases {
        let r = run_decap(&mut m, &f);
        assert_eq!(
            (r.action, COUNTER_NAMES[r.outcome as usize]),
            (action, COUNTER_NAMES[outcome as usize]),
            "{name}"
        );
        if outcome != DECAP_IPIP {
            assert_eq!(r.frame, f, "{name}: untouched");
        }
    }
    // With GUE decap off (port 0), GUE is just UDP.
    m.config.decap_gue_port = 0;
    let gue = eth(
        0x0800,
        None,
        &ipv4([1; 4], [2; 4], 17, 0, &udp(5, 0, &inner)),
    );
    assert_eq!(run_decap(&mut m, &gue).outcome, DECAP_PASS);
    let sum: u64 = (DECAP_IPIP..=DECAP_ADJUST_FAILED)
        .map(|i| m.counters[i as usize])
        .sum();
    assert_eq!(sum, 17);
}

#[test]
fn verdict_names() {
    assert_eq!(verdict_name(XDP_TX), "XDP_TX");
    assert_eq!(verdict_name(XDP_REDIRECT), "XDP_REDIRECT");
    assert_eq!(verdict_name(XDP_ABORTED), "XDP_ABORTED");
    assert_eq!(verdict_name(9), "XDP_UNKNOWN");
}

#[test]
fn every_ingress_outcome_is_covered_by_these_tests() {
    // Guard: if a counter is added, this file must learn to reach it.
    assert_eq!(INGRESS_OUTCOMES[..28], (0..28).collect::<Vec<u32>>()[..]);
    assert_eq!(INGRESS_OUTCOMES[28], PASS_ICMP_BAD_QUOTE);
    assert_eq!(NUM_COUNTERS, 51);
}

#[test]
fn a_replicating_member_reports_new_sessions_and_nothing_else() {
    let mut m = setup(FWD_MODE_L2DSR, "10.1.0.1", 0);
    let ctx = |t| ModelCtx {
        ingress_ifindex: 2,
        now_ns: t,
    };
    let f = v4_udp(1000, 51820);
    // Off (a single host): no report.
    let r = run_ingress(&mut m, &f, &ctx(5 * NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT]);
    // On: a new session is reported; a hit is not.
    m.config.replicate = 1;
    let r = run_ingress(&mut m, &v4_udp(1001, 51820), &ctx(6 * NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT, REPL_EVENT]);
    let r = run_ingress(&mut m, &f, &ctx(7 * NS_PER_SEC));
    assert_eq!(r.events, vec![SESSION_HIT]);
    assert_eq!(m.counters[REPL_EVENT as usize], 1);
    assert_eq!(m.counters[REPL_EVENT_LOST as usize], 0);
}

#[test]
fn session_ids_are_learned_on_hits_and_followed_by_new_flows() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.set_config(cfg()).unwrap();
    dp.upsert_backend(gw(1, "10.1.0.1", 0)).unwrap();
    dp.upsert_backend(gw(2, "10.1.0.2", 0)).unwrap();
    let mut v = vip4(51820, FWD_MODE_L2DSR, vec![1, 2]);
    v.flags = VIP_F_IDS_WIREGUARD;
    dp.upsert_vip(v).unwrap();
    let m = dp.writer_mut();
    // WireGuard transport data: type 4, receiver index 0x01020304 (little-endian).
    let mut wg = vec![4, 0, 0, 0, 4, 3, 2, 1];
    wg.extend_from_slice(&[0x55; 24]);
    let frame = |sp: u16| {
        eth(
            0x0800,
            None,
            &ipv4(CLIENT, VIP4, 17, 0, &udp(sp, 51820, &wg)),
        )
    };
    let r = run(m, &frame(1000));
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT]);
    let home = r.backend_id.unwrap();
    let sid = IdKey::new(IpAddr::from(VIP4), ID_WIREGUARD, 0x0102_0304);
    assert_eq!(r.session_id, Some(sid));
    assert!(m.session_ids.is_empty(), "a new flow teaches nothing");
    let r = run(m, &frame(1000));
    assert_eq!(r.events, vec![SESSION_HIT, SESSION_ID_LEARNED]);
    assert_eq!(m.session_ids[&sid], home);
    assert_eq!(run(m, &frame(1000)).events, vec![SESSION_HIT]);
    // Every other source port keeps the gateway by id, whatever the ring says.
    for sp in 2000..2040 {
        let r = run(m, &frame(sp));
        assert_eq!(
            r.events,
            vec![SESSION_MISS, SESSION_ID_USED, SESSION_INSERT]
        );
        assert_eq!(r.backend_id, Some(home));
    }
    // The id's gateway goes down (and leaves the ring): rejected, the hash decides.
    dp.set_backend_state(home, BACKEND_DOWN).unwrap();
    let r = run(dp.writer_mut(), &frame(3000));
    assert_eq!(
        r.events,
        vec![SESSION_MISS, SESSION_ID_REJECTED, SESSION_INSERT]
    );
    assert_ne!(r.backend_id, Some(home));
}

#[test]
fn later_fragments_follow_the_first_until_the_record_expires() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.set_config(cfg()).unwrap();
    for id in 1..=3 {
        dp.upsert_backend(gw(id, &format!("10.1.0.{id}"), 0))
            .unwrap();
    }
    dp.upsert_vip(vip4(51820, FWD_MODE_L2DSR, vec![1, 2, 3]))
        .unwrap();
    let m = dp.writer_mut();
    // A 64-byte UDP datagram (id 0x99) in a 24-byte first fragment and two later ones.
    let dgram = udp(4000, 51820, &[7; 56]);
    let frag = |off: usize, len: usize, more: bool| {
        let mut p = ipv4(CLIENT, VIP4, 17, 0, &dgram[off..off + len]);
        p[4..6].copy_from_slice(&0x99u16.to_be_bytes());
        let ff = (off / 8) as u16 | if more { 0x2000 } else { 0 };
        p[6..8].copy_from_slice(&ff.to_be_bytes());
        let c = csum(&{
            let mut h = p[..20].to_vec();
            h[10..12].copy_from_slice(&[0, 0]);
            h
        });
        p[10..12].copy_from_slice(&c.to_be_bytes());
        eth(0x0800, None, &p)
    };
    let r = run(m, &frag(0, 24, true));
    assert_eq!(r.events, vec![SESSION_MISS, SESSION_INSERT, FRAG_RECORD]);
    let first = r.backend_id.unwrap();
    let r = run(m, &frag(24, 24, true));
    assert_eq!(
        (r.events.clone(), r.backend_id),
        (vec![FRAG_HIT], Some(first))
    );
    assert_eq!(r.flow.unwrap().ports, 0, "a later fragment has no ports");
    // Past FRAG_TIMEOUT_NS the record is not followed: the source-address hash decides.
    let late = ModelCtx {
        now_ns: CTX.now_ns + FRAG_TIMEOUT_NS + 1,
        ..CTX
    };
    let r = run_ingress(m, &frag(48, 16, false), &late);
    assert_eq!(r.events, vec![FRAG_MISS]);
    let k = r.flow.unwrap();
    assert_eq!(r.hash, Some(vpnlb_common::hash::hash_src(&k)));
    assert_eq!(r.action, XDP_TX);
    // No fragment VIP for the address: not for us.
    m.frag_vips.clear();
    assert_eq!(run(m, &frag(24, 24, true)).outcome, PASS_NOT_VIP);
}

#[test]
fn pmtu_messages_follow_the_quoted_flow() {
    let mut dp = Dataplane::new(MemMaps::new());
    dp.set_config(cfg()).unwrap();
    for id in 1..=3 {
        dp.upsert_backend(gw(id, &format!("10.1.0.{id}"), 0))
            .unwrap();
    }
    dp.upsert_vip(vip4(51820, FWD_MODE_L2DSR, vec![1, 2, 3]))
        .unwrap();
    let m = dp.writer_mut();
    // The client's flow gets a session.
    let r = run(
        m,
        &eth(
            0x0800,
            None,
            &ipv4(CLIENT, VIP4, 17, 0, &udp(4000, 51820, b"up")),
        ),
    );
    let (key, home) = (r.flow.unwrap(), r.backend_id.unwrap());
    // A router's "fragmentation needed" quoting the gateway's reply (VIP:51820 -> client:4000).
    let quoted = ipv4(VIP4, CLIENT, 17, 0, &udp(51820, 4000, &[9; 600]));
    let icmp = |q: &[u8]| {
        let mut i = vec![3, 4, 0, 0, 0, 0, 0x05, 0x00];
        i.extend_from_slice(q);
        eth(0x0800, None, &ipv4([192, 0, 2, 254], VIP4, 1, 0, &i))
    };
    let r = run(m, &icmp(&quoted[..64]));
    assert_eq!(
        (r.outcome, r.events.clone()),
        (FWD_L2DSR_TX, vec![ICMP_PMTU_SESSION])
    );
    assert_eq!((r.flow, r.backend_id), (Some(key), Some(home)));
    assert_eq!(m.sessions.len(), 1, "an ICMP message creates no session");
    // 20 + 3 bytes: the ports are cut off.
    assert_eq!(run(m, &icmp(&quoted[..23])).outcome, PASS_ICMP_BAD_QUOTE);
    // Another client's flow (no session): its hash pick.
    let other = ipv4(VIP4, [198, 51, 100, 9], 17, 0, &udp(51820, 4001, &[9; 60]));
    let r = run(m, &icmp(&other));
    assert_eq!(r.events, vec![ICMP_PMTU_HASH]);
    assert_eq!(
        r.hash,
        Some(vpnlb_common::hash::pick_hash(&r.flow.unwrap(), 0))
    );
}
