//! Config tests: defaults, every validation error with its line and field, syntax errors, unknown
//! keys at every level, the example configs under docs/examples/, and id assignment.
//!
//! Expected lines are marked in the test text with a `#!` comment on the line the error must name.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use vpnlb_common::{
    DEFAULT_MAX_SESSIONS, FWD_MODE_GUE, PROTO_ESP, PROTO_UDP, VIP_F_HASH_SRC_ONLY, VipKey,
};

use super::*;
use crate::health::{CheckSpec, CheckTiming};

const ORIGIN: &str = "test.toml";

/// An interface and three backends (two IPv4, one IPv6).
const HEAD: &str = r#"
[[interface]]
name = "eth0"

[[backend]]
name = "gw1"
address = "10.0.0.11"

[[backend]]
name = "gw2"
address = "10.0.0.12"

[[backend]]
name = "gw6"
address = "2001:db8::6"
"#;

/// A valid VIP over gw1 and gw2.
const VIP: &str = r#"
[[vip]]
name = "wg"
address = "203.0.113.10"
port = 51820
protocol = "udp"
[[vip.pool]]
name = "primary"
backends = ["gw1", "gw2"]
"#;

fn ok(text: &str) -> Config {
    parse(text, ORIGIN).unwrap_or_else(|e| panic!("config should parse: {e}\n---\n{text}"))
}

fn fails(text: &str) -> ConfigError {
    match parse(text, ORIGIN) {
        Ok(_) => panic!("config should be rejected:\n{text}"),
        Err(e) => e,
    }
}

/// The 1-based line holding the `#!` marker (1 if there is none).
fn marked_line(text: &str) -> usize {
    let hits: Vec<usize> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("#!"))
        .map(|(i, _)| i + 1)
        .collect();
    assert!(hits.len() <= 1, "more than one #! marker in:\n{text}");
    hits.first().copied().unwrap_or(1)
}

/// `text` is rejected at the marked line, on `field`, with a reason containing `reason`.
#[track_caller]
fn rejects(text: &str, field: &str, reason: &str) {
    let e = fails(text);
    let ConfigError::Invalid {
        file,
        line,
        field: f,
        reason: r,
    } = &e
    else {
        panic!("expected an Invalid error, got {e:?}");
    };
    let want_line = marked_line(text);
    assert_eq!(file, ORIGIN);
    assert_eq!(
        (*line, f.as_str()),
        (want_line, field),
        "wrong place for error {e}\n---\n{}",
        numbered(text)
    );
    assert!(
        r.contains(reason),
        "reason {r:?} does not contain {reason:?} (error: {e})"
    );
}

fn numbered(text: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| format!("{:3} {l}\n", i + 1))
        .collect()
}

fn with_vip(extra: &str) -> String {
    format!("{HEAD}{VIP}{extra}")
}

/// HEAD plus a backend "chk" whose single check is `check` (a `[[backend.check]]` body).
fn with_check(check: &str) -> String {
    format!(
        "{HEAD}\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n[[backend.check]]\n{check}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// Defaults and accessors

#[test]
fn defaults_apply() {
    let cfg = ok(&with_vip(""));
    let a = &cfg.agent;
    assert_eq!(a.pin_dir, crate::dataplane::loader::default_pin_dir());
    assert_eq!(a.control_socket, PathBuf::from("/run/vpnlb/control.sock"));
    assert_eq!(
        a.metrics_listen,
        Some(SocketAddr::from(([127, 0, 0, 1], 9100)))
    );
    assert_eq!(a.log_format, LogFormat::Human);
    assert_eq!(a.max_sessions, DEFAULT_MAX_SESSIONS);
    assert_eq!(a.flood_max_inserts_per_sec, 0);
    assert_eq!((a.encap_source_v4, a.encap_source_v6), (None, None));
    assert_eq!(
        (a.encap_source_v4_hash_bits, a.encap_source_v6_hash_bits),
        (0, 0)
    );
    assert_eq!(*a, AgentConfig::default());

    assert_eq!(cfg.interfaces[0].mode, AttachMode::Native);
    let b = &cfg.backends[0];
    assert_eq!((b.weight, b.mac, &b.interface), (1, None, &None));
    assert!(b.checks.is_empty());

    let v = &cfg.vips[0];
    assert_eq!(v.hash, HashMode::FiveTuple);
    assert_eq!(v.forwarding, Forwarding::L2dsr);
    assert_eq!((v.gue_port, v.gue_port()), (None, 0));
    assert_eq!((v.idle_timeout_s, v.mtu, v.ring_size), (0, 0, 65537));
    assert_eq!(v.pools[0].priority, 100);
    assert!(v.classes.is_empty());
    assert_eq!(cfg.hooks, HooksConfig::default());
    assert_eq!(cfg.hooks.timeout_ms, 2000);
    assert!(cfg.hooks.exec.is_empty());
    assert_eq!(cfg.origin(), ORIGIN);
}

#[test]
fn check_defaults_and_fields() {
    let cfg = ok(&with_check("type = \"icmp\""));
    assert_eq!(
        cfg.backend("chk").unwrap().checks,
        vec![CheckSpec::Icmp {
            timing: CheckTiming::default()
        }]
    );
    let cfg = ok(&with_check(
        "type = \"https\"\nport = 443\nhost = \"gw.example\"\ninsecure = true\ninterval_ms = 2000\nrise = 1",
    ));
    assert_eq!(
        cfg.backend("chk").unwrap().checks[0],
        CheckSpec::Https {
            port: 443,
            path: "/".into(),
            expect_status: 200,
            body_contains: None,
            host: Some("gw.example".into()),
            insecure: true,
            ca_file: None,
            timing: CheckTiming {
                interval_ms: 2000,
                timeout_ms: 500,
                rise: 1,
                fall: 3
            },
        }
    );
    let cfg = ok(&with_check("type = \"bfd\"\npassive = true"));
    assert_eq!(
        cfg.backend("chk").unwrap().checks[0],
        CheckSpec::Bfd {
            desired_min_tx_ms: 300,
            required_min_rx_ms: 300,
            detect_mult: 3,
            passive: true,
            timing: CheckTiming::default(),
        }
    );
    let cfg = ok(&with_check(
        "type = \"udp\"\nport = 7000\npayload_hex = \"de ad\"\nexpect = \"up\"",
    ));
    assert!(matches!(
        &cfg.backend("chk").unwrap().checks[0],
        CheckSpec::Udp { port: 7000, payload_hex: Some(h), expect: Some(e), .. } if h == "de ad" && e == "up"
    ));
}

#[test]
fn check_spec_round_trips_through_serde() {
    // spec.rs serializes with the derived (flattened) form and deserializes through RawCheck.
    let cfg = ok(&format!(
        "{HEAD}\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n\
         [[backend.check]]\ntype = \"http\"\nport = 80\npath = \"/h\"\nbody_contains = \"ok\"\n\
         [[backend.check]]\ntype = \"tcp\"\nport = 22\nfall = 5\n\
         [[backend.check]]\ntype = \"bfd\"\ndetect_mult = 5\n"
    ));
    let checks = &cfg.backend("chk").unwrap().checks;
    let json = serde_json::to_string(checks).unwrap();
    let back: Vec<CheckSpec> = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, checks);
}

#[test]
fn explicit_values_and_accessors() {
    let cfg = ok(r#"
[agent]
pin_dir = "/sys/fs/bpf/test"
control_socket = "/tmp/vpnlb.sock"
metrics_listen = ""
log_format = "json"
max_sessions = 1000
flood_max_inserts_per_sec = 5000
encap_source_v4 = "192.0.2.1"
encap_source_v4_hash_bits = 8
encap_source_v6 = "2001:db8::1"
encap_source_v6_hash_bits = 32

[[interface]]
name = "eth0"
mode = "native-only"
[[interface]]
name = "eth1"
mode = "generic"

[[backend]]
name = "a"
address = "10.0.0.1"
mac = "02:AB:cd:00:00:01"
interface = "eth1"
weight = 1000

[[vip]]
name = "esp"
address = "203.0.113.1"
protocol = "esp"
port = 0
hash = "source"
forwarding = "gue"
idle_timeout_s = 60
mtu = 1500
ring_size = 251
[[vip.pool]]
name = "p"
priority = -5
backends = ["a"]
"#);
    let a = &cfg.agent;
    assert_eq!(a.metrics_listen, None);
    assert_eq!(a.log_format, LogFormat::Json);
    assert_eq!(a.pin_dir, PathBuf::from("/sys/fs/bpf/test"));
    assert_eq!(a.max_sessions, 1000);
    assert_eq!(a.encap_source_v4, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(a.encap_source_v4_hash_bits, 8);
    assert_eq!(a.flood_max_inserts_per_sec, 5000);
    assert_eq!(cfg.interfaces[0].mode, AttachMode::NativeOnly);
    assert_eq!(cfg.interfaces[1].mode, AttachMode::Generic);
    let b = &cfg.backends[0];
    assert_eq!(b.mac, Some(MacAddr([2, 0xab, 0xcd, 0, 0, 1])));
    assert_eq!(b.mac.unwrap().to_string(), "02:ab:cd:00:00:01");
    let v = &cfg.vips[0];
    assert_eq!(v.port(), 0);
    assert_eq!(v.gue_port(), 6080);
    assert_eq!(v.forwarding.mode(), FWD_MODE_GUE);
    assert_eq!(v.flags(), VIP_F_HASH_SRC_ONLY);
    assert_eq!(v.idle_timeout_ns(), 60_000_000_000);
    assert_eq!(
        v.vip_key(),
        VipKey::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1)), 0, PROTO_ESP)
    );
    assert_eq!(v.pools[0].priority, -5);
}

#[test]
fn pool_order_and_ring_keys() {
    let cfg = ok(&format!(
        "{HEAD}
[[vip]]
name = \"ovpn\"
address = \"203.0.113.30\"
port = 443
protocol = \"tcp\"
[[vip.pool]]
name = \"low\"
priority = 10
backends = [\"gw2\"]
[[vip.pool]]
name = \"high\"
priority = 90
backends = [\"gw1\"]
[[vip.class]]
name = \"bulk\"
dscp = [8, 10]
pool_order = [\"low\", \"high\"]
"
    ));
    let v = cfg.vip("ovpn").unwrap();
    let names = |o: Vec<&PoolConfig>| o.into_iter().map(|p| p.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(v.pool_order(None)), ["high", "low"]);
    assert_eq!(names(v.pool_order(Some("bulk"))), ["low", "high"]);
    assert!(v.pool_order(Some("nope")).is_empty());
    assert_eq!(
        cfg.ring_keys(),
        vec![
            RingKey::default_of("ovpn"),
            RingKey::class_of("ovpn", "bulk")
        ]
    );
    assert_eq!(v.vip_key().proto, 6);
}

// ---------------------------------------------------------------------------------------------
// Errors: syntax, display, order, files

#[test]
fn syntax_error_names_its_line() {
    let text = format!("{HEAD}\n[[vip]]\nname = \"wg\"\nbackends = [\"a\", \"b\" #!\n");
    let e = fails(&text);
    assert_eq!(e.line(), Some(marked_line(&text)), "{e}");
    assert_eq!(e.field(), "");
    assert!(
        e.to_string()
            .starts_with(&format!("{ORIGIN}:{}: ", marked_line(&text)))
    );

    let text = "[[interface]]\nname = \"eth0\"\nname = \"eth1\" #!\n";
    let e = fails(text);
    assert_eq!(e.line(), Some(3), "{e}");
    assert!(e.reason().contains("duplicate key"), "{e}");

    let text = "[[interface]]\nname = eth0 #!\n";
    assert_eq!(fails(text).line(), Some(2));
}

#[test]
fn display_is_file_line_field_reason() {
    let text = format!(
        "{HEAD}
[[vip]]
name = \"wireguard\"
address = \"203.0.113.10\"
port = 51820
protocol = \"udp\"
[[vip.pool]]
name = \"primary\"
backends = [\"gw1\", \"gw9\"] #!
"
    );
    let e = fails(&text);
    assert_eq!(
        e.to_string(),
        format!(
            "{ORIGIN}:{}: vip \"wireguard\".pool \"primary\".backends[1]: unknown backend \"gw9\"",
            marked_line(&text)
        )
    );
    assert_eq!(e.file(), ORIGIN);
    assert_eq!(e.reason(), "unknown backend \"gw9\"");
}

#[test]
fn first_error_in_file_order_wins() {
    // [hooks] is validated last but comes first in the file.
    let text = format!(
        "[hooks]\ntimeout_ms = 0 #!\n{HEAD}\n[[backend]]\nname = \"b\"\naddress = \"10.0.0.5\"\nweight = 0\n"
    );
    rejects(&text, "hooks.timeout_ms", "must be at least 1");
    let all = parse_all_errors(&text, ORIGIN).unwrap_err();
    assert_eq!(all.len(), 2);
    assert!(all[0].line() < all[1].line());
    assert_eq!(all[1].field(), "backend \"b\".weight");
}

#[test]
fn load_reads_files_and_names_them() {
    let dir = std::env::temp_dir().join(format!("vpnlb-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, with_vip("")).unwrap();
    let cfg = load(&good).unwrap();
    assert_eq!(cfg.origin(), good.display().to_string());

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[[interface]]\nnam = \"eth0\"\n").unwrap();
    let e = load(&bad).unwrap_err();
    assert_eq!(e.file(), bad.display().to_string());
    assert!(
        e.to_string().starts_with(&format!(
            "{}:2: interface[0].nam: unknown field `nam`",
            bad.display()
        )),
        "{e}"
    );

    let missing = dir.join("missing.toml");
    let e = load(&missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    assert_eq!(e.line(), None);
    assert!(e.to_string().contains("missing.toml"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn error_at_and_check_interfaces_point_into_the_file() {
    let text = format!(
        "{HEAD}\n[[backend]]\nname = \"far\"\naddress = \"10.9.0.1\"\ninterface = \"eth7\" #!\n"
    );
    let cfg = ok(&text);
    assert!(cfg.check_interfaces(|n| n == "eth0" || n == "eth7").is_ok());
    let e = cfg.check_interfaces(|n| n == "eth0").unwrap_err();
    assert_eq!(e.line(), Some(marked_line(&text)));
    assert_eq!(e.field(), "backend \"far\".interface");
    assert!(e.reason().contains("no interface named \"eth7\""));
    let e = cfg.check_interfaces(|_| false).unwrap_err();
    assert_eq!((e.line(), e.field()), (Some(3), "interface \"eth0\".name"));

    // A key the file leaves out points at its table.
    let e = cfg.error_at(
        &FieldPath::new().key("backend").index(1).key("mac"),
        "no neighbour",
    );
    assert_eq!(e.line(), Some(9));
    assert_eq!(e.field(), "backend \"gw2\".mac");
    assert_eq!(
        FieldPath::new()
            .key("backend")
            .index(1)
            .key("mac")
            .to_string(),
        "backend[1].mac"
    );

    // A config built in code has no lines.
    let e = Config::default().error_at(&FieldPath::new().key("vip"), "x");
    assert_eq!((e.line(), e.to_string()), (None, ": vip: x".to_string()));
}

#[test]
fn equality_ignores_the_source_text() {
    let a = ok(&with_vip(""));
    let b = ok(&format!("# a comment\n{}", with_vip("")));
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------------
// Unknown keys, wrong types, bad values: rejected by the schema at their own line

#[test]
fn unknown_keys_are_rejected_at_every_level() {
    rejects(
        &format!("colour = \"blue\" #!\n{HEAD}"),
        "colour",
        "unknown field `colour`",
    );
    rejects(
        &format!("{HEAD}\n[bogus] #!\nx = 1\n"),
        "bogus",
        "unknown field `bogus`",
    );
    rejects(
        &format!("[agent]\nmetrics = \"x\" #!\n{HEAD}"),
        "agent.metrics",
        "unknown field `metrics`",
    );
    rejects(
        "[[interface]]\nname = \"eth0\"\nxdp = true #!\n",
        "interface \"eth0\".xdp",
        "unknown field `xdp`",
    );
    rejects(
        &format!("{HEAD}wieght = 2 #!\n"),
        "backend \"gw6\".wieght",
        "unknown field `wieght`",
    );
    rejects(
        &with_vip("sticky = true #!\n"),
        "vip \"wg\".pool \"primary\".sticky",
        "unknown field `sticky`",
    );
    rejects(
        &format!(
            "{HEAD}{}",
            VIP.replace(
                "protocol = \"udp\"",
                "protocol = \"udp\"\nscheduler = \"wrr\" #!"
            )
        ),
        "vip \"wg\".scheduler",
        "unknown field `scheduler`",
    );
    rejects(
        &with_vip(
            "[[vip.class]]\nname = \"c\"\ndscp = [8]\npool_order = [\"primary\"]\nports = [1] #!\n",
        ),
        "vip \"wg\".class \"c\".ports",
        "unknown field `ports`",
    );
    rejects(
        &with_vip("[hooks]\nexec = [\"/bin/true\"]\nretries = 3 #!\n"),
        "hooks.retries",
        "unknown field `retries`",
    );
}

#[test]
fn unknown_keys_in_checks_are_rejected() {
    // Not a key of any check.
    rejects(
        &with_check("type = \"icmp\"\nintervall_ms = 100 #!"),
        "backend \"chk\".check[0].intervall_ms",
        "unknown field `intervall_ms`",
    );
    // A key of another kind of check.
    rejects(
        &with_check("type = \"tcp\"\nport = 22\npath = \"/\" #!"),
        "backend \"chk\".check[0].path",
        "unknown field `path`: a check of type \"tcp\" takes `type`, `port`, `interval_ms`, `timeout_ms`, `rise`, `fall`",
    );
    rejects(
        &with_check("type = \"icmp\"\nport = 1 #!"),
        "backend \"chk\".check[0].port",
        "unknown field `port`: a check of type \"icmp\" takes `type`, `interval_ms`",
    );
    rejects(
        &with_check("type = \"http\"\nport = 80\ninsecure = true #!"),
        "backend \"chk\".check[0].insecure",
        "unknown field `insecure`",
    );
    rejects(
        &with_check("type = \"bfd\"\npayload = \"x\" #!"),
        "backend \"chk\".check[0].payload",
        "unknown field `payload`",
    );
    rejects(
        &with_check("type = \"snmp\" #!"),
        "backend \"chk\".check[0].type",
        "unknown variant `snmp`",
    );
    rejects(
        &with_check("rise = \"2\" #!\ntype = \"icmp\""),
        "backend \"chk\".check[0].rise",
        "invalid type: string \"2\"",
    );
}

#[test]
fn schema_errors_name_line_and_field() {
    rejects(
        &format!("[agent]\nmetrics_listen = \"localhost\" #!\n{HEAD}"),
        "agent.metrics_listen",
        "invalid listen address \"localhost\"",
    );
    rejects(
        &format!("[agent]\nlog_format = \"xml\" #!\n{HEAD}"),
        "agent.log_format",
        "unknown variant `xml`",
    );
    rejects(
        &format!("[agent]\nencap_source_v4 = \"2001:db8::1\" #!\n{HEAD}"),
        "agent.encap_source_v4",
        "invalid IPv4 address syntax",
    );
    rejects(
        &format!("[agent]\nmax_sessions = -1 #!\n{HEAD}"),
        "agent.max_sessions",
        "invalid value: integer `-1`",
    );
    rejects(
        "[[interface]]\nname = \"eth0\"\nmode = \"turbo\" #!\n",
        "interface \"eth0\".mode",
        "unknown variant `turbo`",
    );
    rejects(
        &format!("{HEAD}\n[[backend]]\nname = \"x\"\naddress = \"10.0.0.x\" #!\n"),
        "backend \"x\".address",
        "invalid IP address syntax",
    );
    rejects(
        &format!("{HEAD}\n[[backend]] #!\nname = \"x\"\n"),
        "backend \"x\"",
        "missing field `address`",
    );
    rejects(
        &format!(
            "{HEAD}\n[[backend]]\nname = \"x\"\naddress = \"10.0.0.5\"\nmac = \"02:00:00:00:00\" #!\n"
        ),
        "backend \"x\".mac",
        "invalid MAC address",
    );
    rejects(
        &format!(
            "{HEAD}\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n[[backend.check]] #!\ntype = \"tcp\"\n"
        ),
        "backend \"chk\".check[0]",
        "missing field `port`",
    );
    rejects(
        &with_check("type = \"tcp\"\nport = 70000 #!"),
        "backend \"chk\".check[0].port",
        "invalid value: integer `70000`",
    );
    rejects(
        &format!("{HEAD}{}", VIP.replace("\"udp\"", "\"sctp\" #!")),
        "vip \"wg\".protocol",
        "unknown variant `sctp`",
    );
    rejects(
        &format!("{HEAD}{}", VIP.replace("port = 51820", "port = 70000 #!")),
        "vip \"wg\".port",
        "invalid value: integer `70000`",
    );
    rejects(
        &format!(
            "{HEAD}{}",
            VIP.replace(
                "protocol = \"udp\"",
                "protocol = \"udp\"\nhash = \"src\" #!"
            )
        ),
        "vip \"wg\".hash",
        "unknown variant `src`",
    );
    rejects(
        &format!(
            "{HEAD}{}",
            VIP.replace(
                "protocol = \"udp\"",
                "protocol = \"udp\"\nforwarding = \"nat\" #!"
            )
        ),
        "vip \"wg\".forwarding",
        "unknown variant `nat`",
    );
    rejects(
        &format!(
            "{HEAD}{}",
            VIP.replace("[\"gw1\", \"gw2\"]", "[\"gw1\", 2] #!")
        ),
        "vip \"wg\".pool \"primary\".backends[1]",
        "invalid type: integer `2`",
    );
    rejects(
        &format!("{HEAD}\n[[vip]] #!\nname = \"x\"\naddress = \"203.0.113.1\"\n"),
        "vip \"x\"",
        "missing field `protocol`",
    );
    rejects(
        &with_vip("[[vip.class]] #!\nname = \"c\"\ndscp = [8]\n"),
        "vip \"wg\".class \"c\"",
        "missing field `pool_order`",
    );
}

// ---------------------------------------------------------------------------------------------
// Validation errors

#[test]
fn agent_errors() {
    let agent = |body: &str| format!("[agent]\n{body}\n{HEAD}");
    rejects(
        &agent("max_sessions = 0 #!"),
        "agent.max_sessions",
        "must be at least 1",
    );
    rejects(
        &agent("pin_dir = \"vpnlb\" #!"),
        "agent.pin_dir",
        "absolute path",
    );
    rejects(
        &agent("control_socket = \"ctl.sock\" #!"),
        "agent.control_socket",
        "absolute path",
    );
    rejects(
        &agent("encap_source_v4 = \"192.0.2.1\"\nencap_source_v4_hash_bits = 17 #!"),
        "agent.encap_source_v4_hash_bits",
        "17 is out of range 0..=16",
    );
    rejects(
        &agent("encap_source_v6 = \"2001:db8::1\"\nencap_source_v6_hash_bits = 33 #!"),
        "agent.encap_source_v6_hash_bits",
        "33 is out of range 0..=32",
    );
    rejects(
        &agent("encap_source_v4_hash_bits = 4 #!"),
        "agent.encap_source_v4_hash_bits",
        "has no effect without agent.encap_source_v4",
    );
    rejects(
        &agent("encap_source_v6_hash_bits = 4 #!"),
        "agent.encap_source_v6_hash_bits",
        "has no effect without agent.encap_source_v6",
    );
    rejects(
        &agent("encap_source_v4 = \"224.0.0.5\" #!"),
        "agent.encap_source_v4",
        "multicast",
    );
    rejects(
        &agent("encap_source_v6 = \"::\" #!"),
        "agent.encap_source_v6",
        "unspecified",
    );
}

#[test]
fn interface_errors() {
    // No [[interface]] at all: the document (line 1).
    rejects(
        "[[backend]]\nname = \"gw1\"\naddress = \"10.0.0.1\"\n",
        "interface",
        "at least one [[interface]] is required",
    );
    rejects(
        "[[interface]]\nname = \"eth0\"\n[[interface]]\nname = \"eth0\" #!\n",
        "interface \"eth0\".name",
        "duplicate interface \"eth0\" (first at line 2)",
    );
    rejects(
        "[[interface]]\nname = \"averyveryverylongname\" #!\n",
        "interface \"averyveryverylongname\".name",
        "longer than 15 characters",
    );
    rejects(
        "[[interface]]\nname = \"eth0:1\" #!\n",
        "interface \"eth0:1\".name",
        "contains ':'",
    );
    rejects(
        "[[interface]]\nname = \"\" #!\n",
        "interface \"\".name",
        "must not be empty",
    );
}

#[test]
fn backend_errors() {
    let b =
        |body: &str| format!("{HEAD}\n[[backend]]\nname = \"b\"\naddress = \"10.0.0.5\"\n{body}\n");
    rejects(
        &b("weight = 0 #!"),
        "backend \"b\".weight",
        "0 is out of range 1..=1000",
    );
    rejects(
        &b("weight = 1001 #!"),
        "backend \"b\".weight",
        "1001 is out of range 1..=1000",
    );
    rejects(
        &b("mac = \"01:00:5e:00:00:01\" #!"),
        "backend \"b\".mac",
        "01:00:5e:00:00:01 is not a unicast MAC address",
    );
    rejects(
        &b("mac = \"00:00:00:00:00:00\" #!"),
        "backend \"b\".mac",
        "not a unicast",
    );
    rejects(
        &b("interface = \"eth/0\" #!"),
        "backend \"b\".interface",
        "contains '/'",
    );
    rejects(
        &format!("{HEAD}\n[[backend]]\nname = \"gw 1\" #!\naddress = \"10.0.0.5\"\n"),
        "backend \"gw 1\".name",
        "contains ' '; names use only A-Z a-z 0-9 _ . -",
    );
    rejects(
        &format!("{HEAD}\n[[backend]]\nname = \"gw1\" #!\naddress = \"10.0.0.5\"\n"),
        "backend \"gw1\".name",
        "duplicate backend name \"gw1\" (first at line 6)",
    );
    rejects(
        &format!("{HEAD}\n[[backend]]\nname = \"z\"\naddress = \"0.0.0.0\" #!\n"),
        "backend \"z\".address",
        "0.0.0.0 is the unspecified address",
    );
    rejects(
        &format!(
            "{HEAD}\n[[backend]]\nname = \"{}\" #!\naddress = \"10.0.0.5\"\n",
            "n".repeat(65)
        ),
        &format!("backend \"{}\".name", "n".repeat(65)),
        "longer than 64 characters",
    );
}

#[test]
fn check_errors() {
    let at = |k: &str| format!("backend \"chk\".check[0].{k}");
    rejects(
        &with_check("type = \"icmp\"\ninterval_ms = 1000\ntimeout_ms = 1500 #!"),
        &at("timeout_ms"),
        "1500 ms is longer than interval_ms (1000 ms)",
    );
    // Default interval (1000) with a longer timeout.
    rejects(
        &with_check("type = \"icmp\"\ntimeout_ms = 2000 #!"),
        &at("timeout_ms"),
        "longer than interval_ms",
    );
    // Default timeout (500) with a shorter interval: the interval is the key in the file.
    rejects(
        &with_check("type = \"tcp\"\nport = 22\ninterval_ms = 5 #!"),
        &at("interval_ms"),
        "5 ms is below the minimum of 10 ms",
    );
    rejects(
        &with_check("type = \"icmp\"\ninterval_ms = 100 #!"),
        &at("interval_ms"),
        "100 ms is shorter than timeout_ms (500 ms, the default)",
    );
    rejects(
        &with_check("type = \"icmp\"\ntimeout_ms = 0 #!"),
        &at("timeout_ms"),
        "must be at least 1",
    );
    rejects(
        &with_check("type = \"icmp\"\nrise = 0 #!"),
        &at("rise"),
        "must be at least 1",
    );
    rejects(
        &with_check("type = \"icmp\"\nfall = 0 #!"),
        &at("fall"),
        "must be at least 1",
    );
    rejects(
        &with_check("type = \"tcp\"\nport = 0 #!"),
        &at("port"),
        "must be 1..=65535",
    );
    rejects(
        &with_check("type = \"udp\"\nport = 0 #!"),
        &at("port"),
        "must be 1..=65535",
    );
    rejects(
        &with_check("type = \"http\"\nport = 0 #!"),
        &at("port"),
        "must be 1..=65535",
    );
    rejects(
        &with_check("type = \"http\"\nport = 80\npath = \"health\" #!"),
        &at("path"),
        "must start with \"/\"",
    );
    rejects(
        &with_check("type = \"https\"\nport = 443\nexpect_status = 99 #!"),
        &at("expect_status"),
        "99 is not an HTTP status",
    );
    rejects(
        &with_check("type = \"http\"\nport = 80\nhost = \"\" #!"),
        &at("host"),
        "must not be empty",
    );
    rejects(
        &with_check("type = \"https\"\nport = 443\ninsecure = true\nca_file = \"/etc/ca.pem\" #!"),
        &at("ca_file"),
        "has no effect with insecure = true",
    );
    rejects(
        &with_check("type = \"udp\"\nport = 7\npayload = \"x\"\npayload_hex = \"00\" #!"),
        &at("payload_hex"),
        "set only one of payload and payload_hex",
    );
    rejects(
        &with_check("type = \"udp\"\nport = 7\nexpect = \"x\"\nexpect_hex = \"00\" #!"),
        &at("expect_hex"),
        "set only one of expect and expect_hex",
    );
    rejects(
        &with_check("type = \"udp\"\nport = 7\npayload_hex = \"zz\" #!"),
        &at("payload_hex"),
        "invalid hex",
    );
    rejects(
        &with_check("type = \"bfd\"\ndetect_mult = 0 #!"),
        &at("detect_mult"),
        "must be at least 1",
    );
    rejects(
        &with_check("type = \"bfd\"\ndesired_min_tx_ms = 5 #!"),
        &at("desired_min_tx_ms"),
        "5 ms is out of range 10..=4294967 ms",
    );
    rejects(
        &with_check("type = \"bfd\"\nrequired_min_rx_ms = 5000000 #!"),
        &at("required_min_rx_ms"),
        "out of range",
    );
    rejects(
        &with_check("type = \"bfd\"\ninterval_ms = 100 #!"),
        &at("interval_ms"),
        "not used by bfd checks",
    );
    rejects(
        &with_check("type = \"bfd\"\nrise = 0 #!"),
        &at("rise"),
        "must be at least 1",
    );
    rejects(
        &with_check("type = \"bfd\"\n[[backend.check]]\ntype = \"bfd\" #!"),
        "backend \"chk\".check[1].type",
        "only one bfd check per backend",
    );
    // The second check of the backend is named by position.
    rejects(
        &with_check("type = \"icmp\"\n[[backend.check]]\ntype = \"tcp\"\nport = 22\nrise = 0 #!"),
        "backend \"chk\".check[1].rise",
        "must be at least 1",
    );
}

/// Keys for the wireguard check tests: the probe's private key and the gateway's public key.
const WG_PROBE_KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
const WG_GW_PRIVATE: &str = "UOzlBB0dhzTOdwW4eWZQpL7zbRk7aoxaeNmnJhJ6lVE=";

fn wg_gw_public() -> String {
    crate::health::wireguard::public_key_of(WG_GW_PRIVATE).unwrap()
}

#[test]
fn vpn_check_defaults_and_fields() {
    let gw = wg_gw_public();
    let cfg = ok(&with_check(&format!(
        "type = \"wireguard\"\npublic_key = \"{gw}\"\nprivate_key = \"{WG_PROBE_KEY}\""
    )));
    assert_eq!(
        cfg.backend("chk").unwrap().checks[0],
        CheckSpec::Wireguard {
            port: 51820,
            public_key: gw.clone(),
            private_key: Some(WG_PROBE_KEY.into()),
            private_key_file: None,
            inside: None,
            timing: CheckTiming {
                interval_ms: 5000,
                ..CheckTiming::default()
            },
        }
    );
    assert_eq!(
        cfg.backend("chk").unwrap().checks[0].label(),
        "wireguard:51820"
    );
    let cfg = ok(&with_check(&format!(
        "type = \"wireguard\"\nport = 51821\npublic_key = \"{gw}\"\n\
         private_key_file = \"/etc/vpnlb/probe.key\"\ninterval_ms = 2000\ntimeout_ms = 1000\nfall = 2"
    )));
    assert_eq!(
        cfg.backend("chk").unwrap().checks[0],
        CheckSpec::Wireguard {
            port: 51821,
            public_key: gw.clone(),
            private_key: None,
            private_key_file: Some("/etc/vpnlb/probe.key".into()),
            inside: None,
            timing: CheckTiming {
                interval_ms: 2000,
                timeout_ms: 1000,
                rise: 2,
                fall: 2
            },
        }
    );
    let cfg = ok(&with_check("type = \"ikev2\""));
    assert_eq!(
        cfg.backend("chk").unwrap().checks[0],
        CheckSpec::Ikev2 {
            port: 500,
            timing: CheckTiming::default(),
        }
    );
    let cfg = ok(&with_check(
        "type = \"ikev2\"\nport = 4500\ninterval_ms = 3000",
    ));
    let c = &cfg.backend("chk").unwrap().checks[0];
    assert_eq!(c.label(), "ikev2:4500");
    assert_eq!(c.timing().interval_ms, 3000);
    // Round trip through serde (flattened timing, RawCheck on the way back).
    let cfg = ok(&format!(
        "{HEAD}\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n\
         [[backend.check]]\ntype = \"wireguard\"\npublic_key = \"{gw}\"\nprivate_key = \"{WG_PROBE_KEY}\"\n\
         [[backend.check]]\ntype = \"ikev2\"\nrise = 3\n"
    ));
    let checks = &cfg.backend("chk").unwrap().checks;
    let json = serde_json::to_string(checks).unwrap();
    assert!(json.contains("\"type\":\"wireguard\"") && json.contains("\"type\":\"ikev2\""));
    let back: Vec<CheckSpec> = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, checks);
}

#[test]
fn vpn_check_errors() {
    let at = |k: &str| format!("backend \"chk\".check[0].{k}");
    let gw = wg_gw_public();
    let wg = |rest: &str| {
        with_check(&format!(
            "type = \"wireguard\"\npublic_key = \"{gw}\"\n{rest}"
        ))
    };
    // Keys of other kinds are rejected with the list of what the kind takes.
    rejects(
        &wg(&format!(
            "private_key = \"{WG_PROBE_KEY}\"\npath = \"/\" #!"
        )),
        &at("path"),
        "unknown field `path`: a check of type \"wireguard\" takes `type`, `port`, `public_key`, \
         `private_key`, `private_key_file`, `inside`, `tunnel_address`, `inside_timeout_ms`, \
         `interval_ms`, `timeout_ms`, `rise`, `fall`",
    );
    rejects(
        &with_check("type = \"ikev2\"\npublic_key = \"x\" #!"),
        &at("public_key"),
        "a check of type \"ikev2\" takes `type`, `port`, `interval_ms`",
    );
    rejects(
        &with_check("type = \"tcp\"\nport = 1\nprivate_key = \"x\" #!"),
        &at("private_key"),
        "unknown field `private_key`",
    );
    rejects(
        &format!(
            "{HEAD}\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n[[backend.check]] #!\n\
             type = \"wireguard\"\nprivate_key = \"{WG_PROBE_KEY}\"\n"
        ),
        "backend \"chk\".check[0]",
        "missing field `public_key`",
    );
    // Keys.
    rejects(
        &with_check(&format!(
            "type = \"wireguard\"\npublic_key = \"abc\" #!\nprivate_key = \"{WG_PROBE_KEY}\""
        )),
        &at("public_key"),
        "invalid key: not base64",
    );
    rejects(
        &wg("private_key = \"AAAAAAAAAAAAAAAAAAAAAA==\" #!"),
        &at("private_key"),
        "invalid key: 16 bytes, a WireGuard key has 32",
    );
    rejects(
        &format!(
            "{HEAD}\n[[backend]]\nname = \"chk\"\naddress = \"10.0.0.99\"\n[[backend.check]] #!\n\
             type = \"wireguard\"\npublic_key = \"{gw}\"\n"
        ),
        "backend \"chk\".check[0]",
        "needs private_key or private_key_file",
    );
    rejects(
        &wg(&format!(
            "private_key = \"{WG_PROBE_KEY}\"\nprivate_key_file = \"/k\" #!"
        )),
        &at("private_key_file"),
        "set only one of private_key and private_key_file",
    );
    rejects(
        &wg("private_key_file = \"\" #!"),
        &at("private_key_file"),
        "must not be empty",
    );
    rejects(
        &wg(&format!("private_key = \"{WG_GW_PRIVATE}\" #!")),
        &at("private_key"),
        "is the private key of public_key",
    );
    // Ports and timing.
    rejects(
        &wg(&format!("private_key = \"{WG_PROBE_KEY}\"\nport = 0 #!")),
        &at("port"),
        "must be 1..=65535",
    );
    rejects(
        &with_check("type = \"ikev2\"\nport = 0 #!"),
        &at("port"),
        "must be 1..=65535",
    );
    rejects(
        &wg(&format!(
            "private_key = \"{WG_PROBE_KEY}\"\ninterval_ms = 30 #!\ntimeout_ms = 20"
        )),
        &at("interval_ms"),
        "30 ms is below the minimum of 50 ms for wireguard checks",
    );
    // The wireguard default interval (5000) makes a 2000 ms timeout valid; an ikev2 one is not.
    ok(&wg(&format!(
        "private_key = \"{WG_PROBE_KEY}\"\ntimeout_ms = 2000"
    )));
    rejects(
        &with_check("type = \"ikev2\"\ntimeout_ms = 2000 #!"),
        &at("timeout_ms"),
        "2000 ms is longer than interval_ms (1000 ms)",
    );
}

#[test]
fn vip_protocol_port_and_forwarding_errors() {
    let vip = |body: &str| {
        format!(
            "[agent]\nencap_source_v4 = \"192.0.2.1\"\nencap_source_v6 = \"2001:db8::1\"\n{HEAD}\n\
             [[vip]]\nname = \"v\"\naddress = \"203.0.113.10\"\n{body}\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\", \"gw2\"]\n"
        )
    };
    rejects(
        &format!(
            "{HEAD}\n[[vip]] #!\nname = \"v\"\naddress = \"203.0.113.10\"\nprotocol = \"udp\"\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n"
        ),
        "vip \"v\".port",
        "protocol = \"udp\" needs a port (1..=65535)",
    );
    rejects(
        &vip("protocol = \"tcp\"\nport = 0 #!"),
        "vip \"v\".port",
        "protocol = \"tcp\" needs a port",
    );
    rejects(
        &vip("protocol = \"esp\"\nport = 500 #!"),
        "vip \"v\".port",
        "must be absent or 0 with protocol = \"esp\"",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\ngue_port = 6080 #!"),
        "vip \"v\".gue_port",
        "only used with forwarding = \"gue\" (this vip uses \"l2dsr\")",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nforwarding = \"ipip\"\ngue_port = 6080 #!"),
        "vip \"v\".gue_port",
        "only used with forwarding = \"gue\"",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nforwarding = \"gue\"\ngue_port = 0 #!"),
        "vip \"v\".gue_port",
        "must be 1..=65535",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nmtu = 1400 #!"),
        "vip \"v\".mtu",
        "only used with forwarding = \"ipip\" or \"gue\"",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nforwarding = \"ipip\"\nmtu = 100 #!"),
        "vip \"v\".mtu",
        "100 is out of range 576..=65535",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nidle_timeout_s = 18446744074 #!"),
        "vip \"v\".idle_timeout_s",
        "above the maximum of 18446744073",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nring_size = 65536 #!"),
        "vip \"v\".ring_size",
        "65536 is not a prime <= 65537",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nring_size = 65539 #!"),
        "vip \"v\".ring_size",
        "65539 is not a prime <= 65537",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nring_size = 1 #!"),
        "vip \"v\".ring_size",
        "not a prime",
    );
    rejects(
        &format!(
            "{HEAD}\n[[vip]]\nname = \"v\"\naddress = \"203.0.113.10\"\nprotocol = \"esp\"\nring_size = 2 #!\n[[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\", \"gw2\", \"gw6\"]\n"
        ),
        "vip \"v\".ring_size",
        "2 is smaller than pool \"p\"'s 3 backends",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\naddress = \"ff02::1\"")
            .replace("address = \"ff02::1\"", "address = \"ff02::1\" #!")
            .replace("address = \"203.0.113.10\"\n", ""),
        "vip \"v\".address",
        "multicast",
    );
    rejects(
        &vip("protocol = \"udp\"\nport = 500\nname2 = 1 #!"),
        "vip \"v\".name2",
        "unknown field `name2`",
    );
}

#[test]
fn encapsulation_needs_sources_for_the_backend_families() {
    let text = format!(
        "{HEAD}\n[[vip]]\nname = \"v\"\naddress = \"203.0.113.10\"\nprotocol = \"esp\"\n\
         forwarding = \"gue\" #!\n[[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n"
    );
    rejects(
        &text,
        "vip \"v\".forwarding",
        "forwarding = \"gue\" to IPv4 backend \"gw1\" needs agent.encap_source_v4",
    );
    let text = format!(
        "[agent]\nencap_source_v4 = \"192.0.2.1\"\n{HEAD}\n[[vip]]\nname = \"v\"\n\
         address = \"203.0.113.10\"\nprotocol = \"esp\"\nforwarding = \"ipip\" #!\n\
         [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n[[vip.pool]]\nname = \"q\"\n\
         priority = 1\nbackends = [\"gw6\"]\n"
    );
    rejects(
        &text,
        "vip \"v\".forwarding",
        "forwarding = \"ipip\" to IPv6 backend \"gw6\" needs agent.encap_source_v6",
    );
    // With both sources it is fine, and an IPv6 backend needs mtu >= 1280.
    let text = text.replace("[agent]\n", "[agent]\nencap_source_v6 = \"2001:db8::1\"\n");
    ok(&text);
    rejects(
        &text.replace(
            "forwarding = \"ipip\" #!",
            "forwarding = \"ipip\"\nmtu = 1000 #!",
        ),
        "vip \"v\".mtu",
        "1000 is below 1280, the IPv6 minimum (backend \"gw6\" is IPv6)",
    );
    // l2dsr needs no source.
    ok(&with_vip(""));
}

#[test]
fn pool_errors() {
    let vip = |pools: &str| {
        format!(
            "{HEAD}\n[[vip]]\nname = \"v\"\naddress = \"203.0.113.10\"\nport = 443\nprotocol = \"tcp\"\n{pools}\n"
        )
    };
    rejects(
        &format!(
            "{HEAD}\n[[vip]] #!\nname = \"v\"\naddress = \"203.0.113.10\"\nport = 443\nprotocol = \"tcp\"\n"
        ),
        "vip \"v\".pool",
        "a vip needs at least one [[vip.pool]]",
    );
    rejects(
        &vip("[[vip.pool]]\nname = \"p\"\nbackends = [] #!"),
        "vip \"v\".pool \"p\".backends",
        "a pool needs at least one backend",
    );
    rejects(
        &vip("[[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\", \"gw1\"] #!"),
        "vip \"v\".pool \"p\".backends[1]",
        "backend \"gw1\" is listed twice",
    );
    rejects(
        &vip(
            "[[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n[[vip.pool]] #!\nname = \"q\"\nbackends = [\"gw2\"]",
        ),
        "vip \"v\".pool \"q\".priority",
        "priority 100 (the default) is also pool \"p\"'s (line 22); the pools of a vip need distinct priorities",
    );
    rejects(
        &vip(
            "[[vip.pool]]\nname = \"p\"\npriority = 5\nbackends = [\"gw1\"]\n[[vip.pool]]\nname = \"q\"\npriority = 5 #!\nbackends = [\"gw2\"]",
        ),
        "vip \"v\".pool \"q\".priority",
        "priority 5 is also pool \"p\"'s",
    );
    rejects(
        &vip(
            "[[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n[[vip.pool]]\nname = \"p\" #!\npriority = 1\nbackends = [\"gw2\"]",
        ),
        "vip \"v\".pool \"p\".name",
        "duplicate pool name \"p\" (first at line 23)",
    );
    rejects(
        &vip("[[vip.pool]]\nname = \"p!\" #!\nbackends = [\"gw1\"]"),
        "vip \"v\".pool \"p!\".name",
        "contains '!'",
    );
}

#[test]
fn class_errors() {
    let two_vips = |class: &str| {
        format!(
            "{HEAD}{VIP}\n[[vip.pool]]\nname = \"standby\"\npriority = 50\nbackends = [\"gw6\"]\n{class}\n\
             [[vip]]\nname = \"other\"\naddress = \"203.0.113.11\"\nport = 1194\nprotocol = \"udp\"\n\
             [[vip.pool]]\nname = \"elsewhere\"\nbackends = [\"gw1\"]\n"
        )
    };
    let c = |body: &str| two_vips(&format!("[[vip.class]]\nname = \"bulk\"\n{body}"));
    let at = |k: &str| format!("vip \"wg\".class \"bulk\".{k}");
    ok(&c(
        "dscp = [8, 10]\npool_order = [\"standby\", \"primary\"]",
    ));
    ok(&c("dscp = [0]\npool_order = [\"standby\"]"));
    rejects(
        &c("dscp = [8]\npool_order = [\"standby\", \"nope\"] #!"),
        &at("pool_order[1]"),
        "unknown pool \"nope\": this vip's pools are primary, standby",
    );
    // Another VIP's pool is not this VIP's.
    rejects(
        &c("dscp = [8]\npool_order = [\"elsewhere\"] #!"),
        &at("pool_order[0]"),
        "unknown pool \"elsewhere\"",
    );
    rejects(
        &c("dscp = [8]\npool_order = [\"standby\", \"standby\"] #!"),
        &at("pool_order[1]"),
        "pool \"standby\" is listed twice",
    );
    rejects(
        &c("dscp = [8]\npool_order = [] #!"),
        &at("pool_order"),
        "needs at least one pool",
    );
    rejects(
        &c("dscp = [] #!\npool_order = [\"standby\"]"),
        &at("dscp"),
        "needs at least one DSCP value",
    );
    rejects(
        &c("dscp = [8, 64] #!\npool_order = [\"standby\"]"),
        &at("dscp[1]"),
        "DSCP 64 is out of range 0..=63",
    );
    rejects(
        &c("dscp = [8, 8] #!\npool_order = [\"standby\"]"),
        &at("dscp[1]"),
        "DSCP 8 is listed twice",
    );
    rejects(
        &c(
            "dscp = [8]\npool_order = [\"standby\"]\n[[vip.class]]\nname = \"bulk2\"\ndscp = [10, 8] #!\npool_order = [\"primary\"]",
        ),
        "vip \"wg\".class \"bulk2\".dscp[1]",
        "DSCP 8 is already matched by class \"bulk\"",
    );
    rejects(
        &c(
            "dscp = [8]\npool_order = [\"standby\"]\n[[vip.class]]\nname = \"bulk\" #!\ndscp = [10]\npool_order = [\"primary\"]",
        ),
        &at("name"),
        "duplicate class name \"bulk\"",
    );
}

#[test]
fn vip_identity_errors() {
    let second = |body: &str| {
        format!(
            "{HEAD}{VIP}\n[[vip]] #!\n{body}\n[[vip.pool]]\nname = \"primary\"\nbackends = [\"gw1\"]\n"
        )
    };
    rejects(
        &second("name = \"wg2\"\naddress = \"203.0.113.10\"\nport = 51820\nprotocol = \"udp\""),
        "vip \"wg2\"",
        "same address, port and protocol as vip \"wg\" (line 17)",
    );
    // Same address and port, other protocol: fine.
    ok(
        &second("name = \"wg2\"\naddress = \"203.0.113.10\"\nport = 51820\nprotocol = \"tcp\"")
            .replace(" #!", ""),
    );
    // Two ESP VIPs on one address: port absent and port 0 are the same key.
    rejects(
        &format!(
            "{HEAD}\n[[vip]]\nname = \"e1\"\naddress = \"203.0.113.20\"\nprotocol = \"esp\"\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n\
             [[vip]] #!\nname = \"e2\"\naddress = \"203.0.113.20\"\nprotocol = \"esp\"\nport = 0\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"gw2\"]\n"
        ),
        "vip \"e2\"",
        "same address, port and protocol as vip \"e1\"",
    );
    let text = format!(
        "{HEAD}{VIP}\n[[vip]]\nname = \"wg\" #!\naddress = \"203.0.113.11\"\nport = 51820\nprotocol = \"udp\"\n\
         [[vip.pool]]\nname = \"primary\"\nbackends = [\"gw1\"]\n"
    );
    rejects(
        &text,
        "vip \"wg\".name",
        "duplicate vip name \"wg\" (first at line 18)",
    );
}

#[test]
fn source_hash_vips_on_one_address_must_agree() {
    let vips = |second_pool: &str, ring: &str| {
        format!(
            "{HEAD}
[[vip]]
name = \"ike\"
address = \"203.0.113.20\"
port = 500
protocol = \"udp\"
hash = \"source\"
[[vip.pool]]
name = \"a\"
backends = [\"gw1\", \"gw2\"]

[[vip]]
name = \"natt\"
address = \"203.0.113.20\"
port = 4500
protocol = \"udp\"
hash = \"source\" #!
{ring}
[[vip.pool]]
name = \"b\"
backends = [{second_pool}]
"
        )
    };
    // Same members in another order and another pool name: same selection.
    ok(&vips("\"gw2\", \"gw1\"", ""));
    rejects(
        &vips("\"gw1\"", ""),
        "vip \"natt\".hash",
        "hash = \"source\" vips on 203.0.113.20 must have the same pools and ring_size so that a \
         peer's IKE and ESP reach one gateway; vip \"ike\" (line 17) differs",
    );
    rejects(
        &vips("\"gw2\", \"gw1\"", "ring_size = 251"),
        "vip \"natt\".hash",
        "differs",
    );
    // Five-tuple VIPs on the same address may differ.
    ok(&vips("\"gw1\"", "").replace("hash = \"source\" #!", "hash = \"five-tuple\""));
}

#[test]
fn data_plane_limits() {
    // 129 VIPs: the 129th is refused.
    let mut text = HEAD.to_string();
    for i in 0..129 {
        if i == 128 {
            text.push_str("[[vip]] #!\n");
        } else {
            text.push_str("[[vip]]\n");
        }
        text.push_str(&format!(
            "name = \"v{i}\"\naddress = \"203.0.113.1\"\nport = {}\nprotocol = \"udp\"\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n",
            i + 1
        ));
    }
    rejects(&text, "vip \"v128\"", "too many vips: at most 128");
    // 128 VIPs are fine.
    let upto = text.find("[[vip]] #!").unwrap();
    assert_eq!(ok(&text[..upto]).vips.len(), 128);

    // 127 VIPs and two classes: the second class is the 129th ring.
    let mut text = HEAD.to_string();
    for i in 0..127 {
        text.push_str(&format!(
            "[[vip]]\nname = \"v{i}\"\naddress = \"203.0.113.1\"\nport = {}\nprotocol = \"udp\"\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\"]\n",
            i + 1
        ));
    }
    text.push_str(
        "[[vip.class]]\nname = \"c1\"\ndscp = [1]\npool_order = [\"p\"]\n\
         [[vip.class]] #!\nname = \"c2\"\ndscp = [2]\npool_order = [\"p\"]\n",
    );
    rejects(
        &text,
        "vip \"v126\".class \"c2\"",
        "too many rings: every vip and every class takes one of 128",
    );

    // 4096 backends: the 4096th is refused.
    let mut text = String::from("[[interface]]\nname = \"eth0\"\n");
    for i in 0..4096u32 {
        let marker = if i == 4095 { " #!" } else { "" };
        text.push_str(&format!(
            "[[backend]]{marker}\nname = \"b{i}\"\naddress = \"10.{}.{}.{}\"\n",
            i >> 16,
            (i >> 8) & 0xff,
            i & 0xff
        ));
    }
    rejects(
        &text,
        "backend \"b4095\"",
        "too many backends: at most 4095",
    );
}

#[test]
fn hook_errors() {
    let hooks = |body: &str| format!("{HEAD}\n[hooks]\n{body}\n");
    ok(&hooks(
        "exec = [\"/bin/logger\", \"-t\", \"vpnlb\"]\nwebhook = \"http://[::1]:8080/x\"",
    ));
    rejects(
        &hooks("exec = [] #!"),
        "hooks.exec",
        "needs at least the program to run",
    );
    rejects(
        &hooks("exec = [\"\"] #!"),
        "hooks.exec[0]",
        "the program path must not be empty",
    );
    rejects(
        &hooks("webhook = \"https://example.net/hook\" #!"),
        "hooks.webhook",
        "is not an http:// URL (https is not supported)",
    );
    rejects(
        &hooks("webhook = \"not a url\" #!"),
        "hooks.webhook",
        "is not an http:// URL",
    );
    rejects(
        &hooks("timeout_ms = 0 #!"),
        "hooks.timeout_ms",
        "must be at least 1",
    );
}

// ---------------------------------------------------------------------------------------------
// Example configs

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples")
}

#[test]
fn every_example_config_parses() {
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(examples_dir()).expect("docs/examples exists") {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let cfg = load(&path).unwrap_or_else(|e| panic!("{e}"));
        // Ids can be given to everything in it.
        let ids = assign_ids(&cfg, None);
        assert_eq!(ids.backends.len(), cfg.backends.len(), "{}", path.display());
        assert_eq!(ids.rings.len(), cfg.ring_keys().len(), "{}", path.display());
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    for required in [
        "ipsec-source-hash-gue.toml",
        "minimal.toml",
        "openvpn-active-standby.toml",
        "wireguard-l2dsr.toml",
    ] {
        assert!(
            seen.iter().any(|s| s == required),
            "missing example {required}: {seen:?}"
        );
    }
}

#[test]
fn the_cluster_examples_parse_as_a_member_and_its_service() {
    let host = load(&examples_dir().join("cluster-member.toml")).unwrap();
    let c = host.cluster.as_ref().expect("[cluster]");
    assert_eq!(
        (c.prefix(), c.member_name()),
        ("/vpnlb/edge".to_string(), "lb-a".to_string())
    );
    let text = std::fs::read_to_string(examples_dir().join("cluster/service.toml")).unwrap();
    let svc = parse_service(&text, "service.toml").unwrap_or_else(|e| panic!("{e}"));
    let merged = host.with_service(&svc, &text, "service.toml");
    assert_eq!((merged.backends.len(), merged.vips.len()), (2, 1));
    assert_eq!(merged.interfaces, host.interfaces);
}

#[test]
fn examples_say_what_they_promise() {
    let cfg = load(&examples_dir().join("ipsec-source-hash-gue.toml")).unwrap();
    let keys: Vec<(u16, u8)> = cfg
        .vips
        .iter()
        .map(|v| (v.port(), v.protocol.number()))
        .collect();
    assert_eq!(keys, [(500, PROTO_UDP), (4500, PROTO_UDP), (0, PROTO_ESP)]);
    assert!(
        cfg.vips
            .iter()
            .all(|v| v.hash == HashMode::Source && v.forwarding == Forwarding::Gue)
    );
    assert!(
        cfg.backends
            .iter()
            .all(|b| b.checks.iter().any(|c| matches!(c, CheckSpec::Bfd { .. })))
    );
    assert_eq!(
        cfg.agent.encap_source_v6,
        Some("2001:db8:100::1".parse::<Ipv6Addr>().unwrap())
    );
    assert!(matches!(
        cfg.backend("ipsec-1").unwrap().checks.last(),
        Some(CheckSpec::Ikev2 { port: 500, .. })
    ));

    let cfg = load(&examples_dir().join("wireguard-l2dsr.toml")).unwrap();
    assert!(matches!(
        cfg.backend("wg-a").unwrap().checks.last(),
        Some(CheckSpec::Wireguard { port: 51820, private_key_file: Some(_), timing, .. })
            if timing.interval_ms == 5000
    ));

    let cfg = load(&examples_dir().join("openvpn-active-standby.toml")).unwrap();
    let v = &cfg.vips[0];
    assert_eq!(v.pools.len(), 2);
    assert_eq!(v.classes[0].pool_order, ["secondary", "primary"]);
}

// ---------------------------------------------------------------------------------------------
// Id assignment

fn names_cfg(backends: &[&str], vips: &[(&str, &[&str])]) -> Config {
    let mut text = String::from("[[interface]]\nname = \"eth0\"\n");
    for (i, b) in backends.iter().enumerate() {
        text.push_str(&format!(
            "[[backend]]\nname = \"{b}\"\naddress = \"10.0.1.{}\"\n",
            i + 1
        ));
    }
    for (i, (v, classes)) in vips.iter().enumerate() {
        text.push_str(&format!(
            "[[vip]]\nname = \"{v}\"\naddress = \"203.0.113.1\"\nport = {}\nprotocol = \"udp\"\n\
             [[vip.pool]]\nname = \"p\"\nbackends = [\"{}\"]\n",
            i + 1,
            backends[0]
        ));
        for (j, c) in classes.iter().enumerate() {
            text.push_str(&format!(
                "[[vip.class]]\nname = \"{c}\"\ndscp = [{j}]\npool_order = [\"p\"]\n"
            ));
        }
    }
    ok(&text)
}

#[test]
fn fresh_ids_follow_file_order() {
    let cfg = names_cfg(&["c", "a", "b"], &[("wg", &["bulk"]), ("ike", &[])]);
    let ids = assign_ids(&cfg, None);
    assert_eq!(
        (ids.backend("c"), ids.backend("a"), ids.backend("b")),
        (Some(1), Some(2), Some(3))
    );
    assert_eq!((ids.vip("wg"), ids.vip("ike")), (Some(0), Some(1)));
    assert_eq!(
        (
            ids.ring("wg", None),
            ids.ring("wg", Some("bulk")),
            ids.ring("ike", None)
        ),
        (Some(0), Some(1), Some(2))
    );
    assert_eq!(ids.backend("zz"), None);
}

#[test]
fn ids_survive_reordering_and_additions() {
    let old_cfg = names_cfg(&["a", "b", "c"], &[("wg", &[]), ("ike", &["x"])]);
    let old = assign_ids(&old_cfg, None);
    // Reordered, one added in front: nobody moves, the new one gets the lowest free id.
    let cfg = names_cfg(
        &["new", "c", "b", "a"],
        &[("ike", &["x", "y"]), ("wg", &[]), ("esp", &[])],
    );
    let ids = assign_ids(&cfg, Some(&old));
    for n in ["a", "b", "c"] {
        assert_eq!(ids.backend(n), old.backend(n), "{n}");
    }
    assert_eq!(ids.backend("new"), Some(4));
    assert_eq!(
        (ids.vip("wg"), ids.vip("ike"), ids.vip("esp")),
        (Some(0), Some(1), Some(2))
    );
    assert_eq!(ids.ring("wg", None), old.ring("wg", None));
    assert_eq!(ids.ring("ike", None), old.ring("ike", None));
    assert_eq!(ids.ring("ike", Some("x")), old.ring("ike", Some("x")));
    assert_eq!(
        (ids.ring("ike", Some("y")), ids.ring("esp", None)),
        (Some(3), Some(4))
    );
    // Assigning again from the result changes nothing.
    assert_eq!(assign_ids(&cfg, Some(&ids)), ids);
}

#[test]
fn freed_ids_wait_one_reload() {
    let old = assign_ids(&names_cfg(&["a", "b", "c"], &[("v", &[])]), None);
    // "b" (id 2) goes away and "d" arrives in the same reload: "d" must not take id 2.
    let mid_cfg = names_cfg(&["a", "c", "d"], &[("v", &[])]);
    let mid = assign_ids(&mid_cfg, Some(&old));
    assert_eq!(
        (mid.backend("a"), mid.backend("c"), mid.backend("d")),
        (Some(1), Some(3), Some(4))
    );
    // One reload later id 2 is free again.
    let next = assign_ids(&names_cfg(&["a", "c", "d", "e"], &[("v", &[])]), Some(&mid));
    assert_eq!(next.backend("e"), Some(2));
}

#[test]
fn freed_ids_are_reused_when_nothing_else_is_left() {
    // Previous map holds 4095 names; all go away and new ones arrive: the range is exhausted, so
    // the retired ids are reused rather than leaving names without an id.
    let mut previous = IdMap::default();
    for i in 1..MAX_BACKENDS_USIZE as u32 {
        previous.backends.insert(format!("old{i}"), i);
    }
    let cfg = names_cfg(&["n1", "n2"], &[]);
    let ids = assign_ids(&cfg, Some(&previous));
    assert_eq!((ids.backend("n1"), ids.backend("n2")), (Some(1), Some(2)));
}

const MAX_BACKENDS_USIZE: usize = vpnlb_common::MAX_BACKENDS as usize;

#[test]
fn damaged_previous_maps_are_repaired_deterministically() {
    let mut previous = IdMap::default();
    previous.backends.insert("a".into(), 0); // out of range (0 = none)
    previous.backends.insert("b".into(), 7);
    previous.backends.insert("c".into(), 7); // duplicate: first in file order keeps it
    previous.vips.insert("v".into(), 500); // out of range
    let cfg = names_cfg(&["c", "b", "a"], &[("v", &[])]);
    let ids = assign_ids(&cfg, Some(&previous));
    assert_eq!(ids.backend("c"), Some(7));
    assert_eq!(ids.backend("b"), Some(1));
    assert_eq!(ids.backend("a"), Some(2));
    assert_eq!(ids.vip("v"), Some(0));
}

#[test]
fn id_map_round_trips_through_json() {
    let ids = assign_ids(&names_cfg(&["a", "b"], &[("wg", &["bulk"])]), None);
    let json = serde_json::to_string(&ids).unwrap();
    assert!(json.contains("\"rings\":["), "{json}");
    let back: IdMap = serde_json::from_str(&json).unwrap();
    assert_eq!(back, ids);
}

#[test]
fn helpers() {
    assert!(is_prime(65537) && is_prime(2) && is_prime(251));
    assert!(!is_prime(0) && !is_prime(1) && !is_prime(65536) && !is_prime(65535));
    assert_eq!(
        "02:00:00:00:00:11".parse::<MacAddr>(),
        Ok(MacAddr([2, 0, 0, 0, 0, 0x11]))
    );
    for bad in [
        "02:00:00:00:00",
        "02:00:00:00:00:11:22",
        "0200.0000.0011",
        "02:00:00:00:00:1g",
        "2:0:0:0:0:11",
    ] {
        assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
    }
    assert!(!MacAddr([0xff; 6]).is_unicast());
    assert_eq!(Protocol::Esp.number(), PROTO_ESP);
}

#[test]
fn session_ids_and_static_ranges() {
    use crate::dataplane::session_ids::{esp_range_prefixes, ike_label_prefix};
    use vpnlb_common::{VIP_F_IDS_IPSEC, VIP_F_IDS_OPENVPN, VIP_F_IDS_WIREGUARD};
    let vip = |proto: &str, port: &str, ids: &str| {
        format!(
            "{HEAD}\n[[vip]]\nname = \"v\"\naddress = \"203.0.113.30\"\n{port}protocol = \
             \"{proto}\"\nsession_ids = \"{ids}\" #!\n[[vip.pool]]\nname = \"p\"\nbackends = \
             [\"gw1\"]\n"
        )
    };
    for (proto, port, ids, flag) in [
        ("udp", "port = 51820\n", "wireguard", VIP_F_IDS_WIREGUARD),
        ("udp", "port = 4500\n", "ipsec", VIP_F_IDS_IPSEC),
        ("esp", "", "ipsec", VIP_F_IDS_IPSEC),
        ("udp", "port = 1194\n", "openvpn", VIP_F_IDS_OPENVPN),
    ] {
        let cfg = ok(&vip(proto, port, ids));
        assert_eq!(cfg.vips[0].flags(), flag, "{ids} over {proto}");
    }
    rejects(
        &vip("tcp", "port = 443\n", "openvpn"),
        "vip \"v\".session_ids",
        "\"openvpn\" ids are not carried by protocol = \"tcp\" (udp only)",
    );
    rejects(
        &vip("esp", "", "wireguard"),
        "vip \"v\".session_ids",
        "not carried by protocol = \"esp\"",
    );
    let e = fails(&vip("udp", "port = 1\n", "l2tp"));
    assert!(e.to_string().contains("unknown variant"), "{e}");

    let ranges = |gw1: &str, gw2: &str| {
        HEAD.replace(
            "address = \"10.0.0.11\"\n",
            &format!("address = \"10.0.0.11\"\n{gw1}\n"),
        )
        .replace(
            "address = \"10.0.0.12\"\n",
            &format!("address = \"10.0.0.12\"\n{gw2}\n"),
        )
    };
    let cfg = ok(&ranges(
        "esp_spi_min = 0xc1000000\nesp_spi_max = 0xc1ffffff\nike_spi_mask = \
         \"0xff00000000000000\"\nike_spi_label = \"0x0100000000000000\"",
        "esp_spi_min = 0xc2000000\nesp_spi_max = 0xc2ffffff\nike_spi_mask = \
         \"0xff00000000000000\"\nike_spi_label = 0x0200000000000000",
    ));
    let mut want = esp_range_prefixes(0xc100_0000, 0xc1ff_ffff);
    want.push(ike_label_prefix(0xff00_0000_0000_0000, 0x0100_0000_0000_0000).unwrap());
    assert_eq!(cfg.backends[0].id_prefixes(), want);
    rejects(
        &ranges("esp_spi_min = 0xc1000000 #!", ""),
        "backend \"gw1\".esp_spi_min",
        "esp_spi_min needs esp_spi_max",
    );
    rejects(
        &ranges("esp_spi_min = 0xc2000000 #!\nesp_spi_max = 0xc1000000", ""),
        "backend \"gw1\".esp_spi_min",
        "is not a range of valid SPIs",
    );
    rejects(
        &ranges("esp_spi_min = 1 #!\nesp_spi_max = 100", ""),
        "backend \"gw1\".esp_spi_min",
        "reserved by RFC 4303",
    );
    rejects(
        &ranges(
            "ike_spi_mask = \"0x00ff000000000000\" #!\nike_spi_label = \"0x0001000000000000\"",
            "",
        ),
        "backend \"gw1\".ike_spi_mask",
        "contiguous high bits",
    );
    rejects(
        &ranges(
            "ike_spi_mask = \"0xf000000000000000\" #!\nike_spi_label = \"0x0100000000000000\"",
            "",
        ),
        "backend \"gw1\".ike_spi_mask",
        "outside ike_spi_mask",
    );
    rejects(
        &ranges(
            "esp_spi_min = 0xc1000000\nesp_spi_max = 0xc1ffffff",
            "esp_spi_min = 0xc1800000 #!\nesp_spi_max = 0xc2ffffff",
        ),
        "backend \"gw2\".esp_spi_min",
        "overlaps the range of backend \"gw1\" (line 5)",
    );
    rejects(
        &ranges(
            "ike_spi_mask = \"0xf000000000000000\"\nike_spi_label = \"0x1000000000000000\"",
            "ike_spi_mask = \"0xff00000000000000\"\nike_spi_label = \"0x1200000000000000\" #!",
        ),
        "backend \"gw2\".ike_spi_label",
        "overlaps the range of backend \"gw1\"",
    );
    let e = fails(&ranges(
        "ike_spi_mask = \"ff\"\nike_spi_label = \"0x1\"",
        "",
    ));
    assert!(e.to_string().contains("invalid 64-bit value \"ff\""), "{e}");
}
