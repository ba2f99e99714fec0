//! BFD (RFC 5880 asynchronous mode, RFC 5881 single hop over UDP 3784): the Control packet
//! ([`packet`]), the sans-IO session state machine ([`session`]) and the tokio shell that runs many
//! sessions on one receive socket ([`manager`]). See docs/bfd.md.

pub mod manager;
pub mod packet;
pub mod session;

pub use manager::{BfdError, BfdManager, BfdSessionHandle, BfdStats, BfdStatus};
pub use packet::{ControlPacket, Diagnostic, PacketError, State};
pub use session::{Event, ParamsError, Session, SessionParams};
