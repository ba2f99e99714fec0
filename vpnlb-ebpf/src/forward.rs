//! Stage 5: send the packet to its backend: L2 DSR (rewrite the MACs) or encapsulation (encap.rs),
//! then XDP_TX or a redirect through `TX_PORTS`, and the forwarded packet/byte statistics.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use vpnlb_common::{
    Backend, DROP_BACKEND_BAD, DROP_REDIRECT_FAILED, FWD_L2DSR_REDIRECT, FWD_L2DSR_TX,
    FWD_MODE_GUE, FWD_MODE_IPIP, FWD_MODE_L2DSR,
};

use crate::{
    encap, l2,
    maps::{BACKEND_STATS, TX_PORTS, VIP_STATS},
    parse::Packet,
    session::Target,
    stats::{Stop, add_pkt, count},
};

/// Rewrites (or encapsulates) the frame for target `t` the way its VIP says, picks the egress and
/// counts the outcome. The one place a packet is forwarded from: the main path and the side paths
/// (fragments, PMTU messages) only decide the target.
#[inline(always)]
pub fn forward(ctx: &XdpContext, pkt: &Packet, t: &Target) -> Result<u32, Stop> {
    let (vip, b) = (t.vip, t.backend);
    let outcome = match vip.fwd_mode {
        FWD_MODE_L2DSR => {
            // verifier: parse saw 14 bytes, but the range is not carried here; this never fails.
            l2::set_macs(ctx, b).ok_or(Stop(DROP_BACKEND_BAD))?;
            FWD_L2DSR_TX
        }
        FWD_MODE_IPIP | FWD_MODE_GUE => encap::encap(ctx, pkt, vip, b, t.hash)?,
        _ => return Err(Stop(DROP_BACKEND_BAD)),
    };
    let verdict = egress(ctx, b)?;
    let outcome = if outcome == FWD_L2DSR_TX && verdict == xdp_action::XDP_REDIRECT {
        FWD_L2DSR_REDIRECT
    } else {
        outcome
    };
    count(outcome);
    let bytes = u64::from(pkt.frame_len);
    add_pkt(&VIP_STATS, vip.vip_id, bytes);
    add_pkt(&BACKEND_STATS, t.id, bytes);
    Ok(verdict)
}

/// XDP_TX when the backend is reached through the ingress interface (or `ifindex` is 0), else a
/// redirect through `TX_PORTS`; a missing `TX_PORTS` entry drops the packet.
#[inline(always)]
fn egress(ctx: &XdpContext, b: &Backend) -> Result<u32, Stop> {
    let ifindex = b.ifindex;
    if ifindex == 0 || ifindex as usize == ctx.ingress_ifindex() {
        return Ok(xdp_action::XDP_TX);
    }
    TX_PORTS
        .redirect(ifindex, 0)
        .map_err(|_| Stop(DROP_REDIRECT_FAILED))
}
