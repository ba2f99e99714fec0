//! The Ethernet rewrite every forwarded frame gets: the backend's MACs (forward.rs for L2 DSR,
//! encap.rs after the outer headers went in).

use core::mem::offset_of;

use aya_ebpf::programs::XdpContext;
use vpnlb_common::Backend;

use crate::{
    bytes::{bytes_at, load32, store32},
    hdr::ETH_LEN,
};

// The two MACs sit back to back in a backend, in the Ethernet header's order, from a 4-aligned
// offset: three word copies write both.
const MACS: usize = offset_of!(Backend, mac);
const _: () = assert!(offset_of!(Backend, src_mac) == MACS + 6 && MACS.is_multiple_of(4));

/// Destination MAC = `b.mac`, source MAC = `b.src_mac`. `None` when the frame is shorter than an
/// Ethernet header, which never happens after parse (or after the head grew).
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, b: &Backend) -> Option<()> {
    // verifier: the MAC writes need a range proven from `data` itself.
    let eth = bytes_at(ctx, 0, ETH_LEN)?;
    // Word copies: a copy of the `[u8; 6]` arrays compiles to twelve byte loads and stores.
    let macs = (b as *const Backend).cast::<u8>().wrapping_add(MACS);
    // SAFETY: 14 bytes at `eth` are in the packet; `macs..macs + 12` is inside the 48-byte `b`.
    unsafe {
        store32(eth, load32(macs));
        store32(eth.add(4), load32(macs.add(4)));
        store32(eth.add(8), load32(macs.add(8)));
    }
    Some(())
}
