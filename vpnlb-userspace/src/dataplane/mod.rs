//! The typed programming API over any [`MapWriter`]: backends, VIPs and their Maglev rings,
//! validated in full before anything is written and applied make-before-break.
//!
//! Every call plans first (validation, new Maglev tables and their deltas against the installed
//! ones) and only then writes, in this order: TX ports and backends, ring slots, VIP entries; then
//! the breaking half: VIP removals, rings zeroed or trimmed, backends cleared, TX ports removed.
//! A ring's members are the VIP's listed backends in state `BACKEND_UP`; a backend's Maglev key is
//! its address octets, so hosts with the same configuration build the same tables.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use vpnlb_common::maglev::{self, MaglevBackend, MaglevError, SlotChange};
use vpnlb_common::{
    BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP, Backend, DSCP_VALUES, FAMILY_V4, FAMILY_V6,
    FWD_MODE_GUE, FWD_MODE_IPIP, FWD_MODE_L2DSR, GlobalConfig, MAX_BACKENDS, MAX_VIPS, PROTO_ESP,
    PROTO_TCP, PROTO_UDP, RING_SIZE_MAX, VIP_F_CLASSES, VIP_F_HASH_SRC_ONLY, VIP_F_IDS, VipKey,
    VipMeta, addr_words, words_addr,
};

pub mod attach;
pub mod loader;
pub mod maps;
pub mod model;
pub mod session_ids;

use crate::dataplane::maps::{MapError, MapWriter};
use crate::dataplane::session_ids::IdPrefix;

/// A VIP key for messages: `udp 192.0.2.1:4500`, `esp [2001:db8::1]`.
pub fn vip_label(key: &VipKey) -> String {
    let proto = match key.proto {
        PROTO_UDP => "udp".to_string(),
        PROTO_TCP => "tcp".to_string(),
        PROTO_ESP => "esp".to_string(),
        p => format!("proto{p}"),
    };
    let ip = if key.family == FAMILY_V4 || key.family == FAMILY_V6 {
        words_addr(key.addr, key.family).to_string()
    } else {
        format!("family{}:{:08x?}", key.family, key.addr)
    };
    let ip = if key.family == FAMILY_V6 {
        format!("[{ip}]")
    } else {
        ip
    };
    if key.proto == PROTO_ESP && key.port_be == 0 {
        format!("{proto} {ip}")
    } else {
        format!("{proto} {ip}:{}", u16::from_be(key.port_be))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("backend id {id} out of range 1..{}", MAX_BACKENDS)]
    BadBackendId { id: u32 },
    #[error("unknown backend {id}")]
    UnknownBackend { id: u32 },
    #[error("backend {id}: bad state {state} (want up 1, draining 2 or down 3)")]
    BadState { id: u32, state: u32 },
    #[error("backend {id} is still listed by vip {vip}")]
    BackendInUse { id: u32, vip: String },
    #[error("vip {vip}: {reason}")]
    BadVipKey { vip: String, reason: &'static str },
    #[error("vip {vip}: vip_id {vip_id} out of range 0..{}", MAX_VIPS)]
    BadVipId { vip: String, vip_id: u32 },
    #[error("vip {vip}: ring_id {ring_id} out of range 0..{rows}")]
    BadRingId {
        vip: String,
        ring_id: u32,
        rows: u32,
    },
    #[error("vip {vip}: ring size {size} is not a prime in 3..={}", RING_SIZE_MAX)]
    BadRingSize { vip: String, size: u32 },
    #[error("vip {vip}: unknown forwarding mode {mode}")]
    BadFwdMode { vip: String, mode: u32 },
    #[error("vip {vip}: unknown flags {flags:#x}")]
    BadFlags { vip: String, flags: u32 },
    #[error("vip {vip}: gue forwarding needs a gue_port")]
    NoGuePort { vip: String },
    #[error("vip {vip} lists unknown backend {id}")]
    VipUnknownBackend { vip: String, id: u32 },
    #[error("vip {vip} lists backend {id} twice")]
    DuplicateBackend { vip: String, id: u32 },
    #[error("vip {vip}: backends {a} and {b} share address {addr}")]
    DuplicateAddress {
        vip: String,
        a: u32,
        b: u32,
        addr: IpAddr,
    },
    #[error("vip {vip} and vip {other} share ring {ring_id} with different backends or ring size")]
    RingConflict {
        vip: String,
        other: String,
        ring_id: u32,
    },
    #[error("unknown vip {vip}")]
    UnknownVip { vip: String },
    #[error("vip {vip}: bad traffic class: {reason}")]
    BadClass { vip: String, reason: String },
    #[error("maglev table for ring {ring_id}")]
    Maglev {
        ring_id: u32,
        #[source]
        source: MaglevError,
    },
    #[error("map write failed")]
    Map {
        #[from]
        source: MapError,
    },
}

/// A backend as the agent describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    /// `1..MAX_BACKENDS`.
    pub id: u32,
    pub addr: IpAddr,
    /// Next-hop MAC (the gateway's for L2 DSR, the router's towards it for encapsulation).
    pub mac: [u8; 6],
    /// The egress interface's own MAC.
    pub src_mac: [u8; 6],
    /// Egress interface; 0 = out of the ingress interface. Non-zero ones get a `TX_PORTS` entry.
    pub ifindex: u32,
    pub weight: u32,
    /// `BACKEND_UP`, `BACKEND_DRAINING` or `BACKEND_DOWN`.
    pub state: u32,
}

impl BackendSpec {
    /// The `BACKENDS` value.
    pub fn to_backend(&self) -> Backend {
        let (addr, family) = addr_words(self.addr);
        Backend {
            addr,
            mac: self.mac,
            src_mac: self.src_mac,
            ifindex: self.ifindex,
            weight: self.weight,
            state: self.state,
            family,
            _pad: [0; 3],
            _reserved: 0,
        }
    }

    /// Identity in the Maglev table: the address octets.
    pub fn maglev_key(&self) -> Vec<u8> {
        match self.addr {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }
    }
}

/// A VIP (one address/port/protocol) as the agent describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub key: VipKey,
    /// Index into `VIP_STATS`, `0..MAX_VIPS`.
    pub vip_id: u32,
    /// Row of `RINGS`; VIP keys may share a row when they list the same backends (e.g. IKE 500,
    /// 4500 and ESP of one address).
    pub ring_id: u32,
    /// Maglev table size, a prime `<= RING_SIZE_MAX`.
    pub ring_size: u32,
    pub flags: u32,
    pub fwd_mode: u32,
    pub mtu: u32,
    pub idle_timeout_ns: u64,
    pub gue_port: u16,
    /// Backend ids; the `BACKEND_UP` ones form the ring.
    pub backends: Vec<u32>,
    /// Traffic classes: packets of a new flow whose DSCP is listed use the class's own ring (same
    /// `ring_size`). Non-empty sets `VIP_F_CLASSES` in the VIP entry.
    pub classes: Vec<ClassSpec>,
}

/// A traffic class of a VIP: its DSCP values and its own ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClassSpec {
    /// DSCP values (0..64) this class matches.
    pub dscp: Vec<u8>,
    /// Row of `RINGS` of this class (distinct from the VIP's).
    pub ring_id: u32,
    /// Backend ids; the `BACKEND_UP` ones form the class's ring.
    pub backends: Vec<u32>,
}

impl VipSpec {
    /// The `VIPS` value.
    pub fn meta(&self) -> VipMeta {
        VipMeta {
            vip_id: self.vip_id,
            ring_id: self.ring_id,
            ring_size: self.ring_size,
            flags: if self.classes.is_empty() {
                self.flags
            } else {
                self.flags | VIP_F_CLASSES
            },
            fwd_mode: self.fwd_mode,
            mtu: self.mtu,
            idle_timeout_ns: self.idle_timeout_ns,
            gue_port: self.gue_port,
            _pad: [0; 6],
        }
    }

    /// Every ring of this VIP: (ring id, size, members), its own first, then its classes'.
    pub fn rings(&self) -> Vec<(u32, u32, &[u32])> {
        std::iter::once((self.ring_id, self.ring_size, self.backends.as_slice()))
            .chain(
                self.classes
                    .iter()
                    .map(|c| (c.ring_id, self.ring_size, c.backends.as_slice())),
            )
            .collect()
    }

    /// Whether any ring of this VIP lists backend `id`.
    pub fn lists(&self, id: u32) -> bool {
        self.backends.contains(&id) || self.classes.iter().any(|c| c.backends.contains(&id))
    }

    /// DSCP -> class ring id + 1 (the `CLASS_RINGS` values of this VIP).
    fn class_map(&self) -> BTreeMap<u8, u32> {
        self.classes
            .iter()
            .flat_map(|c| c.dscp.iter().map(move |d| (*d, c.ring_id + 1)))
            .collect()
    }
}

/// `CLASS_RINGS` writes taking `old` to `new` (either may be absent): (vip_id, dscp, value) to set
/// before the VIP entry, and (vip_id, dscp) to clear after it.
fn plan_classes(plan: &mut Plan, old: Option<&VipSpec>, new: Option<&VipSpec>) {
    let old_map = old.map(VipSpec::class_map).unwrap_or_default();
    let new_map = new.map(VipSpec::class_map).unwrap_or_default();
    let old_id = old.map(|o| o.vip_id);
    let new_id = new.map(|n| n.vip_id);
    if let Some(vid) = new_id {
        for (dscp, val) in &new_map {
            if old_id != Some(vid) || old_map.get(dscp) != Some(val) {
                plan.class_set.push((vid, *dscp, *val));
            }
        }
    }
    if let Some(vid) = old_id {
        for dscp in old_map.keys() {
            if old_id != new_id || !new_map.contains_key(dscp) {
                plan.class_clear.push((vid, *dscp));
            }
        }
    }
}

/// What one call wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Ring slots written (delta slots, zeroing and trimming included).
    pub ring_slots_written: usize,
    /// Other map entries written or deleted (backends, VIPs, TX ports).
    pub maps_written: usize,
}

/// Everything one call will write, in make-before-break order.
#[derive(Default)]
struct Plan {
    tx_add: Vec<u32>,
    backend_set: Vec<(u32, Backend)>,
    /// ring_id -> (new table, delta against the installed one).
    ring_set: BTreeMap<u32, (Vec<u32>, Vec<SlotChange>)>,
    /// `CLASS_RINGS` entries to point at class rings (after the rings, before the VIP entries).
    class_set: Vec<(u32, u8, u32)>,
    vip_set: Vec<(VipKey, VipMeta)>,
    vip_remove: Vec<VipKey>,
    /// `CLASS_RINGS` entries to zero (after the VIP entries, before the rings are released).
    class_clear: Vec<(u32, u8)>,
    /// ring_id -> slots to zero; `true` when the ring is dropped entirely.
    ring_clear: BTreeMap<u32, (Vec<SlotChange>, bool)>,
    backend_clear: Vec<u32>,
    tx_remove: Vec<u32>,
}

/// The programmed state of the data plane, written through `W`.
pub struct Dataplane<W: MapWriter> {
    writer: W,
    ring_rows: u32,
    backends: BTreeMap<u32, BackendSpec>,
    vips: HashMap<VipKey, VipSpec>,
    /// Installed Maglev tables (length = the ring size they were built for). Always what the
    /// map holds: updated per successful ring write, dropped when a ring write fails.
    rings: HashMap<u32, Vec<u32>>,
    /// Installed `ID_RANGES` entries (static session-id ranges of the backends).
    id_ranges: BTreeMap<IdPrefix, u32>,
    /// Installed `FRAG_VIPS` entries.
    frag_vips: HashMap<VipKey, VipKey>,
    /// A write failed part-way: the next call rewrites every backend, VIP and TX port.
    dirty: bool,
}

impl<W: MapWriter> Dataplane<W> {
    /// A data plane with nothing installed yet, `MAX_VIPS` ring rows.
    pub fn new(writer: W) -> Self {
        Self::with_ring_rows(writer, MAX_VIPS)
    }

    /// As [`Dataplane::new`] for maps loaded with `LoadOptions::ring_rows = Some(rows)`.
    pub fn with_ring_rows(writer: W, rows: u32) -> Self {
        Dataplane {
            writer,
            ring_rows: rows.min(MAX_VIPS),
            backends: BTreeMap::new(),
            vips: HashMap::new(),
            rings: HashMap::new(),
            id_ranges: BTreeMap::new(),
            frag_vips: HashMap::new(),
            dirty: false,
        }
    }

    pub fn writer(&self) -> &W {
        &self.writer
    }
    pub fn writer_mut(&mut self) -> &mut W {
        &mut self.writer
    }
    pub fn into_writer(self) -> W {
        self.writer
    }

    pub fn backend(&self, id: u32) -> Option<&BackendSpec> {
        self.backends.get(&id)
    }
    pub fn backends(&self) -> impl Iterator<Item = &BackendSpec> {
        self.backends.values()
    }
    pub fn vip(&self, key: &VipKey) -> Option<&VipSpec> {
        self.vips.get(key)
    }
    pub fn vips(&self) -> impl Iterator<Item = &VipSpec> {
        self.vips.values()
    }

    /// The table last written to ring `ring_id`, if any.
    pub fn installed_ring(&self, ring_id: u32) -> Option<&[u32]> {
        self.rings.get(&ring_id).map(Vec::as_slice)
    }

    pub fn set_config(&mut self, cfg: GlobalConfig) -> Result<(), DataplaneError> {
        self.writer.set_config(&cfg)?;
        Ok(())
    }

    /// Adds or changes a backend. If its address, weight or state changed, the rings of every VIP
    /// listing it are rebuilt in the same call (after the backend entry is written).
    pub fn upsert_backend(&mut self, spec: BackendSpec) -> Result<ApplyReport, DataplaneError> {
        check_backend_id(spec.id)?;
        check_state(spec.id, spec.state)?;
        let old = self.backends.get(&spec.id).cloned();
        let mut backends = self.backends.clone();
        backends.insert(spec.id, spec.clone());
        // Address collisions inside any VIP that lists this backend.
        for v in self.vips.values().filter(|v| v.lists(spec.id)) {
            check_addresses(v, &backends)?;
        }
        let mut plan = Plan::default();
        let b = spec.to_backend();
        if old.as_ref().map(BackendSpec::to_backend) != Some(b) {
            plan.backend_set.push((spec.id, b));
        }
        let ring_relevant = match &old {
            Some(o) => o.addr != spec.addr || o.weight != spec.weight || o.state != spec.state,
            None => true,
        };
        if ring_relevant {
            self.plan_rings_of(&mut plan, &backends, &self.vips, |v| v.lists(spec.id))?;
        }
        self.plan_tx_ports(&mut plan, &backends);
        self.apply(plan, backends, self.vips.clone())
    }

    /// Changes a backend's state (up, draining, down) and rewrites the rings listing it.
    pub fn set_backend_state(
        &mut self,
        id: u32,
        state: u32,
    ) -> Result<ApplyReport, DataplaneError> {
        check_backend_id(id)?;
        let mut spec = self
            .backends
            .get(&id)
            .cloned()
            .ok_or(DataplaneError::UnknownBackend { id })?;
        check_state(id, state)?;
        spec.state = state;
        self.upsert_backend(spec)
    }

    /// Makes `ID_RANGES` hold exactly `want` (prefix -> backend id): new and changed entries
    /// first, stale ones after, so a range moving between backends never has a gap. Call it after
    /// the backends it names exist and before removing a backend it no longer names.
    pub fn set_id_ranges(
        &mut self,
        want: &[(IdPrefix, u32)],
    ) -> Result<ApplyReport, DataplaneError> {
        for (_, id) in want {
            check_backend_id(*id)?;
        }
        let want: BTreeMap<IdPrefix, u32> = want.iter().copied().collect();
        let mut r = ApplyReport::default();
        for (p, id) in &want {
            if self.id_ranges.get(p) != Some(id) {
                self.writer.set_id_range(p, *id)?;
                self.id_ranges.insert(*p, *id);
                r.maps_written += 1;
            }
        }
        let stale: Vec<IdPrefix> = self
            .id_ranges
            .keys()
            .filter(|p| !want.contains_key(p))
            .copied()
            .collect();
        for p in stale {
            self.writer.remove_id_range(&p)?;
            self.id_ranges.remove(&p);
            r.maps_written += 1;
        }
        Ok(r)
    }

    /// Removes a backend no VIP lists any more (its entry is cleared, its TX port released).
    pub fn remove_backend(&mut self, id: u32) -> Result<ApplyReport, DataplaneError> {
        check_backend_id(id)?;
        if !self.backends.contains_key(&id) {
            return Err(DataplaneError::UnknownBackend { id });
        }
        if let Some(v) = self.vips.values().find(|v| v.lists(id)) {
            return Err(DataplaneError::BackendInUse {
                id,
                vip: vip_label(&v.key),
            });
        }
        let mut backends = self.backends.clone();
        backends.remove(&id);
        let mut plan = Plan::default();
        plan.backend_clear.push(id);
        self.plan_tx_ports(&mut plan, &backends);
        self.apply(plan, backends, self.vips.clone())
    }

    /// Adds or changes a VIP: its ring is written (delta only) before the VIP entry; a ring it
    /// no longer uses is zeroed afterwards, a shrunk ring trimmed.
    pub fn upsert_vip(&mut self, spec: VipSpec) -> Result<ApplyReport, DataplaneError> {
        self.upsert_vips(vec![spec])
    }

    /// Adds or changes several VIPs at once, validated together: the way to change the backends
    /// of a ring that several VIP keys share (one at a time would conflict with the others).
    pub fn upsert_vips(&mut self, specs: Vec<VipSpec>) -> Result<ApplyReport, DataplaneError> {
        for (i, spec) in specs.iter().enumerate() {
            self.check_vip(spec)?;
            if specs[..i].iter().any(|o| o.key == spec.key) {
                return Err(DataplaneError::BadVipKey {
                    vip: vip_label(&spec.key),
                    reason: "listed twice",
                });
            }
        }
        let mut vips = self.vips.clone();
        let mut olds = Vec::new();
        for spec in &specs {
            olds.push(vips.insert(spec.key, spec.clone()));
        }
        check_ring_sharing(&vips)?;
        let mut plan = Plan::default();
        let touched: BTreeSet<u32> = specs
            .iter()
            .flat_map(|s| s.rings().into_iter().map(|r| r.0))
            .collect();
        self.plan_rings_of(&mut plan, &self.backends, &vips, |v| {
            v.rings().iter().any(|r| touched.contains(&r.0))
        })?;
        for (spec, old) in specs.iter().zip(&olds) {
            plan_classes(&mut plan, old.as_ref(), Some(spec));
            if old.as_ref().map(VipSpec::meta) != Some(spec.meta()) {
                plan.vip_set.push((spec.key, spec.meta()));
            }
        }
        let released: BTreeSet<u32> = olds
            .iter()
            .flatten()
            .flat_map(|o| o.rings().into_iter().map(|r| r.0))
            .collect();
        for ring_id in released {
            self.plan_ring_release(&mut plan, ring_id, &vips);
        }
        let mut r = self.apply(plan, self.backends.clone(), vips)?;
        r.maps_written += self.sync_frag_vips()?;
        Ok(r)
    }

    /// Removes a VIP entry, then zeroes its ring unless another VIP key shares it.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<ApplyReport, DataplaneError> {
        let mut vips = self.vips.clone();
        let old = vips.remove(key).ok_or_else(|| DataplaneError::UnknownVip {
            vip: vip_label(key),
        })?;
        let mut plan = Plan::default();
        plan.vip_remove.push(*key);
        plan_classes(&mut plan, Some(&old), None);
        for (ring_id, _, _) in old.rings() {
            self.plan_ring_release(&mut plan, ring_id, &vips);
        }
        let mut r = self.apply(plan, self.backends.clone(), vips)?;
        r.maps_written += self.sync_frag_vips()?;
        Ok(r)
    }

    /// Brings `FRAG_VIPS` in line with the installed VIPs: for every (address, protocol) the VIP
    /// with the lowest port (ESP: itself) serves later fragments, which carry no ports. Written
    /// after the VIP entries it names; returns the entries written or removed.
    fn sync_frag_vips(&mut self) -> Result<usize, DataplaneError> {
        let mut want: HashMap<VipKey, VipKey> = HashMap::new();
        for k in self.vips.keys() {
            let portless = VipKey { port_be: 0, ..*k };
            let e = want.entry(portless).or_insert(*k);
            if u16::from_be(k.port_be) < u16::from_be(e.port_be) {
                *e = *k;
            }
        }
        let mut n = 0;
        for (portless, vip) in &want {
            if self.frag_vips.get(portless) != Some(vip) {
                self.writer.set_frag_vip(portless, vip)?;
                self.frag_vips.insert(*portless, *vip);
                n += 1;
            }
        }
        let stale: Vec<VipKey> = self
            .frag_vips
            .keys()
            .filter(|k| !want.contains_key(k))
            .copied()
            .collect();
        for k in stale {
            self.writer.remove_frag_vip(&k)?;
            self.frag_vips.remove(&k);
            n += 1;
        }
        Ok(n)
    }

    fn check_vip(&self, spec: &VipSpec) -> Result<(), DataplaneError> {
        let vip = || vip_label(&spec.key);
        let bad_key = |reason| Err(DataplaneError::BadVipKey { vip: vip(), reason });
        let k = &spec.key;
        match k.family {
            FAMILY_V4 if k.addr[1..] != [0, 0, 0] => {
                return bad_key("ipv4 key with non-zero words 1-3");
            }
            FAMILY_V4 | FAMILY_V6 => {}
            _ => return bad_key("family must be 4 or 6"),
        }
        match k.proto {
            PROTO_UDP | PROTO_TCP => {}
            PROTO_ESP if k.port_be != 0 => return bad_key("esp vips have port 0"),
            PROTO_ESP => {}
            _ => return bad_key("protocol must be udp, tcp or esp"),
        }
        if spec.vip_id >= MAX_VIPS {
            return Err(DataplaneError::BadVipId {
                vip: vip(),
                vip_id: spec.vip_id,
            });
        }
        if spec.ring_id >= self.ring_rows {
            return Err(DataplaneError::BadRingId {
                vip: vip(),
                ring_id: spec.ring_id,
                rows: self.ring_rows,
            });
        }
        if spec.ring_size < 3 || spec.ring_size > RING_SIZE_MAX || !maglev::is_prime(spec.ring_size)
        {
            return Err(DataplaneError::BadRingSize {
                vip: vip(),
                size: spec.ring_size,
            });
        }
        if ![FWD_MODE_L2DSR, FWD_MODE_IPIP, FWD_MODE_GUE].contains(&spec.fwd_mode) {
            return Err(DataplaneError::BadFwdMode {
                vip: vip(),
                mode: spec.fwd_mode,
            });
        }
        if spec.fwd_mode == FWD_MODE_GUE && spec.gue_port == 0 {
            return Err(DataplaneError::NoGuePort { vip: vip() });
        }
        // At most one session-id protocol: the data plane parses a packet one way.
        let ids = spec.flags & VIP_F_IDS;
        if spec.flags & !(VIP_F_HASH_SRC_ONLY | VIP_F_IDS) != 0 || ids.count_ones() > 1 {
            return Err(DataplaneError::BadFlags {
                vip: vip(),
                flags: spec.flags,
            });
        }
        for (i, id) in spec.backends.iter().enumerate() {
            if !self.backends.contains_key(id) {
                return Err(DataplaneError::VipUnknownBackend {
                    vip: vip(),
                    id: *id,
                });
            }
            if spec.backends[..i].contains(id) {
                return Err(DataplaneError::DuplicateBackend {
                    vip: vip(),
                    id: *id,
                });
            }
        }
        let mut seen_dscp = BTreeSet::new();
        let mut seen_rings = BTreeSet::from([spec.ring_id]);
        for c in &spec.classes {
            if c.ring_id >= self.ring_rows {
                return Err(DataplaneError::BadRingId {
                    vip: vip(),
                    ring_id: c.ring_id,
                    rows: self.ring_rows,
                });
            }
            if !seen_rings.insert(c.ring_id) {
                return Err(DataplaneError::BadClass {
                    vip: vip(),
                    reason: format!("ring {} used twice", c.ring_id),
                });
            }
            if c.dscp.is_empty() {
                return Err(DataplaneError::BadClass {
                    vip: vip(),
                    reason: format!("class on ring {} matches no DSCP", c.ring_id),
                });
            }
            for d in &c.dscp {
                if u32::from(*d) >= DSCP_VALUES || !seen_dscp.insert(*d) {
                    return Err(DataplaneError::BadClass {
                        vip: vip(),
                        reason: format!("dscp {d} out of range or in two classes"),
                    });
                }
            }
            for (i, id) in c.backends.iter().enumerate() {
                if !self.backends.contains_key(id) {
                    return Err(DataplaneError::VipUnknownBackend {
                        vip: vip(),
                        id: *id,
                    });
                }
                if c.backends[..i].contains(id) {
                    return Err(DataplaneError::DuplicateBackend {
                        vip: vip(),
                        id: *id,
                    });
                }
            }
        }
        check_addresses(spec, &self.backends)?;
        Ok(())
    }

    /// Plans new tables for the rings of the VIPs in `vips` matching `which` (each ring once).
    fn plan_rings_of(
        &self,
        plan: &mut Plan,
        backends: &BTreeMap<u32, BackendSpec>,
        vips: &HashMap<VipKey, VipSpec>,
        which: impl Fn(&VipSpec) -> bool,
    ) -> Result<(), DataplaneError> {
        let mut rings: BTreeMap<u32, (u32, Vec<u32>)> = BTreeMap::new();
        for v in vips.values().filter(|v| which(v)) {
            for (ring_id, size, members) in v.rings() {
                rings.entry(ring_id).or_insert((size, members.to_vec()));
            }
        }
        self.plan_rings(plan, backends, rings)
    }

    fn plan_rings(
        &self,
        plan: &mut Plan,
        backends: &BTreeMap<u32, BackendSpec>,
        rings: BTreeMap<u32, (u32, Vec<u32>)>,
    ) -> Result<(), DataplaneError> {
        for (ring_id, (size, members)) in rings {
            let keys: Vec<(u32, Vec<u8>, u32)> = members
                .iter()
                .filter_map(|id| backends.get(id))
                .filter(|b| b.state == BACKEND_UP)
                .map(|b| (b.id, b.maglev_key(), b.weight))
                .collect();
            let mb: Vec<MaglevBackend<'_>> = keys
                .iter()
                .map(|(id, key, weight)| MaglevBackend {
                    id: *id,
                    key,
                    weight: *weight,
                })
                .collect();
            let installed = self.rings.get(&ring_id).map(Vec::as_slice).unwrap_or(&[]);
            let (table, delta) = maglev::build_with_delta(&mb, size, installed)
                .map_err(|source| DataplaneError::Maglev { ring_id, source })?;
            plan.ring_set.insert(ring_id, (table, delta));
        }
        Ok(())
    }

    /// After `vips` replaces the VIP set: zero ring `ring_id` if no VIP uses it any more, or trim
    /// the slots past its (new) size.
    fn plan_ring_release(&self, plan: &mut Plan, ring_id: u32, vips: &HashMap<VipKey, VipSpec>) {
        let Some(installed) = self.rings.get(&ring_id) else {
            return;
        };
        let new_size = vips
            .values()
            .find(|v| v.rings().iter().any(|r| r.0 == ring_id))
            .map(|v| v.ring_size as usize);
        let from = new_size.unwrap_or(0);
        let zero: Vec<SlotChange> = installed
            .iter()
            .enumerate()
            .skip(from)
            .filter(|(_, id)| **id != 0)
            .map(|(slot, _)| SlotChange {
                slot: slot as u32,
                backend_id: 0,
            })
            .collect();
        if new_size.is_none() || !zero.is_empty() {
            plan.ring_clear.insert(ring_id, (zero, new_size.is_none()));
        }
    }

    /// TX ports to add before and remove after, so every backend's egress interface is present.
    fn plan_tx_ports(&self, plan: &mut Plan, backends: &BTreeMap<u32, BackendSpec>) {
        let before = tx_ports_of(&self.backends);
        let after = tx_ports_of(backends);
        plan.tx_add = after.difference(&before).copied().collect();
        plan.tx_remove = before.difference(&after).copied().collect();
    }

    fn apply(
        &mut self,
        plan: Plan,
        backends: BTreeMap<u32, BackendSpec>,
        vips: HashMap<VipKey, VipSpec>,
    ) -> Result<ApplyReport, DataplaneError> {
        let mut plan = plan;
        if self.dirty {
            self.plan_everything(&mut plan, &backends, &vips)?;
        }
        match self.write(plan, &vips) {
            Ok(r) => {
                self.backends = backends;
                self.vips = vips;
                self.dirty = false;
                Ok(r)
            }
            Err(e) => {
                self.dirty = true;
                Err(e)
            }
        }
    }

    /// Adds to `plan` a write of every backend, TX port, VIP and ring of the given state.
    fn plan_everything(
        &self,
        plan: &mut Plan,
        backends: &BTreeMap<u32, BackendSpec>,
        vips: &HashMap<VipKey, VipSpec>,
    ) -> Result<(), DataplaneError> {
        let mut extra = Plan::default();
        self.plan_rings_of(&mut extra, backends, vips, |_| true)?;
        for (ring_id, v) in extra.ring_set {
            plan.ring_set.entry(ring_id).or_insert(v);
        }
        let removed: BTreeSet<u32> = plan.tx_remove.iter().copied().collect();
        plan.tx_add = tx_ports_of(backends)
            .difference(&removed)
            .copied()
            .collect();
        plan.backend_set = backends.values().map(|b| (b.id, b.to_backend())).collect();
        plan.vip_set = vips.values().map(|v| (v.key, v.meta())).collect();
        for v in vips.values() {
            for (dscp, val) in v.class_map() {
                plan.class_set.push((v.vip_id, dscp, val));
            }
        }
        Ok(())
    }

    fn write(
        &mut self,
        plan: Plan,
        vips: &HashMap<VipKey, VipSpec>,
    ) -> Result<ApplyReport, DataplaneError> {
        let mut r = ApplyReport::default();
        let w = &mut self.writer;
        // Make: egress ports, backends, ring slots, VIP entries.
        for ifindex in &plan.tx_add {
            w.set_tx_port(*ifindex)?;
            r.maps_written += 1;
        }
        for (id, b) in &plan.backend_set {
            w.set_backend(*id, b)?;
            r.maps_written += 1;
        }
        for (ring_id, (table, delta)) in plan.ring_set {
            if delta.is_empty() {
                continue;
            }
            if let Err(e) = w.write_ring(ring_id, &delta) {
                // Part of the delta may be in: forget the table so the next write is a full one.
                self.rings.remove(&ring_id);
                return Err(e.into());
            }
            r.ring_slots_written += delta.len();
            self.rings.insert(ring_id, table);
        }
        for (vip_id, dscp, val) in &plan.class_set {
            w.set_class_ring(*vip_id, *dscp, *val)?;
            r.maps_written += 1;
        }
        for (key, meta) in &plan.vip_set {
            w.set_vip(key, meta)?;
            r.maps_written += 1;
        }
        // Break: VIP entries, class entries, ring slots, backends, egress ports.
        for key in &plan.vip_remove {
            w.remove_vip(key)?;
            r.maps_written += 1;
        }
        for (vip_id, dscp) in &plan.class_clear {
            w.set_class_ring(*vip_id, *dscp, 0)?;
            r.maps_written += 1;
        }
        for (ring_id, (zero, drop)) in plan.ring_clear {
            if zero.is_empty() {
                if drop {
                    self.rings.remove(&ring_id);
                }
                continue;
            }
            if let Err(e) = w.write_ring(ring_id, &zero) {
                self.rings.remove(&ring_id);
                return Err(e.into());
            }
            r.ring_slots_written += zero.len();
            if drop {
                self.rings.remove(&ring_id);
            } else if let Some(t) = self.rings.get_mut(&ring_id) {
                // The slots zeroed are past the new size; keep the table at that size.
                let size = vips
                    .values()
                    .find(|v| v.rings().iter().any(|r| r.0 == ring_id))
                    .map_or(t.len(), |v| v.ring_size as usize);
                t.truncate(size);
            }
        }
        for id in &plan.backend_clear {
            w.clear_backend(*id)?;
            r.maps_written += 1;
        }
        for ifindex in &plan.tx_remove {
            w.remove_tx_port(*ifindex)?;
            r.maps_written += 1;
        }
        Ok(r)
    }
}

fn check_backend_id(id: u32) -> Result<(), DataplaneError> {
    if id == 0 || id >= MAX_BACKENDS {
        return Err(DataplaneError::BadBackendId { id });
    }
    Ok(())
}

fn check_state(id: u32, state: u32) -> Result<(), DataplaneError> {
    if ![BACKEND_UP, BACKEND_DRAINING, BACKEND_DOWN].contains(&state) {
        return Err(DataplaneError::BadState { id, state });
    }
    Ok(())
}

/// Backends listed by one VIP must have distinct addresses (their Maglev keys).
fn check_addresses(
    v: &VipSpec,
    backends: &BTreeMap<u32, BackendSpec>,
) -> Result<(), DataplaneError> {
    for (_, _, members) in v.rings() {
        check_ring_addresses(v, members, backends)?;
    }
    Ok(())
}

fn check_ring_addresses(
    v: &VipSpec,
    members: &[u32],
    backends: &BTreeMap<u32, BackendSpec>,
) -> Result<(), DataplaneError> {
    let mut seen: HashMap<IpAddr, u32> = HashMap::new();
    for id in members {
        if let Some(b) = backends.get(id)
            && let Some(first) = seen.insert(b.addr, *id)
        {
            return Err(DataplaneError::DuplicateAddress {
                vip: vip_label(&v.key),
                a: first,
                b: *id,
                addr: b.addr,
            });
        }
    }
    Ok(())
}

/// Rings shared by several VIP keys (or their classes) must list the same backends (as a set) with
/// the same ring size.
fn check_ring_sharing(vips: &HashMap<VipKey, VipSpec>) -> Result<(), DataplaneError> {
    let mut by_ring: BTreeMap<u32, (&VipSpec, u32, BTreeSet<u32>)> = BTreeMap::new();
    for v in vips.values() {
        for (ring_id, size, members) in v.rings() {
            let set: BTreeSet<u32> = members.iter().copied().collect();
            match by_ring.get(&ring_id) {
                Some((first, fsize, fset)) if *fset != set || *fsize != size => {
                    let (a, b) = (vip_label(&first.key), vip_label(&v.key));
                    let (vip, other) = if a <= b { (a, b) } else { (b, a) };
                    return Err(DataplaneError::RingConflict {
                        vip,
                        other,
                        ring_id,
                    });
                }
                Some(_) => {}
                None => {
                    by_ring.insert(ring_id, (v, size, set));
                }
            }
        }
    }
    Ok(())
}

fn tx_ports_of(backends: &BTreeMap<u32, BackendSpec>) -> BTreeSet<u32> {
    backends
        .values()
        .map(|b| b.ifindex)
        .filter(|i| *i != 0)
        .collect()
}

#[cfg(test)]
mod tests;
