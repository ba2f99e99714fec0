//! `vpnlb inspect vips|backends|sessions|ring|stats`: what the pinned maps hold, read-only (works
//! with the agent down). Every listing is a table or, with `--json`, one JSON document.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use vpnlb_common::{
    BACKEND_UP, COUNTER_NAMES, DSCP_VALUES, FlowKey, INGRESS_OUTCOMES, MAX_VIPS, PROTO_ESP,
    RING_SIZE_MAX, Session, VIP_F_CLASSES, VIP_F_HASH_SRC_ONLY, VipKey, VipMeta, addr_words,
};

use super::render::{self, Table};
use super::source::{Names, Source};
use crate::dataplane::maps::MapReader;

/// Which VIPs a `--vip` filter selects: a name from ids.json, an id (`#3` or `3`), an address, or
/// `address:port`.
#[derive(Clone, Debug)]
pub enum VipFilter {
    Id(u32),
    Addr(IpAddr, Option<u16>),
}

impl VipFilter {
    pub fn parse(s: &str, names: &Names) -> Result<VipFilter> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(VipFilter::Addr(ip, None));
        }
        if let Ok(sa) = s.parse::<SocketAddr>() {
            return Ok(VipFilter::Addr(sa.ip(), Some(sa.port())));
        }
        match names.vip_id(s) {
            Some(id) => Ok(VipFilter::Id(id)),
            None => bail!(
                "unknown vip {s:?}: give a name from the agent's ids.json, an id, an address or address:port"
            ),
        }
    }

    pub fn matches(&self, key: &VipKey, meta: Option<&VipMeta>) -> bool {
        match self {
            VipFilter::Id(id) => meta.is_some_and(|m| m.vip_id == *id),
            VipFilter::Addr(ip, port) => {
                let (w, fam) = addr_words(*ip);
                key.addr == w && key.family == fam && port.is_none_or(|p| key.port() == p)
            }
        }
    }
}

/// A `--client` filter: an address, or `address:port`.
#[derive(Clone, Debug)]
pub struct ClientFilter {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl ClientFilter {
    pub fn parse(s: &str) -> Result<ClientFilter> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(ClientFilter { ip, port: None });
        }
        let sa: SocketAddr = s
            .parse()
            .with_context(|| format!("--client {s:?}: want an address or address:port"))?;
        Ok(ClientFilter {
            ip: sa.ip(),
            port: Some(sa.port()),
        })
    }

    fn matches(&self, k: &FlowKey) -> bool {
        let (w, fam) = addr_words(self.ip);
        k.src == w
            && k.family == fam
            && self
                .port
                .is_none_or(|p| k.proto != PROTO_ESP && k.ports_host().0 == p)
    }
}

fn vip_flags(flags: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    if flags & VIP_F_HASH_SRC_ONLY != 0 {
        v.push("hash_src_only");
    }
    if flags & VIP_F_CLASSES != 0 {
        v.push("classes");
    }
    v
}

/// `udp 203.0.113.10:51820` / `esp 203.0.113.10`.
pub fn vip_label(key: &VipKey) -> String {
    crate::dataplane::vip_label(key)
}

fn sorted_vips(src: &Source) -> Result<Vec<(VipKey, VipMeta)>> {
    let mut v = src.maps.vips().context("reading VIPS")?;
    v.sort_by_key(|(k, m)| (m.vip_id, k.proto, k.port(), k.addr));
    Ok(v)
}

/// `inspect vips`.
pub fn vips(src: &Source) -> Result<(Value, String)> {
    let mut out = Vec::new();
    let mut t = Table::new(&[
        "VIP", "ID", "ADDRESS", "FWD", "RING", "SIZE", "FLAGS", "IDLE", "PACKETS", "BYTES",
    ]);
    for (k, m) in sorted_vips(src)? {
        let st = if m.vip_id < MAX_VIPS {
            src.maps.vip_stats(m.vip_id).unwrap_or_default()
        } else {
            Default::default()
        };
        let name = src.names.vip(m.vip_id);
        out.push(json!({
            "name": name,
            "vip_id": m.vip_id,
            "address": render::addr_str(k.addr, k.family),
            "port": k.port(),
            "protocol": render::proto_name(k.proto),
            "label": vip_label(&k),
            "forwarding": render::fwd_name(m.fwd_mode),
            "ring_id": m.ring_id,
            "ring_size": m.ring_size,
            "flags": vip_flags(m.flags),
            "mtu": m.mtu,
            "idle_timeout_s": m.idle_timeout_ns as f64 / 1e9,
            "gue_port": m.gue_port,
            "packets": st.packets,
            "bytes": st.bytes,
        }));
        t.row(vec![
            name,
            m.vip_id.to_string(),
            vip_label(&k),
            render::fwd_name(m.fwd_mode),
            m.ring_id.to_string(),
            m.ring_size.to_string(),
            vip_flags(m.flags).join(","),
            if m.idle_timeout_ns == 0 {
                "-".into()
            } else {
                format!("{}s", m.idle_timeout_ns / 1_000_000_000)
            },
            render::human(st.packets),
            render::human(st.bytes),
        ]);
    }
    Ok((Value::Array(out), t.render()))
}

/// `inspect backends`.
pub fn backends(src: &Source) -> Result<(Value, String)> {
    let mut out = Vec::new();
    let mut t = Table::new(&[
        "BACKEND", "ID", "ADDRESS", "STATE", "WEIGHT", "MAC", "IFINDEX", "PACKETS", "BYTES",
    ]);
    for (id, b) in src.maps.backends().context("reading BACKENDS")? {
        let st = src.maps.backend_stats(id).unwrap_or_default();
        let name = src.names.backend(id);
        out.push(json!({
            "name": name,
            "id": id,
            "address": render::addr_str(b.addr, b.family),
            "state": render::state_name(b.state),
            "weight": b.weight,
            "mac": render::mac(&b.mac),
            "src_mac": render::mac(&b.src_mac),
            "ifindex": b.ifindex,
            "packets": st.packets,
            "bytes": st.bytes,
        }));
        t.row(vec![
            name,
            id.to_string(),
            render::addr_str(b.addr, b.family),
            render::state_name(b.state).into(),
            b.weight.to_string(),
            render::mac(&b.mac),
            b.ifindex.to_string(),
            render::human(st.packets),
            render::human(st.bytes),
        ]);
    }
    Ok((Value::Array(out), t.render()))
}

/// Filters of `inspect sessions`.
#[derive(Clone, Debug, Default)]
pub struct SessionQuery {
    pub vip: Option<String>,
    pub backend: Option<String>,
    pub client: Option<String>,
    pub limit: Option<usize>,
    pub count_by_backend: bool,
}

fn session_json(
    k: &FlowKey,
    s: &Session,
    vips: &HashMap<VipKey, VipMeta>,
    names: &Names,
    now: u64,
) -> Value {
    let vk = k.vip_key();
    let vip = vips.get(&vk).map(|m| names.vip(m.vip_id));
    let (sport, dport) = k.ports_host();
    let esp = k.proto == PROTO_ESP;
    json!({
        "client": render::addr_str(k.src, k.family),
        "client_port": if esp { Value::Null } else { sport.into() },
        "vip_address": render::addr_str(k.dst, k.family),
        "vip_port": if esp { Value::Null } else { dport.into() },
        "protocol": render::proto_name(k.proto),
        "spi": if esp { format!("{:#010x}", u32::from_be(k.ports)).into() } else { Value::Null },
        "vip": vip,
        "backend_id": s.backend_id,
        "backend": names.backend(s.backend_id),
        "hash": s.hash,
        "last_seen_ns": s.last_seen_ns,
        "idle_s": now.saturating_sub(s.last_seen_ns) as f64 / 1e9,
    })
}

/// `inspect sessions`.
pub fn sessions(src: &Source, q: &SessionQuery) -> Result<(Value, String)> {
    let vip_f = q
        .vip
        .as_deref()
        .map(|v| VipFilter::parse(v, &src.names))
        .transpose()?;
    let backend_f = match q.backend.as_deref() {
        Some(b) => Some(
            src.names
                .backend_id(b)
                .with_context(|| format!("unknown backend {b:?}: give a name or an id"))?,
        ),
        None => None,
    };
    let client_f = q.client.as_deref().map(ClientFilter::parse).transpose()?;
    let vips: HashMap<VipKey, VipMeta> = src
        .maps
        .vips()
        .context("reading VIPS")?
        .into_iter()
        .collect();
    let mut all = src.maps.sessions().context("reading SESSIONS")?;
    all.retain(|(k, s)| {
        let vk = k.vip_key();
        vip_f.as_ref().is_none_or(|f| f.matches(&vk, vips.get(&vk)))
            && backend_f.is_none_or(|b| s.backend_id == b)
            && client_f.as_ref().is_none_or(|c| c.matches(k))
    });
    let total = all.len();
    let now = render::now_coarse_ns();
    if q.count_by_backend {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for (_, s) in &all {
            *counts.entry(s.backend_id).or_default() += 1;
        }
        let mut t = Table::new(&["BACKEND", "ID", "SESSIONS", "SHARE"]);
        let mut rows = Vec::new();
        for (id, n) in &counts {
            let share = *n as f64 / total.max(1) as f64;
            rows.push(json!({
                "backend_id": id,
                "backend": src.names.backend(*id),
                "sessions": n,
                "share": share,
            }));
            t.row(vec![
                src.names.backend(*id),
                id.to_string(),
                n.to_string(),
                render::pct(share),
            ]);
        }
        let text = format!("{}{total} sessions\n", t.render());
        return Ok((json!({ "total": total, "by_backend": rows }), text));
    }
    // Most recently seen first.
    all.sort_by_key(|(k, s)| (std::cmp::Reverse(s.last_seen_ns), k.src, k.ports));
    let shown: Vec<_> = all.iter().take(q.limit.unwrap_or(usize::MAX)).collect();
    let mut t = Table::new(&["CLIENT", "VIP", "PROTO", "BACKEND", "IDLE", "HASH"]);
    let mut rows = Vec::new();
    for (k, s) in &shown {
        let j = session_json(k, s, &vips, &src.names, now);
        let v6 = k.family != vpnlb_common::FAMILY_V4;
        let (sport, dport) = k.ports_host();
        let (client, vip) = if k.proto == PROTO_ESP {
            (
                render::addr_str(k.src, k.family),
                format!(
                    "{} spi {}",
                    render::addr_str(k.dst, k.family),
                    j["spi"].as_str().unwrap_or("")
                ),
            )
        } else {
            (
                render::sockaddr(&render::addr_str(k.src, k.family), sport, v6),
                render::sockaddr(&render::addr_str(k.dst, k.family), dport, v6),
            )
        };
        let vip = match j["vip"].as_str() {
            Some(n) => format!("{n} ({vip})"),
            None => vip,
        };
        t.row(vec![
            client,
            vip,
            render::proto_name(k.proto),
            src.names.backend(s.backend_id),
            format!("{:.1}s", j["idle_s"].as_f64().unwrap_or(0.0)),
            format!("{:#010x}", s.hash),
        ]);
        rows.push(j);
    }
    let text = format!("{}{} of {total} sessions shown\n", t.render(), shown.len());
    Ok((
        json!({ "total": total, "shown": shown.len(), "sessions": rows }),
        text,
    ))
}

/// `inspect session-ids`: learned ids (`SESSION_IDS`) and static ranges (`ID_RANGES`), optionally
/// of one backend.
pub fn session_ids(src: &Source, backend: Option<&str>) -> Result<(Value, String)> {
    use crate::dataplane::session_ids::{format_id, kind_name};
    let backend_f = match backend {
        Some(b) => Some(
            src.names
                .backend_id(b)
                .with_context(|| format!("unknown backend {b:?}: give a name or an id"))?,
        ),
        None => None,
    };
    let mut ids = src.maps.session_ids().context("reading SESSION_IDS")?;
    ids.retain(|(_, b)| backend_f.is_none_or(|f| *b == f));
    ids.sort_by_key(|(k, b)| (*b, k.kind, k.addr, k.id));
    let mut t = Table::new(&["VIP ADDRESS", "KIND", "ID", "BACKEND"]);
    let mut rows = Vec::new();
    for (k, b) in &ids {
        let vip = render::addr_str(k.addr, k.family);
        let (kind, id) = (kind_name(k.kind), format_id(k));
        t.row(vec![
            vip.clone(),
            kind.into(),
            id.clone(),
            src.names.backend(*b),
        ]);
        rows.push(json!({
            "vip_address": vip, "kind": kind, "id": id,
            "backend_id": b, "backend": src.names.backend(*b),
        }));
    }
    let mut ranges = src.maps.id_ranges().context("reading ID_RANGES")?;
    ranges.retain(|(_, b)| backend_f.is_none_or(|f| *b == f));
    ranges.sort();
    let range_rows: Vec<Value> = ranges
        .iter()
        .map(|(p, b)| {
            let bits = p
                .prefix_len
                .saturating_sub(vpnlb_common::ID_RANGE_KIND_BITS);
            json!({
                "kind": kind_name(p.data.kind),
                "prefix": format!("{}/{bits}", hex_bytes(&p.data.id)),
                "backend_id": b, "backend": src.names.backend(*b),
            })
        })
        .collect();
    let text = format!(
        "{}{} learned ids, {} static range prefixes\n",
        t.render(),
        ids.len(),
        ranges.len()
    );
    Ok((json!({ "learned": rows, "ranges": range_rows }), text))
}

fn hex_bytes(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One ring (a VIP's own or one of its classes') and who owns its slots.
fn ring_json(
    src: &Source,
    ring_id: u32,
    size: u32,
    class: Option<(&str, &[u8])>,
    key: &VipKey,
    m: &VipMeta,
    t: &mut Table,
) -> Result<Value> {
    let slots = if size == 0 || ring_id >= src.maps.ring_rows()? {
        Vec::new()
    } else {
        src.maps
            .ring(ring_id, size.min(RING_SIZE_MAX))
            .with_context(|| format!("reading ring {ring_id}"))?
    };
    let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
    for s in &slots {
        *counts.entry(*s).or_default() += 1;
    }
    let empty = counts.remove(&0).unwrap_or(0);
    let backends: BTreeMap<u32, vpnlb_common::Backend> = counts
        .keys()
        .map(|id| Ok((*id, src.maps.backend(*id)?)))
        .collect::<Result<_>>()?;
    let total_weight: u64 = backends.values().map(|b| u64::from(b.weight)).sum();
    let vip_name = src.names.vip(m.vip_id);
    let class_name = class.map(|(c, _)| c.to_string());
    let mut rows = Vec::new();
    for (id, n) in &counts {
        let b = backends[id];
        let share = f64::from(*n) / f64::from(size.max(1));
        let wshare = if total_weight == 0 {
            0.0
        } else {
            f64::from(b.weight) / total_weight as f64
        };
        rows.push(json!({
            "backend_id": id,
            "backend": src.names.backend(*id),
            "state": render::state_name(b.state),
            "slots": n,
            "share": share,
            "weight": b.weight,
            "weight_share": wshare,
            "deviation": share - wshare,
        }));
        t.row(vec![
            vip_name.clone(),
            class_name.clone().unwrap_or_else(|| "-".into()),
            ring_id.to_string(),
            src.names.backend(*id),
            render::state_name(b.state).into(),
            n.to_string(),
            render::pct(share),
            b.weight.to_string(),
            render::pct(wshare),
        ]);
    }
    if counts.is_empty() {
        t.row(vec![
            vip_name.clone(),
            class_name.clone().unwrap_or_else(|| "-".into()),
            ring_id.to_string(),
            "(none)".into(),
            "-".into(),
            "0".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ]);
    }
    Ok(json!({
        "vip": vip_name,
        "vip_id": m.vip_id,
        "label": vip_label(key),
        "class": class_name,
        "dscp": class.map(|(_, d)| d.to_vec()),
        "ring_id": ring_id,
        "ring_size": size,
        "empty_slots": empty,
        "up_backends": backends.values().filter(|b| b.state == BACKEND_UP).count(),
        "backends": rows,
    }))
}

/// `inspect ring`: slots per backend of every VIP ring (and class ring), share vs weight share.
pub fn ring(src: &Source, vip: Option<&str>) -> Result<(Value, String)> {
    let vip_f = vip.map(|v| VipFilter::parse(v, &src.names)).transpose()?;
    let mut t = Table::new(&[
        "VIP",
        "CLASS",
        "RING",
        "BACKEND",
        "STATE",
        "SLOTS",
        "SHARE",
        "WEIGHT",
        "WEIGHT_SHARE",
    ]);
    let mut out = Vec::new();
    let mut seen_rings = BTreeSet::new();
    for (k, m) in sorted_vips(src)? {
        if vip_f.as_ref().is_some_and(|f| !f.matches(&k, Some(&m))) {
            continue;
        }
        // VIP keys sharing a ring (IKE 500/4500 + ESP) are listed once per VIP id and ring.
        if !seen_rings.insert((m.vip_id, m.ring_id)) {
            continue;
        }
        out.push(ring_json(
            src,
            m.ring_id,
            m.ring_size,
            None,
            &k,
            &m,
            &mut t,
        )?);
        if m.flags & VIP_F_CLASSES != 0 && m.vip_id < MAX_VIPS {
            let mut classes: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
            for d in 0..DSCP_VALUES as u8 {
                let r = src.maps.class_ring(m.vip_id, d)?;
                if r != 0 {
                    classes.entry(r - 1).or_default().push(d);
                }
            }
            for (ring_id, dscp) in classes {
                let cname = src
                    .names
                    .rings
                    .get(&ring_id)
                    .and_then(|(_, c)| c.clone())
                    .unwrap_or_else(|| format!("ring{ring_id}"));
                out.push(ring_json(
                    src,
                    ring_id,
                    m.ring_size,
                    Some((&cname, &dscp)),
                    &k,
                    &m,
                    &mut t,
                )?);
            }
        }
    }
    Ok((Value::Array(out), t.render()))
}

/// `inspect stats`: per VIP and backend packets/bytes, and every data-plane counter.
pub fn stats(src: &Source) -> Result<(Value, String)> {
    let counters = src.maps.counters().context("reading STATS")?;
    let mut text = String::new();
    let mut vt = Table::new(&["VIP", "ID", "ADDRESS", "PACKETS", "BYTES"]);
    let mut vips = Vec::new();
    let mut seen = BTreeSet::new();
    for (k, m) in sorted_vips(src)? {
        if m.vip_id >= MAX_VIPS || !seen.insert(m.vip_id) {
            continue;
        }
        let st = src.maps.vip_stats(m.vip_id)?;
        vips.push(json!({
            "name": src.names.vip(m.vip_id),
            "vip_id": m.vip_id,
            "label": vip_label(&k),
            "packets": st.packets,
            "bytes": st.bytes,
        }));
        vt.row(vec![
            src.names.vip(m.vip_id),
            m.vip_id.to_string(),
            vip_label(&k),
            st.packets.to_string(),
            st.bytes.to_string(),
        ]);
    }
    let mut bt = Table::new(&["BACKEND", "ID", "STATE", "PACKETS", "BYTES"]);
    let mut backends = Vec::new();
    for (id, b) in src.maps.backends()? {
        let st = src.maps.backend_stats(id)?;
        backends.push(json!({
            "name": src.names.backend(id),
            "id": id,
            "state": render::state_name(b.state),
            "packets": st.packets,
            "bytes": st.bytes,
        }));
        bt.row(vec![
            src.names.backend(id),
            id.to_string(),
            render::state_name(b.state).into(),
            st.packets.to_string(),
            st.bytes.to_string(),
        ]);
    }
    let mut ct = Table::new(&["COUNTER", "KIND", "VALUE"]);
    let mut cmap = serde_json::Map::new();
    for (i, name) in COUNTER_NAMES.iter().enumerate() {
        let v = counters.get(i).copied().unwrap_or(0);
        cmap.insert(name.to_string(), v.into());
        let kind = name.split('_').next().unwrap_or("");
        ct.row(vec![name.to_string(), kind.to_string(), v.to_string()]);
    }
    let processed: u64 = INGRESS_OUTCOMES
        .iter()
        .map(|i| counters.get(*i as usize).copied().unwrap_or(0))
        .sum();
    text.push_str(&vt.render());
    text.push('\n');
    text.push_str(&bt.render());
    text.push('\n');
    text.push_str(&ct.render());
    text.push_str(&format!("{processed} packets processed by vpnlb_ingress\n"));
    Ok((
        json!({
            "vips": vips,
            "backends": backends,
            "counters": cmap,
            "ingress_packets": processed,
        }),
        text,
    ))
}
