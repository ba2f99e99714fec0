//! Test support for vpnlb: packet builders and expected-output builders ([`packet`]), a tiny pcap
//! reader/writer ([`pcap`]), network namespaces ([`netns`]), the `BPF_PROG_TEST_RUN` harness that drives the
//! production XDP object ([`harness`]) and a bridged multi-namespace testbed with the program attached
//! for real ([`testbed`]), and the seeded packet mutator of the differential test ([`mutate`]).
//!
//! The harness needs root and the eBPF object; the builders and the pcap code are pure.

pub mod agent;
pub mod bfd_peer;
pub mod budget;
pub mod drill;
pub mod etcd;
pub mod harness;
pub mod ipsec;
pub mod livegen;
pub mod mutate;
pub mod netns;
pub mod openvpn;
pub mod packet;
pub mod pcap;
pub mod pins;
pub mod probe_round;
pub mod testbed;
pub mod wg;
