//! The map boundary: the [`MapWriter`] / [`MapReader`] traits and their errors, with two
//! implementations: [`AyaMaps`] over the real (loaded or pinned) maps (`aya_maps.rs`, with the raw
//! bpf(2) commands aya lacks in `sys.rs`) and [`MemMaps`], the in-memory map set that unit tests
//! and the reference model run on (`mem.rs`). What the kernel decides beyond plain maps (LRU
//! eviction, ring lookups) is modelled in `model/kernel.rs`.

mod aya_maps;
mod mem;
mod recording;
mod sys;

pub use aya_maps::AyaMaps;
pub use mem::{MemMaps, SimEnv};
pub use recording::Recording;

use std::io;
use std::path::PathBuf;

use vpnlb_common::maglev::SlotChange;
use vpnlb_common::{
    Backend, FlowKey, FragKey, GlobalConfig, IdKey, MAX_VIPS, PktBytes, RING_SIZE_MAX, Session,
    VipKey, VipMeta,
};

use crate::dataplane::session_ids::IdPrefix;

/// aya's own map error (the source of most of ours).
pub use aya::maps::MapError as AyaMapError;

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("map {map} not found in the loaded object")]
    Missing { map: &'static str },
    #[error("map {map} has an unexpected type or layout")]
    Layout {
        map: &'static str,
        #[source]
        source: AyaMapError,
    },
    #[error("cannot open pinned map {path}")]
    OpenPin {
        path: PathBuf,
        #[source]
        source: AyaMapError,
    },
    #[error("{op} on map {map} failed")]
    Op {
        map: &'static str,
        op: &'static str,
        #[source]
        source: AyaMapError,
    },
    #[error("{op} on map {map} failed")]
    Sys {
        map: &'static str,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what} {index} out of range (limit {limit})")]
    OutOfRange {
        what: &'static str,
        index: u64,
        limit: u64,
    },
}

/// Writes the maps the agent owns. Every call is one logical change; callers order calls
/// make-before-break (see `dataplane`).
pub trait MapWriter {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<(), MapError>;
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapError>;
    /// Writes `Backend::default()` (state `BACKEND_UNUSED`).
    fn clear_backend(&mut self, id: u32) -> Result<(), MapError>;
    fn write_ring(&mut self, ring_id: u32, changes: &[SlotChange]) -> Result<(), MapError>;
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), MapError>;
    /// Removing an absent VIP is not an error.
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), MapError>;
    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), MapError>;
    fn remove_tx_port(&mut self, ifindex: u32) -> Result<(), MapError>;
    fn set_session(&mut self, key: &FlowKey, s: &Session) -> Result<(), MapError>;
    fn remove_session(&mut self, key: &FlowKey) -> Result<(), MapError>;
    /// `CLASS_RINGS[vip_id * 64 + dscp] = ring_plus1` (class ring id + 1; 0 = the VIP's ring).
    fn set_class_ring(&mut self, vip_id: u32, dscp: u8, ring_plus1: u32) -> Result<(), MapError>;
    /// `SESSION_IDS[key] = backend_id` (the data plane learns these; tests seed them).
    fn set_session_id(&mut self, key: &IdKey, backend_id: u32) -> Result<(), MapError>;
    /// Removing an absent id is not an error.
    fn remove_session_id(&mut self, key: &IdKey) -> Result<(), MapError>;
    /// `ID_RANGES[prefix] = backend_id`: a backend's static id range.
    fn set_id_range(&mut self, prefix: &IdPrefix, backend_id: u32) -> Result<(), MapError>;
    /// Removing an absent prefix is not an error.
    fn remove_id_range(&mut self, prefix: &IdPrefix) -> Result<(), MapError>;
    /// `FRAG_VIPS[portless] = vip`: later fragments to `portless` (port 0) use VIP `vip`.
    fn set_frag_vip(&mut self, portless: &VipKey, vip: &VipKey) -> Result<(), MapError>;
    /// Removing an absent entry is not an error.
    fn remove_frag_vip(&mut self, portless: &VipKey) -> Result<(), MapError>;
}

/// Reads every map (the CLI, tests, and [`MemMaps::snapshot`]).
pub trait MapReader {
    fn config(&self) -> Result<GlobalConfig, MapError>;
    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, MapError>;
    /// `Backend::default()` when never written.
    fn backend(&self, id: u32) -> Result<Backend, MapError>;
    /// Every backend whose state is not `BACKEND_UNUSED`, by id.
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError>;
    /// The first `size` slots of ring row `ring_id`.
    fn ring(&self, ring_id: u32, size: u32) -> Result<Vec<u32>, MapError>;
    fn ring_slot(&self, ring_id: u32, slot: u32) -> Result<u32, MapError>;
    fn session(&self, key: &FlowKey) -> Result<Option<Session>, MapError>;
    fn sessions(&self) -> Result<Vec<(FlowKey, Session)>, MapError>;
    fn tx_port(&self, ifindex: u32) -> Result<bool, MapError>;
    /// `NUM_COUNTERS` values, summed over CPUs.
    fn counters(&self) -> Result<Vec<u64>, MapError>;
    /// Summed over CPUs.
    fn vip_stats(&self, vip_id: u32) -> Result<PktBytes, MapError>;
    /// Summed over CPUs.
    fn backend_stats(&self, id: u32) -> Result<PktBytes, MapError>;
    /// `CLASS_RINGS[vip_id * 64 + dscp]`: class ring id + 1, or 0.
    fn class_ring(&self, vip_id: u32, dscp: u8) -> Result<u32, MapError>;
    /// How many ring rows `RINGS` holds (its max_entries / `RING_SIZE_MAX`).
    fn ring_rows(&self) -> Result<u32, MapError> {
        Ok(MAX_VIPS)
    }
    /// Every learned session id and its backend.
    fn session_ids(&self) -> Result<Vec<(IdKey, u32)>, MapError>;
    /// Every static id range prefix and its backend.
    fn id_ranges(&self) -> Result<Vec<(IdPrefix, u32)>, MapError>;
    /// Every fragment record (first fragment's backend, hash, time).
    fn frags(&self) -> Result<Vec<(FragKey, Session)>, MapError>;
    /// Every `FRAG_VIPS` entry.
    fn frag_vips(&self) -> Result<Vec<(VipKey, VipKey)>, MapError>;
}

fn check_ring(ring_id: u32, slot: u32, rows: u32) -> Result<u32, MapError> {
    if ring_id >= rows {
        return Err(MapError::OutOfRange {
            what: "ring id",
            index: ring_id.into(),
            limit: rows.into(),
        });
    }
    if slot >= RING_SIZE_MAX {
        return Err(MapError::OutOfRange {
            what: "ring slot",
            index: slot.into(),
            limit: RING_SIZE_MAX.into(),
        });
    }
    Ok(ring_id * RING_SIZE_MAX + slot)
}

fn check_ring_size(size: u32) -> Result<(), MapError> {
    if size > RING_SIZE_MAX {
        return Err(MapError::OutOfRange {
            what: "ring size",
            index: size.into(),
            limit: RING_SIZE_MAX.into(),
        });
    }
    Ok(())
}

fn check_id(what: &'static str, id: u32, limit: u32) -> Result<usize, MapError> {
    if id >= limit {
        return Err(MapError::OutOfRange {
            what,
            index: id.into(),
            limit: limit.into(),
        });
    }
    Ok(id as usize)
}

fn sum_pkt_bytes<'a>(values: impl IntoIterator<Item = &'a PktBytes>) -> PktBytes {
    values
        .into_iter()
        .fold(PktBytes::default(), |acc, v| PktBytes {
            packets: acc.packets.wrapping_add(v.packets),
            bytes: acc.bytes.wrapping_add(v.bytes),
        })
}
