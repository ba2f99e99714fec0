//! Deterministic packet mutation for the differential test: a tiny xorshift RNG and mutation
//! operators that aim at the parser's decisions (truncation, header-weighted byte flips, targeted
//! field rewrites towards or away from the VIPs, inserted/removed VLAN tags and IPv4 options,
//! appended padding).
//!
//! Pure code: no maps, no root. Every mutant is at least [`MIN_FRAME`] bytes long, because
//! `BPF_PROG_TEST_RUN` refuses shorter frames with EINVAL.

/// The shortest frame a test run accepts (an Ethernet header).
pub const MIN_FRAME: usize = 14;

/// xorshift64* (Vigna): tiny, fast, and the same sequence on every run for a given seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Never zero (the all-zero state is a fixed point of xorshift).
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    pub fn byte(&mut self) -> u8 {
        (self.next_u64() >> 56) as u8
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        ((self.next_u64() >> 11) % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: usize, den: usize) -> bool {
        self.below(den) < num
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Where a frame's headers would sit, read leniently: bounds are respected, nothing is validated
/// (a mutated frame is exactly what this must cope with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// 14, or 18 with an 802.1Q tag.
    pub l2: usize,
    pub vlan: bool,
    /// The (inner) EtherType.
    pub ethertype: u16,
    /// 4 or 6 when the EtherType says IPv4/IPv6 and the fixed header is present.
    pub ip: Option<u8>,
    /// Offset of the L4 header (after the IPv4 IHL or the IPv6 fixed header), if it is inside the frame.
    pub l4: Option<usize>,
    /// IPv4 protocol / IPv6 next header.
    pub proto: Option<u8>,
}

impl Layout {
    /// First byte after the headers worth mutating (L4 header included).
    pub fn header_end(&self, len: usize) -> usize {
        let end = match self.l4 {
            Some(l4) => l4 + 24,
            None => self.l2 + 40,
        };
        end.min(len)
    }
}

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

fn put16(f: &mut [u8], off: usize, v: u16) {
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// Reads the header layout of `f` (at least 14 bytes).
pub fn layout(f: &[u8]) -> Layout {
    let mut l = Layout {
        l2: 14,
        vlan: false,
        ethertype: if f.len() >= 14 { be16(f, 12) } else { 0 },
        ip: None,
        l4: None,
        proto: None,
    };
    if l.ethertype == 0x8100 && f.len() >= 18 {
        l.vlan = true;
        l.l2 = 18;
        l.ethertype = be16(f, 16);
    }
    let l3 = l.l2;
    match l.ethertype {
        0x0800 if f.len() >= l3 + 20 => {
            l.ip = Some(4);
            l.proto = Some(f[l3 + 9]);
            let l4 = l3 + usize::from(f[l3] & 0x0f) * 4;
            l.l4 = (l4 >= l3 + 20 && l4 < f.len()).then_some(l4);
        }
        0x86dd if f.len() >= l3 + 40 => {
            l.ip = Some(6);
            l.proto = Some(f[l3 + 6]);
            l.l4 = (l3 + 40 < f.len()).then_some(l3 + 40);
        }
        _ => {}
    }
    l
}

/// Addresses and ports worth steering a mutation towards: the VIPs (and, for decap inputs, the
/// GUE ports).
#[derive(Clone, Debug, Default)]
pub struct Targets {
    pub v4: Vec<[u8; 4]>,
    pub v6: Vec<[u8; 16]>,
    pub ports: Vec<u16>,
}

/// Applies one to three random mutation operators to `f`.
pub fn mutate(rng: &mut Rng, f: &[u8], t: &Targets) -> Vec<u8> {
    let mut out = f.to_vec();
    if out.len() < MIN_FRAME {
        out.resize(MIN_FRAME, 0);
    }
    let ops = rng.range(1, 3);
    for _ in 0..ops {
        match rng.below(20) {
            0..=2 => truncate(rng, &mut out),
            3..=6 => flip(rng, &mut out),
            7..=17 => rewrite(rng, &mut out, t),
            _ => pad(rng, &mut out),
        }
    }
    debug_assert!(out.len() >= MIN_FRAME);
    out
}

/// Mutations for `vpnlb_decap` inputs (encapsulated frames): mostly the generic ones, plus the
/// inner packet's version nibble and a cut right where the inner packet starts.
pub fn mutate_decap(rng: &mut Rng, f: &[u8], t: &Targets) -> Vec<u8> {
    let l = layout(f);
    let inner = l.l4.map(|l4| if l.proto == Some(17) { l4 + 8 } else { l4 });
    match (rng.below(6), inner) {
        (0, Some(i)) if i < f.len() => {
            let mut out = f.to_vec();
            out[i] = (rng.byte() & 0xf0) | (out[i] & 0x0f);
            out
        }
        (1, Some(i)) if i <= f.len() && i >= MIN_FRAME => {
            let cut = (i + rng.below(3)).min(f.len());
            f[..cut].to_vec()
        }
        _ => mutate(rng, f, t),
    }
}

/// Cuts the frame at a random length ≥ 14, half the time inside the headers.
pub fn truncate(rng: &mut Rng, f: &mut Vec<u8>) {
    if f.len() <= MIN_FRAME {
        return;
    }
    let hdr = layout(f).header_end(f.len()).max(MIN_FRAME);
    let hi = if rng.chance(1, 2) { hdr } else { f.len() - 1 };
    let hi = hi.clamp(MIN_FRAME, f.len() - 1);
    let n = rng.range(MIN_FRAME, hi);
    f.truncate(n);
}

/// XORs one to four bytes with random non-zero values, mostly inside the headers.
pub fn flip(rng: &mut Rng, f: &mut [u8]) {
    let hdr = layout(f).header_end(f.len()).max(1);
    for _ in 0..rng.range(1, 4) {
        let i = if rng.chance(4, 5) {
            rng.below(hdr)
        } else {
            rng.below(f.len())
        };
        let x = match rng.below(3) {
            0 => 1 << rng.below(8),
            _ => rng.byte() | 1,
        };
        f[i] ^= x;
    }
}

/// Appends 1..64 bytes (zeros or random), or pads a short frame to the 60-byte Ethernet minimum.
pub fn pad(rng: &mut Rng, f: &mut Vec<u8>) {
    if f.len() < 60 && rng.chance(1, 2) {
        f.resize(60, 0);
        return;
    }
    let n = rng.range(1, 64);
    let zero = rng.chance(1, 2);
    for _ in 0..n {
        let b = if zero { 0 } else { rng.byte() };
        f.push(b);
    }
}

/// A length field value near `exact`: 0, below, exact, above, or random.
fn length_near(rng: &mut Rng, exact: usize) -> u16 {
    match rng.below(8) {
        0 => 0,
        1 => exact.saturating_sub(1) as u16,
        2 | 3 => exact as u16,
        4 => (exact + 1) as u16,
        5 => rng.below(64) as u16,
        6 => (exact + rng.range(2, 64)) as u16,
        _ => rng.next_u32() as u16,
    }
}

/// Rewrites one header field with a value chosen to hit (or just miss) a parser decision.
pub fn rewrite(rng: &mut Rng, f: &mut Vec<u8>, t: &Targets) {
    let l = layout(f);
    let l3 = l.l2;
    match rng.below(12) {
        // EtherType (the innermost one).
        0 => {
            let random = rng.next_u32() as u16;
            let et = *rng.pick(&[0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x88cc, random]);
            put16(f, l3 - 2, et);
        }
        // VLAN: add a tag, remove it, or stack a second one.
        1 => {
            let tci = (rng.next_u32() as u16).to_be_bytes();
            if l.vlan && rng.chance(1, 2) {
                f.drain(12..16);
            } else {
                let tpid: u16 = if l.vlan && rng.chance(1, 2) {
                    0x88a8
                } else {
                    0x8100
                };
                let mut tag = tpid.to_be_bytes().to_vec();
                tag.extend_from_slice(&tci);
                f.splice(12..12, tag);
            }
        }
        // Addresses towards a VIP (destination) or elsewhere (source, or a random destination).
        2 | 3 => match l.ip {
            Some(4) => {
                let (off, addr) = if rng.chance(3, 4) && !t.v4.is_empty() {
                    (l3 + 16, *rng.pick(&t.v4))
                } else {
                    let off = if rng.chance(1, 2) { l3 + 12 } else { l3 + 16 };
                    (off, rng.next_u32().to_ne_bytes())
                };
                f[off..off + 4].copy_from_slice(&addr);
            }
            Some(6) => {
                let (off, addr) = if rng.chance(3, 4) && !t.v6.is_empty() {
                    (l3 + 24, *rng.pick(&t.v6))
                } else {
                    let off = if rng.chance(1, 2) { l3 + 8 } else { l3 + 24 };
                    let mut a = [0u8; 16];
                    a.iter_mut().for_each(|b| *b = rng.byte());
                    (off, a)
                };
                f[off..off + 16].copy_from_slice(&addr);
            }
            _ => put16(f, l3 - 2, *rng.pick(&[0x0800, 0x86dd])),
        },
        // Version / IHL.
        4 => match l.ip {
            Some(4) => {
                f[l3] = if rng.chance(1, 2) {
                    (f[l3] & 0x0f) | (rng.pick(&[0u8, 4, 6, 5, 15]) << 4)
                } else {
                    (f[l3] & 0xf0) | rng.below(16) as u8
                };
            }
            Some(6) => f[l3] = (f[l3] & 0x0f) | (rng.pick(&[0u8, 4, 6, 7, 15]) << 4),
            _ => {}
        },
        // Total length / payload length.
        5 => match l.ip {
            Some(4) => {
                let v = length_near(rng, f.len() - l3);
                put16(f, l3 + 2, v);
            }
            Some(6) => {
                let v = length_near(rng, f.len() - l3 - 40);
                put16(f, l3 + 4, v);
            }
            _ => {}
        },
        // Protocol / next header.
        6 => {
            let p = *rng.pick(&[
                0u8, 1, 4, 6, 17, 41, 43, 44, 47, 50, 58, 60, 135, 139, 140, 253, 254,
            ]);
            let p = if rng.chance(1, 8) { rng.byte() } else { p };
            match l.ip {
                Some(4) => f[l3 + 9] = p,
                Some(6) => f[l3 + 6] = p,
                _ => {}
            }
        }
        // IPv4 fragment bits, or IPv6 traffic class.
        7 => match l.ip {
            Some(4) => {
                let v = *rng.pick(&[0x0000u16, 0x4000, 0x2000, 0x0001, 0x1fff, 0x8000, 0x6000]);
                put16(f, l3 + 6, v);
            }
            Some(6) => {
                let tc = rng.byte();
                f[l3] = (f[l3] & 0xf0) | (tc >> 4);
                f[l3 + 1] = (f[l3 + 1] & 0x0f) | (tc << 4);
            }
            _ => {}
        },
        // IPv4 options: insert 4 or 8 bytes and keep IHL / total length consistent.
        8 => {
            if l.ip == Some(4) && f[l3] & 0x0f <= 13 {
                let words = rng.range(1, 2);
                let opt: Vec<u8> = match rng.below(3) {
                    0 => vec![1; 4 * words],
                    1 => {
                        let mut o = vec![0x94, 4, 0, 0];
                        o.resize(4 * words, 0);
                        o
                    }
                    _ => (0..4 * words).map(|_| rng.byte()).collect(),
                };
                let at = l3 + usize::from(f[l3] & 0x0f) * 4;
                if at <= f.len() {
                    f.splice(at..at, opt);
                    f[l3] += words as u8;
                    let tot = be16(f, l3 + 2).wrapping_add(4 * words as u16);
                    put16(f, l3 + 2, tot);
                }
            }
        }
        // Ports: destination to a VIP port, or random source / destination.
        9 => {
            if let Some(l4) = l.l4.filter(|l4| l4 + 4 <= f.len()) {
                if rng.chance(2, 3) && !t.ports.is_empty() {
                    put16(f, l4 + 2, *rng.pick(&t.ports));
                } else {
                    let off = l4 + 2 * rng.below(2);
                    put16(f, off, rng.next_u32() as u16);
                }
            }
        }
        // UDP length / TCP data offset / ESP SPI, by the actual protocol.
        10 => {
            if let Some(l4) = l.l4 {
                match l.proto {
                    Some(17) if l4 + 8 <= f.len() => {
                        let v = length_near(rng, f.len() - l4);
                        put16(f, l4 + 4, v);
                    }
                    Some(6) if l4 + 13 <= f.len() => {
                        f[l4 + 12] = (f[l4 + 12] & 0x0f) | ((rng.below(16) as u8) << 4);
                    }
                    Some(50) if l4 + 4 <= f.len() => {
                        let spi = if rng.chance(1, 2) { 0 } else { rng.next_u32() };
                        f[l4..l4 + 4].copy_from_slice(&spi.to_be_bytes());
                    }
                    _ => {}
                }
            }
        }
        // TOS / DSCP+ECN (copied into the outer header by encapsulation).
        _ => {
            if l.ip == Some(4) {
                f[l3 + 1] = rng.byte();
            }
        }
    }
    if f.len() < MIN_FRAME {
        f.resize(MIN_FRAME, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame() -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0, 0, 36, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 1, 10, 200, 0, 10]);
        f.extend_from_slice(&[0x03, 0xe8, 0xca, 0x6c, 0, 16, 0, 0]);
        f.extend_from_slice(&[0xaa; 8]);
        f
    }

    #[test]
    fn rng_is_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let va: Vec<u64> = (0..16).map(|_| a.next_u64()).collect();
        let vb: Vec<u64> = (0..16).map(|_| b.next_u64()).collect();
        assert_eq!(va, vb);
        assert_ne!(Rng::new(8).next_u64(), va[0]);
        let mut r = Rng::new(0);
        assert!((0..1000).all(|_| r.range(3, 5) >= 3));
    }

    #[test]
    fn layout_reads_ipv4_udp() {
        let f = frame();
        let l = layout(&f);
        assert_eq!(
            (l.l2, l.ip, l.l4, l.proto),
            (14, Some(4), Some(34), Some(17))
        );
    }

    #[test]
    fn mutants_are_never_shorter_than_ethernet() {
        let mut r = Rng::new(42);
        let t = Targets {
            v4: vec![[10, 200, 0, 10]],
            v6: vec![],
            ports: vec![51820],
        };
        let base = frame();
        let mut changed = 0;
        for _ in 0..5000 {
            let m = mutate(&mut r, &base, &t);
            assert!(m.len() >= MIN_FRAME);
            changed += usize::from(m != base);
            let d = mutate_decap(&mut r, &m, &t);
            assert!(d.len() >= MIN_FRAME);
        }
        assert!(changed > 4000, "only {changed} of 5000 mutants differ");
    }
}
