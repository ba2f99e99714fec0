//! Map keys and values shared by the XDP program and userspace, with compile-time size checks.
//!
//! Conventions: addresses are `[u32; 4]` holding the address bytes exactly as on the wire (network
//! order in memory); an IPv4 address occupies word 0 and words 1-3 are zero. Fields suffixed `_be` are
//! in network byte order. No bool/Option/enum in map types: u8/u32 plus constants.

/// Address family tag used in keys and values.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// Highest number of VIPs (VIP ids and ring ids are `0..MAX_VIPS`).
pub const MAX_VIPS: u32 = 128;
/// Highest number of backends; backend id 0 means "none", so ids are `1..MAX_BACKENDS`.
pub const MAX_BACKENDS: u32 = 4096;
/// Ring row stride: every ring occupies `RING_SIZE_MAX` slots of the `RINGS` array.
pub const RING_SIZE_MAX: u32 = 65537;
/// Default capacity of the learned session-id LRU (`SESSION_IDS`).
pub const DEFAULT_MAX_SESSION_IDS: u32 = 1 << 18;
/// Capacity of the static id range table (`ID_RANGES`, prefixes of all backends together).
pub const MAX_ID_RANGES: u32 = 8192;
/// Default capacity of the fragment-record LRU (`FRAGS`).
pub const DEFAULT_MAX_FRAGS: u32 = 1 << 16;
/// A fragment record is followed for this long after the first fragment (the kernel's default
/// reassembly timeout, `ipfrag_time`: a gateway waits no longer for the rest either).
pub const FRAG_TIMEOUT_NS: u64 = 30_000_000_000;
/// Default Maglev table size (prime).
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Default capacity of the session LRU (overridable at load time).
pub const DEFAULT_MAX_SESSIONS: u32 = 1 << 20;
/// Default GUE destination port.
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Capacity of `TX_PORTS`: egress interfaces other than the ingress one.
pub const TX_PORTS_MAX: u32 = 64;
/// A session's `last_seen_ns` is refreshed at most this often (keeps hits read-mostly).
pub const SESSION_TOUCH_NS: u64 = 1_000_000_000;

/// Forwarding modes (`VipMeta::fwd_mode`).
pub const FWD_MODE_L2DSR: u32 = 0;
pub const FWD_MODE_IPIP: u32 = 1;
pub const FWD_MODE_GUE: u32 = 2;

/// `VipMeta::flags`: pick by source address only (IKE 500/4500 + ESP of one peer land together).
pub const VIP_F_HASH_SRC_ONLY: u32 = 1 << 0;
/// `VipMeta::flags`: the VIP has traffic classes: a new flow's ring is looked up in `CLASS_RINGS`
/// by the packet's DSCP (set by the agent, never by hand).
pub const VIP_F_CLASSES: u32 = 1 << 1;
/// `VipMeta::flags`: learn and follow WireGuard receiver indices (docs/datapath.md, "Session ids").
pub const VIP_F_IDS_WIREGUARD: u32 = 1 << 2;
/// `VipMeta::flags`: learn and follow IKE responder SPIs and ESP SPIs (UDP 500, NAT-T, ESP).
pub const VIP_F_IDS_IPSEC: u32 = 1 << 3;
/// `VipMeta::flags`: learn and follow OpenVPN P_DATA_V2 peer-ids.
pub const VIP_F_IDS_OPENVPN: u32 = 1 << 4;
/// Every session-id flag (a VIP sets at most one).
pub const VIP_F_IDS: u32 = VIP_F_IDS_WIREGUARD | VIP_F_IDS_IPSEC | VIP_F_IDS_OPENVPN;
/// `CLASS_RINGS` entries per VIP: one per DSCP value.
pub const DSCP_VALUES: u32 = 64;

/// Backend states (`Backend::state`). 0 = unused slot.
pub const BACKEND_UNUSED: u32 = 0;
pub const BACKEND_UP: u32 = 1;
/// Admin drain: existing sessions keep forwarding, the agent removes it from rings.
pub const BACKEND_DRAINING: u32 = 2;
/// Dead or disabled: sessions pointing at it are re-picked on their next packet.
pub const BACKEND_DOWN: u32 = 3;

/// Protocols as they appear in `VipKey::proto` / `FlowKey::proto`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ESP: u8 = 50;

/// Session-id kinds (`IdKey::kind`, `IdRangeData::kind`): the id spaces kept apart.
pub const ID_WIREGUARD: u8 = 1;
pub const ID_ESP: u8 = 2;
pub const ID_IKE: u8 = 3;
pub const ID_OPENVPN: u8 = 4;

/// Key of the `SESSION_IDS` LRU: an id the gateway chose, scoped to the VIP address (all VIPs of
/// one address with the same id kind share it: IKE 500, NAT-T 4500 and ESP of an IPsec group).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdKey {
    /// The VIP address (wire order, IPv4 in word 0).
    pub addr: [u32; 4],
    /// The id's wire bytes, zero-padded to 8, read as a little-endian u64 (4-byte ids: the value
    /// of a little-endian u32 load; the IKE SPI: all 8 bytes).
    pub id: u64,
    /// `ID_*`.
    pub kind: u8,
    pub family: u8,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<IdKey>() == 32);

/// Data of an `ID_RANGES` LPM-trie key (after its u32 prefix length): the kind, then the id's
/// wire bytes. A backend's range is one or more prefixes of `32 + bits` (kind and pad included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdRangeData {
    pub kind: u8,
    pub _pad: [u8; 3],
    /// Wire bytes of the id, zero-padded to 8.
    pub id: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<IdRangeData>() == 12);

/// `IdKey::id` of an id given by its wire bytes (at most 8; fewer are zero-padded).
pub fn id_from_wire(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = bytes.len().min(8);
    b[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(b)
}

/// Bits of an `ID_RANGES` prefix taken by the kind and its padding.
pub const ID_RANGE_KIND_BITS: u32 = 32;

/// Lookup key of the `VIPS` hash: destination address, port (0 for ESP) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    pub port_be: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 20);

/// Value of the `VIPS` hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `VIP_STATS` (and the agent's VIP table).
    pub vip_id: u32,
    /// Row of `RINGS` holding this VIP's Maglev table.
    pub ring_id: u32,
    /// Maglev table size M (prime, `<= RING_SIZE_MAX`); 0 = no table yet (new flows dropped, counted).
    pub ring_size: u32,
    /// `VIP_F_*`.
    pub flags: u32,
    /// `FWD_MODE_*`.
    pub fwd_mode: u32,
    /// Largest outer L3 packet (IP header included) allowed after encapsulation; 0 = no limit.
    pub mtu: u32,
    /// Sessions idle for longer are re-picked; 0 = never expire (LRU eviction only).
    pub idle_timeout_ns: u64,
    /// GUE destination port (host order) when `fwd_mode == FWD_MODE_GUE`.
    pub gue_port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<VipMeta>() == 40);

/// Value of the `BACKENDS` array, indexed by backend id (0 = none).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Gateway address (outer destination for encapsulation; informational for L2 DSR).
    pub addr: [u32; 4],
    /// Next-hop MAC: the gateway's (L2 DSR) or the router's towards it.
    pub mac: [u8; 6],
    /// Source MAC to write: the egress interface's own MAC.
    pub src_mac: [u8; 6],
    /// Egress interface; 0 or the ingress ifindex = XDP_TX, otherwise redirect via `TX_PORTS`.
    pub ifindex: u32,
    /// Configured weight (the ring already encodes it; kept for the CLI).
    pub weight: u32,
    /// `BACKEND_*` state.
    pub state: u32,
    /// `FAMILY_V4` / `FAMILY_V6` of `addr`.
    pub family: u8,
    pub _pad: [u8; 3],
    pub _reserved: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 48);

/// Key of the `SESSIONS` LRU: the packet's five-tuple. For ESP, `ports` holds the SPI.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// The first 4 bytes of the L4 header as on the wire: source port then destination port
    /// (UDP/TCP), or the SPI (ESP).
    pub ports: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

/// Key of the `FRAGS` LRU: one fragmented datagram (RFC 791 / RFC 8200 reassembly key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// IPv4 identification (16 bits, host order) or IPv6 Fragment header identification.
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 40);

/// Value of the `SESSIONS` LRU (also of `FRAGS`: the first fragment's backend, hash and time).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub backend_id: u32,
    /// The flow hash (`pick_hash`) computed when the session was created: an encapsulating hit
    /// takes its outer source and flow label from it instead of hashing again.
    pub hash: u32,
    /// CLOCK_MONOTONIC_COARSE (bpf_ktime_get_coarse_ns) of the last refresh, at most
    /// `SESSION_TOUCH_NS` stale.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Session>() == 16);

/// Global settings, the single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GlobalConfig {
    /// Outer IPv4 source for encapsulation (wire order).
    pub encap_src_v4: u32,
    /// Bits of the outer IPv4 source taken from the flow hash (wire-order mask), for RSS spread.
    pub encap_src_v4_hash_mask: u32,
    /// Outer IPv6 source for encapsulation.
    pub encap_src_v6: [u32; 4],
    /// Bits of word 3 of the outer IPv6 source taken from the flow hash.
    pub encap_src_v6_hash_mask: u32,
    /// Session inserts allowed per CPU per second before the flood guard stops inserting; 0 = off.
    pub flood_max_inserts_per_sec: u32,
    /// GUE destination port the decap program accepts (host order); 0 = GUE decap off.
    pub decap_gue_port: u16,
    /// 1: report new sessions and learned ids on `EVENTS` (a cluster member replicating them).
    pub replicate: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<GlobalConfig>() == 40);

/// What `EVENTS` carries: a session the data plane inserted (`kind` `REPL_KIND_SESSION`: `flow`,
/// `backend_id`, `hash`) or an id it learned (`REPL_KIND_ID`: `id`, `backend_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplEvent {
    pub kind: u32,
    pub backend_id: u32,
    pub hash: u32,
    pub _pad: u32,
    pub flow: FlowKey,
    pub id: IdKey,
}
const _: () = assert!(core::mem::size_of::<ReplEvent>() == 88);

pub const REPL_KIND_SESSION: u32 = 1;
pub const REPL_KIND_ID: u32 = 2;
/// Bytes of the `EVENTS` ring buffer (a power of two, page-aligned): ~43k events.
pub const EVENTS_BYTES: u32 = 4 << 20;

/// Per-CPU packet/byte pair of `VIP_STATS` and `BACKEND_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PktBytes {
    pub packets: u64,
    /// Frame bytes as received (before encapsulation).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<PktBytes>() == 16);

/// Per-CPU state of the session-insert flood guard (`FLOOD` array, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodState {
    pub window_start_ns: u64,
    pub inserts: u64,
}
const _: () = assert!(core::mem::size_of::<FloodState>() == 16);

/// Index of a VIP's DSCP entry in `CLASS_RINGS` (value: class ring id + 1, 0 = the VIP's own ring).
#[inline(always)]
pub fn class_slot_index(vip_id: u32, dscp: u32) -> u32 {
    vip_id * DSCP_VALUES + dscp
}

/// Index of a ring slot in the flat `RINGS` array.
#[inline(always)]
pub fn ring_slot_index(ring_id: u32, slot: u32) -> u32 {
    ring_id * RING_SIZE_MAX + slot
}

/// Names of the maps in the object (also the pin file names).
pub mod map_names {
    pub const VIPS: &str = "VIPS";
    pub const RINGS: &str = "RINGS";
    pub const BACKENDS: &str = "BACKENDS";
    pub const SESSIONS: &str = "SESSIONS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const CONFIG: &str = "CONFIG";
    pub const STATS: &str = "STATS";
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const FLOOD: &str = "FLOOD";
    pub const CLASS_RINGS: &str = "CLASS_RINGS";
    pub const SESSION_IDS: &str = "SESSION_IDS";
    pub const ID_RANGES: &str = "ID_RANGES";
    pub const FRAGS: &str = "FRAGS";
    pub const FRAG_VIPS: &str = "FRAG_VIPS";
    pub const EVENTS: &str = "EVENTS";
    /// Every map the agent pins, in make-before-break creation order.
    pub const ALL: [&str; 16] = [
        CONFIG,
        STATS,
        VIP_STATS,
        BACKEND_STATS,
        FLOOD,
        TX_PORTS,
        BACKENDS,
        RINGS,
        CLASS_RINGS,
        ID_RANGES,
        SESSIONS,
        SESSION_IDS,
        FRAGS,
        VIPS,
        FRAG_VIPS,
        EVENTS,
    ];
}

/// What the ABI requires of one map: key and value sizes and the fewest entries it may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapAbi {
    pub name: &'static str,
    pub key_size: u32,
    pub value_size: u32,
    /// The map must have at least this many entries (ids index it).
    pub min_entries: u32,
}

const fn abi<K, V>(name: &'static str, min_entries: u32) -> MapAbi {
    MapAbi {
        name,
        key_size: core::mem::size_of::<K>() as u32,
        value_size: core::mem::size_of::<V>() as u32,
        min_entries,
    }
}

/// The layout of every map in `map_names::ALL` (per-CPU maps: the size of one CPU's value).
/// `TX_PORTS` values are the kernel's `struct bpf_devmap_val` (ifindex + program fd/id);
/// `ID_RANGES` keys are the LPM trie's u32 prefix length followed by the data.
pub const MAP_ABI: [MapAbi; 16] = [
    abi::<u32, GlobalConfig>(map_names::CONFIG, 1),
    abi::<u32, u64>(map_names::STATS, crate::counters::NUM_COUNTERS),
    abi::<u32, PktBytes>(map_names::VIP_STATS, MAX_VIPS),
    abi::<u32, PktBytes>(map_names::BACKEND_STATS, MAX_BACKENDS),
    abi::<u32, FloodState>(map_names::FLOOD, 1),
    abi::<u32, [u32; 2]>(map_names::TX_PORTS, TX_PORTS_MAX),
    abi::<u32, Backend>(map_names::BACKENDS, MAX_BACKENDS),
    abi::<u32, u32>(map_names::RINGS, RING_SIZE_MAX),
    abi::<u32, u32>(map_names::CLASS_RINGS, MAX_VIPS * DSCP_VALUES),
    abi::<FlowKey, Session>(map_names::SESSIONS, 1),
    abi::<VipKey, VipMeta>(map_names::VIPS, 1),
    abi::<IdKey, u32>(map_names::SESSION_IDS, 1),
    abi::<(u32, IdRangeData), u32>(map_names::ID_RANGES, 1),
    abi::<FragKey, Session>(map_names::FRAGS, 1),
    abi::<VipKey, VipKey>(map_names::FRAG_VIPS, 1),
    // A ring buffer has no key or value; its size is its max_entries.
    MapAbi {
        name: map_names::EVENTS,
        key_size: 0,
        value_size: 0,
        min_entries: EVENTS_BYTES,
    },
];

/// Names of the XDP programs in the object.
pub mod prog_names {
    pub const INGRESS: &str = "vpnlb_ingress";
    pub const DECAP: &str = "vpnlb_decap";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and have explicit
    // padding fields, so every bit pattern is valid and there are no uninitialised bytes.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for Session {}
    unsafe impl aya::Pod for GlobalConfig {}
    unsafe impl aya::Pod for PktBytes {}
    unsafe impl aya::Pod for FloodState {}
    unsafe impl aya::Pod for IdKey {}
    unsafe impl aya::Pod for IdRangeData {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for ReplEvent {}
}

#[cfg(feature = "user")]
mod addr {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    /// Wire-order words and family of an IP address.
    pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
        match ip {
            IpAddr::V4(a) => ([u32::from_ne_bytes(a.octets()), 0, 0, 0], FAMILY_V4),
            IpAddr::V6(a) => {
                let o = a.octets();
                let mut w = [0u32; 4];
                for (i, word) in w.iter_mut().enumerate() {
                    *word =
                        u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                (w, FAMILY_V6)
            }
        }
    }

    /// The IP address held in wire-order words.
    pub fn words_addr(w: [u32; 4], family: u8) -> IpAddr {
        if family == FAMILY_V4 {
            IpAddr::V4(Ipv4Addr::from(w[0].to_ne_bytes()))
        } else {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[4 * i..4 * i + 4].copy_from_slice(&w[i].to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }

    impl VipKey {
        pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
            let (addr, family) = addr_words(ip);
            VipKey {
                addr,
                port_be: port.to_be(),
                proto,
                family,
            }
        }
        pub fn ip(&self) -> IpAddr {
            words_addr(self.addr, self.family)
        }
        pub fn port(&self) -> u16 {
            u16::from_be(self.port_be)
        }
    }

    impl FlowKey {
        /// A UDP/TCP flow key from host-order ports.
        pub fn new(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> Self {
            let (s, family) = addr_words(src);
            let (d, _) = addr_words(dst);
            let mut p = [0u8; 4];
            p[..2].copy_from_slice(&sport.to_be_bytes());
            p[2..].copy_from_slice(&dport.to_be_bytes());
            FlowKey {
                src: s,
                dst: d,
                ports: u32::from_ne_bytes(p),
                proto,
                family,
                _pad: [0; 2],
            }
        }
        /// An ESP flow key: the SPI takes the place of the ports.
        pub fn esp(src: IpAddr, dst: IpAddr, spi: u32) -> Self {
            let (s, family) = addr_words(src);
            let (d, _) = addr_words(dst);
            FlowKey {
                src: s,
                dst: d,
                ports: u32::from_ne_bytes(spi.to_be_bytes()),
                proto: PROTO_ESP,
                family,
                _pad: [0; 2],
            }
        }
        pub fn src_ip(&self) -> IpAddr {
            words_addr(self.src, self.family)
        }
        pub fn dst_ip(&self) -> IpAddr {
            words_addr(self.dst, self.family)
        }
        /// (source port, destination port) in host order; for ESP the SPI split in two.
        pub fn ports_host(&self) -> (u16, u16) {
            let b = self.ports.to_ne_bytes();
            (
                u16::from_be_bytes([b[0], b[1]]),
                u16::from_be_bytes([b[2], b[3]]),
            )
        }
        /// The destination port (0 for ESP), which is what the VIP lookup uses.
        pub fn vip_key(&self) -> VipKey {
            let port_be = if self.proto == PROTO_ESP {
                0
            } else {
                self.ports_host().1.to_be()
            };
            VipKey {
                addr: self.dst,
                port_be,
                proto: self.proto,
                family: self.family,
            }
        }
    }

    impl IdKey {
        /// The key of `id` (see [`IdKey::id`]) of `kind` learned on VIP address `vip`.
        pub fn new(vip: IpAddr, kind: u8, id: u64) -> Self {
            let (addr, family) = addr_words(vip);
            IdKey {
                addr,
                id,
                kind,
                family,
                _pad: [0; 6],
            }
        }
        pub fn vip_ip(&self) -> IpAddr {
            words_addr(self.addr, self.family)
        }
    }

    impl Backend {
        pub fn ip(&self) -> IpAddr {
            words_addr(self.addr, self.family)
        }
    }
}
#[cfg(feature = "user")]
pub use addr::{addr_words, words_addr};
