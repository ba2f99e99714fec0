//! `cargo xtask drill`: chaos scenarios over the real-VPN testbed (filled in by the drill work).
