//! [`Recording`]: a [`MapWriter`] wrapper that records the order of writes (and injects
//! failures), shared by the tests of the dataplane API, the reconciler and the agent core.

use vpnlb_common::maglev::SlotChange;
use vpnlb_common::{
    Backend, FlowKey, FragKey, GlobalConfig, IdKey, PktBytes, Session, VipKey, VipMeta,
};

use super::{MapError, MapReader, MapWriter};
use crate::dataplane::session_ids::IdPrefix;

/// A writer that logs every map-changing call in order (`"backend 3"`, `"ring 0 12"`,
/// `"vip 1"`, `"remove_vip"`, ...) before passing it to `inner`, and can be told to fail the n-th
/// one. Tests that claim an order of writes assert on [`Recording::kinds`] / `log`.
pub struct Recording<W> {
    pub inner: W,
    pub log: Vec<String>,
    /// Fail the write that would become `log[fail_at]` (nothing is passed on).
    pub fail_at: Option<usize>,
}

impl<W> Recording<W> {
    pub fn new(inner: W) -> Self {
        Recording {
            inner,
            log: Vec::new(),
            fail_at: None,
        }
    }

    fn step(&mut self, what: String) -> Result<(), MapError> {
        if self.fail_at == Some(self.log.len()) {
            return Err(MapError::OutOfRange {
                what: "injected failure",
                index: 0,
                limit: 0,
            });
        }
        self.log.push(what);
        Ok(())
    }
    /// The first word of every logged call.
    pub fn kinds(&self) -> Vec<&str> {
        self.log
            .iter()
            .map(|s| s.split(' ').next().unwrap())
            .collect()
    }
}

impl<W: MapWriter> MapWriter for Recording<W> {
    fn set_config(&mut self, cfg: &GlobalConfig) -> Result<(), MapError> {
        self.step("config".into())?;
        self.inner.set_config(cfg)
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), MapError> {
        self.step(format!("backend {id}"))?;
        self.inner.set_backend(id, b)
    }
    fn clear_backend(&mut self, id: u32) -> Result<(), MapError> {
        self.step(format!("clear_backend {id}"))?;
        self.inner.clear_backend(id)
    }
    fn write_ring(&mut self, ring_id: u32, changes: &[SlotChange]) -> Result<(), MapError> {
        self.step(format!("ring {ring_id} {}", changes.len()))?;
        self.inner.write_ring(ring_id, changes)
    }
    fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), MapError> {
        self.step(format!("vip {}", meta.vip_id))?;
        self.inner.set_vip(key, meta)
    }
    fn remove_vip(&mut self, key: &VipKey) -> Result<(), MapError> {
        self.step("remove_vip".into())?;
        self.inner.remove_vip(key)
    }
    fn set_tx_port(&mut self, ifindex: u32) -> Result<(), MapError> {
        self.step(format!("tx {ifindex}"))?;
        self.inner.set_tx_port(ifindex)
    }
    fn remove_tx_port(&mut self, ifindex: u32) -> Result<(), MapError> {
        self.step(format!("remove_tx {ifindex}"))?;
        self.inner.remove_tx_port(ifindex)
    }
    fn set_session(&mut self, key: &FlowKey, s: &Session) -> Result<(), MapError> {
        self.inner.set_session(key, s)
    }
    fn remove_session(&mut self, key: &FlowKey) -> Result<(), MapError> {
        self.inner.remove_session(key)
    }
    fn set_session_id(&mut self, key: &IdKey, id: u32) -> Result<(), MapError> {
        self.inner.set_session_id(key, id)
    }
    fn remove_session_id(&mut self, key: &IdKey) -> Result<(), MapError> {
        self.inner.remove_session_id(key)
    }
    fn set_id_range(&mut self, p: &IdPrefix, id: u32) -> Result<(), MapError> {
        self.step(format!("id_range {}", p.prefix_len))?;
        self.inner.set_id_range(p, id)
    }
    fn remove_id_range(&mut self, p: &IdPrefix) -> Result<(), MapError> {
        self.step(format!("remove_id_range {}", p.prefix_len))?;
        self.inner.remove_id_range(p)
    }
    fn set_frag_vip(&mut self, portless: &VipKey, vip: &VipKey) -> Result<(), MapError> {
        self.step("frag_vip".into())?;
        self.inner.set_frag_vip(portless, vip)
    }
    fn remove_frag_vip(&mut self, portless: &VipKey) -> Result<(), MapError> {
        self.step("remove_frag_vip".into())?;
        self.inner.remove_frag_vip(portless)
    }
    fn set_class_ring(&mut self, vip_id: u32, dscp: u8, ring_plus1: u32) -> Result<(), MapError> {
        self.step(format!("class {vip_id}/{dscp}={ring_plus1}"))?;
        self.inner.set_class_ring(vip_id, dscp, ring_plus1)
    }
}

impl<W: MapReader> MapReader for Recording<W> {
    fn config(&self) -> Result<GlobalConfig, MapError> {
        self.inner.config()
    }
    fn vips(&self) -> Result<Vec<(VipKey, VipMeta)>, MapError> {
        self.inner.vips()
    }
    fn backend(&self, id: u32) -> Result<Backend, MapError> {
        self.inner.backend(id)
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        self.inner.backends()
    }
    fn ring(&self, ring_id: u32, size: u32) -> Result<Vec<u32>, MapError> {
        self.inner.ring(ring_id, size)
    }
    fn ring_slot(&self, ring_id: u32, slot: u32) -> Result<u32, MapError> {
        self.inner.ring_slot(ring_id, slot)
    }
    fn session(&self, key: &FlowKey) -> Result<Option<Session>, MapError> {
        self.inner.session(key)
    }
    fn sessions(&self) -> Result<Vec<(FlowKey, Session)>, MapError> {
        self.inner.sessions()
    }
    fn tx_port(&self, ifindex: u32) -> Result<bool, MapError> {
        self.inner.tx_port(ifindex)
    }
    fn counters(&self) -> Result<Vec<u64>, MapError> {
        self.inner.counters()
    }
    fn vip_stats(&self, vip_id: u32) -> Result<PktBytes, MapError> {
        self.inner.vip_stats(vip_id)
    }
    fn backend_stats(&self, id: u32) -> Result<PktBytes, MapError> {
        self.inner.backend_stats(id)
    }
    fn class_ring(&self, vip_id: u32, dscp: u8) -> Result<u32, MapError> {
        self.inner.class_ring(vip_id, dscp)
    }
    fn ring_rows(&self) -> Result<u32, MapError> {
        self.inner.ring_rows()
    }
    fn session_ids(&self) -> Result<Vec<(IdKey, u32)>, MapError> {
        self.inner.session_ids()
    }
    fn id_ranges(&self) -> Result<Vec<(IdPrefix, u32)>, MapError> {
        self.inner.id_ranges()
    }
    fn frags(&self) -> Result<Vec<(FragKey, Session)>, MapError> {
        self.inner.frags()
    }
    fn frag_vips(&self) -> Result<Vec<(VipKey, VipKey)>, MapError> {
        self.inner.frag_vips()
    }
}
