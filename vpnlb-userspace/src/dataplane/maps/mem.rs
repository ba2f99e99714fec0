//! [`MemMaps`]: every map in memory, the unit-test double of [`super::AyaMaps`] and the state the
//! reference model runs on, with [`SimEnv`], the capacities the kernel would give the maps.

use std::collections::{HashMap, HashSet};

use vpnlb_common::maglev::SlotChange;
use vpnlb_common::{
    BACKEND_UNUSED, Backend, DEFAULT_MAX_FRAGS, DEFAULT_MAX_SESSION_IDS, DEFAULT_MAX_SESSIONS,
    DSCP_VALUES, FloodState, FlowKey, FragKey, GlobalConfig, IdKey, MAX_BACKENDS, MAX_VIPS,
    NUM_COUNTERS, PktBytes, RING_SIZE_MAX, Session, VIP_F_CLASSES, VipKey, VipMeta,
    class_slot_index,
};

use super::{MapError, MapReader, MapWriter, check_id, check_ring, check_ring_size};
use crate::dataplane::session_ids::IdPrefix;

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
}
