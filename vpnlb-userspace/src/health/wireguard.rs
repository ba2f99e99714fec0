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
//!
//! With `inside`, the probe then does what a user does: it sends an ICMP echo from its tunnel
//! address to a host behind the gateway, encrypted in the new session, and requires the decrypted
//! echo reply ([`super::tunnel_ping`]). That fails when the gateway's forwarding, NAT or route to
//! the inside network is broken, which every other check misses. The echo is resent (new
//! sequence number) a few times within `inside_timeout_ms`, since UDP may lose one; an ICMP error
//! from the gateway or a router behind it fails the probe at once with its reason.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::probe::{ProbeOk, fmt_ms, io_detail, sock_addr, udp_socket};
use super::spec::{CheckSpec, CheckTarget, InsideProbe};
use super::tunnel_ping::{Echo, NotOurs};

/// WireGuard message types (first byte, little-endian u32).
const MSG_HANDSHAKE_RESPONSE: u8 = 2;
const MSG_COOKIE_REPLY: u8 = 3;
/// Largest datagram read (a handshake response is 92 bytes).
const MAX_DATAGRAM: usize = 2048;
/// The inside echo is sent this many times within `inside_timeout_ms` (evenly spaced) until one
/// is answered.
const INSIDE_SENDS: u32 = 4;

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
    #[error(
        "handshake ok ({}), no echo reply from {addr} through the tunnel after {ms}ms",
        fmt_ms(*handshake)
    )]
    NoInsideReply {
        handshake: Duration,
        addr: IpAddr,
        ms: u128,
    },
    #[error(
        "handshake ok ({}), {addr} through the tunnel: {detail} (from {from})",
        fmt_ms(*handshake)
    )]
    InsideUnreachable {
        handshake: Duration,
        addr: IpAddr,
        from: IpAddr,
        detail: String,
    },
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
    inside: Option<InsideProbe>,
}

impl fmt::Debug for WireguardProbe {
    // Never prints the private key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WireguardProbe")
            .field("target", &self.target)
            .field("port", &self.port)
            .field("inside", &self.inside)
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
            inside,
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
            inside: inside.clone(),
        })
    }

    /// One handshake bounded by `timeout`; the detail of a success is `handshake response 0.4ms`.
    /// With `inside`, then the echo through the tunnel, bounded by `inside_timeout_ms`: the
    /// detail is `handshake 0.4ms, inside 10.96.0.1 echo reply 1.1ms`, the latency the sum of both
    /// round trips, and each is reported as a phase (`handshake`, `inside`).
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, WireguardError> {
        let (hs, what, sock, mut tunn) = tokio::time::timeout(timeout, self.handshake())
            .await
            .map_err(|_| WireguardError::NoResponse {
            ms: timeout.as_millis(),
        })??;
        let Some(inside) = &self.inside else {
            return Ok(ProbeOk::new(hs, what));
        };
        let limit = Duration::from_millis(inside.timeout_ms);
        let rtt = tokio::time::timeout(limit, echo_inside(&sock, &mut tunn, inside, hs))
            .await
            .map_err(|_| WireguardError::NoInsideReply {
                handshake: hs,
                addr: inside.addr,
                ms: limit.as_millis(),
            })??;
        Ok(ProbeOk {
            latency: hs + rtt,
            detail: format!(
                "handshake {}, inside {} echo reply {}",
                fmt_ms(hs),
                inside.addr,
                fmt_ms(rtt)
            ),
            phases: vec![("handshake", hs), ("inside", rtt)],
        })
    }

    /// The handshake: its round trip and detail, and the socket and session for what follows.
    async fn handshake(
        &self,
    ) -> Result<(Duration, &'static str, tokio::net::UdpSocket, Tunn), WireguardError> {
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
                    return Ok((latency, what, sock, tunn));
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

/// Pings `inside.addr` from `inside.tunnel_address` through the established session `tunn` until
/// a decrypted echo reply comes back (the caller bounds the time); the echo is resent with the
/// next sequence number every `inside_timeout_ms / INSIDE_SENDS`. Returns the round trip of the
/// echo that was answered.
async fn echo_inside(
    sock: &tokio::net::UdpSocket,
    tunn: &mut Tunn,
    inside: &InsideProbe,
    handshake: Duration,
) -> Result<Duration, WireguardError> {
    let io = |error| WireguardError::Io { error };
    let base = Echo {
        src: inside.tunnel_address,
        dst: inside.addr,
        ident: rand::random(),
        seq: rand::random::<u16>() >> 1,
        token: rand::random(),
    };
    let every =
        (Duration::from_millis(inside.timeout_ms) / INSIDE_SENDS).max(Duration::from_millis(5));
    let mut out = vec![0u8; MAX_DATAGRAM];
    let mut buf = vec![0u8; MAX_DATAGRAM];
    // (echo, when it was sent), oldest first.
    let mut sent: Vec<(Echo, Instant)> = Vec::new();
    let mut next_send = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_send) => {
                let echo = Echo { seq: base.seq.wrapping_add(sent.len() as u16), ..base };
                match tunn.encapsulate(&echo.request(), &mut out) {
                    TunnResult::WriteToNetwork(p) => {
                        sock.send(p).await.map_err(io)?;
                    }
                    TunnResult::Err(e) => {
                        return Err(WireguardError::Invalid(format!("encapsulating the echo: {e:?}")));
                    }
                    _ => {}
                }
                sent.push((echo, Instant::now()));
                next_send += every;
            }
            r = sock.recv(&mut buf) => {
                let n = r.map_err(io)?;
                let at = Instant::now();
                let mut res = tunn.decapsulate(None, &buf[..n], &mut out);
                loop {
                    match res {
                        TunnResult::WriteToTunnelV4(packet, _) | TunnResult::WriteToTunnelV6(packet, _) => {
                            for (echo, t) in &sent {
                                match echo.check_reply(packet) {
                                    Ok(()) => return Ok(at - *t),
                                    Err(NotOurs::Error { from, detail }) => {
                                        return Err(WireguardError::InsideUnreachable {
                                            handshake,
                                            addr: inside.addr,
                                            from,
                                            detail,
                                        });
                                    }
                                    Err(_) => {}
                                }
                            }
                            break;
                        }
                        // Something boringtun wants sent (a queued packet, a handshake answer):
                        // send it and drain its queue.
                        TunnResult::WriteToNetwork(p) => {
                            sock.send(p).await.map_err(io)?;
                            res = tunn.decapsulate(None, &[], &mut out);
                        }
                        // Keepalives, cookies, and packets of a stale session are not errors here.
                        TunnResult::Done | TunnResult::Err(_) => break,
                    }
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
            inside: None,
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
            inside: None,
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

    /// What the loopback gateway's "inside network" does with the probe's echoes.
    #[derive(Clone, Copy, PartialEq)]
    enum Inside {
        Answer,
        /// Drops the first echo (UDP lost it), answers the next.
        AnswerSecond,
        Drop,
        Unreachable,
    }

    /// A loopback gateway made of a boringtun responder that completes the handshake and then
    /// plays the network behind it for the probe's decrypted echoes; no daemon, no root.
    async fn inside_against(inside: Inside) -> Result<ProbeOk, WireguardError> {
        use crate::health::tunnel_ping::answer;
        const GW: &str = "UOzlBB0dhzTOdwW4eWZQpL7zbRk7aoxaeNmnJhJ6lVE=";
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
            let (mut buf, mut out) = ([0u8; 2048], [0u8; 2048]);
            let mut echoes = 0;
            loop {
                let (n, from) = gw.recv_from(&mut buf).await.expect("recv");
                let reply = match responder.decapsulate(Some(from.ip()), &buf[..n], &mut out) {
                    TunnResult::WriteToNetwork(p) => {
                        gw.send_to(p, from).await.expect("send");
                        continue;
                    }
                    TunnResult::WriteToTunnelV4(packet, _) => {
                        echoes += 1;
                        match inside {
                            Inside::Answer => answer::echo_reply(packet),
                            Inside::AnswerSecond if echoes >= 2 => answer::echo_reply(packet),
                            Inside::Unreachable => {
                                answer::unreachable("10.96.1.1".parse().unwrap(), packet)
                            }
                            Inside::AnswerSecond | Inside::Drop => continue,
                        }
                    }
                    _ => continue,
                };
                if let TunnResult::WriteToNetwork(p) = responder.encapsulate(&reply, &mut out) {
                    gw.send_to(p, from).await.expect("send");
                }
            }
        });
        let s = CheckSpec::Wireguard {
            port,
            public_key: public_key_of(GW).expect("gw pub"),
            private_key: Some(KEY_A.into()),
            private_key_file: None,
            inside: Some(InsideProbe {
                addr: "10.96.0.1".parse().unwrap(),
                tunnel_address: "192.0.2.77".parse().unwrap(),
                timeout_ms: 400,
            }),
            timing: CheckTiming::default(),
        };
        let res = WireguardProbe::new(&s, &target())
            .expect("probe")
            .probe(Duration::from_millis(500))
            .await;
        server.abort();
        res
    }

    #[tokio::test]
    async fn inside_echo_through_the_tunnel() {
        let ok = inside_against(Inside::Answer).await.expect("inside");
        assert!(
            ok.detail.starts_with("handshake ")
                && ok.detail.contains(", inside 10.96.0.1 echo reply "),
            "{}",
            ok.detail
        );
        let names: Vec<&str> = ok.phases.iter().map(|p| p.0).collect();
        assert_eq!(names, ["handshake", "inside"]);
        assert_eq!(ok.latency, ok.phases[0].1 + ok.phases[1].1);
        // A lost echo is sent again within inside_timeout_ms.
        let ok = inside_against(Inside::AnswerSecond).await.expect("resent");
        assert!(ok.detail.contains("echo reply"), "{}", ok.detail);
        // The handshake works, nothing comes back from inside: a failure that says so.
        let e = inside_against(Inside::Drop).await.expect_err("no reply");
        let e = e.to_string();
        assert!(
            e.starts_with("handshake ok (")
                && e.ends_with("), no echo reply from 10.96.0.1 through the tunnel after 400ms"),
            "{e}"
        );
        let e = inside_against(Inside::Unreachable)
            .await
            .expect_err("unreachable");
        assert!(
            e.to_string()
                .ends_with("10.96.0.1 through the tunnel: host unreachable (from 10.96.1.1)"),
            "{e}"
        );
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
