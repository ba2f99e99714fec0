//! Session ids in userspace: the `ID_RANGES` prefixes a backend's static SPI range or IKE SPI
//! label becomes, and how ids are shown (`vpnlb inspect session-ids`, `vpnlb simulate`).

use std::net::{IpAddr, Ipv4Addr};

use vpnlb_common::{
    FAMILY_V4, ID_ESP, ID_IKE, ID_OPENVPN, ID_RANGE_KIND_BITS, ID_WIREGUARD, IdKey, IdRangeData,
    addr_words, id_from_wire,
};

/// One `ID_RANGES` key: `prefix_len` bits (the 32 of kind + pad, then id bits) of `data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdPrefix {
    pub prefix_len: u32,
    pub data: IdRangeData,
}

impl IdPrefix {
    /// The prefix of `kind` ids whose first `bits` wire bits are those of `id_wire`.
    pub fn new(kind: u8, id_wire: [u8; 8], bits: u32) -> Self {
        IdPrefix {
            prefix_len: ID_RANGE_KIND_BITS + bits,
            data: IdRangeData {
                kind,
                _pad: [0; 3],
                id: id_wire,
            },
        }
    }

    /// Whether the full-length key `data` falls under this prefix (the LPM trie's match).
    pub fn matches(&self, data: &IdRangeData) -> bool {
        let a = range_bits(&self.data);
        let b = range_bits(data);
        let n = self.prefix_len.min(96);
        n == 0 || (a ^ b) >> (128 - n) == 0
    }
}

/// The 96 bits of range data, most significant first, in the top of a u128.
fn range_bits(d: &IdRangeData) -> u128 {
    let mut b = [0u8; 16];
    b[0] = d.kind;
    b[1..4].copy_from_slice(&d._pad);
    b[4..12].copy_from_slice(&d.id);
    u128::from_be_bytes(b)
}

/// The ESP SPI range `min..=max` as the fewest aligned prefixes (at most 62).
pub fn esp_range_prefixes(min: u32, max: u32) -> Vec<IdPrefix> {
    let mut out = Vec::new();
    let (mut lo, hi) = (u64::from(min), u64::from(max));
    while lo <= hi {
        // The largest aligned block starting at `lo` that stays within `hi`.
        let mut size = if lo == 0 {
            1u64 << 32
        } else {
            1u64 << lo.trailing_zeros().min(32)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let bits = 32 - size.trailing_zeros();
        let mut wire = [0u8; 8];
        wire[..4].copy_from_slice(&(lo as u32).to_be_bytes());
        out.push(IdPrefix::new(ID_ESP, wire, bits));
        lo += size;
    }
    out
}

/// strongSwan's IKE `spi_mask`/`spi_label` (64-bit values, most significant bit first on the
/// wire) as one prefix; the mask must be contiguous high bits and the label inside it.
pub fn ike_label_prefix(mask: u64, label: u64) -> Result<IdPrefix, String> {
    let bits = mask.leading_ones();
    if mask == 0 || mask.checked_shl(bits).unwrap_or(0) != 0 {
        return Err(format!(
            "ike_spi_mask {mask:#018x} must be non-zero contiguous high bits (e.g. 0xff00000000000000)"
        ));
    }
    if label & !mask != 0 {
        return Err(format!(
            "ike_spi_label {label:#018x} has bits outside ike_spi_mask {mask:#018x}"
        ));
    }
    Ok(IdPrefix::new(ID_IKE, label.to_be_bytes(), bits))
}

/// The name of an id kind (CLI output, JSON).
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        ID_WIREGUARD => "wireguard",
        ID_ESP => "esp",
        ID_IKE => "ike",
        ID_OPENVPN => "openvpn",
        _ => "unknown",
    }
}

/// `IdKey::id` of OpenVPN peer-id `peer_id` (24 bits) sent from `src` (docs/datapath.md, stage
/// 3b): the peer-id's 3 wire bytes, then the 4 bytes of the XOR of the address's 32-bit words.
pub fn openvpn_id(peer_id: u32, src: IpAddr) -> u64 {
    let folded = addr_words(src).0.iter().fold(0u32, |a, w| a ^ w);
    let mut b = [0u8; 7];
    b[..3].copy_from_slice(&peer_id.to_be_bytes()[1..]);
    b[3..].copy_from_slice(&folded.to_ne_bytes());
    id_from_wire(&b)
}

/// An id as its protocol's tools show it: WireGuard's little-endian receiver index, the ESP SPI
/// and IKE SPI in network order (hex, as `swanctl --list-sas`), OpenVPN's 24-bit peer-id and the
/// client address it is scoped to (IPv6: only its 32-bit fold is kept, shown in hex).
pub fn format_id(key: &IdKey) -> String {
    let w = key.id.to_le_bytes();
    match key.kind {
        ID_WIREGUARD => format!("{:#010x}", key.id as u32),
        ID_ESP => format!("{:#010x}", u32::from_be_bytes([w[0], w[1], w[2], w[3]])),
        ID_IKE => format!("{:016x}", u64::from_be_bytes(w)),
        ID_OPENVPN => {
            let peer = u32::from_be_bytes([0, w[0], w[1], w[2]]);
            let src = [w[3], w[4], w[5], w[6]];
            if key.family == FAMILY_V4 {
                format!("{peer} from {}", Ipv4Addr::from(src))
            } else {
                format!("{peer} from IPv6 fold {:#010x}", u32::from_be_bytes(src))
            }
        }
        _ => format!("{:#x}", key.id),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spi_data(spi: u32) -> IdRangeData {
        let mut id = [0u8; 8];
        id[..4].copy_from_slice(&spi.to_be_bytes());
        IdRangeData {
            kind: ID_ESP,
            _pad: [0; 3],
            id,
        }
    }

    #[test]
    fn esp_ranges_cover_exactly_their_spis() {
        for (min, max) in [
            (0xc000_0000, 0xc0ff_ffff),
            (0x100, 0x1ff),
            (5, 1000),
            (1, u32::MAX),
            (0xffff_fff0, 0xffff_ffff),
        ] {
            let p = esp_range_prefixes(min, max);
            assert!(p.len() <= 62, "{min:#x}..{max:#x}: {} prefixes", p.len());
            for spi in [
                min,
                max,
                min.wrapping_sub(1),
                max.wrapping_add(1),
                min / 2 + max / 2,
            ] {
                let inside = (min..=max).contains(&spi);
                let hits = p.iter().filter(|x| x.matches(&spi_data(spi))).count();
                assert_eq!(
                    hits,
                    usize::from(inside),
                    "spi {spi:#x} in {min:#x}..{max:#x}"
                );
            }
        }
        assert_eq!(esp_range_prefixes(0xc000_0000, 0xc0ff_ffff).len(), 1);
    }

    #[test]
    fn ike_label_needs_a_prefix_mask() {
        let p = ike_label_prefix(0xff00_0000_0000_0000, 0x0100_0000_0000_0000).unwrap();
        assert_eq!(p.prefix_len, 40);
        let mut d = IdRangeData {
            kind: ID_IKE,
            _pad: [0; 3],
            id: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        assert!(p.matches(&d));
        d.id[0] = 2;
        assert!(!p.matches(&d));
        assert!(ike_label_prefix(0x00ff_0000_0000_0000, 0).is_err());
        assert!(ike_label_prefix(0, 0).is_err());
        assert!(ike_label_prefix(0xf000_0000_0000_0000, 0x0100_0000_0000_0000).is_err());
    }

    #[test]
    fn ids_print_as_their_tools_show_them() {
        let ip = "203.0.113.1".parse().unwrap();
        let k = |kind, wire: &[u8]| IdKey::new(ip, kind, vpnlb_common::id_from_wire(wire));
        assert_eq!(format_id(&k(ID_ESP, &[0xc1, 2, 3, 4])), "0xc1020304");
        assert_eq!(format_id(&k(ID_WIREGUARD, &[4, 3, 2, 1])), "0x01020304");
        let ovpn = k(ID_OPENVPN, &[0, 1, 2, 198, 51, 100, 7]);
        assert_eq!(format_id(&ovpn), "258 from 198.51.100.7");
        assert_eq!(ovpn.id, openvpn_id(258, "198.51.100.7".parse().unwrap()));
        // IPv6: the XOR of the four words 2001:0db8, 0000:0000, 0001:0000, 0000:0001.
        let v6 = IdKey::new(
            "2001:db8::10".parse().unwrap(),
            ID_OPENVPN,
            openvpn_id(7, "2001:db8::1:0:0:1".parse().unwrap()),
        );
        assert_eq!(format_id(&v6), "7 from IPv6 fold 0x20000db9");
        assert_eq!(
            format_id(&k(ID_IKE, &[0xd1, 0, 0, 0, 0, 0, 0, 0x0f])),
            "d10000000000000f"
        );
    }
}
