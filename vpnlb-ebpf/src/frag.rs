//! IP fragments (docs/datapath.md, "Fragments"): the first fragment is balanced like any packet
//! and its choice is recorded per datagram in `FRAGS`; later fragments (no ports) follow that
//! record, or without one are hashed on their source address onto the ring of the address's
//! fragment VIP (`FRAG_VIPS`).

use aya_ebpf::{bindings::BPF_ANY, helpers::bpf_ktime_get_coarse_ns};
use vpnlb_common::{
    DROP_BACKEND_DOWN, FRAG_HIT, FRAG_MISS, FRAG_RECORD, FRAG_TIMEOUT_NS, FlowKey, FragKey,
    PASS_NOT_VIP, Session, VipKey, hash::hash_src,
};

use crate::{
    flow, maglev,
    maps::{FRAG_VIPS, FRAGS, VIPS},
    parse::Packet,
    session::{Target, usable},
    stats::{Stop, count},
};

/// The reassembly key of a fragment with flow key `key`.
#[inline(always)]
fn frag_key(pkt: &Packet, key: &FlowKey) -> FragKey {
    FragKey {
        src: key.src,
        dst: key.dst,
        id: pkt.frag_id,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// Records where the first fragment of a datagram went (`FRAG_RECORD` when stored).
#[inline(always)]
pub fn record(pkt: &Packet, key: &FlowKey, t: &Target) {
    let rec = Session {
        backend_id: t.id,
        hash: t.hash,
        last_seen_ns: t.now,
    };
    if FRAGS
        .insert(frag_key(pkt, key), rec, u64::from(BPF_ANY))
        .is_ok()
    {
        count(FRAG_RECORD);
    }
}

/// Where a later fragment goes: its VIP through `FRAG_VIPS`, its backend from the datagram's record
/// (fresh, backend usable: `FRAG_HIT`) or else the source-address hash (`FRAG_MISS`).
#[inline(always)]
pub fn later(pkt: &Packet) -> Result<Target, Stop> {
    let key = flow::flow_key(pkt);
    let portless = VipKey {
        addr: key.dst,
        port_be: 0,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: both maps are written only by the agent; a concurrent update may be read half old,
    // half new for this one packet, as every BPF map reader accepts.
    let vip_key = unsafe { FRAG_VIPS.get(portless) }.ok_or(Stop(PASS_NOT_VIP))?;
    let vip = unsafe { VIPS.get(vip_key) }.ok_or(Stop(PASS_NOT_VIP))?;
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions (kernel >= 5.11).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a value copied out at once; a concurrent overwrite gives one record or the other.
    let rec = unsafe { FRAGS.get(frag_key(pkt, &key)) }.copied();
    let followed = rec
        .filter(|r| now.wrapping_sub(r.last_seen_ns) <= FRAG_TIMEOUT_NS)
        .and_then(|r| usable(r.backend_id).map(|b| (r, b)));
    match followed {
        Some((r, backend)) => {
            count(FRAG_HIT);
            Ok(Target {
                vip,
                id: r.backend_id,
                backend,
                hash: r.hash,
                now,
            })
        }
        None => {
            count(FRAG_MISS);
            let hash = hash_src(&key);
            let id = maglev::pick(vip, hash, pkt.tos)?;
            let backend = usable(id).ok_or(Stop(DROP_BACKEND_DOWN))?;
            Ok(Target {
                vip,
                id,
                backend,
                hash,
                now,
            })
        }
    }
}
