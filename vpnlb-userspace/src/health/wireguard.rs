//! WireGuard probe: a real handshake (Noise IK, boringtun's `Tunn`) with the gateway, which has the
//! probe's public key configured as a peer (with harmless AllowedIPs: a /32 nobody uses). Success =
//! a handshake response that authenticates with the gateway's key; its round trip is the latency.
//! Unlike ICMP, this fails when the daemon is wedged or gone while the host still answers pings.
//!
//! Each probe uses a fresh `Tunn` and a fresh connected socket. After the response the probe sends
//! the keepalive that confirms the session, as a real client does: the gateway then records the
//! handshake (`wg show` lists the probe peer's latest handshake) and no half-done state is left.
//! wireguard-go drops initiations from one peer key that come less than 20 ms apart, so probes are
//! spaced (default interval 5 s) and every prober needs its own key.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::probe::{ProbeOk, io_detail, sock_addr, udp_socket};
use super::spec::{CheckSpec, CheckTarget};

/// WireGuard message types (first byte, little-endian u32).
const MSG_HANDSHAKE_RESPONSE: u8 = 2;
const MSG_COOKIE_REPLY: u8 = 3;
/// Largest datagram read (a handshake response is 92 bytes).
const MAX_DATAGRAM: usize = 2048;

/// A WireGuard probe's failure (its text is the result's detail) or a bad spec.
#[derive(Debug, thiserror::Error)]
pub enum WireguardError {
    #[error("not a wireguard check")]
    NotWireguard,
    #[error("public_key: {0}")]
    PublicKey(String),
    #[error("private_key: {0}")]
    PrivateKey(String),
    #[error("private_key_file {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("set one of private_key and private_key_file")]
    NoPrivateKey,
    #[error("set only one of private_key and private_key_file")]
    BothPrivateKeys,
    #[error("no handshake response after {ms}ms")]
    NoResponse { ms: u128 },
    #[error("invalid response: {0}")]
    Invalid(String),
    #[error("socket: {}", io_detail(.error))]
    Socket { error: io::Error },
    #[error("{}", io_detail(.error))]
    Io { error: io::Error },
}

/// Decodes a WireGuard key: base64 of exactly 32 bytes (as `wg genkey` / `wg pubkey` print).
pub fn parse_key(s: &str) -> Result<[u8; 32], String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty key".into());
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| format!("not base64 ({e})"))?;
    <[u8; 32]>::try_from(bytes.as_slice())
        .map_err(|_| format!("{} bytes, a WireGuard key has 32", bytes.len()))
}

/// Reads and decodes a private key file (one base64 key, surrounding whitespace ignored).
pub fn read_key_file(path: &str) -> Result<[u8; 32], WireguardError> {
    let text = std::fs::read_to_string(path).map_err(|e| WireguardError::KeyFile {
        path: path.into(),
        reason: io_detail(&e),
    })?;
    parse_key(&text).map_err(|reason| WireguardError::KeyFile {
        path: path.into(),
        reason,
    })
}

/// The public key of a private key.
pub fn public_key_bytes(private: [u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(private)).to_bytes()
}

/// The base64 public key of a base64 private key (what `wg pubkey` prints).
pub fn public_key_of(private: &str) -> Result<String, String> {
    Ok(base64::engine::general_purpose::STANDARD.encode(public_key_bytes(parse_key(private)?)))
}

/// A prepared WireGuard check: keys decoded (and the key file read) once.
#[derive(Clone)]
pub struct WireguardProbe {
    target: CheckTarget,
    port: u16,
    private: [u8; 32],
    peer: [u8; 32],
}

impl fmt::Debug for WireguardProbe {
    // Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireguardProbe")
            .field("target", &self.target)
            .field("port", &self.port)
            .field(
                "peer",
                &base64::engine::general_purpose::STANDARD.encode(self.peer),
            )
            .finish_non_exhaustive()
    }
}

impl WireguardProbe {
    pub fn new(spec: &CheckSpec, target: &CheckTarget) -> Result<WireguardProbe, WireguardError> {
        let CheckSpec::Wireguard {
            port,
            public_key,
            private_key,
            private_key_file,
            ..
        } = spec
        else {
            return Err(WireguardError::NotWireguard);
        };
        let peer = parse_key(public_key).map_err(WireguardError::PublicKey)?;
        let private = match (private_key, private_key_file) {
            (Some(_), Some(_)) => return Err(WireguardError::BothPrivateKeys),
            (None, None) => return Err(WireguardError::NoPrivateKey),
            (Some(k), None) => parse_key(k).map_err(WireguardError::PrivateKey)?,
            (None, Some(path)) => read_key_file(path)?,
        };
        Ok(WireguardProbe {
            target: target.clone(),
            port: *port,
            private,
            peer,
        })
    }

    /// One handshake bounded by `timeout`; the detail of a success is `handshake response 0.4ms`.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, WireguardError> {
        tokio::time::timeout(timeout, self.handshake())
            .await
            .map_err(|_| WireguardError::NoResponse {
                ms: timeout.as_millis(),
            })?
    }

    async fn handshake(&self) -> Result<ProbeOk, WireguardError> {
        let addr = sock_addr(&self.target, self.port);
        let sock =
            udp_socket(&self.target, addr).map_err(|error| WireguardError::Socket { error })?;
        let io = |error| WireguardError::Io { error };
        sock.connect(addr).await.map_err(io)?;

        // The local index is 24 bits: boringtun keeps the low 8 for its session ring.
        let index = rand::random::<u32>() >> 8;
        let mut tunn = Tunn::new(
            StaticSecret::from(self.private),
            PublicKey::from(self.peer),
            None,
            None,
            index,
            None,
        );
        let mut out = vec![0u8; MAX_DATAGRAM];
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let init = initiation(&mut tunn, &mut out, false)?;
        let start = Instant::now();
        sock.send(&init).await.map_err(io)?;
        let mut cookie = false;
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            let latency = start.elapsed();
            let msg_type = if n >= 4 { buf[0] } else { 0 };
            match tunn.decapsulate(Some(self.target.addr), &buf[..n], &mut out) {
                // A valid response: boringtun derived the session; confirm it with the keepalive
                // (best effort: the answer already proves liveness).
                TunnResult::WriteToNetwork(keepalive) if msg_type == MSG_HANDSHAKE_RESPONSE => {
                    let _ = sock.send(keepalive).await;
                    let what = if cookie {
                        "handshake response (after cookie)"
                    } else {
                        "handshake response"
                    };
                    return Ok(ProbeOk::new(latency, what));
                }
                // The gateway is under load and wants its cookie in mac2: resend once with it.
                TunnResult::Done if msg_type == MSG_COOKIE_REPLY && !cookie => {
                    cookie = true;
                    let init = initiation(&mut tunn, &mut out, true)?;
                    sock.send(&init).await.map_err(io)?;
                }
                TunnResult::Err(e) => return Err(WireguardError::Invalid(format!("{e:?}"))),
                _ => {
                    return Err(WireguardError::Invalid(format!(
                        "unexpected message type {msg_type} ({n} bytes)"
                    )));
                }
            }
        }
    }
}

/// A handshake initiation from `tunn` (`force` resends one already in progress).
fn initiation(tunn: &mut Tunn, out: &mut [u8], force: bool) -> Result<Vec<u8>, WireguardError> {
    match tunn.format_handshake_initiation(out, force) {
        TunnResult::WriteToNetwork(p) => Ok(p.to_vec()),
        TunnResult::Err(e) => Err(WireguardError::Invalid(format!("initiation: {e:?}"))),
        _ => Err(WireguardError::Invalid("no initiation".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::CheckTiming;
    use tokio::net::UdpSocket;

    const KEY_A: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";

    fn spec(public_key: &str, private_key: Option<&str>, file: Option<&str>) -> CheckSpec {
        CheckSpec::Wireguard {
            port: 51820,
            public_key: public_key.into(),
            private_key: private_key.map(Into::into),
            private_key_file: file.map(Into::into),
            timing: CheckTiming {
                interval_ms: 5000,
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
    fn keys_parse_and_errors_read_well() {
        assert_eq!(parse_key(KEY_A).expect("key")[0], 0xc8);
        assert_eq!(
            parse_key(&format!("  {KEY_A}\n")).expect("trimmed")[0],
            0xc8
        );
        assert_eq!(parse_key("").expect_err("empty"), "empty key");
        assert!(
            parse_key("not base64!")
                .expect_err("b64")
                .starts_with("not base64")
        );
        assert_eq!(
            parse_key("AAAAAAAAAAAAAAAAAAAAAA==").expect_err("short"),
            "16 bytes, a WireGuard key has 32"
        );
        let public = public_key_of(KEY_A).expect("pub");
        assert_eq!(parse_key(&public).expect("pub parses").len(), 32);
        assert_ne!(public, KEY_A);
    }

    #[test]
    fn spec_errors() {
        let t = target();
        let err = |s: CheckSpec| {
            WireguardProbe::new(&s, &t)
                .expect_err("bad spec")
                .to_string()
        };
        assert_eq!(
            err(spec("AAAA", Some(KEY_A), None)),
            "public_key: 3 bytes, a WireGuard key has 32"
        );
        assert_eq!(
            err(spec(KEY_A, None, None)),
            "set one of private_key and private_key_file"
        );
        assert_eq!(
            err(spec(KEY_A, Some(KEY_A), Some("/x"))),
            "set only one of private_key and private_key_file"
        );
        assert!(err(spec(KEY_A, Some("@@"), None)).starts_with("private_key: not base64"));
        assert_eq!(
            err(spec(KEY_A, None, Some("/nonexistent/vpnlb-probe.key"))),
            "private_key_file /nonexistent/vpnlb-probe.key: no such file or directory"
        );
        let dir = std::env::temp_dir().join(format!("vpnlb-wgkey-{}", std::process::id()));
        std::fs::write(&dir, format!("{KEY_A}\n")).expect("write key");
        let path = dir.to_str().expect("utf-8 path");
        let p = WireguardProbe::new(&spec(KEY_A, None, Some(path)), &t).expect("key file");
        assert_eq!(p.private, parse_key(KEY_A).expect("key"));
        std::fs::write(&dir, "garbage").expect("write key");
        assert!(err(spec(KEY_A, None, Some(path))).contains("not base64"));
        let _ = std::fs::remove_file(&dir);
        // Debug never shows the private key.
        let p = WireguardProbe::new(&spec(KEY_A, Some(KEY_A), None), &t).expect("valid");
        let dbg = format!("{p:?}");
        assert!(dbg.contains("peer") && !dbg.contains("private"), "{dbg}");
    }

    /// A loopback "gateway" that answers with `reply` (or stays silent): the probe sends a
    /// well-formed 148-byte initiation and rejects what is not a valid response.
    async fn against(reply: Option<Vec<u8>>) -> (Result<ProbeOk, WireguardError>, Vec<u8>) {
        let gw = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = gw.local_addr().expect("addr").port();
        let mut s = spec(KEY_A, Some(KEY_A), None);
        if let CheckSpec::Wireguard { port: p, .. } = &mut s {
            *p = port;
        }
        let probe = WireguardProbe::new(&s, &target()).expect("probe");
        let server = async {
            let mut buf = [0u8; 512];
            let (n, from) = gw.recv_from(&mut buf).await.expect("recv");
            if let Some(r) = &reply {
                gw.send_to(r, from).await.expect("send");
            }
            buf[..n].to_vec()
        };
        let (res, init) = tokio::join!(probe.probe(Duration::from_millis(300)), server);
        (res, init)
    }

    /// A loopback gateway made of a boringtun responder `Tunn` that knows the probe's public key:
    /// a full handshake with no daemon and no root.
    #[tokio::test]
    async fn handshake_with_a_boringtun_responder() {
        const GW: &str = "UOzlBB0dhzTOdwW4eWZQpL7zbRk7aoxaeNmnJhJ6lVE=";
        let gw_pub = public_key_of(GW).expect("gw pub");
        let gw = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let port = gw.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let mut responder = Tunn::new(
                StaticSecret::from(parse_key(GW).expect("gw key")),
                PublicKey::from(parse_key(&public_key_of(KEY_A).expect("pub")).expect("pub")),
                None,
                None,
                7,
                None,
            );
            let (mut buf, mut out) = ([0u8; 512], [0u8; 512]);
            let (n, from) = gw.recv_from(&mut buf).await.expect("recv");
            match responder.decapsulate(Some(from.ip()), &buf[..n], &mut out) {
                TunnResult::WriteToNetwork(resp) => {
                    assert_eq!(resp.len(), 92);
                    gw.send_to(resp, from).await.expect("send");
                }
                other => panic!("responder: {other:?}"),
            }
        });
        let s = CheckSpec::Wireguard {
            port,
            public_key: gw_pub,
            private_key: Some(KEY_A.into()),
            private_key_file: None,
            timing: CheckTiming::default(),
        };
        let ok = WireguardProbe::new(&s, &target())
            .expect("probe")
            .probe(Duration::from_millis(500))
            .await
            .expect("handshake");
        assert!(
            ok.detail.starts_with("handshake response "),
            "{}",
            ok.detail
        );
        assert!(ok.latency > Duration::ZERO && ok.latency < Duration::from_millis(500));
        server.await.expect("responder");
    }

    #[tokio::test]
    async fn initiation_is_sent_and_bad_answers_are_rejected() {
        let (res, init) = against(None).await;
        assert_eq!(init.len(), 148);
        assert_eq!(&init[..4], &[1, 0, 0, 0]);
        assert_eq!(
            res.expect_err("silence").to_string(),
            "no handshake response after 300ms"
        );
        // A response-sized message whose index and MACs are wrong.
        let mut fake = vec![0u8; 92];
        fake[0] = MSG_HANDSHAKE_RESPONSE;
        let (res, _) = against(Some(fake)).await;
        let e = res.expect_err("fake").to_string();
        assert!(e.starts_with("invalid response"), "{e}");
        let (res, _) = against(Some(b"hello".to_vec())).await;
        let e = res.expect_err("garbage").to_string();
        assert!(e.starts_with("invalid response"), "{e}");
    }
}
