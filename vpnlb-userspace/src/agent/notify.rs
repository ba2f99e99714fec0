//! systemd's readiness protocol (sd_notify(3)), by hand: one datagram of `KEY=VALUE` lines to the
//! unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` in the abstract namespace). Without
//! that variable (not started by systemd, or `Type=simple`) every call is a no-op.
//!
//! The agent says `READY=1` once the maps are adopted, the program attached and every backend's
//! first checks concluded (or at the latest [`READY_AT_THE_LATEST`] after start, so a check that
//! never concludes does not make systemd kill a working agent), `RELOADING=1` / `READY=1` around a
//! SIGHUP reload, `WATCHDOG=1` every tick when the unit has `WatchdogSec=`, and `STOPPING=1` on
//! the way out; `STATUS=` carries a one-line summary for `systemctl status`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The longest the agent waits for its first checks before it says it is ready anyway.
pub const READY_AT_THE_LATEST: Duration = Duration::from_secs(60);

static READY: AtomicBool = AtomicBool::new(false);

/// Where `$NOTIFY_SOCKET` points, if anywhere.
fn target() -> Option<SocketAddr> {
    let v = std::env::var_os("NOTIFY_SOCKET")?;
    let s = v.to_str()?;
    if let Some(name) = s.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes()).ok()
    } else if s.starts_with('/') {
        SocketAddr::from_pathname(s).ok()
    } else {
        None
    }
}

/// Sends `state` (newline-separated `KEY=VALUE`); false when there is no socket or it fails.
pub fn send(state: &str) -> bool {
    let Some(to) = target() else {
        return false;
    };
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to_addr(state.as_bytes(), &to));
    if let Err(e) = &sent {
        tracing::warn!(error = %e, "sd_notify failed");
    }
    sent.is_ok()
}

/// `READY=1` with a status line, once (later calls only update the status).
pub fn ready(status: &str) {
    if READY.swap(true, Ordering::SeqCst) {
        send(&format!("STATUS={status}"));
    } else {
        send(&format!("READY=1\nSTATUS={status}"));
    }
}

/// Says ready after [`READY_AT_THE_LATEST`] if the checks have not settled by then.
pub fn ready_at_the_latest() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        tokio::time::sleep(READY_AT_THE_LATEST).await;
        if !READY.load(Ordering::SeqCst) {
            ready("running; some backends' first checks have not concluded yet");
        }
    })
}

/// Around a reload: `RELOADING=1` before, `READY=1` after.
pub fn reloading() {
    send("RELOADING=1\nSTATUS=reloading the config");
}

pub fn reloaded(status: &str) {
    send(&format!("READY=1\nSTATUS={status}"));
}

/// `WATCHDOG=1` when the unit asked for it (`$WATCHDOG_USEC`, for this process).
pub fn watchdog() {
    let ours = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    if ours && std::env::var_os("WATCHDOG_USEC").is_some() {
        send("WATCHDOG=1");
    }
}

pub fn stopping() {
    send("STOPPING=1\nSTATUS=stopping; the data plane keeps forwarding");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for everything that reads the process environment (tests run in threads).
    #[test]
    fn datagrams_reach_the_socket_and_nothing_happens_without_one() {
        // SAFETY: no other test of this crate reads or writes NOTIFY_SOCKET / WATCHDOG_*.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("WATCHDOG_PID");
        }
        assert!(!send("READY=1"), "no socket: a no-op");
        let dir = std::env::temp_dir().join(format!("vpnlb-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // SAFETY: as above.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        let mut buf = [0u8; 512];
        let mut recv = || {
            let n = rx.recv(&mut buf).expect("a datagram");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        ready("3 backends up");
        assert_eq!(recv(), "READY=1\nSTATUS=3 backends up");
        ready("2 backends up");
        assert_eq!(recv(), "STATUS=2 backends up", "READY only once");
        reloading();
        assert!(recv().starts_with("RELOADING=1\n"));
        reloaded("reloaded");
        assert_eq!(recv(), "READY=1\nSTATUS=reloaded");
        // SAFETY: as above.
        unsafe { std::env::set_var("WATCHDOG_USEC", "2000000") };
        watchdog();
        assert_eq!(recv(), "WATCHDOG=1");
        stopping();
        assert!(recv().starts_with("STOPPING=1\n"));
        // The abstract namespace (`@name`).
        let name = format!("vpnlb-notify-test-{}", std::process::id());
        let abs =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        abs.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // SAFETY: as above.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", format!("@{name}"));
            std::env::remove_var("WATCHDOG_USEC");
        }
        assert!(send("STATUS=x"));
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=x");
        // SAFETY: as above.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let _ = std::fs::remove_dir_all(&dir);
    }
}
