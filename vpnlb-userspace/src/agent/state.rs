//! The backend state machine (pure: time is an argument). Raw check results go through per-check
//! rise/fall counters; a backend is healthy when all its checks are up; admin actions (drain,
//! disable) override health. Every change of the effective state is returned as a [`Transition`]
//! with its timestamp and reason, which the agent logs, counts and hands to hooks.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use vpnlb_common::{BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UP};

use crate::health::CheckResult;

/// The effective state of a backend, as operators see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// No check has concluded yet (fresh start): gets no new flows.
    Unknown,
    Up,
    Down,
    /// Admin drain: existing sessions stay, no new ones.
    Draining,
    /// Admin disable: out of service, its sessions are re-picked.
    Disabled,
}

impl BackendState {
    /// The data-plane state (`Backend::state`) for this effective state.
    pub fn dataplane(self) -> u32 {
        match self {
            BackendState::Up => BACKEND_UP,
            BackendState::Draining => BACKEND_DRAINING,
            BackendState::Unknown | BackendState::Down | BackendState::Disabled => BACKEND_DOWN,
        }
    }

    /// Whether new flows may be sent here (ring membership).
    pub fn serves_new_flows(self) -> bool {
        self == BackendState::Up
    }

    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Unknown => "unknown",
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
            BackendState::Disabled => "disabled",
        }
    }
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Admin override of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Admin {
    #[default]
    None,
    Drain,
    Disable,
}

/// Rise/fall state of one check.
#[derive(Clone, Debug, Serialize)]
pub struct CheckState {
    pub label: String,
    pub rise: u32,
    pub fall: u32,
    /// None until the first result.
    pub up: Option<bool>,
    /// Consecutive results contradicting `up` (counting towards rise or fall).
    #[serde(skip)]
    streak: u32,
    pub last_ok: Option<bool>,
    pub last_detail: String,
    pub last_latency_ms: Option<f64>,
    /// The round trip of each step of the last successful multi-step probe, by name
    /// (`handshake`, `inside`), in ms; empty for other checks.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub last_phases_ms: Vec<(String, f64)>,
    #[serde(skip)]
    pub last_at: Option<Instant>,
    pub results: u64,
    pub failures: u64,
}

impl CheckState {
    pub fn new(label: String, rise: u32, fall: u32) -> Self {
        CheckState {
            label,
            rise: rise.max(1),
            fall: fall.max(1),
            up: None,
            streak: 0,
            last_ok: None,
            last_detail: String::new(),
            last_latency_ms: None,
            last_phases_ms: Vec::new(),
            last_at: None,
            results: 0,
            failures: 0,
        }
    }

    /// Applies one raw result; returns true if the check's up/down changed. The first result
    /// decides at once (a fresh backend needs no `rise` successes to start serving); afterwards
    /// `rise` consecutive successes bring it up and `fall` consecutive failures bring it down.
    pub fn apply(
        &mut self,
        ok: bool,
        detail: &str,
        latency: Option<Duration>,
        at: Instant,
    ) -> bool {
        self.results += 1;
        if !ok {
            self.failures += 1;
        }
        self.last_ok = Some(ok);
        self.last_detail = detail.to_string();
        self.last_latency_ms = latency.map(|d| d.as_secs_f64() * 1e3);
        self.last_at = Some(at);
        match self.up {
            None => {
                self.up = Some(ok);
                self.streak = 0;
                true
            }
            Some(up) if up == ok => {
                self.streak = 0;
                false
            }
            Some(up) => {
                self.streak += 1;
                let need = if up { self.fall } else { self.rise };
                if self.streak >= need {
                    self.up = Some(ok);
                    self.streak = 0;
                    true
                } else {
                    false
                }
            }
        }
    }
}

/// A change of a backend's effective state.
#[derive(Clone, Debug, Serialize)]
pub struct Transition {
    pub backend: String,
    pub backend_id: u32,
    pub from: BackendState,
    pub to: BackendState,
    /// Why: "check icmp: timeout after 500ms (3 consecutive failures)", "admin drain", ...
    pub reason: String,
    /// Wall-clock time of the change (for logs and hooks).
    #[serde(with = "unix_seconds")]
    pub at_wall: SystemTime,
    /// Monotonic time of the change.
    #[serde(skip)]
    pub at: Instant,
    /// Every check's last result at the time of the change.
    pub checks: Vec<CheckState>,
}

mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        s.serialize_f64(secs)
    }
}

/// One backend's health and admin state.
#[derive(Clone, Debug, Serialize)]
pub struct BackendHealth {
    pub name: String,
    pub id: u32,
    pub checks: Vec<CheckState>,
    pub admin: Admin,
    pub state: BackendState,
    /// Monotonic time of the last change of `state`.
    #[serde(skip)]
    pub since: Instant,
    #[serde(with = "unix_seconds")]
    pub since_wall: SystemTime,
    pub transitions: u64,
    /// In a cluster: the health the members agreed on (quorum), used instead of this host's own
    /// checks; `None`: this host's checks decide (a single host, or etcd lost with
    /// `on_etcd_loss = "local"`).
    pub agreed: Option<BackendState>,
}

impl BackendHealth {
    /// A backend with the given checks (label, rise, fall). With no checks it is healthy at once.
    pub fn new(
        name: &str,
        id: u32,
        checks: Vec<(String, u32, u32)>,
        now: Instant,
        wall: SystemTime,
    ) -> Self {
        let checks: Vec<CheckState> = checks
            .into_iter()
            .map(|(l, r, f)| CheckState::new(l, r, f))
            .collect();
        let state = if checks.is_empty() {
            BackendState::Up
        } else {
            BackendState::Unknown
        };
        BackendHealth {
            name: name.to_string(),
            id,
            checks,
            admin: Admin::None,
            state,
            since: now,
            since_wall: wall,
            transitions: 0,
            agreed: None,
        }
    }

    /// Health from the checks alone: up when all are up, down when any is down, else unknown.
    pub fn health(&self) -> BackendState {
        if self.checks.iter().any(|c| c.up == Some(false)) {
            BackendState::Down
        } else if self.checks.iter().all(|c| c.up == Some(true)) {
            BackendState::Up
        } else {
            BackendState::Unknown
        }
    }

    fn effective(&self) -> BackendState {
        match (self.admin, self.agreed.unwrap_or_else(|| self.health())) {
            (Admin::Disable, _) => BackendState::Disabled,
            // A draining backend that dies is down: its sessions must move.
            (Admin::Drain, BackendState::Down) => BackendState::Down,
            (Admin::Drain, _) => BackendState::Draining,
            (Admin::None, h) => h,
        }
    }

    fn settle(&mut self, reason: String, now: Instant, wall: SystemTime) -> Option<Transition> {
        let to = self.effective();
        if to == self.state {
            return None;
        }
        let t = Transition {
            backend: self.name.clone(),
            backend_id: self.id,
            from: self.state,
            to,
            reason,
            at_wall: wall,
            at: now,
            checks: self.checks.clone(),
        };
        self.state = to;
        self.since = now;
        self.since_wall = t.at_wall;
        self.transitions += 1;
        Some(t)
    }

    /// Applies a raw check result; returns the transition it caused, if any.
    pub fn on_result(
        &mut self,
        r: &CheckResult,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Transition> {
        let c = self.checks.get_mut(r.check_index)?;
        if r.ok {
            c.last_phases_ms = r
                .phases
                .iter()
                .map(|(n, d)| (n.to_string(), d.as_secs_f64() * 1e3))
                .collect();
        }
        if !c.apply(r.ok, &r.detail, r.latency, r.at) {
            return None;
        }
        let reason = if c.up == Some(true) {
            format!("check {} up: {}", c.label, r.detail)
        } else if c.results == 1 {
            format!("check {} down: {}", c.label, r.detail)
        } else {
            format!(
                "check {} down: {} ({} consecutive failures)",
                c.label, r.detail, c.fall
            )
        };
        self.settle(reason, now, wall)
    }

    /// Applies an admin action; returns the transition, if any.
    pub fn set_admin(
        &mut self,
        admin: Admin,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Transition> {
        self.admin = admin;
        let reason = match admin {
            Admin::None => "admin enable/undrain".to_string(),
            Admin::Drain => "admin drain".to_string(),
            Admin::Disable => "admin disable".to_string(),
        };
        self.settle(reason, now, wall)
    }

    /// Sets the health agreed by the cluster (`None`: back to this host's checks); returns the
    /// transition it causes, if any, with `reason`.
    pub fn set_agreed(
        &mut self,
        agreed: Option<BackendState>,
        reason: String,
        now: Instant,
        wall: SystemTime,
    ) -> Option<Transition> {
        self.agreed = agreed;
        self.settle(reason, now, wall)
    }

    /// Starts from a state adopted from the pinned maps (agent restart): until its checks
    /// conclude, a backend keeps what the data plane was doing, so a restart moves no flows. A
    /// draining backend was healthy too; [`BackendHealth::restore_admin`] first keeps it draining.
    pub fn adopt(&mut self, dataplane_state: u32) {
        if self.state == BackendState::Unknown
            && (dataplane_state == BACKEND_UP || dataplane_state == BACKEND_DRAINING)
        {
            for c in &mut self.checks {
                c.up = Some(true);
            }
            self.state = self.effective();
        }
    }

    /// Restores an admin override saved by the previous agent (restart), without a transition.
    pub fn restore_admin(&mut self, admin: Admin) {
        self.admin = admin;
        if admin == Admin::Disable {
            self.state = BackendState::Disabled;
        }
    }

    /// Takes over the state of `old`, the same backend before its checks were replaced (config
    /// reload): if it was healthy it keeps its effective state (up, or draining/disabled by admin)
    /// with every new check counted as up, so `fall` failures are needed to take it down, as after
    /// [`BackendHealth::adopt`]. Otherwise it starts from scratch.
    pub fn carry_over(&mut self, old: &BackendHealth) {
        if old.health() != BackendState::Up || self.admin != old.admin {
            return;
        }
        for c in &mut self.checks {
            c.up = Some(true);
        }
        self.state = old.state;
        self.since = old.since;
        self.since_wall = old.since_wall;
        self.transitions = old.transitions;
    }
}

/// Health of all backends, by name.
#[derive(Debug, Default)]
pub struct Health {
    pub backends: BTreeMap<String, BackendHealth>,
}

impl Health {
    pub fn state(&self, name: &str) -> Option<BackendState> {
        self.backends.get(name).map(|b| b.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: SystemTime = SystemTime::UNIX_EPOCH;

    fn result(idx: usize, ok: bool, at: Instant) -> CheckResult {
        CheckResult {
            backend_id: 1,
            check_index: idx,
            generation: 0,
            ok,
            latency: ok.then(|| Duration::from_millis(1)),
            phases: Vec::new(),
            detail: if ok {
                "echo reply".into()
            } else {
                "timeout".into()
            },
            at,
        }
    }

    #[test]
    fn first_result_decides_then_rise_and_fall_apply() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new("gw1", 1, vec![("icmp".into(), 2, 3)], t0, W);
        assert_eq!(b.state, BackendState::Unknown);
        let tr = b
            .on_result(&result(0, true, t0), t0, W)
            .expect("first success brings it up");
        assert_eq!((tr.from, tr.to), (BackendState::Unknown, BackendState::Up));
        // Two failures: still up (fall = 3); the third brings it down.
        for i in 1..=2 {
            assert!(
                b.on_result(&result(0, false, t0), t0 + Duration::from_secs(i), W)
                    .is_none()
            );
        }
        let tr = b
            .on_result(&result(0, false, t0), t0 + Duration::from_secs(3), W)
            .expect("down");
        assert_eq!(tr.to, BackendState::Down);
        assert!(
            tr.reason.contains("3 consecutive failures"),
            "{}",
            tr.reason
        );
        assert_eq!(b.since, t0 + Duration::from_secs(3));
        // A success interrupting the streak resets it: rise = 2 needs two in a row.
        assert!(b.on_result(&result(0, true, t0), t0, W).is_none());
        assert!(b.on_result(&result(0, false, t0), t0, W).is_none());
        assert!(b.on_result(&result(0, true, t0), t0, W).is_none());
        let tr = b.on_result(&result(0, true, t0), t0, W).expect("rise");
        assert_eq!(tr.to, BackendState::Up);
        assert_eq!(b.transitions, 3);
    }

    #[test]
    fn all_checks_must_be_up_and_any_down_is_down() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new(
            "gw1",
            1,
            vec![("icmp".into(), 1, 1), ("bfd".into(), 1, 1)],
            t0,
            W,
        );
        assert!(
            b.on_result(&result(0, true, t0), t0, W).is_none(),
            "one of two checks up: still unknown"
        );
        assert_eq!(
            b.on_result(&result(1, true, t0), t0, W).unwrap().to,
            BackendState::Up
        );
        assert_eq!(
            b.on_result(&result(1, false, t0), t0, W).unwrap().to,
            BackendState::Down
        );
        // Unknown check index is ignored.
        assert!(b.on_result(&result(7, false, t0), t0, W).is_none());
    }

    #[test]
    fn admin_overrides_health() {
        let t0 = Instant::now();
        let mut b = BackendHealth::new("gw1", 1, vec![("icmp".into(), 1, 1)], t0, W);
        b.on_result(&result(0, true, t0), t0, W);
        assert_eq!(
            b.set_admin(Admin::Drain, t0, W).unwrap().to,
            BackendState::Draining
        );
        assert_eq!(BackendState::Draining.dataplane(), BACKEND_DRAINING);
        assert!(!BackendState::Draining.serves_new_flows());
        // Health going down while draining: down (sessions must move).
        assert_eq!(
            b.on_result(&result(0, false, t0), t0, W).unwrap().to,
            BackendState::Down
        );
        assert_eq!(
            b.on_result(&result(0, true, t0), t0, W).unwrap().to,
            BackendState::Draining
        );
        assert_eq!(
            b.set_admin(Admin::Disable, t0, W).unwrap().to,
            BackendState::Disabled
        );
        assert_eq!(BackendState::Disabled.dataplane(), BACKEND_DOWN);
        // Health changes while disabled change nothing visible.
        assert!(b.on_result(&result(0, false, t0), t0, W).is_none());
        assert!(b.on_result(&result(0, true, t0), t0, W).is_none());
        let tr = b.set_admin(Admin::None, t0, W).unwrap();
        assert_eq!((tr.from, tr.to), (BackendState::Disabled, BackendState::Up));
        assert_eq!(tr.reason, "admin enable/undrain");
    }

    #[test]
    fn replaced_checks_carry_a_healthy_state_over() {
        let t0 = Instant::now();
        let mut old = BackendHealth::new("a", 1, vec![("icmp".into(), 1, 1)], t0, W);
        old.on_result(&result(0, true, t0), t0, W);
        old.set_admin(Admin::Drain, t0, W);
        let mut new = BackendHealth::new(
            "a",
            1,
            vec![("icmp".into(), 2, 2), ("tcp:443".into(), 2, 2)],
            t0,
            W,
        );
        new.admin = Admin::Drain;
        new.carry_over(&old);
        assert_eq!((new.state, new.transitions), (BackendState::Draining, 2));
        // The new checks count as up: one failure does not take it down, `fall` do.
        assert!(new.on_result(&result(1, false, t0), t0, W).is_none());
        assert_eq!(
            new.on_result(&result(1, false, t0), t0, W).unwrap().to,
            BackendState::Down
        );
        // A backend that was down starts from scratch.
        let mut new2 = BackendHealth::new("a", 1, vec![("icmp".into(), 2, 2)], t0, W);
        new2.carry_over(&new);
        assert_eq!(new2.state, BackendState::Unknown);
    }

    #[test]
    fn no_checks_means_up_and_adoption_keeps_serving() {
        let t0 = Instant::now();
        assert_eq!(
            BackendHealth::new("a", 1, vec![], t0, W).state,
            BackendState::Up
        );
        let mut b = BackendHealth::new("b", 2, vec![("tcp:443".into(), 2, 2)], t0, W);
        b.adopt(BACKEND_UP);
        assert_eq!(b.state, BackendState::Up);
        // After adoption a single failure does not drop it (fall = 2 applies).
        assert!(b.on_result(&result(0, false, t0), t0, W).is_none());
        assert_eq!(
            b.on_result(&result(0, false, t0), t0, W).unwrap().to,
            BackendState::Down
        );
        let mut c = BackendHealth::new("c", 3, vec![("tcp:443".into(), 2, 2)], t0, W);
        c.adopt(BACKEND_DOWN);
        assert_eq!(c.state, BackendState::Unknown);
        // Restart of a drained backend: still draining; of a disabled one: still disabled.
        let mut d = BackendHealth::new("d", 4, vec![("tcp:443".into(), 2, 2)], t0, W);
        d.restore_admin(Admin::Drain);
        d.adopt(BACKEND_DRAINING);
        assert_eq!((d.state, d.transitions), (BackendState::Draining, 0));
        assert!(d.on_result(&result(0, true, t0), t0, W).is_none());
        let mut e = BackendHealth::new("e", 5, vec![("tcp:443".into(), 2, 2)], t0, W);
        e.restore_admin(Admin::Disable);
        e.adopt(BACKEND_DOWN);
        assert_eq!(e.state, BackendState::Disabled);
        assert!(
            e.on_result(&result(0, true, t0), t0, W).is_none(),
            "no transition while disabled"
        );
    }
}
