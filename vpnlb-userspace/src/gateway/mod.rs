//! The gateway side of vpnlb: the decap program's attachment ([`decap`], `vpnlb decap`) and what
//! `vpnlb gateway-check` inspects on a gateway host ([`host`] settings, running [`daemons`], the
//! active [`reply`] test).

pub mod daemons;
pub mod decap;
pub mod host;
pub mod reply;
