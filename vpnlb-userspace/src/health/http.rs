//! HTTP/1.1 and HTTPS GET probe over hyper: one connection per probe with `Connection: close`,
//! TLS by rustls (ring provider) verified against the webpki roots, a `ca_file`, or nothing
//! (`insecure`, for self-signed gateway certificates; handshake signatures are still checked).
//! Success = the status equals `expect_status` and, if set, the first 64 KiB of the body contain
//! `body_contains`. The TLS configuration is built once per check, not per probe.

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Incoming;
use hyper::header::{CONNECTION, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;

use super::probe::{ProbeOk, io_detail};
use super::spec::{CheckSpec, CheckTarget};
use super::tcp::{self, TcpError};
use super::udp::contains;

/// How much of the body is read and searched for `body_contains`.
pub const MAX_BODY: usize = 64 * 1024;

/// An HTTP probe's failure (its text is the result's detail) or a bad spec.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("not an http or https check")]
    NotHttp,
    #[error("path must start with '/': {path:?}")]
    BadPath { path: String },
    #[error("invalid tls server name {name:?}")]
    BadServerName { name: String },
    #[error("reading ca file {path}: {error}")]
    CaFile {
        path: String,
        error: rustls::pki_types::pem::Error,
    },
    #[error("no usable ca certificate in {path}")]
    NoCa { path: String },
    #[error("tls configuration: {error}")]
    TlsConfig { error: rustls::Error },
    #[error("timeout after {ms}ms")]
    Timeout { ms: u128 },
    #[error("{0}")]
    Connect(TcpError),
    #[error("tls: {detail}")]
    Tls { detail: String },
    #[error("http: {detail}")]
    Http { detail: String },
    #[error("status {status}")]
    Status { status: u16 },
    #[error("body mismatch")]
    BodyMismatch,
}

/// A prepared HTTP(S) check.
#[derive(Clone)]
pub struct HttpProbe {
    target: CheckTarget,
    port: u16,
    path: String,
    host_header: String,
    expect_status: u16,
    body_contains: Option<Vec<u8>>,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

impl std::fmt::Debug for HttpProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpProbe")
            .field("target", &self.target)
            .field("port", &self.port)
            .field("path", &self.path)
            .field("host_header", &self.host_header)
            .field("expect_status", &self.expect_status)
            .field("tls", &self.tls.as_ref().map(|(_, name)| name))
            .finish()
    }
}

impl HttpProbe {
    pub fn new(spec: &CheckSpec, target: &CheckTarget) -> Result<HttpProbe, HttpError> {
        let (port, path, expect_status, body_contains, host, tls) = match spec {
            CheckSpec::Http {
                port,
                path,
                expect_status,
                body_contains,
                host,
                ..
            } => (port, path, expect_status, body_contains, host, None),
            CheckSpec::Https {
                port,
                path,
                expect_status,
                body_contains,
                host,
                insecure,
                ca_file,
                ..
            } => (
                port,
                path,
                expect_status,
                body_contains,
                host,
                Some((*insecure, ca_file.as_deref())),
            ),
            _ => return Err(HttpError::NotHttp),
        };
        if !path.starts_with('/') {
            return Err(HttpError::BadPath { path: path.clone() });
        }
        let default_port = if tls.is_some() { 443 } else { 80 };
        let host_name = host.clone().unwrap_or_else(|| match target.addr {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        });
        let host_header = if *port == default_port {
            host_name
        } else {
            format!("{host_name}:{port}")
        };
        let tls = match tls {
            None => None,
            Some((insecure, ca_file)) => {
                let name = match host {
                    Some(h) => ServerName::try_from(h.clone())
                        .map_err(|_| HttpError::BadServerName { name: h.clone() })?,
                    None => ServerName::IpAddress(target.addr.into()),
                };
                Some((TlsConnector::from(tls_config(insecure, ca_file)?), name))
            }
        };
        Ok(HttpProbe {
            target: target.clone(),
            port: *port,
            path: path.clone(),
            host_header,
            expect_status: *expect_status,
            body_contains: body_contains.as_ref().map(|b| b.as_bytes().to_vec()),
            tls,
        })
    }

    /// One GET; the detail of a success is `status 200 1.2ms`.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, HttpError> {
        let start = Instant::now();
        let (status, body) =
            tokio::time::timeout(timeout, self.fetch())
                .await
                .map_err(|_| HttpError::Timeout {
                    ms: timeout.as_millis(),
                })??;
        let latency = start.elapsed();
        check_response(
            status,
            &body,
            self.expect_status,
            self.body_contains.as_deref(),
        )?;
        Ok(ProbeOk::new(latency, &format!("status {status}")))
    }

    /// Connects, sends the request and reads the status and the first [`MAX_BODY`] bytes (the body
    /// is only read when `body_contains` is set and the status matched).
    async fn fetch(&self) -> Result<(u16, Vec<u8>), HttpError> {
        let stream = tcp::connect(&self.target, self.port, false)
            .await
            .map_err(HttpError::Connect)?;
        match &self.tls {
            None => self.exchange(stream).await,
            Some((connector, name)) => {
                let tls =
                    connector
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| HttpError::Tls {
                            detail: tls_detail(&e),
                        })?;
                self.exchange(tls).await
            }
        }
    }

    async fn exchange<S>(&self, io: S) -> Result<(u16, Vec<u8>), HttpError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http = |e: hyper::Error| HttpError::Http {
            detail: e.to_string(),
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(io))
                .await
                .map_err(http)?;
        let req = Request::get(self.path.as_str())
            .header(HOST, self.host_header.as_str())
            .header(CONNECTION, "close")
            .header(USER_AGENT, "vpnlb-health")
            .body(Empty::new())
            .map_err(|e| HttpError::Http {
                detail: e.to_string(),
            })?;
        let want_body = self.body_contains.is_some();
        let expect_status = self.expect_status;
        let request = async move {
            let resp = sender.send_request(req).await.map_err(http)?;
            let status = resp.status().as_u16();
            let body = if want_body && status == expect_status {
                read_body(resp.into_body()).await.map_err(http)?
            } else {
                Vec::new()
            };
            Ok::<_, HttpError>((status, body))
        };
        // The connection future drives the socket; run it beside the request on this task (nothing
        // is spawned, so a timed-out probe leaves no task behind).
        let mut conn = std::pin::pin!(conn);
        let mut request = std::pin::pin!(request);
        let mut conn_done = false;
        loop {
            tokio::select! {
                r = &mut request => return r,
                c = &mut conn, if !conn_done => {
                    conn_done = true;
                    // On a clean close the request has what it needs; on an error it fails too.
                    if let Err(e) = c && !e.is_canceled() {
                        tracing::trace!(error = %e, "http probe connection");
                    }
                }
            }
        }
    }
}

/// Probes an `http`/`https` spec once with its `timeout_ms`.
pub async fn probe_once(spec: &CheckSpec, target: &CheckTarget) -> Result<ProbeOk, HttpError> {
    HttpProbe::new(spec, target)?
        .probe(Duration::from_millis(spec.timing().timeout_ms))
        .await
}

/// Judges a response: the status first, then the body.
pub fn check_response(
    status: u16,
    body: &[u8],
    expect_status: u16,
    body_contains: Option<&[u8]>,
) -> Result<(), HttpError> {
    if status != expect_status {
        return Err(HttpError::Status { status });
    }
    match body_contains {
        Some(want) if !contains(&body[..body.len().min(MAX_BODY)], want) => {
            Err(HttpError::BodyMismatch)
        }
        _ => Ok(()),
    }
}

async fn read_body(mut body: Incoming) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while out.len() < MAX_BODY {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame?.into_data() {
            let room = MAX_BODY - out.len();
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(out)
}

fn tls_detail(e: &io::Error) -> String {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(tls) => tls.to_string(),
        None => io_detail(e),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration of an HTTPS check: no verification (`insecure`), the CAs of
/// `ca_file`, or the webpki roots.
pub fn tls_config(insecure: bool, ca_file: Option<&str>) -> Result<Arc<ClientConfig>, HttpError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|error| HttpError::TlsConfig { error })?;
    let mut config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify {
                algs: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth()
    } else {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                let certs =
                    CertificateDer::pem_file_iter(path).map_err(|error| HttpError::CaFile {
                        path: path.to_string(),
                        error,
                    })?;
                for cert in certs {
                    let cert = cert.map_err(|error| HttpError::CaFile {
                        path: path.to_string(),
                        error,
                    })?;
                    // A certificate webpki cannot use as an anchor is skipped, not fatal.
                    let _ = roots.add(cert);
                }
                if roots.is_empty() {
                    return Err(HttpError::NoCa {
                        path: path.to_string(),
                    });
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts any server certificate (`insecure = true`) but still checks that the server holds the
/// certificate's key, so the handshake itself is sound.
#[derive(Debug)]
struct NoVerify {
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::spec::CheckTiming;
    use std::io::{Read, Write};

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

    fn http(port: u16, body_contains: Option<&str>, host: Option<&str>) -> CheckSpec {
        CheckSpec::Http {
            port,
            path: "/health".into(),
            expect_status: 200,
            body_contains: body_contains.map(Into::into),
            host: host.map(Into::into),
            timing: CheckTiming {
                interval_ms: 1000,
                timeout_ms: 300,
                ..CheckTiming::default()
            },
        }
    }

    #[test]
    fn response_checks() {
        assert!(check_response(200, b"", 200, None).is_ok());
        assert_eq!(
            check_response(503, b"ok", 200, Some(b"ok"))
                .expect_err("status")
                .to_string(),
            "status 503"
        );
        assert_eq!(
            check_response(200, b"degraded", 200, Some(b"ok"))
                .expect_err("body")
                .to_string(),
            "body mismatch"
        );
        assert!(check_response(204, b"", 204, None).is_ok());
        // Only the first 64 KiB count.
        let mut big = vec![b'x'; MAX_BODY];
        big.extend_from_slice(b"ok");
        assert!(check_response(200, &big, 200, Some(b"ok")).is_err());
    }

    #[test]
    fn host_header_and_server_name() {
        let t = target();
        let p = HttpProbe::new(&http(8080, None, None), &t).expect("probe");
        assert_eq!(p.host_header, "127.0.0.1:8080");
        let p = HttpProbe::new(&http(80, None, Some("gw.example")), &t).expect("probe");
        assert_eq!(p.host_header, "gw.example");
        let v6 = CheckTarget {
            addr: "fd00::1".parse().expect("addr"),
            ..t.clone()
        };
        let p = HttpProbe::new(&http(80, None, None), &v6).expect("probe");
        assert_eq!(p.host_header, "[fd00::1]");
        let mut bad = http(80, None, None);
        if let CheckSpec::Http { path, .. } = &mut bad {
            *path = "health".into();
        }
        assert!(matches!(
            HttpProbe::new(&bad, &t),
            Err(HttpError::BadPath { .. })
        ));
        let https = CheckSpec::Https {
            port: 443,
            path: "/".into(),
            expect_status: 200,
            body_contains: None,
            host: None,
            insecure: false,
            ca_file: Some("/nonexistent/ca.pem".into()),
            timing: CheckTiming::default(),
        };
        assert!(matches!(
            HttpProbe::new(&https, &t),
            Err(HttpError::CaFile { .. })
        ));
    }

    /// A loopback server answering each connection with `response` once; returns what it read.
    fn serve(response: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().expect("accept");
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(response).expect("write");
            String::from_utf8_lossy(&req).into_owned()
        });
        (port, h)
    }

    #[tokio::test]
    async fn get_over_loopback() {
        let (port, h) = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nstatus ok");
        let ok = probe_once(&http(port, Some("ok"), Some("gw.test")), &target())
            .await
            .expect("ok");
        assert!(ok.detail.starts_with("status 200 "), "{}", ok.detail);
        let req = h.join().expect("server");
        assert!(req.starts_with("GET /health HTTP/1.1\r\n"), "{req}");
        let lower = req.to_ascii_lowercase();
        assert!(
            lower.contains(&format!("host: gw.test:{port}\r\n")),
            "{req}"
        );
        assert!(lower.contains("connection: close\r\n"), "{req}");

        let (port, h) = serve(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n");
        let err = probe_once(&http(port, None, None), &target())
            .await
            .expect_err("503");
        assert_eq!(err.to_string(), "status 503");
        h.join().expect("server");

        let (port, h) = serve(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\ndegraded");
        let err = probe_once(&http(port, Some("ok"), None), &target())
            .await
            .expect_err("body");
        assert_eq!(err.to_string(), "body mismatch");
        h.join().expect("server");

        let (port, h) = serve(b"garbage\r\n\r\n");
        let err = probe_once(&http(port, None, None), &target())
            .await
            .expect_err("garbage");
        assert!(err.to_string().starts_with("http: "), "{err}");
        h.join().expect("server");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        let err = probe_once(&http(port, None, None), &target())
            .await
            .expect_err("timeout");
        assert_eq!(err.to_string(), "timeout after 300ms");
        drop(l);
        let err = probe_once(&http(port, None, None), &target())
            .await
            .expect_err("refused");
        assert_eq!(err.to_string(), "connection refused");
    }
}
