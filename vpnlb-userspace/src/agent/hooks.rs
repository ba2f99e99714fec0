//! Hooks on backend state changes and pool failovers: run a command with the event JSON on its
//! stdin and/or POST the JSON to a URL (the failover report to the operations team, or a DNS/GSLB
//! update). Events go through a bounded queue to a dispatcher task; each hook runs in its own task
//! under a timeout and a concurrency limit, so a slow or failing hook never blocks the agent. Queue
//! overflow is dropped and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};

use crate::agent::reconcile::PoolChoice;
use crate::agent::state::Transition;

/// Hook settings (from the `[hooks]` table).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HookConfig {
    /// argv of a command to run per event, the event JSON on stdin. Empty = none.
    pub exec: Vec<String>,
    /// `http://host:port/path` to POST the event JSON to.
    pub webhook: Option<String>,
    pub timeout: Duration,
}

/// What a hook receives.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum HookEvent {
    /// A backend changed state.
    BackendState {
        host: String,
        summary: String,
        #[serde(flatten)]
        transition: Transition,
    },
    /// This member refused a service revision of its cluster (it keeps running the previous one).
    ServiceRefused {
        host: String,
        summary: String,
        revision: i64,
        error: String,
        at: f64,
    },
    /// Rings of this member differ from those of peers that should have the same ("ring@peer").
    RingMismatch {
        host: String,
        summary: String,
        rings: Vec<String>,
        at: f64,
    },
    /// The pool serving a VIP (or one of its classes) changed.
    Failover {
        host: String,
        summary: String,
        vip: String,
        class: Option<String>,
        from_pool: Option<String>,
        to_pool: Option<String>,
        at: f64,
    },
}

/// This host's name, as hooks report it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl HookEvent {
    /// A backend's state change, reported by `host`.
    pub fn backend_state(t: &Transition, host: &str) -> Self {
        let host = host.to_string();
        HookEvent::BackendState {
            summary: format!(
                "vpnlb@{host}: backend {} {} -> {} ({})",
                t.backend, t.from, t.to, t.reason
            ),
            host,
            transition: t.clone(),
        }
    }

    pub fn service_refused(host: &str, revision: i64, error: &str, at: SystemTime) -> Self {
        HookEvent::ServiceRefused {
            summary: format!("vpnlb@{host}: refused service revision {revision}: {error}"),
            host: host.to_string(),
            revision,
            error: error.to_string(),
            at: unix(at),
        }
    }

    pub fn ring_mismatch(host: &str, rings: &[String], at: SystemTime) -> Self {
        HookEvent::RingMismatch {
            summary: format!(
                "vpnlb@{host}: rings differ from peers that should have the same: {}",
                rings.join(", ")
            ),
            host: host.to_string(),
            rings: rings.to_vec(),
            at: unix(at),
        }
    }

    /// The pool serving a VIP changed from `from` to `to` at `at`, seen by `host`.
    pub fn failover(from: &PoolChoice, to: &PoolChoice, host: &str, at: SystemTime) -> Self {
        let host = host.to_string();
        let class = to
            .class
            .as_ref()
            .map(|c| format!(" class {c}"))
            .unwrap_or_default();
        let name = |p: &Option<String>| p.clone().unwrap_or_else(|| "(none healthy)".into());
        HookEvent::Failover {
            summary: format!(
                "vpnlb@{host}: vip {}{class} now served by pool {} (was {})",
                to.vip,
                name(&to.pool),
                name(&from.pool)
            ),
            host,
            vip: to.vip.clone(),
            class: to.class.clone(),
            from_pool: from.pool.clone(),
            to_pool: to.pool.clone(),
            at: unix(at),
        }
    }
}

/// Outcome counters, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct HookStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    pub timed_out: AtomicU64,
    pub dropped: AtomicU64,
}

/// Handle to the dispatcher. Cheap to clone.
#[derive(Clone)]
pub struct Hooks {
    tx: Option<mpsc::Sender<HookEvent>>,
    pub stats: Arc<HookStats>,
}

const QUEUE: usize = 1024;
const IN_FLIGHT: usize = 16;

impl Hooks {
    /// Starts the dispatcher (needs a tokio runtime). With no hook configured, events are ignored.
    pub fn start(cfg: HookConfig) -> Hooks {
        let stats = Arc::new(HookStats::default());
        if cfg.exec.is_empty() && cfg.webhook.is_none() {
            return Hooks { tx: None, stats };
        }
        let (tx, mut rx) = mpsc::channel::<HookEvent>(QUEUE);
        let st = stats.clone();
        tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(IN_FLIGHT));
            while let Some(ev) = rx.recv().await {
                let body = match serde_json::to_vec(&ev) {
                    Ok(b) => Arc::new(b),
                    Err(e) => {
                        tracing::warn!(error = %e, "hook event not serialisable");
                        continue;
                    }
                };
                if !cfg.exec.is_empty() {
                    spawn_one(
                        limit.clone(),
                        st.clone(),
                        cfg.timeout,
                        "exec",
                        run_exec(cfg.exec.clone(), body.clone()),
                    );
                }
                if let Some(url) = &cfg.webhook {
                    spawn_one(
                        limit.clone(),
                        st.clone(),
                        cfg.timeout,
                        "webhook",
                        post(url.clone(), body.clone()),
                    );
                }
            }
        });
        Hooks {
            tx: Some(tx),
            stats,
        }
    }

    /// Queues an event; never waits. A full queue drops the event (counted, logged).
    pub fn emit(&self, ev: HookEvent) {
        if let Some(tx) = &self.tx
            && tx.try_send(ev).is_err()
        {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("hook queue full: event dropped");
        }
    }
}

fn spawn_one<F>(
    limit: Arc<Semaphore>,
    st: Arc<HookStats>,
    timeout: Duration,
    kind: &'static str,
    fut: F,
) where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    tokio::spawn(async move {
        let Ok(_permit) = limit.acquire_owned().await else {
            return;
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(())) => {
                st.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                st.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(hook = kind, error = %e, "hook failed");
            }
            Err(_) => {
                st.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    hook = kind,
                    timeout_ms = timeout.as_millis() as u64,
                    "hook timed out"
                );
            }
        }
    });
}

async fn run_exec(argv: Vec<String>, body: Arc<Vec<u8>>) -> Result<(), String> {
    let mut child = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{}: {e}", argv[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: ignore EPIPE.
        let _ = stdin.write_all(&body).await;
    }
    let status = child.wait().await.map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{} exited with {status}", argv[0]))
    }
}

/// POSTs `body` to an `http://` URL with HTTP/1.1.
async fn post(url: String, body: Arc<Vec<u8>>) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("bad webhook url {url}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("webhook {url}: only http:// is supported"));
    }
    let host = uri.host().ok_or("webhook url has no host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| format!("connect {host}:{port}: {e}"))?;
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    let req = hyper::Request::post(path)
        .header("host", format!("{host}:{port}"))
        .header("content-type", "application/json")
        .header("user-agent", concat!("vpnlb/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(Bytes::from(body.as_ref().clone())))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("webhook answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::state::BackendState;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    fn transition() -> Transition {
        Transition {
            backend: "gw2".into(),
            backend_id: 2,
            from: BackendState::Up,
            to: BackendState::Down,
            reason: "check bfd down: control detection time expired".into(),
            at_wall: SystemTime::now(),
            at: Instant::now(),
            checks: vec![],
        }
    }

    #[tokio::test]
    async fn exec_gets_the_event_json_and_webhook_gets_a_post() {
        let dir = std::env::temp_dir().join(format!("vpnlb-hook-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("event.json");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 65536];
            let mut got = Vec::new();
            // Read until the JSON body is complete.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                got.extend_from_slice(&buf[..n]);
                if n == 0 || got.ends_with(b"}") {
                    break;
                }
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            String::from_utf8(got).unwrap()
        });
        let hooks = Hooks::start(HookConfig {
            exec: vec!["sh".into(), "-c".into(), format!("cat > {}", out.display())],
            webhook: Some(format!("http://{addr}/vpnlb/events")),
            timeout: Duration::from_secs(5),
        });
        hooks.emit(HookEvent::backend_state(&transition(), "lb1"));
        let req = tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert!(req.starts_with("POST /vpnlb/events HTTP/1.1"), "{req}");
        assert!(req.contains("\"event\":\"backend_state\""), "{req}");
        assert!(req.contains("\"to\":\"down\""), "{req}");
        // Waits for the outcome, however slow the machine; a hook that never succeeds fails the
        // assertion below after 30 s.
        for _ in 0..1500 {
            if hooks.stats.ok.load(Ordering::Relaxed) == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            hooks.stats.ok.load(Ordering::Relaxed),
            2,
            "both hooks succeeded"
        );
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(v["backend"], "gw2");
        assert_eq!(v["from"], "up");
        assert!(
            v["summary"]
                .as_str()
                .unwrap()
                .contains("backend gw2 up -> down")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// On tokio's paused clock: the hooks' 200 ms timeout elapses in virtual time while the real
    /// `sleep 10` processes hang, so the outcome does not depend on how busy the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_hanging_hook_times_out() {
        let hooks = Hooks::start(HookConfig {
            exec: vec!["sleep".into(), "10".into()],
            webhook: None,
            timeout: Duration::from_millis(200),
        });
        for _ in 0..5 {
            hooks.emit(HookEvent::backend_state(&transition(), "lb1"));
        }
        for _ in 0..100 {
            if hooks.stats.timed_out.load(Ordering::Relaxed) == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(hooks.stats.timed_out.load(Ordering::Relaxed), 5);
        assert_eq!(hooks.stats.ok.load(Ordering::Relaxed), 0);
    }

    /// `emit` never waits: with the dispatcher's queue full (its task cannot run on this
    /// single-threaded runtime until the test yields), further events are dropped and counted.
    #[tokio::test]
    async fn emit_drops_and_counts_when_the_queue_is_full() {
        let hooks = Hooks::start(HookConfig {
            exec: vec!["true".into()],
            webhook: None,
            timeout: Duration::from_secs(5),
        });
        for _ in 0..QUEUE + 7 {
            hooks.emit(HookEvent::backend_state(&transition(), "lb1"));
        }
        assert_eq!(hooks.stats.dropped.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn failover_summary_names_the_pools() {
        let from = PoolChoice {
            vip: "ovpn".into(),
            class: None,
            pool: Some("primary".into()),
            standby: false,
        };
        let to = PoolChoice {
            vip: "ovpn".into(),
            class: None,
            pool: Some("standby".into()),
            standby: true,
        };
        let HookEvent::Failover { summary, .. } =
            HookEvent::failover(&from, &to, "lb1", SystemTime::UNIX_EPOCH)
        else {
            panic!()
        };
        assert!(
            summary.ends_with("vip ovpn now served by pool standby (was primary)"),
            "{summary}"
        );
    }
}
