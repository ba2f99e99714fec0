//! Trivial XDP programs for benchmarks and test topologies: the floors of `cargo xtask bench` (they
//! touch the packet as little as a program can, so ratios to them show what vpnlb's own work costs)
//! and `vpnlb_pass`, attached to the peer of a veth so that native XDP_TX/redirect frames into it are
//! delivered (veth drops them otherwise, shared/TOOLCHAIN.md).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::DevMapHash,
    macros::{btf_map, xdp},
    programs::XdpContext,
};

/// Egress devices for `vpnlb_floor_redirect`, keyed by ifindex (same shape as vpnlb's TX_PORTS).
#[btf_map]
static TX_PORTS: DevMapHash<64> = DevMapHash::new();

/// Returns XDP_TX without reading the packet.
#[xdp]
pub fn vpnlb_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

/// Redirects every frame without reading it, through the `TX_PORTS` entry keyed by the ingress
/// ifindex (userspace stores `TX_PORTS[ingress ifindex] = egress device`). Missing entry: XDP_DROP.
#[xdp]
pub fn vpnlb_floor_redirect(ctx: XdpContext) -> u32 {
    TX_PORTS
        .redirect(ctx.ingress_ifindex() as u32, 0)
        .unwrap_or(xdp_action::XDP_DROP)
}

/// Passes every frame to the stack.
#[xdp]
pub fn vpnlb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
