//! What every periodic probe shares: its success value ([`ProbeOk`]) and the socket helpers (the
//! target's address with its scope, binding to the target's interface and source, short error
//! details). The probes ([`super::icmp`], [`super::tcp`], ...) and the runner both use this file;
//! neither imports the other for it.

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::time::Duration;

use super::spec::CheckTarget;

/// A successful probe: its round-trip time and a short detail such as `echo reply 0.3ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOk {
    pub latency: Duration,
    pub detail: String,
    /// The round trips of a probe made of several exchanges, by name (a `wireguard` check with
    /// `inside`: `handshake` and `inside`); empty for single-exchange probes.
    pub phases: Vec<(&'static str, Duration)>,
}

impl ProbeOk {
    /// `what` followed by the latency: `ProbeOk::new(d, "echo reply")` -> "echo reply 0.3ms".
    pub fn new(latency: Duration, what: &str) -> ProbeOk {
        ProbeOk {
            latency,
            detail: format!("{what} {}", fmt_ms(latency)),
            phases: Vec::new(),
        }
    }
}

/// `0.3ms` below 10 ms, `42ms` above.
pub fn fmt_ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1000.0;
    if ms < 10.0 {
        format!("{ms:.1}ms")
    } else {
        format!("{ms:.0}ms")
    }
}

/// A short lowercase description of a socket error: "connection refused", "network unreachable"...
pub fn io_detail(e: &io::Error) -> String {
    let known = match e.raw_os_error() {
        Some(libc::ECONNREFUSED) => "connection refused",
        Some(libc::ECONNRESET) => "connection reset",
        Some(libc::ENETUNREACH) => "network unreachable",
        Some(libc::EHOSTUNREACH) => "host unreachable",
        Some(libc::ENETDOWN) => "network down",
        Some(libc::EHOSTDOWN) => "host down",
        Some(libc::EADDRNOTAVAIL) => "source address not available",
        Some(libc::EPERM) | Some(libc::EACCES) => "permission denied",
        Some(libc::ENOBUFS) => "no buffer space",
        Some(libc::ENODEV) => "no such interface",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_string();
    }
    let s = e.to_string();
    // std's "Message (os error N)" -> "message".
    let s = s.split(" (os error").next().unwrap_or(&s);
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => "i/o error".to_string(),
    }
}

/// The address to probe on `port`; IPv6 link-local targets get the interface as scope id.
pub fn sock_addr(target: &CheckTarget, port: u16) -> SocketAddr {
    match target.addr {
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            let scope = target.interface.as_deref().map(if_index).unwrap_or(0);
            SocketAddr::V6(SocketAddrV6::new(a, port, 0, scope))
        }
        a => SocketAddr::new(a, port),
    }
}

/// ifindex of `name` in the calling thread's namespace (0 if unknown).
pub fn if_index(name: &str) -> u32 {
    match std::ffi::CString::new(name) {
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        Ok(c) => unsafe { libc::if_nametoindex(c.as_ptr()) },
        Err(_) => 0,
    }
}

/// A non-blocking UDP socket for probing `addr`, bound to the target's source/interface when set
/// (not connected yet).
pub fn udp_socket(target: &CheckTarget, addr: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    s.set_nonblocking(true)?;
    bind_socket(&s, target)?;
    tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(s))
}

/// Applies the target's interface (SO_BINDTODEVICE) and source address to a new socket.
pub fn bind_socket(sock: &socket2::Socket, target: &CheckTarget) -> io::Result<()> {
    if let Some(dev) = &target.interface {
        sock.bind_device(Some(dev.as_bytes()))?;
    }
    if let Some(src) = target.source {
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_and_errors_read_short() {
        assert_eq!(fmt_ms(Duration::from_micros(300)), "0.3ms");
        assert_eq!(fmt_ms(Duration::from_millis(42)), "42ms");
        assert_eq!(
            ProbeOk::new(Duration::from_micros(1250), "echo reply").detail,
            "echo reply 1.2ms"
        );
        assert_eq!(
            io_detail(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "connection refused"
        );
        assert_eq!(
            io_detail(&io::Error::from_raw_os_error(libc::EINVAL)),
            "invalid argument"
        );
    }
}
