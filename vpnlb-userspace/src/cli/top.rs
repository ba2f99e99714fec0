//! `vpnlb top`: a live terminal view of the data plane, read-only.
//!
//! Every `interval` (1 s) it reads the pinned maps through [`Source`] and shows, per VIP and per
//! backend, packets/s and bytes/s (deltas of the per-CPU counters, summed over CPUs, divided by the
//! time between the two reads), each backend's map state and — when the agent answers on its
//! control socket — its health state and since when, and the forwarded/passed/dropped packets per
//! second with the top reasons. The session count needs a walk of the whole `SESSIONS` LRU, so a
//! background thread recounts it at most every 5 s (the screen says how old the count is).
//!
//! Laid out for 80x24 (an SSH session); smaller terminals lose the reasons, then rows; below
//! 20x3 only a "too small" line is drawn. `q`, `Esc` or Ctrl-C quits, and so do SIGTERM, SIGHUP and
//! SIGINT; the terminal (raw mode, alternate screen, cursor) is restored on exit, on error and on
//! panic.
//!
//! The rendering is pure: [`read_raw`] is the only map access per refresh, [`build_snapshot`]
//! turns two readings (plus names, the agent's answer and the session count) into a [`Snapshot`],
//! and [`render`] draws a snapshot into any ratatui frame (unit-tested on `TestBackend`).

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Paragraph, Row, Table};
use vpnlb_common::counters::INGRESS_OUTCOMES;
use vpnlb_common::{
    BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP, Backend, COUNTER_NAMES, PktBytes,
    VipKey,
};

use super::source::{Names, Source, SourceOptions};
use crate::agent::control::ControlError;
use crate::dataplane::maps::{MapError, MapReader};

/// How often the session LRU is walked, at most.
pub const SESSIONS_EVERY: Duration = Duration::from_secs(5);
/// How many pass and drop reasons are shown.
const TOP_REASONS: usize = 3;

/// What `vpnlb top` reads and how often it refreshes.
#[derive(Clone, Debug)]
pub struct TopOptions {
    pub source: SourceOptions,
    /// Refresh period (default 1 s).
    pub interval: Duration,
}

impl Default for TopOptions {
    fn default() -> Self {
        TopOptions {
            source: SourceOptions::default(),
            interval: Duration::from_secs(1),
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Snapshot: everything one screen shows, already computed.

/// Packets and bytes per second over the last refresh.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rate {
    pub pps: f64,
    pub bps: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VipRow {
    pub id: u32,
    pub name: String,
    /// `10.0.0.1:500/udp` (`+N` when several keys share the id).
    pub address: String,
    /// `None` on the first reading or after a counter reset.
    pub rate: Option<Rate>,
    pub packets: u64,
}

/// A backend's health as the agent reports it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Health {
    /// `up`, `down`, `unknown`, `draining`, `disabled`.
    pub state: String,
    /// Unix time of the last state change.
    pub since_unix: Option<f64>,
    /// Seconds since the last state change (the agent's clock).
    pub for_s: Option<f64>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BackendRow {
    pub id: u32,
    pub name: String,
    /// The data-plane state in `BACKENDS` (`up`, `drain`, `down`; `-` when not in the map).
    pub map_state: &'static str,
    /// `None` when the agent does not answer or does not know this id.
    pub health: Option<Health>,
    pub rate: Option<Rate>,
    pub packets: u64,
}

/// What the agent's control socket said.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentView {
    /// No answer yet (first refresh).
    Pending,
    Running {
        pid: Option<u64>,
    },
    NotRunning,
    Error(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum SessionsView {
    /// The first walk has not finished.
    Counting,
    Counted {
        count: usize,
        /// How old the count is.
        age: Duration,
    },
    Error(String),
}

/// Outcomes of the ingress program per second (all `None` on the first reading).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcomes {
    pub fwd: Option<f64>,
    pub pass: Option<f64>,
    pub drop: Option<f64>,
    /// Non-zero pass reasons, highest rate first (counter name without `pass_`).
    pub top_pass: Vec<(&'static str, f64)>,
    pub top_drop: Vec<(&'static str, f64)>,
}

/// One screen.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub pin_dir: String,
    pub interval: Duration,
    pub agent: AgentView,
    pub vips: Vec<VipRow>,
    pub backends: Vec<BackendRow>,
    pub outcomes: Outcomes,
    pub sessions: SessionsView,
    /// A failed map read (the last good values stay on screen).
    pub error: Option<String>,
}

// ------------------------------------------------------------------------------------------------
// Raw readings and rates.

/// One reading of the counters.
#[derive(Clone, Debug)]
pub struct Raw {
    pub at: Instant,
    pub counters: Vec<u64>,
    /// vip_id -> (its keys, stats).
    pub vips: BTreeMap<u32, (Vec<VipKey>, PktBytes)>,
    /// backend id -> (map entry, stats).
    pub backends: BTreeMap<u32, (Backend, PktBytes)>,
}

/// Reads every counter `top` shows (one syscall per map entry; no session walk).
pub fn read_raw(maps: &impl MapReader) -> Result<Raw, MapError> {
    let counters = maps.counters()?;
    let mut vips: BTreeMap<u32, (Vec<VipKey>, PktBytes)> = BTreeMap::new();
    for (key, meta) in maps.vips()? {
        vips.entry(meta.vip_id)
            .or_insert_with(|| (Vec::new(), PktBytes::default()))
            .0
            .push(key);
    }
    for (id, (_, stats)) in vips.iter_mut() {
        *stats = maps.vip_stats(*id)?;
    }
    let mut backends = BTreeMap::new();
    for (id, b) in maps.backends()? {
        backends.insert(id, (b, maps.backend_stats(id)?));
    }
    Ok(Raw {
        at: Instant::now(),
        counters,
        vips,
        backends,
    })
}

fn rate(prev: Option<(&PktBytes, f64)>, cur: &PktBytes) -> Option<Rate> {
    let (p, dt) = prev?;
    if dt <= 0.0 {
        return None;
    }
    Some(Rate {
        pps: cur.packets.checked_sub(p.packets)? as f64 / dt,
        bps: cur.bytes.checked_sub(p.bytes)? as f64 / dt,
    })
}

fn map_state(state: u32) -> &'static str {
    match state {
        BACKEND_UP => "up",
        BACKEND_DRAINING => "drain",
        BACKEND_DOWN => "down",
        BACKEND_UNUSED => "-",
        _ => "?",
    }
}

/// The agent's `status` result, reduced to what `top` shows: its pid and the health by backend id.
pub fn parse_status(v: &serde_json::Value) -> (Option<u64>, BTreeMap<u32, (String, Health)>) {
    let pid = v.pointer("/agent/pid").and_then(|p| p.as_u64());
    let mut by_id = BTreeMap::new();
    for b in v
        .get("backends")
        .and_then(|b| b.as_array())
        .into_iter()
        .flatten()
    {
        let Some(id) = b.get("id").and_then(|i| i.as_u64()) else {
            continue;
        };
        let name = b.get("name").and_then(|n| n.as_str()).unwrap_or_default();
        by_id.insert(
            id as u32,
            (
                name.to_string(),
                Health {
                    state: b
                        .get("state")
                        .and_then(|s| s.as_str())
                        .unwrap_or("?")
                        .to_string(),
                    since_unix: b.get("since").and_then(|s| s.as_f64()),
                    for_s: b.get("since_s").and_then(|s| s.as_f64()),
                },
            ),
        );
    }
    (pid, by_id)
}

/// The agent's latest answer as [`build_snapshot`] takes it.
#[derive(Clone, Debug)]
pub enum AgentAnswer {
    Pending,
    Status(serde_json::Value),
    NotRunning,
    Error(String),
}

impl From<Result<serde_json::Value, ControlError>> for AgentAnswer {
    fn from(r: Result<serde_json::Value, ControlError>) -> Self {
        match r {
            Ok(v) => AgentAnswer::Status(v),
            Err(ControlError::NotRunning { .. }) => AgentAnswer::NotRunning,
            Err(e) => AgentAnswer::Error(super_chain(&e)),
        }
    }
}

fn super_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Pure: the screen for reading `cur` after `prev`.
pub fn build_snapshot(
    prev: Option<&Raw>,
    cur: &Raw,
    names: &Names,
    agent: &AgentAnswer,
    sessions: SessionsView,
    opts: &TopOptions,
) -> Snapshot {
    let dt = prev.map(|p| cur.at.saturating_duration_since(p.at).as_secs_f64());
    let vips = cur
        .vips
        .iter()
        .map(|(id, (keys, stats))| {
            let mut address = keys
                .first()
                .map(crate::dataplane::vip_label)
                .unwrap_or_default();
            if keys.len() > 1 {
                address.push_str(&format!(" +{}", keys.len() - 1));
            }
            let p = prev
                .zip(dt)
                .and_then(|(p, dt)| p.vips.get(id).map(|(_, s)| (s, dt)));
            VipRow {
                id: *id,
                name: names.vip(*id),
                address,
                rate: rate(p, stats),
                packets: stats.packets,
            }
        })
        .collect();

    let (agent_view, health) = match agent {
        AgentAnswer::Pending => (AgentView::Pending, BTreeMap::new()),
        AgentAnswer::NotRunning => (AgentView::NotRunning, BTreeMap::new()),
        AgentAnswer::Error(e) => (AgentView::Error(e.clone()), BTreeMap::new()),
        AgentAnswer::Status(v) => {
            let (pid, h) = parse_status(v);
            (AgentView::Running { pid }, h)
        }
    };
    let mut backends: Vec<BackendRow> = cur
        .backends
        .iter()
        .map(|(id, (b, stats))| {
            let p = prev
                .zip(dt)
                .and_then(|(p, dt)| p.backends.get(id).map(|(_, s)| (s, dt)));
            BackendRow {
                id: *id,
                name: names.backend(*id),
                map_state: map_state(b.state),
                health: health.get(id).map(|(_, h)| h.clone()),
                rate: rate(p, stats),
                packets: stats.packets,
            }
        })
        .collect();
    // Backends the agent knows but has not written (never up): shown with their health.
    for (id, (name, h)) in &health {
        if !cur.backends.contains_key(id) {
            backends.push(BackendRow {
                id: *id,
                name: if name.is_empty() {
                    names.backend(*id)
                } else {
                    name.clone()
                },
                map_state: "-",
                health: Some(h.clone()),
                rate: None,
                packets: 0,
            });
        }
    }
    backends.sort_by_key(|b| b.id);

    let outcomes = match (prev, dt) {
        (Some(p), Some(dt)) if dt > 0.0 && p.counters.len() == cur.counters.len() => {
            let per_s = |id: u32| -> f64 {
                let i = id as usize;
                cur.counters
                    .get(i)
                    .zip(p.counters.get(i))
                    .and_then(|(c, p)| c.checked_sub(*p))
                    .unwrap_or(0) as f64
                    / dt
            };
            // Outcome ids by kind: appended outcomes (e.g. pass_icmp_bad_quote) sit after the
            // event counters, so go by name over INGRESS_OUTCOMES, not by id range.
            let ids = |prefix: &'static str| {
                INGRESS_OUTCOMES
                    .into_iter()
                    .filter(move |&id| COUNTER_NAMES[id as usize].starts_with(prefix))
            };
            let sum = |prefix: &'static str| ids(prefix).map(per_s).sum::<f64>();
            let top = |prefix: &'static str| {
                let mut v: Vec<(&'static str, f64)> = ids(prefix)
                    .map(|id| {
                        let n = COUNTER_NAMES[id as usize];
                        (n.strip_prefix(prefix).unwrap_or(n), per_s(id))
                    })
                    .filter(|(_, r)| *r > 0.0)
                    .collect();
                v.sort_by(|a, b| b.1.total_cmp(&a.1));
                v.truncate(TOP_REASONS);
                v
            };
            Outcomes {
                fwd: Some(sum("fwd_")),
                pass: Some(sum("pass_")),
                drop: Some(sum("drop_")),
                top_pass: top("pass_"),
                top_drop: top("drop_"),
            }
        }
        _ => Outcomes::default(),
    };

    Snapshot {
        pin_dir: opts.source.pin_dir.display().to_string(),
        interval: opts.interval,
        agent: agent_view,
        vips,
        backends,
        outcomes,
        sessions,
        error: None,
    }
}

// ------------------------------------------------------------------------------------------------
// Rendering (pure).

/// `1234` -> `1.2k`; rates keep one decimal below 10.
pub fn human(v: f64) -> String {
    let (v, unit) = if v >= 1e9 {
        (v / 1e9, "G")
    } else if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    };
    if unit.is_empty() && v.fract() == 0.0 {
        format!("{v:.0}")
    } else if v < 10.0 {
        format!("{v:.1}{unit}")
    } else {
        format!("{v:.0}{unit}")
    }
}

/// `3m12s`, `2h05m`, `4d03h`.
pub fn age(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// `HH:MM:SS` (UTC) of a unix time.
fn clock(unix: f64) -> String {
    let s = unix.max(0.0) as u64 % 86400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

fn rate_cells(r: Option<Rate>) -> (String, String) {
    match r {
        Some(r) => (human(r.pps), human(r.bps)),
        None => ("-".into(), "-".into()),
    }
}

fn state_style(s: &str) -> Style {
    match s {
        "up" => Style::new().fg(Color::Green),
        "down" | "disabled" => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        "drain" | "draining" | "unknown" => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    }
}

fn agent_text(a: &AgentView) -> String {
    match a {
        AgentView::Pending => "agent: asking…".into(),
        AgentView::Running { pid: Some(p) } => format!("agent pid {p}"),
        AgentView::Running { pid: None } => "agent running".into(),
        AgentView::NotRunning => "agent not running".into(),
        AgentView::Error(e) => format!("agent error: {e}"),
    }
}

fn header_line(s: &Snapshot) -> Line<'static> {
    let agent_style = match s.agent {
        AgentView::Running { .. } => Style::new(),
        _ => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
    };
    Line::from(vec![
        Span::styled("vpnlb top", Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!(" {:.1}s │ ", s.interval.as_secs_f64())),
        Span::styled(agent_text(&s.agent), agent_style),
        Span::raw(" │ q quit │ "),
        Span::raw(s.pin_dir.clone()),
    ])
}

fn summary_line(s: &Snapshot) -> Line<'static> {
    let o = &s.outcomes;
    let f = |v: Option<f64>| v.map_or("-".to_string(), human);
    let mut spans = vec![
        Span::raw("fwd "),
        Span::styled(f(o.fwd), Style::new().fg(Color::Green)),
        Span::raw("/s  pass "),
        Span::raw(f(o.pass)),
        Span::raw("/s  drop "),
        Span::styled(
            f(o.drop),
            if o.drop.unwrap_or(0.0) > 0.0 {
                Style::new().fg(Color::Red)
            } else {
                Style::new()
            },
        ),
        Span::raw("/s │ "),
    ];
    let sessions = match &s.sessions {
        SessionsView::Counting => "sessions: counting… (every 5s)".to_string(),
        SessionsView::Counted { count, age: a } => format!(
            "sessions {count} (counted every {}s, {} ago)",
            SESSIONS_EVERY.as_secs(),
            age(a.as_secs_f64())
        ),
        SessionsView::Error(e) => format!("sessions: {e}"),
    };
    spans.push(Span::raw(sessions));
    Line::from(spans)
}

fn reasons_line(label: &'static str, v: &[(&'static str, f64)], style: Style) -> Line<'static> {
    let mut spans = vec![Span::styled(format!("{label:<5}"), style)];
    if v.is_empty() {
        spans.push(Span::raw("-"));
    }
    for (i, (n, r)) in v.iter().enumerate() {
        if i > 0 {
            spans.push(Span::raw("  "));
        }
        spans.push(Span::raw(format!("{n} {}/s", human(*r))));
    }
    Line::from(spans)
}

fn section(title: String) -> Block<'static> {
    Block::new().borders(Borders::TOP).title(Span::styled(
        title,
        Style::new().add_modifier(Modifier::BOLD),
    ))
}

/// "N" or "N, showing M" when only `fit` of `n` rows fit.
fn count_title(what: &str, n: usize, fit: usize) -> String {
    if n > fit {
        format!(" {what} ({n}, showing {fit}) ")
    } else {
        format!(" {what} ({n}) ")
    }
}

/// Draws `s` into the whole frame (laid out for 80x24).
pub fn render(frame: &mut Frame, s: &Snapshot) {
    let area = frame.area();
    if area.width < 20 || area.height < 3 {
        frame.render_widget(Paragraph::new("too small"), area);
        return;
    }
    let show_reasons = area.height >= 14;
    let reasons_h = if show_reasons { 3 } else { 0 };
    let error_h = u16::from(s.error.is_some());
    // VIPs get what they need when everything fits, else at least a third of the rows (or what
    // the backends leave); backends get the rest.
    let body = area.height.saturating_sub(2 + reasons_h + error_h);
    let vip_need = (s.vips.len() as u16).saturating_add(2);
    let backend_need = (s.backends.len() as u16).saturating_add(2);
    let vip_cap = (body / 3).max(body.saturating_sub(backend_need)).max(3);
    let vip_h = vip_need.clamp(3, vip_cap).min(body);
    let [top, summary, err, vips_a, backends_a, reasons_a] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(error_h),
        Constraint::Length(vip_h),
        Constraint::Min(0),
        Constraint::Length(reasons_h),
    ])
    .areas(area);

    frame.render_widget(
        Paragraph::new(header_line(s)).style(Style::new().add_modifier(Modifier::REVERSED)),
        top,
    );
    frame.render_widget(Paragraph::new(summary_line(s)), summary);
    if let Some(e) = &s.error {
        frame.render_widget(
            Paragraph::new(format!("map read failed: {e}"))
                .style(Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
            err,
        );
    }
    render_vips(frame, vips_a, s);
    render_backends(frame, backends_a, s);
    if show_reasons {
        let o = &s.outcomes;
        let p = Paragraph::new(vec![
            reasons_line("pass", &o.top_pass, Style::new().fg(Color::Cyan)),
            reasons_line("drop", &o.top_drop, Style::new().fg(Color::Red)),
        ])
        .block(section(" Top reasons (packets/s) ".into()));
        frame.render_widget(p, reasons_a);
    }
}

fn header_style() -> Style {
    Style::new().add_modifier(Modifier::UNDERLINED)
}

/// A table whose columns are dropped, lowest priority first, until the rest fit in `width`.
/// `cols`: (header, width (0 = the flexible name column), priority: higher is kept longer).
fn fitted_table(
    width: u16,
    cols: &[(&'static str, u16, u8)],
    rows: Vec<Vec<Span<'static>>>,
) -> Table<'static> {
    let mut keep: Vec<bool> = vec![true; cols.len()];
    let need = |keep: &[bool]| -> u16 {
        cols.iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|((_, w, _), _)| if *w == 0 { 9 } else { *w + 1 })
            .sum()
    };
    let mut order: Vec<usize> = (0..cols.len()).collect();
    order.sort_by_key(|i| cols[*i].2);
    for i in order {
        if need(&keep) <= width {
            break;
        }
        if cols[i].1 != 0 {
            keep[i] = false;
        }
    }
    let pick = |v: Vec<Span<'static>>| -> Vec<Span<'static>> {
        v.into_iter()
            .zip(&keep)
            .filter(|(_, k)| **k)
            .map(|(c, _)| c)
            .collect()
    };
    let widths: Vec<Constraint> = cols
        .iter()
        .zip(&keep)
        .filter(|(_, k)| **k)
        .map(|((_, w, _), _)| {
            if *w == 0 {
                Constraint::Min(8)
            } else {
                Constraint::Length(*w)
            }
        })
        .collect();
    let header = pick(cols.iter().map(|(h, _, _)| Span::raw(*h)).collect());
    Table::new(rows.into_iter().map(|r| Row::new(pick(r))), widths)
        .header(Row::new(header).style(header_style()))
}

fn render_vips(frame: &mut Frame, area: Rect, s: &Snapshot) {
    let fit = area.height.saturating_sub(2) as usize;
    let rows = s
        .vips
        .iter()
        .map(|v| {
            let (pps, bps) = rate_cells(v.rate);
            vec![
                Span::raw(v.name.clone()),
                Span::raw(v.address.clone()),
                Span::raw(pps),
                Span::raw(bps),
                Span::raw(human(v.packets as f64)),
            ]
        })
        .collect();
    let cols = [
        ("VIP", 0, 9),
        ("Address", 28, 1),
        ("Pkt/s", 7, 8),
        ("B/s", 7, 7),
        ("Pkts", 7, 2),
    ];
    let t = fitted_table(area.width, &cols, rows).block(section(count_title(
        "VIPs",
        s.vips.len(),
        fit,
    )));
    frame.render_widget(t, area);
}

fn render_backends(frame: &mut Frame, area: Rect, s: &Snapshot) {
    let fit = area.height.saturating_sub(2) as usize;
    let no_health = match &s.agent {
        AgentView::Running { .. } => "?",
        _ => "-",
    };
    let rows = s
        .backends
        .iter()
        .map(|b| {
            let (pps, bps) = rate_cells(b.rate);
            let (health, since) = match &b.health {
                Some(h) => {
                    let since = match (h.since_unix, h.for_s) {
                        (Some(u), Some(f)) => format!("{} {}", clock(u), age(f)),
                        (None, Some(f)) => age(f),
                        (Some(u), None) => clock(u),
                        (None, None) => "-".into(),
                    };
                    (h.state.clone(), since)
                }
                None => (no_health.to_string(), "-".to_string()),
            };
            let hs = state_style(&health);
            vec![
                Span::raw(b.name.clone()),
                Span::styled(b.map_state, state_style(b.map_state)),
                Span::styled(health, hs),
                Span::raw(since),
                Span::raw(pps),
                Span::raw(bps),
                Span::raw(human(b.packets as f64)),
            ]
        })
        .collect();
    let mut title = count_title("Backends", s.backends.len(), fit);
    match &s.agent {
        AgentView::NotRunning => {
            title.push_str("─ agent not running: health unknown, map state shown ")
        }
        AgentView::Error(_) => title.push_str("─ agent error: health unknown "),
        _ => {}
    }
    let cols = [
        ("Backend", 0, 9),
        ("Map", 5, 8),
        ("Health", 8, 7),
        ("Since (UTC)", 15, 3),
        ("Pkt/s", 7, 6),
        ("B/s", 7, 4),
        ("Pkts", 7, 2),
    ];
    let t = fitted_table(area.width, &cols, rows).block(section(title));
    frame.render_widget(t, area);
}

// ------------------------------------------------------------------------------------------------
// The live loop.

/// Whether the terminal is in raw mode / the alternate screen (the panic hook restores it).
static TERMINAL_ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: std::sync::Once = std::sync::Once::new();

fn restore_terminal() {
    use ratatui::crossterm::{cursor, execute, terminal};
    if TERMINAL_ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
    }
}

/// Raw mode + alternate screen for as long as it lives.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> anyhow::Result<TerminalGuard> {
        use ratatui::crossterm::{cursor, execute, terminal};
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore_terminal();
                prev(info);
            }));
        });
        TERMINAL_ACTIVE.store(true, Ordering::SeqCst);
        let guard = TerminalGuard;
        terminal::enable_raw_mode().context("enabling raw mode (is stdin a terminal?)")?;
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)
            .context("entering the alternate screen")?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// The last stop signal received (0: none).
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP_SIGNAL.store(sig, Ordering::SeqCst);
}

/// SIGTERM, SIGHUP (SSH session closed) and SIGINT from outside (in raw mode Ctrl-C is a key, not
/// a signal) end the view like `q`, so the terminal is restored; the previous dispositions come
/// back on drop.
struct StopSignals {
    prev: Vec<(libc::c_int, libc::sighandler_t)>,
}

impl StopSignals {
    fn install() -> StopSignals {
        STOP_SIGNAL.store(0, Ordering::SeqCst);
        let handler =
            on_stop_signal as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
        let prev = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT]
            .into_iter()
            // SAFETY: the handler only stores into an atomic (async-signal-safe).
            .map(|sig| (sig, unsafe { libc::signal(sig, handler) }))
            .collect();
        StopSignals { prev }
    }

    fn received(&self) -> Option<i32> {
        match STOP_SIGNAL.load(Ordering::SeqCst) {
            0 => None,
            s => Some(s),
        }
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        for (sig, h) in &self.prev {
            if *h != libc::SIG_ERR {
                // SAFETY: restores the disposition that was in place before install().
                unsafe { libc::signal(*sig, *h) };
            }
        }
    }
}

/// Asks the agent every `interval` on a thread of its own (a hung agent must not freeze the
/// screen: the request has a 2 s timeout).
fn spawn_agent_poller(opts: SourceOptions, interval: Duration) -> mpsc::Receiver<AgentAnswer> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut src: Option<Source> = None;
        loop {
            if src.is_none() {
                src = Source::open(&opts).ok();
            }
            let answer = match &src {
                Some(s) => AgentAnswer::from(s.agent_status()),
                None => AgentAnswer::Error("maps not pinned".into()),
            };
            if tx.send(answer).is_err() {
                return;
            }
            std::thread::sleep(interval);
        }
    });
    rx
}

/// Walks the session LRU on a thread of its own, at most every [`SESSIONS_EVERY`] (and never
/// more than half the time when a walk is slow).
fn spawn_session_counter(opts: SourceOptions) -> mpsc::Receiver<(Result<usize, String>, Instant)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut src: Option<Source> = None;
        loop {
            let t0 = Instant::now();
            if src.is_none() {
                src = Source::open(&opts).ok();
            }
            let r = match &src {
                Some(s) => s
                    .maps
                    .sessions()
                    .map(|v| v.len())
                    .map_err(|e| super_chain(&e)),
                None => Err("maps not pinned".to_string()),
            };
            if r.is_err() {
                // Pins replaced (agent restarted with new maps)? Reopen next time.
                src = None;
            }
            if tx.send((r, Instant::now())).is_err() {
                return;
            }
            let took = t0.elapsed();
            std::thread::sleep(SESSIONS_EVERY.saturating_sub(took).max(took));
        }
    });
    rx
}

/// Runs the live view until `q`, `Esc` or Ctrl-C. Fails before touching the terminal when the
/// maps are not pinned.
pub fn run(opts: TopOptions) -> anyhow::Result<()> {
    use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};

    let interval = if opts.interval.is_zero() {
        Duration::from_secs(1)
    } else {
        opts.interval
    };
    let opts = TopOptions { interval, ..opts };
    let mut src = Source::open(&opts.source)?;
    let mut prev = read_raw(&src.maps).context("reading the pinned maps")?;
    let agent_rx = spawn_agent_poller(opts.source.clone(), interval);
    let sessions_rx = spawn_session_counter(opts.source.clone());

    let stop = StopSignals::install();
    let _guard = TerminalGuard::enter()?;
    let mut terminal =
        ratatui::Terminal::new(ratatui::backend::CrosstermBackend::new(io::stdout()))
            .context("terminal")?;
    terminal.clear()?;

    let mut agent = AgentAnswer::Pending;
    let mut sessions: Option<(Result<usize, String>, Instant)> = None;
    let mut names_at = Instant::now();
    let mut snap = build_snapshot(
        None,
        &prev,
        &src.names,
        &agent,
        SessionsView::Counting,
        &opts,
    );
    // The first screen has names and states but no rates: those need a full interval.
    terminal.draw(|f| render(f, &snap))?;
    let mut next = prev.at + interval;
    loop {
        let now = Instant::now();
        if now >= next {
            next = now + interval;
            while let Ok(a) = agent_rx.try_recv() {
                agent = a;
            }
            while let Ok(s) = sessions_rx.try_recv() {
                sessions = Some(s);
            }
            if names_at.elapsed() >= SESSIONS_EVERY {
                src.names = Names::load(&opts.source.control_socket);
                names_at = Instant::now();
            }
            let sv = match &sessions {
                None => SessionsView::Counting,
                Some((Ok(n), at)) => SessionsView::Counted {
                    count: *n,
                    age: at.elapsed(),
                },
                Some((Err(e), _)) => SessionsView::Error(e.clone()),
            };
            match read_raw(&src.maps) {
                Ok(cur) => {
                    snap = build_snapshot(Some(&prev), &cur, &src.names, &agent, sv, &opts);
                    prev = cur;
                }
                Err(e) => {
                    // Pins replaced (agent restarted with new maps)? Reopen for the next round.
                    snap.error = Some(super_chain(&e));
                    snap.sessions = sv;
                    if let Ok(s) = Source::open(&opts.source) {
                        src = s;
                    }
                }
            }
            terminal.draw(|f| render(f, &snap))?;
        }
        if stop.received().is_some() {
            break;
        }
        // Short polls so a signal is noticed quickly; a signal may also interrupt the poll.
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        let ready = match event::poll(wait) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => return Err(e.into()),
        };
        if ready {
            match event::read()? {
                Event::Key(k) if k.kind != KeyEventKind::Release => {
                    let ctrl_c = k.modifiers.contains(KeyModifiers::CONTROL)
                        && matches!(k.code, KeyCode::Char('c') | KeyCode::Char('C'));
                    if ctrl_c || matches!(k.code, KeyCode::Char('q' | 'Q') | KeyCode::Esc) {
                        break;
                    }
                }
                Event::Resize(..) => {
                    terminal.autoresize()?;
                    terminal.draw(|f| render(f, &snap))?;
                }
                _ => {}
            }
        }
    }
    drop(terminal);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use std::net::{IpAddr, Ipv4Addr};
    use vpnlb_common::PROTO_UDP;
    use vpnlb_common::counters::{DROP_BACKEND_DOWN, FWD_IPIP, PASS_FRAGMENT, PASS_NOT_VIP};

    fn screen(s: &Snapshot, w: u16, h: u16) -> String {
        let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
        t.draw(|f| render(f, s)).unwrap();
        let buf = t.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..h {
            for x in 0..w {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn names() -> Names {
        let mut n = Names::default();
        n.vips.insert(3, "ike-public".into());
        n.backends.insert(1, "gw-paris".into());
        n.backends.insert(2, "gw-lyon".into());
        n
    }

    fn raw(at: Instant, k: u64) -> Raw {
        let key = VipKey::new(IpAddr::V4(Ipv4Addr::new(10, 200, 0, 10)), 500, PROTO_UDP);
        let mut counters = vec![0u64; COUNTER_NAMES.len()];
        counters[FWD_IPIP as usize] = 1000 * k;
        counters[PASS_NOT_VIP as usize] = 50 * k;
        counters[PASS_FRAGMENT as usize] = 2 * k;
        counters[DROP_BACKEND_DOWN as usize] = 7 * k;
        let be = |state| Backend {
            state,
            ..Backend::default()
        };
        Raw {
            at,
            counters,
            vips: BTreeMap::from([(
                3,
                (
                    vec![key],
                    PktBytes {
                        packets: 1000 * k,
                        bytes: 1_500_000 * k,
                    },
                ),
            )]),
            backends: BTreeMap::from([
                (
                    1,
                    (
                        be(BACKEND_UP),
                        PktBytes {
                            packets: 600 * k,
                            bytes: 900_000 * k,
                        },
                    ),
                ),
                (
                    2,
                    (
                        be(BACKEND_DOWN),
                        PktBytes {
                            packets: 400 * k,
                            bytes: 600_000 * k,
                        },
                    ),
                ),
            ]),
        }
    }

    fn two_readings(agent: &AgentAnswer) -> Snapshot {
        let t0 = Instant::now();
        let a = raw(t0, 1);
        let b = raw(t0 + Duration::from_secs(2), 3); // +2000 VIP packets over 2 s
        build_snapshot(
            Some(&a),
            &b,
            &names(),
            agent,
            SessionsView::Counted {
                count: 1234,
                age: Duration::from_secs(2),
            },
            &TopOptions::default(),
        )
    }

    fn status() -> serde_json::Value {
        serde_json::json!({
            "agent": {"pid": 4242},
            "backends": [
                {"name": "gw-paris", "id": 1, "state": "up", "since": 1_700_000_000.0 + 3600.0 * 5.0 + 61.0, "since_s": 192.0},
                {"name": "gw-lyon", "id": 2, "state": "down", "since": 1_700_000_000.0, "since_s": 7300.0},
                {"name": "gw-new", "id": 9, "state": "unknown", "since": 1_700_000_000.0, "since_s": 1.0},
            ],
        })
    }

    #[test]
    fn rates_come_from_counter_deltas() {
        let s = two_readings(&AgentAnswer::NotRunning);
        assert_eq!(s.vips.len(), 1);
        let v = &s.vips[0];
        assert_eq!(v.name, "ike-public");
        assert_eq!(v.address, "udp 10.200.0.10:500");
        assert_eq!(
            v.rate,
            Some(Rate {
                pps: 1000.0,
                bps: 1_500_000.0
            })
        );
        assert_eq!(s.backends[0].rate.unwrap().pps, 600.0);
        assert_eq!(s.backends[1].map_state, "down");
        assert_eq!(s.outcomes.fwd, Some(1000.0));
        assert_eq!(s.outcomes.pass, Some(52.0));
        assert_eq!(s.outcomes.drop, Some(7.0));
        assert_eq!(
            s.outcomes.top_pass,
            vec![("not_vip", 50.0), ("fragment", 2.0)]
        );
        assert_eq!(s.outcomes.top_drop, vec![("backend_down", 7.0)]);
    }

    #[test]
    fn first_reading_and_counter_reset_have_no_rate() {
        let t0 = Instant::now();
        let s = build_snapshot(
            None,
            &raw(t0, 1),
            &names(),
            &AgentAnswer::Pending,
            SessionsView::Counting,
            &TopOptions::default(),
        );
        assert_eq!(s.vips[0].rate, None);
        assert_eq!(s.outcomes.fwd, None);
        let reset = build_snapshot(
            Some(&raw(t0, 3)),
            &raw(t0 + Duration::from_secs(1), 1),
            &names(),
            &AgentAnswer::Pending,
            SessionsView::Counting,
            &TopOptions::default(),
        );
        assert_eq!(reset.vips[0].rate, None);
        assert_eq!(reset.outcomes.fwd, Some(0.0));
        let txt = screen(&s, 80, 24);
        assert!(txt.contains("counting"), "{txt}");
        assert!(txt.contains("asking"), "{txt}");
    }

    #[test]
    fn screen_80x24_without_agent() {
        let s = two_readings(&AgentAnswer::NotRunning);
        let txt = screen(&s, 80, 24);
        for want in [
            "vpnlb top",
            "agent not running",
            "ike-public",
            "udp 10.200.0.10:500",
            "1.5M", // VIP bytes/s
            "1.0k", // VIP packets/s, fwd/s
            "gw-paris",
            "gw-lyon",
            "600",  // gw-paris packets/s
            "down", // gw-lyon map state
            "sessions 1234 (counted every 5s, 2s ago)",
            "not_vip 50/s",
            "fragment 2/s",
            "backend_down 7/s",
            "drop 7/s",
        ] {
            assert!(txt.contains(want), "missing {want:?} in\n{txt}");
        }
        for line in txt.lines() {
            assert_eq!(line.chars().count(), 80);
        }
    }

    #[test]
    fn screen_80x24_with_agent_health() {
        let s = two_readings(&AgentAnswer::Status(status()));
        let txt = screen(&s, 80, 24);
        assert!(txt.contains("agent pid 4242"), "{txt}");
        assert!(!txt.contains("agent not running"), "{txt}");
        let paris = txt.lines().find(|l| l.contains("gw-paris")).unwrap();
        assert!(paris.contains("up"), "{paris}");
        assert!(paris.contains("03:14:21 3m12s"), "{paris}");
        let lyon = txt.lines().find(|l| l.contains("gw-lyon")).unwrap();
        assert!(lyon.contains("down"), "{lyon}");
        assert!(lyon.contains("2h01m"), "{lyon}");
        // Known to the agent, not in the map yet.
        let new = txt.lines().find(|l| l.contains("gw-new")).unwrap();
        assert!(new.contains("unknown"), "{new}");
    }

    #[test]
    fn degrades_when_small() {
        let mut s = two_readings(&AgentAnswer::NotRunning);
        for i in 10..60 {
            s.backends.push(BackendRow {
                id: i,
                name: format!("gw{i}"),
                map_state: "up",
                health: None,
                rate: None,
                packets: 0,
            });
        }
        let txt = screen(&s, 80, 24);
        assert!(txt.contains("Backends (52, showing"), "{txt}");
        let small = screen(&s, 40, 10);
        assert!(small.contains("vpnlb top"), "{small}");
        assert!(small.contains("ike-public"), "{small}");
        assert!(!small.contains("Top reasons"), "{small}");
        let tiny = screen(&s, 15, 2);
        assert!(tiny.contains("too small"), "{tiny}");
        // Nothing panics at any size.
        for w in [1, 5, 20, 33, 80, 200] {
            for h in [1, 2, 3, 5, 8, 13, 14, 24, 60] {
                screen(&s, w, h);
            }
        }
    }

    #[test]
    fn map_error_is_shown() {
        let mut s = two_readings(&AgentAnswer::Error("timed out".into()));
        s.error = Some("lookup on map STATS failed".into());
        let txt = screen(&s, 80, 24);
        assert!(
            txt.contains("map read failed: lookup on map STATS"),
            "{txt}"
        );
        assert!(txt.contains("agent error: timed out"), "{txt}");
    }

    #[test]
    fn human_and_age() {
        assert_eq!(human(0.0), "0");
        assert_eq!(human(7.0), "7");
        assert_eq!(human(2.5), "2.5");
        assert_eq!(human(1234.0), "1.2k");
        assert_eq!(human(56_000_000.0), "56M");
        assert_eq!(age(59.0), "59s");
        assert_eq!(age(192.0), "3m12s");
        assert_eq!(age(7300.0), "2h01m");
        assert_eq!(age(90000.0), "1d01h");
    }

    #[test]
    fn missing_pins_fail_before_the_terminal() {
        let err = run(TopOptions {
            source: SourceOptions {
                pin_dir: "/nonexistent/vpnlb-top".into(),
                control_socket: "/nonexistent/control.sock".into(),
            },
            interval: Duration::from_secs(1),
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("no vpnlb maps pinned at /nonexistent/vpnlb-top"),
            "{err:#}"
        );
        assert!(!TERMINAL_ACTIVE.load(Ordering::SeqCst));
    }
}
