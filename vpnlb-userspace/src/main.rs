//! The `vpnlb` binary: `vpnlb run` is the agent; the other subcommands are the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use vpnlb::cli::source::{Source, SourceOptions};

/// XDP load balancer for VPN gateways (IPsec, WireGuard, OpenVPN).
#[derive(Parser, Debug)]
#[command(name = "vpnlb", version)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the operator commands look (the agent's defaults).
#[derive(Args, Debug, Clone)]
struct Global {
    /// Directory of the pinned maps (the agent's `pin_dir`).
    #[arg(long, global = true, value_name = "DIR", help_heading = "Global options", default_value_os_t = vpnlb::dataplane::loader::default_pin_dir())]
    pin_dir: PathBuf,
    /// The agent's control socket (its `agent.control_socket`); ids.json next to it names ids.
    #[arg(long, global = true, value_name = "PATH", help_heading = "Global options", default_value = vpnlb::agent::control::DEFAULT_SOCKET)]
    control_socket: PathBuf,
}

impl Global {
    fn source_options(&self) -> SourceOptions {
        SourceOptions {
            pin_dir: self.pin_dir.clone(),
            control_socket: self.control_socket.clone(),
        }
    }
}

#[derive(Subcommand, Debug)]
enum InspectCmd {
    /// The VIPs in the VIPS map: address, forwarding, ring, flags, packets and bytes.
    Vips {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The backends in the BACKENDS map: address, state, weight, next hop, packets and bytes.
    Backends {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The session table (SESSIONS), most recently seen first, or counted per backend.
    Sessions {
        /// Only sessions of this VIP: a name, an id, an address or address:port.
        #[arg(long)]
        vip: Option<String>,
        /// Only sessions on this backend: a name or an id.
        #[arg(long)]
        backend: Option<String>,
        /// Only sessions of this client: an address or address:port.
        #[arg(long)]
        client: Option<String>,
        /// Show at most this many sessions (the total is still counted).
        #[arg(long)]
        limit: Option<usize>,
        /// Count the (filtered) sessions per backend instead of listing them.
        #[arg(long)]
        count_by_backend: bool,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Learned VPN session ids (SESSION_IDS) and static id ranges (ID_RANGES), by backend.
    SessionIds {
        /// Only ids of this backend: a name or an id.
        #[arg(long)]
        backend: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// How many Maglev ring slots each backend owns per VIP (and class), vs its weight.
    Ring {
        /// Only this VIP: a name, an id, an address or address:port.
        #[arg(long)]
        vip: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Packets and bytes per VIP and backend, and every data-plane counter (all pass/drop reasons).
    Stats {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Proto {
    Udp,
    Tcp,
    Esp,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the agent: attach the XDP program, health-check the gateways, keep the maps in sync.
    Run {
        /// The agent's TOML config (see docs/config.md).
        #[arg(long, short)]
        config: PathBuf,
        /// Log format (default: the config's `agent.log_format`, else human).
        #[arg(long)]
        log_format: Option<LogFormat>,
    },
    /// Validate a config file without touching the kernel; prints the file, line and reason of
    /// the first error.
    CheckConfig {
        /// The TOML config to check.
        file: PathBuf,
    },
    /// Read the pinned maps (read-only; works while the agent is down).
    #[command(subcommand)]
    Inspect(InspectCmd),
    /// Where would this packet go? Runs the reference model on a copy of the current maps for a
    /// flow or every packet of a pcap file and explains the verdict. Changes nothing.
    #[command(group(clap::ArgGroup::new("input").required(true).args(["src", "pcap"])))]
    Simulate {
        /// Client address and port (ADDR:PORT, [V6]:PORT; ADDR alone for esp).
        #[arg(long, requires = "dst")]
        src: Option<String>,
        /// Destination (the VIP) address and port.
        #[arg(long, requires = "src")]
        dst: Option<String>,
        /// Protocol of the flow.
        #[arg(long, value_enum, default_value = "udp")]
        proto: Proto,
        /// ESP SPI (decimal or 0x hex), with --proto esp.
        #[arg(long, value_parser = vpnlb::cli::simulate::parse_spi)]
        spi: Option<u32>,
        /// DSCP of the packet (0..63): selects a traffic class's ring.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..64))]
        dscp: u8,
        /// Put the packet in this 802.1Q VLAN.
        #[arg(long, value_parser = clap::value_parser!(u16).range(0..4096))]
        vlan: Option<u16>,
        /// Simulate every packet of this classic pcap file (Ethernet) instead of one flow.
        #[arg(long, value_name = "FILE", conflicts_with_all = ["src", "dst", "spi", "vlan"])]
        pcap: Option<PathBuf>,
        /// The interface the packet arrives on (XDP_TX vs redirect).
        #[arg(long, default_value_t = 0)]
        ingress_ifindex: u32,
        /// One JSON object per packet, a line each.
        #[arg(long)]
        json: bool,
    },
    /// Drain a backend: no new flows, existing sessions stay (through the agent).
    Drain {
        /// Backend name (as in the config).
        backend: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Undo a drain (through the agent).
    Undrain {
        /// Backend name (as in the config).
        backend: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Disable a backend: out of service, its sessions move (through the agent).
    Disable {
        /// Backend name (as in the config).
        backend: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Undo a disable (through the agent).
    Enable {
        /// Backend name (as in the config).
        backend: String,
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Make the agent re-read its config file (validated first; errors leave it running as is).
    Reload {
        /// Print the agent's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Health of every backend (state, since when, last check results) and the serving pools.
    Status {
        /// Print the agent's status JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live view of the data plane: rates per VIP and backend, drops, sessions, agent health.
    Top {
        /// Refresh period in seconds.
        #[arg(long, default_value_t = 1.0, value_name = "SECONDS")]
        interval: f64,
    },
    /// On a gateway behind an `ipip`/`gue` VIP: attach, detach or show `vpnlb_decap`, which unwraps
    /// the load balancer's encapsulated packets (pins under their own directory).
    #[command(subcommand)]
    Decap(DecapCmd),
    /// On a gateway host: check what DSR or decapsulation needs here (VIP on lo, ARP and rp_filter
    /// sysctls, the decap program, the daemons) and that a reply to the VIP leaves from the VIP.
    /// Exits non-zero on any failed check.
    GatewayCheck(GatewayCheckArgs),
    /// Several vpnlb hosts: push the cluster's service to etcd, or show every member's state.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print a shell completion script: `vpnlb completions bash > /etc/bash_completion.d/vpnlb`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages, one per subcommand (vpnlb.1, vpnlb-run.1, vpnlb-inspect-vips.1, ...),
    /// into DIR (what the Debian package installs).
    #[command(hide = true)]
    Manpages {
        /// Output directory (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// A member's config file, for its `[cluster]` section (etcd endpoints, TLS, prefix).
#[derive(Args, Debug, Clone)]
struct HostConfig {
    /// A member's config file (its `[cluster]` says where etcd is).
    #[arg(long, value_name = "FILE", default_value = "/etc/vpnlb/vpnlb.toml")]
    host_config: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Validate a service document (`[[backend]]` and `[[vip]]` only) and write it to etcd
    /// atomically, with the stable ids every member uses; every member applies it.
    Push {
        /// The service document.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        #[command(flatten)]
        host: HostConfig,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every member as it publishes itself in etcd: the service revision it runs (or refused),
    /// what its checks see down, its ring hashes (and which differ), readiness.
    Status {
        #[command(flatten)]
        host: HostConfig,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where `vpnlb decap` pins its maps and links (not the LB's `--pin-dir`).
#[derive(Args, Debug, Clone)]
struct DecapDir {
    /// Pin directory of the decap program's maps and links.
    #[arg(long, value_name = "DIR", default_value_os_t = vpnlb::gateway::decap::default_pin_dir())]
    decap_pin_dir: PathBuf,
}

#[derive(Subcommand, Debug)]
enum DecapCmd {
    /// Attach `vpnlb_decap` to an interface (again: swap the program in place, update the port).
    Attach {
        /// The interface the load balancer's encapsulated packets arrive on.
        #[arg(long)]
        iface: String,
        /// GUE destination port to unwrap (the VIP's `gue_port`); 0 = IPIP only.
        #[arg(long, default_value_t = vpnlb::gateway::decap::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// XDP attach mode: native falls back to generic with a warning.
        #[arg(long, value_enum, default_value = "native")]
        mode: XdpAttachMode,
        #[command(flatten)]
        dir: DecapDir,
    },
    /// Detach it from an interface (the last detach removes the pinned maps).
    Detach {
        #[arg(long)]
        iface: String,
        #[command(flatten)]
        dir: DecapDir,
    },
    /// Where it is attached, its GUE port and its counters.
    Status {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        dir: DecapDir,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum XdpAttachMode {
    Native,
    NativeOnly,
    Generic,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EncapArg {
    None,
    Ipip,
    Gue,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProbeArg {
    Auto,
    Udp,
    Ikev2,
    Wireguard,
    None,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CheckProto {
    Udp,
    Tcp,
}

#[derive(Args, Debug)]
struct GatewayCheckArgs {
    /// The VIP this gateway serves.
    #[arg(long)]
    vip: std::net::IpAddr,
    /// The VIP's port: sends one probe to VIP:PORT and checks the reply's source.
    #[arg(long)]
    port: Option<u16>,
    #[arg(long, value_enum, default_value = "udp")]
    proto: CheckProto,
    /// How the load balancer forwards to this gateway (the VIP's `forwarding`).
    #[arg(long, value_enum, default_value = "none")]
    encap: EncapArg,
    /// Interface the VIP's packets arrive on (repeat); default: every up Ethernet interface with
    /// an address.
    #[arg(long)]
    iface: Vec<String>,
    /// The VIP's GUE port (with --encap gue).
    #[arg(long, default_value_t = vpnlb::gateway::decap::DEFAULT_GUE_PORT)]
    gue_port: u16,
    #[command(flatten)]
    dir: DecapDir,
    /// Probe of the reply test: auto = wireguard with --wg-public-key, ikev2 on 500/4500, else a
    /// generic UDP payload.
    #[arg(long, value_enum, default_value = "auto")]
    probe: ProbeArg,
    /// The gateway's WireGuard public key (base64).
    #[arg(long)]
    wg_public_key: Option<String>,
    /// A private key (base64) whose public key the gateway lists as a peer (harmless AllowedIPs).
    #[arg(long, conflicts_with = "wg_probe_private_key_file")]
    wg_probe_private_key: Option<String>,
    /// File holding that private key.
    #[arg(long)]
    wg_probe_private_key_file: Option<String>,
    /// The `tunnel_address` of the load balancer's `wireguard` check with `inside`: checks that
    /// the probe peer's AllowedIPs cover it, that replies to it are routed into the tunnel and
    /// that this host forwards (needs the probe key).
    #[arg(long, value_name = "ADDR")]
    wg_probe_tunnel_address: Option<std::net::IpAddr>,
    /// The check's `inside` host: checks that this host has a route to it outside the tunnel.
    #[arg(long, value_name = "ADDR", requires = "wg_probe_tunnel_address")]
    wg_inside: Option<std::net::IpAddr>,
    /// Payload of the generic UDP probe (default "vpnlb gateway-check").
    #[arg(long, conflicts_with = "udp_payload_hex")]
    udp_payload: Option<String>,
    /// The same in hex, e.g. an OpenVPN P_CONTROL_HARD_RESET_CLIENT_V2 (tls-auth/tls-crypt off):
    /// 3801020304050607080000000000.
    #[arg(long)]
    udp_payload_hex: Option<String>,
    /// The probe client's address (in a throw-away namespace; must be unused on this host);
    /// default 198.18.0.2, or 2001:2::2 for an IPv6 VIP.
    #[arg(long)]
    client: Option<std::net::IpAddr>,
    /// How long the probe waits for its reply.
    #[arg(long, default_value_t = 1000)]
    timeout_ms: u64,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

fn decap(cmd: DecapCmd) -> anyhow::Result<()> {
    use vpnlb::gateway::decap;
    match cmd {
        DecapCmd::Attach {
            iface,
            gue_port,
            mode,
            dir,
        } => {
            init_logging(false);
            let mode = match mode {
                XdpAttachMode::Native => vpnlb::config::AttachMode::Native,
                XdpAttachMode::NativeOnly => vpnlb::config::AttachMode::NativeOnly,
                XdpAttachMode::Generic => vpnlb::config::AttachMode::Generic,
            };
            let how = decap::attach(&dir.decap_pin_dir, &iface, mode, gue_port)?;
            println!(
                "vpnlb_decap on {iface}: {how:?} (GUE port {gue_port}, pins {})",
                dir.decap_pin_dir.display()
            );
        }
        DecapCmd::Detach { iface, dir } => {
            decap::detach(&dir.decap_pin_dir, &iface)?;
            println!("vpnlb_decap detached from {iface}");
        }
        DecapCmd::Status { json, dir } => {
            let (j, t) = decap::render(&decap::status(&dir.decap_pin_dir)?);
            emit(json, &j, &t);
        }
    }
    Ok(())
}

fn gateway_check(a: GatewayCheckArgs) -> anyhow::Result<bool> {
    use vpnlb::cli::gateway_check::{self as gc, Encap, Options, ProbeKind};
    let kind = match a.probe {
        ProbeArg::Auto => ProbeKind::Auto,
        ProbeArg::Udp => ProbeKind::Udp,
        ProbeArg::Ikev2 => ProbeKind::Ikev2,
        ProbeArg::Wireguard => ProbeKind::Wireguard,
        ProbeArg::None => ProbeKind::None,
    };
    let probe_tunnel = match a.wg_probe_tunnel_address {
        Some(tunnel_address) => {
            let private = match (&a.wg_probe_private_key, &a.wg_probe_private_key_file) {
                (Some(k), _) => k.clone(),
                (None, Some(f)) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("--wg-probe-private-key-file {f}: {e}"))?,
                (None, None) => anyhow::bail!(
                    "--wg-probe-tunnel-address needs --wg-probe-private-key or --wg-probe-private-key-file (the probe's key)"
                ),
            };
            let public_key = vpnlb::health::wireguard::public_key_of(&private)
                .map_err(|e| anyhow::anyhow!("the probe's private key: {e}"))?;
            if a.wg_inside
                .is_some_and(|i| i.is_ipv4() != tunnel_address.is_ipv4())
            {
                anyhow::bail!("--wg-inside and --wg-probe-tunnel-address must be of one family");
            }
            Some(gc::ProbeTunnel {
                public_key,
                tunnel_address,
                inside: a.wg_inside,
            })
        }
        None => None,
    };
    let probe = match a.port {
        Some(port) => gc::probe_spec(
            kind,
            port,
            a.wg_public_key,
            a.wg_probe_private_key,
            a.wg_probe_private_key_file,
            a.udp_payload,
            a.udp_payload_hex,
        )?,
        None => None,
    };
    let opts = Options {
        vip: a.vip,
        port: a.port,
        proto: format!("{:?}", a.proto).to_lowercase(),
        encap: match a.encap {
            EncapArg::None => Encap::None,
            EncapArg::Ipip => Encap::Ipip,
            EncapArg::Gue => Encap::Gue,
        },
        ifaces: a.iface,
        gue_port: a.gue_port,
        decap_pin_dir: a.dir.decap_pin_dir,
        probe,
        client: a.client,
        timeout: std::time::Duration::from_millis(a.timeout_ms),
        probe_tunnel,
    };
    let findings = gc::run(&opts)?;
    let (j, t) = gc::render(&opts, &findings);
    emit(a.json, &j, &t);
    Ok(gc::worst(&findings) != gc::Level::Fail)
}

fn init_logging(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VPNLB_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

/// Prints `json` (pretty) or `text`.
fn emit(as_json: bool, json: &serde_json::Value, text: &str) {
    if as_json {
        println!(
            "{}",
            serde_json::to_string_pretty(json).unwrap_or_else(|_| json.to_string())
        );
    } else {
        print!("{text}");
    }
}

fn fail(e: anyhow::Error) -> ExitCode {
    eprintln!("vpnlb: {e:#}");
    ExitCode::FAILURE
}

fn inspect(g: &Global, cmd: InspectCmd) -> anyhow::Result<()> {
    use vpnlb::cli::inspect;
    let src = Source::open(&g.source_options())?;
    match cmd {
        InspectCmd::Vips { json } => {
            let (j, t) = inspect::vips(&src)?;
            emit(json, &j, &t);
        }
        InspectCmd::Backends { json } => {
            let (j, t) = inspect::backends(&src)?;
            emit(json, &j, &t);
        }
        InspectCmd::Sessions {
            vip,
            backend,
            client,
            limit,
            count_by_backend,
            json,
        } => {
            let q = inspect::SessionQuery {
                vip,
                backend,
                client,
                limit,
                count_by_backend,
            };
            let (j, t) = inspect::sessions(&src, &q)?;
            emit(json, &j, &t);
        }
        InspectCmd::SessionIds { backend, json } => {
            let (j, t) = inspect::session_ids(&src, backend.as_deref())?;
            emit(json, &j, &t);
        }
        InspectCmd::Ring { vip, json } => {
            let (j, t) = inspect::ring(&src, vip.as_deref())?;
            emit(json, &j, &t);
        }
        InspectCmd::Stats { json } => {
            let (j, t) = inspect::stats(&src)?;
            emit(json, &j, &t);
        }
    }
    Ok(())
}

/// One control-socket command; `text` renders a successful answer.
fn control(
    g: &Global,
    req: vpnlb::agent::control::Request,
    as_json: bool,
    text: fn(&serde_json::Value) -> String,
) -> ExitCode {
    // A reload validates and applies a whole config: give it longer than a status.
    let timeout = std::time::Duration::from_secs(30);
    match vpnlb::cli::ctl::call(&g.control_socket, &req, timeout) {
        Ok(v) => {
            emit(as_json, &v, &text(&v));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let g = cli.global;
    match cli.cmd {
        Cmd::Inspect(cmd) => match inspect(&g, cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Cmd::Simulate {
            src,
            dst,
            proto,
            spi,
            dscp,
            vlan,
            pcap,
            ingress_ifindex,
            json,
        } => {
            use vpnlb::cli::simulate::{self, FlowSpec, Input};
            let input = match pcap {
                Some(p) => Input::Pcap(p),
                None => Input::Flow(FlowSpec {
                    src: src.unwrap_or_default(),
                    dst: dst.unwrap_or_default(),
                    proto: format!("{proto:?}").to_lowercase(),
                    spi,
                    dscp,
                    vlan,
                }),
            };
            let r = Source::open(&g.source_options())
                .map_err(anyhow::Error::from)
                .and_then(|s| simulate::run(&s, &input, ingress_ifindex, json));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Drain { backend, json } => control(
            &g,
            vpnlb::agent::control::Request::Drain { backend },
            json,
            vpnlb::cli::ctl::admin_text,
        ),
        Cmd::Undrain { backend, json } => control(
            &g,
            vpnlb::agent::control::Request::Undrain { backend },
            json,
            vpnlb::cli::ctl::admin_text,
        ),
        Cmd::Disable { backend, json } => control(
            &g,
            vpnlb::agent::control::Request::Disable { backend },
            json,
            vpnlb::cli::ctl::admin_text,
        ),
        Cmd::Enable { backend, json } => control(
            &g,
            vpnlb::agent::control::Request::Enable { backend },
            json,
            vpnlb::cli::ctl::admin_text,
        ),
        Cmd::Reload { json } => control(
            &g,
            vpnlb::agent::control::Request::Reload {},
            json,
            vpnlb::cli::ctl::reload_text,
        ),
        Cmd::Status { json } => control(
            &g,
            vpnlb::agent::control::Request::Status {},
            json,
            vpnlb::cli::ctl::status_text,
        ),
        Cmd::Top { interval } => {
            let opts = vpnlb::cli::top::TopOptions {
                source: g.source_options(),
                interval: std::time::Duration::from_secs_f64(interval.clamp(0.05, 3600.0)),
            };
            match vpnlb::cli::top::run(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(e),
            }
        }
        Cmd::Decap(cmd) => match decap(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e),
        },
        Cmd::GatewayCheck(a) => match gateway_check(a) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("vpnlb: {e:#}");
                ExitCode::from(2)
            }
        },
        Cmd::Cluster(ClusterCmd::Push { config, host, json }) => {
            match vpnlb::cli::cluster::push(&host.host_config, &config) {
                Ok(v) => {
                    emit(json, &v, &vpnlb::cli::cluster::push_text(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Cluster(ClusterCmd::Status { host, json }) => {
            match vpnlb::cli::cluster::status(&host.host_config) {
                Ok(v) => {
                    emit(json, &v, &vpnlb::cli::cluster::status_text(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e),
            }
        }
        Cmd::Manpages { out } => {
            let r = std::fs::create_dir_all(&out)
                .and_then(|()| clap_mangen::generate_to(Cli::command(), &out));
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(anyhow::anyhow!(
                    "writing man pages to {}: {e}",
                    out.display()
                )),
            }
        }
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vpnlb", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Cmd::CheckConfig { file } => match vpnlb::config::load(&file) {
            Ok(cfg) => {
                println!(
                    "{}: ok ({} interfaces, {} backends, {} vips)",
                    file.display(),
                    cfg.interfaces.len(),
                    cfg.backends.len(),
                    cfg.vips.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run { config, log_format } => {
            // The config decides the log format, so read it first; its errors go to stderr as is.
            let json = match log_format {
                Some(f) => matches!(f, LogFormat::Json),
                None => match vpnlb::config::load(&config) {
                    Ok(c) => c.agent.log_format == vpnlb::config::LogFormat::Json,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            init_logging(json);
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("vpnlb: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(vpnlb::agent::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %vpnlb::agent::chain(&e), "agent stopped");
                    eprintln!("vpnlb: {}", vpnlb::agent::chain(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}
