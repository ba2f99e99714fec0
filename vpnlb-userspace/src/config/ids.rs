//! Data-plane ids for config names, stable across reloads: backend ids (`1..MAX_BACKENDS`, index
//! of `BACKENDS`), VIP ids (`0..MAX_VIPS`, index of `VIP_STATS`) and ring ids (`0..MAX_VIPS`, row
//! of `RINGS`; one per VIP default pool order and one per class).
//!
//! A name keeps the id it had. A new name gets the lowest id that neither the new nor the previous
//! map holds, so an id freed by this reload is not handed to someone else in the same reload (the
//! agent adds before it removes: a ring row or backend slot still read by the old VIP must not
//! be rewritten for a new one). Only when no such id is left are freed ids reused.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use serde::{Deserialize, Serialize};
use vpnlb_common::{MAX_BACKENDS, MAX_VIPS};

use super::Config;

/// Which ring: a VIP's default pool order (`class: None`) or one of its classes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RingKey {
    pub vip: String,
    pub class: Option<String>,
}

impl RingKey {
    pub fn default_of(vip: &str) -> Self {
        RingKey {
            vip: vip.to_string(),
            class: None,
        }
    }
    pub fn class_of(vip: &str, class: &str) -> Self {
        RingKey {
            vip: vip.to_string(),
            class: Some(class.to_string()),
        }
    }
}

/// Name -> id for everything the agent writes into the maps. Serializes to JSON (rings as a list)
/// so the agent can keep it across restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "IdMapRepr", into = "IdMapRepr")]
pub struct IdMap {
    pub backends: BTreeMap<String, u32>,
    pub vips: BTreeMap<String, u32>,
    pub rings: BTreeMap<RingKey, u32>,
}

impl IdMap {
    pub fn backend(&self, name: &str) -> Option<u32> {
        self.backends.get(name).copied()
    }
    pub fn vip(&self, name: &str) -> Option<u32> {
        self.vips.get(name).copied()
    }
    pub fn ring(&self, vip: &str, class: Option<&str>) -> Option<u32> {
        self.rings
            .get(&RingKey {
                vip: vip.to_string(),
                class: class.map(str::to_string),
            })
            .copied()
    }

    /// Whether this assignment (one that came from elsewhere: the cluster's) can be used for
    /// `cfg` as it is: every backend, VIP and ring of `cfg` has an id, in range and unique.
    pub fn covers(&self, cfg: &Config) -> bool {
        fn unique_in(ids: impl Iterator<Item = Option<u32>>, range: Range<u32>) -> bool {
            let mut seen = BTreeSet::new();
            for id in ids {
                match id {
                    Some(id) if range.contains(&id) && seen.insert(id) => {}
                    _ => return false,
                }
            }
            true
        }
        unique_in(
            cfg.backends.iter().map(|b| self.backend(&b.name)),
            1..MAX_BACKENDS,
        ) && unique_in(cfg.vips.iter().map(|v| self.vip(&v.name)), 0..MAX_VIPS)
            && unique_in(
                cfg.ring_keys().iter().map(|k| self.rings.get(k).copied()),
                0..MAX_VIPS,
            )
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct RingEntry {
    vip: String,
    class: Option<String>,
    id: u32,
}

#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct IdMapRepr {
    backends: BTreeMap<String, u32>,
    vips: BTreeMap<String, u32>,
    rings: Vec<RingEntry>,
}

impl From<IdMapRepr> for IdMap {
    fn from(r: IdMapRepr) -> Self {
        IdMap {
            backends: r.backends,
            vips: r.vips,
            rings: r
                .rings
                .into_iter()
                .map(|e| {
                    (
                        RingKey {
                            vip: e.vip,
                            class: e.class,
                        },
                        e.id,
                    )
                })
                .collect(),
        }
    }
}

impl From<IdMap> for IdMapRepr {
    fn from(m: IdMap) -> Self {
        IdMapRepr {
            backends: m.backends,
            vips: m.vips,
            rings: m
                .rings
                .into_iter()
                .map(|(k, id)| RingEntry {
                    vip: k.vip,
                    class: k.class,
                    id,
                })
                .collect(),
        }
    }
}

/// Ids for `new`, keeping those of `previous` (the map in force) for names that stay. Pure. `new`
/// is expected to be validated (at most 4095 backends, 128 VIPs and 128 rings); a name that finds
/// no free id is left out.
pub fn assign_ids(new: &Config, previous: Option<&IdMap>) -> IdMap {
    let backends: Vec<String> = new.backends.iter().map(|b| b.name.clone()).collect();
    let vips: Vec<String> = new.vips.iter().map(|v| v.name.clone()).collect();
    let rings = new.ring_keys();
    IdMap {
        backends: assign(&backends, previous.map(|p| &p.backends), 1..MAX_BACKENDS),
        vips: assign(&vips, previous.map(|p| &p.vips), 0..MAX_VIPS),
        rings: assign(&rings, previous.map(|p| &p.rings), 0..MAX_VIPS),
    }
}

fn assign<K: Ord + Clone>(
    names: &[K],
    previous: Option<&BTreeMap<K, u32>>,
    range: Range<u32>,
) -> BTreeMap<K, u32> {
    let empty = BTreeMap::new();
    let previous = previous.unwrap_or(&empty);
    let mut out: BTreeMap<K, u32> = BTreeMap::new();
    let mut used: BTreeSet<u32> = BTreeSet::new();
    // Keep: in file order, so a damaged previous map with one id twice resolves the same way
    // every time.
    for name in names {
        if out.contains_key(name) {
            continue;
        }
        if let Some(&id) = previous.get(name)
            && range.contains(&id)
            && used.insert(id)
        {
            out.insert(name.clone(), id);
        }
    }
    // Ids held by names that are going away: not reused in this round unless nothing else is left.
    let staying: BTreeSet<&K> = names.iter().collect();
    let retiring: BTreeSet<u32> = previous
        .iter()
        .filter(|(k, _)| !staying.contains(k))
        .map(|(_, &id)| id)
        .collect();
    // `used` only grows, so the lowest free id only moves up: two cursors suffice.
    let (mut fresh, mut any) = (range.start, range.start);
    for name in names {
        if out.contains_key(name) {
            continue;
        }
        while fresh < range.end && (used.contains(&fresh) || retiring.contains(&fresh)) {
            fresh += 1;
        }
        while any < range.end && used.contains(&any) {
            any += 1;
        }
        let id = if fresh < range.end {
            fresh
        } else if any < range.end {
            any
        } else {
            continue;
        };
        used.insert(id);
        out.insert(name.clone(), id);
    }
    out
}
