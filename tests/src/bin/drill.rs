//! `vpnlb-drill`: run by `cargo xtask drill`. Chaos scenarios over the real WireGuard, IPsec and
//! OpenVPN testbed (see
//! tests/src/drill/): progress on stderr, report.json, summary.md and one SVG timeline per scenario
//! in `--out`; `--json` prints the report on stdout. Exits 1 when a scenario did not complete or an
//! expectation failed, 130 on Ctrl-C (after tearing the testbed down).

use std::path::PathBuf;

use clap::Parser;
use vpnlb_tests::drill::report::Report;
use vpnlb_tests::drill::scenario::{self, Scenario};
use vpnlb_tests::drill::{Progress, bed, interrupted, request_stop};

#[derive(Parser)]
#[command(name = "vpnlb-drill", about = "Chaos drills with a failover report")]
struct Args {
    /// One of gateway-kill, gateway-link-down, gateway-blackhole, gateway-flap, agent-kill,
    /// config-reload, or all.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Where report.json, summary.md and the plots go.
    #[arg(long, default_value = "target/drill")]
    out: PathBuf,
    /// Print the JSON report on stdout.
    #[arg(long)]
    json: bool,
    /// Run the remaining scenarios after one fails.
    #[arg(long)]
    keep_going: bool,
    /// Do not fence a gateway the agent takes down (the exec hook then only records events):
    /// shows what a still-running gateway's wireguard-go and openvpn do to their former clients.
    #[arg(long)]
    no_fence: bool,
}

extern "C" fn on_signal(_: libc::c_int) {
    request_stop();
}

fn main() {
    let args = Args::parse();
    let scenarios: Vec<Scenario> = if args.scenario == "all" {
        Scenario::ALL.to_vec()
    } else if let Some(s) = Scenario::from_name(&args.scenario) {
        vec![s]
    } else {
        let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
        eprintln!(
            "vpnlb-drill: unknown scenario {:?}: one of {}, or all",
            args.scenario,
            names.join(", ")
        );
        std::process::exit(2);
    };
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("vpnlb-drill: {}: {e}", args.out.display());
        std::process::exit(2);
    }
    // Ctrl-C and SIGTERM end the running wait; the scenario's guards tear everything down.
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let p = Progress::new();
    p.step(&format!(
        "drill: {} scenario(s), report in {}",
        scenarios.len(),
        args.out.display()
    ));
    let mut report = Report {
        scenarios: Vec::new(),
        testbed: format!(
            "Testbed: the real agent (`vpnlb run`, XDP native on a veth, L2 DSR) in namespace {}-lb; \
             {} gateways (VIP on lo), each running wireguard-go (UDP 51820, one server key), charon \
             (IKEv2 PSK, UDP 500 + 4500, kernel-libipsec) and openvpn (UDP {}, tls-crypt, multihome), \
             behind three VIPs (WireGuard; the IPsec group with hash = source and session_ids = ipsec; \
             OpenVPN), one backend per gateway in all of them, checked with icmp (200 ms), the \
             wireguard handshake probe ({} ms), the ikev2 SA_INIT probe and a udp check replaying an \
             OpenVPN hard reset (200 ms), rise 2 / fall 2; {} WireGuard, {} IPsec (each behind its own \
             NAT) and {} OpenVPN clients pinging through their tunnels every {} ms. A fresh testbed \
             per scenario; the victim is the gateway with the most clients of its least-placed \
             protocol. Gateways send WireGuard from the VIP (policy routing by source port). \
             Fencing: {}.",
            bed::PREFIX,
            bed::GATEWAYS,
            bed::OVPN_PORT,
            bed::WG_INTERVAL_MS,
            bed::CLIENTS,
            bed::IPSEC_CLIENTS,
            bed::OVPN_CLIENTS,
            bed::PING_EVERY.as_millis(),
            if args.no_fence {
                "off (--no-fence)"
            } else {
                "on: the agent's exec hook runs `wg setconf` on a gateway it takes down and sends \
                 its openvpn SIGUSR1, so that gateway forgets its tunnels and clients and cannot \
                 hold on to them or pull them back"
            }
        ),
    };
    for s in scenarios {
        let r = scenario::run(s, &p, &args.out, !args.no_fence);
        let failed = !r.ok;
        report.scenarios.push(r);
        if interrupted() || (failed && !args.keep_going) {
            break;
        }
    }
    if let Err(e) = report.write(&args.out) {
        eprintln!("vpnlb-drill: {e:#}");
    }
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.markdown());
    }
    p.step(&format!(
        "report: {}, {}",
        args.out.join("report.json").display(),
        args.out.join("summary.md").display()
    ));
    if interrupted() {
        std::process::exit(130);
    }
    if !report.ok() {
        std::process::exit(1);
    }
}
