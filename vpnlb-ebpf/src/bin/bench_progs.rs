//! Trivial XDP programs used as the floor in `cargo xtask bench`: they touch the packet as little as
//! a program can, so ratios to them show what vpnlb's own work costs.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Returns XDP_TX without reading the packet.
#[xdp]
pub fn vpnlb_floor_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
