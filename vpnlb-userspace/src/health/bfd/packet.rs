//! The BFD Control packet (RFC 5880 §4.1, version 1, 24 bytes, no authentication): encode, and
//! decode with the validation of RFC 5880 §6.8.6 that does not need session state.

use std::fmt;

use thiserror::Error;

/// Length of a Control packet without an Authentication Section.
pub const PACKET_LEN: usize = 24;
/// The only protocol version (RFC 5880 §4.1).
pub const VERSION: u8 = 1;

/// Session state (RFC 5880 §4.1 "Sta").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::AdminDown => "AdminDown",
            State::Down => "Down",
            State::Init => "Init",
            State::Up => "Up",
        })
    }
}

/// Diagnostic code (RFC 5880 §4.1 "Diag"): the local system's reason for the last state change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Diagnostic {
    None,
    ControlDetectionTimeExpired,
    EchoFunctionFailed,
    NeighborSignaledSessionDown,
    ForwardingPlaneReset,
    PathDown,
    ConcatenatedPathDown,
    AdministrativelyDown,
    ReverseConcatenatedPathDown,
    /// 9-31: reserved for future use; kept so a peer's value can be shown.
    Reserved(u8),
}

impl Diagnostic {
    pub fn code(self) -> u8 {
        match self {
            Diagnostic::None => 0,
            Diagnostic::ControlDetectionTimeExpired => 1,
            Diagnostic::EchoFunctionFailed => 2,
            Diagnostic::NeighborSignaledSessionDown => 3,
            Diagnostic::ForwardingPlaneReset => 4,
            Diagnostic::PathDown => 5,
            Diagnostic::ConcatenatedPathDown => 6,
            Diagnostic::AdministrativelyDown => 7,
            Diagnostic::ReverseConcatenatedPathDown => 8,
            Diagnostic::Reserved(c) => c & 0x1f,
        }
    }

    pub fn from_code(c: u8) -> Diagnostic {
        match c & 0x1f {
            0 => Diagnostic::None,
            1 => Diagnostic::ControlDetectionTimeExpired,
            2 => Diagnostic::EchoFunctionFailed,
            3 => Diagnostic::NeighborSignaledSessionDown,
            4 => Diagnostic::ForwardingPlaneReset,
            5 => Diagnostic::PathDown,
            6 => Diagnostic::ConcatenatedPathDown,
            7 => Diagnostic::AdministrativelyDown,
            8 => Diagnostic::ReverseConcatenatedPathDown,
            c => Diagnostic::Reserved(c),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::None => f.write_str("no diagnostic"),
            Diagnostic::ControlDetectionTimeExpired => {
                f.write_str("control detection time expired")
            }
            Diagnostic::EchoFunctionFailed => f.write_str("echo function failed"),
            Diagnostic::NeighborSignaledSessionDown => {
                f.write_str("neighbor signaled session down")
            }
            Diagnostic::ForwardingPlaneReset => f.write_str("forwarding plane reset"),
            Diagnostic::PathDown => f.write_str("path down"),
            Diagnostic::ConcatenatedPathDown => f.write_str("concatenated path down"),
            Diagnostic::AdministrativelyDown => f.write_str("administratively down"),
            Diagnostic::ReverseConcatenatedPathDown => {
                f.write_str("reverse concatenated path down")
            }
            Diagnostic::Reserved(c) => write!(f, "reserved diagnostic {c}"),
        }
    }
}

/// A BFD Control packet. Intervals are in microseconds, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControlPacket {
    pub diag: Diagnostic,
    pub state: State,
    /// P: the sender asks for parameter confirmation (Poll Sequence).
    pub poll: bool,
    /// F: answer to a Poll.
    pub final_: bool,
    /// C: BFD does not share fate with the control plane.
    pub control_plane_independent: bool,
    /// D: Demand mode (we never set it; a peer's is recorded but not used).
    pub demand: bool,
    pub detect_mult: u8,
    pub my_discr: u32,
    pub your_discr: u32,
    pub desired_min_tx_us: u32,
    pub required_min_rx_us: u32,
    pub required_min_echo_rx_us: u32,
}

/// Why a received datagram is not a usable Control packet (each is a "discard" of §6.8.6).
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PacketError {
    #[error("bfd packet too short: {len} bytes, need {PACKET_LEN}")]
    TooShort { len: usize },
    #[error("bfd version {version} not supported (only 1)")]
    BadVersion { version: u8 },
    #[error("bfd length field {length} invalid for a {received}-byte datagram")]
    BadLength { length: u8, received: usize },
    #[error("bfd detect multiplier is zero")]
    ZeroDetectMult,
    #[error("bfd multipoint bit set")]
    Multipoint,
    #[error("bfd my discriminator is zero")]
    ZeroMyDiscriminator,
    #[error("bfd your discriminator is zero in state {state}")]
    ZeroYourDiscriminator { state: State },
    #[error("bfd authentication present but none is configured")]
    AuthNotSupported,
    #[error("bfd poll and final bits both set")]
    PollAndFinal,
}

const FLAG_P: u8 = 0x20;
const FLAG_F: u8 = 0x10;
const FLAG_C: u8 = 0x08;
const FLAG_A: u8 = 0x04;
const FLAG_D: u8 = 0x02;
const FLAG_M: u8 = 0x01;

impl ControlPacket {
    /// Encodes the packet: version 1, no authentication, multipoint clear, length 24.
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (VERSION << 5) | self.diag.code();
        let mut flags = (self.state as u8) << 6;
        if self.poll {
            flags |= FLAG_P;
        }
        if self.final_ {
            flags |= FLAG_F;
        }
        if self.control_plane_independent {
            flags |= FLAG_C;
        }
        if self.demand {
            flags |= FLAG_D;
        }
        b[1] = flags;
        b[2] = self.detect_mult;
        b[3] = PACKET_LEN as u8;
        b[4..8].copy_from_slice(&self.my_discr.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_discr.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx_us.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx_us.to_be_bytes());
        b[20..24].copy_from_slice(&self.required_min_echo_rx_us.to_be_bytes());
        b
    }

    /// Decodes one UDP payload and applies the state-free checks of RFC 5880 §6.8.6 (version,
    /// length, detect mult, multipoint, discriminators, authentication) plus P and F not both set
    /// (§6.8.7). Bytes after `Length` are ignored.
    pub fn decode(buf: &[u8]) -> Result<ControlPacket, PacketError> {
        if buf.len() < PACKET_LEN {
            // Even the version cannot be trusted on a runt; report the length first.
            if let Some(&b0) = buf.first()
                && b0 >> 5 != VERSION
            {
                return Err(PacketError::BadVersion { version: b0 >> 5 });
            }
            return Err(PacketError::TooShort { len: buf.len() });
        }
        let version = buf[0] >> 5;
        if version != VERSION {
            return Err(PacketError::BadVersion { version });
        }
        let flags = buf[1];
        let length = buf[3];
        let auth = flags & FLAG_A != 0;
        let min_len = if auth { PACKET_LEN + 2 } else { PACKET_LEN };
        if (length as usize) < min_len || length as usize > buf.len() {
            return Err(PacketError::BadLength {
                length,
                received: buf.len(),
            });
        }
        let detect_mult = buf[2];
        if detect_mult == 0 {
            return Err(PacketError::ZeroDetectMult);
        }
        if flags & FLAG_M != 0 {
            return Err(PacketError::Multipoint);
        }
        let be = |i: usize| u32::from_be_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
        let my_discr = be(4);
        let your_discr = be(8);
        let state = State::from_bits(flags >> 6);
        if my_discr == 0 {
            return Err(PacketError::ZeroMyDiscriminator);
        }
        if your_discr == 0 && !matches!(state, State::Down | State::AdminDown) {
            return Err(PacketError::ZeroYourDiscriminator { state });
        }
        if auth {
            return Err(PacketError::AuthNotSupported);
        }
        let poll = flags & FLAG_P != 0;
        let final_ = flags & FLAG_F != 0;
        if poll && final_ {
            return Err(PacketError::PollAndFinal);
        }
        Ok(ControlPacket {
            diag: Diagnostic::from_code(buf[0]),
            state,
            poll,
            final_,
            control_plane_independent: flags & FLAG_C != 0,
            demand: flags & FLAG_D != 0,
            detect_mult,
            my_discr,
            your_discr,
            desired_min_tx_us: be(12),
            required_min_rx_us: be(16),
            required_min_echo_rx_us: be(20),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FRR bfdd 8.4.4 in state Down, captured on a veth: slow 1 s timers while Down, echo 50 ms.
    const FRR_DOWN: [u8; 24] = [
        0x20, 0x40, 0x03, 0x18, 0xd0, 0xd7, 0x3f, 0x68, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0f, 0x42,
        0x40, 0x00, 0x0f, 0x42, 0x40, 0x00, 0x00, 0xc3, 0x50,
    ];

    fn sample() -> ControlPacket {
        ControlPacket {
            diag: Diagnostic::None,
            state: State::Up,
            poll: false,
            final_: false,
            control_plane_independent: false,
            demand: false,
            detect_mult: 3,
            my_discr: 0x1122_3344,
            your_discr: 0x5566_7788,
            desired_min_tx_us: 50_000,
            required_min_rx_us: 50_000,
            required_min_echo_rx_us: 0,
        }
    }

    #[test]
    fn decodes_frr_down_packet() {
        let p = ControlPacket::decode(&FRR_DOWN).expect("valid");
        assert_eq!(p.state, State::Down);
        assert_eq!(p.diag, Diagnostic::None);
        assert_eq!(p.detect_mult, 3);
        assert_eq!(p.my_discr, 0xd0d7_3f68);
        assert_eq!(p.your_discr, 0);
        assert_eq!(p.desired_min_tx_us, 1_000_000);
        assert_eq!(p.required_min_rx_us, 1_000_000);
        assert_eq!(p.required_min_echo_rx_us, 50_000);
        assert!(!p.poll && !p.final_ && !p.demand && !p.control_plane_independent);
        assert_eq!(p.encode(), FRR_DOWN, "re-encodes to the same bytes");
    }

    #[test]
    fn encodes_hand_made_bytes() {
        let mut p = sample();
        p.poll = true;
        p.diag = Diagnostic::NeighborSignaledSessionDown;
        let b = p.encode();
        assert_eq!(
            b,
            [
                0x23, 0xe0, 3, 24, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0, 0, 0xc3,
                0x50, 0, 0, 0xc3, 0x50, 0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn round_trips_every_state_flag_and_diag() {
        for state in [State::AdminDown, State::Down, State::Init, State::Up] {
            for code in 0..32u8 {
                for (poll, final_, c, d) in [
                    (false, false, false, false),
                    (true, false, true, false),
                    (false, true, false, true),
                ] {
                    let p = ControlPacket {
                        diag: Diagnostic::from_code(code),
                        state,
                        poll,
                        final_,
                        control_plane_independent: c,
                        demand: d,
                        ..sample()
                    };
                    let back = ControlPacket::decode(&p.encode()).expect("round trip");
                    assert_eq!(back, p);
                    assert_eq!(back.diag.code(), code);
                }
            }
        }
    }

    #[test]
    fn trailing_bytes_after_length_are_ignored() {
        let mut v = sample().encode().to_vec();
        v.extend_from_slice(&[0xde, 0xad]);
        assert_eq!(ControlPacket::decode(&v), Ok(sample()));
    }

    fn with(f: impl FnOnce(&mut [u8; 24])) -> Result<ControlPacket, PacketError> {
        let mut b = sample().encode();
        f(&mut b);
        ControlPacket::decode(&b)
    }

    #[test]
    fn rejects_invalid_packets() {
        assert_eq!(
            ControlPacket::decode(&sample().encode()[..23]),
            Err(PacketError::TooShort { len: 23 })
        );
        assert_eq!(
            ControlPacket::decode(&[]),
            Err(PacketError::TooShort { len: 0 })
        );
        assert_eq!(
            with(|b| b[0] = (2 << 5) | (b[0] & 0x1f)),
            Err(PacketError::BadVersion { version: 2 })
        );
        assert_eq!(
            ControlPacket::decode(&[0x00; 4]),
            Err(PacketError::BadVersion { version: 0 })
        );
        assert_eq!(
            with(|b| b[3] = 23),
            Err(PacketError::BadLength {
                length: 23,
                received: 24
            })
        );
        assert_eq!(
            with(|b| b[3] = 25),
            Err(PacketError::BadLength {
                length: 25,
                received: 24
            })
        );
        assert_eq!(with(|b| b[2] = 0), Err(PacketError::ZeroDetectMult));
        assert_eq!(with(|b| b[1] |= FLAG_M), Err(PacketError::Multipoint));
        assert_eq!(
            with(|b| b[4..8].fill(0)),
            Err(PacketError::ZeroMyDiscriminator)
        );
        assert_eq!(
            with(|b| b[8..12].fill(0)),
            Err(PacketError::ZeroYourDiscriminator { state: State::Up })
        );
        assert_eq!(
            with(|b| {
                b[8..12].fill(0);
                b[1] = (State::Init as u8) << 6;
            }),
            Err(PacketError::ZeroYourDiscriminator { state: State::Init })
        );
        assert_eq!(
            with(|b| b[1] |= FLAG_P | FLAG_F),
            Err(PacketError::PollAndFinal)
        );
    }

    #[test]
    fn zero_your_discriminator_is_fine_while_down() {
        for state in [State::Down, State::AdminDown] {
            let p = with(|b| {
                b[8..12].fill(0);
                b[1] = (state as u8) << 6;
            })
            .expect("valid");
            assert_eq!(p.your_discr, 0);
            assert_eq!(p.state, state);
        }
    }

    #[test]
    fn authentication_is_rejected() {
        // A bit set with a too-short length: a length error.
        assert_eq!(
            with(|b| b[1] |= FLAG_A),
            Err(PacketError::BadLength {
                length: 24,
                received: 24
            })
        );
        // A bit with a plausible simple-password section: refused, no auth is configured.
        let mut v = sample().encode().to_vec();
        v[1] |= FLAG_A;
        v[3] = 28;
        v.extend_from_slice(&[1, 4, 1, b'x']);
        assert_eq!(
            ControlPacket::decode(&v),
            Err(PacketError::AuthNotSupported)
        );
    }

    #[test]
    fn error_messages_are_clear() {
        assert_eq!(
            PacketError::ZeroYourDiscriminator { state: State::Up }.to_string(),
            "bfd your discriminator is zero in state Up"
        );
        assert_eq!(
            Diagnostic::ControlDetectionTimeExpired.to_string(),
            "control detection time expired"
        );
    }
}
