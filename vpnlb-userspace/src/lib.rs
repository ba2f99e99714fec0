//! vpnlb userspace library: loading and pinning the XDP object ([`loader`]), the map boundary
//! ([`maps`]), the typed programming API the agent and tests use ([`dataplane`]) and an independent
//! reference model of the data plane ([`model`], docs/datapath.md).

pub mod dataplane;
pub mod loader;
pub mod maps;
pub mod model;
