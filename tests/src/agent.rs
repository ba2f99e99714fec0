//! Running the real `vpnlb run` agent in the testbed's LB namespace, for the root-only agent tests
//! (tests/agent_netns.rs):
//! - [`Scratch`]: a per-test temp dir (config, control socket, ids, log) and a per-test pin dir
//!   under /sys/fs/bpf (removed on drop: drop it after the agent is gone and the namespaces are
//!   deleted, as [`AgentBed`] does).
//! - [`AgentProcess`]: `nsenter --net=/run/netns/LB $VPNLB_BIN run --config F` (not `ip netns exec`,
//!   which remounts /sys and hides the pins), waits for the control socket, talks to it, kills only
//!   its own PID, and prints its log when a test fails.
//! - [`GwServers`]: what the health checks of a gateway talk to (TCP listener, HTTP server, UDP
//!   responder); ICMP is the kernel's.
//! - [`WebhookSink`]: an HTTP listener in a namespace collecting the JSON bodies POSTed to it.
//! - [`AgentBed`]: all of it with the [`Topology`], in drop order.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use vpnlb::agent::control::{Request, Response};

use vpnlb::dataplane::maps::{AyaMaps, MapReader};
use vpnlb_common::{BACKEND_DOWN, BACKEND_UP};

use crate::bfd_peer::{BfdLab, Bfdd, BfddPeer, Percentiles, kill_to_down_latencies};
use crate::netns::{Netns, fmt_mac};
use crate::testbed::{Flows, LB_ADDR, Topology, VIP, VIP_PORT, gw_addr};

/// Ports of the per-gateway check servers.
pub const TCP_PORT: u16 = 7001;
pub const HTTP_PORT: u16 = 8080;
pub const UDP_PORT: u16 = 7000;

/// A path from the environment, or a loud panic saying how to get it.
pub fn env_path(var: &str) -> PathBuf {
    let p = std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{var} is not set: run `cargo xtask test`, or `cargo xtask build-ebpf`, \
             `cargo build -p vpnlb-userspace --bin vpnlb` and export VPNLB_BIN, VPNLB_EBPF_OBJ and \
             VPNLB_BENCH_OBJ (see tests/src/agent.rs)"
            )
        });
    let p = PathBuf::from(p);
    assert!(p.exists(), "{var}={} does not exist", p.display());
    p
}

/// Runs `f` on a thread inside the named namespace (like [`Netns::run`], by name).
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(ns: &str, f: F) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns on a valid netns fd, for this short-lived thread only.
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// Polls `f` every 10 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Per-test files: temp dir (config, control socket, ids.json, log) and pin dir.
pub struct Scratch {
    pub dir: PathBuf,
    /// `/sys/fs/bpf/vpnlb-agtest-<pid>-<n>`: removed on drop.
    pub pin_root: PathBuf,
    /// `<pin_root>/v1`: the agent's `pin_dir` (outside /sys/fs/bpf/vpnlb, so no ABI refusal).
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// The metrics endpoint, inside the LB namespace.
    pub metrics: SocketAddr,
    /// The agent's `max_sessions` (65536 unless a test needs a bigger table).
    pub max_sessions: u32,
}

impl Scratch {
    pub fn new() -> Scratch {
        remove_stale();
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("vpnlb-agtest-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/vpnlb-agtest-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&pin_root);
        Scratch {
            pin_dir: pin_root.join("v1"),
            pin_root,
            socket: dir.join("control.sock"),
            config: dir.join("vpnlb.toml"),
            log: dir.join("agent.log"),
            // A fresh LB namespace: any port is free there; distinct ones make logs unambiguous.
            metrics: SocketAddr::from(([127, 0, 0, 1], 19100 + (n % 800) as u16)),
            max_sessions: 65536,
            dir,
        }
    }

    /// The `[agent]` table every test config starts with.
    pub fn header(&self) -> String {
        format!(
            "[agent]\npin_dir = \"{}\"\ncontrol_socket = \"{}\"\nmetrics_listen = \"{}\"\nmax_sessions = {}\n\n",
            self.pin_dir.display(),
            self.socket.display(),
            self.metrics,
            self.max_sessions
        )
    }
}

/// Removes pin dirs and temp dirs of test processes that no longer exist (killed runs).
fn remove_stale() {
    for (dir, prefix) in [
        (PathBuf::from("/sys/fs/bpf"), "vpnlb-agtest-"),
        (std::env::temp_dir(), "vpnlb-agtest-"),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix(prefix)
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // bpffs allows removing pins like files: this drops the maps and any (severed) link.
        if let Err(e) = std::fs::remove_dir_all(&self.pin_root)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("removing {}: {e}", self.pin_root.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Strips ANSI escape sequences (in case the log has colours).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The `vpnlb run` agent, running in a namespace.
pub struct AgentProcess {
    pub ns: String,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    pub metrics: SocketAddr,
    pub log_path: PathBuf,
    header: String,
    child: Option<Child>,
    runs: u32,
    /// Time from spawn to the control socket answering `status`, per run.
    pub startup: Vec<Duration>,
}

impl AgentProcess {
    /// Writes the config (scratch header + `body`) and starts the agent in namespace `ns`.
    pub fn start(scratch: &Scratch, ns: &str, body: &str) -> AgentProcess {
        // Fail loudly (here, not as an agent error) when the environment is incomplete.
        env_path("VPNLB_BIN");
        env_path("VPNLB_EBPF_OBJ");
        let mut a = AgentProcess {
            ns: ns.to_string(),
            config: scratch.config.clone(),
            socket: scratch.socket.clone(),
            pin_dir: scratch.pin_dir.clone(),
            metrics: scratch.metrics,
            log_path: scratch.log.clone(),
            header: scratch.header(),
            child: None,
            runs: 0,
            startup: Vec::new(),
        };
        a.write_config(body);
        a.spawn_and_wait();
        a
    }

    /// Rewrites the config file: scratch header + `body`. Returns the full text.
    pub fn write_config(&self, body: &str) -> String {
        let text = format!("{}{body}", self.header);
        self.write_raw(&text);
        text
    }

    /// Writes `text` as the config file, as is.
    pub fn write_raw(&self, text: &str) {
        let tmp = self.config.with_extension("toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
    }

    /// The current config text.
    pub fn config_text(&self) -> String {
        std::fs::read_to_string(&self.config).expect("read config")
    }

    fn command(&self, log: &File) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns))
            .arg(env_path("VPNLB_BIN"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("VPNLB_EBPF_OBJ", env_path("VPNLB_EBPF_OBJ"))
            .env(
                "VPNLB_LOG",
                std::env::var("VPNLB_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log.try_clone().expect("dup log"));
        // The agent dies with the test thread that started it, even if the test process is
        // killed (no agent left running in a deleted namespace). PDEATHSIG survives the exec.
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    fn open_log(&self, what: &str) -> File {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open agent log");
        writeln!(log, "===== {what} =====").ok();
        log
    }

    fn spawn_and_wait(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.runs += 1;
        let log = self.open_log(&format!("vpnlb run #{}", self.runs));
        let t0 = Instant::now();
        let child = self.command(&log).spawn().expect("spawn nsenter vpnlb run");
        self.child = Some(child);
        let deadline = t0 + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                self.child = None;
                panic!(
                    "the agent exited during startup ({st}); log:\n{}",
                    self.log()
                );
            }
            if let Ok(r) = vpnlb::agent::control::request(
                &self.socket,
                &Request::Status {},
                Duration::from_millis(500),
            ) && r.ok
                && r.result["agent"]["pid"].as_u64() == Some(u64::from(self.pid()))
            {
                break;
            }
            if Instant::now() > deadline {
                panic!(
                    "the agent's control socket did not answer within 30 s; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.startup.push(t0.elapsed());
    }

    /// The agent's PID (nsenter execs it: same process).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent not running").id()
    }

    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Sends one control request; panics (with the log) if the socket does not answer.
    pub fn request(&self, req: Request) -> Response {
        vpnlb::agent::control::request(&self.socket, &req, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("control request {req:?}: {e}; agent log:\n{}", self.log()))
    }

    /// `status`'s result.
    pub fn status(&self) -> Value {
        let r = self.request(Request::Status {});
        assert!(r.ok, "status failed: {r:?}");
        r.result
    }

    /// Backend `name`'s state in `status` (None if the agent does not list it).
    pub fn state(&self, name: &str) -> Option<String> {
        backend_in(&self.status(), name).map(|b| b["state"].as_str().unwrap_or("").to_string())
    }

    /// Waits until backend `name` is in `state`; returns how long it took.
    pub fn wait_state(&self, name: &str, state: &str, timeout: Duration) -> Duration {
        let t0 = Instant::now();
        let ok = wait_for(timeout, || {
            (self.state(name).as_deref() == Some(state)).then_some(())
        });
        if ok.is_none() {
            panic!(
                "backend {name} not {state} within {timeout:?}: status {:#}\nlog:\n{}",
                self.status(),
                self.log()
            );
        }
        t0.elapsed()
    }

    /// Waits until every listed backend is `up`.
    pub fn wait_all_up(&self, names: &[&str], timeout: Duration) {
        for n in names {
            self.wait_state(n, "up", timeout);
        }
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        let mut c = self.child.take().expect("agent not running");
        c.kill().expect("kill -9 agent");
        c.wait().expect("reap agent");
        self.open_log("killed with SIGKILL by the test");
    }

    /// SIGHUP: reload the config file.
    pub fn sighup(&self) {
        // SAFETY: kill(2) on our own child's PID.
        let rc = unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "kill -HUP: {}", std::io::Error::last_os_error());
    }

    /// SIGTERM and wait (up to 5 s, then SIGKILL).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        // SAFETY: kill(2) on our own child's PID.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let st = wait_child(&mut c, Duration::from_secs(5));
        if st.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        st
    }

    /// Starts the agent again with the current config (stopping it first if it still runs).
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn_and_wait();
    }

    /// Starts a second `vpnlb run` with the same config while this one runs; returns its exit
    /// status (None if it was still running after `timeout`: then it is killed) and its output.
    pub fn run_duplicate(&self, timeout: Duration) -> (Option<ExitStatus>, String) {
        let path = self.log_path.with_file_name("duplicate.log");
        let log = File::create(&path).expect("duplicate log");
        let mut c = self.command(&log).spawn().expect("spawn duplicate");
        let st = wait_child(&mut c, timeout);
        if st.is_none() {
            let _ = c.kill();
            let _ = c.wait();
        }
        (
            st,
            strip_ansi(&std::fs::read_to_string(&path).unwrap_or_default()),
        )
    }

    /// The agent's log (all runs), without colours.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// Log lines of the current run only.
    pub fn log_of_last_run(&self) -> String {
        let log = self.log();
        let marker = format!("===== vpnlb run #{} =====", self.runs);
        log.rfind(&marker)
            .map(|i| log[i..].to_string())
            .unwrap_or(log)
    }

    /// Slots of the (only) VIP's Maglev ring per backend id, read from the pinned maps.
    pub fn ring_shares(&self) -> BTreeMap<u32, usize> {
        use vpnlb::dataplane::maps::MapReader;
        let maps =
            vpnlb::dataplane::maps::AyaMaps::open_pinned(&self.pin_dir).expect("open pinned maps");
        let vips = maps.vips().expect("read VIPS");
        assert_eq!(vips.len(), 1, "one VIP expected: {vips:?}");
        let meta = vips[0].1;
        let mut m = BTreeMap::new();
        for id in maps.ring(meta.ring_id, meta.ring_size).expect("read ring") {
            *m.entry(id).or_default() += 1;
        }
        m
    }

    /// `GET /metrics` from inside the LB namespace.
    pub fn metrics_text(&self) -> String {
        let addr = self.metrics;
        in_netns(&self.ns, move || http_get(addr, "/metrics"))
            .unwrap_or_else(|e| panic!("GET http://{addr}/metrics: {e}; log:\n{}", self.log()))
    }

    /// Runs the CLI (`$VPNLB_BIN ARGS --json`) against this agent's pins and control socket and
    /// parses its JSON answer, e.g. `cli_json(&["inspect", "sessions"])`.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = Command::new(env_path("VPNLB_BIN"))
            .args(args)
            .arg("--json")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--control-socket")
            .arg(&self.socket)
            .output()
            .expect("run the vpnlb CLI");
        assert!(
            out.status.success(),
            "vpnlb {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "vpnlb {}: not JSON ({e}): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A data-plane counter by name (`vpnlb inspect stats`, e.g. `session_id_used`).
    pub fn counter(&self, name: &str) -> u64 {
        let r = self.cli_json(&["inspect", "stats"]);
        r["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name} in {r}"))
    }

    /// The backend name `vpnlb simulate` gives a UDP flow `src` -> `dst` on the live maps (the
    /// reference model; no session is created): for a flow no session knows, the VIP's hash pick.
    pub fn simulate_udp(&self, src: SocketAddr, dst: SocketAddr) -> String {
        let r = self.cli_json(&[
            "simulate",
            "--src",
            &src.to_string(),
            "--dst",
            &dst.to_string(),
            "--proto",
            "udp",
        ]);
        r["backend"]
            .as_str()
            .unwrap_or_else(|| panic!("simulate named no backend: {r}"))
            .to_string()
    }
}

fn wait_child(c: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    wait_for(timeout, || c.try_wait().ok().flatten())
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- agent log ({}) -----\n{}\n----- end of agent log -----",
                self.log_path.display(),
                self.log()
            );
        }
        self.stop();
    }
}

/// The entry of backend `name` in a `status` result.
pub fn backend_in<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
}

/// The pool serving VIP `vip` (default class) in a `status` result.
/// Waits until every client in `moved` is back on a gateway, or `within` has passed since `t0`:
/// `placed()` is polled every 100 ms and gives, per client (indexed by client number), the
/// gateway it now has a working tunnel on, if any. Returns, per client that came back, that
/// gateway and the time since `t0` it was first seen there.
pub fn wait_moved(
    moved: &[usize],
    t0: Instant,
    within: Duration,
    mut placed: impl FnMut() -> Vec<Option<usize>>,
) -> BTreeMap<usize, (usize, Duration)> {
    let mut back = BTreeMap::new();
    while back.len() < moved.len() && t0.elapsed() < within {
        let p = placed();
        for &n in moved {
            if let Some(g) = p[n] {
                back.entry(n).or_insert((g, t0.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    back
}

/// `up` of backend `name`'s check whose label starts with `kind` ("icmp", "wireguard", "udp", ...).
pub fn check_up(status: &Value, name: &str, kind: &str) -> bool {
    backend_in(status, name).unwrap_or_else(|| panic!("{name} not in status: {status:#}"))["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["check"].as_str().is_some_and(|l| l.starts_with(kind)))
        .unwrap_or_else(|| panic!("{name}: no {kind} check in {status:#}"))["up"]
        .as_bool()
        .unwrap_or(false)
}

pub fn active_pool(status: &Value, vip: &str) -> Option<String> {
    status["vips"]
        .as_array()?
        .iter()
        .find(|v| v["name"] == vip)?["active_pools"]
        .as_array()?
        .iter()
        .find(|p| p["class"].is_null())?["pool"]
        .as_str()
        .map(str::to_string)
}

/// A minimal HTTP/1.1 GET; returns the body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no header end in {text:?}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("answer: {head}")));
    }
    Ok(body.to_string())
}

/// The value of the sample `series` (name with labels, exactly as exposed) in a text exposition.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        rest.strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// A histogram from a text exposition: count, sum and the cumulative buckets (le, count).
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    pub count: f64,
    pub sum: f64,
    pub buckets: Vec<(f64, f64)>,
}

impl Histogram {
    pub fn parse(text: &str, name: &str) -> Histogram {
        let mut h = Histogram {
            count: metric(text, &format!("{name}_count")).unwrap_or(0.0),
            sum: metric(text, &format!("{name}_sum")).unwrap_or(0.0),
            buckets: Vec::new(),
        };
        let prefix = format!("{name}_bucket{{le=\"");
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix(&prefix)
                && let Some((le, v)) = rest.split_once("\"} ")
            {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::NAN)
                };
                if let Some(v) = v.split_whitespace().next().and_then(|v| v.parse().ok()) {
                    h.buckets.push((le, v));
                }
            }
        }
        h
    }

    pub fn mean(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count
        } else {
            0.0
        }
    }

    /// Upper bound of the bucket holding quantile `q`.
    pub fn quantile_le(&self, q: f64) -> f64 {
        let want = self.count * q;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= want)
            .map(|(le, _)| *le)
            .unwrap_or(f64::INFINITY)
    }

    /// Observations since `earlier` (same histogram, scraped before).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        Histogram {
            count: self.count - earlier.count,
            sum: self.sum - earlier.sum,
            buckets: self
                .buckets
                .iter()
                .map(|(le, c)| {
                    let before = earlier
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map(|(_, c)| *c)
                        .unwrap_or(0.0);
                    (*le, c - before)
                })
                .collect(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} writes, mean {:.3} ms, p50 <= {:.3} ms, p99 <= {:.3} ms",
            self.count,
            self.mean() * 1e3,
            self.quantile_le(0.5) * 1e3,
            self.quantile_le(0.99) * 1e3
        )
    }
}

/// A stoppable server thread.
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn spawn(f: impl FnOnce(Arc<AtomicBool>) + Send + 'static) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        Server {
            stop,
            thread: Some(std::thread::spawn(move || f(s))),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(l: TcpListener, stop: Arc<AtomicBool>, mut handle: impl FnMut(TcpStream)) {
    l.set_nonblocking(true).expect("nonblocking listener");
    while !stop.load(Ordering::Relaxed) {
        match l.accept() {
            Ok((s, _)) => {
                let _ = s.set_nonblocking(false);
                handle(s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// The check targets of one gateway: a TCP listener ([`TCP_PORT`]), an HTTP server
/// ([`HTTP_PORT`], `GET /healthz` answers `ok`) and a UDP responder ([`UDP_PORT`], answers
/// `pong <payload>`), all on the gateway's own address. Stopping closes the sockets (connections
/// are refused, UDP gets port unreachable).
pub struct GwServers {
    servers: Vec<Server>,
}

impl GwServers {
    pub fn start(gw: &Netns, addr: Ipv4Addr) -> GwServers {
        let (tcp, http, udp) = gw.run(|| {
            (
                TcpListener::bind((addr, TCP_PORT)).expect("bind tcp check port"),
                TcpListener::bind((addr, HTTP_PORT)).expect("bind http check port"),
                UdpSocket::bind((addr, UDP_PORT)).expect("bind udp check port"),
            )
        });
        let mut servers = Vec::new();
        servers.push(Server::spawn(move |stop| {
            accept_loop(tcp, stop, drop);
        }));
        servers.push(Server::spawn(move |stop| {
            accept_loop(http, stop, |mut s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let ok = req.starts_with(b"GET /healthz ");
                let resp: &[u8] = if ok {
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n"
                } else {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                };
                let _ = s.write_all(resp);
            });
        }));
        servers.push(Server::spawn(move |stop| {
            udp.set_read_timeout(Some(Duration::from_millis(20))).ok();
            let mut buf = [0u8; 1500];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, from)) = udp.recv_from(&mut buf) {
                    let mut reply = b"pong ".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    let _ = udp.send_to(&reply, from);
                }
            }
        }));
        GwServers { servers }
    }

    /// Stops every server (closing its socket).
    pub fn stop(&mut self) {
        self.servers.clear();
    }
}

/// An HTTP listener (in a namespace) that records the JSON bodies POSTed to it and answers 204.
pub struct WebhookSink {
    pub addr: SocketAddr,
    pub events: Arc<Mutex<Vec<Value>>>,
    _server: Server,
}

impl WebhookSink {
    pub fn start(ns: &Netns) -> WebhookSink {
        let l = ns.run(|| TcpListener::bind("127.0.0.1:0").expect("bind webhook listener"));
        let addr = l.local_addr().expect("local addr");
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        let server = Server::spawn(move |stop| {
            accept_loop(l, stop, |mut s| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                let body = loop {
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break got[end + 4..end + 4 + len].to_vec();
                        }
                    }
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                };
                if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                    ev.lock().unwrap().push(v);
                }
                let _ = s.write_all(
                    b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            });
        });
        WebhookSink {
            addr,
            events,
            _server: server,
        }
    }

    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }
}

/// Concatenated JSON values (what `cat >> FILE` makes of several events).
pub fn json_stream(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    serde_json::Deserializer::from_str(&text)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .collect()
}

/// Health-check timing used by the agent tests: interval 200 ms, timeout 150 ms, rise 2, fall 2.
pub const INTERVAL_MS: u64 = 200;
pub const TIMEOUT_MS: u64 = 150;
pub const RISE: u64 = 2;
pub const FALL: u64 = 2;

/// A `[[backend.check]]` of `kind` ("icmp", "tcp", "http", "udp") against the [`GwServers`].
pub fn check(kind: &str) -> String {
    let keys = match kind {
        "icmp" => String::new(),
        "tcp" => format!("port = {TCP_PORT}\n"),
        "http" => format!("port = {HTTP_PORT}\npath = \"/healthz\"\nbody_contains = \"ok\"\n"),
        "udp" => format!("port = {UDP_PORT}\npayload = \"ping\"\nexpect = \"pong\"\n"),
        other => panic!("no check template for {other}"),
    };
    format!(
        "[[backend.check]]\ntype = \"{kind}\"\n{keys}interval_ms = {INTERVAL_MS}\ntimeout_ms = {TIMEOUT_MS}\nrise = {RISE}\nfall = {FALL}\n"
    )
}

/// A `[[backend]]` for gateway `i` (0-based, named `gw<i+1>`), with its MAC written out or left
/// to the agent's neighbour resolution, and the given checks.
pub fn backend(i: usize, mac: Option<[u8; 6]>, weight: u32, checks: &[&str]) -> String {
    let mut s = format!(
        "[[backend]]\nname = \"gw{}\"\naddress = \"{}\"\nweight = {weight}\n",
        i + 1,
        gw_addr(i)
    );
    if let Some(m) = mac {
        s.push_str(&format!("mac = \"{}\"\n", fmt_mac(&m)));
    }
    for c in checks {
        s.push_str(&check(c));
    }
    s.push('\n');
    s
}

/// The `[[interface]]` (the LB's eth0, native) and a UDP L2 DSR VIP `wg` on the testbed VIP with
/// `pools` (name, priority, members).
pub fn vip(pools: &[(&str, i64, &[&str])]) -> String {
    let mut s = format!(
        "[[vip]]\nname = \"wg\"\naddress = \"{VIP}\"\nport = {VIP_PORT}\nprotocol = \"udp\"\nforwarding = \"l2dsr\"\n"
    );
    for (name, prio, members) in pools {
        let list: Vec<String> = members.iter().map(|m| format!("\"{m}\"")).collect();
        s.push_str(&format!(
            "[[vip.pool]]\nname = \"{name}\"\npriority = {prio}\nbackends = [{}]\n",
            list.join(", ")
        ));
    }
    s.push('\n');
    s
}

pub const INTERFACE: &str = "[[interface]]\nname = \"eth0\"\nmode = \"native\"\n\n";

/// Everything of one agent test, in drop order: the agent dies first, then the check servers, then
/// the namespaces are deleted, then the pin dir is removed.
pub struct AgentBed {
    pub agent: AgentProcess,
    pub servers: Vec<GwServers>,
    pub topo: Topology,
    pub scratch: Scratch,
}

impl AgentBed {
    /// The topology (`n_gw` gateways with check servers, `n_clients` client addresses) under
    /// namespace prefix `prefix`, and the agent running `body` (without `[agent]`) in the LB
    /// namespace. `body` is built after the topology exists, so it can use the gateways' MACs.
    pub fn up(
        prefix: &str,
        n_gw: usize,
        n_clients: usize,
        body: impl FnOnce(&Topology, &Scratch) -> String,
    ) -> AgentBed {
        let scratch = Scratch::new();
        let topo = Topology::up(prefix, n_gw, n_clients);
        let servers = topo
            .gws
            .iter()
            .enumerate()
            .map(|(i, gw)| GwServers::start(gw, gw_addr(i)))
            .collect();
        let text = body(&topo, &scratch);
        let agent = AgentProcess::start(&scratch, topo.lb.name(), &text);
        AgentBed {
            agent,
            servers,
            topo,
            scratch,
        }
    }

    /// MAC of gateway `i`'s eth0.
    pub fn gw_mac(&self, i: usize) -> [u8; 6] {
        self.topo.gws[i].mac("eth0")
    }
}

/// The flows `idx` of `flows`, as a new [`Flows`] over the same sockets.
pub fn subset(flows: &Flows, idx: &[usize]) -> Flows {
    Flows::new(
        idx.iter()
            .map(|&i| flows.sockets[i].try_clone().expect("clone socket"))
            .collect(),
    )
}

/// Count of flows per owner.
pub fn tally(owners: &[Option<String>]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for o in owners {
        *m.entry(o.clone().unwrap_or_else(|| "(no answer)".into()))
            .or_default() += 1;
    }
    m
}

/// The state of backend `id` in the pinned `BACKENDS` map (0 when unreadable).
pub fn backend_state(maps: &AyaMaps, id: u32) -> u32 {
    maps.backend(id).map(|b| b.state).unwrap_or(0)
}

/// With the real agent in a namespace running a BFD check (50 ms x 3) against FRR bfdd in another:
/// `reps` times, kills bfdd with -9 and measures until the backend's state in the pinned
/// `BACKENDS` map is down (detection + the agent's map write), then restarts bfdd and waits for up.
pub fn bfd_detect_to_map(prefix: &str, subnet: u8, reps: usize) -> (Percentiles, Vec<Duration>) {
    let lab = BfdLab::new(prefix, subnet);
    let mut bfdd = Bfdd::start(&lab.gw, &[BfddPeer::fast(lab.lb_v4, lab.gw_v4)]);
    let scratch = Scratch::new();
    let body = format!(
        r#"[[interface]]
name = "eth0"

[[backend]]
name = "gw"
address = "{gw}"
mac = "{mac}"
[[backend.check]]
type = "bfd"
desired_min_tx_ms = 50
required_min_rx_ms = 50
detect_mult = 3

[[vip]]
name = "wg"
address = "10.99.0.1"
port = 51820
protocol = "udp"
[[vip.pool]]
name = "all"
backends = ["gw"]
"#,
        gw = lab.gw_v4,
        mac = fmt_mac(&lab.gw.mac("eth0")),
    );
    let agent = AgentProcess::start(&scratch, lab.lb.name(), &body);
    let id = agent.status()["backends"][0]["id"]
        .as_u64()
        .expect("backend id") as u32;
    let maps = AyaMaps::open_pinned(&scratch.pin_dir).expect("open the agent's pins");
    let watch = |up: bool, timeout: Duration| -> Instant {
        let want = if up { BACKEND_UP } else { BACKEND_DOWN };
        let deadline = Instant::now() + timeout;
        loop {
            if backend_state(&maps, id) == want {
                return Instant::now();
            }
            if Instant::now() > deadline {
                panic!("backend never became {want} in the map:\n{}", agent.log());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    };
    watch(true, Duration::from_secs(15));
    // Let the session reach its 50 ms rate (Poll/Final) before the first kill.
    std::thread::sleep(Duration::from_secs(1));
    let lat = kill_to_down_latencies(&mut bfdd, reps, watch);
    drop(agent);
    (Percentiles::of(&lat), lat)
}

/// Runs `$VPNLB_BIN ARGS` in namespace `ns` (nsenter, so /sys/fs/bpf stays visible) with the object
/// from `$VPNLB_EBPF_OBJ`; returns the exit code, stdout and stderr.
pub fn vpnlb_in(ns: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{ns}"))
        .arg(env_path("VPNLB_BIN"))
        .args(args)
        .env("VPNLB_EBPF_OBJ", env_path("VPNLB_EBPF_OBJ"))
        .env("NO_COLOR", "1")
        .output()
        .expect("run nsenter vpnlb");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GUE port of the agent tests' GUE VIPs: not the default 6080, so the flags are exercised end to
/// end.
pub const DECAP_GUE_PORT: u16 = 6081;

/// Gateways behind an encapsulating VIP (issue #5): the config keys of forwarding `mode` ("gue" or
/// "ipip") and vpnlb's decap program on every gateway of an [`AgentBed`], attached by the real
/// `vpnlb decap attach --iface eth0` with per-gateway pins under the scratch pin root (removed with
/// it).
pub struct Decap {
    pub mode: String,
    /// Per gateway: its namespace and decap pin dir.
    pub gws: Vec<(String, String)>,
}

impl Decap {
    /// The `[agent]` key for the outer source of encapsulated packets (the LB's address): the body
    /// of [`AgentBed::up`] must start with it (it is still in the `[agent]` table).
    pub fn agent_keys() -> String {
        format!("encap_source_v4 = \"{LB_ADDR}\"\n\n")
    }

    /// The VIP keys of `mode`: `forwarding`, the GUE port for "gue", and `mtu` = the gateway links'
    /// MTU (1500), so an encapsulated packet too big for the link is a counted drop
    /// (`drop_encap_too_big`, which [`Decap::assert_lb_sent_all_unwrapped`] wants 0) instead of
    /// one the veth drops silently.
    pub fn vip_keys(mode: &str) -> String {
        let fwd = match mode {
            "gue" => format!("forwarding = \"gue\"\ngue_port = {DECAP_GUE_PORT}\n"),
            "ipip" => "forwarding = \"ipip\"\n".to_string(),
            other => panic!("no encapsulating mode {other}"),
        };
        format!("{fwd}mtu = 1500\n")
    }

    /// `--gue-port` of the gateways: the VIP's GUE port, or 0 (GUE off) for IPIP.
    pub fn gue_port(&self) -> String {
        if self.mode == "gue" {
            DECAP_GUE_PORT.to_string()
        } else {
            "0".to_string()
        }
    }

    /// Attaches the decap program to every gateway's eth0 for `mode`.
    pub fn attach(bed: &AgentBed, mode: &str) -> Decap {
        let d = Decap {
            mode: mode.to_string(),
            gws: bed
                .topo
                .gws
                .iter()
                .enumerate()
                .map(|(i, gw)| {
                    let dir = bed.scratch.pin_root.join(format!("decap-gw{}", i + 1));
                    (gw.name().to_string(), dir.display().to_string())
                })
                .collect(),
        };
        let port = d.gue_port();
        for (ns, dir) in &d.gws {
            let args = ["decap", "attach", "--iface", "eth0", "--gue-port", &port];
            let (code, out, err) = vpnlb_in(ns, &[&args[..], &["--decap-pin-dir", dir]].concat());
            assert_eq!(code, Some(0), "decap attach in {ns}: {out}{err}");
        }
        d
    }

    /// `vpnlb decap status --json` of gateway `g`.
    pub fn status(&self, g: usize) -> Value {
        let (ns, dir) = &self.gws[g];
        let (code, out, err) = vpnlb_in(ns, &["decap", "status", "--json", "--decap-pin-dir", dir]);
        assert_eq!(code, Some(0), "decap status in {ns}: {err}");
        serde_json::from_str(&out).expect("decap status JSON")
    }

    /// The decap counter of this mode and of the other one.
    fn counter_names(&self) -> (&'static str, &'static str) {
        if self.mode == "gue" {
            ("decap_gue", "decap_ipip")
        } else {
            ("decap_ipip", "decap_gue")
        }
    }

    /// Per gateway: the packets its decap program unwrapped in this mode.
    pub fn unwrapped(&self) -> Vec<u64> {
        let (this, _) = self.counter_names();
        (0..self.gws.len())
            .map(|g| self.status(g)["counters"][this].as_u64().unwrap_or(0))
            .collect()
    }

    /// Every gateway's decap is attached with the mode's GUE port and unwrapped packets of this
    /// mode, none of the other, and no bad inner packet.
    pub fn assert_all_unwrapped(&self) {
        let (this, other) = self.counter_names();
        for (g, (ns, _)) in self.gws.iter().enumerate() {
            let s = self.status(g);
            let c = &s["counters"];
            println!("{ns}: decap counters {c}");
            assert!(
                c[this].as_u64().unwrap_or(0) > 0,
                "{ns}: {this} did not move: {s}"
            );
            assert_eq!(c[other].as_u64(), Some(0), "{ns}: {s}");
            assert_eq!(c["decap_bad_inner"].as_u64(), Some(0), "{ns}: {s}");
            assert_eq!(s["interfaces"][0]["attached"], true, "{s}");
            assert_eq!(s["gue_port"].to_string(), self.gue_port(), "{s}");
        }
    }

    /// Every packet the LB encapsulated to a gateway was unwrapped there: per gateway, the LB's
    /// count for that backend (`gw<g+1>`), read between two reads of the gateway's counter
    /// (keepalives still flow), lies between them; none was too big for the VIP's `mtu`. Returns
    /// the LB's counts.
    pub fn assert_lb_sent_all_unwrapped(&self, agent: &AgentProcess) -> Vec<u64> {
        let before = self.unwrapped();
        let stats = agent.cli_json(&["inspect", "stats"]);
        let after = self.unwrapped();
        let sent: Vec<u64> = (0..self.gws.len())
            .map(|g| {
                let name = format!("gw{}", g + 1);
                stats["backends"]
                    .as_array()
                    .and_then(|b| b.iter().find(|x| x["name"] == name.as_str()))
                    .and_then(|b| b["packets"].as_u64())
                    .unwrap_or_else(|| panic!("{name} not in inspect stats: {stats}"))
            })
            .collect();
        for g in 0..self.gws.len() {
            println!(
                "{}: LB sent {} packets to gw{}, it unwrapped {}..{}",
                self.mode,
                sent[g],
                g + 1,
                before[g],
                after[g]
            );
            assert!(
                before[g] <= sent[g] && sent[g] <= after[g],
                "{}: LB sent {} to gw{}, it unwrapped {}..{}",
                self.mode,
                sent[g],
                g + 1,
                before[g],
                after[g]
            );
        }
        let fwd = stats["counters"][format!("fwd_{}", self.mode)]
            .as_u64()
            .unwrap_or(0);
        assert!(
            fwd >= before.iter().sum::<u64>(),
            "fwd_{} {fwd}: {stats}",
            self.mode
        );
        assert_eq!(stats["counters"]["drop_encap_too_big"], 0, "{stats}");
        sent
    }

    /// `vpnlb gateway-check --json` on gateway `g` for VIP:`port` with this mode, eth0 and the
    /// gateway's decap pins, and `probe` (the probe's flags). Asserts it exits 0 and every finding
    /// is `ok` except those in `warns` (check, text of its fix), which must be `warn` with that fix
    /// (e.g. charon's `daemon`: it cannot read charon's configuration); the decap and reply-source
    /// findings must be there. Returns the findings as (check, level).
    pub fn assert_gateway_check(
        &self,
        g: usize,
        port: u16,
        probe: &[&str],
        warns: &[(&str, &str)],
    ) -> Vec<(String, String)> {
        let (ns, dir) = &self.gws[g];
        let (vip, port, gue) = (VIP.to_string(), port.to_string(), self.gue_port());
        let args = [
            "gateway-check",
            "--vip",
            &vip,
            "--port",
            &port,
            "--encap",
            &self.mode,
            "--gue-port",
            &gue,
            "--iface",
            "eth0",
            "--decap-pin-dir",
            dir,
            "--json",
        ];
        let (code, out, err) = vpnlb_in(ns, &[&args[..], probe].concat());
        let j: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("gateway-check JSON in {ns}: {e}: {out}{err}"));
        let findings = j["findings"].as_array().expect("findings");
        let field = |f: &Value, k: &str| f[k].as_str().unwrap_or("").to_string();
        let levels: Vec<(String, String)> = findings
            .iter()
            .map(|f| (field(f, "check"), field(f, "level")))
            .collect();
        println!("{ns}: gateway-check {levels:?}");
        assert_eq!(code, Some(0), "gateway-check failed in {ns}: {j:#}");
        for want in [
            "vip_address",
            "rp_filter",
            "decap",
            "reply_source",
            "daemon",
        ] {
            assert!(
                levels.iter().any(|(c, _)| c == want),
                "{ns}: no {want} finding: {j:#}"
            );
        }
        for f in findings {
            let check = field(f, "check");
            match warns.iter().find(|(c, _)| *c == check) {
                Some((_, fix)) => {
                    assert_eq!(field(f, "level"), "warn", "{ns}: {f:#}");
                    assert!(
                        field(f, "fix").contains(fix),
                        "{ns}: fix not {fix:?}: {f:#}"
                    );
                }
                None => assert_eq!(field(f, "level"), "ok", "{ns}: {f:#}"),
            }
        }
        levels
    }
}
