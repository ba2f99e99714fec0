//! The six drills. Each one brings up a fresh [`DrillBed`] (WireGuard, IPsec and OpenVPN on the
//! same three gateways), lets the tunnels settle, starts the [`Monitor`], injects its fault, waits
//! for the outcome (detection, then the moved clients' tunnels: WireGuard re-handshakes, IPsec DPD
//! and re-initiation, OpenVPN ping-restart and reconnection), and measures from the monitor's
//! samples, the hook events and the pings, per protocol where the protocols differ. Expectations
//! that fail become `problems` in the report (the drill exits non-zero).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;
use vpnlb_common::BACKEND_UP;

use super::bed::{
    DrillBed, GATEWAYS, INSIDE_CHECK, INSIDE_HOST, Protocol, WG_INTERVAL_MS, check_of, gw_name,
    ovpn_pid_file,
};
use super::monitor::{Monitor, Sample, first_after};
use super::report::{Event, Loss, ProbeCatch, ScenarioReport, TunnelRecovery, p50_max};
use super::{Progress, pause, poll};
use crate::wg::{PingLog, now_epoch};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    GatewayKill,
    GatewayLinkDown,
    GatewayBlackhole,
    GatewayFlap,
    GatewayInsideBroken,
    AgentKill,
    ConfigReload,
}

/// How long the moved clients get to re-handshake (WireGuard retries after ~15 s without replies;
/// IPsec's DPD gives up after ~4 s and OpenVPN's ping-restart after 5 s, then they reconnect).
const REHANDSHAKE_WAIT: Duration = Duration::from_secs(25);
/// How long the agent gets to take a failed gateway down.
const DETECT_WAIT: Duration = Duration::from_secs(5);
/// Flap: short blips (below fall x interval: must be absorbed), then long outages.
const BLIPS: usize = 3;
const BLIP: Duration = Duration::from_millis(150);
const OUTAGES: usize = 2;
const OUTAGE: Duration = Duration::from_millis(1500);
const OUTAGE_GAP: Duration = Duration::from_millis(2000);

impl Scenario {
    pub const ALL: [Scenario; 7] = [
        Scenario::GatewayKill,
        Scenario::GatewayLinkDown,
        Scenario::GatewayBlackhole,
        Scenario::GatewayFlap,
        Scenario::GatewayInsideBroken,
        Scenario::AgentKill,
        Scenario::ConfigReload,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::GatewayKill => "gateway-kill",
            Scenario::GatewayLinkDown => "gateway-link-down",
            Scenario::GatewayBlackhole => "gateway-blackhole",
            Scenario::GatewayFlap => "gateway-flap",
            Scenario::GatewayInsideBroken => "gateway-inside-broken",
            Scenario::AgentKill => "agent-kill",
            Scenario::ConfigReload => "config-reload",
        }
    }

    pub fn from_name(s: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|x| x.name() == s)
    }

    pub fn about(self) -> &'static str {
        match self {
            Scenario::GatewayKill => {
                "kill -9 of every VPN daemon on the busiest gateway (wireguard-go, charon, openvpn)"
            }
            Scenario::GatewayLinkDown => "the busiest gateway's link goes down",
            Scenario::GatewayBlackhole => {
                "the busiest gateway drops UDP 51820, 500, 4500 and 1194 (nft) but still answers pings"
            }
            Scenario::GatewayFlap => {
                "the busiest gateway's link blips 3 x 150 ms, then goes down 2 x 1.5 s"
            }
            Scenario::GatewayInsideBroken => {
                "the busiest gateway stops forwarding to the network behind it (its daemons and ICMP still answer)"
            }
            Scenario::AgentKill => "kill -9 of the agent, restart 2 s later",
            Scenario::ConfigReload => "reload under traffic with gw1's weight 1 -> 2",
        }
    }

    fn victim_fault(self) -> bool {
        !matches!(self, Scenario::AgentKill | Scenario::ConfigReload)
    }
}

/// Runs one scenario; failures (errors, panics of the test-support code) end up in the report's
/// `error` after the testbed is torn down.
pub fn run(s: Scenario, p: &Progress, out: &Path, fence: bool) -> ScenarioReport {
    let t0 = Instant::now();
    let mut r = ScenarioReport {
        name: s.name().into(),
        ..Default::default()
    };
    p.step(&format!("== {}: {}", s.name(), s.about()));
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drive(s, p, &mut r, out, fence)
    }));
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => r.error = Some(format!("{e:#}")),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            r.error = Some(msg);
        }
    }
    r.ok = r.error.is_none() && r.problems.is_empty();
    r.duration_s = t0.elapsed().as_secs_f64();
    p.step(&format!(
        "== {}: {} in {:.0} s",
        s.name(),
        if r.ok { "ok" } else { "NOT OK" },
        r.duration_s
    ));
    r
}

/// What the injection did: the fault time (epoch s), from when healthy flows' losses count, and
/// timeline marks.
struct Injected {
    t: f64,
    loss_from: f64,
    marks: Vec<(f64, String)>,
}

impl Injected {
    /// Milliseconds from the fault to epoch time `t`, to 0.1 ms.
    fn ms(&self, t: f64) -> f64 {
        ms_between(self.t, t)
    }
}

/// Milliseconds from epoch time `from` to `to`, to 0.1 ms (what the sampling can resolve, and more).
fn ms_between(from: f64, to: f64) -> f64 {
    ((to - from) * 1e4).round() / 10.0
}

fn drive(s: Scenario, p: &Progress, r: &mut ScenarioReport, out: &Path, fence: bool) -> Result<()> {
    let mut d = DrillBed::up(p, fence)?;
    p.step(&format!(
        "every client completed its handshake; clients per gateway: {}",
        d.share()
    ));
    // Tunnels settle and sessions exist before the baseline starts.
    pause(Duration::from_secs(2))?;
    let victim = s.victim_fault().then(|| d.busiest());
    let moved: Vec<usize> = victim.map(|v| d.clients_of(v)).unwrap_or_default();
    let stayed: Vec<usize> = (0..d.clients.len())
        .filter(|n| !moved.contains(n))
        .collect();
    r.clients = d.clients.len();
    let healthy: Vec<usize> = (0..GATEWAYS).filter(|&g| Some(g) != victim).collect();
    r.victim = victim.map(gw_name);
    r.clients_moved = moved.len();
    let mon = Monitor::start(d.bed.agent.pin_dir.clone(), d.ids.clone(), d.flow_keys())?;
    let t_mon = now_epoch();
    pause(Duration::from_secs(1))?;

    let inj = inject(s, &mut d, victim, r, p)?;
    if let Some((_, what)) = inj.marks.iter().find(|m| m.0 == inj.t) {
        p.step(&format!("fault: {what}"));
    }

    let mut back = Vec::new();
    if let Some(v) = victim {
        let name = gw_name(v);
        let down = poll(DETECT_WAIT, Duration::from_millis(20), || {
            down_event(&d.events(), &name, inj.t).cloned()
        })?;
        match &down {
            Some(e) => p.step(&format!(
                "agent took {name} down after {:.0} ms: {}",
                inj.ms(e["at_wall"].as_f64().unwrap_or(0.0)),
                e["reason"].as_str().unwrap_or("")
            )),
            None => p.step(&format!(
                "agent did NOT take {name} down within {DETECT_WAIT:?}"
            )),
        }
        if down.is_some() && matches!(s, Scenario::GatewayKill | Scenario::GatewayBlackhole) {
            r.caught_by_protocol = probes_down(&d, v, &inj)?;
        }
        if down.is_some() {
            p.step(&format!(
                "waiting for the {} clients of {name} ({}) to get their tunnels back",
                moved.len(),
                d.share_of(&moved)
            ));
            let wg_moved = d.of_protocol(Protocol::Wireguard, &moved);
            let t_wait = Instant::now();
            back = d.wait_rehandshake(&wg_moved, &healthy, inj.t, REHANDSHAKE_WAIT, p)?;
            wait_tunnels(
                &d,
                &moved,
                inj.t,
                REHANDSHAKE_WAIT.saturating_sub(t_wait.elapsed()),
            )?;
            // The recovered tunnels carry a few pings before the pings stop.
            pause(Duration::from_secs(1))?;
        }
        if s == Scenario::GatewayBlackhole {
            let list = d.bed.topo.gws[v].sh("nft list table inet vpnlb_drill");
            if let Some(n) = list
                .split_whitespace()
                .skip_while(|w| *w != "packets")
                .nth(1)
            {
                r.notes.push(format!(
                    "the nft rule on {name} dropped {n} packets to UDP {BLACKHOLE_PORTS} (client tunnels and the agent's protocol probes)"
                ));
            }
        }
    }
    let samples = mon.finish();
    let logs = d.stop_pings();
    let events = d.events();

    let mut timeline = timeline_of(&inj, &events, t_mon, r);
    if victim.is_some() && !fence {
        r.notes.push(
            "run with --no-fence: the victim's wireguard-go keeps its tunnels and its openvpn its clients; if they are alive and can send, wireguard-go's handshake initiations to its former clients (from ~15 s on) can keep them from re-handshaking on a healthy gateway, and openvpn's keepalive pings keep its former clients from reconnecting until it drops them itself (10 s)".into(),
        );
    }

    if let Some(v) = victim {
        let f = Failover {
            victim: v,
            moved: &moved,
            protocols: d.clients.iter().map(|c| c.0).collect(),
            healthy_ids: healthy.iter().map(|&g| d.ids[g]).collect(),
            back: &back,
            inj: &inj,
        };
        measure_failover(r, &f, &samples, &logs, &events, &mut timeline);
    }
    for pr in Protocol::ALL {
        let (lost, sent) = d
            .of_protocol(pr, &stayed)
            .iter()
            .map(|&n| logs[n].lost_after(inj.loss_from))
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1));
        r.healthy_flows_by_protocol.insert(
            pr.name().to_string(),
            Loss {
                lost: lost as u64,
                sent: sent as u64,
            },
        );
    }
    let lost: u64 = r.healthy_flows_by_protocol.values().map(|l| l.lost).sum();
    let sent: u64 = r.healthy_flows_by_protocol.values().map(|l| l.sent).sum();
    r.healthy_flows_lost_packets = lost;
    r.healthy_flows_sent_packets = sent;
    if lost > 0 {
        r.problems.push(format!(
            "clients of untouched gateways lost {lost} of {sent} pings"
        ));
    }
    if sent == 0 {
        r.problems
            .push("no ping of the untouched clients was answered after the fault".into());
    }
    if !d.endpoints_on_vip() {
        r.problems.push(
            "a WireGuard client's endpoint is no longer the VIP, or an OpenVPN client exchanged packets with another address (it roamed past the LB)".into(),
        );
    }
    match s {
        Scenario::GatewayKill | Scenario::GatewayBlackhole if victim.is_some() => {
            let mut caught = Vec::new();
            for pr in Protocol::ALL {
                match r.caught_by_protocol.get(pr.name()).and_then(|c| c.down_ms) {
                    Some(ms) => caught.push(format!(
                        "{} by {} (down in the agent's status {ms:.0} ms after the fault)",
                        pr.name(),
                        pr.check()
                    )),
                    None => r.problems.push(format!(
                        "the {} probe ({}) did not catch the fault of {} within {DETECT_WAIT:?}",
                        pr.name(),
                        pr.check(),
                        pr.daemon()
                    )),
                }
            }
            r.notes
                .push(format!("caught per protocol: {}", caught.join("; ")));
            if r.missed_by.iter().any(|c| c == "icmp") {
                r.notes.push(
                    "icmp kept passing: a ping check alone never catches a gateway whose VPN daemons are dead or whose tunnel ports are black-holed; each protocol's probe (through its own UDP port) does".into(),
                );
            }
        }
        Scenario::GatewayFlap => flap_expectations(r, &events, victim.context("victim")?, &inj),
        Scenario::GatewayInsideBroken if victim.is_some() => inside_expectations(r),
        Scenario::AgentKill | Scenario::ConfigReload => {
            steady_expectations(s, r, &samples, &inj, &events, &mut timeline)
        }
        _ => {}
    }
    timeline.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
    r.timeline = timeline;

    let file = format!("{}.svg", s.name());
    let names: Vec<String> = (0..GATEWAYS).map(gw_name).collect();
    super::plot::timeline(
        &out.join(&file),
        &format!("{}: {}", s.name(), s.about()),
        &names,
        &samples,
        inj.t,
        &r.timeline,
    )?;
    r.plot = Some(file);
    Ok(())
}

/// The ports the black-hole scenario drops: WireGuard, IKE, NAT-T (ESP-in-UDP), OpenVPN.
const BLACKHOLE_PORTS: &str = "{ 51820, 500, 4500, 1194 }";

/// Waits until every client in `moved` got a ping reply through its tunnel after its first loss
/// after `since` (epoch s), or `timeout`.
fn wait_tunnels(d: &DrillBed, moved: &[usize], since: f64, timeout: Duration) -> Result<()> {
    poll(timeout, Duration::from_millis(200), || {
        moved
            .iter()
            .all(|&n| recovered_at(&d.pingers[n].log(), since).is_some())
            .then_some(())
    })?;
    Ok(())
}

/// Per protocol: when (ms from the fault) the agent's status first shows that protocol's probe of
/// `victim` down, polled until all are or [`DETECT_WAIT`]. The hook event only tells which checks
/// had failed when the first one took the gateway down; the others follow a probe interval later.
fn probes_down(
    d: &DrillBed,
    victim: usize,
    inj: &Injected,
) -> Result<BTreeMap<String, ProbeCatch>> {
    let name = gw_name(victim);
    let mut at: Vec<Option<f64>> = vec![None; Protocol::ALL.len()];
    poll(DETECT_WAIT, Duration::from_millis(20), || {
        let st = d.bed.agent.status();
        let t = now_epoch();
        for (i, pr) in Protocol::ALL.iter().enumerate() {
            if at[i].is_none() && check_of(&st, &name, pr.check()).is_some_and(|c| c["up"] == false)
            {
                at[i] = Some(inj.ms(t));
            }
        }
        at.iter().all(Option::is_some).then_some(())
    })?;
    Ok(Protocol::ALL
        .iter()
        .zip(at)
        .map(|(pr, down_ms)| {
            (
                pr.name().to_string(),
                ProbeCatch {
                    check: pr.check().to_string(),
                    down_ms,
                },
            )
        })
        .collect())
}

/// Injects the scenario's fault (on `victim` for the gateway scenarios).
fn inject(
    s: Scenario,
    d: &mut DrillBed,
    victim: Option<usize>,
    r: &mut ScenarioReport,
    p: &Progress,
) -> Result<Injected> {
    Ok(match s {
        Scenario::GatewayKill => {
            let v = victim.context("victim")?;
            let (wg_pid, charon_pid) = (
                d.wg.gws[v].pid().unwrap_or(0),
                d.ipsec.gws[v].pid().unwrap_or(0),
            );
            let t = now_epoch();
            d.wg.kill_gateway(v);
            d.ipsec.gws[v].kill();
            let _ = std::fs::remove_file(ovpn_pid_file(&d.bed.scratch.dir, v));
            d.ovpn.kill_gateway(v);
            single(
                t,
                format!(
                    "{}: wireguard-go (pid {wg_pid}), charon (pid {charon_pid}) and openvpn killed with SIGKILL",
                    gw_name(v)
                ),
            )
        }
        Scenario::GatewayLinkDown => {
            let v = victim.context("victim")?;
            let t = now_epoch();
            d.bed.topo.cut(v);
            single(t, format!("{}'s link down (switch port)", gw_name(v)))
        }
        Scenario::GatewayBlackhole => {
            let v = victim.context("victim")?;
            let t = now_epoch();
            d.bed.topo.gws[v].sh(&format!(
                "nft 'add table inet vpnlb_drill; add chain inet vpnlb_drill input {{ type filter hook input priority 0; }}; add rule inet vpnlb_drill input udp dport {BLACKHOLE_PORTS} counter drop'"
            ));
            single(
                t,
                format!(
                    "{}: nft drops UDP {BLACKHOLE_PORTS} (ICMP still answered)",
                    gw_name(v)
                ),
            )
        }
        Scenario::GatewayFlap => flap(d, victim.context("victim")?, p)?,
        Scenario::GatewayInsideBroken => {
            let v = victim.context("victim")?;
            let t = now_epoch();
            d.bed.topo.gws[v].sh("sysctl -qw net.ipv4.ip_forward=0");
            single(
                t,
                format!(
                    "{}: forwarding off (net.ipv4.ip_forward=0): nothing reaches {INSIDE_HOST} through it",
                    gw_name(v)
                ),
            )
        }
        Scenario::AgentKill => agent_kill(d, r, p)?,
        Scenario::ConfigReload => config_reload(d, r, p)?,
    })
}

/// The timeline so far: the injection's marks, and the agent's state changes and the fence hook's
/// runs since `t_mon` (state changes also go to `r.transitions`).
fn timeline_of(inj: &Injected, events: &[Value], t_mon: f64, r: &mut ScenarioReport) -> Vec<Event> {
    let mut timeline: Vec<Event> = inj
        .marks
        .iter()
        .map(|(t, w)| Event {
            t_ms: inj.ms(*t),
            what: w.clone(),
        })
        .collect();
    for e in events
        .iter()
        .filter(|e| e["event"] == "backend_state" && e["at_wall"].as_f64() >= Some(t_mon))
    {
        let ev = Event {
            t_ms: inj.ms(e["at_wall"].as_f64().unwrap_or(0.0)),
            what: format!(
                "agent: {} {} -> {} ({})",
                e["backend"].as_str().unwrap_or("?"),
                e["from"].as_str().unwrap_or("?"),
                e["to"].as_str().unwrap_or("?"),
                e["reason"].as_str().unwrap_or("")
            ),
        };
        r.transitions.push(ev.clone());
        timeline.push(ev);
    }
    for e in events
        .iter()
        .filter(|e| e["event"] == "fenced" && e["at_wall"].as_f64() >= Some(t_mon))
    {
        timeline.push(Event {
            t_ms: inj.ms(e["at_wall"].as_f64().unwrap_or(0.0)),
            what: format!(
                "hook: {} fenced (wg setconf: its wireguard-go forgets every tunnel; SIGUSR1: its openvpn drops every client)",
                e["backend"].as_str().unwrap_or("?")
            ),
        });
    }
    timeline
}

fn single(t: f64, what: String) -> Injected {
    Injected {
        t,
        loss_from: t,
        marks: vec![(t, what)],
    }
}

/// The first `backend_state` event taking `name` down at or after epoch `t`.
fn down_event<'a>(events: &'a [Value], name: &str, t: f64) -> Option<&'a Value> {
    events.iter().find(|e| {
        e["event"] == "backend_state"
            && e["backend"] == name
            && e["to"] == "down"
            && e["at_wall"].as_f64().is_some_and(|a| a >= t)
    })
}

/// Receive time of the first reply after the tunnel's first loss at or after `t`: when the
/// client's tunnel works again (None: it lost nothing, or never recovered).
fn recovered_at(log: &PingLog, t: f64) -> Option<f64> {
    let got: BTreeSet<u32> = log.replies.iter().map(|r| r.0).collect();
    let before = log
        .replies
        .iter()
        .filter(|r| r.1 < t)
        .map(|r| r.0)
        .max()
        .unwrap_or(0);
    let last = *got.iter().next_back()?;
    let first_lost = (before + 1..=last).find(|s| !got.contains(s))?;
    log.replies
        .iter()
        .filter(|r| r.0 > first_lost)
        .map(|r| r.1)
        .min_by(f64::total_cmp)
}

/// A gateway fault: who failed, whose clients had to move, and where they landed.
struct Failover<'a> {
    victim: usize,
    moved: &'a [usize],
    /// The protocol of every client (index as in the pings and the samples).
    protocols: Vec<Protocol>,
    healthy_ids: Vec<u32>,
    back: &'a [Option<usize>],
    inj: &'a Injected,
}

/// Detection (hook event), map write and LB recovery (samples), tunnel recovery (pings).
fn measure_failover(
    r: &mut ScenarioReport,
    f: &Failover,
    samples: &[Sample],
    logs: &[PingLog],
    events: &[Value],
    timeline: &mut Vec<Event>,
) {
    let (v, moved, inj) = (f.victim, f.moved, f.inj);
    let name = gw_name(v);
    let mut mark = |t: f64, what: String| {
        timeline.push(Event {
            t_ms: inj.ms(t),
            what,
        })
    };
    if let Some(e) = down_event(events, &name, inj.t) {
        r.detect_ms = e["at_wall"].as_f64().map(|t| inj.ms(t));
        for c in e["checks"].as_array().into_iter().flatten() {
            let label = c["label"].as_str().unwrap_or("?").to_string();
            match c["last_ok"].as_bool() {
                Some(false) => r.caught_by.push(label),
                Some(true) => r.missed_by.push(label),
                None => {}
            }
        }
    } else {
        r.problems.push(format!(
            "the agent did not take {name} down within {DETECT_WAIT:?}"
        ));
        r.notes.push(
            "map write, LB recovery and tunnel recovery are null: nothing was detected".into(),
        );
        return;
    }
    match first_after(samples, inj.t, |s| s.states[v] != BACKEND_UP) {
        Some(s) => {
            r.map_write_ms = Some(inj.ms(s.t));
            mark(s.t, format!("maps: {name} no longer up in BACKENDS"));
        }
        None => r
            .problems
            .push(format!("{name} stayed up in the pinned BACKENDS map")),
    }
    let healthy_ids = &f.healthy_ids;
    // The sessions the LB had for the moved clients just before the fault (an IPsec client's
    // NAT-T flow is keyed as its NAT keeps it; one that is not found is left out and noted).
    let tracked: Vec<usize> = samples
        .iter()
        .rev()
        .find(|s| s.t < inj.t)
        .map(|s| {
            moved
                .iter()
                .copied()
                .filter(|&n| s.sessions[n].is_some())
                .collect()
        })
        .unwrap_or_default();
    if tracked.len() < moved.len() {
        r.notes.push(format!(
            "LB recovery covers {} of the {} moved clients' sessions (the others had no session under the key the drill looks up)",
            tracked.len(),
            moved.len()
        ));
    }
    match first_after(samples, inj.t, |s| {
        tracked
            .iter()
            .all(|&n| s.sessions[n].is_some_and(|id| healthy_ids.contains(&id)))
    }) {
        Some(s) => {
            r.lb_recovery_ms = Some(inj.ms(s.t));
            mark(
                s.t,
                format!(
                    "maps: every session of {name}'s {} clients points to a healthy gateway",
                    moved.len()
                ),
            );
        }
        None => r.problems.push(format!(
            "sessions of {name}'s clients were not all re-picked onto healthy gateways"
        )),
    }
    let mut recovery = BTreeMap::new();
    for pr in Protocol::ALL {
        let of: Vec<usize> = moved
            .iter()
            .copied()
            .filter(|&n| f.protocols[n] == pr)
            .collect();
        let rec: Vec<f64> = of
            .iter()
            .filter_map(|&n| recovered_at(&logs[n], inj.t).map(|t| inj.ms(t)))
            .filter(|&ms| ms > 0.0)
            .collect();
        let (p50, max) = p50_max(&rec);
        if let Some(first) = rec.iter().copied().min_by(f64::total_cmp) {
            timeline.push(Event {
                t_ms: first,
                what: format!("first moved {} tunnel answers pings again", pr.name()),
            });
        }
        if let Some(m) = max {
            timeline.push(Event {
                t_ms: m,
                what: format!(
                    "last of {} moved {} tunnels answers again",
                    rec.len(),
                    pr.name()
                ),
            });
        }
        if rec.len() < of.len() {
            r.problems.push(format!(
                "{} of {} moved {} clients got no ping reply through their tunnel again within {REHANDSHAKE_WAIT:?}",
                of.len() - rec.len(),
                of.len(),
                pr.name()
            ));
        }
        if of.is_empty() {
            r.notes.push(format!(
                "no {} client was on {name}: nothing to measure for it",
                pr.name()
            ));
        }
        recovery.insert(
            pr.name().to_string(),
            TunnelRecovery {
                p50,
                max,
                clients: of.len(),
                recovered: rec.len(),
            },
        );
    }
    let landed: BTreeMap<String, usize> =
        f.back.iter().flatten().fold(BTreeMap::new(), |mut m, g| {
            *m.entry(gw_name(*g)).or_default() += 1;
            m
        });
    r.notes.push(format!(
        "{} clients moved off {name}; the WireGuard ones re-handshaken on {landed:?}. Tunnel recovery is bounded by each protocol's own timers, whatever the LB does: a WireGuard client re-handshakes only after ~15 s without replies, an IPsec client's DPD (every 1 s, 3 retransmissions) declares the gateway dead after ~4 s and re-initiates, an OpenVPN client reconnects after ping-restart (5 s)",
        moved.len()
    ));
    r.tunnel_recovery_ms = Some(recovery);
}

/// Short blips, then long outages of the victim's link. The fault time is the first long outage.
fn flap(d: &DrillBed, v: usize, p: &Progress) -> Result<Injected> {
    let name = gw_name(v);
    let mut marks = Vec::new();
    let loss_from = now_epoch();
    for i in 0..BLIPS {
        let t = now_epoch();
        d.bed.topo.cut(v);
        pause(BLIP)?;
        d.bed.topo.mend(v);
        marks.push((
            t,
            format!("{name} link blip {} ({} ms)", i + 1, BLIP.as_millis()),
        ));
        pause(Duration::from_millis(1000) - BLIP)?;
    }
    p.step(&format!(
        "{BLIPS} blips of {} ms done (fall 2 x {WG_INTERVAL_MS} ms: they should be absorbed)",
        BLIP.as_millis()
    ));
    let t = now_epoch();
    for i in 0..OUTAGES {
        let down = now_epoch();
        d.bed.topo.cut(v);
        marks.push((down, format!("{name} link down (outage {})", i + 1)));
        pause(OUTAGE)?;
        d.bed.topo.mend(v);
        marks.push((now_epoch(), format!("{name} link up")));
        pause(OUTAGE_GAP)?;
    }
    Ok(Injected {
        t,
        loss_from,
        marks,
    })
}

fn flap_expectations(r: &mut ScenarioReport, events: &[Value], v: usize, inj: &Injected) {
    let name = gw_name(v);
    let changes = |b: &str, from: f64, to: f64| -> Vec<String> {
        events
            .iter()
            .filter(|e| {
                e["event"] == "backend_state"
                    && e["backend"] == b
                    && e["at_wall"].as_f64().is_some_and(|a| a >= from && a < to)
            })
            .map(|e| e["to"].as_str().unwrap_or("?").to_string())
            .collect()
    };
    let during_blips = changes(&name, inj.loss_from, inj.t);
    if during_blips.is_empty() {
        r.notes.push(format!(
            "{BLIPS} link blips of {} ms caused no state change (fall 2: damping works)",
            BLIP.as_millis()
        ));
    } else {
        r.problems.push(format!(
            "the blips were not absorbed: {name} went {during_blips:?}"
        ));
    }
    let after = changes(&name, inj.t, f64::INFINITY);
    let want: Vec<String> = ["down", "up"]
        .iter()
        .cycle()
        .take(2 * OUTAGES)
        .map(|s| s.to_string())
        .collect();
    if after == want {
        r.notes.push(format!(
            "{OUTAGES} outages of {} ms: {name} went {} (one change per edge, rise 2 / fall 2)",
            OUTAGE.as_millis(),
            after.join(" -> ")
        ));
    } else {
        r.problems.push(format!(
            "{OUTAGES} outages should give {want:?}, the agent reported {after:?}"
        ));
    }
    for g in (0..GATEWAYS).filter(|&g| g != v) {
        let other = changes(&gw_name(g), inj.loss_from, f64::INFINITY);
        if !other.is_empty() {
            r.problems.push(format!(
                "{} (not flapping) changed state: {other:?}",
                gw_name(g)
            ));
        }
    }
    r.notes.push(
        "detect/map write/LB recovery are measured from the first long outage; tunnel recovery of the flapping gateway's clients too (they stay on the healthy gateway they moved to when it comes back)".into(),
    );
}

/// A gateway whose path to the inside network is broken: only the end-to-end probe may catch it;
/// every other check (icmp, the protocols' own probes) must still pass when it goes down.
fn inside_expectations(r: &mut ScenarioReport) {
    if r.caught_by.iter().any(|c| c == INSIDE_CHECK) {
        r.notes.push(format!(
            "caught by {INSIDE_CHECK} (a ping to {INSIDE_HOST} through a WireGuard tunnel) only; \
             still passing: {}",
            r.missed_by.join(", ")
        ));
    } else {
        r.problems.push(format!(
            "the end-to-end probe {INSIDE_CHECK} did not catch it (caught by {:?})",
            r.caught_by
        ));
    }
    let others: Vec<&String> = r.caught_by.iter().filter(|c| *c != INSIDE_CHECK).collect();
    if !others.is_empty() {
        r.problems.push(format!(
            "checks that cannot see the inside network failed too: {others:?}"
        ));
    }
    for pr in Protocol::ALL {
        if !r.missed_by.iter().any(|c| c == pr.check()) {
            r.problems.push(format!(
                "{} should have kept passing (the daemon answers)",
                pr.check()
            ));
        }
    }
}

/// kill -9 of the agent: the data plane forwards from the pinned maps alone; the restarted agent
/// adopts them.
fn agent_kill(d: &mut DrillBed, r: &mut ScenarioReport, p: &Progress) -> Result<Injected> {
    let pid = d.bed.agent.pid();
    let t = now_epoch();
    d.bed.agent.kill9();
    let mut marks = vec![(t, format!("agent (pid {pid}) killed with SIGKILL"))];
    p.step("agent killed; the data plane runs on from the pinned maps for 2 s");
    pause(Duration::from_secs(2))?;
    let t_start = now_epoch();
    d.bed.agent.restart();
    let startup = d.bed.agent.startup.last().copied().unwrap_or_default();
    marks.push((t_start, "agent restarted".into()));
    marks.push((
        t_start + startup.as_secs_f64(),
        format!(
            "restarted agent (pid {}) answers on its control socket",
            d.bed.agent.pid()
        ),
    ));
    p.step(&format!(
        "agent restarted: control socket answering after {:.0} ms",
        startup.as_secs_f64() * 1e3
    ));
    let st = d.bed.agent.status();
    let states: Vec<String> = (0..GATEWAYS)
        .map(|g| {
            crate::agent::backend_in(&st, &gw_name(g))
                .and_then(|b| b["state"].as_str())
                .unwrap_or("?")
                .to_string()
        })
        .collect();
    if states.iter().all(|s| s == "up") {
        r.notes.push(format!(
            "the restarted agent adopted every gateway as up at once (no check round needed); control socket up {:.0} ms after the restart",
            startup.as_secs_f64() * 1e3
        ));
    } else {
        r.problems.push(format!(
            "after the restart the agent reports {states:?}, not every gateway up"
        ));
    }
    pause(Duration::from_secs(2))?;
    r.notes.push(
        "detect, map write, LB and tunnel recovery are null: no gateway failed and no flow has to move; the expectation is that nothing in the maps changes and no ping is lost".into(),
    );
    Ok(Injected {
        t,
        loss_from: t,
        marks,
    })
}

/// A reload with a changed weight: the ring changes for new flows, existing sessions stay.
fn config_reload(d: &mut DrillBed, r: &mut ScenarioReport, p: &Progress) -> Result<Injected> {
    d.weights[0] = 2;
    let t = now_epoch();
    d.reload()?;
    let applied = poll(Duration::from_secs(5), Duration::from_millis(5), || {
        crate::agent::backend_in(&d.bed.agent.status(), "gw1")
            .and_then(|b| b["weight"].as_u64())
            .filter(|&w| w == 2)
            .map(|_| now_epoch())
    })?;
    let mut marks = vec![(t, "reload requested: gw1 weight 1 -> 2".to_string())];
    match applied {
        Some(a) => {
            r.detect_ms = Some(ms_between(t, a));
            marks.push((a, "agent status shows gw1 weight 2".into()));
            p.step(&format!("reload applied after {:.0} ms", ms_between(t, a)));
        }
        None => r
            .problems
            .push("the agent never reported gw1's new weight".into()),
    }
    pause(Duration::from_secs(2))?;
    r.notes.push(
        "detect_ms here is the time until the agent reports the new config; map_write_ms until the Maglev ring changed in the maps; LB and tunnel recovery are null: a weight change moves no existing session, only new flows follow the new ring".into(),
    );
    Ok(Injected {
        t,
        loss_from: t,
        marks,
    })
}

/// Agent kill / reload: no session moves, no backend changes state; the ring changes only on the
/// reload.
fn steady_expectations(
    s: Scenario,
    r: &mut ScenarioReport,
    samples: &[Sample],
    inj: &Injected,
    events: &[Value],
    timeline: &mut Vec<Event>,
) {
    let Some(base) = samples.iter().rev().find(|x| x.t < inj.t) else {
        r.problems.push("no map sample before the fault".into());
        return;
    };
    let after: Vec<&Sample> = samples.iter().filter(|x| x.t >= inj.t).collect();
    if after.iter().any(|x| x.sessions != base.sessions) {
        r.problems
            .push("a client's session changed backend (or vanished) in the maps".into());
    } else {
        r.notes.push(format!(
            "every one of the {} client sessions in the pinned SESSIONS map kept its gateway ({} samples)",
            base.sessions.iter().flatten().count(),
            after.len()
        ));
    }
    if after.iter().any(|x| x.states != base.states) {
        r.problems
            .push("a gateway's state changed in the pinned BACKENDS map".into());
    }
    let down = events.iter().any(|e| {
        e["event"] == "backend_state"
            && e["to"] != "up"
            && e["at_wall"].as_f64().is_some_and(|a| a >= inj.t)
    });
    if down {
        r.problems
            .push("the agent reported a gateway leaving the up state".into());
    }
    let ring_change = after.iter().find(|x| x.ring != base.ring);
    match (s, ring_change) {
        (Scenario::ConfigReload, Some(x)) => {
            r.map_write_ms = Some(inj.ms(x.t));
            timeline.push(Event {
                t_ms: inj.ms(x.t),
                what: "maps: the Maglev ring changed".into(),
            });
        }
        (Scenario::ConfigReload, None) => r
            .problems
            .push("the Maglev ring did not change after the weight change".into()),
        (_, Some(_)) => r
            .problems
            .push("the Maglev ring changed across the agent restart".into()),
        (_, None) => r
            .notes
            .push("the Maglev ring in the maps never changed".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(replies: &[(u32, f64)]) -> PingLog {
        PingLog {
            replies: replies.to_vec(),
        }
    }

    #[test]
    fn recovery_is_the_first_reply_after_the_first_loss() {
        // Replies 1..=3 before the fault at t=10.0, 4..=6 lost, 7 answered at 25.0.
        let l = log(&[(1, 9.7), (2, 9.8), (3, 9.9), (7, 25.0), (8, 25.1)]);
        assert_eq!(recovered_at(&l, 10.0), Some(25.0));
        // A reply still in flight at the fault does not count as recovered.
        let l = log(&[(1, 9.9), (2, 10.05), (5, 26.0)]);
        assert_eq!(recovered_at(&l, 10.0), Some(26.0));
        // Nothing lost: no recovery to report; nothing answered after the loss: not recovered.
        assert_eq!(recovered_at(&log(&[(1, 9.9), (2, 10.1)]), 10.0), None);
        assert_eq!(recovered_at(&log(&[(1, 9.9)]), 10.0), None);
    }

    #[test]
    fn percentiles_of_recovery_times() {
        assert_eq!(p50_max(&[]), (None, None));
        assert_eq!(p50_max(&[3.0, 1.0, 2.0]), (Some(2.0), Some(3.0)));
        assert_eq!(p50_max(&[4.0, 1.0]), (Some(1.0), Some(4.0)));
    }

    #[test]
    fn scenario_names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::from_name(s.name()), Some(s));
        }
        assert_eq!(Scenario::from_name("blackhole"), None);
    }
}
