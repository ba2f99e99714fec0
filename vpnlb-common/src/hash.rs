//! The flow hash (Bob Jenkins' lookup3, as the kernel's `jhash2`), identical on both sides so a
//! userspace function can say which ring slot, and so which backend, a packet reaches.
//!
//! Words are the wire bytes read as little-endian u32 (what a bpfel load of the packet yields).

use crate::types::{FlowKey, VIP_F_HASH_SRC_ONLY};

/// Fixed seed: every vpnlb host must compute the same hash for the same flow (ECMP agreement).
pub const FLOW_HASH_SEED: u32 = 0x7670_6e6c; // "vpnl"
/// Seed for Maglev's per-backend offset; a different seed gives the skip.
pub const MAGLEV_OFFSET_SEED: u32 = 0x6d61_676c;
pub const MAGLEV_SKIP_SEED: u32 = 0x736b_6970;

const JHASH_INITVAL: u32 = 0xdead_beef;

#[inline(always)]
fn mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(4);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(6);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(8);
    *b = b.wrapping_add(*a);
    *a = a.wrapping_sub(*c);
    *a ^= c.rotate_left(16);
    *c = c.wrapping_add(*b);
    *b = b.wrapping_sub(*a);
    *b ^= a.rotate_left(19);
    *a = a.wrapping_add(*c);
    *c = c.wrapping_sub(*b);
    *c ^= b.rotate_left(4);
    *b = b.wrapping_add(*a);
}

#[inline(always)]
fn final_mix(a: &mut u32, b: &mut u32, c: &mut u32) {
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(14));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(11));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(25));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(16));
    *a ^= *c;
    *a = a.wrapping_sub(c.rotate_left(4));
    *b ^= *a;
    *b = b.wrapping_sub(a.rotate_left(14));
    *c ^= *b;
    *c = c.wrapping_sub(b.rotate_left(24));
}

/// The kernel's `jhash2(k, N, initval)` over a fixed number of words (the loop unrolls in BPF).
#[inline(always)]
pub fn jhash2<const N: usize>(k: &[u32; N], initval: u32) -> u32 {
    let init = JHASH_INITVAL
        .wrapping_add((N as u32) << 2)
        .wrapping_add(initval);
    let (mut a, mut b, mut c) = (init, init, init);
    let mut i = 0;
    let mut left = N;
    while left > 3 {
        a = a.wrapping_add(k[i]);
        b = b.wrapping_add(k[i + 1]);
        c = c.wrapping_add(k[i + 2]);
        mix(&mut a, &mut b, &mut c);
        i += 3;
        left -= 3;
    }
    if left == 0 {
        return c;
    }
    if left >= 3 {
        c = c.wrapping_add(k[i + 2]);
    }
    if left >= 2 {
        b = b.wrapping_add(k[i + 1]);
    }
    a = a.wrapping_add(k[i]);
    final_mix(&mut a, &mut b, &mut c);
    c
}

/// Hash of a whole five-tuple (the default mode).
#[inline(always)]
pub fn hash_flow(k: &FlowKey) -> u32 {
    let words = [
        k.src[0],
        k.src[1],
        k.src[2],
        k.src[3],
        k.dst[0],
        k.dst[1],
        k.dst[2],
        k.dst[3],
        k.ports,
        (k.proto as u32) | ((k.family as u32) << 8),
    ];
    jhash2(&words, FLOW_HASH_SEED)
}

/// Hash of the source address only (`VIP_F_HASH_SRC_ONLY`).
#[inline(always)]
pub fn hash_src(k: &FlowKey) -> u32 {
    jhash2(&k.src, FLOW_HASH_SEED)
}

/// The hash the data plane uses to pick a ring slot for this flow under the VIP's flags.
#[inline(always)]
pub fn pick_hash(k: &FlowKey, vip_flags: u32) -> u32 {
    if vip_flags & VIP_F_HASH_SRC_ONLY != 0 {
        hash_src(k)
    } else {
        hash_flow(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jhash2_matches_slice_transcription() {
        // Empty input returns initval + 0xdeadbeef, as the kernel's jhash2 does.
        assert_eq!(jhash2(&[0u32; 0], 0), 0xdeadbeef);
        assert_eq!(jhash2(&[1u32], 0), jhash_ref(&[1], 0));
        assert_eq!(
            jhash2(&[1u32, 2, 3, 4, 5, 6, 7], 9),
            jhash_ref(&[1, 2, 3, 4, 5, 6, 7], 9)
        );
    }

    /// Straightforward transcription of lib/jhash.h's jhash2 over a slice, as a reference.
    fn jhash_ref(k: &[u32], initval: u32) -> u32 {
        let init = 0xdeadbeefu32
            .wrapping_add((k.len() as u32) << 2)
            .wrapping_add(initval);
        let (mut a, mut b, mut c) = (init, init, init);
        let mut k = k;
        while k.len() > 3 {
            a = a.wrapping_add(k[0]);
            b = b.wrapping_add(k[1]);
            c = c.wrapping_add(k[2]);
            mix(&mut a, &mut b, &mut c);
            k = &k[3..];
        }
        match k.len() {
            3 => {
                c = c.wrapping_add(k[2]);
                b = b.wrapping_add(k[1]);
                a = a.wrapping_add(k[0]);
                final_mix(&mut a, &mut b, &mut c);
            }
            2 => {
                b = b.wrapping_add(k[1]);
                a = a.wrapping_add(k[0]);
                final_mix(&mut a, &mut b, &mut c);
            }
            1 => {
                a = a.wrapping_add(k[0]);
                final_mix(&mut a, &mut b, &mut c);
            }
            _ => {}
        }
        c
    }

    #[test]
    fn src_only_ignores_ports_and_dst() {
        let mut a = FlowKey {
            src: [0x0100_000a, 0, 0, 0],
            family: 4,
            proto: 17,
            ..Default::default()
        };
        let mut b = a;
        a.ports = 0x1234_5678;
        b.ports = 0x0102_0304;
        b.dst = [0x0200_000a, 0, 0, 0];
        b.proto = 50;
        assert_eq!(hash_src(&a), hash_src(&b));
        assert_ne!(hash_flow(&a), hash_flow(&b));
    }

    #[test]
    fn flow_hash_spreads_ports() {
        // 10k flows that differ only in the source port spread over 16 buckets within 15%.
        let mut buckets = [0u32; 16];
        for p in 0..10_000u32 {
            let k = FlowKey {
                src: [0x0100_000a, 0, 0, 0],
                dst: [0x0a00_000a, 0, 0, 0],
                ports: p.to_be() | 0x1b00,
                proto: 17,
                family: 4,
                _pad: [0; 2],
            };
            buckets[(hash_flow(&k) % 16) as usize] += 1;
        }
        for b in buckets {
            assert!(
                (540..=720).contains(&b),
                "bucket {b} outside 625±15%: {buckets:?}"
            );
        }
    }
}
