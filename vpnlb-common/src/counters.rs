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

/// Size of the `STATS` array.
pub const NUM_COUNTERS: u32 = 49;

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
];

/// Outcome counters of `vpnlb_ingress` (exactly one per packet): ids `0..SESSION_HIT` and the
/// outcomes appended later (ids are never renumbered).
pub const INGRESS_OUTCOMES: [u32; 29] = ingress_outcomes();

const fn ingress_outcomes() -> [u32; 29] {
    let mut ids = [0u32; 29];
    let mut i = 0;
    while i < SESSION_HIT as usize {
        ids[i] = i as u32;
        i += 1;
    }
    ids[28] = PASS_ICMP_BAD_QUOTE;
    ids
}

/// True for outcome ids whose packets leave the host (forwarded).
pub fn is_forward(id: u32) -> bool {
    id <= FWD_GUE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Readers (`vpnlb top`, `inspect stats`) group outcomes by name prefix: every outcome is
    /// exactly one of fwd_/pass_/drop_, and no event counter looks like one.
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
        }
    }
}
