//! The agent's local control socket: a unix socket (mode 0600, default /run/vpnlb/control.sock)
//! speaking one JSON request and one JSON response per line. The server hands each request to the
//! agent's event loop and writes back what the loop answers; the client is what `vpnlb drain|undrain|
//! disable|enable|reload|status` use.
//!
//! Requests: `{"cmd":"drain","backend":"gw1"}` (also undrain, disable, enable), `{"cmd":"reload"}`,
//! `{"cmd":"status"}`. Responses: `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

pub const DEFAULT_SOCKET: &str = "/run/vpnlb/control.sock";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Drain {
        backend: String,
    },
    Undrain {
        backend: String,
    },
    Disable {
        backend: String,
    },
    Enable {
        backend: String,
    },
    /// Struct variants (not unit) so that unknown fields are rejected here too.
    Reload {},
    Status {},
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub result: serde_json::Value,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            error: None,
            result,
        }
    }
    pub fn err(msg: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(msg.into()),
            result: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the vpnlb agent is not running (no control socket at {path})")]
    NotRunning { path: PathBuf },
    #[error("control socket {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad answer from the agent: {reason}")]
    BadAnswer { reason: String },
}

/// A request from the socket, with the channel its answer goes back on.
pub struct Command {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Binds the socket (replacing a stale one from a dead agent, refusing to steal a live one) with
/// mode 0600, and forwards requests to `tx` until the task is dropped.
pub async fn serve(path: PathBuf, tx: mpsc::Sender<Command>) -> Result<(), ControlError> {
    let listener = bind(&path)?;
    serve_on(listener, path, tx).await
}

/// Binds the socket (replacing a stale one from a dead agent, refusing to steal a live one) with
/// mode 0600. The agent calls this before it touches any map or link, so a second agent started
/// on the same config stops here. Needs a tokio runtime.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another agent is listening",
            )));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    // Create it 0600 from the start: no window in which another user could connect.
    // SAFETY: umask only changes this process's file creation mask; restored right after bind.
    let old = unsafe { libc::umask(0o177) };
    let bound = tokio::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    tracing::info!(socket = %path.display(), "control socket listening");
    Ok(listener)
}

/// Forwards requests arriving on `listener` (bound by [`bind`] at `path`) to `tx` until the task
/// is dropped.
pub async fn serve_on(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    tx: mpsc::Sender<Command>,
) -> Result<(), ControlError> {
    let io = |source| ControlError::Io {
        path: path.clone(),
        source,
    };
    loop {
        let (stream, _) = listener.accept().await.map_err(io)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let resp = match serde_json::from_str::<Request>(&line) {
                    Err(e) => Response::err(format!("bad request: {e}")),
                    Ok(request) => {
                        let (reply, rx) = oneshot::channel();
                        if tx.send(Command { request, reply }).await.is_err() {
                            Response::err("agent is shutting down")
                        } else {
                            rx.await
                                .unwrap_or_else(|_| Response::err("agent dropped the request"))
                        }
                    }
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if w.write_all(&out).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// Sends one request and waits for the answer (blocking; for the CLI).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ControlError> {
    let io = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut s = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(io(e)),
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(|e| ControlError::BadAnswer {
        reason: e.to_string(),
    })?;
    line.push(b'\n');
    s.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).map_err(io)?;
    serde_json::from_str(&answer).map_err(|e| ControlError::BadAnswer {
        reason: format!("{e}: {answer:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let r = Request::Drain {
            backend: "gw1".into(),
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"drain","backend":"gw1"}"#
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert_eq!(
            serde_json::to_string(&Request::Reload {}).unwrap(),
            r#"{"cmd":"reload"}"#
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"drain"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"status","x":1}"#).is_err());
        assert_eq!(
            serde_json::to_string(&Response::err("no")).unwrap(),
            r#"{"ok":false,"error":"no"}"#
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trip_through_a_socket_with_mode_0600() {
        let dir = std::env::temp_dir().join(format!("vpnlb-ctl-{}", std::process::id()));
        let path = dir.join("control.sock");
        let _ = std::fs::remove_dir_all(&dir);
        let (tx, mut rx) = mpsc::channel::<Command>(4);
        let server = tokio::spawn(serve(path.clone(), tx));
        // The "agent": answers drains of gw1 only.
        tokio::spawn(async move {
            while let Some(c) = rx.recv().await {
                let resp = match c.request {
                    Request::Drain { backend } if backend == "gw1" => {
                        Response::ok(serde_json::json!({"backend": "gw1", "state": "draining"}))
                    }
                    other => Response::err(format!("unsupported {other:?}")),
                };
                let _ = c.reply.send(resp);
            }
        });
        for _ in 0..100 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let p = path.clone();
        let (a, b) = tokio::task::spawn_blocking(move || {
            (
                request(
                    &p,
                    &Request::Drain {
                        backend: "gw1".into(),
                    },
                    Duration::from_secs(2),
                )
                .unwrap(),
                request(
                    &p,
                    &Request::Enable {
                        backend: "gw9".into(),
                    },
                    Duration::from_secs(2),
                )
                .unwrap(),
            )
        })
        .await
        .unwrap();
        assert!(a.ok && a.result["state"] == "draining", "{a:?}");
        assert!(!b.ok && b.error.unwrap().contains("unsupported"));
        // A second agent must not steal the socket of a live one.
        let (tx2, _rx2) = mpsc::channel::<Command>(1);
        assert!(matches!(
            serve(path.clone(), tx2).await,
            Err(ControlError::Io { .. })
        ));
        server.abort();
        let _ = std::fs::remove_dir_all(&dir);
        // No socket: "not running", plainly.
        let e = request(&path, &Request::Status {}, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ControlError::NotRunning { .. }), "{e}");
        assert!(e.to_string().contains("not running"));
    }
}
