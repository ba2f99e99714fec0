//! What the kernel decides that plain maps cannot show, as the reference model reads it: ring
//! slot lookups with the data plane's arithmetic, and the LRU tables' inserts (a full table evicts
//! an entry), over [`MemMaps`] and its [`crate::dataplane::maps::SimEnv`] capacities.

use vpnlb_common::{FlowKey, FragKey, IdKey, IdRangeData, RING_SIZE_MAX, Session};

use crate::dataplane::maps::MemMaps;

impl MemMaps {
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

#[cfg(test)]
mod tests {
    use super::*;

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
