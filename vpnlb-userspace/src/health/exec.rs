//! The `exec` check (keepalived's MISC_CHECK): runs an operator's program with a time limit; its
//! exit status is the result (0 = up), the first line of its stdout the detail (stderr's when
//! stdout is empty and it failed). What it checks is up to the program: typically it brings up a
//! real tunnel to the gateway (a strongSwan or OpenVPN client) and pings a host behind it
//! (docs/config.md, docs/examples/probes/).
//!
//! The program gets no stdin and no shell; its environment is the agent's plus `VPNLB_BACKEND`,
//! `VPNLB_BACKEND_ADDRESS`, `VPNLB_VIP`, `VPNLB_VIP_NAME`, `VPNLB_VIP_PORT`, `VPNLB_VIP_PROTOCOL`,
//! `VPNLB_VIPS` (set by the agent when it starts the check) and `VPNLB_TIMEOUT_MS`. It runs in a
//! process group of its own. When its time is up the group gets SIGTERM (so a script can tear down
//! its tunnel), and SIGKILL [`TERM_GRACE`] later; whatever it left running when it exits goes the
//! same way, so nothing it started (a VPN daemon in the background) outlives the probe.

use std::io;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::probe::{ProbeOk, io_detail};
use super::spec::{CheckSpec, CheckTarget};

/// How much of each output stream is kept (the rest is read and dropped, so a chatty program never
/// blocks on a full pipe).
const KEEP_OUTPUT: usize = 4096;
/// Longest detail taken from the program's output.
const MAX_DETAIL: usize = 200;
/// Between SIGTERM and SIGKILL of the program's process group.
pub const TERM_GRACE: Duration = Duration::from_millis(500);
/// How long the output readers get after the program's group is killed (its pipes are closed by
/// then; this only bounds a reader that is still being scheduled).
const DRAIN: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("not an exec check")]
    NotExec,
    #[error("command: needs at least the program to run")]
    EmptyCommand,
    #[error("cannot run {program}: {}", io_detail(.error))]
    Spawn { program: String, error: io::Error },
    #[error("waiting for {program}: {}", io_detail(.error))]
    Wait { program: String, error: io::Error },
    /// The program's verdict: a non-zero exit or a signal, with what it said.
    #[error("{0}")]
    Failed(String),
    #[error("no result after {ms}ms (killed){}", tail(.said))]
    Timeout { ms: u128, said: String },
}

fn tail(said: &str) -> String {
    if said.is_empty() {
        String::new()
    } else {
        format!(": {said}")
    }
}

/// A prepared exec check.
#[derive(Clone, Debug)]
pub struct ExecProbe {
    command: Vec<String>,
    env: Vec<(String, String)>,
    target: CheckTarget,
}

impl ExecProbe {
    pub fn new(spec: &CheckSpec, target: &CheckTarget) -> Result<ExecProbe, ExecError> {
        let CheckSpec::Exec { command, env, .. } = spec else {
            return Err(ExecError::NotExec);
        };
        if command.first().is_none_or(|p| p.is_empty()) {
            return Err(ExecError::EmptyCommand);
        }
        Ok(ExecProbe {
            command: command.clone(),
            env: env.clone(),
            target: target.clone(),
        })
    }

    /// Runs the program once, killed after `timeout`.
    pub async fn probe(&self, timeout: Duration) -> Result<ProbeOk, ExecError> {
        let program = &self.command[0];
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(&self.command[1..])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("VPNLB_BACKEND_ADDRESS", self.target.addr.to_string())
            .env("VPNLB_TIMEOUT_MS", timeout.as_millis().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let start = Instant::now();
        let mut child = cmd.spawn().map_err(|error| ExecError::Spawn {
            program: program.clone(),
            error,
        })?;
        let group = child.id();
        let out = tokio::spawn(read_kept(child.stdout.take()));
        let err = tokio::spawn(read_kept(child.stderr.take()));
        let waited = tokio::time::timeout(timeout, child.wait()).await;
        let took = start.elapsed();
        // What the program left running in its group (or all of it, when its time is up) gets
        // SIGTERM, then SIGKILL after TERM_GRACE. The group's id stays taken while any member
        // lives, so this never signals another group.
        if group_alive(group) {
            signal_group(group, libc::SIGTERM);
            let end = tokio::time::Instant::now() + TERM_GRACE;
            while group_alive(group) && tokio::time::Instant::now() < end {
                // The group leader is our child: reap it once it exits, or it stays a member.
                let _ = child.try_wait();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            signal_group(group, libc::SIGKILL);
        }
        let status = match waited {
            Ok(Ok(st)) => st,
            Ok(Err(error)) => {
                return Err(ExecError::Wait {
                    program: program.clone(),
                    error,
                });
            }
            Err(_) => {
                let _ = child.wait().await;
                let said = first_line(&collect(out).await);
                return Err(ExecError::Timeout {
                    ms: timeout.as_millis(),
                    said,
                });
            }
        };
        let stdout = first_line(&collect(out).await);
        let stderr = first_line(&collect(err).await);
        if status.success() {
            let what = if stdout.is_empty() {
                "exit 0".to_string()
            } else {
                stdout
            };
            return Ok(ProbeOk::new(took, &what));
        }
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "failed".to_string(),
        };
        let said = if stdout.is_empty() { stderr } else { stdout };
        Err(ExecError::Failed(format!("{how}{}", tail(&said))))
    }
}

/// Sends `sig` to the process group `group` (the child's pid: it leads its own group).
fn signal_group(group: Option<u32>, sig: libc::c_int) {
    if let Some(pgid) = group {
        // SAFETY: kill(2) with a negative pid signals the process group we created for the
        // child (process_group(0) made it its own leader); no memory is involved.
        unsafe { libc::kill(-(pgid as i32), sig) };
    }
}

/// Whether any process of the group is still there (zombies included until reaped).
fn group_alive(group: Option<u32>) -> bool {
    // SAFETY: signal 0 only checks that the group exists and may be signalled.
    group.is_some_and(|pgid| unsafe { libc::kill(-(pgid as i32), 0) } == 0)
}

/// Reads a stream to its end, keeping the first [`KEEP_OUTPUT`] bytes.
async fn read_kept<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) -> Vec<u8> {
    let Some(mut r) = r else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = KEEP_OUTPUT.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    kept
}

/// What a reader kept, or nothing if it is not done within [`DRAIN`].
async fn collect(h: tokio::task::JoinHandle<Vec<u8>>) -> Vec<u8> {
    match tokio::time::timeout(DRAIN, h).await {
        Ok(Ok(v)) => v,
        _ => Vec::new(),
    }
}

/// The first non-empty line, trimmed and cut to [`MAX_DETAIL`] characters.
fn first_line(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    line.chars().take(MAX_DETAIL).collect()
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
            addr: "192.0.2.1".parse().expect("addr"),
            source: None,
            interface: None,
        }
    }

    fn sh(script: &str) -> ExecProbe {
        let spec = CheckSpec::Exec {
            command: vec!["/bin/sh".into(), "-c".into(), script.into()],
            env: vec![("VPNLB_BACKEND".into(), "gw1".into())],
            timing: CheckTiming::default(),
        };
        ExecProbe::new(&spec, &target()).expect("probe")
    }

    #[tokio::test]
    async fn exit_status_is_the_result_and_stdout_the_detail() {
        let ok = sh("echo \"tunnel up, $VPNLB_BACKEND at $VPNLB_BACKEND_ADDRESS ($VPNLB_TIMEOUT_MS ms)\"; echo more")
            .probe(Duration::from_secs(5))
            .await
            .expect("success");
        assert!(
            ok.detail
                .starts_with("tunnel up, gw1 at 192.0.2.1 (5000 ms) "),
            "{}",
            ok.detail
        );
        let ok = sh("true").probe(Duration::from_secs(5)).await.expect("ok");
        assert!(ok.detail.starts_with("exit 0 "), "{}", ok.detail);
        let e = sh("echo; echo '  no reply from 10.96.0.1  '; exit 3")
            .probe(Duration::from_secs(5))
            .await
            .expect_err("exit 3");
        assert_eq!(e.to_string(), "exit 3: no reply from 10.96.0.1");
        let e = sh("echo 'ipsec: auth failed' >&2; exit 1")
            .probe(Duration::from_secs(5))
            .await
            .expect_err("stderr");
        assert_eq!(e.to_string(), "exit 1: ipsec: auth failed");
        let e = sh("kill -TERM $$")
            .probe(Duration::from_secs(5))
            .await
            .expect_err("signal");
        assert_eq!(e.to_string(), "killed by signal 15");
    }

    #[tokio::test]
    async fn a_program_over_its_time_is_killed_with_what_it_started() {
        let dir = std::env::temp_dir().join(format!("vpnlb-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let pidfile = dir.join("bg.pid");
        // A background "daemon" and a foreground that never finishes.
        let script = format!(
            "sleep 300 & echo $! > {}; echo starting; sleep 300",
            pidfile.display()
        );
        let t0 = Instant::now();
        let e = sh(&script)
            .probe(Duration::from_millis(300))
            .await
            .expect_err("timeout");
        assert_eq!(e.to_string(), "no result after 300ms (killed): starting");
        assert!(t0.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid file")
            .trim()
            .parse()
            .expect("pid");
        // The background sleep was in the group: it dies (SIGKILL is delivered asynchronously:
        // wait for it, bounded). A zombie awaiting its reaper counts as dead.
        let alive = || {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            state
                .split(") ")
                .nth(1)
                .is_some_and(|s| !s.starts_with('Z') && !s.starts_with('X'))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!alive(), "background process {pid} survived");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_program_over_its_time_gets_sigterm_first_to_clean_up() {
        let dir = std::env::temp_dir().join(format!("vpnlb-exec-term-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let mark = dir.join("cleaned");
        let script = format!(
            "trap 'echo cleaned > {}; exit 3' TERM; echo working; while :; do sleep 0.05; done",
            mark.display()
        );
        let e = sh(&script)
            .probe(Duration::from_millis(200))
            .await
            .expect_err("timeout");
        assert_eq!(e.to_string(), "no result after 200ms (killed): working");
        assert_eq!(
            std::fs::read_to_string(&mark)
                .expect("the TERM trap ran")
                .trim(),
            "cleaned"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_missing_program_is_a_failure_with_its_reason() {
        let spec = CheckSpec::Exec {
            command: vec!["/nonexistent/vpnlb-probe".into()],
            env: Vec::new(),
            timing: CheckTiming::default(),
        };
        let e = ExecProbe::new(&spec, &target())
            .expect("probe")
            .probe(Duration::from_secs(1))
            .await
            .expect_err("missing");
        assert_eq!(
            e.to_string(),
            "cannot run /nonexistent/vpnlb-probe: no such file or directory"
        );
        let empty = CheckSpec::Exec {
            command: vec![],
            env: Vec::new(),
            timing: CheckTiming::default(),
        };
        assert!(matches!(
            ExecProbe::new(&empty, &target()),
            Err(ExecError::EmptyCommand)
        ));
    }
}
