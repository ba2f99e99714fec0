//! From the config, the stable ids and what the host says about interfaces and neighbours to the
//! reconciler's `Desired` state and the data plane's `GlobalConfig`.

use std::collections::HashMap;
use std::net::IpAddr;

use vpnlb_common::{DEFAULT_GUE_PORT, GlobalConfig, VipKey, addr_words};

use crate::agent::reconcile::{Desired, DesiredBackend, DesiredClass, DesiredPool, DesiredVip};
use crate::config::{Config, Forwarding, IdMap};
use crate::dataplane::{BackendSpec, VipSpec};

use super::AgentError;

/// An interface as the host reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// The egress interface of a backend: its own `interface`, else the first attached one.
pub fn backend_iface<'a>(cfg: &'a Config, backend: &'a crate::config::BackendConfig) -> &'a str {
    backend.interface.as_deref().unwrap_or_else(|| {
        cfg.interfaces
            .first()
            .map(|i| i.name.as_str())
            .unwrap_or("eth0")
    })
}

/// Wire-order mask of the low `bits` bits of a 32-bit word of an address.
fn low_bits_mask(bits: u8) -> u32 {
    let host = if bits == 0 {
        0
    } else {
        (u64::MAX >> (64 - u32::from(bits.min(32)))) as u32
    };
    u32::from_ne_bytes(host.to_be_bytes())
}

pub fn global_config(cfg: &Config) -> GlobalConfig {
    let a = &cfg.agent;
    let mut g = GlobalConfig {
        flood_max_inserts_per_sec: a.flood_max_inserts_per_sec,
        // A replicating member asks the data plane for its new sessions and ids.
        replicate: cfg.cluster.as_ref().is_some_and(|c| c.replicate).into(),
        ..Default::default()
    };
    if let Some(v4) = a.encap_source_v4 {
        g.encap_src_v4 = u32::from_ne_bytes(v4.octets());
        g.encap_src_v4_hash_mask = low_bits_mask(a.encap_source_v4_hash_bits);
    }
    if let Some(v6) = a.encap_source_v6 {
        g.encap_src_v6 = addr_words(IpAddr::V6(v6)).0;
        g.encap_src_v6_hash_mask = low_bits_mask(a.encap_source_v6_hash_bits);
    }
    g
}

/// Everything the reconciler needs. `macs` holds next-hop MACs resolved at run time for backends
/// without a configured `mac` (absent: the backend is written with a zero MAC and kept down by its
/// neighbour pseudo-check).
pub fn desired(
    cfg: &Config,
    ids: &IdMap,
    ifaces: &HashMap<String, Iface>,
    macs: &HashMap<String, [u8; 6]>,
) -> Result<Desired, AgentError> {
    let mut out = Desired::default();
    for b in &cfg.backends {
        let ifname = backend_iface(cfg, b);
        let iface = ifaces.get(ifname).ok_or_else(|| AgentError::Interface {
            name: ifname.to_string(),
            reason: format!("backend {:?} egresses there but it does not exist", b.name),
        })?;
        let id = ids
            .backend(&b.name)
            .ok_or_else(|| AgentError::Internal(format!("no id for backend {}", b.name)))?;
        let mac = b
            .mac
            .map(|m| m.octets())
            .or_else(|| macs.get(&b.name).copied())
            .unwrap_or([0; 6]);
        out.backends.push(DesiredBackend {
            name: b.name.clone(),
            spec: BackendSpec {
                id,
                addr: b.address,
                mac,
                src_mac: iface.mac,
                ifindex: iface.ifindex,
                weight: b.weight,
                state: 0,
            },
        });
        out.id_ranges
            .extend(b.id_prefixes().into_iter().map(|p| (p, id)));
    }
    for v in &cfg.vips {
        let vip_id = ids
            .vip(&v.name)
            .ok_or_else(|| AgentError::Internal(format!("no id for vip {}", v.name)))?;
        let ring_id = ids
            .ring(&v.name, None)
            .ok_or_else(|| AgentError::Internal(format!("no ring for vip {}", v.name)))?;
        let template = VipSpec {
            key: VipKey::new(v.address, v.port.unwrap_or(0), v.protocol.number()),
            vip_id,
            ring_id,
            ring_size: v.ring_size,
            flags: v.flags(),
            fwd_mode: v.forwarding.mode(),
            mtu: v.mtu,
            idle_timeout_ns: v.idle_timeout_s.saturating_mul(1_000_000_000),
            gue_port: if v.forwarding == Forwarding::Gue {
                v.gue_port.unwrap_or(DEFAULT_GUE_PORT)
            } else {
                0
            },
            backends: Vec::new(),
            classes: Vec::new(),
        };
        let pools = v
            .pools
            .iter()
            .map(|p| DesiredPool {
                name: p.name.clone(),
                priority: p.priority,
                backends: p.backends.clone(),
            })
            .collect();
        let mut classes = Vec::new();
        for c in &v.classes {
            let ring_id = ids.ring(&v.name, Some(&c.name)).ok_or_else(|| {
                AgentError::Internal(format!("no ring for vip {} class {}", v.name, c.name))
            })?;
            classes.push(DesiredClass {
                name: c.name.clone(),
                dscp: c.dscp.clone(),
                ring_id,
                pool_order: c.pool_order.clone(),
            });
        }
        out.vips.push(DesiredVip {
            name: v.name.clone(),
            template,
            pools,
            classes,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_bit_masks_are_wire_order_low_bits() {
        assert_eq!(low_bits_mask(0), 0);
        assert_eq!(low_bits_mask(8).to_ne_bytes(), [0, 0, 0, 0xff]);
        assert_eq!(low_bits_mask(12).to_ne_bytes(), [0, 0, 0x0f, 0xff]);
        assert_eq!(low_bits_mask(32).to_ne_bytes(), [0xff; 4]);
    }
}
