//! Prometheus metrics (text exposition, default http://127.0.0.1:9100/metrics). Data-plane numbers
//! are read from the pinned per-CPU maps at scrape time (summed over CPUs); health, pools and hook
//! outcomes come from the agent's [`View`]; map write latency is a histogram the event loop feeds.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use vpnlb_common::COUNTER_NAMES;

use crate::agent::hooks::HookStats;
use crate::agent::reconcile::PoolChoice;
use crate::agent::state::{BackendHealth, BackendState};
use crate::cluster::replicate::Stats as ReplStats;
use crate::dataplane::maps::MapReader;

/// What the agent knows that the maps do not; replaced by the event loop after each change.
#[derive(Debug, Default, Clone)]
pub struct View {
    pub backends: Vec<BackendHealth>,
    /// (vip name, vip_id)
    pub vips: Vec<(String, u32)>,
    pub pools: Vec<PoolChoice>,
    /// As a cluster member.
    pub cluster: Option<ClusterView>,
}

/// A member's cluster state, as the metrics show it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ClusterView {
    pub etcd_up: bool,
    /// Live members, this one included.
    pub members: usize,
    pub service_revision: i64,
    /// The latest service revision was refused (this member runs an older one).
    pub service_refused: bool,
    /// Rings that differ from a peer's that should be the same.
    pub ring_mismatch: usize,
    /// Unreadable values seen in etcd.
    pub bad_values: u64,
    pub ready: bool,
}

type Labels = Vec<(String, String)>;

fn l(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sessions are counted by walking the LRU, so at most this often.
const SESSION_COUNT_EVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct DataplaneCollector<R: MapReader + std::fmt::Debug + Send + 'static> {
    maps: Mutex<R>,
    view: Arc<Mutex<View>>,
    hooks: Arc<HookStats>,
    sessions: Mutex<Option<(Instant, u64)>>,
    replication: Arc<std::sync::OnceLock<Arc<ReplStats>>>,
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        // One series without labels: `name value`, not `name{} value`.
        return ConstCounter::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge<N: prometheus_client::encoding::EncodeGaugeValue + Copy>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, N)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

const STATES: [BackendState; 5] = [
    BackendState::Unknown,
    BackendState::Up,
    BackendState::Down,
    BackendState::Draining,
    BackendState::Disabled,
];

impl<R: MapReader + std::fmt::Debug + Send + 'static> Collector for DataplaneCollector<R> {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let view = self.view.lock().map_err(|_| std::fmt::Error)?.clone();
        let maps = self.maps.lock().map_err(|_| std::fmt::Error)?;
        // A failed map read leaves the data-plane families out of this scrape (and is logged)
        // rather than reporting zeros.
        match maps.counters() {
            Ok(c) => {
                let rows: Vec<(Labels, u64)> = COUNTER_NAMES
                    .iter()
                    .zip(&c)
                    .map(|(n, v)| (l(&[("counter", n)]), *v))
                    .collect();
                counter(
                    &mut enc,
                    "vpnlb_datapath",
                    "XDP outcome and session counters (docs/datapath.md)",
                    &rows,
                )?;
            }
            Err(e) => tracing::warn!(error = %e, "metrics: reading STATS failed"),
        }
        let mut pk = Vec::new();
        let mut by = Vec::new();
        for (name, id) in &view.vips {
            if let Ok(s) = maps.vip_stats(*id) {
                pk.push((l(&[("vip", name)]), s.packets));
                by.push((l(&[("vip", name)]), s.bytes));
            }
        }
        counter(
            &mut enc,
            "vpnlb_vip_packets",
            "Packets forwarded per VIP",
            &pk,
        )?;
        counter(
            &mut enc,
            "vpnlb_vip_bytes",
            "Bytes forwarded per VIP (frames as received)",
            &by,
        )?;
        let (mut pk, mut by) = (Vec::new(), Vec::new());
        for b in &view.backends {
            if let Ok(s) = maps.backend_stats(b.id) {
                pk.push((l(&[("backend", &b.name)]), s.packets));
                by.push((l(&[("backend", &b.name)]), s.bytes));
            }
        }
        counter(
            &mut enc,
            "vpnlb_backend_packets",
            "Packets forwarded per backend",
            &pk,
        )?;
        counter(
            &mut enc,
            "vpnlb_backend_bytes",
            "Bytes forwarded per backend",
            &by,
        )?;
        let mut cached = self.sessions.lock().map_err(|_| std::fmt::Error)?;
        let fresh = cached.filter(|(at, _)| at.elapsed() < SESSION_COUNT_EVERY);
        let sessions = match fresh {
            Some((_, n)) => Some(n),
            None => match maps.sessions() {
                Ok(s) => {
                    *cached = Some((Instant::now(), s.len() as u64));
                    Some(s.len() as u64)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: reading SESSIONS failed");
                    None
                }
            },
        };
        if let Some(n) = sessions {
            let m = enc.encode_descriptor(
                "vpnlb_sessions",
                "Entries in the session table (refreshed every 10 s)",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(n as i64).encode(m)?;
        }
        drop(maps);

        let mut st = Vec::new();
        let mut tr = Vec::new();
        let mut lat = Vec::new();
        let mut res = Vec::new();
        let mut up = Vec::new();
        let mut phase = Vec::new();
        for b in &view.backends {
            for c in &b.checks {
                if let Some(u) = c.up {
                    up.push((
                        l(&[("backend", &b.name), ("check", &c.label)]),
                        i64::from(u),
                    ));
                }
                for (name, ms) in &c.last_phases_ms {
                    phase.push((
                        l(&[("backend", &b.name), ("check", &c.label), ("phase", name)]),
                        ms / 1e3,
                    ));
                }
            }
            for s in STATES {
                st.push((
                    l(&[("backend", &b.name), ("state", s.as_str())]),
                    i64::from(b.state == s),
                ));
            }
            tr.push((l(&[("backend", &b.name)]), b.transitions));
            for c in &b.checks {
                if let Some(ms) = c.last_latency_ms {
                    lat.push((l(&[("backend", &b.name), ("check", &c.label)]), ms / 1e3));
                }
                res.push((
                    l(&[("backend", &b.name), ("check", &c.label), ("result", "ok")]),
                    c.results - c.failures,
                ));
                res.push((
                    l(&[
                        ("backend", &b.name),
                        ("check", &c.label),
                        ("result", "fail"),
                    ]),
                    c.failures,
                ));
            }
        }
        gauge(
            &mut enc,
            "vpnlb_backend_state",
            "1 for the backend's current state",
            &st,
        )?;
        counter(
            &mut enc,
            "vpnlb_backend_transitions",
            "Backend state changes",
            &tr,
        )?;
        gauge(
            &mut enc,
            "vpnlb_check_latency_seconds",
            "Latency of the last successful probe",
            &lat,
        )?;
        counter(
            &mut enc,
            "vpnlb_check_results",
            "Health check results",
            &res,
        )?;
        gauge(
            &mut enc,
            "vpnlb_check_up",
            "1 while the check is up (after rise/fall), 0 while down; absent until it concludes",
            &up,
        )?;
        gauge(
            &mut enc,
            "vpnlb_check_phase_latency_seconds",
            "Round trip of each step of the last successful multi-step probe (wireguard with inside: handshake, inside)",
            &phase,
        )?;
        let failover: Vec<(Labels, i64)> = view
            .pools
            .iter()
            .map(|p| {
                let class = p.class.clone().unwrap_or_default();
                (
                    l(&[("vip", &p.vip), ("class", &class)]),
                    i64::from(p.standby),
                )
            })
            .collect();
        gauge(
            &mut enc,
            "vpnlb_pool_failover",
            "1 while a VIP (or class) is served by a pool other than its first (pool failover)",
            &failover,
        )?;
        let pools: Vec<(Labels, i64)> = view
            .pools
            .iter()
            .map(|p| {
                let class = p.class.clone().unwrap_or_default();
                let pool = p.pool.clone().unwrap_or_else(|| "none".into());
                (l(&[("vip", &p.vip), ("class", &class), ("pool", &pool)]), 1)
            })
            .collect();
        gauge(
            &mut enc,
            "vpnlb_active_pool",
            "The pool serving each VIP (and class)",
            &pools,
        )?;
        if let Some(c) = &view.cluster {
            let g = |v: i64| vec![(Labels::new(), v)];
            gauge(
                &mut enc,
                "vpnlb_cluster_etcd_up",
                "1 while this member reaches etcd",
                &g(c.etcd_up.into()),
            )?;
            gauge(
                &mut enc,
                "vpnlb_cluster_members",
                "Live members of the cluster, this one included",
                &g(c.members as i64),
            )?;
            gauge(
                &mut enc,
                "vpnlb_cluster_service_revision",
                "The service revision this member runs",
                &g(c.service_revision),
            )?;
            gauge(
                &mut enc,
                "vpnlb_cluster_service_refused",
                "1 when this member refused the latest service revision",
                &g(c.service_refused.into()),
            )?;
            gauge(
                &mut enc,
                "vpnlb_cluster_ring_mismatch",
                "Rings that differ from a peer's that should be the same",
                &g(c.ring_mismatch as i64),
            )?;
            gauge(
                &mut enc,
                "vpnlb_cluster_ready",
                "1 when this member is ready to carry traffic",
                &g(c.ready.into()),
            )?;
            counter(
                &mut enc,
                "vpnlb_cluster_bad_values",
                "Unreadable values seen in etcd (ignored)",
                &[(Labels::new(), c.bad_values)],
            )?;
        }
        if let Some(r) = self.replication.get() {
            let c =
                |v: &std::sync::atomic::AtomicU64| vec![(Labels::new(), v.load(Ordering::Relaxed))];
            counter(
                &mut enc,
                "vpnlb_replication_sent",
                "Sessions and ids sent to peers (bulk copies included)",
                &c(&r.sent),
            )?;
            counter(
                &mut enc,
                "vpnlb_replication_received",
                "Frames received from peers",
                &c(&r.received),
            )?;
            counter(
                &mut enc,
                "vpnlb_replication_written",
                "Sessions and ids from peers written into the maps",
                &c(&r.written),
            )?;
            counter(
                &mut enc,
                "vpnlb_replication_write_errors",
                "Writes of peers' entries the kernel refused",
                &c(&r.write_errors),
            )?;
            counter(
                &mut enc,
                "vpnlb_replication_resyncs",
                "Bulk copies sent again to a peer that fell behind",
                &c(&r.resyncs),
            )?;
            counter(
                &mut enc,
                "vpnlb_replication_refused",
                "Peer connections refused (wrong key, bad frames)",
                &c(&r.refused),
            )?;
            counter(
                &mut enc,
                "vpnlb_replication_events_dropped",
                "Data-plane events a slow peer missed (then resynchronised)",
                &c(&r.events_dropped),
            )?;
            if let Some((p50, p99)) = r.lag_percentiles() {
                gauge(
                    &mut enc,
                    "vpnlb_replication_lag_ms",
                    "Event to the peer's acknowledgement of its write (recent events)",
                    &[
                        (l(&[("quantile", "0.5")]), p50),
                        (l(&[("quantile", "0.99")]), p99),
                    ],
                )?;
            }
        }
        let h = &self.hooks;
        counter(
            &mut enc,
            "vpnlb_hooks",
            "Hook runs by outcome",
            &[
                (l(&[("result", "ok")]), h.ok.load(Ordering::Relaxed)),
                (l(&[("result", "failed")]), h.failed.load(Ordering::Relaxed)),
                (
                    l(&[("result", "timeout")]),
                    h.timed_out.load(Ordering::Relaxed),
                ),
                (
                    l(&[("result", "dropped")]),
                    h.dropped.load(Ordering::Relaxed),
                ),
            ],
        )?;
        Ok(())
    }
}

/// The agent itself: its version and when it started (a restart shows as a new start time).
#[derive(Debug)]
struct AgentInfo {
    started: f64,
}

impl Collector for AgentInfo {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut enc,
            "vpnlb_build_info",
            "Always 1; the version of the running agent as a label",
            &[(l(&[("version", env!("CARGO_PKG_VERSION"))]), 1i64)],
        )?;
        let m = enc.encode_descriptor(
            "vpnlb_agent_start_time_seconds",
            "When the agent started (seconds since the epoch)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(self.started).encode(m)?;
        Ok(())
    }
}

/// The registry plus the handles the event loop feeds.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub view: Arc<Mutex<View>>,
    /// A member's replication counters, once replication runs.
    pub replication: Arc<std::sync::OnceLock<Arc<ReplStats>>>,
    /// Seconds from an event (check result, admin command, reload) to its map writes completing.
    pub map_write: Histogram,
}

impl Metrics {
    pub fn new<R: MapReader + std::fmt::Debug + Send + 'static>(
        maps: R,
        hooks: Arc<HookStats>,
    ) -> Metrics {
        let mut registry = Registry::default();
        let view = Arc::new(Mutex::new(View::default()));
        let replication = Arc::new(std::sync::OnceLock::new());
        let map_write = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "vpnlb_map_write_seconds",
            "Time from a health/admin/config event to its map writes completing",
            map_write.clone(),
        );
        registry.register_collector(Box::new(AgentInfo {
            started: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }));
        registry.register_collector(Box::new(DataplaneCollector {
            maps: Mutex::new(maps),
            view: view.clone(),
            hooks,
            sessions: Mutex::new(None),
            replication: replication.clone(),
        }));
        Metrics {
            registry: Arc::new(registry),
            view,
            replication,
            map_write,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        s
    }

    /// Serves `/metrics` on `addr` until the task is dropped.
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(%addr, "metrics listening");
        loop {
            let (stream, _) = listener.accept().await?;
            let me = self.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let me = me.clone();
                        async move {
                            let resp = if req.uri().path() == "/metrics" {
                                hyper::Response::builder()
                                .header("content-type", "application/openmetrics-text; version=1.0.0; charset=utf-8")
                                .body(Full::new(Bytes::from(me.render())))
                            } else {
                                hyper::Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::from_static(b"not found\n")))
                            };
                            Ok::<_, hyper::http::Error>(resp.expect("static response"))
                        }
                    },
                );
                let io = hyper_util::rt::TokioIo::new(stream);
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, svc)
                    .await
                {
                    tracing::debug!(error = %e, "metrics connection");
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::maps::{MapWriter, MemMaps};
    use std::time::Instant;
    use vpnlb_common::{FWD_L2DSR_TX, PktBytes};

    #[test]
    fn renders_datapath_vip_backend_and_health_families() {
        let mut maps = MemMaps::new();
        maps.counters[FWD_L2DSR_TX as usize] = 42;
        maps.vip_stats.insert(
            3,
            PktBytes {
                packets: 7,
                bytes: 700,
            },
        );
        maps.backend_stats.insert(
            2,
            PktBytes {
                packets: 5,
                bytes: 500,
            },
        );
        maps.set_session(&Default::default(), &Default::default())
            .unwrap();
        let hooks = Arc::new(HookStats::default());
        hooks.failed.store(1, Ordering::Relaxed);
        let m = Metrics::new(maps, hooks);
        {
            let mut v = m.view.lock().unwrap();
            v.vips.push(("wg".into(), 3));
            let mut b = BackendHealth::new(
                "gw2",
                2,
                vec![("icmp".into(), 1, 1)],
                Instant::now(),
                std::time::SystemTime::now(),
            );
            b.state = BackendState::Draining;
            v.backends.push(b);
            v.pools.push(PoolChoice {
                vip: "wg".into(),
                class: None,
                pool: Some("primary".into()),
                standby: false,
            });
            let b = &mut v.backends[0];
            b.checks[0].up = Some(true);
            b.checks[0].last_phases_ms = vec![("handshake".into(), 0.5), ("inside".into(), 1.5)];
        }
        m.map_write.observe(0.0002);
        let text = m.render();
        for want in [
            "vpnlb_datapath_total{counter=\"fwd_l2dsr_tx\"} 42",
            "vpnlb_vip_packets_total{vip=\"wg\"} 7",
            "vpnlb_vip_bytes_total{vip=\"wg\"} 700",
            "vpnlb_backend_packets_total{backend=\"gw2\"} 5",
            "vpnlb_sessions 1",
            "vpnlb_backend_state{backend=\"gw2\",state=\"draining\"} 1",
            "vpnlb_backend_state{backend=\"gw2\",state=\"up\"} 0",
            "vpnlb_active_pool{vip=\"wg\",class=\"\",pool=\"primary\"} 1",
            "vpnlb_hooks_total{result=\"failed\"} 1",
            "vpnlb_map_write_seconds_count 1",
            "vpnlb_check_up{backend=\"gw2\",check=\"icmp\"} 1",
            "vpnlb_check_phase_latency_seconds{backend=\"gw2\",check=\"icmp\",phase=\"inside\"} 0.0015",
            "vpnlb_pool_failover{vip=\"wg\",class=\"\"} 0",
            "vpnlb_build_info{version=\"",
            "vpnlb_agent_start_time_seconds ",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}
