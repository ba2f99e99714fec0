//! `vpnlb simulate`: where would this packet go? Runs the reference model ([`crate::dataplane::model`]) on a
//! copy of the current maps ([`MemMaps::snapshot`]) for a flow given on the command line or for
//! every packet of a classic pcap file, and explains the verdict: session hit, Maglev pick (ring
//! slot), class ring, no backend, not a VIP, or the pass reason; with the agent's `status`, also
//! the pool serving the VIP. Nothing is written: packets of one run see the sessions earlier
//! packets of the same run would have created, in the copy only.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vpnlb_common::*;

use super::render::{self, Table};
use super::source::{Names, Source};
use crate::dataplane::maps::MemMaps;
use crate::dataplane::model::{self, ModelCtx, ModelResult};
use crate::dataplane::session_ids::{IdPrefix, format_id, kind_name};

/// A flow given on the command line.
#[derive(Clone, Debug)]
pub struct FlowSpec {
    /// `ADDR:PORT` (or `ADDR` for esp).
    pub src: String,
    pub dst: String,
    /// udp, tcp or esp.
    pub proto: String,
    pub spi: Option<u32>,
    pub dscp: u8,
    pub vlan: Option<u16>,
}

/// What to simulate.
#[derive(Clone, Debug)]
pub enum Input {
    Flow(FlowSpec),
    Pcap(PathBuf),
}

fn parse_endpoint(s: &str, what: &str, need_port: bool) -> Result<(IpAddr, u16)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), sa.port()));
    }
    if let Ok(ip) = s
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        if need_port {
            bail!("{what} {s:?}: udp and tcp need ADDR:PORT ([V6ADDR]:PORT for IPv6)");
        }
        return Ok((ip, 0));
    }
    bail!("{what} {s:?}: want ADDR:PORT ([V6ADDR]:PORT for IPv6; ADDR alone for esp)")
}

/// An SPI as `12345` or `0x1234abcd`.
pub fn parse_spi(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("bad SPI {s:?}: {e}"))
}

/// Builds the Ethernet frame the flow's first packet would be.
pub fn build_frame(f: &FlowSpec) -> Result<Vec<u8>> {
    let proto = match f.proto.to_ascii_lowercase().as_str() {
        "udp" => PROTO_UDP,
        "tcp" => PROTO_TCP,
        "esp" => PROTO_ESP,
        p => bail!("--proto {p:?}: want udp, tcp or esp"),
    };
    let esp = proto == PROTO_ESP;
    let (src, sport) = parse_endpoint(&f.src, "--src", !esp)?;
    let (dst, dport) = parse_endpoint(&f.dst, "--dst", !esp)?;
    if src.is_ipv4() != dst.is_ipv4() {
        bail!("--src and --dst must be of one address family");
    }
    if f.dscp > 63 {
        bail!("--dscp {}: want 0..63", f.dscp);
    }
    if esp && f.spi.is_none() {
        bail!("--proto esp needs --spi");
    }
    if f.spi == Some(0) {
        // Allowed: the data plane passes SPI 0 (pass_esp_bad_spi); simulate says so.
    }
    let l4: Vec<u8> = match proto {
        PROTO_UDP => {
            let mut b = Vec::with_capacity(24);
            b.extend_from_slice(&sport.to_be_bytes());
            b.extend_from_slice(&dport.to_be_bytes());
            b.extend_from_slice(&24u16.to_be_bytes());
            b.extend_from_slice(&[0, 0]);
            b.extend_from_slice(&[0u8; 16]);
            b
        }
        PROTO_TCP => {
            let mut b = vec![0u8; 20];
            b[0..2].copy_from_slice(&sport.to_be_bytes());
            b[2..4].copy_from_slice(&dport.to_be_bytes());
            b[4..8].copy_from_slice(&1u32.to_be_bytes());
            b[12] = 5 << 4;
            b[13] = 0x02; // SYN
            b[14..16].copy_from_slice(&64240u16.to_be_bytes());
            b
        }
        _ => {
            let mut b = Vec::with_capacity(24);
            b.extend_from_slice(&f.spi.unwrap_or(0).to_be_bytes());
            b.extend_from_slice(&1u32.to_be_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b
        }
    };
    let tos = f.dscp << 2;
    let mut frame = Vec::with_capacity(100);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x10]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    if let Some(vid) = f.vlan {
        if vid > 4095 {
            bail!("--vlan {vid}: want 0..4095");
        }
        frame.extend_from_slice(&0x8100u16.to_be_bytes());
        frame.extend_from_slice(&vid.to_be_bytes());
    }
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            frame.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut h = [0u8; 20];
            h[0] = 0x45;
            h[1] = tos;
            h[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
            h[6] = 0x40; // DF
            h[8] = 64;
            h[9] = proto;
            h[12..16].copy_from_slice(&s.octets());
            h[16..20].copy_from_slice(&d.octets());
            let c = model::ipv4_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            frame.extend_from_slice(&h);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            frame.extend_from_slice(&0x86DDu16.to_be_bytes());
            let mut h = [0u8; 40];
            h[0] = 0x60 | (tos >> 4);
            h[1] = (tos & 0x0f) << 4;
            h[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
            h[6] = proto;
            h[7] = 64;
            h[8..24].copy_from_slice(&s.octets());
            h[24..40].copy_from_slice(&d.octets());
            frame.extend_from_slice(&h);
        }
        _ => unreachable!("families checked above"),
    }
    frame.extend_from_slice(&l4);
    Ok(frame)
}

/// The frames of a classic pcap file (Ethernet link type; either byte order, µs or ns).
pub fn read_pcap(path: &Path) -> Result<Vec<Vec<u8>>> {
    let buf = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    parse_pcap(&buf).with_context(|| format!("parsing {}", path.display()))
}

pub fn parse_pcap(buf: &[u8]) -> Result<Vec<Vec<u8>>> {
    if buf.len() < 24 {
        bail!("shorter than a pcap global header");
    }
    let magic = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
    let little = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        0x0a0d_0d0a => bail!("pcapng is not supported: convert with `editcap -F pcap IN OUT`"),
        m => bail!("not a classic pcap file (magic {m:#010x})"),
    };
    let rd = |b: &[u8]| {
        let a: [u8; 4] = b.try_into().expect("4 bytes");
        if little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = rd(&buf[20..24]) & 0x0fff_ffff;
    if linktype != 1 {
        bail!("link type {linktype}: only Ethernet (1) captures can be simulated");
    }
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= buf.len() {
        let incl = rd(&buf[off + 8..off + 12]) as usize;
        off += 16;
        let Some(data) = buf.get(off..off + incl) else {
            bail!("record {} runs past the end of the file", out.len() + 1);
        };
        out.push(data.to_vec());
        off += incl;
    }
    Ok(out)
}

/// The pool serving a VIP (and class), from the agent's `status`.
#[derive(Clone, Debug, Default)]
struct PoolInfo {
    pool: Option<String>,
    /// The highest-priority pool of that order.
    first: Option<String>,
    /// Pool names that list the backend.
    backend_pools: Vec<String>,
}

fn pool_info(status: &Value, vip: &str, class: Option<&str>, backend: Option<&str>) -> PoolInfo {
    let Some(v) = status["vips"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == vip))
    else {
        return PoolInfo::default();
    };
    let pool = v["active_pools"].as_array().and_then(|a| {
        a.iter()
            .find(|p| p["class"].as_str() == class)
            .and_then(|p| p["pool"].as_str().map(str::to_string))
    });
    let first = match class {
        None => v["pools"][0]["name"].as_str().map(str::to_string),
        Some(c) => v["classes"].as_array().and_then(|a| {
            a.iter()
                .find(|x| x["name"] == c)
                .and_then(|x| x["pool_order"][0].as_str().map(str::to_string))
        }),
    };
    let backend_pools = match backend {
        Some(b) => v["pools"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| {
                        p["backends"]
                            .as_array()
                            .is_some_and(|m| m.iter().any(|x| x == b))
                    })
                    .filter_map(|p| p["name"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        None => Vec::new(),
    };
    PoolInfo {
        pool,
        first,
        backend_pools,
    }
}

fn flow_label(k: &FlowKey) -> String {
    let v6 = k.family == FAMILY_V6;
    let (sport, dport) = k.ports_host();
    let s = render::addr_str(k.src, k.family);
    let d = render::addr_str(k.dst, k.family);
    if k.proto == PROTO_ESP {
        format!("esp {s} -> {d} spi {:#010x}", u32::from_be(k.ports))
    } else {
        format!(
            "{} {} -> {}",
            render::proto_name(k.proto),
            render::sockaddr(&s, sport, v6),
            render::sockaddr(&d, dport, v6)
        )
    }
}

fn counter(id: u32) -> &'static str {
    COUNTER_NAMES.get(id as usize).copied().unwrap_or("?")
}

/// Explains one model run: (json, table row).
#[allow(clippy::too_many_arguments)]
fn explain(
    index: usize,
    before: &MemMaps,
    r: &ModelResult,
    frame: &[u8],
    names: &Names,
    status: Option<&Value>,
    status_err: Option<&str>,
) -> (Value, Vec<String>) {
    let flow = r.flow.map(|k| flow_label(&k));
    let meta = r.vip.and_then(|k| before.vips.get(&k).copied());
    let vip_name = meta.map(|m| names.vip(m.vip_id));
    let backend = r.backend_id.map(|id| names.backend(id));
    let events: Vec<&str> = r.events.iter().map(|e| counter(*e)).collect();
    let hit = r.events.contains(&SESSION_HIT);
    let sid = r
        .session_id
        .map(|k| format!("{} id {}", kind_name(k.kind), format_id(&k)));
    let mut ring_id = None;
    let mut slot = None;
    let mut class: Option<String> = None;
    let mut dscp = None;
    let (reason, mut why);
    if r.outcome == PASS_ICMP_BAD_QUOTE {
        reason = "pass";
        why = "ICMP packet-too-big whose quoted packet is too short or not from this address: \
               passed to the kernel"
            .to_string();
    } else if r.flow.is_none() {
        reason = "pass";
        why = format!("passed to the kernel untouched: {}", counter(r.outcome));
    } else if r.outcome == PASS_NOT_VIP {
        reason = "not_vip";
        why = "not a VIP: no VIPS entry for this destination, port and protocol; passed to the kernel"
            .to_string();
    } else if let Some(m) = meta {
        let mut pre = String::new();
        if r.events.contains(&SESSION_REPICK_DOWN) {
            let old = r
                .flow
                .and_then(|k| before.sessions.get(&k))
                .map(|s| names.backend(s.backend_id))
                .unwrap_or_default();
            pre = format!("session to {old} re-picked (backend down); ");
        } else if r.events.contains(&SESSION_REPICK_IDLE) {
            pre = "session re-picked (idle past the VIP's timeout); ".to_string();
        }
        let sid_owner = r.session_id.map(|k| {
            let full = IdPrefix::new(k.kind, k.id.to_le_bytes(), 64);
            match before.id_range_lookup(&full.data) {
                Some(id) => (id, "static range"),
                None => (before.session_ids.get(&k).copied().unwrap_or(0), "learned"),
            }
        });
        if r.events.contains(&SESSION_ID_REJECTED)
            && let Some((owner, how)) = sid_owner
        {
            pre.push_str(&format!(
                "{} ({how}) belongs to {} which is not up, so the hash decides; ",
                sid.clone().unwrap_or_default(),
                names.backend(owner)
            ));
        }
        if r.events.contains(&FRAG_MISS) {
            pre.push_str(
                "later fragment without a usable record of its first: source-address hash; ",
            );
        }
        if r.events.contains(&ICMP_PMTU_HASH) {
            pre.push_str("ICMP packet-too-big for a flow without a session: its hash; ");
        }
        if r.events.contains(&ICMP_PMTU_SESSION) {
            reason = "pmtu_session";
            why = format!(
                "ICMP packet-too-big quoting flow {}: sent to that flow's session on {}",
                flow.clone().unwrap_or_default(),
                backend.clone().unwrap_or_default()
            );
        } else if r.events.contains(&FRAG_HIT) {
            reason = "fragment";
            why = format!(
                "later fragment: follows its datagram's first fragment to {}",
                backend.clone().unwrap_or_default()
            );
        } else if hit {
            reason = "session_hit";
            why = format!(
                "session hit: existing session to {}",
                backend.clone().unwrap_or_default()
            );
            if r.events.contains(&SESSION_ID_LEARNED) {
                why.push_str(&format!(
                    "; learned {} -> {}",
                    sid.clone().unwrap_or_default(),
                    backend.clone().unwrap_or_default()
                ));
            }
        } else if r.events.contains(&SESSION_ID_USED) {
            reason = "session_id";
            why = format!(
                "{pre}{} is known ({}): kept on {} (new session)",
                sid.clone().unwrap_or_default(),
                sid_owner.map_or("learned", |(_, how)| how),
                backend.clone().unwrap_or_default()
            );
        } else if m.ring_size == 0 {
            reason = "no_backend";
            why = format!("{pre}no backend: the VIP has no ring yet (ring_size 0)");
        } else {
            // Same ring choice as the data plane (docs/datapath.md stage 4.2).
            let mut rid = m.ring_id;
            let tos = frame_tos(frame);
            if m.flags & VIP_F_CLASSES != 0 {
                let d = tos >> 2;
                dscp = Some(d);
                let idx = m
                    .vip_id
                    .wrapping_mul(DSCP_VALUES)
                    .wrapping_add(u32::from(d));
                if let Some(c) = before.class_rings.get(&idx).copied()
                    && c != 0
                {
                    rid = c - 1;
                    class = Some(
                        names
                            .rings
                            .get(&rid)
                            .and_then(|(_, c)| c.clone())
                            .unwrap_or_else(|| format!("ring{rid}")),
                    );
                }
            }
            let s = r.hash.unwrap_or(0) % m.ring_size;
            ring_id = Some(rid);
            slot = Some(s);
            let pick = match &class {
                Some(c) => format!(
                    "class ring {c} (dscp {}): ring {rid} slot {s}",
                    dscp.unwrap_or(0)
                ),
                None => format!("Maglev pick: ring {rid} slot {s}"),
            };
            match r.outcome {
                DROP_NO_BACKEND => {
                    reason = "no_backend";
                    why = format!("{pre}{pick} is empty: no backend (no member of the VIP is up)");
                }
                DROP_BACKEND_DOWN => {
                    reason = "backend_down";
                    why = format!(
                        "{pre}{pick} -> {} which is not up: dropped",
                        backend.clone().unwrap_or_default()
                    );
                }
                _ => {
                    reason = if class.is_some() {
                        "class_ring"
                    } else {
                        "maglev_pick"
                    };
                    why = format!("{pre}{pick} -> {}", backend.clone().unwrap_or_default());
                }
            }
        }
        if !is_forward(r.outcome) && !matches!(r.outcome, DROP_NO_BACKEND | DROP_BACKEND_DOWN) {
            why.push_str(&format!("; dropped: {}", counter(r.outcome)));
        }
    } else {
        reason = "pass";
        why = counter(r.outcome).to_string();
    }
    if r.events.contains(&SESSION_FLOOD_SKIP) {
        why.push_str(" (flood guard: no session recorded)");
    }
    let mut pool_json = Value::Null;
    let mut pool_cell = "-".to_string();
    if let Some(v) = &vip_name {
        match status {
            Some(st) => {
                let p = pool_info(st, v, class.as_deref(), backend.as_deref());
                let failover = match (&p.pool, &p.first) {
                    (Some(a), Some(f)) => a != f,
                    _ => false,
                };
                pool_cell = match &p.pool {
                    Some(a) if failover => format!("{a} (pool failover)"),
                    Some(a) => a.clone(),
                    None => "none serving".into(),
                };
                pool_json = json!({
                    "serving": p.pool,
                    "highest_priority": p.first,
                    "failover": failover,
                    "backend_pools": p.backend_pools,
                });
                if failover {
                    why.push_str(&format!(
                        "; pool failover: {} serves (not {})",
                        p.pool.clone().unwrap_or_default(),
                        p.first.clone().unwrap_or_default()
                    ));
                }
            }
            None => {
                pool_cell = "? (agent not answering)".into();
                pool_json = json!({ "unknown": status_err.unwrap_or("agent not answering") });
            }
        }
    }
    let j = json!({
        "packet": index,
        "flow": flow,
        "vip": vip_name,
        "vip_address": r.vip.map(|k| crate::dataplane::vip_label(&k)),
        "backend": backend,
        "backend_id": r.backend_id,
        "backend_address": r.backend_id.and_then(|id| before.backends.get(id as usize)).map(|b| render::addr_str(b.addr, b.family)),
        "verdict": model::verdict_name(r.action),
        "outcome": counter(r.outcome),
        "reason": reason,
        "why": why,
        "session_events": events,
        "session_id": r.session_id.map(|k| json!({"kind": kind_name(k.kind), "id": format_id(&k)})),
        "hash": r.hash,
        "ring_id": ring_id,
        "slot": slot,
        "class": class,
        "dscp": dscp,
        "pool": pool_json,
    });
    let row = vec![
        index.to_string(),
        flow.unwrap_or_else(|| format!("({} bytes)", frame.len())),
        vip_name.unwrap_or_else(|| "-".into()),
        j["backend"].as_str().unwrap_or("-").to_string(),
        model::verdict_name(r.action).to_string(),
        pool_cell,
        why,
    ];
    (j, row)
}

/// The DSCP/ECN byte of an IPv4/IPv6 frame (0 when it is neither).
fn frame_tos(f: &[u8]) -> u8 {
    let mut l2 = 14;
    if f.len() < 14 {
        return 0;
    }
    let mut et = u16::from_be_bytes([f[12], f[13]]);
    if et == 0x8100 && f.len() >= 18 {
        et = u16::from_be_bytes([f[16], f[17]]);
        l2 = 18;
    }
    match et {
        0x0800 if f.len() > l2 + 1 => f[l2 + 1],
        0x86DD if f.len() > l2 + 1 => ((f[l2] & 0x0f) << 4) | (f[l2 + 1] >> 4),
        _ => 0,
    }
}

/// Runs the simulation; prints a table or JSON lines.
pub fn run(src: &Source, input: &Input, ingress_ifindex: u32, as_json: bool) -> Result<()> {
    let frames = match input {
        Input::Flow(f) => vec![build_frame(f)?],
        Input::Pcap(p) => read_pcap(p)?,
    };
    let mut maps = MemMaps::snapshot(&src.maps).context("reading the maps")?;
    let (status, status_err) = match src.agent_status() {
        Ok(v) => (Some(v), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let now = render::now_coarse_ns();
    let mut t = Table::new(&["#", "FLOW", "VIP", "BACKEND", "VERDICT", "POOL", "WHY"]);
    let mut any_vip = false;
    for (i, frame) in frames.iter().enumerate() {
        let before = maps.clone();
        let r = model::run_ingress(
            &mut maps,
            frame,
            &ModelCtx {
                ingress_ifindex,
                now_ns: now,
            },
        );
        let (j, row) = explain(
            i + 1,
            &before,
            &r,
            frame,
            &src.names,
            status.as_ref(),
            status_err.as_deref(),
        );
        any_vip |= !j["vip"].is_null();
        if as_json {
            println!("{j}");
        } else {
            t.row(row);
        }
    }
    if !as_json {
        print!("{t}");
        if status.is_none()
            && any_vip
            && let Some(e) = status_err
        {
            println!("(pools unknown: {e})");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_parse_back_to_the_flow() {
        let f = FlowSpec {
            src: "198.51.100.7:40001".into(),
            dst: "203.0.113.10:51820".into(),
            proto: "udp".into(),
            spi: None,
            dscp: 46,
            vlan: Some(100),
        };
        let frame = build_frame(&f).unwrap();
        assert_eq!(frame_tos(&frame) >> 2, 46);
        let mut maps = MemMaps::new();
        let r = model::run_ingress(&mut maps, &frame, &ModelCtx::default());
        assert_eq!(r.outcome, PASS_NOT_VIP);
        let k = r.flow.unwrap();
        assert_eq!(k.ports_host(), (40001, 51820));
        let esp = FlowSpec {
            src: "2001:db8::7".into(),
            dst: "2001:db8::10".into(),
            proto: "esp".into(),
            spi: Some(0x1234),
            dscp: 10,
            vlan: None,
        };
        let frame = build_frame(&esp).unwrap();
        assert_eq!(frame_tos(&frame) >> 2, 10);
        let r = model::run_ingress(&mut maps, &frame, &ModelCtx::default());
        assert_eq!(r.outcome, PASS_NOT_VIP);
        assert_eq!(r.flow.unwrap().proto, PROTO_ESP);
        assert_eq!(parse_spi("0x10"), Ok(16));
        let mut pcap = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        pcap.extend_from_slice(&[0; 12]);
        pcap.extend_from_slice(&1u32.to_le_bytes());
        pcap.extend_from_slice(&[0; 8]);
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        pcap.extend_from_slice(&frame);
        assert_eq!(parse_pcap(&pcap).unwrap(), vec![frame]);
    }
}
