//! An XDP live-frames traffic generator (`BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES`).
//!
//! A tiny XDP program, assembled here and loaded with a raw `bpf(2)` call (the eBPF crate is not
//! involved), rewrites the Ethernet/IPv4/UDP headers of every frame from the template (the kernel
//! recycles pages with what receivers wrote into them: rewritten MACs, a DNAT'd address, a lower
//! TTL), sets the UDP source port to `base + (random & mask)` and returns XDP_TX. In live-frames mode the kernel turns XDP_TX into a real transmission out of
//! `ingress_ifindex`, so every call of [`LiveGen::send`] puts `count` frames on that interface (a
//! veth: the peer must have an XDP program or GRO on, or the frames are dropped). Run it on a thread
//! inside the sender's namespace (the ifindex is resolved there) and pin that thread: all of the
//! generator's work happens on the calling CPU.
//!
//! The template frame must be Ethernet + IPv4 without options + UDP, with a zero UDP checksum
//! (the program changes the port and does not fix checksums; IPv4 allows "no checksum").

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;
/// The kernel's limit on `batch_size` (TEST_XDP_MAX_BATCH).
pub const MAX_BATCH: u32 = 256;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

/// `struct xdp_md` as BPF_PROG_TEST_RUN takes it in `ctx_in`.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = dst | (src << 4);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// Offset of the UDP source port in an untagged Ethernet + 20-byte IPv4 frame.
const SPORT_OFF: i16 = 14 + 20;
/// Ethernet + IPv4 (no options) + UDP headers: what the generator rewrites in every frame.
pub const HEADERS_LEN: usize = 14 + 20 + 8;

/// The generator program: restore the headers from `template`, sport = htons(base + (prandom &
/// mask)), return XDP_TX. Pages are recycled with whatever the receivers wrote into them (MACs,
/// a DNAT'd address, TTL), so every frame is rewritten from the template.
fn program(template: &[u8], base_port: u16, mask: u16) -> Vec<[u8; 8]> {
    let h = &template[..HEADERS_LEN];
    let mut p = vec![
        insn(0xbf, 6, 1, 0, 0),                  // r6 = r1 (ctx)
        insn(0x85, 0, 0, 0, 7),                  // call bpf_get_prandom_u32
        insn(0x61, 2, 6, 0, 0),                  // r2 = ctx->data
        insn(0x61, 3, 6, 4, 0),                  // r3 = ctx->data_end
        insn(0xbf, 4, 2, 0, 0),                  // r4 = r2
        insn(0x07, 4, 0, 0, HEADERS_LEN as i32), // r4 += 42
        insn(0x2d, 4, 3, 0, 0),                  // if r4 > r3 goto ret (offset patched)
    ];
    let jump = p.len() - 1;
    for off in (0..40).step_by(4) {
        let w = i32::from_le_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]]);
        p.push(insn(0x62, 2, 0, off as i16, w)); // *(u32 *)(r2 + off) = w
    }
    let last = i16::from_le_bytes([h[40], h[41]]) as i32;
    p.push(insn(0x6a, 2, 0, 40, last)); // *(u16 *)(r2 + 40) = last
    p.extend([
        insn(0x57, 0, 0, 0, mask as i32),      // r0 &= mask
        insn(0x07, 0, 0, 0, base_port as i32), // r0 += base
        insn(0xdc, 0, 0, 0, 16),               // r0 = htobe16(r0)
        insn(0x6b, 2, 0, SPORT_OFF, 0),        // *(u16 *)(r2 + 34) = r0
    ]);
    let ret = p.len();
    p[jump] = insn(0x2d, 4, 3, (ret - jump - 1) as i16, 0);
    p.extend([
        insn(0xb7, 0, 0, 0, 3), // ret: r0 = XDP_TX
        insn(0x95, 0, 0, 0, 0), // exit
    ]);
    p
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised bpf_attr prefix of size_of::<T>() bytes whose pointers
    // (set by the callers) outlive the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The loaded generator program.
pub struct LiveGen {
    fd: OwnedFd,
}

impl LiveGen {
    /// Loads the program for frames like `template` (the one later passed to [`LiveGen::send`]);
    /// flows get source ports `base_port ..= base_port + mask` (`mask` = 2^k - 1).
    pub fn load(template: &[u8], base_port: u16, mask: u16) -> io::Result<LiveGen> {
        assert!(
            template.len() >= HEADERS_LEN
                && template[12..14] == [0x08, 0x00]
                && template[14] == 0x45
                && template[23] == 17,
            "template: Ethernet + IPv4 without options + UDP"
        );
        assert!(
            mask.checked_add(1).is_none_or(|m| m.is_power_of_two()),
            "mask must be 2^k - 1"
        );
        assert!(
            (base_port as u32) + (mask as u32) <= 0xffff && base_port > 0,
            "ports out of range"
        );
        let insns: Vec<u8> = program(template, base_port, mask).concat();
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut name = [0u8; 16];
        name[..11].copy_from_slice(b"vpnlb_lgen\0");
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_XDP,
            insn_cnt: (insns.len() / 8) as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            prog_name: name,
            ..Default::default()
        };
        match bpf(BPF_PROG_LOAD, &mut attr) {
            // SAFETY: BPF_PROG_LOAD returned a new file descriptor that nothing else owns.
            Ok(fd) => Ok(LiveGen {
                fd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
            }),
            Err(e) => {
                let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
                Err(io::Error::new(
                    e.kind(),
                    format!(
                        "loading the generator: {e}; verifier log: {}",
                        String::from_utf8_lossy(&log[..end])
                    ),
                ))
            }
        }
    }

    /// Transmits `count` copies of `frame` (each with a fresh source port) out of `ifindex` (in the
    /// calling thread's namespace), `batch` frames per kernel batch (1..=[`MAX_BATCH`]). Returns
    /// after the kernel has run the program `count` times (early on a pending signal).
    pub fn send(&self, frame: &[u8], ifindex: u32, count: u32, batch: u32) -> io::Result<()> {
        let ctx = XdpMd {
            data_end: frame.len() as u32,
            ingress_ifindex: ifindex,
            ..Default::default()
        };
        let mut attr = TestRunAttr {
            prog_fd: self.fd.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: count,
            ctx_size_in: size_of::<XdpMd>() as u32,
            ctx_in: &ctx as *const XdpMd as u64,
            flags: BPF_F_TEST_XDP_LIVE_FRAMES,
            batch_size: batch.clamp(1, MAX_BATCH),
            ..Default::default()
        };
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(())
    }
}
