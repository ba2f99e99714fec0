//! `vpnlb top` in a real terminal: the `$VPNLB_BIN top` process runs in a detached 80x24 tmux
//! session over maps pinned in a throw-away directory under /sys/fs/bpf (the production object,
//! programmed through `Dataplane<AyaMaps>`, names from an ids.json next to a fake control socket
//! path, no agent). The screen is read with `tmux capture-pane`; packets go through the real XDP
//! program (`BPF_PROG_TEST_RUN`) on the same maps, and the rates on screen must follow. `q` and
//! Ctrl-C must end the process within 2 s with the terminal restored (primary screen, cooked mode).
//!
//! Needs root, tmux (installed with apt-get when missing) and the eBPF object: `cargo xtask test`
//! (or VPNLB_BIN=... VPNLB_EBPF_OBJ=... cargo test -p vpnlb-tests --test top_tmux -- --ignored
//! --test-threads=1).

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use aya::programs::{TestRun, TestRunOptions, Xdp};
use vpnlb::agent::control::Request;
use vpnlb::dataplane::{BackendSpec, VipSpec};
use vpnlb_common::*;
use vpnlb_tests::agent::{AgentBed, INTERFACE, backend as agent_backend, env_path, vip};
use vpnlb_tests::harness::{XDP_PASS, XDP_TX, require_root, xdp_md};
use vpnlb_tests::packet::Frame;
use vpnlb_tests::pins::PinnedObject;

const WG: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const WG_PORT: u16 = 51820;
/// A VIP whose only backend is down: its packets are dropped.
const DEAD: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const DEAD_PORT: u16 = 1194;

/// The production object with pinned maps, two VIPs and four backends, an ids.json naming them,
/// and the ingress program for test runs. Pins and the temp dir are removed on drop.
/// Numbers this process's tmux sessions.
static SEQ: AtomicU32 = AtomicU32::new(0);

struct Bed(PinnedObject);

impl std::ops::Deref for Bed {
    type Target = PinnedObject;
    fn deref(&self) -> &PinnedObject {
        &self.0
    }
}

impl std::ops::DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut PinnedObject {
        &mut self.0
    }
}

impl Bed {
    fn new() -> Bed {
        let mut obj = PinnedObject::new("toptest", 2);
        let dp = &mut obj.dp;
        for (id, st) in [
            (1, BACKEND_UP),
            (2, BACKEND_UP),
            (3, BACKEND_DRAINING),
            (4, BACKEND_DOWN),
        ] {
            dp.upsert_backend(BackendSpec {
                id,
                addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, id as u8)),
                mac: [2, 0, 0, 0, 0, id as u8],
                src_mac: [2, 0, 0, 0, 0, 0x10],
                ifindex: 0,
                weight: 100,
                state: st,
            })
            .unwrap();
        }
        let wg = VipSpec {
            key: VipKey::new(IpAddr::V4(WG), WG_PORT, PROTO_UDP),
            vip_id: 0,
            ring_id: 0,
            ring_size: DEFAULT_RING_SIZE,
            flags: 0,
            fwd_mode: FWD_MODE_L2DSR,
            mtu: 0,
            idle_timeout_ns: 0,
            gue_port: 0,
            backends: vec![1, 2, 3],
            classes: Vec::new(),
        };
        dp.upsert_vip(wg.clone()).unwrap();
        dp.upsert_vip(VipSpec {
            key: VipKey::new(IpAddr::V4(DEAD), DEAD_PORT, PROTO_UDP),
            vip_id: 1,
            ring_id: 1,
            backends: vec![4],
            ..wg
        })
        .unwrap();
        let ids = serde_json::json!({
            "backends": {"gw-paris": 1, "gw-lyon": 2, "gw-spare": 3, "gw-dead": 4},
            "vips": {"wg-public": 0, "ovpn-dead": 1},
            "rings": [
                {"vip": "wg-public", "class": null, "id": 0},
                {"vip": "ovpn-dead", "class": null, "id": 1},
            ],
        });
        std::fs::write(
            vpnlb::agent::persist::ids_path(&obj.socket),
            ids.to_string(),
        )
        .unwrap();
        Bed(obj)
    }

    /// One BPF_PROG_TEST_RUN of vpnlb_ingress; returns the XDP action.
    fn run(&mut self, frame: &[u8]) -> u32 {
        let ctx = xdp_md(frame.len(), 1);
        let mut out = vec![0u8; frame.len() + 512];
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(prog_names::INGRESS)
            .unwrap()
            .try_into()
            .unwrap();
        prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::new()
        })
        .unwrap_or_else(|e| panic!("test run: {e:?}"))
        .return_value
    }

    /// A burst: 40 WireGuard flows (forwarded), 4 packets to a non-VIP address (passed) and 2
    /// to the VIP without a live backend (dropped).
    fn burst(&mut self, round: u32) {
        for i in 0..40u32 {
            let f = Frame::udp(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, (i % 200) as u8 + 1)),
                40000 + (round % 1000) as u16 * 10 + (i / 200) as u16,
                IpAddr::V4(WG),
                WG_PORT,
                &[0u8; 100],
            );
            assert_eq!(self.run(&f.bytes()), XDP_TX, "wg flow {i}");
        }
        for i in 0..4u8 {
            let f = Frame::udp(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, i + 1)),
                5353,
                IpAddr::V4(Ipv4Addr::new(203, 0, 113, 99)),
                53,
                &[0u8; 20],
            );
            assert_eq!(self.run(&f.bytes()), XDP_PASS, "not-vip packet");
        }
        for i in 0..2u8 {
            let f = Frame::udp(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, i + 1)),
                6000,
                IpAddr::V4(DEAD),
                DEAD_PORT,
                &[0u8; 20],
            );
            let a = self.run(&f.bytes());
            assert!(a != XDP_TX && a != XDP_PASS, "dead vip packet: action {a}");
        }
    }
}

/// tmux must be there (`cargo xtask test` installs it with the other test packages).
fn ensure_tmux() {
    let have = Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        have,
        "tmux missing: run the tests with `cargo xtask test`, which installs it"
    );
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// A detached 80x24 tmux session running `vpnlb top`, killed (by name) on drop. The command runs
/// under `sh`, which prints `EXITED <status>` and the terminal's `icanon`/`echo` modes when top
/// ends, then waits: so the exit, its status and the restored terminal can all be read on screen.
struct Tmux {
    name: String,
}

impl Tmux {
    fn start(pins: &Path, socket: &Path) -> Tmux {
        ensure_tmux();
        let bin = env_path("VPNLB_BIN");
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("vpnlbtop{}x{n}", std::process::id());
        let top = format!(
            "{} top --pin-dir {} --control-socket {}",
            sh_quote(bin.to_str().unwrap()),
            sh_quote(pins.to_str().unwrap()),
            sh_quote(socket.to_str().unwrap()),
        );
        let script = format!(
            "{top}; echo \"EXITED $?\"; stty -a | tr ' ;' '\\n\\n' | grep -x -e '-*icanon' -e '-*echo'; sleep 120"
        );
        let t = Tmux { name };
        let st = Command::new("tmux")
            .args(["new-session", "-d", "-s", &t.name, "-x", "80", "-y", "24"])
            .arg(format!("sh -c {}", sh_quote(&script)))
            .env("TERM", "xterm-256color")
            .status()
            .expect("running tmux");
        assert!(st.success(), "tmux new-session failed");
        t
    }

    fn capture(&self) -> String {
        let o = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.name])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The pid of `vpnlb top` (the child of the pane's `sh`).
    fn top_pid(&self) -> u32 {
        let o = Command::new("tmux")
            .args(["display-message", "-p", "-t", &self.name, "#{pane_pid}"])
            .output()
            .expect("tmux display-message");
        let sh: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
        let children = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children")).unwrap();
        children
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("sh {sh} has no child"))
    }

    fn send(&self, key: &str) {
        let st = Command::new("tmux")
            .args(["send-keys", "-t", &self.name, key])
            .status()
            .expect("tmux send-keys");
        assert!(st.success(), "tmux send-keys {key}");
    }

    /// Polls the screen until `pred` holds; panics with the last screen after `timeout`.
    fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let s = self.capture();
            if pred(&s) {
                return s;
            }
            if t0.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}; screen:\n{s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The first drawn screen (title and sections), 80 columns at most.
    fn wait_first_screen(&self) -> String {
        let s = self.wait_for("the first screen", Duration::from_secs(10), |s| {
            s.contains("vpnlb top") && s.contains("Backends") || s.contains("EXITED")
        });
        assert!(!s.contains("EXITED"), "top exited at start:\n{s}");
        for l in s.lines() {
            assert!(l.chars().count() <= 80, "line wider than 80: {l:?}");
        }
        s
    }

    /// The first screen of a [`Bed`]: names, map states and the missing agent.
    fn wait_drawn(&self) -> String {
        self.wait_first_screen();
        // The agent's answer (here: none) comes from its own thread, after the first screen.
        let s = self.wait_for("the bed's backends", Duration::from_secs(5), |s| {
            s.contains("gw-dead") && s.contains("agent not running") || s.contains("EXITED")
        });
        assert!(!s.contains("EXITED"), "top exited:\n{s}");
        for want in [
            "vpnlb top",
            "agent not running",
            "wg-public",
            "udp 203.0.113.10:51820",
            "ovpn-dead",
            "gw-paris",
            "gw-lyon",
            "gw-spare",
            "gw-dead",
            "Since (UTC)",
        ] {
            assert!(s.contains(want), "missing {want:?} on screen:\n{s}");
        }
        assert_eq!(field(&s, "gw-spare", 1), "drain", "{s}");
        assert_eq!(field(&s, "gw-dead", 1), "down", "{s}");
        assert_eq!(field(&s, "gw-paris", 1), "up", "{s}");
        s
    }

    /// Sends `key` and checks that top ended within 2 s with status 0 and a restored terminal.
    fn quit_with(&self, key: &str) {
        self.send(key);
        self.check_exit(key);
    }

    /// Checks that top ended within 2 s with status 0 and a restored terminal.
    fn check_exit(&self, key: &str) {
        let t0 = Instant::now();
        let s = self.wait_for("top to exit", Duration::from_secs(2), |s| {
            s.contains("EXITED")
        });
        let took = t0.elapsed();
        assert!(s.contains("EXITED 0"), "top failed on {key}:\n{s}");
        // The primary screen is back (the alternate one held the view) and raw mode is off.
        assert!(
            !s.contains("Backends ("),
            "the view is still on screen after exit (alternate screen not left):\n{s}"
        );
        let s = self.wait_for("stty output", Duration::from_secs(2), |s| {
            s.lines().any(|l| l.trim().ends_with("echo"))
        });
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        assert!(
            lines.contains(&"icanon") && lines.contains(&"echo"),
            "terminal left in raw mode (want icanon and echo):\n{s}"
        );
        eprintln!("{key}: top exited in {took:?}");
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.name])
            .status();
    }
}

/// Whitespace-separated field `i` (the name is field 0) of the row starting with `name`.
fn field(screen: &str, name: &str, i: usize) -> String {
    screen
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(i))
        .unwrap_or_default()
        .to_string()
}

/// The summary row's `fwd N/s` value.
fn summary(screen: &str, what: &str) -> String {
    screen
        .lines()
        .find(|l| l.starts_with("fwd "))
        .and_then(|l| {
            let mut it = l.split_whitespace();
            it.position(|w| w == what)?;
            it.next().map(|v| v.trim_end_matches("/s").to_string())
        })
        .unwrap_or_default()
}

fn nonzero(v: &str) -> bool {
    !v.is_empty() && v != "0" && v != "-"
}

#[test]
#[ignore = "needs root, tmux and the eBPF object: run cargo xtask test"]
fn top_shows_live_rates_and_quits_on_q() {
    let mut bed = Bed::new();
    let tmux = Tmux::start(&bed.pins, &bed.socket);
    let s = tmux.wait_drawn();
    // No traffic yet: the VIP's total is 0.
    assert_eq!(field(&s, "wg-public", 5), "0", "{s}");

    // Traffic through the real program, until the screen shows it (rates are per refresh).
    let t0 = Instant::now();
    let mut round = 0;
    let s = loop {
        bed.burst(round);
        round += 1;
        let s = tmux.capture();
        let ok = nonzero(&field(&s, "wg-public", 3))
            && nonzero(&field(&s, "wg-public", 4))
            && nonzero(&field(&s, "gw-paris", 4))
            && nonzero(&field(&s, "gw-lyon", 4))
            && nonzero(&summary(&s, "fwd"))
            && nonzero(&summary(&s, "pass"))
            && nonzero(&summary(&s, "drop"))
            && s.contains("not_vip");
        if ok {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "rates never showed after {round} bursts; screen:\n{s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("with traffic:\n{s}");
    // Drained and down backends get no new flows.
    assert_eq!(field(&s, "gw-spare", 4), "0", "{s}");
    assert_eq!(field(&s, "gw-dead", 4), "0", "{s}");
    let drops = s
        .lines()
        .find(|l| l.starts_with("drop "))
        .unwrap_or_default();
    assert!(
        drops.contains("no_backend") || drops.contains("backend_down"),
        "drop reason missing:\n{s}"
    );

    // Traffic stops: the rates fall back to 0 within two refreshes; totals stay.
    let s = tmux.wait_for("rates back to 0", Duration::from_secs(4), |s| {
        field(s, "wg-public", 3) == "0" && summary(s, "fwd") == "0"
    });
    assert!(nonzero(&field(&s, "wg-public", 5)), "{s}");
    // The session walk (every 5 s) catches up with the flows the bursts created.
    tmux.wait_for("a non-zero session count", Duration::from_secs(8), |s| {
        s.lines().any(|l| {
            l.split_once("sessions ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n > 0)
        })
    });

    tmux.quit_with("q");
}

#[test]
#[ignore = "needs root, tmux and the eBPF object: run cargo xtask test"]
fn top_quits_on_ctrl_c() {
    let bed = Bed::new();
    let tmux = Tmux::start(&bed.pins, &bed.socket);
    tmux.wait_drawn();
    // The session count arrives from its own thread (at most every 5 s).
    tmux.wait_for("the session count", Duration::from_secs(8), |s| {
        s.contains("sessions 0 (counted every 5s")
    });
    // A smaller terminal: redrawn to fit, names kept, the reasons section dropped.
    let st = Command::new("tmux")
        .args(["resize-window", "-t", &tmux.name, "-x", "50", "-y", "12"])
        .status()
        .expect("tmux resize-window");
    assert!(st.success(), "tmux resize-window");
    let s = tmux.wait_for("the 50x12 screen", Duration::from_secs(5), |s| {
        s.lines().count() <= 12 && !s.contains("Top reasons") && s.contains("wg-public")
    });
    for l in s.lines() {
        assert!(l.chars().count() <= 50, "line wider than 50: {l:?}\n{s}");
    }
    assert!(s.contains("gw-paris"), "{s}");
    eprintln!("50x12:\n{s}");
    tmux.quit_with("C-c");
}

#[test]
#[ignore = "needs root, tmux and the eBPF object: run cargo xtask test"]
fn top_without_pins_fails_before_the_terminal() {
    require_root();
    let bin = env_path("VPNLB_BIN");
    let dir = Path::new("/sys/fs/bpf/vpnlb-toptest-none");
    let o = Command::new(&bin)
        .args(["top", "--pin-dir", dir.to_str().unwrap()])
        .args(["--control-socket", "/nonexistent/control.sock"])
        .output()
        .expect("running vpnlb top");
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{out}{err}");
    assert!(
        err.contains("no vpnlb maps pinned at /sys/fs/bpf/vpnlb-toptest-none"),
        "stderr: {err}"
    );
    // Never entered the alternate screen.
    assert!(!out.contains("\x1b[?1049h"), "stdout: {out:?}");
}

#[test]
#[ignore = "needs root, tmux and the eBPF object: run cargo xtask test"]
fn top_shows_the_agents_health() {
    require_root();
    let bed = AgentBed::up("vpnlb-top1", 2, 1, |t, _| {
        format!(
            "{INTERFACE}{}{}{}",
            agent_backend(0, Some(t.gws[0].mac("eth0")), 1, &["tcp"]),
            agent_backend(1, Some(t.gws[1].mac("eth0")), 1, &["tcp"]),
            vip(&[("all", 100, &["gw1", "gw2"])])
        )
    });
    bed.agent
        .wait_all_up(&["gw1", "gw2"], Duration::from_secs(20));
    let tmux = Tmux::start(&bed.scratch.pin_dir, &bed.scratch.socket);
    tmux.wait_first_screen();
    let pid = format!("agent pid {}", bed.agent.pid());
    let s = tmux.wait_for("the agent's health", Duration::from_secs(5), |s| {
        s.contains(&pid) && field(s, "gw1", 2) == "up" && field(s, "gw2", 2) == "up"
    });
    assert!(!s.contains("agent not running"), "{s}");
    assert!(s.contains("wg "), "VIP name missing:\n{s}");
    assert_eq!(field(&s, "gw1", 1), "up", "map state:\n{s}");
    // Since when: the UTC time of the change and how long ago (e.g. `19:20:01 3s`).
    let since = field(&s, "gw1", 3);
    assert!(
        since.len() == 8 && since.as_bytes()[2] == b':' && since.as_bytes()[5] == b':',
        "since {since:?}:\n{s}"
    );
    assert!(field(&s, "gw1", 4).ends_with('s'), "{s}");

    // A drain shows in the health column and the map column.
    let r = bed.agent.request(Request::Drain {
        backend: "gw2".into(),
    });
    assert!(r.ok, "drain: {r:?}");
    let s = tmux.wait_for("gw2 draining", Duration::from_secs(5), |s| {
        field(s, "gw2", 1) == "drain" && field(s, "gw2", 2) == "draining"
    });
    eprintln!("with the agent, gw2 drained:\n{s}");
    tmux.quit_with("q");
}

#[test]
#[ignore = "needs root, tmux and the eBPF object: run cargo xtask test"]
fn top_restores_the_terminal_on_sigterm() {
    let bed = Bed::new();
    let tmux = Tmux::start(&bed.pins, &bed.socket);
    tmux.wait_drawn();
    let pid = tmux.top_pid();
    // SAFETY: kill(2) on the pid of the process this test started (the pane's only child).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    tmux.check_exit("SIGTERM");
}
