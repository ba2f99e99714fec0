//! vpnlb's XDP programs: `vpnlb_ingress` (the load balancer, stages parse → flow → vip → ids →
//! session → maglev → forward/encap; later IP fragments through frag, PMTU ICMP through icmp, which
//! only choose the target; docs/datapath.md) and `vpnlb_decap` (the gateway-side decapsulator).
#![no_std]
#![no_main]

mod bytes;
mod decap;
mod encap;
mod flow;
mod forward;
mod frag;
mod hdr;
mod icmp;
mod ids;
mod l2;
mod maglev;
mod maps;
mod parse;
mod session;
mod stats;
mod vip;

use aya_ebpf::{macros::xdp, programs::XdpContext};

use crate::stats::Stop;

/// Load balancer entry: every packet ends in exactly one outcome counter.
#[xdp]
pub fn vpnlb_ingress(ctx: XdpContext) -> u32 {
    try_ingress(&ctx).unwrap_or_else(Stop::finish)
}

/// Gateway entry: strips vpnlb's IPIP/GUE encapsulation.
#[xdp]
pub fn vpnlb_decap(ctx: XdpContext) -> u32 {
    decap::try_decap(&ctx).unwrap_or_else(Stop::finish)
}

/// The ingress pipeline. `Ok` is the verdict of a forwarded packet (its outcome already counted);
/// `Err` is a pass/drop outcome, counted by the caller.
#[inline(always)]
fn try_ingress(ctx: &XdpContext) -> Result<u32, Stop> {
    let pkt = parse::parse(ctx)?;
    // A side path decides where a packet goes; the one call to forward at the end decides how.
    let target = if pkt.frag == parse::FRAG_LATER {
        frag::later(&pkt)?
    } else {
        // A PMTU message goes where the flow it quotes goes: that flow's key, its session only read.
        let pmtu = pkt.proto == hdr::PROTO_ICMP || pkt.proto == hdr::PROTO_ICMPV6;
        let key = if pmtu {
            icmp::quoted_flow(ctx, &pkt)?
        } else {
            flow::flow_key(&pkt)
        };
        let vip = vip::lookup(&key)?;
        let sid = if pmtu {
            None
        } else {
            ids::session_id(ctx, &pkt, &key, vip)
        };
        let target = session::resolve(ctx, &key, vip, pkt.tos, sid.as_ref(), pmtu)?;
        if pkt.frag == parse::FRAG_FIRST {
            frag::record(&pkt, &key, &target);
        }
        target
    };
    forward::forward(ctx, &pkt, &target)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
