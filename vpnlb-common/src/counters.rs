//! Ids of the global per-CPU counters in the `STATS` array.
//!
//! Every packet seen by `vpnlb_ingress` increments exactly one *outcome* counter (`FWD_*`, `PASS_*`,
//! `DROP_*`), so their sum is the number of packets processed. `SESSION_*` counters are extra events
//! on the forwarding path; `DECAP_*` are counted by `vpnlb_decap` (one outcome per packet too).
//! The ids are ABI: append only, never renumber (docs/datapath.md explains each one).

// Outcomes: forwarded.
pub const FWD_L2DSR_TX: u32 = 0;
pub const FWD_L2DSR_REDIRECT: u32 = 1;
pub const FWD_IPIP: u32 = 2;
pub const FWD_GUE: u32 = 3;
// Outcomes: passed to the kernel untouched.
pub const PASS_NOT_IP: u32 = 4;
pub const PASS_NOT_VIP: u32 = 5;
pub const PASS_L2_TRUNCATED: u32 = 6;
pub const PASS_VLAN_STACKED: u32 = 7;
pub const PASS_IPV4_TRUNCATED: u32 = 8;
pub const PASS_IPV4_BAD_VERSION: u32 = 9;
pub const PASS_IPV4_BAD_IHL: u32 = 10;
pub const PASS_IPV4_BAD_TOTLEN: u32 = 11;
pub const PASS_IPV6_TRUNCATED: u32 = 12;
pub const PASS_IPV6_BAD_VERSION: u32 = 13;
pub const PASS_IPV6_BAD_PAYLOAD_LEN: u32 = 14;
pub const PASS_IPV6_EXT_HDR: u32 = 15;
pub const PASS_FRAGMENT: u32 = 16;
pub const PASS_OTHER_PROTO: u32 = 17;
pub const PASS_L4_TRUNCATED: u32 = 18;
pub const PASS_UDP_BAD_LEN: u32 = 19;
pub const PASS_TCP_BAD_DOFF: u32 = 20;
pub const PASS_ESP_BAD_SPI: u32 = 21;
// Outcomes: dropped.
pub const DROP_NO_BACKEND: u32 = 22;
pub const DROP_BACKEND_DOWN: u32 = 23;
pub const DROP_BACKEND_BAD: u32 = 24;
pub const DROP_ENCAP_TOO_BIG: u32 = 25;
pub const DROP_ADJUST_FAILED: u32 = 26;
pub const DROP_REDIRECT_FAILED: u32 = 27;
// Session events (not outcomes).
pub const SESSION_HIT: u32 = 28;
pub const SESSION_MISS: u32 = 29;
pub const SESSION_INSERT: u32 = 30;
pub const SESSION_INSERT_FAILED: u32 = 31;
pub const SESSION_REPICK_DOWN: u32 = 32;
pub const SESSION_REPICK_IDLE: u32 = 33;
pub const SESSION_FLOOD_SKIP: u32 = 34;
// Decap program outcomes.
pub const DECAP_IPIP: u32 = 35;
pub const DECAP_GUE: u32 = 36;
pub const DECAP_PASS: u32 = 37;
pub const DECAP_BAD_INNER: u32 = 38;
pub const DECAP_ADJUST_FAILED: u32 = 39;
// Session-id events (not outcomes): an id learned from a session hit, a new flow sent by its id,
// an id whose backend was not usable (the flow fell back to the hash).
pub const SESSION_ID_LEARNED: u32 = 40;
pub const SESSION_ID_USED: u32 = 41;
pub const SESSION_ID_REJECTED: u32 = 42;
// Fragment events (not outcomes): a first fragment's backend recorded, a later fragment that
// followed its record, a later fragment without one (hashed on its source address).
pub const FRAG_RECORD: u32 = 43;
pub const FRAG_HIT: u32 = 44;
pub const FRAG_MISS: u32 = 45;
// Outcome: an ICMP "fragmentation needed" / ICMPv6 "packet too big" whose quoted packet is too
// short or not a UDP/TCP/ESP packet from the address it was sent to: passed to the kernel.
pub const PASS_ICMP_BAD_QUOTE: u32 = 46;
// PMTU events (not outcomes): such an ICMP forwarded to the quoted flow's session backend, or
// (no usable session) to the backend its hash picks.
pub const ICMP_PMTU_SESSION: u32 = 47;
pub const ICMP_PMTU_HASH: u32 = 48;
// Replication events (not outcomes; only with `GlobalConfig::replicate`): a new session or learned
// id reported to the agent through `EVENTS`, or not (the ring buffer was full).
pub const REPL_EVENT: u32 = 49;
pub const REPL_EVENT_LOST: u32 = 50;

/// Size of the `STATS` array.
pub const NUM_COUNTERS: u32 = 51;

/// Counter names (JSON keys, metric labels), indexed by id.
pub const COUNTER_NAMES: [&str; NUM_COUNTERS as usize] = [
    "fwd_l2dsr_tx",
    "fwd_l2dsr_redirect",
    "fwd_ipip",
    "fwd_gue",
    "pass_not_ip",
    "pass_not_vip",
    "pass_l2_truncated",
    "pass_vlan_stacked",
    "pass_ipv4_truncated",
    "pass_ipv4_bad_version",
    "pass_ipv4_bad_ihl",
    "pass_ipv4_bad_totlen",
    "pass_ipv6_truncated",
    "pass_ipv6_bad_version",
    "pass_ipv6_bad_payload_len",
    "pass_ipv6_ext_hdr",
    "pass_fragment",
    "pass_other_proto",
    "pass_l4_truncated",
    "pass_udp_bad_len",
    "pass_tcp_bad_doff",
    "pass_esp_bad_spi",
    "drop_no_backend",
    "drop_backend_down",
    "drop_backend_bad",
    "drop_encap_too_big",
    "drop_adjust_failed",
    "drop_redirect_failed",
    "session_hit",
    "session_miss",
    "session_insert",
    "session_insert_failed",
    "session_repick_down",
    "session_repick_idle",
    "session_flood_skip",
    "decap_ipip",
    "decap_gue",
    "decap_pass",
    "decap_bad_inner",
    "decap_adjust_failed",
    "session_id_learned",
    "session_id_used",
    "session_id_rejected",
    "frag_record",
    "frag_hit",
    "frag_miss",
    "pass_icmp_bad_quote",
    "icmp_pmtu_session",
    "icmp_pmtu_hash",
    "repl_event",
    "repl_event_lost",
];

/// What a counter id stands for: an outcome of one of the two programs, with what happens to the
/// packet, or an event (counted besides the outcome).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An outcome of `vpnlb_ingress` (exactly one per packet).
    Ingress(Verdict),
    /// An outcome of `vpnlb_decap` (exactly one per packet).
    Decap(Verdict),
    /// Not an outcome (`SESSION_*`, `FRAG_*`, `ICMP_PMTU_*`).
    Event,
}

/// What an outcome does with the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Sent on (`XDP_TX` or `XDP_REDIRECT`, chosen by the egress).
    Forward,
    /// Handed to the kernel (`XDP_PASS`).
    Pass,
    /// Dropped (`XDP_DROP`).
    Drop,
}

/// Every counter id's meaning, indexed by id: the one table both the XDP programs (the verdict of
/// a packet that stops early) and the reference model read. Its length is `NUM_COUNTERS`, so a new
/// counter does not compile without its entry; `outcomes_are_named_by_kind` checks each entry
/// against the counter's name.
pub const COUNTERS: [Counter; NUM_COUNTERS as usize] = {
    use Counter::{Decap, Event, Ingress};
    use Verdict::{Drop, Forward, Pass};
    [
        Ingress(Forward), // FWD_L2DSR_TX
        Ingress(Forward), // FWD_L2DSR_REDIRECT
        Ingress(Forward), // FWD_IPIP
        Ingress(Forward), // FWD_GUE
        Ingress(Pass),    // PASS_NOT_IP
        Ingress(Pass),    // PASS_NOT_VIP
        Ingress(Pass),    // PASS_L2_TRUNCATED
        Ingress(Pass),    // PASS_VLAN_STACKED
        Ingress(Pass),    // PASS_IPV4_TRUNCATED
        Ingress(Pass),    // PASS_IPV4_BAD_VERSION
        Ingress(Pass),    // PASS_IPV4_BAD_IHL
        Ingress(Pass),    // PASS_IPV4_BAD_TOTLEN
        Ingress(Pass),    // PASS_IPV6_TRUNCATED
        Ingress(Pass),    // PASS_IPV6_BAD_VERSION
        Ingress(Pass),    // PASS_IPV6_BAD_PAYLOAD_LEN
        Ingress(Pass),    // PASS_IPV6_EXT_HDR
        Ingress(Pass),    // PASS_FRAGMENT
        Ingress(Pass),    // PASS_OTHER_PROTO
        Ingress(Pass),    // PASS_L4_TRUNCATED
        Ingress(Pass),    // PASS_UDP_BAD_LEN
        Ingress(Pass),    // PASS_TCP_BAD_DOFF
        Ingress(Pass),    // PASS_ESP_BAD_SPI
        Ingress(Drop),    // DROP_NO_BACKEND
        Ingress(Drop),    // DROP_BACKEND_DOWN
        Ingress(Drop),    // DROP_BACKEND_BAD
        Ingress(Drop),    // DROP_ENCAP_TOO_BIG
        Ingress(Drop),    // DROP_ADJUST_FAILED
        Ingress(Drop),    // DROP_REDIRECT_FAILED
        Event,            // SESSION_HIT
        Event,            // SESSION_MISS
        Event,            // SESSION_INSERT
        Event,            // SESSION_INSERT_FAILED
        Event,            // SESSION_REPICK_DOWN
        Event,            // SESSION_REPICK_IDLE
        Event,            // SESSION_FLOOD_SKIP
        Decap(Pass),      // DECAP_IPIP: the unwrapped packet goes to the kernel
        Decap(Pass),      // DECAP_GUE
        Decap(Pass),      // DECAP_PASS
        Decap(Pass),      // DECAP_BAD_INNER
        Decap(Drop),      // DECAP_ADJUST_FAILED
        Event,            // SESSION_ID_LEARNED
        Event,            // SESSION_ID_USED
        Event,            // SESSION_ID_REJECTED
        Event,            // FRAG_RECORD
        Event,            // FRAG_HIT
        Event,            // FRAG_MISS
        Ingress(Pass),    // PASS_ICMP_BAD_QUOTE
        Event,            // ICMP_PMTU_SESSION
        Event,            // ICMP_PMTU_HASH
        Event,            // REPL_EVENT
        Event,            // REPL_EVENT_LOST
    ]
};

/// The verdict of outcome `id` (of either program); `None` for events and unknown ids.
pub const fn verdict(id: u32) -> Option<Verdict> {
    if id >= NUM_COUNTERS {
        return None;
    }
    match COUNTERS[id as usize] {
        Counter::Ingress(v) | Counter::Decap(v) => Some(v),
        Counter::Event => None,
    }
}

/// Bit `id` set for every outcome whose verdict is `v`: the form the XDP programs test (one shift,
/// no table in the object).
const fn verdict_mask(v: Verdict) -> u64 {
    let mut mask = 0u64;
    let mut id = 0;
    while id < NUM_COUNTERS {
        if let Some(x) = verdict(id)
            && x as u8 == v as u8
        {
            mask |= 1 << id;
        }
        id += 1;
    }
    mask
}

const _: () = assert!(
    NUM_COUNTERS <= 64,
    "the verdict masks hold one bit per counter id"
);

/// The outcomes that drop the packet, as a bit mask over counter ids.
pub const DROP_OUTCOMES: u64 = verdict_mask(Verdict::Drop);

/// True when outcome `id` drops the packet (from [`COUNTERS`]).
#[inline(always)]
pub const fn is_drop(id: u32) -> bool {
    id < NUM_COUNTERS && (DROP_OUTCOMES >> id) & 1 != 0
}

/// True for outcome ids whose packets leave the host (forwarded).
pub const fn is_forward(id: u32) -> bool {
    matches!(verdict(id), Some(Verdict::Forward))
}

const fn ingress_outcome_count() -> usize {
    let mut n = 0;
    let mut id = 0;
    while id < COUNTERS.len() {
        if let Counter::Ingress(_) = COUNTERS[id] {
            n += 1;
        }
        id += 1;
    }
    n
}

/// Outcome counters of `vpnlb_ingress` (exactly one per packet), in id order, from [`COUNTERS`].
pub const INGRESS_OUTCOMES: [u32; ingress_outcome_count()] = {
    let mut ids = [0u32; ingress_outcome_count()];
    let (mut i, mut id) = (0, 0);
    while id < COUNTERS.len() {
        if let Counter::Ingress(_) = COUNTERS[id] {
            ids[i] = id as u32;
            i += 1;
        }
        id += 1;
    }
    ids
};

#[cfg(test)]
mod tests {
    use super::*;

    /// Readers (`vpnlb top`, `inspect stats`) group outcomes by name prefix: every outcome is
    /// exactly one of fwd_/pass_/drop_, and no event counter looks like one; the table's verdict of
    /// every counter agrees with its name.
    #[test]
    fn outcomes_are_named_by_kind() {
        for id in 0..NUM_COUNTERS {
            let n = COUNTER_NAMES[id as usize];
            let outcome = ["fwd_", "pass_", "drop_"]
                .iter()
                .filter(|p| n.starts_with(*p))
                .count();
            let is_decap = n.starts_with("decap_");
            assert_eq!(
                outcome == 1 && !is_decap,
                INGRESS_OUTCOMES.contains(&id),
                "{n} (id {id})"
            );
            assert_eq!(is_forward(id), n.starts_with("fwd_"), "{n}");
            let want = match COUNTERS[id as usize] {
                Counter::Ingress(_) => {
                    let v = if n.starts_with("fwd_") {
                        Verdict::Forward
                    } else if n.starts_with("drop_") {
                        Verdict::Drop
                    } else {
                        Verdict::Pass
                    };
                    Some(v)
                }
                // The decap program drops only when it cannot move the head; it passes the rest.
                Counter::Decap(_) => Some(if n == "decap_adjust_failed" {
                    Verdict::Drop
                } else {
                    Verdict::Pass
                }),
                Counter::Event => None,
            };
            assert_eq!(verdict(id), want, "{n}");
            assert_eq!(is_drop(id), want == Some(Verdict::Drop), "{n}");
            assert_eq!(
                matches!(COUNTERS[id as usize], Counter::Decap(_)),
                is_decap,
                "{n}"
            );
        }
        assert!(!is_drop(NUM_COUNTERS) && verdict(NUM_COUNTERS).is_none());
    }
}
