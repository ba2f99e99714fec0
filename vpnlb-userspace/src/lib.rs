//! vpnlb userspace library: loading and pinning the XDP object ([`loader`]), the map boundary
//! ([`maps`]), the typed programming API the agent and tests use ([`dataplane`]) and an independent
//! reference model of the data plane ([`model`], docs/datapath.md).

pub mod agent;
pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod gateway;
pub mod health;
pub mod hooks;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod reconcile;
pub mod session_ids;
pub mod state;
