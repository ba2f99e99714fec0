//! The operator CLI (`vpnlb inspect|simulate|top|drain|...`): reads the pinned maps read-only
//! ([`source`]) and talks to the agent through its control socket for changes. One writer: the CLI
//! never writes a map.

pub mod cluster;
pub mod ctl;
pub mod gateway_check;
pub mod inspect;
pub mod render;
pub mod simulate;
pub mod source;
pub mod top;
