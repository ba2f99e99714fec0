//! Health checks: what to probe ([`spec`]), the periodic probes ([`icmp`], [`tcp`], [`http`] for
//! http and https, [`udp`], the VPN-protocol probes [`wireguard`] (optionally with an echo
//! through the tunnel, [`tunnel_ping`]) and [`ikev2`], and [`exec`] for an operator's program) started by
//! [`runner`] as tokio tasks with jitter, and [`bfd`] sessions (RFC 5880/5881). All report raw
//! results on a channel; rise/fall counting and the backend state machine live in the agent core
//! (pure, clock as an argument).

pub mod bfd;
pub mod exec;
pub mod http;
pub mod icmp;
pub mod ikev2;
pub mod probe;
pub mod runner;
pub mod spec;
pub mod tcp;
pub mod tunnel_ping;
pub mod udp;
pub mod wireguard;

pub use spec::{CheckResult, CheckSpec, CheckTarget, CheckTiming};
