//! Everything the vpnlb data plane (XDP) and the userspace agent/CLI both read: map keys and values,
//! counter ids, the flow hash and (with the `user` feature) the Maglev table builder.
//!
//! The layout of every `#[repr(C)]` type here is the ABI of the pinned maps (docs/maps.md). Changing a
//! size or a field's meaning requires bumping [`ABI_VERSION`], which moves the pin directory.
#![no_std]

#[cfg(target_endian = "big")]
compile_error!("vpnlb supports little-endian hosts only (the flow hash reads wire words as LE)");

#[cfg(feature = "user")]
extern crate alloc;
#[cfg(feature = "user")]
extern crate std;

pub mod counters;
pub mod hash;
#[cfg(feature = "user")]
pub mod maglev;
pub mod types;

pub use counters::*;
pub use types::*;

/// Version of the map ABI. Pins live under `/sys/fs/bpf/vpnlb/v{ABI_VERSION}/`.
pub const ABI_VERSION: u32 = 5;
/// Root of the versioned pin directory (without the version component).
pub const PIN_ROOT: &str = "/sys/fs/bpf/vpnlb";
