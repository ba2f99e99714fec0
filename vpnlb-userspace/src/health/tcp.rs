//! TCP connect probe: success = the three-way handshake completes within the timeout. The socket is
//! then closed with an RST (SO_LINGER 0), as HAProxy's checks do, so a thousand checks a second leave
//! no TIME_WAIT sockets behind. Also the connect helper the HTTP probe uses.

use std::io;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::probe::{ProbeOk, bind_socket, io_detail, sock_addr};
use super::spec::{CheckSpec, CheckTarget};

/// A TCP probe's failure (its text is the result's detail) or a bad spec.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    #[error("not a tcp check")]
    NotTcp,
    #[error("timeout after {ms}ms")]
    Timeout { ms: u128 },
    #[error("socket: {}", io_detail(.error))]
    Socket { error: io::Error },
    #[error("{}", io_detail(.error))]
    Connect { error: io::Error },
}

/// A prepared TCP connect check.
#[derive(Debug, Clone)]
pub struct TcpProbe {
    target: CheckTarget,
    port: u16,
}

impl TcpProbe {
    pub fn new(target: &CheckTarget, port: u16) -> TcpProbe {
        TcpProbe {
            target: target.clone(),
            port,
        }
    }

    /// Connects once; the detail of a success is `connected 0.2ms`.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, TcpError> {
        let start = Instant::now();
        let stream = tokio::time::timeout(timeout, connect(&self.target, self.port, true))
            .await
            .map_err(|_| TcpError::Timeout {
                ms: timeout.as_millis(),
            })??;
        let latency = start.elapsed();
        drop(stream);
        Ok(ProbeOk::new(latency, "connected"))
    }
}

/// Probes a `tcp` spec once with its `timeout_ms`.
pub async fn probe_once(spec: &CheckSpec, target: &CheckTarget) -> Result<ProbeOk, TcpError> {
    let CheckSpec::Tcp { port, timing } = spec else {
        return Err(TcpError::NotTcp);
    };
    TcpProbe::new(target, *port)
        .probe(Duration::from_millis(timing.timeout_ms))
        .await
}

/// Connects to `target:port` from the target's source address / interface. With `reset_on_close`
/// the socket sends an RST instead of a FIN when dropped.
pub(crate) async fn connect(
    target: &CheckTarget,
    port: u16,
    reset_on_close: bool,
) -> Result<TcpStream, TcpError> {
    let addr = sock_addr(target, port);
    let sock = (|| {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        if reset_on_close {
            s.set_linger(Some(Duration::ZERO))?;
        }
        bind_socket(&s, target)?;
        Ok(s)
    })()
    .map_err(|error| TcpError::Socket { error })?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    sock.connect(addr)
        .await
        .map_err(|error| TcpError::Connect { error })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::CheckTiming;

    fn target() -> CheckTarget {
        CheckTarget {
            backend_id: 1,
            check_index: 0,
            generation: 0,
            addr: "127.0.0.1".parse().expect("addr"),
            source: Some("127.0.0.1".parse().expect("addr")),
            interface: None,
        }
    }

    fn spec(port: u16) -> CheckSpec {
        CheckSpec::Tcp {
            port,
            timing: CheckTiming::default(),
        }
    }

    #[tokio::test]
    async fn connects_then_reports_refused_when_the_listener_is_gone() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let ok = probe_once(&spec(port), &target()).await.expect("connect");
        assert!(ok.detail.starts_with("connected "), "{}", ok.detail);
        drop(listener);
        let err = probe_once(&spec(port), &target())
            .await
            .expect_err("refused");
        assert_eq!(err.to_string(), "connection refused");
    }

    #[tokio::test]
    async fn wrong_spec_kind_is_rejected() {
        let err = probe_once(
            &CheckSpec::Icmp {
                timing: CheckTiming::default(),
            },
            &target(),
        )
        .await
        .expect_err("not tcp");
        assert!(matches!(err, TcpError::NotTcp));
    }
}
