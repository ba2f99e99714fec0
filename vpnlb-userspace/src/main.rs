//! The `vpnlb` binary: the agent and the operator CLI (subcommands arrive with their issues).

use clap::Parser;

/// XDP load balancer for VPN gateways (IPsec, WireGuard, OpenVPN).
#[derive(Parser, Debug)]
#[command(name = "vpnlb", version)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
