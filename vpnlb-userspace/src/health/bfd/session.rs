//! One BFD session as a pure state machine (RFC 5880 §6, asynchronous mode): no sockets, no clock;
//! time is an argument and the caller polls for packets to send, timers and state changes.
//!
//! Driving it (what [`super::manager`] does):
//! - [`Session::handle_packet`] for every received packet that was decoded, TTL-checked and
//!   demultiplexed to this session;
//! - [`Session::handle_timeout`] when [`Session::poll_timeout`] is reached;
//! - after either, drain [`Session::poll_transmit`] (send each packet now) and
//!   [`Session::poll_event`] (state changes), then re-arm the timer with `poll_timeout`.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use thiserror::Error;

use super::packet::{ControlPacket, Diagnostic, State};
use crate::health::spec::CheckSpec;

/// The Desired Min TX Interval used while the session is not Up (RFC 5880 §6.8.3: at least 1 s).
pub const SLOW_TX: Duration = Duration::from_secs(1);

/// Intervals below this are refused: the async shell's timers have 1 ms resolution.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// Local parameters of a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// bfd.DesiredMinTxInterval once Up (while not Up at least [`SLOW_TX`] is advertised).
    pub desired_min_tx: Duration,
    /// bfd.RequiredMinRxInterval: the fastest rate we accept packets at.
    pub required_min_rx: Duration,
    /// bfd.DetectMult: the peer declares us down after this many missed intervals.
    pub detect_mult: u8,
    /// Passive role (RFC 5880 §6.1): send nothing until the peer has been heard.
    pub passive: bool,
}

/// Invalid [`SessionParams`].
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ParamsError {
    #[error("bfd detect_mult must be at least 1")]
    ZeroDetectMult,
    #[error("bfd {name} of {value:?} is out of range (1 ms ..= {max:?})")]
    Interval {
        name: &'static str,
        value: Duration,
        max: Duration,
    },
}

impl SessionParams {
    /// The parameters of a `type = "bfd"` check, `None` for other kinds.
    pub fn from_spec(spec: &CheckSpec) -> Option<SessionParams> {
        match *spec {
            CheckSpec::Bfd {
                desired_min_tx_ms,
                required_min_rx_ms,
                detect_mult,
                passive,
                ..
            } => Some(SessionParams {
                desired_min_tx: Duration::from_millis(desired_min_tx_ms),
                required_min_rx: Duration::from_millis(required_min_rx_ms),
                detect_mult,
                passive,
            }),
            _ => None,
        }
    }

    /// Checks what the wire and the timers can carry.
    pub fn validate(&self) -> Result<(), ParamsError> {
        if self.detect_mult == 0 {
            return Err(ParamsError::ZeroDetectMult);
        }
        let max = Duration::from_micros(u32::MAX as u64);
        for (name, value) in [
            ("desired_min_tx", self.desired_min_tx),
            ("required_min_rx", self.required_min_rx),
        ] {
            if value < MIN_INTERVAL || value > max {
                return Err(ParamsError::Interval { name, value, max });
            }
        }
        Ok(())
    }
}

impl Default for SessionParams {
    /// 300 ms x 3, active: the config defaults.
    fn default() -> Self {
        SessionParams {
            desired_min_tx: Duration::from_millis(300),
            required_min_rx: Duration::from_millis(300),
            detect_mult: 3,
            passive: false,
        }
    }
}

/// Something the owner of a session should know about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// bfd.SessionState changed; `diag` is bfd.LocalDiag after the change, `remote_state` and
    /// `remote_diag` the State and Diag of the last packet received.
    StateChanged {
        from: State,
        to: State,
        diag: Diagnostic,
        remote_state: State,
        remote_diag: Diagnostic,
        at: Instant,
    },
}

/// A BFD session (the state variables of RFC 5880 §6.8.1 plus timers).
#[derive(Debug)]
pub struct Session {
    params: SessionParams,
    state: State,
    local_diag: Diagnostic,
    local_discr: u32,
    remote_discr: u32,
    remote_state: State,
    remote_diag: Diagnostic,
    /// bfd.RemoteMinRxInterval (µs); 1 until the peer is heard (§6.8.1).
    remote_min_rx_us: u32,
    /// Detect Mult of the last packet received; 0 before any.
    remote_detect_mult: u8,
    /// The peer's Desired Min TX used for the Detection Time (µs). While the peer polls to lower
    /// it, the old value is kept until its Poll Sequence ends (the peer still sends slowly).
    remote_tx_us: u32,
    /// bfd.DesiredMinTxInterval as advertised (µs).
    desired_min_tx_us: u32,
    /// Desired Min TX in force for our transmissions (µs): lags `desired_min_tx_us` until the Poll
    /// Sequence that announced it is answered.
    tx_in_force_us: u32,
    /// A Poll Sequence is in progress (P set on periodic packets until an F arrives).
    polling: bool,
    /// A Final must be sent (the peer polled).
    final_due: Option<Instant>,
    /// Next periodic transmission (None: not transmitting).
    next_tx: Option<Instant>,
    last_tx: Option<Instant>,
    /// When the Detection Time runs out without a packet.
    detect_deadline: Option<Instant>,
    events: VecDeque<Event>,
    rng: Rng,
}

impl Session {
    /// A session in state Down. `local_discr` must be unique among the caller's sessions; `seed`
    /// drives the transmit jitter. Parameters are assumed valid ([`SessionParams::validate`]).
    pub fn new(params: SessionParams, local_discr: NonZeroU32, seed: u64, now: Instant) -> Session {
        let slow = slow_us(&params);
        let mut s = Session {
            params,
            state: State::Down,
            local_diag: Diagnostic::None,
            local_discr: local_discr.get(),
            remote_discr: 0,
            remote_state: State::Down,
            remote_diag: Diagnostic::None,
            remote_min_rx_us: 1,
            remote_detect_mult: 0,
            remote_tx_us: 0,
            desired_min_tx_us: slow,
            tx_in_force_us: slow,
            polling: false,
            final_due: None,
            next_tx: None,
            last_tx: None,
            detect_deadline: None,
            events: VecDeque::new(),
            rng: Rng(seed),
        };
        s.update_tx_gate(now);
        s
    }

    pub fn params(&self) -> &SessionParams {
        &self.params
    }
    /// bfd.SessionState.
    pub fn state(&self) -> State {
        self.state
    }
    /// bfd.LocalDiag.
    pub fn local_diag(&self) -> Diagnostic {
        self.local_diag
    }
    /// bfd.RemoteSessionState.
    pub fn remote_state(&self) -> State {
        self.remote_state
    }
    /// Diag of the last packet received.
    pub fn remote_diag(&self) -> Diagnostic {
        self.remote_diag
    }
    /// bfd.LocalDiscr.
    pub fn local_discr(&self) -> u32 {
        self.local_discr
    }
    /// bfd.RemoteDiscr (0 until the peer is heard, and again after a Detection Time of silence).
    pub fn remote_discr(&self) -> u32 {
        self.remote_discr
    }
    /// A Poll Sequence of ours is waiting for its Final.
    pub fn is_polling(&self) -> bool {
        self.polling
    }

    /// The periodic transmit interval before jitter (§6.8.7): the larger of the Desired Min TX in
    /// force and the peer's Required Min RX. None while we may not transmit periodically.
    pub fn tx_interval(&self) -> Option<Duration> {
        self.may_transmit()
            .then(|| Duration::from_micros(self.tx_interval_us() as u64))
    }

    /// The Detection Time (§6.8.4, asynchronous mode): the peer's Detect Mult times the larger of
    /// our Required Min RX and the peer's Desired Min TX. None before the peer is heard.
    pub fn detection_time(&self) -> Option<Duration> {
        if self.remote_detect_mult == 0 {
            return None;
        }
        let rx = (self.params.required_min_rx.as_micros() as u64).max(self.remote_tx_us as u64);
        Some(Duration::from_micros(rx * self.remote_detect_mult as u64))
    }

    /// Processes a received packet that passed [`ControlPacket::decode`], the TTL check and
    /// demultiplexing to this session (RFC 5880 §6.8.6 from "Set bfd.RemoteDiscr" on).
    pub fn handle_packet(&mut self, p: &ControlPacket, now: Instant) {
        let old_interval = self.tx_interval_us();
        self.remote_discr = p.my_discr;
        self.remote_state = p.state;
        self.remote_diag = p.diag;
        self.remote_min_rx_us = p.required_min_rx_us;
        self.remote_detect_mult = p.detect_mult;
        // While the peer polls to send faster it still sends at the old rate: keep the slower value
        // for detection until a packet without P (its sequence is over).
        if !(p.poll && p.desired_min_tx_us < self.remote_tx_us) {
            self.remote_tx_us = p.desired_min_tx_us;
        }
        if p.final_ && self.polling {
            // Our Poll Sequence is answered: the advertised timers take effect.
            self.polling = false;
            self.tx_in_force_us = self.desired_min_tx_us;
        }
        self.retime_tx(old_interval, now);
        self.detect_deadline = self.detection_time().map(|d| now + d);
        self.update_tx_gate(now);

        if self.state == State::AdminDown {
            return;
        }
        match (self.state, p.state) {
            (State::Down, _) if p.state == State::AdminDown => {}
            (_, State::AdminDown) => {
                self.set_state(State::Down, Diagnostic::NeighborSignaledSessionDown, now)
            }
            (State::Down, State::Down) => self.set_state(State::Init, Diagnostic::None, now),
            (State::Down, State::Init) => self.set_state(State::Up, Diagnostic::None, now),
            (State::Init, State::Init | State::Up) => {
                self.set_state(State::Up, Diagnostic::None, now)
            }
            (State::Up, State::Down) => {
                self.set_state(State::Down, Diagnostic::NeighborSignaledSessionDown, now)
            }
            _ => {}
        }
        if p.poll {
            self.final_due = Some(now);
        }
    }

    /// Runs the timers due at `now`: the Detection Time (Init/Up -> Down with diag 1, and
    /// bfd.RemoteDiscr reset in any state, §6.8.1/§6.8.4).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.detect_deadline.is_some_and(|d| d <= now) {
            self.detect_deadline = None;
            if matches!(self.state, State::Init | State::Up) {
                self.set_state(State::Down, Diagnostic::ControlDetectionTimeExpired, now);
            }
            self.remote_discr = 0;
            self.remote_state = State::Down;
            self.update_tx_gate(now);
        }
    }

    /// The next packet to send now, if any: a Final answering a Poll first, then the periodic
    /// packet when due (carrying P while our Poll Sequence runs). Call until it returns None.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<ControlPacket> {
        if self.final_due.is_some_and(|t| t <= now) {
            self.final_due = None;
            // A Final goes out whatever the transmit timer and state (§6.8.7), but not before the
            // peer is known (the Poll that asked for it made it known).
            let mut p = self.packet();
            p.final_ = true;
            return Some(p);
        }
        let due = self.next_tx?;
        if due > now {
            return None;
        }
        self.last_tx = Some(now);
        self.next_tx = Some(now + self.jittered(self.tx_interval_us()));
        let mut p = self.packet();
        p.poll = self.polling;
        Some(p)
    }

    /// When [`Session::handle_timeout`] or [`Session::poll_transmit`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [self.final_due, self.next_tx, self.detect_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    /// The next event (state change), oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Local administrative down (diag 7): the peer is told with AdminDown packets at the slow
    /// rate; received packets are then ignored (§6.8.6) until [`Session::admin_up`].
    pub fn admin_down(&mut self, now: Instant) {
        self.set_state(State::AdminDown, Diagnostic::AdministrativelyDown, now);
    }

    /// Leaves AdminDown for Down.
    pub fn admin_up(&mut self, now: Instant) {
        if self.state == State::AdminDown {
            self.set_state(State::Down, Diagnostic::None, now);
        }
    }

    fn packet(&self) -> ControlPacket {
        ControlPacket {
            diag: self.local_diag,
            state: self.state,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: self.params.detect_mult,
            my_discr: self.local_discr,
            your_discr: self.remote_discr,
            desired_min_tx_us: self.desired_min_tx_us,
            required_min_rx_us: self.params.required_min_rx.as_micros() as u32,
            required_min_echo_rx_us: 0,
        }
    }

    fn set_state(&mut self, to: State, diag: Diagnostic, now: Instant) {
        if to == self.state {
            return;
        }
        let from = self.state;
        self.state = to;
        self.local_diag = diag;
        let old_interval = self.tx_interval_us();
        if to == State::Up {
            // Announce the configured rate with a Poll; it takes effect when answered (§6.8.3).
            self.desired_min_tx_us = self.params.desired_min_tx.as_micros() as u32;
            self.polling = self.desired_min_tx_us != self.tx_in_force_us;
        } else {
            // Not Up: at least 1 s, at once (the peer's detection uses the advertised value).
            self.desired_min_tx_us = slow_us(&self.params);
            self.tx_in_force_us = self.desired_min_tx_us;
            self.polling = false;
        }
        self.retime_tx(old_interval, now);
        // Tell the peer about the change right away rather than at the next periodic slot.
        if self.may_transmit() {
            self.next_tx = Some(now);
        }
        self.events.push_back(Event::StateChanged {
            from,
            to,
            diag,
            remote_state: self.remote_state,
            remote_diag: self.remote_diag,
            at: now,
        });
    }

    fn tx_interval_us(&self) -> u32 {
        self.tx_in_force_us.max(self.remote_min_rx_us)
    }

    /// Periodic transmission is allowed: not a passive session with an unknown peer, and the peer
    /// has not asked for silence (Required Min RX 0) (§6.8.7).
    fn may_transmit(&self) -> bool {
        !(self.params.passive && self.remote_discr == 0) && self.remote_min_rx_us != 0
    }

    /// Starts or stops the periodic transmissions as [`Session::may_transmit`] says.
    fn update_tx_gate(&mut self, now: Instant) {
        if !self.may_transmit() {
            self.next_tx = None;
        } else if self.next_tx.is_none() {
            self.next_tx = Some(now);
        }
    }

    /// After the transmit interval changed, moves the next periodic packet to one (new, jittered)
    /// interval after the last one, but not into the past.
    fn retime_tx(&mut self, old_interval_us: u32, now: Instant) {
        let new = self.tx_interval_us();
        if new == old_interval_us {
            return;
        }
        if let (Some(_), Some(last)) = (self.next_tx, self.last_tx) {
            self.next_tx = Some((last + self.jittered(new)).max(now));
        }
    }

    /// The interval less a random 0-25% (0-10% extra, i.e. 75-90%, with Detect Mult 1) (§6.8.7).
    fn jittered(&mut self, interval_us: u32) -> Duration {
        let span = if self.params.detect_mult == 1 {
            150
        } else {
            250
        };
        let permille = 750 + self.rng.below(span + 1);
        Duration::from_micros(interval_us as u64 * permille / 1000)
    }
}

fn slow_us(p: &SessionParams) -> u32 {
    p.desired_min_tx.max(SLOW_TX).as_micros() as u32
}

/// splitmix64: jitter needs no cryptographic quality, only independence between sessions.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in 0..n for small n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[cfg(test)]
mod tests;
