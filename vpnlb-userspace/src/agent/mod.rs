//! `vpnlb run`: the agent. Its decisions live in [`core`], which has no I/O: time is an argument,
//! events go in and effects come out. This file is the shell around it: it loads the XDP object
//! over the pinned maps (adopting what a previous agent left: sessions, rings, the attached
//! program), turns check results, neighbour reports, control requests and signals into
//! [`core::Event`]s, and carries out the [`core::Effect`]s (checks, links, hooks, files, logs).
//! The core programs the maps in the same event-loop turn as the event. Exiting leaves the
//! program attached and the maps pinned: the data plane keeps forwarding.

pub mod control;
pub mod core;
pub mod desired;
pub mod hooks;
pub mod metrics;
pub mod neigh;
pub mod notify;
pub mod persist;
pub mod probe_env;
pub mod reconcile;
pub mod state;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use aya::programs::Xdp;
use tokio::sync::mpsc;
use vpnlb_common::{MAX_VIPS, prog_names};

use crate::config::{self, Config, ConfigError};
use crate::dataplane::attach::{self, AttachError, AttachMode};
use crate::dataplane::loader::{self, LoadOptions};
use crate::dataplane::maps::{AyaMaps, MapReader};
use crate::health::bfd::{BfdManager, BfdSessionHandle, SessionParams};
use crate::health::runner::{self, CheckHandle};
use crate::health::{CheckResult, CheckSpec, CheckTarget};

use self::core::{Core, Effect, Event, Log, Start};
use crate::cluster::replicate::{self, Replicator};
use control::Command;
use hooks::{HookConfig, Hooks};
use metrics::Metrics;
use state::BackendState;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("interface {name}: {reason}")]
    Interface { name: String, reason: String },
    #[error("programming the maps")]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Maps(#[from] crate::dataplane::maps::MapError),
    #[error("health check of backend {backend}: {reason}")]
    Check { backend: String, reason: String },
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("{0}")]
    Internal(String),
}

/// An error with its sources, one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A running check of one backend. Held only for its Drop, which stops the check.
#[allow(dead_code)]
enum Running {
    Probe(CheckHandle),
    Bfd(BfdSessionHandle),
}

/// Everything the shell owns: the loaded object (its program is what links run), the running
/// checks, the neighbour watch list, hooks and metrics.
struct Shell {
    ebpf: aya::Ebpf,
    pin_dir: PathBuf,
    control_socket: PathBuf,
    checks: BTreeMap<String, Vec<Running>>,
    bfd: Option<BfdManager>,
    neigh: neigh::Wanted,
    hooks: Hooks,
    metrics: Metrics,
    results_tx: mpsc::Sender<CheckResult>,
    /// Commands for the member's etcd session.
    etcd: Option<mpsc::Sender<crate::cluster::etcd::Command>>,
    /// The member's session replication.
    replicator: Option<Replicator>,
}

/// The interfaces a config names (attach points and backends' egress), as the host has them.
fn host_ifaces(cfg: &Config) -> HashMap<String, desired::Iface> {
    let names: Vec<&str> = cfg
        .interfaces
        .iter()
        .map(|i| i.name.as_str())
        .chain(cfg.backends.iter().filter_map(|b| b.interface.as_deref()))
        .collect();
    neigh::ifaces(names)
}

impl Shell {
    /// Carries out `fx` in order. `t0`: when the core started handling the event (map-write
    /// timing). Attach failures are returned as events for the core.
    fn run(&mut self, fx: Vec<Effect>, t0: Instant) -> Vec<(Event, Option<AgentError>)> {
        let mut back = Vec::new();
        for e in fx {
            match e {
                Effect::StartChecks { backend, checks } => self.start_checks(&backend, checks),
                Effect::StopChecks { backend } => {
                    self.checks.remove(&backend);
                }
                Effect::WatchNeigh {
                    backend,
                    key,
                    generation,
                } => neigh::want(&self.neigh, &backend, key, generation),
                Effect::UnwatchNeigh { backend } => neigh::unwant(&self.neigh, &backend),
                Effect::Attach { iface, mode } => {
                    if let Err(e) = self.attach(&iface, mode) {
                        back.push((
                            Event::AttachFailed {
                                iface,
                                error: chain(&e),
                            },
                            Some(e),
                        ));
                    }
                }
                Effect::Detach { iface } => {
                    if let Err(e) = attach::detach(&self.pin_dir, &iface) {
                        tracing::error!(iface, error = %chain(&e), "detach failed");
                    } else {
                        tracing::info!(iface, "vpnlb_ingress detached");
                    }
                }
                Effect::Hook(ev) => self.hooks.emit(ev),
                Effect::PersistIds(ids) => persist::save_json(
                    &ids,
                    &persist::ids_path(&self.control_socket),
                    "id assignment",
                ),
                Effect::PersistAdmin(admin) => persist::save_json(
                    &admin,
                    &persist::admin_path(&self.control_socket),
                    "admin overrides",
                ),
                Effect::PublishView(v) => {
                    if let Ok(mut view) = self.metrics.view.lock() {
                        *view = v;
                    }
                }
                Effect::MapsApplied {
                    why,
                    changed,
                    ring_slots,
                    entries,
                } => {
                    let took = t0.elapsed();
                    self.metrics.map_write.observe(took.as_secs_f64());
                    if changed {
                        tracing::debug!(
                            why,
                            us = took.as_micros() as u64,
                            ring_slots,
                            entries,
                            "maps reconciled"
                        );
                    }
                }
                Effect::Log(l) => log(l, t0),
                // Replies are taken out by the caller before running the rest.
                Effect::Reply(_) => {}
                Effect::Etcd(c) => match &self.etcd {
                    Some(tx) => {
                        if tx.try_send(c).is_err() {
                            tracing::warn!(
                                "etcd session busy: a publish or admin write was dropped; the next change sends the state again"
                            );
                        }
                    }
                    None => tracing::error!("no etcd session for a cluster command"),
                },
                Effect::PersistService(svc) => {
                    persist::save_service(&svc, &persist::service_path(&self.control_socket))
                }
                Effect::Peers(peers) => {
                    if let Some(r) = &self.replicator {
                        tracing::info!(peers = ?peers.keys().collect::<Vec<_>>(), "replicating sessions to peers");
                        r.set_peers(peers);
                    }
                }
            }
        }
        back
    }

    fn start_checks(&mut self, backend: &str, checks: Vec<(CheckSpec, CheckTarget)>) {
        let mut running = Vec::new();
        for (spec, target) in checks {
            let started = if let CheckSpec::Bfd { .. } = spec {
                self.start_bfd(&spec, target.clone())
            } else {
                runner::spawn(&spec, target.clone(), self.results_tx.clone())
                    .map(Running::Probe)
                    .map_err(|e| e.to_string())
            };
            match started {
                Ok(r) => running.push(r),
                Err(reason) => {
                    // A check that cannot run is a failing check: the backend goes down with the
                    // reason in `status`, and the rest of the config stays applied.
                    tracing::error!(backend, check = %spec.label(), error = %reason, "check not started");
                    let r = CheckResult {
                        backend_id: target.backend_id,
                        check_index: target.check_index,
                        generation: target.generation,
                        ok: false,
                        latency: None,
                        phases: Vec::new(),
                        detail: format!("not started: {reason}"),
                        at: Instant::now(),
                    };
                    let _ = self.results_tx.try_send(r);
                }
            }
        }
        self.checks.insert(backend.to_string(), running);
    }

    fn start_bfd(&mut self, spec: &CheckSpec, target: CheckTarget) -> Result<Running, String> {
        if self.bfd.is_none() {
            self.bfd = Some(BfdManager::start().map_err(|e| format!("bfd: {e}"))?);
        }
        let params = SessionParams::from_spec(spec).ok_or("bfd parameters")?;
        let h = self.bfd.as_ref().expect("started").add_session(
            params,
            target,
            self.results_tx.clone(),
        );
        Ok(Running::Bfd(h.map_err(|e| format!("bfd: {e}"))?))
    }

    fn attach(&mut self, ifname: &str, mode: AttachMode) -> Result<(), AgentError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(prog_names::INGRESS)
            .ok_or_else(|| AgentError::Internal("object has no vpnlb_ingress".into()))?
            .try_into()
            .map_err(|e| AgentError::Internal(format!("vpnlb_ingress: {e}")))?;
        let how = attach::attach(prog, ifname, mode, &self.pin_dir)?;
        tracing::info!(iface = ifname, how = ?how, "vpnlb_ingress attached");
        Ok(())
    }
}

/// Writes one of the core's log events (`t0`: when handling the event began).
fn log(l: Log, t0: Instant) {
    match l {
        Log::Transition { t, initial } => {
            let checks: Vec<String> = t
                .checks
                .iter()
                .map(|c| {
                    format!(
                        "{}={}",
                        c.label,
                        match c.last_ok {
                            Some(true) => "ok",
                            Some(false) => "fail",
                            None => "-",
                        }
                    )
                })
                .collect();
            let checks = checks.join(",");
            // A backend's first conclusion after start is part of a normal start; going down
            // from unknown still deserves attention.
            if initial && t.to == BackendState::Up {
                tracing::info!(backend = %t.backend, old = %t.from, new = %t.to, reason = %t.reason, checks = %checks, "backend state change");
            } else {
                tracing::warn!(backend = %t.backend, old = %t.from, new = %t.to, reason = %t.reason, checks = %checks, "backend state change");
            }
        }
        Log::Pool {
            vip,
            class,
            from,
            to,
            initial,
        } => {
            if initial && from.is_none() {
                tracing::info!(%vip, ?class, pool = ?to, "pool serving");
            } else {
                tracing::warn!(%vip, ?class, ?from, ?to, "pool failover");
            }
        }
        Log::Settled {
            up,
            down,
            other,
            after,
        } => {
            tracing::info!(
                up,
                down,
                other,
                ms = after.as_millis() as u64,
                "every backend's checks concluded"
            );
            notify::ready(&format!("{up} backends up, {down} down, {other} other"));
        }
        Log::Pruned { vips, backends } => tracing::info!(
            vips,
            backends,
            "removed pinned entries the config no longer has"
        ),
        Log::NeighKept { backend, mac } => tracing::debug!(
            backend = %backend,
            mac = %neigh::fmt_mac(&mac),
            "neighbour entry gone; keeping the known MAC (nudged)"
        ),
        Log::ApplyFailed { why, error } => tracing::error!(
            why,
            error = %error,
            "applying a change to the maps failed; will retry on the next event"
        ),
        Log::ReloadRejected { error, by_signal } => {
            if by_signal {
                tracing::error!(error = %error, "SIGHUP reload rejected; the running config stays")
            } else {
                tracing::error!(error = %error, "reload rejected; the running config stays")
            }
        }
        Log::Reloaded {
            restarted,
            removed,
            attached,
            detached,
        } => tracing::info!(
            ?restarted,
            ?removed,
            ?attached,
            ?detached,
            ms = t0.elapsed().as_millis() as u64,
            "config reloaded"
        ),
        Log::AttachFailed { iface, error } => {
            tracing::error!(iface = %iface, error = %error, "attaching vpnlb_ingress failed")
        }
        Log::Etcd { up: true, detail } => tracing::info!(%detail, "etcd reached"),
        Log::Etcd { up: false, detail } => tracing::error!(
            error = %detail,
            "etcd lost; reconnecting (forwarding continues with the state in the maps)"
        ),
        Log::EtcdBadValue { key, reason } => {
            tracing::error!(%key, %reason, "unreadable value in etcd ignored")
        }
        Log::ServiceApplied { revision, detail } => {
            tracing::info!(revision, %detail, "cluster service applied")
        }
        Log::ServiceRefused { revision, error } => tracing::error!(
            revision,
            error = %error,
            "cluster service refused; this member keeps running the previous revision"
        ),
        Log::PeerSynced { peer } => {
            tracing::info!(%peer, "sessions of a peer copied here")
        }
        Log::RingMismatch { rings } => tracing::error!(
            rings = %rings.join(", "),
            "rings differ from peers that run the same service with the same health"
        ),
    }
}

/// One event through the core and its effects through the shell; attach failures go back to the
/// core. Returns the reply, if the event asked for one.
fn step(core: &mut Core<AyaMaps>, shell: &mut Shell, ev: Event) -> Option<control::Response> {
    let t0 = Instant::now();
    let mut fx = core.handle(t0, SystemTime::now(), ev);
    let reply = fx.iter().position(|e| matches!(e, Effect::Reply(_)));
    let reply = reply.map(|i| match fx.remove(i) {
        Effect::Reply(r) => r,
        _ => unreachable!("position matched a reply"),
    });
    for (ev, _) in shell.run(fx, t0) {
        let more = core.handle(Instant::now(), SystemTime::now(), ev);
        shell.run(more, t0);
    }
    reply
}

/// Loads the object over the pins, verifies and loads `vpnlb_ingress`, and starts the data-plane
/// log reader.
fn load_object(cfg: &Config) -> Result<aya::Ebpf, AgentError> {
    let obj = loader::object_bytes()?;
    let opts = LoadOptions {
        pin_dir: Some(cfg.agent.pin_dir.clone()),
        max_sessions: Some(cfg.agent.max_sessions),
        ring_rows: Some(MAX_VIPS),
    };
    let mut ebpf = loader::load(&obj, &opts)?;
    // Verify and load the program into the kernel before anything is written or attached: a
    // program that was never loaded cannot be attached (nor swapped into a pinned link).
    {
        let prog: &mut Xdp = ebpf
            .program_mut(prog_names::INGRESS)
            .ok_or_else(|| AgentError::Internal("object has no vpnlb_ingress".into()))?
            .try_into()
            .map_err(|e| AgentError::Internal(format!("vpnlb_ingress: {e}")))?;
        prog.load()
            .map_err(|e| AgentError::Internal(format!("loading vpnlb_ingress: {}", chain(&e))))?;
    }
    // Rare data-plane events (the flood guard engaging) arrive through aya-log's ring buffer and
    // go to our log through the `log` -> tracing bridge.
    match aya_log::EbpfLogger::init(&mut ebpf) {
        // SAFETY: the logger owns its ring-buffer fd and neither closes nor replaces it while the
        // AsyncFd owns the logger.
        Ok(logger) => match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        } {
            Ok(mut fd) => {
                tokio::spawn(async move {
                    while let Ok(mut guard) = fd.readable_mut().await {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "data-plane log reader unavailable"),
        },
        Err(e) => tracing::warn!(error = %e, "data-plane log reader unavailable"),
    }
    Ok(ebpf)
}

fn signal(
    kind: tokio::signal::unix::SignalKind,
) -> Result<tokio::signal::unix::Signal, AgentError> {
    tokio::signal::unix::signal(kind).map_err(|e| AgentError::Internal(e.to_string()))
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(config_path: PathBuf) -> Result<(), AgentError> {
    let cfg = config::load(&config_path)?;
    attach::check_abi(&cfg.agent.pin_dir)?;
    // Claim the control socket before touching ids, maps or links: a second agent started on the
    // same config must stop here, not rewrite the maps, swap the program and then find the socket
    // taken (and, on exit, delete the running agent's socket).
    let ctl_listener = control::bind(&cfg.agent.control_socket)?;
    let mut ebpf = load_object(&cfg)?;
    let maps = AyaMaps::from_ebpf(&mut ebpf)?;
    let sessions = maps.sessions().map(|s| s.len()).unwrap_or(0);
    tracing::info!(pin_dir = %cfg.agent.pin_dir.display(), backends = maps.backends()?.len(), sessions, "maps loaded (pinned state adopted)");

    let hooks = Hooks::start(HookConfig {
        exec: cfg.hooks.exec.clone(),
        webhook: cfg.hooks.webhook.clone(),
        timeout: Duration::from_millis(cfg.hooks.timeout_ms),
    });
    let metrics = Metrics::new(
        AyaMaps::open_pinned(&cfg.agent.pin_dir)?,
        hooks.stats.clone(),
    );
    let (results_tx, mut results_rx) = mpsc::channel::<CheckResult>(4096);
    let (neigh_tx, mut neigh_rx) = mpsc::channel::<neigh::NeighUpdate>(256);
    let control_socket = cfg.agent.control_socket.clone();
    let cluster = cfg.cluster.clone();
    let start = Start {
        config_path: config_path.clone(),
        saved_ids: persist::load_ids(&persist::ids_path(&control_socket)),
        saved_admin: persist::load_admin(&persist::admin_path(&control_socket)),
        cached_service: cluster
            .as_ref()
            .and_then(|_| persist::load_service(&persist::service_path(&control_socket))),
        ifaces: if cluster.is_some() {
            neigh::all_ifaces()
        } else {
            host_ifaces(&cfg)
        },
        neighbours: tokio::task::spawn_blocking(neigh::table)
            .await
            .unwrap_or_default(),
        host: hooks::hostname(),
        pid: std::process::id(),
        cfg,
    };
    let mut shell = Shell {
        ebpf,
        pin_dir: start.cfg.agent.pin_dir.clone(),
        control_socket: control_socket.clone(),
        checks: BTreeMap::new(),
        bfd: None,
        neigh: neigh::Wanted::default(),
        hooks,
        metrics: metrics.clone(),
        results_tx,
        etcd: None,
        replicator: None,
    };
    let (repl_tx, mut repl_rx) = mpsc::channel::<replicate::Report>(256);
    if let Some(c) = cluster.as_ref().filter(|c| c.replicate) {
        let key =
            replicate::read_key(&c.peer_key_file).map_err(|e| AgentError::Internal(chain(&e)))?;
        let r = Replicator::start(
            replicate::Settings {
                member: c.member_name(),
                listen: c.peer_listen,
                key: std::sync::Arc::new(key),
                pin_dir: shell.pin_dir.clone(),
            },
            repl_tx,
        )
        .await
        .map_err(|e| AgentError::Internal(chain(&e)))?;
        let _ = metrics.replication.set(r.stats.clone());
        let events = shell
            .ebpf
            .take_map(vpnlb_common::map_names::EVENTS)
            .ok_or_else(|| AgentError::Internal("the object has no EVENTS map".into()))
            .and_then(|m| {
                aya::maps::RingBuf::try_from(m)
                    .map_err(|e| AgentError::Internal(format!("EVENTS: {e}")))
            })?;
        replicate::read_events(events, r.clone())
            .map_err(|e| AgentError::Internal(format!("reading EVENTS: {e}")))?;
        shell.replicator = Some(r);
    }
    let (etcd_tx, mut etcd_rx) = mpsc::channel::<crate::cluster::etcd::Update>(1024);
    let etcd_task = cluster.map(|c| {
        let (cmd_tx, cmd_rx) = mpsc::channel(1024);
        shell.etcd = Some(cmd_tx);
        tracing::info!(cluster = %c.name, member = %c.member_name(), prefix = %c.prefix(), "joining the cluster");
        tokio::spawn(crate::cluster::etcd::run(c, cmd_rx, etcd_tx))
    });
    let t0 = Instant::now();
    let (mut core, fx) = Core::start(maps, start, t0, SystemTime::now())?;
    // At start a link that cannot be attached is fatal (the agent would balance nothing there).
    if let Some((_, Some(e))) = shell.run(fx, t0).into_iter().next() {
        return Err(e);
    }

    let neigh_watch = neigh::watch(shell.neigh.clone(), neigh_tx);
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Command>(64);
    let ctl = tokio::spawn(async move {
        if let Err(e) = control::serve_on(ctl_listener, control_socket, ctl_tx).await {
            tracing::error!(error = %chain(&e), "control socket failed");
        }
    });
    let metrics_task = core.config().agent.metrics_listen.map(|addr| {
        tokio::spawn(async move {
            if let Err(e) = metrics.serve(addr).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        })
    });
    use tokio::signal::unix::SignalKind;
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(pid = std::process::id(), "agent running");
    let ready_anyway = notify::ready_at_the_latest();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    let reload = |by_signal: bool| {
        let cfg = config::load(&config_path);
        let ifaces = match &cfg {
            Ok(c) if c.cluster.is_some() => neigh::all_ifaces(),
            Ok(c) => host_ifaces(c),
            Err(_) => HashMap::new(),
        };
        Event::Reload(Box::new(core::Reload {
            cfg,
            ifaces,
            by_signal,
        }))
    };
    loop {
        tokio::select! {
            _ = tick.tick() => {
                step(&mut core, &mut shell, Event::Tick);
                ticks += 1;
                // The lag is published in etcd for `vpnlb cluster status`: every 5 s at most.
                if ticks % 5 == 0
                    && let Some(lag) = shell.replicator.as_ref().and_then(|r| r.stats.lag_report())
                {
                    step(&mut core, &mut shell, Event::Replication(lag));
                }
                notify::watchdog();
            }
            Some(r) = results_rx.recv() => {
                step(&mut core, &mut shell, Event::Check(r));
            }
            Some(u) = neigh_rx.recv() => {
                step(&mut core, &mut shell, Event::Neigh(u));
            }
            Some(r) = repl_rx.recv() => {
                step(&mut core, &mut shell, Event::Replication(r));
            }
            Some(u) = etcd_rx.recv() => {
                let ifaces = neigh::all_ifaces();
                step(&mut core, &mut shell, Event::Etcd(Box::new((u, ifaces))));
            }
            Some(c) = ctl_rx.recv() => {
                use control::Request;
                use state::Admin;
                let ev = match c.request {
                    Request::Drain { backend } => Event::Admin { backend, admin: Admin::Drain },
                    Request::Disable { backend } => Event::Admin { backend, admin: Admin::Disable },
                    Request::Undrain { backend } | Request::Enable { backend } => {
                        Event::Admin { backend, admin: Admin::None }
                    }
                    Request::Reload {} => reload(false),
                    Request::Status {} => Event::Status,
                };
                let is_status = matches!(ev, Event::Status);
                let mut resp = step(&mut core, &mut shell, ev)
                    .unwrap_or_else(|| control::Response::err("no answer"));
                if is_status
                    && let Some(r) = &shell.replicator
                    && let Some(c) = resp.result.get_mut("cluster")
                    && c.is_object()
                {
                    c["replication"] = r.stats.json();
                }
                let _ = c.reply.send(resp);
            }
            _ = hup.recv() => {
                notify::reloading();
                step(&mut core, &mut shell, reload(true));
                notify::reloaded("running");
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(
        "exiting: vpnlb_ingress stays attached and the maps pinned; the data plane keeps forwarding"
    );
    notify::stopping();
    ready_anyway.abort();
    ctl.abort();
    neigh_watch.abort();
    // Closing the command channel ends the session, which revokes this member's lease: its
    // peers see it leave at once instead of after the lease's TTL.
    shell.etcd = None;
    if let Some(t) = etcd_task {
        let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
    }
    if let Some(m) = metrics_task {
        m.abort();
    }
    let _ = std::fs::remove_file(&core.config().agent.control_socket);
    Ok(())
}
