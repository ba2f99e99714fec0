//! UDP request/response probe: sends the payload (text or hex) from a fresh connected socket and
//! waits for a reply from the target; success = any reply, or one containing `expect`/`expect_hex`.
//! Because the socket is connected, only the target's datagrams are received, and an ICMP port
//! unreachable comes back as "connection refused" instead of a timeout.

use std::io;
use std::time::{Duration, Instant};

use super::probe::{ProbeOk, io_detail, sock_addr, udp_socket};
use super::spec::{CheckSpec, CheckTarget};

/// Largest reply read; the rest of a longer datagram is discarded.
const MAX_REPLY: usize = 65_535;

/// A UDP probe's failure (its text is the result's detail) or a bad spec.
#[derive(Debug, thiserror::Error)]
pub enum UdpError {
    #[error("not a udp check")]
    NotUdp,
    #[error("set only one of {text} and {hex}")]
    Both {
        text: &'static str,
        hex: &'static str,
    },
    #[error("bad hex in {field}: {reason}")]
    BadHex { field: &'static str, reason: String },
    #[error("no reply after {ms}ms")]
    NoReply { ms: u128 },
    #[error("reply mismatch")]
    Mismatch,
    #[error("socket: {}", io_detail(.error))]
    Socket { error: io::Error },
    #[error("{}", io_detail(.error))]
    Io { error: io::Error },
}

/// A prepared UDP check: payload and expectation decoded once.
#[derive(Debug, Clone)]
pub struct UdpProbe {
    target: CheckTarget,
    port: u16,
    payload: Vec<u8>,
    expect: Option<Vec<u8>>,
}

impl UdpProbe {
    pub fn new(spec: &CheckSpec, target: &CheckTarget) -> Result<UdpProbe, UdpError> {
        let CheckSpec::Udp {
            port,
            payload,
            payload_hex,
            expect,
            expect_hex,
            ..
        } = spec
        else {
            return Err(UdpError::NotUdp);
        };
        let payload =
            text_or_hex(payload, payload_hex, "payload", "payload_hex")?.unwrap_or_default();
        let expect = text_or_hex(expect, expect_hex, "expect", "expect_hex")?;
        Ok(UdpProbe {
            target: target.clone(),
            port: *port,
            payload,
            expect,
        })
    }

    /// Sends once and waits for the reply; the detail of a success is `reply 12 bytes 0.3ms`.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, UdpError> {
        let start = Instant::now();
        let reply = tokio::time::timeout(timeout, self.exchange())
            .await
            .map_err(|_| UdpError::NoReply {
                ms: timeout.as_millis(),
            })??;
        let latency = start.elapsed();
        if let Some(want) = &self.expect
            && !contains(&reply, want)
        {
            return Err(UdpError::Mismatch);
        }
        Ok(ProbeOk::new(
            latency,
            &format!("reply {} bytes", reply.len()),
        ))
    }

    async fn exchange(&self) -> Result<Vec<u8>, UdpError> {
        let addr = sock_addr(&self.target, self.port);
        let sock = udp_socket(&self.target, addr).map_err(|error| UdpError::Socket { error })?;
        let io = |error| UdpError::Io { error };
        sock.connect(addr).await.map_err(io)?;
        sock.send(&self.payload).await.map_err(io)?;
        let mut buf = vec![0u8; MAX_REPLY];
        let n = sock.recv(&mut buf).await.map_err(io)?;
        buf.truncate(n);
        Ok(buf)
    }
}

/// Probes a `udp` spec once with its `timeout_ms`.
pub async fn probe_once(spec: &CheckSpec, target: &CheckTarget) -> Result<ProbeOk, UdpError> {
    UdpProbe::new(spec, target)?
        .probe(Duration::from_millis(spec.timing().timeout_ms))
        .await
}

fn text_or_hex(
    text: &Option<String>,
    hex: &Option<String>,
    text_name: &'static str,
    hex_name: &'static str,
) -> Result<Option<Vec<u8>>, UdpError> {
    match (text, hex) {
        (Some(_), Some(_)) => Err(UdpError::Both {
            text: text_name,
            hex: hex_name,
        }),
        (Some(t), None) => Ok(Some(t.as_bytes().to_vec())),
        (None, Some(h)) => parse_hex(h).map(Some).map_err(|reason| UdpError::BadHex {
            field: hex_name,
            reason,
        }),
        (None, None) => Ok(None),
    }
}

/// Decodes hex bytes: `"deadbeef"`, `"0xDEADBEEF"`, `"de ad be ef"`, `"de:ad:be:ef"`.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    let s = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    let digits: Vec<u8> = s
        .bytes()
        .filter(|b| !b.is_ascii_whitespace() && *b != b':')
        .collect();
    if !digits.len().is_multiple_of(2) {
        return Err(format!("odd number of hex digits ({})", digits.len()));
    }
    digits
        .chunks(2)
        .map(|pair| {
            let nib = |c: u8| {
                (c as char)
                    .to_digit(16)
                    .ok_or_else(|| format!("not a hex digit: {:?}", c as char))
            };
            Ok((nib(pair[0])? << 4 | nib(pair[1])?) as u8)
        })
        .collect()
}

/// True if `needle` occurs in `haystack` (an empty needle always does).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::CheckTiming;

    #[test]
    fn hex_forms() {
        assert_eq!(parse_hex("deadbeef"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(parse_hex("0xDEADBEEF"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(
            parse_hex(" de ad\tbe ef "),
            Ok(vec![0xde, 0xad, 0xbe, 0xef])
        );
        assert_eq!(parse_hex("de:ad:be:ef"), Ok(vec![0xde, 0xad, 0xbe, 0xef]));
        assert_eq!(parse_hex(""), Ok(vec![]));
        assert!(parse_hex("abc").expect_err("odd").contains("odd"));
        assert!(parse_hex("zz").expect_err("digit").contains("'z'"));
    }

    #[test]
    fn contains_matches_anywhere() {
        assert!(contains(b"hello world", b"o w"));
        assert!(contains(b"abc", b""));
        assert!(contains(b"abc", b"abc"));
        assert!(!contains(b"ab", b"abc"));
        assert!(!contains(b"hello", b"world"));
    }

    fn spec(
        port: u16,
        payload: Option<&str>,
        payload_hex: Option<&str>,
        expect: Option<&str>,
        expect_hex: Option<&str>,
    ) -> CheckSpec {
        CheckSpec::Udp {
            port,
            payload: payload.map(Into::into),
            payload_hex: payload_hex.map(Into::into),
            expect: expect.map(Into::into),
            expect_hex: expect_hex.map(Into::into),
            timing: CheckTiming {
                interval_ms: 1000,
                timeout_ms: 300,
                ..CheckTiming::default()
            },
        }
    }

    fn target() -> CheckTarget {
        CheckTarget {
            backend_id: 1,
            check_index: 0,
            generation: 0,
            addr: "127.0.0.1".parse().expect("addr"),
            source: None,
            interface: None,
        }
    }

    #[test]
    fn spec_errors() {
        let both = UdpProbe::new(&spec(1, Some("a"), Some("61"), None, None), &target());
        assert_eq!(
            both.expect_err("both").to_string(),
            "set only one of payload and payload_hex"
        );
        let bad = UdpProbe::new(&spec(1, None, None, None, Some("6")), &target());
        assert_eq!(
            bad.expect_err("bad").to_string(),
            "bad hex in expect_hex: odd number of hex digits (1)"
        );
        let p = UdpProbe::new(&spec(1, None, Some("0x0102"), None, Some("02")), &target())
            .expect("valid");
        assert_eq!(p.payload, vec![1, 2]);
        assert_eq!(p.expect, Some(vec![2]));
    }

    /// A loopback responder that answers `pong:` + the request.
    fn responder() -> (std::net::UdpSocket, u16, std::thread::JoinHandle<()>) {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().expect("addr").port();
        let server = s.try_clone().expect("clone");
        let h = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            // Ends when the test sends "quit".
            while let Ok((n, from)) = server.recv_from(&mut buf) {
                if &buf[..n] == b"quit" {
                    break;
                }
                let mut reply = b"pong:".to_vec();
                reply.extend_from_slice(&buf[..n]);
                let _ = server.send_to(&reply, from);
            }
        });
        (s, port, h)
    }

    #[tokio::test]
    async fn request_response_on_loopback() {
        let (s, port, h) = responder();
        let ok = probe_once(
            &spec(port, Some("ping"), None, Some("pong:ping"), None),
            &target(),
        )
        .await
        .expect("reply");
        assert!(ok.detail.starts_with("reply 9 bytes "), "{}", ok.detail);
        let ok = probe_once(
            &spec(port, None, Some("0102"), None, Some("3a0102")),
            &target(),
        )
        .await
        .expect("hex reply");
        assert!(ok.detail.starts_with("reply 7 bytes "), "{}", ok.detail);
        let err = probe_once(
            &spec(port, Some("ping"), None, Some("nope"), None),
            &target(),
        )
        .await
        .expect_err("mismatch");
        assert_eq!(err.to_string(), "reply mismatch");
        s.send_to(b"quit", s.local_addr().expect("addr"))
            .expect("quit");
        h.join().expect("responder");
        drop(s);
        let err = probe_once(&spec(port, Some("ping"), None, None, None), &target())
            .await
            .expect_err("closed");
        assert_eq!(err.to_string(), "connection refused");
    }

    #[tokio::test]
    async fn silence_is_no_reply() {
        // Bound but never read: the datagram is queued and never answered.
        let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let port = s.local_addr().expect("addr").port();
        let err = probe_once(&spec(port, Some("x"), None, None, None), &target())
            .await
            .expect_err("silence");
        assert_eq!(err.to_string(), "no reply after 300ms");
    }
}
