//! The Ethernet rewrite every forwarded frame gets: the backend's MACs (forward.rs for L2 DSR,
//! encap.rs after the outer headers went in).

use vpnlb_common::Backend;

use aya_ebpf::programs::XdpContext;

use crate::{bytes::bytes_at, hdr::ETH_LEN};

/// Destination MAC = `b.mac`, source MAC = `b.src_mac`. `None` when the frame is shorter than an
/// Ethernet header, which never happens after parse (or after the head grew).
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, b: &Backend) -> Option<()> {
    // verifier: the MAC writes need a range proven from `data` itself.
    let eth = bytes_at(ctx, 0, ETH_LEN)?;
    // SAFETY: 14 bytes at `eth` are in the packet; `b` is a map value of 48 bytes.
    unsafe {
        core::ptr::copy_nonoverlapping(b.mac.as_ptr(), eth, 6);
        core::ptr::copy_nonoverlapping(b.src_mac.as_ptr(), eth.add(6), 6);
    }
    Some(())
}
