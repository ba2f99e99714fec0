//! [`AyaMaps`]: the real maps, from a freshly loaded object or from the pin directory. Ring writes
//! go through `BPF_MAP_UPDATE_BATCH` (one syscall per call, kernel >= 5.6) with a per-slot
//! fallback; aya 0.14 has no batch API, so that one syscall is issued in `sys.rs`.

use std::path::Path;

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::xdp::{DevMap, DevMapHash, XdpMapError};
use aya::maps::{Array, HashMap as AyaHashMap, Map, MapData, PerCpuArray};
use vpnlb_common::maglev::SlotChange;
use vpnlb_common::{
    BACKEND_UNUSED, Backend, DSCP_VALUES, FloodState, FlowKey, FragKey, GlobalConfig, IdKey,
    IdRangeData, MAX_BACKENDS, MAX_VIPS, NUM_COUNTERS, PktBytes, RING_SIZE_MAX, Session, VipKey,
    VipMeta, class_slot_index, map_names,
};

use super::{
    AyaMapError, MapError, MapReader, MapWriter, check_id, check_ring, check_ring_size,
    sum_pkt_bytes, sys,
};
use crate::dataplane::session_ids::IdPrefix;

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

/// Entries per `BPF_MAP_LOOKUP_BATCH` call when a whole table is read.
const DUMP_CHUNK: usize = 8192;

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

    /// Writes sessions in batches (one syscall per up to 4096): the bulk copy a cluster member
    /// receives from a peer. Falls back to one write per session when batches are unsupported.
    pub fn set_sessions(&mut self, entries: &[(FlowKey, Session)]) -> Result<(), MapError> {
        self.set_hash_batch(map_names::SESSIONS, entries, |m, k, v| m.set_session(k, v))
    }

    /// [`AyaMaps::set_sessions`] for learned session ids.
    pub fn set_session_ids(&mut self, entries: &[(IdKey, u32)]) -> Result<(), MapError> {
        self.set_hash_batch(map_names::SESSION_IDS, entries, |m, k, v| {
            m.set_session_id(k, *v)
        })
    }

    fn set_hash_batch<K: Copy, V: Copy>(
        &mut self,
        map: &'static str,
        entries: &[(K, V)],
        one: impl Fn(&mut Self, &K, &V) -> Result<(), MapError>,
    ) -> Result<(), MapError> {
        use aya::maps::IterableMap;
        use std::os::fd::AsFd;
        for part in entries.chunks(4096) {
            if self.batch.get() {
                let keys: Vec<K> = part.iter().map(|e| e.0).collect();
                let values: Vec<V> = part.iter().map(|e| e.1).collect();
                let r = {
                    let fd = match map {
                        map_names::SESSIONS => IterableMap::<FlowKey, Session>::map(&self.sessions)
                            .fd()
                            .as_fd(),
                        _ => IterableMap::<IdKey, u32>::map(&self.session_ids)
                            .fd()
                            .as_fd(),
                    };
                    sys::update_hash_batch(fd, &keys, &values)
                };
                match r {
                    Ok(()) => continue,
                    Err((0, e)) if sys::batch_unsupported(&e) => self.batch.set(false),
                    Err((_, source)) => {
                        return Err(MapError::Sys {
                            map,
                            op: "batch update",
                            source,
                        });
                    }
                }
            }
            for (k, v) in part {
                one(self, k, v)?;
            }
        }
        Ok(())
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
        if self.batch.get() {
            use aya::maps::IterableMap;
            use std::os::fd::AsFd;
            let fd = IterableMap::<FlowKey, Session>::map(&self.sessions)
                .fd()
                .as_fd();
            match sys::dump_hash(fd, DUMP_CHUNK) {
                Ok(v) => return Ok(v),
                Err(e) if sys::batch_unsupported(&e) => self.batch.set(false),
                Err(source) => {
                    return Err(MapError::Sys {
                        map: map_names::SESSIONS,
                        op: "batch lookup",
                        source,
                    });
                }
            }
        }
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
        if self.batch.get() {
            use aya::maps::IterableMap;
            use std::os::fd::AsFd;
            let fd = IterableMap::<IdKey, u32>::map(&self.session_ids)
                .fd()
                .as_fd();
            match sys::dump_hash(fd, DUMP_CHUNK) {
                Ok(v) => return Ok(v),
                Err(e) if sys::batch_unsupported(&e) => self.batch.set(false),
                Err(source) => {
                    return Err(MapError::Sys {
                        map: map_names::SESSION_IDS,
                        op: "batch lookup",
                        source,
                    });
                }
            }
        }
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
