//! Stage 4: the session table (`SESSIONS`): keep a flow on its backend, re-pick it when the backend
//! died or the session idled out, and record new picks behind the per-CPU insert flood guard.
//! Session ids: a hit teaches `SESSION_IDS` which backend owns the packet's id; a new flow with a
//! known id (static range first, then learned) goes to that backend if it is usable.

use aya_ebpf::{
    bindings::BPF_ANY, btf_maps::lpm_trie::Key, helpers::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use vpnlb_common::{
    BACKEND_DRAINING, BACKEND_UP, Backend, DROP_BACKEND_DOWN, FlowKey, ICMP_PMTU_HASH,
    ICMP_PMTU_SESSION, ID_RANGE_KIND_BITS, IdKey, IdRangeData, REPL_EVENT, REPL_EVENT_LOST,
    REPL_KIND_ID, REPL_KIND_SESSION, SESSION_FLOOD_SKIP, SESSION_HIT, SESSION_ID_LEARNED,
    SESSION_ID_REJECTED, SESSION_ID_USED, SESSION_INSERT, SESSION_INSERT_FAILED, SESSION_MISS,
    SESSION_REPICK_DOWN, SESSION_REPICK_IDLE, SESSION_TOUCH_NS, Session, VipMeta, hash::pick_hash,
};

use crate::{
    maglev,
    maps::{BACKENDS, CONFIG, EVENTS, FLOOD, ID_RANGES, SESSION_IDS, SESSIONS},
    stats::{Stop, count},
};

/// Length of the flood guard's window.
const FLOOD_WINDOW_NS: u64 = 1_000_000_000;

/// Where a packet goes: the VIP whose settings forward it, and its backend.
pub struct Target {
    pub vip: &'static VipMeta,
    /// Backend id (index of `BACKENDS` and `BACKEND_STATS`).
    pub id: u32,
    pub backend: &'static Backend,
    /// The flow hash (`pick_hash`); on a session hit the one stored with the session.
    pub hash: u32,
    /// `bpf_ktime_get_coarse_ns()` of this packet's session stage.
    pub now: u64,
}

/// The backend `id` if its entry exists and it is up or draining.
#[inline(always)]
pub fn usable(id: u32) -> Option<&'static Backend> {
    BACKENDS
        .get(id)
        .filter(|b| b.state == BACKEND_UP || b.state == BACKEND_DRAINING)
}

/// Runs stage 4: session lookup (learning the packet's id on a hit), else the id's backend or the
/// Maglev pick, and session insert. For a PMTU message (`pmtu`, `key` the quoted flow's) the
/// session is only read: used when its backend is usable, whatever its age, else the hash picks;
/// nothing is refreshed, learned or inserted, and `ICMP_PMTU_*` is counted instead of `SESSION_*`.
#[inline(always)]
pub fn resolve(
    ctx: &XdpContext,
    key: &FlowKey,
    vip: &'static VipMeta,
    tos: u8,
    sid: Option<&IdKey>,
    pmtu: bool,
) -> Result<Target, Stop> {
    // CLOCK_MONOTONIC_COARSE (jiffy resolution): enough for a 1 s touch and idle timeouts, and
    // about half the cost of bpf_ktime_get_ns on hosts where reading the TSC traps (VMs).
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions (kernel >= 5.11).
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let hit = if pmtu {
        peek(key)
    } else {
        lookup(key, vip, now)
    };
    // A hit never hashes: encapsulation takes the hash stored with the session.
    if let Some(backend) = hit.backend {
        if let Some(sid) = sid {
            learn(sid, hit.id);
        }
        return Ok(Target {
            vip,
            id: hit.id,
            backend,
            hash: hit.hash,
            now,
        });
    }
    if pmtu {
        count(ICMP_PMTU_HASH);
    }
    // The one copy of the flow hash for new picks (a later fragment hashes its source address
    // alone, frag.rs). Inlined: as a BPF function of its own (a BPF-to-BPF call) new_flow measured
    // 7-10% slower against this on our AMD VM, whose kernel reports the Safe RET mitigation.
    let hash = pick_hash(key, vip.flags);
    let (id, backend) = match sid.and_then(by_id) {
        Some(found) => found,
        None => {
            let id = maglev::pick(vip, hash, tos)?;
            (id, usable(id).ok_or(Stop(DROP_BACKEND_DOWN))?)
        }
    };
    if !pmtu {
        record(ctx, key, id, hash, now);
    }
    Ok(Target {
        vip,
        id,
        backend,
        hash,
        now,
    })
}

/// Remembers that `sid` belongs to backend `id`, writing only when that is news (a hit's only
/// cost is then one lookup).
#[inline(always)]
fn learn(sid: &IdKey, id: u32) {
    // SAFETY: a u32 value read once; a concurrent update can only make us write once more.
    if unsafe { SESSION_IDS.get(sid) }.copied() == Some(id) {
        return;
    }
    if SESSION_IDS.insert(sid, id, u64::from(BPF_ANY)).is_ok() {
        count(SESSION_ID_LEARNED);
        if replicating() {
            report(REPL_KIND_ID, id, 0, None, Some(sid));
        }
    }
}

/// Whether the agent asked for new sessions and ids on `EVENTS` (a replicating cluster member).
#[inline(always)]
fn replicating() -> bool {
    CONFIG.get(0).is_some_and(|c| c.replicate != 0)
}

/// Reports a new session (`flow`, or a learned id: `id`) with its backend on `EVENTS`
/// (`REPL_EVENT`), or counts that the ring was full (`REPL_EVENT_LOST`: the agent's peers get the
/// entry in their next bulk copy). Only the key of the event's kind is written; the other one is
/// whatever the ring's memory held (the agent reads the kind's key only). Not inlined: a rare
/// path (inserts and id changes of replicating members), one copy for both callers.
#[inline(never)]
fn report(kind: u32, backend_id: u32, hash: u32, flow: Option<&FlowKey>, id: Option<&IdKey>) {
    let Some(mut e) = EVENTS.reserve(0) else {
        count(REPL_EVENT_LOST);
        return;
    };
    let p = e.as_mut_ptr();
    // SAFETY: `p` points to the 88 reserved bytes of this record (8-aligned by the kernel), ours
    // until submit; fields are written one by one (no struct with an enum tag on the stack: that
    // misaligns its words, which the verifier refuses).
    unsafe {
        (*p).kind = kind;
        (*p).backend_id = backend_id;
        (*p).hash = hash;
        (*p)._pad = 0;
        if let Some(f) = flow {
            (*p).flow = *f;
        }
        if let Some(i) = id {
            (*p).id = *i;
        }
    }
    e.submit(0);
    count(REPL_EVENT);
}

/// The backend that owns `sid`: a static range (longest prefix of kind + id bytes) first, else the
/// learned id. Found but not usable: `SESSION_ID_REJECTED` and `None` (the hash decides).
#[inline(always)]
fn by_id(sid: &IdKey) -> Option<(u32, &'static Backend)> {
    let b = sid.id.to_le_bytes();
    let words = [
        u32::from_ne_bytes([sid.kind, 0, 0, 0]),
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    ];
    // Built from words: a `_pad: [0; 3]` literal compiles to a call of the byte-loop `memset`.
    // SAFETY: IdRangeData is 12 bytes of plain integers (repr(C), no padding); any bytes are valid.
    let data = unsafe { core::mem::transmute::<[u32; 3], IdRangeData>(words) };
    let range = Key::new(ID_RANGE_KIND_BITS + 64, data);
    // SAFETY: both values are u32s read once (the maps are only written by the agent / on hits).
    let id = match ID_RANGES.get(&range).copied() {
        Some(id) => id,
        None => unsafe { SESSION_IDS.get(sid) }.copied()?,
    };
    match usable(id) {
        Some(b) => {
            count(SESSION_ID_USED);
            Some((id, b))
        }
        None => {
            count(SESSION_ID_REJECTED);
            None
        }
    }
}

/// A session lookup's result: `backend` is `Some` for a usable, fresh session.
struct Hit {
    /// Always initialised (0 on a miss): an undefined field would be spilled from an undefined
    /// register, which the verifier rejects (`R2 !read_ok`).
    id: u32,
    /// The stored flow hash of a usable session (0 otherwise).
    hash: u32,
    backend: Option<&'static Backend>,
}

/// Step 1: a usable, fresh session of `key` (counted `SESSION_HIT`, and touched when its
/// `last_seen_ns` is a second old), or the reason to re-pick (`SESSION_*` counted).
#[inline(always)]
fn lookup(key: &FlowKey, vip: &VipMeta, now: u64) -> Hit {
    let Some(s) = SESSIONS.get_ptr_mut(key) else {
        count(SESSION_MISS);
        return Hit {
            id: 0,
            hash: 0,
            backend: None,
        };
    };
    // SAFETY: `s` is a valid pointer into the LRU's preallocated element memory for the whole run
    // (RCU). Nothing in this run inserts before these accesses; another CPU may touch
    // `last_seen_ns` (an aligned u64 store: we read one value or the other) or, rarely, evict and
    // recycle the element, in which case this one packet sees another flow's session: the usual,
    // accepted race of every BPF LRU reader (Katran's too).
    let (id, hash, last_seen) = unsafe { ((*s).backend_id, (*s).hash, (*s).last_seen_ns) };
    let Some(backend) = usable(id) else {
        count(SESSION_REPICK_DOWN);
        return Hit {
            id: 0,
            hash: 0,
            backend: None,
        };
    };
    let idle = now.wrapping_sub(last_seen);
    if vip.idle_timeout_ns != 0 && idle > vip.idle_timeout_ns {
        count(SESSION_REPICK_IDLE);
        return Hit {
            id: 0,
            hash: 0,
            backend: None,
        };
    }
    count(SESSION_HIT);
    if idle >= SESSION_TOUCH_NS {
        // SAFETY: as above; an aligned u64 store into element memory.
        unsafe { (*s).last_seen_ns = now };
    }
    Hit {
        id,
        hash,
        backend: Some(backend),
    }
}

/// A PMTU message's read of the quoted flow's session: its backend when usable, whatever the
/// session's age (`ICMP_PMTU_SESSION`); nothing is counted otherwise, nothing written.
#[inline(always)]
fn peek(key: &FlowKey) -> Hit {
    // SAFETY: a value copied out at once (see `lookup` on LRU element reuse).
    let session = unsafe { SESSIONS.get(key) }.copied();
    match session.and_then(|s| usable(s.backend_id).map(|b| (s, b))) {
        Some((s, backend)) => {
            count(ICMP_PMTU_SESSION);
            Hit {
                id: s.backend_id,
                hash: s.hash,
                backend: Some(backend),
            }
        }
        None => Hit {
            id: 0,
            hash: 0,
            backend: None,
        },
    }
}

/// Inserts `key → id`, unless this CPU already inserted `flood_max_inserts_per_sec` sessions in
/// the current one-second window (then the packet is forwarded by hash alone).
#[inline(always)]
fn record(ctx: &XdpContext, key: &FlowKey, id: u32, hash: u32, now: u64) {
    let limit = CONFIG
        .get(0)
        .map_or(0, |c| u64::from(c.flood_max_inserts_per_sec));
    if limit != 0
        && let Some(f) = FLOOD.get_ptr_mut(0)
    {
        // SAFETY: this CPU's slot of a per-CPU array entry: valid and touched by no one else
        // during this run.
        let f = unsafe { &mut *f };
        if now.wrapping_sub(f.window_start_ns) >= FLOOD_WINDOW_NS {
            f.window_start_ns = now;
            f.inserts = 0;
        }
        if f.inserts >= limit {
            count(SESSION_FLOOD_SKIP);
            if f.inserts == limit {
                // First skip of this window: `inserts` moves to limit + 1 so we log only once.
                f.inserts += 1;
                warn!(
                    ctx,
                    "session flood guard engaged: {} inserts this second on this CPU", limit
                );
            }
            return;
        }
        f.inserts += 1;
    }
    let session = Session {
        backend_id: id,
        hash,
        last_seen_ns: now,
    };
    match SESSIONS.insert(key, session, u64::from(BPF_ANY)) {
        Ok(()) => {
            count(SESSION_INSERT);
            if replicating() {
                report(REPL_KIND_SESSION, id, hash, Some(key), None);
            }
        }
        Err(_) => count(SESSION_INSERT_FAILED),
    }
}
