//! Every map of the vpnlb object, declared as BTF maps (typed keys and values in `bpftool map dump`);
//! names match `vpnlb_common::map_names` because they are also the pin file names.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use vpnlb_common::{
    Backend, DEFAULT_MAX_FRAGS, DEFAULT_MAX_SESSION_IDS, DEFAULT_MAX_SESSIONS, DSCP_VALUES,
    EVENTS_BYTES, FloodState, FlowKey, FragKey, GlobalConfig, IdKey, IdRangeData, MAX_BACKENDS,
    MAX_ID_RANGES, MAX_VIPS, NUM_COUNTERS, PktBytes, RING_SIZE_MAX, ReplEvent, Session,
    TX_PORTS_MAX, VipKey, VipMeta,
};

/// VIP (address, port, protocol) → its metadata.
#[btf_map]
pub static VIPS: HashMap<VipKey, VipMeta, { MAX_VIPS as usize }> = HashMap::new();

/// All Maglev tables, one row of `RING_SIZE_MAX` backend ids per ring id. Userspace may shrink it at
/// load time; a slot past the end reads as backend 0 (none).
#[btf_map]
pub static RINGS: Array<u32, { (MAX_VIPS * RING_SIZE_MAX) as usize }> = Array::new();

/// (vip_id × 64 + DSCP) → class ring id + 1 (0 = the VIP's own ring); read only for VIPs with
/// `VIP_F_CLASSES`.
#[btf_map]
pub static CLASS_RINGS: Array<u32, { (MAX_VIPS * DSCP_VALUES) as usize }> = Array::new();

/// Backend id → backend (id 0 is never a valid backend).
#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// Five-tuple → chosen backend. Per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`, as Katran): no shared
/// LRU lock on the insert path; the table itself is shared, so a flow seen on two CPUs still hits.
#[btf_map]
pub static SESSIONS: LruHashMap<
    FlowKey,
    Session,
    { DEFAULT_MAX_SESSIONS as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Egress ifindex → device, for backends reached through another interface.
#[btf_map]
pub static TX_PORTS: DevMapHash<{ TX_PORTS_MAX as usize }> = DevMapHash::new();

/// The global settings (single entry).
#[btf_map]
pub static CONFIG: Array<GlobalConfig, 1> = Array::new();

/// Per-CPU counters indexed by `vpnlb_common::counters` ids.
#[btf_map]
pub static STATS: PerCpuArray<u64, { NUM_COUNTERS as usize }> = PerCpuArray::new();

/// Per-CPU forwarded packets/bytes per VIP id.
#[btf_map]
pub static VIP_STATS: PerCpuArray<PktBytes, { MAX_VIPS as usize }> = PerCpuArray::new();

/// Per-CPU forwarded packets/bytes per backend id.
#[btf_map]
pub static BACKEND_STATS: PerCpuArray<PktBytes, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// Per-CPU session-insert flood guard window.
#[btf_map]
pub static FLOOD: PerCpuArray<FloodState, 1> = PerCpuArray::new();

/// Learned session id (per VIP address and kind) → the backend whose session carried it. One
/// shared LRU list: inserts happen only when an id is new or moved, never per packet.
#[btf_map]
pub static SESSION_IDS: LruHashMap<IdKey, u32, { DEFAULT_MAX_SESSION_IDS as usize }> =
    LruHashMap::new();

/// Static id ranges of the backends (prefixes of kind + id wire bytes) → backend id; written by
/// the agent from each backend's configured SPI range or label.
#[btf_map]
pub static ID_RANGES: LpmTrie<IdRangeData, u32, { MAX_ID_RANGES as usize }> = LpmTrie::new();

/// Fragmented datagram → where its first fragment went (backend, hash, time), for the later ones.
#[btf_map]
pub static FRAGS: LruHashMap<FragKey, Session, { DEFAULT_MAX_FRAGS as usize }> = LruHashMap::new();

/// (VIP address, port 0, protocol) → the VIP whose settings later fragments (no ports) use.
#[btf_map]
pub static FRAG_VIPS: HashMap<VipKey, VipKey, { MAX_VIPS as usize }> = HashMap::new();

/// New sessions and learned ids for the agent (a cluster member replicates them to its peers);
/// written only with `GlobalConfig::replicate`.
#[btf_map]
pub static EVENTS: RingBuf<ReplEvent, { EVENTS_BYTES as usize }> = RingBuf::new();
