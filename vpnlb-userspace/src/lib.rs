//! vpnlb userspace library, laid out by layer (imports only go down):
//! - [`cli`]: the operator commands;
//! - [`agent`]: `vpnlb run`: the I/O-free decision core, the backend state machine, the reconciler,
//!   hooks, metrics and the control socket, and the tokio shell that runs them;
//! - [`config`], [`health`] (checks and BFD), [`gateway`] (gateway-side tools) beside them;
//! - [`dataplane`]: loading and pinning the XDP object, attaching it, the map boundary, the typed
//!   programming API, session ids and an independent reference model (docs/datapath.md).

pub mod agent;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod gateway;
pub mod health;
