//! Config tests of the end-to-end probes: the `wireguard` check's `inside` keys and the `exec`
//! check (defaults, labels, every error with its line and field). Expected lines are marked with
//! a `#!` comment, as in tests.rs.

use super::*;
use crate::health::spec::InsideProbe;
use crate::health::{CheckSpec, CheckTiming};

const ORIGIN: &str = "probes.toml";
const PROBE_KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const GW_PRIVATE: &str = "UOzlBB0dhzTOdwW4eWZQpL7zbRk7aoxaeNmnJhJ6lVE=";

/// An interface and a backend "chk" whose single check is `check`.
fn with_check(check: &str) -> String {
    format!(
        "[[interface]]\nname = \"eth0\"\n\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n\
         [[backend.check]]\n{check}\n"
    )
}

fn wg(rest: &str) -> String {
    let gw = crate::health::wireguard::public_key_of(GW_PRIVATE).unwrap();
    with_check(&format!(
        "type = \"wireguard\"\npublic_key = \"{gw}\"\nprivate_key = \"{PROBE_KEY}\"\n{rest}"
    ))
}

fn check_of(text: &str) -> CheckSpec {
    let cfg = parse(text, ORIGIN).unwrap_or_else(|e| panic!("should parse: {e}\n{text}"));
    cfg.backend("chk").unwrap().checks[0].clone()
}

/// `text` is rejected at the `#!` line (without one: the check's `[[backend.check]]` line, where
/// a missing key is reported), on `backend "chk".check[0].KEY` (or the check itself with an
/// empty key), for a reason containing `reason`.
#[track_caller]
fn rejects(text: &str, key: &str, reason: &str) {
    let e = parse(text, ORIGIN).expect_err("should be rejected");
    let line = text
        .lines()
        .position(|l| l.contains("#!"))
        .or_else(|| text.lines().position(|l| l == "[[backend.check]]"))
        .map(|i| i + 1)
        .expect("a #! marker or a check");
    let field = if key.is_empty() {
        "backend \"chk\".check[0]".to_string()
    } else {
        format!("backend \"chk\".check[0].{key}")
    };
    match &e {
        ConfigError::Invalid {
            line: l,
            field: f,
            reason: r,
            ..
        } => {
            assert_eq!((*l, f.as_str()), (line, field.as_str()), "{e}");
            assert!(r.contains(reason), "{r:?} lacks {reason:?}");
        }
        other => panic!("unexpected error {other:?}"),
    }
}

#[test]
fn inside_keys_parse_with_their_defaults_and_label() {
    match check_of(&wg(
        "inside = \"10.96.0.1\"\ntunnel_address = \"192.0.2.77\"",
    )) {
        CheckSpec::Wireguard {
            inside: Some(i),
            timing,
            ..
        } => {
            assert_eq!(
                i,
                InsideProbe {
                    addr: "10.96.0.1".parse().unwrap(),
                    tunnel_address: "192.0.2.77".parse().unwrap(),
                    // The default: the check's timeout_ms.
                    timeout_ms: 500,
                }
            );
            assert_eq!(timing.interval_ms, 5000);
        }
        other => panic!("{other:?}"),
    }
    let c = check_of(&wg(
        "inside = \"fd00:96::1\"\ntunnel_address = \"fd00:77::77\"\ninside_timeout_ms = 2000",
    ));
    assert_eq!(c.label(), "wireguard:51820>fd00:96::1");
    assert_eq!(c.probe_budget(), std::time::Duration::from_millis(2500));
    // Serialised and read back (what status and the cluster copy do) it is the same check.
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains("\"inside\":\"fd00:96::1\""), "{json}");
    let back: CheckSpec = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    // Without inside, the label and the budget are the plain handshake's.
    let plain = check_of(&wg(""));
    assert_eq!(plain.label(), "wireguard:51820");
    assert_eq!(plain.probe_budget(), std::time::Duration::from_millis(500));
}

#[test]
fn inside_errors_name_their_line() {
    rejects(
        &wg("inside = \"10.96.0.1\""),
        "",
        "missing field `tunnel_address`",
    );
    rejects(
        &wg("tunnel_address = \"192.0.2.77\" #!"),
        "tunnel_address",
        "is only used with `inside`",
    );
    rejects(
        &wg("inside_timeout_ms = 100 #!"),
        "inside_timeout_ms",
        "is only used with `inside`",
    );
    rejects(
        &wg("inside = \"10.96.0.1\"\ntunnel_address = \"fd00::77\" #!"),
        "tunnel_address",
        "of different families",
    );
    rejects(
        &wg("inside = \"224.0.0.1\" #!\ntunnel_address = \"192.0.2.77\""),
        "inside",
        "not a unicast address",
    );
    rejects(
        &wg("inside = \"10.96.0.1\"\ntunnel_address = \"10.96.0.1\" #!"),
        "tunnel_address",
        "must not be the inside host itself",
    );
    rejects(
        &wg("inside = \"10.96.0.1\"\ntunnel_address = \"192.0.2.77\"\ninside_timeout_ms = 0 #!"),
        "inside_timeout_ms",
        "must be at least 1",
    );
    rejects(
        &wg(
            "inside = \"10.96.0.1\"\ntunnel_address = \"192.0.2.77\"\ninterval_ms = 1000\n\
             inside_timeout_ms = 800 #!",
        ),
        "inside_timeout_ms",
        "timeout_ms + inside_timeout_ms (500 + 800 ms) is longer than interval_ms (1000 ms)",
    );
    // With the default inside_timeout_ms (= timeout_ms) the error points at `inside`.
    rejects(
        &wg(
            "interval_ms = 250\ntimeout_ms = 200\ninside = \"10.96.0.1\" #!\n\
             tunnel_address = \"192.0.2.77\"",
        ),
        "inside",
        "(200 + 200 ms) is longer than interval_ms (250 ms)",
    );
    rejects(
        &with_check("type = \"icmp\"\ninside = \"10.96.0.1\" #!"),
        "inside",
        "unknown field `inside`: a check of type \"icmp\"",
    );
}

#[test]
fn exec_check_parses_with_its_defaults_and_errors() {
    let c = check_of(&with_check(
        "type = \"exec\"\ncommand = [\"/usr/local/lib/vpnlb/ipsec-inside\", \"10.96.0.1\"]",
    ));
    assert_eq!(
        c,
        CheckSpec::Exec {
            command: vec![
                "/usr/local/lib/vpnlb/ipsec-inside".into(),
                "10.96.0.1".into()
            ],
            env: Vec::new(),
            timing: CheckTiming {
                interval_ms: 10_000,
                timeout_ms: 5_000,
                ..CheckTiming::default()
            },
        }
    );
    assert_eq!(c.label(), "exec:ipsec-inside");
    let back: CheckSpec = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    rejects(
        &with_check("type = \"exec\"\ninterval_ms = 20000"),
        "",
        "missing field `command`",
    );
    rejects(
        &with_check("type = \"exec\"\ncommand = [] #!"),
        "command",
        "needs at least the program to run",
    );
    rejects(
        &with_check("type = \"exec\"\ncommand = [\"\", \"x\"] #!"),
        "command[0]",
        "the program path must not be empty",
    );
    rejects(
        &with_check("type = \"exec\"\ncommand = [\"/bin/true\"]\ninterval_ms = 1000 #!"),
        "interval_ms",
        "1000 ms is shorter than timeout_ms (5000 ms, the default)",
    );
    rejects(
        &with_check("type = \"exec\"\ncommand = [\"/bin/true\"]\nport = 1 #!"),
        "port",
        "unknown field `port`: a check of type \"exec\" takes `type`, `command`",
    );
}
