//! The `vpnlb` binary: `vpnlb run` is the agent; the other subcommands are the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// XDP load balancer for VPN gateways (IPsec, WireGuard, OpenVPN).
#[derive(Parser, Debug)]
#[command(name = "vpnlb", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
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
