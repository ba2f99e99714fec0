//! Session state machine tests on a simulated clock: two sessions joined by a simulated link, and
//! single sessions fed hand-made packets.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn fast() -> SessionParams {
    SessionParams {
        desired_min_tx: 50 * MS,
        required_min_rx: 50 * MS,
        detect_mult: 3,
        passive: false,
    }
}

fn discr(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// A transmitted packet, for the log.
#[derive(Clone, Copy, Debug)]
struct Sent {
    at: Instant,
    from_a: bool,
    pkt: ControlPacket,
}

/// Two sessions joined by a link with a fixed one-way delay; each direction can be cut.
struct Sim {
    t0: Instant,
    now: Instant,
    a: Session,
    b: Session,
    delay: Duration,
    a_to_b: bool,
    b_to_a: bool,
    in_flight: Vec<(Instant, bool, ControlPacket)>,
    sent: Vec<Sent>,
    a_events: Vec<Event>,
    b_events: Vec<Event>,
}

impl Sim {
    fn new(pa: SessionParams, pb: SessionParams) -> Sim {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            a: Session::new(pa, discr(0xa), 1, t0),
            b: Session::new(pb, discr(0xb), 2, t0),
            delay: MS / 2,
            a_to_b: true,
            b_to_a: true,
            in_flight: Vec::new(),
            sent: Vec::new(),
            a_events: Vec::new(),
            b_events: Vec::new(),
        }
    }

    fn flush(&mut self) {
        for from_a in [true, false] {
            let (s, up) = if from_a {
                (&mut self.a, self.a_to_b)
            } else {
                (&mut self.b, self.b_to_a)
            };
            while let Some(pkt) = s.poll_transmit(self.now) {
                self.sent.push(Sent {
                    at: self.now,
                    from_a,
                    pkt,
                });
                if up {
                    self.in_flight.push((self.now + self.delay, from_a, pkt));
                }
            }
            let evs = if from_a {
                &mut self.a_events
            } else {
                &mut self.b_events
            };
            while let Some(e) = s.poll_event() {
                evs.push(e);
            }
        }
    }

    /// Runs every timer and delivery up to `t` (relative to the start).
    fn run_until(&mut self, t: Duration) {
        let end = self.t0 + t;
        loop {
            self.flush();
            let next = [
                self.a.poll_timeout(),
                self.b.poll_timeout(),
                self.in_flight.iter().map(|f| f.0).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            let Some(next) = next.filter(|n| *n <= end) else {
                self.now = end;
                self.flush();
                return;
            };
            self.now = self.now.max(next);
            let now = self.now;
            let (due, later): (Vec<_>, Vec<_>) = self.in_flight.drain(..).partition(|f| f.0 <= now);
            self.in_flight = later;
            for (_, from_a, pkt) in due {
                let to = if from_a { &mut self.b } else { &mut self.a };
                to.handle_packet(&pkt, now);
            }
            self.a.handle_timeout(now);
            self.b.handle_timeout(now);
        }
    }

    fn rel(&self, t: Instant) -> Duration {
        t - self.t0
    }

    /// Times (relative) of A's transmissions in [from, to).
    fn a_tx_times(&self, from: Duration, to: Duration) -> Vec<Duration> {
        self.sent
            .iter()
            .filter(|s| s.from_a && !s.pkt.final_)
            .map(|s| self.rel(s.at))
            .filter(|t| *t >= from && *t < to)
            .collect()
    }
}

fn changes(evs: &[Event]) -> Vec<(State, State, Diagnostic)> {
    evs.iter()
        .map(|e| match *e {
            Event::StateChanged { from, to, diag, .. } => (from, to, diag),
        })
        .collect()
}

fn last_change_at(evs: &[Event]) -> Instant {
    match *evs.last().expect("an event") {
        Event::StateChanged { at, .. } => at,
    }
}

#[test]
fn params_validation_and_from_spec() {
    assert_eq!(fast().validate(), Ok(()));
    assert_eq!(
        SessionParams {
            detect_mult: 0,
            ..fast()
        }
        .validate(),
        Err(ParamsError::ZeroDetectMult)
    );
    assert!(matches!(
        SessionParams {
            required_min_rx: Duration::ZERO,
            ..fast()
        }
        .validate(),
        Err(ParamsError::Interval {
            name: "required_min_rx",
            ..
        })
    ));
    assert!(matches!(
        SessionParams {
            desired_min_tx: Duration::from_secs(5000),
            ..fast()
        }
        .validate(),
        Err(ParamsError::Interval {
            name: "desired_min_tx",
            ..
        })
    ));
    let spec = CheckSpec::Bfd {
        desired_min_tx_ms: 50,
        required_min_rx_ms: 60,
        detect_mult: 4,
        passive: true,
        timing: Default::default(),
    };
    assert_eq!(
        SessionParams::from_spec(&spec),
        Some(SessionParams {
            desired_min_tx: 50 * MS,
            required_min_rx: 60 * MS,
            detect_mult: 4,
            passive: true
        })
    );
    assert_eq!(
        SessionParams::from_spec(&CheckSpec::Icmp {
            timing: Default::default()
        }),
        None
    );
}

#[test]
fn starts_down_and_sends_slowly_while_not_up() {
    let t0 = Instant::now();
    let mut s = Session::new(fast(), discr(7), 42, t0);
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.poll_event(), None, "no event for the initial state");
    let p = s.poll_transmit(t0).expect("first packet at once");
    assert_eq!(p.state, State::Down);
    assert_eq!(p.my_discr, 7);
    assert_eq!(p.your_discr, 0);
    assert_eq!(p.desired_min_tx_us, 1_000_000, "slow rate while not Up");
    assert_eq!(p.required_min_rx_us, 50_000);
    assert_eq!(p.detect_mult, 3);
    assert!(!p.poll && !p.final_);
    assert_eq!(s.poll_transmit(t0), None);
    // Alone, it keeps sending every 750..1000 ms.
    let mut at = t0;
    for _ in 0..50 {
        let next = s.poll_timeout().expect("timer");
        let gap = next - at;
        assert!(gap >= 750 * MS && gap <= 1000 * MS, "gap {gap:?}");
        at = next;
        s.handle_timeout(at);
        assert!(s.poll_transmit(at).is_some());
    }
    assert_eq!(s.state(), State::Down);
}

#[test]
fn handshake_down_init_up() {
    let mut sim = Sim::new(fast(), fast());
    sim.run_until(100 * MS);
    assert_eq!(sim.a.state(), State::Up);
    assert_eq!(sim.b.state(), State::Up);
    // Both start together: each sees Down -> Init, then the other's Init -> Up.
    for evs in [&sim.a_events, &sim.b_events] {
        assert_eq!(
            changes(evs),
            vec![
                (State::Down, State::Init, Diagnostic::None),
                (State::Init, State::Up, Diagnostic::None)
            ]
        );
    }
    assert_eq!(sim.a.remote_discr(), 0xb);
    assert_eq!(sim.b.remote_discr(), 0xa);
}

#[test]
fn handshake_when_peer_starts_late() {
    let mut sim = Sim::new(fast(), fast());
    sim.b_to_a = false;
    sim.a_to_b = false;
    sim.run_until(2500 * MS);
    assert_eq!(sim.a.state(), State::Down);
    sim.b = Session::new(fast(), discr(0xb), 9, sim.now);
    sim.b_to_a = true;
    sim.a_to_b = true;
    let start = sim.now;
    sim.run_until(4000 * MS);
    // B's first packet (Down) moves A to Init; A answers at once; B goes Up; A goes Up.
    assert_eq!(
        changes(&sim.a_events),
        vec![
            (State::Down, State::Init, Diagnostic::None),
            (State::Init, State::Up, Diagnostic::None)
        ]
    );
    assert_eq!(
        changes(&sim.b_events),
        vec![(State::Down, State::Up, Diagnostic::None)]
    );
    assert!(last_change_at(&sim.a_events) - start < 10 * MS);
}

#[test]
fn poll_final_switches_to_fast_rate_only_when_answered() {
    let mut sim = Sim::new(fast(), fast());
    sim.run_until(2 * MS);
    assert_eq!(sim.a.state(), State::Up);
    // Right after Up, P is on and the slow rate is still in force.
    let first_up = sim
        .sent
        .iter()
        .find(|s| s.from_a && s.pkt.state == State::Up)
        .expect("A sent Up");
    assert!(first_up.pkt.poll, "Up announced with a Poll");
    assert_eq!(first_up.pkt.desired_min_tx_us, 50_000);
    sim.run_until(1000 * MS);
    assert!(!sim.a.is_polling(), "poll answered");
    let finals = sim
        .sent
        .iter()
        .filter(|s| !s.from_a && s.pkt.final_)
        .count();
    assert!(finals >= 1, "B answered with F");
    assert_eq!(sim.a.tx_interval(), Some(50 * MS));
    assert_eq!(sim.a.detection_time(), Some(150 * MS));
    let times = sim.a_tx_times(1000 * MS, 3000 * MS);
    sim.run_until(3000 * MS);
    let times = if times.is_empty() {
        sim.a_tx_times(1000 * MS, 3000 * MS)
    } else {
        times
    };
    // 2 s at 37.5..50 ms per packet.
    assert!(
        (40..=54).contains(&times.len()),
        "{} packets in 2 s",
        times.len()
    );
    for w in times.windows(2) {
        let gap = w[1] - w[0];
        assert!(gap >= 37 * MS && gap <= 50 * MS, "gap {gap:?}");
    }
}

#[test]
fn without_final_the_slow_rate_stays_in_force() {
    let mut sim = Sim::new(fast(), fast());
    // Up at 1 ms (two half-millisecond hops); B's Final would arrive at 2 ms.
    sim.run_until(Duration::from_micros(1200));
    assert_eq!(sim.a.state(), State::Up);
    // B never answers: drop its packets but keep A Up by feeding Up packets without F by hand.
    sim.b_to_a = false;
    let b_up = ControlPacket {
        diag: Diagnostic::None,
        state: State::Up,
        poll: false,
        final_: false,
        control_plane_independent: false,
        demand: false,
        detect_mult: 3,
        my_discr: 0xb,
        your_discr: 0xa,
        desired_min_tx_us: 1_000_000,
        required_min_rx_us: 50_000,
        required_min_echo_rx_us: 0,
    };
    for i in 1..=5u32 {
        sim.run_until(i * 500 * MS);
        sim.a.handle_packet(&b_up, sim.now);
    }
    assert!(sim.a.is_polling());
    assert_eq!(sim.a.tx_interval(), Some(SLOW_TX));
    let polls = sim
        .sent
        .iter()
        .filter(|s| s.from_a && s.pkt.state == State::Up && !s.pkt.final_)
        .collect::<Vec<_>>();
    assert!(polls.iter().all(|s| s.pkt.poll), "P stays set");
    assert!(polls.len() <= 5, "{} polls in 2.5 s", polls.len());
}

#[test]
fn detection_timeout_brings_up_session_down() {
    let mut sim = Sim::new(fast(), fast());
    sim.run_until(2000 * MS);
    assert_eq!(sim.a.state(), State::Up);
    sim.b_to_a = false;
    let cut = sim.now;
    sim.run_until(3000 * MS);
    assert_eq!(sim.a.state(), State::Down);
    assert_eq!(sim.a.local_diag(), Diagnostic::ControlDetectionTimeExpired);
    let last_from_b = sim
        .sent
        .iter()
        .filter(|s| !s.from_a && s.at <= cut)
        .map(|s| s.at + sim.delay)
        .max()
        .unwrap();
    let down_at = last_change_at(&sim.a_events);
    assert_eq!(
        down_at - last_from_b,
        150 * MS,
        "exactly detect_mult x agreed interval after the last packet"
    );
    assert!(down_at - cut <= 150 * MS);
    assert_eq!(sim.a.remote_discr(), 0, "remote discriminator forgotten");
    assert_eq!(sim.a.tx_interval(), Some(SLOW_TX), "back to the slow rate");
    // A tells B (whose packets no longer arrive): B goes Down too, by A's signal.
    assert_eq!(sim.b.state(), State::Down);
    assert_eq!(sim.b.local_diag(), Diagnostic::NeighborSignaledSessionDown);
    // The link heals: back Up.
    sim.b_to_a = true;
    sim.run_until(6000 * MS);
    assert_eq!(sim.a.state(), State::Up);
    assert_eq!(sim.b.state(), State::Up);
}

#[test]
fn peer_admin_down_and_back() {
    let mut sim = Sim::new(fast(), fast());
    sim.run_until(1000 * MS);
    sim.b.admin_down(sim.now);
    sim.run_until(1100 * MS);
    assert_eq!(sim.b.state(), State::AdminDown);
    assert_eq!(sim.a.state(), State::Down);
    assert_eq!(sim.a.local_diag(), Diagnostic::NeighborSignaledSessionDown);
    assert_eq!(sim.a.remote_diag(), Diagnostic::AdministrativelyDown);
    assert_eq!(sim.a.remote_state(), State::AdminDown);
    match *sim.a_events.last().unwrap() {
        Event::StateChanged {
            to, remote_diag, ..
        } => {
            assert_eq!(to, State::Down);
            assert_eq!(remote_diag, Diagnostic::AdministrativelyDown);
        }
    }
    // Stays Down while the peer is AdminDown (no Init on AdminDown packets).
    sim.run_until(5000 * MS);
    assert_eq!(sim.a.state(), State::Down);
    let b_admin: Vec<_> = sim
        .sent
        .iter()
        .filter(|s| !s.from_a && s.pkt.state == State::AdminDown)
        .collect();
    assert!(b_admin.len() >= 4);
    assert!(
        b_admin
            .iter()
            .all(|s| s.pkt.diag == Diagnostic::AdministrativelyDown
                && s.pkt.desired_min_tx_us == 1_000_000)
    );
    sim.b.admin_up(sim.now);
    sim.run_until(7000 * MS);
    assert_eq!(sim.a.state(), State::Up);
    assert_eq!(sim.b.state(), State::Up);
}

#[test]
fn admin_down_ignores_received_packets() {
    let mut sim = Sim::new(fast(), fast());
    sim.run_until(1000 * MS);
    sim.a.admin_down(sim.now);
    sim.run_until(3000 * MS);
    assert_eq!(sim.a.state(), State::AdminDown);
    assert_eq!(sim.a.local_diag(), Diagnostic::AdministrativelyDown);
    assert_eq!(sim.b.state(), State::Down);
}

#[test]
fn peer_restart_with_new_discriminator() {
    let mut sim = Sim::new(fast(), fast());
    sim.run_until(1000 * MS);
    assert_eq!(sim.a.state(), State::Up);
    // B restarts within the detection time: new discriminator, Down, Your Discriminator 0.
    sim.in_flight.clear();
    sim.b = Session::new(fast(), discr(0xbb), 3, sim.now);
    sim.b_events.clear();
    sim.run_until(1100 * MS);
    // A hears Down from an unknown discriminator (matched by address): Down. Its Down packet moves
    // the new B to Init, whose Init brings A straight Up.
    assert_eq!(
        changes(&sim.a_events)[2..],
        [
            (
                State::Up,
                State::Down,
                Diagnostic::NeighborSignaledSessionDown
            ),
            (State::Down, State::Up, Diagnostic::None),
        ]
    );
    assert_eq!(sim.a.remote_discr(), 0xbb);
    assert_eq!(sim.b.state(), State::Up);
}

#[test]
fn passive_waits_for_the_peer() {
    let passive = SessionParams {
        passive: true,
        ..fast()
    };
    let t0 = Instant::now();
    let mut s = Session::new(passive, discr(1), 1, t0);
    assert_eq!(s.poll_transmit(t0), None);
    assert_eq!(
        s.poll_timeout(),
        None,
        "nothing to do until the peer speaks"
    );
    assert_eq!(s.tx_interval(), None);

    let mut sim = Sim::new(passive, fast());
    sim.run_until(3000 * MS);
    assert_eq!(sim.a.state(), State::Up);
    assert_eq!(sim.b.state(), State::Up);
    let first_a = sim.sent.iter().find(|s| s.from_a).unwrap();
    assert!(first_a.at > sim.t0, "A spoke only after B");
    // The active side dies: the passive side goes Down and falls silent again.
    sim.b_to_a = false;
    sim.a_to_b = false;
    sim.run_until(4000 * MS);
    assert_eq!(sim.a.state(), State::Down);
    assert_eq!(sim.a.tx_interval(), None);
    let n = sim.sent.iter().filter(|s| s.from_a).count();
    sim.run_until(8000 * MS);
    assert_eq!(sim.sent.iter().filter(|s| s.from_a).count(), n);
}

#[test]
fn poll_is_answered_at_once_with_final() {
    let t0 = Instant::now();
    let mut s = Session::new(fast(), discr(1), 1, t0);
    assert!(s.poll_transmit(t0).is_some());
    let t1 = t0 + 10 * MS;
    let peer = ControlPacket {
        diag: Diagnostic::None,
        state: State::Down,
        poll: true,
        final_: false,
        control_plane_independent: false,
        demand: false,
        detect_mult: 3,
        my_discr: 99,
        your_discr: 0,
        desired_min_tx_us: 1_000_000,
        required_min_rx_us: 1_000_000,
        required_min_echo_rx_us: 0,
    };
    s.handle_packet(&peer, t1);
    assert_eq!(s.poll_timeout(), Some(t1));
    let f = s.poll_transmit(t1).expect("final");
    assert!(f.final_ && !f.poll);
    assert_eq!(f.your_discr, 99);
    assert_eq!(f.state, State::Init);
    // Then the triggered packet for the state change.
    let p = s.poll_transmit(t1).expect("state change packet");
    assert!(!p.final_);
    assert_eq!(s.poll_transmit(t1), None);
}

#[test]
fn detect_mult_one_jitters_75_to_90_percent() {
    let p = SessionParams {
        detect_mult: 1,
        ..fast()
    };
    let t0 = Instant::now();
    let mut s = Session::new(p, discr(1), 5, t0);
    let mut at = t0;
    s.poll_transmit(at);
    let mut gaps = Vec::new();
    for _ in 0..200 {
        let next = s.poll_timeout().unwrap();
        gaps.push(next - at);
        at = next;
        s.poll_transmit(at).unwrap();
    }
    assert!(gaps.iter().all(|g| *g >= 750 * MS && *g <= 900 * MS));
    assert!(gaps.iter().any(|g| *g < 780 * MS) && gaps.iter().any(|g| *g > 870 * MS));
}

fn peer_pkt(state: State, your: u32) -> ControlPacket {
    ControlPacket {
        diag: Diagnostic::None,
        state,
        poll: false,
        final_: false,
        control_plane_independent: false,
        demand: false,
        detect_mult: 5,
        my_discr: 77,
        your_discr: your,
        desired_min_tx_us: 200_000,
        required_min_rx_us: 300_000,
        required_min_echo_rx_us: 0,
    }
}

#[test]
fn detection_time_uses_peer_mult_and_slower_of_rx_and_peer_tx() {
    let t0 = Instant::now();
    let mut s = Session::new(fast(), discr(1), 1, t0);
    assert_eq!(s.detection_time(), None);
    s.handle_packet(&peer_pkt(State::Down, 0), t0);
    // 5 x max(50 ms, 200 ms)
    assert_eq!(s.detection_time(), Some(1000 * MS));
    assert_eq!(s.state(), State::Init);
    // Init times out without an answer.
    s.handle_timeout(t0 + 999 * MS);
    assert_eq!(s.state(), State::Init);
    s.handle_timeout(t0 + 1000 * MS);
    assert_eq!(s.state(), State::Down);
    assert_eq!(s.local_diag(), Diagnostic::ControlDetectionTimeExpired);
}

#[test]
fn down_session_forgets_silent_peer_discriminator() {
    let t0 = Instant::now();
    let mut s = Session::new(fast(), discr(1), 1, t0);
    s.handle_packet(&peer_pkt(State::AdminDown, 0), t0);
    assert_eq!(s.state(), State::Down, "AdminDown peer: no Init");
    assert_eq!(s.remote_discr(), 77);
    s.handle_timeout(t0 + 1000 * MS);
    assert_eq!(s.remote_discr(), 0);
    assert_eq!(s.poll_event(), None, "no state change while Down");
}

#[test]
fn peer_required_rx_sets_our_interval_and_zero_silences_us() {
    let t0 = Instant::now();
    let mut s = Session::new(fast(), discr(1), 1, t0);
    s.poll_transmit(t0).unwrap();
    // Up with the peer asking for 300 ms; our Poll answered.
    s.handle_packet(&peer_pkt(State::Init, 1), t0);
    assert_eq!(s.state(), State::Up);
    assert!(s.is_polling());
    let mut fin = peer_pkt(State::Up, 1);
    fin.final_ = true;
    s.handle_packet(&fin, t0 + MS);
    assert!(!s.is_polling());
    assert_eq!(s.tx_interval(), Some(300 * MS));
    // The peer asks for no packets at all (RequiredMinRx 0): no periodic transmission, but a Poll
    // is still answered.
    let mut quiet = peer_pkt(State::Up, 1);
    quiet.required_min_rx_us = 0;
    while s.poll_transmit(t0 + MS).is_some() {}
    s.handle_packet(&quiet, t0 + 2 * MS);
    assert_eq!(s.tx_interval(), None);
    assert_eq!(s.poll_transmit(t0 + 10_000 * MS), None);
    quiet.poll = true;
    s.handle_packet(&quiet, t0 + 3 * MS);
    assert!(s.poll_transmit(t0 + 3 * MS).unwrap().final_);
    assert_eq!(s.poll_transmit(t0 + 10_000 * MS), None);
}

#[test]
fn peer_polling_to_go_faster_keeps_old_detection_time_until_done() {
    let t0 = Instant::now();
    let mut s = Session::new(fast(), discr(1), 1, t0);
    let mut p = peer_pkt(State::Init, 1);
    p.desired_min_tx_us = 1_000_000;
    s.handle_packet(&p, t0);
    assert_eq!(s.detection_time(), Some(5000 * MS));
    // Poll announcing 50 ms: the peer still sends at 1 s until it hears our Final.
    let mut poll = peer_pkt(State::Up, 1);
    poll.desired_min_tx_us = 50_000;
    poll.poll = true;
    s.handle_packet(&poll, t0 + MS);
    assert_eq!(s.detection_time(), Some(5000 * MS));
    poll.poll = false;
    s.handle_packet(&poll, t0 + 2 * MS);
    assert_eq!(s.detection_time(), Some(250 * MS));
}
