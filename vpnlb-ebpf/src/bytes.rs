//! Bounds-checked packet access every stage uses: a pointer to `len` bytes proven against the frame
//! end, the bounded [`View`] of a region a length field delimits (a UDP payload, an ICMP quote), and
//! unaligned wire-order loads and stores.

use core::ptr;

use aya_ebpf::programs::XdpContext;

/// A pointer to `len` bytes of the packet starting `off` bytes into it, or `None` if the frame is
/// shorter.
#[inline(always)]
pub fn bytes_at(ctx: &XdpContext, off: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data();
    let end = ctx.data_end();
    // verifier: every packet access must sit below a `ptr + len <= data_end` test on that pointer.
    if start + off + len > end {
        return None;
    }
    Some((start + off) as *mut u8)
}

/// Length of the received frame.
#[inline(always)]
pub fn frame_len(ctx: &XdpContext) -> u32 {
    (ctx.data_end() - ctx.data()) as u32
}

/// `len` bytes of the packet from `start` that a header's length field covers (a UDP payload, the
/// packet an ICMP message quotes). `len` never exceeds what the frame holds, but the verifier
/// cannot know that: every access tests both.
pub struct View {
    start: usize,
    end: usize,
    len: u32,
}

impl View {
    /// The view of `len` bytes at `start` in the packet of `ctx`.
    #[inline(always)]
    pub fn new(ctx: &XdpContext, start: *const u8, len: u32) -> View {
        View {
            start: start as usize,
            end: ctx.data_end(),
            len,
        }
    }

    /// The length the header gave.
    #[inline(always)]
    pub fn len(&self) -> u32 {
        self.len
    }

    /// A pointer to `n` bytes at view offset `off` (constants after inlining), if the view holds
    /// them (the frame then does too; the second test is for the verifier).
    #[inline(always)]
    pub fn at(&self, off: usize, n: usize) -> Option<*const u8> {
        if self.len < (off + n) as u32 || self.start + off + n > self.end {
            return None;
        }
        Some((self.start + off) as *const u8)
    }

    /// The little-endian u32 load of view bytes `off..off+4`.
    #[inline(always)]
    pub fn word(&self, off: usize) -> Option<u32> {
        // SAFETY: `at` proved the 4 bytes are in the packet.
        self.at(off, 4).map(|p| unsafe { load32(p) })
    }
}

/// Reads a u16 as stored on the wire (the value stays in network byte order).
///
/// # Safety
/// `p..p+2` must be inside the packet (checked against `data_end`).
#[inline(always)]
pub unsafe fn load16(p: *const u8) -> u16 {
    // SAFETY: the caller guarantees the bytes are in the packet; unaligned reads are allowed.
    unsafe { ptr::read_unaligned(p.cast::<u16>()) }
}

/// Reads a u32 as stored on the wire (the value stays in network byte order).
///
/// # Safety
/// `p..p+4` must be inside the packet (checked against `data_end`).
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    // SAFETY: the caller guarantees the bytes are in the packet; unaligned reads are allowed.
    unsafe { ptr::read_unaligned(p.cast::<u32>()) }
}

/// Writes a u16 that is already in network byte order.
///
/// # Safety
/// `p..p+2` must be inside the packet (checked against `data_end`).
#[inline(always)]
pub unsafe fn store16(p: *mut u8, v: u16) {
    // SAFETY: the caller guarantees the bytes are in the packet; unaligned writes are allowed.
    unsafe { ptr::write_unaligned(p.cast::<u16>(), v) }
}

/// Writes a u32 that is already in network byte order.
///
/// # Safety
/// `p..p+4` must be inside the packet (checked against `data_end`).
#[inline(always)]
pub unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: the caller guarantees the bytes are in the packet; unaligned writes are allowed.
    unsafe { ptr::write_unaligned(p.cast::<u32>(), v) }
}
