//! The decisions of one probe round over many UDP flows ([`crate::testbed::Flows::probe`]), apart
//! from the sockets and the clock: which flows have answered and from which gateway, when to send
//! again to those that have not, and when to give up. UDP is lossy and a loaded machine is slow, so
//! a flow without an answer gets its datagram again (with a growing gap) until the deadline; a flow
//! that has answered never does, so a wrong gateway's answer stays the answer, and a second answer
//! from another gateway in the same round is an error at once.

use std::time::{Duration, Instant};

/// Gap before the first resend to a flow that has not answered; it doubles after every resend.
pub const RESEND_FIRST: Duration = Duration::from_millis(200);
/// Largest gap between two resends.
pub const RESEND_MAX: Duration = Duration::from_secs(1);

/// What the prober does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send (again) to these flows now: none of them has answered yet.
    Send(Vec<usize>),
    /// Collect answers until this instant (the next resend or the deadline), then ask again.
    Wait(Instant),
    /// Every flow has answered: the round is over.
    Done,
    /// The deadline has passed: the flows still without an answer never answered.
    Expired,
}

/// One round: the answers so far and the resend schedule.
#[derive(Debug, Clone)]
pub struct ProbeRound {
    answers: Vec<Option<String>>,
    deadline: Instant,
    next_send: Instant,
    gap: Duration,
}

impl ProbeRound {
    /// A round over `flows` flows that starts at `now` (the first [`ProbeRound::step`] sends to
    /// every flow) and gives up at `now + wait`.
    pub fn new(flows: usize, now: Instant, wait: Duration) -> ProbeRound {
        ProbeRound {
            answers: vec![None; flows],
            deadline: now + wait,
            next_send: now,
            gap: RESEND_FIRST,
        }
    }

    /// Records that `gateway` answered flow `flow` in this round. The first answer is the flow's
    /// answer; the same gateway again (the answer to a resent datagram) changes nothing; another
    /// gateway is an error: one flow, two gateways.
    pub fn answer(&mut self, flow: usize, gateway: &str) -> Result<(), String> {
        match &self.answers[flow] {
            None => {
                self.answers[flow] = Some(gateway.to_string());
                Ok(())
            }
            Some(g) if g == gateway => Ok(()),
            Some(g) => Err(format!(
                "flow {flow} answered by {g} and then by {gateway} in the same round"
            )),
        }
    }

    /// What to do at `now`. A [`Step::Send`] is scheduled: the caller sends to exactly those flows.
    pub fn step(&mut self, now: Instant) -> Step {
        if self.answers.iter().all(Option::is_some) {
            return Step::Done;
        }
        if now >= self.deadline {
            return Step::Expired;
        }
        if now >= self.next_send {
            self.next_send = now + self.gap;
            self.gap = (self.gap * 2).min(RESEND_MAX);
            return Step::Send(self.unanswered());
        }
        Step::Wait(self.next_send.min(self.deadline))
    }

    /// The flows without an answer yet.
    pub fn unanswered(&self) -> Vec<usize> {
        (0..self.answers.len())
            .filter(|&i| self.answers[i].is_none())
            .collect()
    }

    /// Per flow, the gateway that answered it (None: no answer).
    pub fn answers(&self) -> &[Option<String>] {
        &self.answers
    }

    pub fn into_answers(self) -> Vec<Option<String>> {
        self.answers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    /// Runs a round on a fake clock: `answer_at(flow, sends so far)` gives the gateway that answers
    /// that send of the flow, if any (the answer arrives before the next step). Returns the
    /// answers and the number of datagrams sent per flow.
    fn simulate(
        flows: usize,
        wait: Duration,
        answer_at: impl Fn(usize, u32) -> Option<&'static str>,
    ) -> (Result<Vec<Option<String>>, String>, Vec<u32>) {
        let t0 = Instant::now();
        let mut now = t0;
        let mut round = ProbeRound::new(flows, now, wait);
        let mut sent = vec![0u32; flows];
        loop {
            match round.step(now) {
                Step::Send(to) => {
                    for i in to {
                        sent[i] += 1;
                        if let Some(g) = answer_at(i, sent[i])
                            && let Err(e) = round.answer(i, g)
                        {
                            return (Err(e), sent);
                        }
                    }
                }
                Step::Wait(until) => {
                    assert!(until > now, "a wait must move the clock");
                    now = until;
                }
                Step::Done | Step::Expired => return (Ok(round.into_answers()), sent),
            }
            assert!(now <= t0 + wait + RESEND_MAX, "the round never ended");
        }
    }

    fn owners(v: &[&str]) -> Vec<Option<String>> {
        v.iter().map(|g| Some(g.to_string())).collect()
    }

    #[test]
    fn every_flow_answering_at_once_means_one_datagram_each() {
        let (got, sent) = simulate(3, WAIT, |i, _| Some(["gw1", "gw2", "gw3"][i]));
        assert_eq!(got.unwrap(), owners(&["gw1", "gw2", "gw3"]));
        assert_eq!(sent, [1, 1, 1]);
    }

    #[test]
    fn lost_datagrams_are_resent_to_the_silent_flows_only() {
        // Flow 1 loses its first two datagrams, flow 2 its first: they are resent, flow 0 is not.
        let (got, sent) = simulate(3, WAIT, |i, n| match (i, n) {
            (0, _) => Some("gw1"),
            (1, n) if n >= 3 => Some("gw2"),
            (2, n) if n >= 2 => Some("gw3"),
            _ => None,
        });
        assert_eq!(got.unwrap(), owners(&["gw1", "gw2", "gw3"]));
        assert_eq!(sent, [1, 3, 2]);
    }

    #[test]
    fn resends_back_off_and_stop_at_the_deadline() {
        let t0 = Instant::now();
        let mut r = ProbeRound::new(2, t0, Duration::from_millis(2500));
        assert_eq!(r.step(t0), Step::Send(vec![0, 1]));
        r.answer(0, "gw1").unwrap();
        let mut sends = Vec::new();
        let mut now = t0;
        loop {
            match r.step(now) {
                Step::Wait(until) => now = until,
                Step::Send(to) => {
                    assert_eq!(to, [1], "only the silent flow is resent");
                    sends.push(now - t0);
                }
                Step::Expired => break,
                Step::Done => panic!("flow 1 never answered"),
            }
        }
        let ms: Vec<u128> = sends.iter().map(Duration::as_millis).collect();
        assert_eq!(
            ms,
            [200, 600, 1400, 2400],
            "gaps 200, 400, 800, then capped at 1000 ms"
        );
        assert_eq!(now - t0, Duration::from_millis(2500));
        assert_eq!(r.into_answers(), vec![Some("gw1".to_string()), None]);
    }

    #[test]
    fn a_flow_that_never_answers_is_none_at_the_deadline() {
        let (got, sent) = simulate(2, WAIT, |i, _| (i == 0).then_some("gw1"));
        assert_eq!(got.unwrap(), vec![Some("gw1".to_string()), None]);
        assert!(sent[1] > 1, "the silent flow was resent: {sent:?}");
        assert_eq!(sent[0], 1);
    }

    /// The control: a flow answered by the wrong gateway keeps that answer (it is not resent in
    /// the hope of a better one), so the caller's comparison fails.
    #[test]
    fn a_wrong_gateway_stays_the_answer() {
        let want = owners(&["gw1", "gw2"]);
        let (got, sent) = simulate(2, WAIT, |i, n| match (i, n) {
            (0, _) => Some("gw1"),
            (1, 1) => Some("gw3"),
            (1, _) => Some("gw2"),
            _ => None,
        });
        let got = got.unwrap();
        assert_eq!(sent, [1, 1], "an answered flow is never resent");
        assert_eq!(got, owners(&["gw1", "gw3"]));
        assert_ne!(got, want, "the caller's check must see the wrong gateway");
    }

    #[test]
    fn two_gateways_answering_one_flow_fail_at_once() {
        let t0 = Instant::now();
        let mut r = ProbeRound::new(2, t0, WAIT);
        assert_eq!(r.step(t0), Step::Send(vec![0, 1]));
        r.answer(1, "gw2").unwrap();
        // The answer to a resent datagram from the same gateway: fine.
        r.answer(1, "gw2").unwrap();
        let e = r.answer(1, "gw3").unwrap_err();
        assert!(
            e.contains("flow 1") && e.contains("gw2") && e.contains("gw3"),
            "{e}"
        );
        // Flow 0 is still waited for.
        assert_eq!(r.step(t0), Step::Wait(t0 + RESEND_FIRST));
    }

    #[test]
    fn a_short_wait_never_resends() {
        // The failover poll probes with a 20 ms wait: one datagram per flow, then the round ends.
        let (got, sent) = simulate(2, Duration::from_millis(20), |_, _| None);
        assert_eq!(got.unwrap(), vec![None, None]);
        assert_eq!(sent, [1, 1]);
    }
}
