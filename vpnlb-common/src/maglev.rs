//! Weighted Maglev table builder (Eisenbud et al., NSDI'16), pure and deterministic: the same
//! backends (identity key, weight) and table size give the same table on every host.
//!
//! Weights follow the cumulative scheme: in every round each backend accumulates its weight and takes
//! its next preferred free slot each time the accumulator passes the largest weight, so slot shares are
//! proportional to weights. The builder also returns the delta against a previous table, so the
//! reconciler writes only the slots that changed (as Katran's `Vip::addReal` does).

use alloc::vec;
use alloc::vec::Vec;

use crate::hash::{MAGLEV_OFFSET_SEED, MAGLEV_SKIP_SEED, jhash2};

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug)]
pub struct MaglevBackend<'a> {
    /// Backend id written into the table (never 0: 0 means "no backend").
    pub id: u32,
    /// Stable identity that places the backend in the table (e.g. its address bytes). Hosts that
    /// must agree must use the same keys.
    pub key: &'a [u8],
    /// Relative weight; 0 excludes the backend.
    pub weight: u32,
}

/// A changed slot: `table[slot]` becomes `backend_id`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotChange {
    pub slot: u32,
    pub backend_id: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MaglevError {
    /// Table size is not a prime in `3..=RING_SIZE_MAX`.
    BadSize(u32),
    /// Backend id 0 is reserved for "none".
    ZeroId,
    /// Two backends share one identity key or one id.
    Duplicate(u32),
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MaglevError::BadSize(m) => write!(
                f,
                "maglev table size {m} is not a prime <= {}",
                crate::RING_SIZE_MAX
            ),
            MaglevError::ZeroId => write!(f, "backend id 0 is reserved"),
            MaglevError::Duplicate(id) => write!(f, "backend id {id} or its key appears twice"),
        }
    }
}

impl std::error::Error for MaglevError {}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Hash of an identity key: jhash2 over its bytes zero-padded to whole little-endian words.
fn key_hash(key: &[u8], seed: u32) -> u32 {
    // Fold in chunks of 8 words so arbitrary key lengths hash deterministically.
    let mut h = seed ^ (key.len() as u32);
    for chunk in key.chunks(32) {
        let mut w = [0u32; 8];
        for (i, b) in chunk.iter().enumerate() {
            w[i / 4] |= (*b as u32) << (8 * (i % 4));
        }
        h = jhash2(&w, h);
    }
    h
}

/// Builds the table of size `m`: `m` backend ids (all 0 when no backend has weight).
pub fn build(backends: &[MaglevBackend<'_>], m: u32) -> Result<Vec<u32>, MaglevError> {
    if !(3..=crate::RING_SIZE_MAX).contains(&m) || !is_prime(m) {
        return Err(MaglevError::BadSize(m));
    }
    for (i, b) in backends.iter().enumerate() {
        if b.id == 0 {
            return Err(MaglevError::ZeroId);
        }
        if backends[..i].iter().any(|o| o.id == b.id || o.key == b.key) {
            return Err(MaglevError::Duplicate(b.id));
        }
    }
    // Sorting by key makes the result independent of the order backends are listed in.
    let mut live: Vec<&MaglevBackend<'_>> = backends.iter().filter(|b| b.weight > 0).collect();
    live.sort_by(|a, b| a.key.cmp(b.key));
    let mut table = vec![0u32; m as usize];
    if live.is_empty() {
        return Ok(table);
    }
    let offsets: Vec<u64> = live
        .iter()
        .map(|b| (key_hash(b.key, MAGLEV_OFFSET_SEED) % m) as u64)
        .collect();
    let skips: Vec<u64> = live
        .iter()
        .map(|b| (key_hash(b.key, MAGLEV_SKIP_SEED) % (m - 1) + 1) as u64)
        .collect();
    let max_weight = live.iter().map(|b| b.weight as u64).max().unwrap_or(1);
    let mut next = vec![0u64; live.len()];
    let mut acc = vec![0u64; live.len()];
    let mut filled = 0u32;
    let m64 = m as u64;
    while filled < m {
        for i in 0..live.len() {
            acc[i] += live[i].weight as u64;
            if acc[i] < max_weight {
                continue;
            }
            acc[i] -= max_weight;
            // Next preferred slot of backend i that is still free.
            loop {
                let slot = ((offsets[i] + next[i] * skips[i]) % m64) as usize;
                next[i] += 1;
                if table[slot] == 0 {
                    table[slot] = live[i].id;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    Ok(table)
}

/// Slots whose backend differs between `old` and `new` (an `old` of another length counts as all
/// slots changed).
pub fn delta(old: &[u32], new: &[u32]) -> Vec<SlotChange> {
    if old.len() != new.len() {
        return new
            .iter()
            .enumerate()
            .map(|(i, b)| SlotChange {
                slot: i as u32,
                backend_id: *b,
            })
            .collect();
    }
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (o, n))| o != n)
        .map(|(i, (_, n))| SlotChange {
            slot: i as u32,
            backend_id: *n,
        })
        .collect()
}

/// Builds the table and its delta against `previous` in one call.
pub fn build_with_delta(
    backends: &[MaglevBackend<'_>],
    m: u32,
    previous: &[u32],
) -> Result<(Vec<u32>, Vec<SlotChange>), MaglevError> {
    let table = build(backends, m)?;
    let d = delta(previous, &table);
    Ok((table, d))
}

/// How many slots each backend id owns (index = id, up to the largest id present).
pub fn slot_counts(table: &[u32]) -> alloc::collections::BTreeMap<u32, u32> {
    let mut counts = alloc::collections::BTreeMap::new();
    for id in table {
        *counts.entry(*id).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::String;

    fn keys(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}", i / 250, i % 250 + 1))
            .collect()
    }

    fn backends(keys: &[String], weights: &[u32]) -> Vec<MaglevBackend<'static>> {
        keys.iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (k, w))| MaglevBackend {
                id: i as u32 + 1,
                key: String::leak(k.clone()).as_bytes(),
                weight: *w,
            })
            .collect()
    }

    #[test]
    fn rejects_bad_sizes_and_ids() {
        let k = keys(2);
        let b = backends(&k, &[1, 1]);
        assert_eq!(build(&b, 65536), Err(MaglevError::BadSize(65536)));
        assert_eq!(build(&b, 65539), Err(MaglevError::BadSize(65539)));
        let mut z = b.clone();
        z[0].id = 0;
        assert_eq!(build(&z, 13), Err(MaglevError::ZeroId));
        let mut d = b.clone();
        d[1].key = d[0].key;
        assert_eq!(build(&d, 13), Err(MaglevError::Duplicate(2)));
        assert!(is_prime(65537) && is_prime(13) && !is_prime(1) && !is_prime(65535));
    }

    #[test]
    fn empty_and_zero_weight_give_no_backend() {
        assert!(build(&[], 13).unwrap().iter().all(|b| *b == 0));
        let k = keys(2);
        let t = build(&backends(&k, &[0, 1]), 13).unwrap();
        assert!(t.iter().all(|b| *b == 2));
    }

    #[test]
    fn equal_weights_are_within_a_few_percent() {
        for n in [2usize, 3, 7, 10, 64] {
            let k = keys(n);
            let t = build(&backends(&k, &vec![1; n]), 65537).unwrap();
            let c = slot_counts(&t);
            assert_eq!(c.len(), n, "every backend owns slots");
            let ideal = 65537.0 / n as f64;
            for (id, cnt) in &c {
                let dev = (*cnt as f64 - ideal).abs() / ideal;
                assert!(
                    dev < 0.03,
                    "n={n} backend {id}: {cnt} slots, {:.2}% off ideal",
                    dev * 100.0
                );
            }
        }
    }

    #[test]
    fn shares_follow_weights() {
        let k = keys(4);
        let w = [1u32, 2, 3, 4];
        let t = build(&backends(&k, &w), 65537).unwrap();
        let c = slot_counts(&t);
        for (i, wt) in w.iter().enumerate() {
            let share = c[&(i as u32 + 1)] as f64 / 65537.0;
            let want = *wt as f64 / 10.0;
            assert!(
                (share - want).abs() / want < 0.03,
                "weight {wt}: share {share:.4} want {want:.4}"
            );
        }
    }

    #[test]
    fn order_of_listing_does_not_matter() {
        let k = keys(5);
        let b = backends(&k, &[1, 2, 1, 3, 1]);
        let mut r = b.clone();
        r.reverse();
        assert_eq!(build(&b, 65537).unwrap(), build(&r, 65537).unwrap());
    }

    #[test]
    fn removing_one_backend_moves_mostly_its_own_slots() {
        let n = 10;
        let k = keys(n);
        let all = backends(&k, &vec![1; n]);
        let before = build(&all, 65537).unwrap();
        let removed = 4u32;
        let rest: Vec<_> = all.iter().copied().filter(|b| b.id != removed).collect();
        let (after, d) = build_with_delta(&rest, 65537, &before).unwrap();
        let own = before.iter().filter(|b| **b == removed).count();
        let others_moved = before
            .iter()
            .zip(&after)
            .filter(|(o, n)| **o != removed && o != n)
            .count();
        // Every slot of the removed backend changes owner.
        assert!(after.iter().all(|b| *b != removed));
        let frac = others_moved as f64 / (65537 - own) as f64;
        std::println!(
            "removed 1 of {n}: its {own} slots moved, plus {others_moved} others ({:.2}%)",
            frac * 100.0
        );
        assert!(
            frac < 0.02,
            "too much disruption: {:.2}% of other slots moved",
            frac * 100.0
        );
        // The delta is exactly the set of changed slots.
        assert_eq!(d.len(), own + others_moved);
        let mut applied = before.clone();
        for c in &d {
            applied[c.slot as usize] = c.backend_id;
        }
        assert_eq!(applied, after);
    }

    #[test]
    fn delta_of_identical_tables_is_empty_and_resize_is_full() {
        let k = keys(3);
        let b = backends(&k, &[1, 1, 1]);
        let t = build(&b, 251).unwrap();
        assert!(delta(&t, &t).is_empty());
        assert_eq!(delta(&[], &t).len(), 251);
    }
}
