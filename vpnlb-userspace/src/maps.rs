//! The map boundary: [`MapWriter`] / [`MapReader`] traits, [`AyaMaps`] over the real (loaded or
//! pinned) maps, and [`MemMaps`], the in-memory map set that unit tests and the reference model
//! run on.
//!
//! Ring writes go through `BPF_MAP_UPDATE_BATCH` (one syscall per call, kernel >= 5.6) with a
//! per-slot fallback; aya 0.14 has no batch API, so that one syscall is issued here directly.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::xdp::{DevMap, DevMapHash, XdpMapError};
use aya::maps::{Array, HashMap as AyaHashMap, Map, MapData, PerCpuArray};
use vpnlb_common::maglev::SlotChange;
use vpnlb_common::{
    BACKEND_UNUSED, Backend, DEFAULT_MAX_FRAGS, DEFAULT_MAX_SESSION_IDS, DEFAULT_MAX_SESSIONS,
    DSCP_VALUES, FloodState, FlowKey, FragKey, GlobalConfig, IdKey, IdRangeData, MAX_BACKENDS,
    MAX_VIPS, NUM_COUNTERS, PktBytes, RING_SIZE_MAX, Session, VIP_F_CLASSES, VipKey, VipMeta,
    class_slot_index, map_names,
};

use crate::session_ids::IdPrefix;

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

fn is_enoent(e: &AyaMapError) -> bool {
    match e {
        AyaMapError::KeyNotFound | AyaMapError::ElementNotFound => true,
        AyaMapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// `TX_PORTS` as declared by the object: an array indexed by ifindex or a hash keyed by it.
enum TxPorts {
    Array(DevMap<MapData>),
    Hash(DevMapHash<MapData>),
}

/// The real maps, from a freshly loaded object or from the pin directory.
pub struct AyaMaps {
    config: Array<MapData, GlobalConfig>,
    vips: AyaHashMap<MapData, VipKey, VipMeta>,
    backends: Array<MapData, Backend>,
    rings: Array<MapData, u32>,
    class_rings: Array<MapData, u32>,
    sessions: AyaHashMap<MapData, FlowKey, Session>,
    tx_ports: TxPorts,
    stats: PerCpuArray<MapData, u64>,
    vip_stats: PerCpuArray<MapData, PktBytes>,
    backend_stats: PerCpuArray<MapData, PktBytes>,
    flood: PerCpuArray<MapData, FloodState>,
    session_ids: AyaHashMap<MapData, IdKey, u32>,
    id_ranges: LpmTrie<MapData, IdRangeData, u32>,
    frags: AyaHashMap<MapData, FragKey, Session>,
    frag_vips: AyaHashMap<MapData, VipKey, VipKey>,
    /// Cleared after the kernel refuses a batch operation; per-element calls from then on.
    batch: std::cell::Cell<bool>,
}

impl std::fmt::Debug for AyaMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AyaMaps")
            .field("ring_rows", &(self.rings.len() / RING_SIZE_MAX))
            .finish()
    }
}

fn typed<T: TryFrom<Map, Error = AyaMapError>>(name: &'static str, m: Map) -> Result<T, MapError> {
    T::try_from(m).map_err(|source| MapError::Layout { map: name, source })
}

impl AyaMaps {
    /// Takes every map out of a loaded object (the object's programs keep using them).
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> Result<Self, MapError> {
        Self::build(|name| ebpf.take_map(name).ok_or(MapError::Missing { map: name }))
    }

    /// Opens the maps pinned in `dir` (the CLI, or an agent restarted over live maps).
    pub fn open_pinned(dir: &Path) -> Result<Self, MapError> {
        Self::build(|name| {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).map_err(|source| MapError::OpenPin {
                path: path.clone(),
                source,
            })?;
            Map::from_map_data(data).map_err(|source| MapError::OpenPin { path, source })
        })
    }

    fn build(
        mut take: impl FnMut(&'static str) -> Result<Map, MapError>,
    ) -> Result<Self, MapError> {
        use map_names::*;
        let tx_ports = match take(TX_PORTS)? {
            m @ Map::DevMapHash(_) => TxPorts::Hash(typed(TX_PORTS, m)?),
            m => TxPorts::Array(typed(TX_PORTS, m)?),
        };
        Ok(AyaMaps {
            config: typed(CONFIG, take(CONFIG)?)?,
            vips: typed(VIPS, take(VIPS)?)?,
            backends: typed(BACKENDS, take(BACKENDS)?)?,
            rings: typed(RINGS, take(RINGS)?)?,
            class_rings: typed(CLASS_RINGS, take(CLASS_RINGS)?)?,
            sessions: typed(SESSIONS, take(SESSIONS)?)?,
            tx_ports,
            stats: typed(STATS, take(STATS)?)?,
            vip_stats: typed(VIP_STATS, take(VIP_STATS)?)?,
            backend_stats: typed(BACKEND_STATS, take(BACKEND_STATS)?)?,
            flood: typed(FLOOD, take(FLOOD)?)?,
            session_ids: typed(SESSION_IDS, take(SESSION_IDS)?)?,
            id_ranges: typed(ID_RANGES, take(ID_RANGES)?)?,
            frags: typed(FRAGS, take(FRAGS)?)?,
            frag_vips: typed(FRAG_VIPS, take(FRAG_VIPS)?)?,
            batch: std::cell::Cell::new(true),
        })
    }

    /// The per-CPU flood-guard state (one entry per possible CPU).
    pub fn flood(&self) -> Result<Vec<FloodState>, MapError> {
        let v = self.flood.get(&0, 0).map_err(|source| MapError::Op {
            map: map_names::FLOOD,
            op: "lookup",
            source,
        })?;
        Ok(v.iter().copied().collect())
    }

    /// Turns batch syscalls off (measurements and tests of the fallback path).
    pub fn set_batch(&mut self, enabled: bool) {
        self.batch.set(enabled);
    }

    fn rings_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        IterableMap::<u32, u32>::map(&self.rings).fd().as_fd()
    }

    /// Reads `n` consecutive entries of an array in one syscall; `None` when batch operations
    /// are off or unsupported (the caller falls back to per-entry lookups).
    fn batch_lookup<V: aya::Pod + Default>(
        &self,
        name: &'static str,
        array: &Array<MapData, V>,
        start: u32,
        n: u32,
    ) -> Option<Result<Vec<V>, MapError>> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        if !self.batch.get() {
            return None;
        }
        let data = IterableMap::<u32, V>::map(array);
        match sys::lookup_batch::<V>(data.fd().as_fd(), start, n) {
            Ok(v) => Some(Ok(v)),
            Err(e) if sys::batch_unsupported(&e) => {
                self.batch.set(false);
                None
            }
            Err(source) => Some(Err(MapError::Sys {
                map: name,
                op: "batch lookup",
                source,
            })),
        }
    }

    fn ring_op(op: &'static str, source: AyaMapError) -> MapError {
        MapError::Op {
            map: map_names::RINGS,
            op,
            source,
        }
    }

    fn write_slots(&mut self, keys: &[u32], values: &[u32]) -> Result<(), MapError> {
        let mut done = 0;
        if self.batch.get() {
            match sys::update_batch(self.rings_fd(), keys, values) {
                Ok(()) => return Ok(()),
                Err((n, e)) if sys::batch_unsupported(&e) => {
                    self.batch.set(false);
                    done = n;
                }
                Err((_, source)) => {
                    return Err(MapError::Sys {
                        map: map_names::RINGS,
                        op: "batch update",
                        source,
                    });
                }
            }
        }
        for (k, v) in keys[done..].iter().zip(&values[done..]) {
            self.rings
                .set(*k, v, 0)
                .map_err(|e| Self::ring_op("update", e))?;
        }
        Ok(())
    }
}

impl MapWriter for AyaMaps {
    fn set_class_ring(&mut self, vip_id: u32, dscp: u8, ring_plus1: u32) -> Result<(), MapError> {
        check_id("vip id", vip_id, MAX_VIPS)?;
        check_id("dscp", dscp.into(), DSCP_VALUES)?;
        let idx = class_slot_index(vip_id, dscp.into());
        self.class_rings
            .set(idx, ring_plus1, 0)
            .map_err(|source| MapError::Op {
                map: map_names::CLASS_RINGS,
                op: "update",
                source,
            })
    }

    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<(), MapError> {
        self.config.set(0, cfg, 0).map_err(|source| MapError::Op {
            map: map_names::CONFIG,
            op: "update",
            source,
        })
    }

    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapError> {
        check_id("backend id", id, MAX_BACKENDS)?;
        self.backends.set(id, b, 0).map_err(|source| MapError::Op {
            map: map_names::BACKENDS,
            op: "update",
            source,
        })
    }

    fn clear_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.set_backend(id, &Backend::default())
    }

    fn write_ring(&mut self, ring_id: u32, changes: &[SlotChange]) -> Result<(), MapError> {
        let rows = self.rings.len() / RING_SIZE_MAX;
        let mut keys = Vec::with_capacity(changes.len());
        let mut values = Vec::with_capacity(changes.len());
        for c in changes {
            keys.push(check_ring(ring_id, c.slot, rows)?);
            values.push(c.backend_id);
        }
        if keys.is_empty() {
            return Ok(());
        }
        self.write_slots(&keys, &values)
    }

    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), MapError> {
        self.vips
            .insert(key, meta, 0)
            .map_err(|source| MapError::Op {
                map: map_names::VIPS,
                op: "update",
                source,
            })
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        match self.vips.remove(key) {
            Err(e) if !is_enoent(&e) => Err(MapError::Op {
                map: map_names::VIPS,
                op: "delete",
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), MapError> {
        let r = match &mut self.tx_ports {
            TxPorts::Array(m) => m.set(ifindex, ifindex, None, 0),
            TxPorts::Hash(m) => m.insert(ifindex, ifindex, None, 0),
        };
        r.map_err(|e| MapError::Op {
            map: map_names::TX_PORTS,
            op: "update",
            source: match e {
                XdpMapError::MapError(e) => e,
                XdpMapError::ChainedProgramNotSupported => AyaMapError::ProgIdNotSupported,
            },
        })
    }

    fn remove_tx_port(&mut self, ifindex: u32) -> Result<(), MapError> {
        let r = match &mut self.tx_ports {
            TxPorts::Hash(m) => m.remove(ifindex),
            TxPorts::Array(m) => {
                if ifindex >= m.len() {
                    return Ok(());
                }
                use aya::maps::IterableMap;
                use std::os::fd::AsFd;
                let fd = IterableMap::<u32, _>::map(m).fd().as_fd();
                return match sys::delete_elem(fd, &ifindex) {
                    Err(e) if e.raw_os_error() != Some(libc::ENOENT) => Err(MapError::Sys {
                        map: map_names::TX_PORTS,
                        op: "delete",
                        source: e,
                    }),
                    _ => Ok(()),
                };
            }
        };
        match r {
            Err(e) if !is_enoent(&e) => Err(MapError::Op {
                map: map_names::TX_PORTS,
                op: "delete",
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn set_session(&mut self, key: &FlowKey, s: &Session) -> Result<(), MapError> {
        self.sessions
            .insert(key, s, 0)
            .map_err(|source| MapError::Op {
                map: map_names::SESSIONS,
                op: "update",
                source,
            })
    }

    fn remove_session(&mut self, key: &FlowKey) -> Result<(), MapError> {
        match self.sessions.remove(key) {
            Err(e) if !is_enoent(&e) => Err(MapError::Op {
                map: map_names::SESSIONS,
                op: "delete",
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn set_session_id(&mut self, key: &IdKey, backend_id: u32) -> Result<(), MapError> {
        self.session_ids
            .insert(key, backend_id, 0)
            .map_err(|source| MapError::Op {
                map: map_names::SESSION_IDS,
                op: "update",
                source,
            })
    }

    fn remove_session_id(&mut self, key: &IdKey) -> Result<(), MapError> {
        match self.session_ids.remove(key) {
            Err(e) if !is_enoent(&e) => Err(MapError::Op {
                map: map_names::SESSION_IDS,
                op: "delete",
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn set_id_range(&mut self, prefix: &IdPrefix, backend_id: u32) -> Result<(), MapError> {
        let key = LpmKey::new(prefix.prefix_len, prefix.data);
        self.id_ranges
            .insert(&key, backend_id, 0)
            .map_err(|source| MapError::Op {
                map: map_names::ID_RANGES,
                op: "update",
                source,
            })
    }

    fn remove_id_range(&mut self, prefix: &IdPrefix) -> Result<(), MapError> {
        let key = LpmKey::new(prefix.prefix_len, prefix.data);
        match self.id_ranges.remove(&key) {
            Err(e) if !is_enoent(&e) => Err(MapError::Op {
                map: map_names::ID_RANGES,
                op: "delete",
                source: e,
            }),
            _ => Ok(()),
        }
    }

    fn set_frag_vip(&mut self, portless: &VipKey, vip: &VipKey) -> Result<(), MapError> {
        self.frag_vips
            .insert(portless, vip, 0)
            .map_err(|source| MapError::Op {
                map: map_names::FRAG_VIPS,
                op: "update",
                source,
            })
    }

    fn remove_frag_vip(&mut self, portless: &VipKey) -> Result<(), MapError> {
        match self.frag_vips.remove(portless) {
            Err(e) if !is_enoent(&e) => Err(MapError::Op {
                map: map_names::FRAG_VIPS,
                op: "delete",
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

impl MapReader for AyaMaps {
    fn class_ring(&self, vip_id: u32, dscp: u8) -> Result<u32, MapError> {
        check_id("vip id", vip_id, MAX_VIPS)?;
        check_id("dscp", dscp.into(), DSCP_VALUES)?;
        self.class_rings
            .get(&class_slot_index(vip_id, dscp.into()), 0)
            .map_err(|source| MapError::Op {
                map: map_names::CLASS_RINGS,
                op: "lookup",
                source,
            })
    }

    fn config(&self) -> Result<GlobalConfig, MapError> {
        self.config.get(&0, 0).map_err(|source| MapError::Op {
            map: map_names::CONFIG,
            op: "lookup",
            source,
        })
    }

    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, MapError> {
        self.vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Op {
                map: map_names::VIPS,
                op: "iterate",
                source,
            })
    }

    fn backend(&self, id: u32) -> Result<Backend, MapError> {
        check_id("backend id", id, MAX_BACKENDS)?;
        self.backends.get(&id, 0).map_err(|source| MapError::Op {
            map: map_names::BACKENDS,
            op: "lookup",
            source,
        })
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        let n = self.backends.len().min(MAX_BACKENDS);
        let all: Vec<Backend> =
            match self.batch_lookup::<Backend>(map_names::BACKENDS, &self.backends, 0, n) {
                Some(v) => v?,
                None => (0..n)
                    .map(|id| self.backend(id))
                    .collect::<Result<_, _>>()?,
            };
        Ok(all
            .into_iter()
            .zip(0u32..)
            .filter(|(b, _)| b.state != BACKEND_UNUSED)
            .map(|(b, id)| (id, b))
            .collect())
    }

    fn ring(&self, ring_id: u32, size: u32) -> Result<Vec<u32>, MapError> {
        check_ring_size(size)?;
        let rows = self.rings.len() / RING_SIZE_MAX;
        let start = check_ring(ring_id, 0, rows)?;
        if size == 0 {
            return Ok(Vec::new());
        }
        if let Some(v) = self.batch_lookup::<u32>(map_names::RINGS, &self.rings, start, size) {
            return v;
        }
        (start..start + size)
            .map(|k| {
                self.rings
                    .get(&k, 0)
                    .map_err(|e| Self::ring_op("lookup", e))
            })
            .collect()
    }

    fn ring_slot(&self, ring_id: u32, slot: u32) -> Result<u32, MapError> {
        let rows = self.rings.len() / RING_SIZE_MAX;
        let k = check_ring(ring_id, slot, rows)?;
        self.rings
            .get(&k, 0)
            .map_err(|e| Self::ring_op("lookup", e))
    }

    fn session(&self, key: &FlowKey) -> Result<Option<Session>, MapError> {
        match self.sessions.get(key, 0) {
            Ok(s) => Ok(Some(s)),
            Err(e) if is_enoent(&e) => Ok(None),
            Err(source) => Err(MapError::Op {
                map: map_names::SESSIONS,
                op: "lookup",
                source,
            }),
        }
    }

    fn sessions(&self) -> Result<Vec<(FlowKey, Session)>, MapError> {
        self.sessions
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Op {
                map: map_names::SESSIONS,
                op: "iterate",
                source,
            })
    }

    fn tx_port(&self, ifindex: u32) -> Result<bool, MapError> {
        let r = match &self.tx_ports {
            TxPorts::Array(m) => {
                if ifindex >= m.len() {
                    return Ok(false);
                }
                m.get(ifindex, 0)
            }
            TxPorts::Hash(m) => m.get(ifindex, 0),
        };
        match r {
            Ok(v) => Ok(v.if_index != 0),
            Err(e) if is_enoent(&e) => Ok(false),
            Err(source) => Err(MapError::Op {
                map: map_names::TX_PORTS,
                op: "lookup",
                source,
            }),
        }
    }

    fn counters(&self) -> Result<Vec<u64>, MapError> {
        (0..NUM_COUNTERS)
            .map(|i| {
                let v = self.stats.get(&i, 0).map_err(|source| MapError::Op {
                    map: map_names::STATS,
                    op: "lookup",
                    source,
                })?;
                Ok(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
            })
            .collect()
    }

    fn vip_stats(&self, vip_id: u32) -> Result<PktBytes, MapError> {
        check_id("vip id", vip_id, self.vip_stats.len())?;
        let v = self
            .vip_stats
            .get(&vip_id, 0)
            .map_err(|source| MapError::Op {
                map: map_names::VIP_STATS,
                op: "lookup",
                source,
            })?;
        Ok(sum_pkt_bytes(v.iter()))
    }

    fn backend_stats(&self, id: u32) -> Result<PktBytes, MapError> {
        check_id("backend id", id, self.backend_stats.len())?;
        let v = self
            .backend_stats
            .get(&id, 0)
            .map_err(|source| MapError::Op {
                map: map_names::BACKEND_STATS,
                op: "lookup",
                source,
            })?;
        Ok(sum_pkt_bytes(v.iter()))
    }

    fn ring_rows(&self) -> Result<u32, MapError> {
        Ok(self.rings.len() / RING_SIZE_MAX)
    }

    fn session_ids(&self) -> Result<Vec<(IdKey, u32)>, MapError> {
        self.session_ids
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Op {
                map: map_names::SESSION_IDS,
                op: "iterate",
                source,
            })
    }

    fn id_ranges(&self) -> Result<Vec<(IdPrefix, u32)>, MapError> {
        self.id_ranges
            .iter()
            .map(|r| {
                r.map(|(k, v)| {
                    (
                        IdPrefix {
                            prefix_len: k.prefix_len(),
                            data: k.data(),
                        },
                        v,
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Op {
                map: map_names::ID_RANGES,
                op: "iterate",
                source,
            })
    }

    fn frags(&self) -> Result<Vec<(FragKey, Session)>, MapError> {
        self.frags
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Op {
                map: map_names::FRAGS,
                op: "iterate",
                source,
            })
    }

    fn frag_vips(&self) -> Result<Vec<(VipKey, VipKey)>, MapError> {
        self.frag_vips
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| MapError::Op {
                map: map_names::FRAG_VIPS,
                op: "iterate",
                source,
            })
    }
}

/// Things the kernel decides that plain maps cannot show; the reference model reads them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimEnv {
    /// Ring rows allocated (`RINGS` max_entries / `RING_SIZE_MAX`); lookups beyond miss.
    pub ring_rows: u32,
    /// `SESSIONS` capacity; a full table evicts its least recently seen entry (LRU).
    pub max_sessions: u32,
    /// `SESSION_IDS` capacity; a full table evicts one entry (the smallest key: the kernel's LRU
    /// choice is not modelled).
    pub max_session_ids: u32,
    /// `FRAGS` capacity; a full table evicts its oldest record.
    pub max_frags: u32,
    /// Bytes `bpf_xdp_adjust_head` may grow the frame by: `XDP_PACKET_HEADROOM` (256) minus the
    /// `struct xdp_frame` the kernel reserves at the start of the buffer (~40 bytes).
    pub headroom: u32,
    /// Make every session insert fail (`SESSION_INSERT_FAILED`).
    pub fail_session_insert: bool,
}

impl Default for SimEnv {
    fn default() -> Self {
        SimEnv {
            ring_rows: MAX_VIPS,
            max_sessions: DEFAULT_MAX_SESSIONS,
            max_session_ids: DEFAULT_MAX_SESSION_IDS,
            max_frags: DEFAULT_MAX_FRAGS,
            headroom: 216,
            fail_session_insert: false,
        }
    }
}

/// All maps in memory: the unit-test double of [`AyaMaps`] and the state the model runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemMaps {
    pub config: GlobalConfig,
    pub vips: HashMap<VipKey, VipMeta>,
    /// `MAX_BACKENDS` entries, indexed by id.
    pub backends: Vec<Backend>,
    /// ring_id -> `RING_SIZE_MAX` slots; rows exist once written (absent rows read as 0).
    pub rings: HashMap<u32, Vec<u32>>,
    /// `CLASS_RINGS` index (vip_id * 64 + dscp) -> class ring id + 1; absent = 0.
    pub class_rings: HashMap<u32, u32>,
    pub sessions: HashMap<FlowKey, Session>,
    /// `SESSION_IDS`: learned id -> backend id.
    pub session_ids: HashMap<IdKey, u32>,
    /// `ID_RANGES`: static prefix -> backend id (longest prefix wins).
    pub id_ranges: HashMap<IdPrefix, u32>,
    /// `FRAGS`: datagram -> first fragment's backend, hash and time.
    pub frags: HashMap<FragKey, Session>,
    /// `FRAG_VIPS`: (address, port 0, protocol) -> the VIP later fragments use.
    pub frag_vips: HashMap<VipKey, VipKey>,
    pub tx_ports: HashSet<u32>,
    /// `NUM_COUNTERS` entries (the model runs on one CPU).
    pub counters: Vec<u64>,
    pub vip_stats: HashMap<u32, PktBytes>,
    pub backend_stats: HashMap<u32, PktBytes>,
    pub flood: FloodState,
    pub env: SimEnv,
}

impl Default for MemMaps {
    fn default() -> Self {
        Self::new()
    }
}

impl MemMaps {
    pub fn new() -> Self {
        MemMaps {
            config: GlobalConfig::default(),
            vips: HashMap::new(),
            backends: vec![Backend::default(); MAX_BACKENDS as usize],
            rings: HashMap::new(),
            class_rings: HashMap::new(),
            sessions: HashMap::new(),
            session_ids: HashMap::new(),
            id_ranges: HashMap::new(),
            frags: HashMap::new(),
            frag_vips: HashMap::new(),
            tx_ports: HashSet::new(),
            counters: vec![0; NUM_COUNTERS as usize],
            vip_stats: HashMap::new(),
            backend_stats: HashMap::new(),
            flood: FloodState::default(),
            env: SimEnv::default(),
        }
    }

    /// Copies what a reader shows: config, VIPs and their rings (by each VIP's ring_id/ring_size),
    /// backends, sessions, the TX ports backends use, counters and VIP/backend stats. Rings of
    /// VIPs whose ring_id is beyond the allocated rows are left absent (the data plane reads 0).
    pub fn snapshot(reader: &impl MapReader) -> Result<Self, MapError> {
        let mut m = MemMaps::new();
        m.env.ring_rows = reader.ring_rows()?;
        m.config = reader.config()?;
        for (k, v) in reader.vips()? {
            m.vips.insert(k, v);
            if v.vip_id < MAX_VIPS {
                m.vip_stats.insert(v.vip_id, reader.vip_stats(v.vip_id)?);
            }
            // The VIP's ring and, with classes, every class ring it points at.
            let mut ring_ids = vec![v.ring_id];
            if v.flags & VIP_F_CLASSES != 0 && v.vip_id < MAX_VIPS {
                for dscp in 0..DSCP_VALUES as u8 {
                    let r = reader.class_ring(v.vip_id, dscp)?;
                    if r != 0 {
                        m.class_rings
                            .insert(class_slot_index(v.vip_id, dscp.into()), r);
                        ring_ids.push(r - 1);
                    }
                }
            }
            for ring_id in ring_ids {
                if v.ring_size == 0 || ring_id >= m.env.ring_rows || m.rings.contains_key(&ring_id)
                {
                    continue;
                }
                let slots = reader.ring(ring_id, v.ring_size.min(RING_SIZE_MAX))?;
                let mut row = vec![0u32; RING_SIZE_MAX as usize];
                row[..slots.len()].copy_from_slice(&slots);
                m.rings.insert(ring_id, row);
            }
        }
        for (id, b) in reader.backends()? {
            m.backends[id as usize] = b;
            if b.ifindex != 0 && reader.tx_port(b.ifindex)? {
                m.tx_ports.insert(b.ifindex);
            }
            m.backend_stats.insert(id, reader.backend_stats(id)?);
        }
        m.sessions = reader.sessions()?.into_iter().collect();
        m.session_ids = reader.session_ids()?.into_iter().collect();
        m.id_ranges = reader.id_ranges()?.into_iter().collect();
        m.frags = reader.frags()?.into_iter().collect();
        m.frag_vips = reader.frag_vips()?.into_iter().collect();
        m.counters = reader.counters()?;
        Ok(m)
    }

    /// Ring slot as the data plane reads it: `RINGS[ring_id * RING_SIZE_MAX + slot]` with u32
    /// arithmetic, 0 when outside the allocated rows or never written.
    pub fn ring_lookup(&self, ring_id: u32, slot: u32) -> u32 {
        let idx = ring_id.wrapping_mul(RING_SIZE_MAX).wrapping_add(slot);
        let (row, col) = (idx / RING_SIZE_MAX, idx % RING_SIZE_MAX);
        if row >= self.env.ring_rows {
            return 0;
        }
        self.rings.get(&row).map_or(0, |r| r[col as usize])
    }

    /// Inserts a session as the LRU does: when full, the least recently seen entry is evicted.
    /// Returns false when the insert fails (`SimEnv::fail_session_insert`).
    pub fn lru_insert(&mut self, key: FlowKey, s: Session) -> bool {
        if self.env.fail_session_insert {
            return false;
        }
        if !self.sessions.contains_key(&key)
            && self.sessions.len() >= self.env.max_sessions as usize
            && let Some(victim) = self
                .sessions
                .iter()
                .min_by_key(|(k, v)| (v.last_seen_ns, k.src, k.dst, k.ports, k.proto, k.family))
                .map(|(k, _)| *k)
        {
            self.sessions.remove(&victim);
        }
        if self.env.max_sessions == 0 {
            return false;
        }
        self.sessions.insert(key, s);
        true
    }

    /// Learns an id as the `SESSION_IDS` LRU does (a full table evicts one entry).
    pub fn id_insert(&mut self, key: IdKey, backend_id: u32) {
        if !self.session_ids.contains_key(&key)
            && self.session_ids.len() >= self.env.max_session_ids as usize
            && let Some(victim) = self
                .session_ids
                .keys()
                .min_by_key(|k| (k.addr, k.id, k.kind, k.family))
                .copied()
        {
            self.session_ids.remove(&victim);
        }
        if self.env.max_session_ids != 0 {
            self.session_ids.insert(key, backend_id);
        }
    }

    /// Records a first fragment as the `FRAGS` LRU does (a full table evicts the oldest record).
    pub fn frag_insert(&mut self, key: FragKey, rec: Session) -> bool {
        if !self.frags.contains_key(&key)
            && self.frags.len() >= self.env.max_frags as usize
            && let Some(victim) = self
                .frags
                .iter()
                .min_by_key(|(k, v)| (v.last_seen_ns, k.src, k.dst, k.id, k.proto, k.family))
                .map(|(k, _)| *k)
        {
            self.frags.remove(&victim);
        }
        if self.env.max_frags == 0 {
            return false;
        }
        self.frags.insert(key, rec);
        true
    }

    /// `ID_RANGES` lookup: the backend of the longest prefix matching `data`.
    pub fn id_range_lookup(&self, data: &IdRangeData) -> Option<u32> {
        self.id_ranges
            .iter()
            .filter(|(p, _)| p.matches(data))
            .max_by_key(|(p, _)| p.prefix_len)
            .map(|(_, b)| *b)
    }
}

impl MapWriter for MemMaps {
    fn set_class_ring(&mut self, vip_id: u32, dscp: u8, ring_plus1: u32) -> Result<(), MapError> {
        check_id("vip id", vip_id, MAX_VIPS)?;
        check_id("dscp", dscp.into(), DSCP_VALUES)?;
        let idx = class_slot_index(vip_id, dscp.into());
        if ring_plus1 == 0 {
            self.class_rings.remove(&idx);
        } else {
            self.class_rings.insert(idx, ring_plus1);
        }
        Ok(())
    }

    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<(), MapError> {
        self.config = *cfg;
        Ok(())
    }

    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapError> {
        let i = check_id("backend id", id, MAX_BACKENDS)?;
        self.backends[i] = *b;
        Ok(())
    }

    fn clear_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.set_backend(id, &Backend::default())
    }

    fn write_ring(&mut self, ring_id: u32, changes: &[SlotChange]) -> Result<(), MapError> {
        for c in changes {
            check_ring(ring_id, c.slot, self.env.ring_rows)?;
        }
        if changes.is_empty() {
            return Ok(());
        }
        let row = self
            .rings
            .entry(ring_id)
            .or_insert_with(|| vec![0; RING_SIZE_MAX as usize]);
        for c in changes {
            row[c.slot as usize] = c.backend_id;
        }
        Ok(())
    }

    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), MapError> {
        self.vips.insert(*key, *meta);
        Ok(())
    }

    fn remove_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.vips.remove(key);
        Ok(())
    }

    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), MapError> {
        self.tx_ports.insert(ifindex);
        Ok(())
    }

    fn remove_tx_port(&mut self, ifindex: u32) -> Result<(), MapError> {
        self.tx_ports.remove(&ifindex);
        Ok(())
    }

    fn set_session(&mut self, key: &FlowKey, s: &Session) -> Result<(), MapError> {
        self.lru_insert(*key, *s);
        Ok(())
    }

    fn remove_session(&mut self, key: &FlowKey) -> Result<(), MapError> {
        self.sessions.remove(key);
        Ok(())
    }

    fn set_session_id(&mut self, key: &IdKey, backend_id: u32) -> Result<(), MapError> {
        self.id_insert(*key, backend_id);
        Ok(())
    }

    fn remove_session_id(&mut self, key: &IdKey) -> Result<(), MapError> {
        self.session_ids.remove(key);
        Ok(())
    }

    fn set_id_range(&mut self, prefix: &IdPrefix, backend_id: u32) -> Result<(), MapError> {
        self.id_ranges.insert(*prefix, backend_id);
        Ok(())
    }

    fn remove_id_range(&mut self, prefix: &IdPrefix) -> Result<(), MapError> {
        self.id_ranges.remove(prefix);
        Ok(())
    }

    fn set_frag_vip(&mut self, portless: &VipKey, vip: &VipKey) -> Result<(), MapError> {
        self.frag_vips.insert(*portless, *vip);
        Ok(())
    }

    fn remove_frag_vip(&mut self, portless: &VipKey) -> Result<(), MapError> {
        self.frag_vips.remove(portless);
        Ok(())
    }
}

impl MapReader for MemMaps {
    fn class_ring(&self, vip_id: u32, dscp: u8) -> Result<u32, MapError> {
        check_id("vip id", vip_id, MAX_VIPS)?;
        check_id("dscp", dscp.into(), DSCP_VALUES)?;
        Ok(self
            .class_rings
            .get(&class_slot_index(vip_id, dscp.into()))
            .copied()
            .unwrap_or(0))
    }

    fn config(&self) -> Result<GlobalConfig, MapError> {
        Ok(self.config)
    }

    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, MapError> {
        Ok(self.vips.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn backend(&self, id: u32) -> Result<Backend, MapError> {
        Ok(self.backends[check_id("backend id", id, MAX_BACKENDS)?])
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        Ok(self
            .backends
            .iter()
            .enumerate()
            .filter(|(_, b)| b.state != BACKEND_UNUSED)
            .map(|(i, b)| (i as u32, *b))
            .collect())
    }

    fn ring(&self, ring_id: u32, size: u32) -> Result<Vec<u32>, MapError> {
        check_ring_size(size)?;
        check_ring(ring_id, 0, self.env.ring_rows)?;
        Ok(match self.rings.get(&ring_id) {
            Some(r) => r[..size as usize].to_vec(),
            None => vec![0; size as usize],
        })
    }

    fn ring_slot(&self, ring_id: u32, slot: u32) -> Result<u32, MapError> {
        check_ring(ring_id, slot, self.env.ring_rows)?;
        Ok(self.rings.get(&ring_id).map_or(0, |r| r[slot as usize]))
    }

    fn session(&self, key: &FlowKey) -> Result<Option<Session>, MapError> {
        Ok(self.sessions.get(key).copied())
    }

    fn sessions(&self) -> Result<Vec<(FlowKey, Session)>, MapError> {
        Ok(self.sessions.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn tx_port(&self, ifindex: u32) -> Result<bool, MapError> {
        Ok(self.tx_ports.contains(&ifindex))
    }

    fn counters(&self) -> Result<Vec<u64>, MapError> {
        Ok(self.counters.clone())
    }

    fn vip_stats(&self, vip_id: u32) -> Result<PktBytes, MapError> {
        check_id("vip id", vip_id, MAX_VIPS)?;
        Ok(self.vip_stats.get(&vip_id).copied().unwrap_or_default())
    }

    fn backend_stats(&self, id: u32) -> Result<PktBytes, MapError> {
        check_id("backend id", id, MAX_BACKENDS)?;
        Ok(self.backend_stats.get(&id).copied().unwrap_or_default())
    }

    fn ring_rows(&self) -> Result<u32, MapError> {
        Ok(self.env.ring_rows)
    }

    fn session_ids(&self) -> Result<Vec<(IdKey, u32)>, MapError> {
        Ok(self.session_ids.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn id_ranges(&self) -> Result<Vec<(IdPrefix, u32)>, MapError> {
        Ok(self.id_ranges.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn frags(&self) -> Result<Vec<(FragKey, Session)>, MapError> {
        Ok(self.frags.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn frag_vips(&self) -> Result<Vec<(VipKey, VipKey)>, MapError> {
        Ok(self.frag_vips.iter().map(|(k, v)| (*k, *v)).collect())
    }
}

/// The few raw bpf(2) commands aya 0.14 does not expose: batch update/lookup on arrays and element
/// delete on a DEVMAP (include/uapi/linux/bpf.h, `union bpf_attr`).
mod sys {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    /// The kernel's internal "operation not supported" (not in libc).
    const ENOTSUPP: i32 = 524;

    /// `bpf_attr.batch`.
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }

    /// The anonymous `bpf_attr` struct of the element commands.
    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
        // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`
        // and its size is passed; every pointer inside it refers to live buffers of the sizes the
        // kernel derives from the map's key/value sizes (checked by the callers).
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T,
                std::mem::size_of::<T>() as libc::c_uint,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// True when the kernel does not offer batch operations for this map.
    pub(super) fn batch_unsupported(e: &io::Error) -> bool {
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
        )
    }

    /// `BPF_MAP_UPDATE_BATCH` of u32 keys to u32 values (an array of u32). On failure returns how
    /// many elements were written first.
    pub(super) fn update_batch(
        fd: BorrowedFd<'_>,
        keys: &[u32],
        values: &[u32],
    ) -> Result<(), (usize, io::Error)> {
        assert_eq!(keys.len(), values.len());
        let mut done = 0usize;
        while done < keys.len() {
            let mut attr = BatchAttr {
                keys: keys[done..].as_ptr() as u64,
                values: values[done..].as_ptr() as u64,
                count: (keys.len() - done) as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            let r = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
            done += attr.count as usize;
            if let Err(e) = r {
                // EINTR-style partial progress is retried; anything else is reported.
                if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) {
                    continue;
                }
                return Err((done, e));
            }
            if attr.count == 0 {
                return Err((done, io::Error::from_raw_os_error(libc::EIO)));
            }
        }
        Ok(())
    }

    /// `BPF_MAP_LOOKUP_BATCH` of `n` consecutive u32 keys of an array starting at `start`.
    pub(super) fn lookup_batch<V: Copy + Default>(
        fd: BorrowedFd<'_>,
        start: u32,
        n: u32,
    ) -> io::Result<Vec<V>> {
        let mut keys = vec![0u32; n as usize];
        let mut values = vec![V::default(); n as usize];
        let mut got = 0usize;
        // For arrays the batch cursor is the last key read: iteration resumes at cursor + 1.
        let mut cursor: u32 = start.wrapping_sub(1);
        let mut out: u32 = 0;
        while got < n as usize {
            let mut attr = BatchAttr {
                in_batch: if got == 0 && start == 0 {
                    0
                } else {
                    &cursor as *const u32 as u64
                },
                out_batch: &mut out as *mut u32 as u64,
                keys: keys[got..].as_mut_ptr() as u64,
                values: values[got..].as_mut_ptr() as u64,
                count: (n as usize - got) as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            got += attr.count as usize;
            cursor = out;
            match r {
                Ok(()) => {}
                // ENOENT: the end of the array was reached.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => return Err(e),
            }
            if attr.count == 0 {
                break;
            }
        }
        if got != n as usize
            || keys
                .iter()
                .enumerate()
                .any(|(i, k)| *k != start.wrapping_add(i as u32))
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        Ok(values)
    }

    pub(super) fn delete_elem(fd: BorrowedFd<'_>, key: &u32) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: fd.as_raw_fd() as u32,
            key: key as *const u32 as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_DELETE_ELEM, &mut attr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vpnlb_common::{BACKEND_UP, FAMILY_V4};

    #[test]
    fn mem_maps_round_trip() {
        let mut m = MemMaps::new();
        let b = Backend {
            addr: [0x0100_000a, 0, 0, 0],
            state: BACKEND_UP,
            family: FAMILY_V4,
            weight: 1,
            ..Default::default()
        };
        m.set_backend(7, &b).unwrap();
        assert_eq!(m.backend(7).unwrap(), b);
        assert_eq!(m.backends().unwrap(), vec![(7, b)]);
        m.clear_backend(7).unwrap();
        assert!(m.backends().unwrap().is_empty());
        assert!(matches!(
            m.set_backend(MAX_BACKENDS, &b),
            Err(MapError::OutOfRange { .. })
        ));

        m.write_ring(
            3,
            &[
                SlotChange {
                    slot: 0,
                    backend_id: 7,
                },
                SlotChange {
                    slot: 12,
                    backend_id: 8,
                },
            ],
        )
        .unwrap();
        assert_eq!(m.ring(3, 13).unwrap()[12], 8);
        assert_eq!(m.ring_slot(3, 0).unwrap(), 7);
        assert_eq!(m.ring(4, 13).unwrap(), vec![0; 13]);
        assert_eq!(m.ring_lookup(3, 12), 8);
        // Slot arithmetic spills into the next row like the flat array does.
        assert_eq!(m.ring_lookup(2, RING_SIZE_MAX + 12), 8);
        assert!(
            m.write_ring(
                MAX_VIPS,
                &[SlotChange {
                    slot: 0,
                    backend_id: 1
                }]
            )
            .is_err()
        );
        assert!(
            m.write_ring(
                0,
                &[SlotChange {
                    slot: RING_SIZE_MAX,
                    backend_id: 1
                }]
            )
            .is_err()
        );
        assert!(m.ring(0, RING_SIZE_MAX + 1).is_err());

        m.set_tx_port(5).unwrap();
        assert!(m.tx_port(5).unwrap() && !m.tx_port(6).unwrap());
        m.remove_tx_port(5).unwrap();
        assert!(!m.tx_port(5).unwrap());
        assert_eq!(m.counters().unwrap().len(), NUM_COUNTERS as usize);
    }

    #[test]
    fn snapshot_copies_what_the_reader_shows() {
        let mut m = MemMaps::new();
        let key = VipKey {
            addr: [1, 0, 0, 0],
            port_be: 500u16.to_be(),
            proto: 17,
            family: 4,
        };
        m.set_vip(
            &key,
            &VipMeta {
                vip_id: 2,
                ring_id: 5,
                ring_size: 13,
                ..Default::default()
            },
        )
        .unwrap();
        m.write_ring(
            5,
            &[SlotChange {
                slot: 1,
                backend_id: 9,
            }],
        )
        .unwrap();
        m.write_ring(
            6,
            &[SlotChange {
                slot: 1,
                backend_id: 9,
            }],
        )
        .unwrap();
        let b = Backend {
            state: BACKEND_UP,
            ifindex: 4,
            family: 4,
            ..Default::default()
        };
        m.set_backend(9, &b).unwrap();
        m.set_tx_port(4).unwrap();
        m.set_tx_port(99).unwrap();
        let fk = FlowKey {
            ports: 1,
            proto: 17,
            family: 4,
            ..Default::default()
        };
        m.set_session(
            &fk,
            &Session {
                backend_id: 9,
                hash: 0,
                last_seen_ns: 5,
            },
        )
        .unwrap();
        m.counters[3] = 11;
        let s = MemMaps::snapshot(&m).unwrap();
        assert_eq!(s.vips, m.vips);
        assert_eq!(s.rings.len(), 1, "only rings referenced by VIPs");
        assert_eq!(s.rings[&5], m.rings[&5]);
        assert_eq!(s.backends, m.backends);
        assert_eq!(
            s.tx_ports,
            HashSet::from([4]),
            "tx ports probed by backend ifindex"
        );
        assert_eq!(s.sessions, m.sessions);
        assert_eq!(s.counters, m.counters);
    }

    #[test]
    fn lru_evicts_least_recently_seen() {
        let mut m = MemMaps::new();
        m.env.max_sessions = 2;
        let k = |p| FlowKey {
            ports: p,
            proto: 17,
            family: 4,
            ..Default::default()
        };
        let s = |t| Session {
            backend_id: 1,
            hash: 0,
            last_seen_ns: t,
        };
        assert!(m.lru_insert(k(1), s(10)));
        assert!(m.lru_insert(k(2), s(5)));
        assert!(m.lru_insert(k(3), s(20)));
        assert!(m.sessions.contains_key(&k(1)) && m.sessions.contains_key(&k(3)));
        assert!(!m.sessions.contains_key(&k(2)));
        m.env.fail_session_insert = true;
        assert!(!m.lru_insert(k(4), s(30)));
    }
}
