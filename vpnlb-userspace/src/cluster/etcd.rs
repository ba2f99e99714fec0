//! The member's etcd session (I/O): connects (plain or TLS), holds the member's lease, reads the
//! cluster's keys once and then watches them, and reports what it sees as [`Update`]s; it carries
//! out [`Command`]s (publish this member's state under its lease, set or clear an admin override).
//! When etcd is lost it says so and reconnects with a growing pause; the first read after a
//! reconnection is a whole [`Snapshot`], so nothing missed meanwhile stays stale.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, DeleteOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Keys, MemberState, Service};
use crate::config::{ClusterConfig, IdMap};

/// Why the session could not be set up (the key files; etcd itself being away is an [`Update`]).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("reading {what} {path}")]
    File {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("{key}: {reason}")]
    BadValue { key: String, reason: String },
    #[error("the service changed since it was read (revision {read}); read it again and retry")]
    Conflict { read: i64 },
}

/// Everything of the cluster at one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub revision: i64,
    pub service: Option<Service>,
    /// backend -> "drain" | "disable"
    pub admin: BTreeMap<String, String>,
    pub members: BTreeMap<String, MemberState>,
    /// Keys whose value could not be read (counted and logged by the agent, never applied).
    pub bad: Vec<(String, String)>,
}

/// What the session reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Update {
    /// Connected (again): the whole state.
    Snapshot(Snapshot),
    Service(Service),
    Admin {
        backend: String,
        value: Option<String>,
    },
    Member {
        name: String,
        state: Option<MemberState>,
    },
    /// A key whose value could not be read.
    Bad {
        key: String,
        reason: String,
    },
    /// etcd is unreachable (or the lease was lost); reconnecting.
    Lost {
        error: String,
    },
}

/// What the session does for the agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    /// Put this member's state under its lease (again after every reconnection).
    Publish(MemberState),
    /// Set (`Some`) or clear (`None`) a backend's admin override, cluster-wide.
    SetAdmin {
        backend: String,
        value: Option<String>,
    },
}

fn read(what: &'static str, path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Connection options from `[cluster]`: timeouts, and TLS when the endpoints are https.
pub fn options(c: &ClusterConfig) -> Result<ConnectOptions, EtcdError> {
    let timeout = Duration::from_millis(c.etcd_timeout_ms);
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout)
        .with_keep_alive(Duration::from_secs(2), timeout);
    if let Some(ca) = &c.etcd_ca_file {
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA", ca)?));
        if let (Some(cert), Some(key)) = (&c.etcd_cert_file, &c.etcd_key_file) {
            tls = tls.identity(Identity::from_pem(
                read("client certificate", cert)?,
                read("client key", key)?,
            ));
        }
        opts = opts.with_tls(tls);
    }
    Ok(opts)
}

/// Connects to the first endpoint that answers, trying them in order from `first` (a member
/// that is down refuses at once; one that hangs costs the timeout), and proves the connection
/// with one request. One endpoint per client: a client given all of them may route its first
/// request to a dead member and fail.
pub async fn connect_from(c: &ClusterConfig, first: usize) -> Result<(Client, usize), EtcdError> {
    let timeout = Duration::from_millis(c.etcd_timeout_ms);
    let n = c.etcd_endpoints.len().max(1);
    let mut last = EtcdError::Timeout(timeout);
    for k in 0..n {
        let i = (first + k) % n;
        let Some(ep) = c.etcd_endpoints.get(i) else {
            break;
        };
        let fut = async {
            let mut client = Client::connect([ep.as_str()], Some(options(c)?)).await?;
            client.status().await?;
            Ok::<_, EtcdError>(client)
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(client)) => return Ok((client, i)),
            Ok(Err(e)) => last = e,
            Err(_) => last = EtcdError::Timeout(timeout),
        }
    }
    Err(last)
}

/// [`connect_from`] the first endpoint.
pub async fn connect(c: &ClusterConfig) -> Result<Client, EtcdError> {
    connect_from(c, 0).await.map(|(client, _)| client)
}

fn utf8(key: &str, v: &[u8]) -> Result<String, String> {
    String::from_utf8(v.to_vec()).map_err(|_| format!("{key}: value is not UTF-8"))
}

/// Reads the whole cluster at one revision.
pub async fn snapshot(client: &mut Client, keys: &Keys) -> Result<Snapshot, EtcdError> {
    let r = client
        .get(keys.all(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut s = Snapshot {
        revision: r.header().map_or(0, |h| h.revision()),
        ..Default::default()
    };
    let mut service = None;
    let mut ids = None;
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match classify(keys, &key, Some(kv.value()), kv.mod_revision()) {
            Ok(Some(Update::Service(svc))) => service = Some(svc),
            Ok(Some(Update::Admin { backend, value })) => {
                if let Some(v) = value {
                    s.admin.insert(backend, v);
                }
            }
            Ok(Some(Update::Member {
                name,
                state: Some(m),
            })) => {
                s.members.insert(name, m);
            }
            Ok(_) => {}
            Err(reason) => s.bad.push((key.clone(), reason)),
        }
        if key == keys.ids() {
            match serde_json::from_slice::<IdMap>(kv.value()) {
                Ok(i) => ids = Some(i),
                Err(e) => s.bad.push((key, format!("not an id assignment: {e}"))),
            }
        }
    }
    s.service = service.map(|svc: Service| Service { ids, ..svc });
    Ok(s)
}

/// One key's value as an update. `value` None: the key was deleted. Ok(None): a key the agent
/// does not follow (the ids travel with the service).
fn classify(
    keys: &Keys,
    key: &str,
    value: Option<&[u8]>,
    revision: i64,
) -> Result<Option<Update>, String> {
    if key == keys.service() {
        let Some(v) = value else {
            return Err("the service was deleted; members keep the last one".into());
        };
        return Ok(Some(Update::Service(Service {
            revision,
            text: utf8(key, v)?,
            ids: None,
        })));
    }
    if let Some(backend) = key.strip_prefix(&keys.admin_dir()) {
        let value = match value {
            None => None,
            Some(v) => {
                let s = utf8(key, v)?;
                if s != "drain" && s != "disable" {
                    return Err(format!("{s:?} is not an admin state (drain or disable)"));
                }
                Some(s)
            }
        };
        return Ok(Some(Update::Admin {
            backend: backend.to_string(),
            value,
        }));
    }
    if let Some(name) = key.strip_prefix(&keys.members_dir()) {
        let state = match value {
            None => None,
            Some(v) => Some(
                serde_json::from_slice::<MemberState>(v)
                    .map_err(|e| format!("not a member state: {e}"))?,
            ),
        };
        return Ok(Some(Update::Member {
            name: name.to_string(),
            state,
        }));
    }
    Ok(None)
}

/// Runs the session until `commands` closes: reports on `updates`.
pub async fn run(
    cfg: ClusterConfig,
    mut commands: mpsc::Receiver<Command>,
    updates: mpsc::Sender<Update>,
) {
    let keys = Keys::new(&cfg.prefix());
    let member = cfg.member_name();
    let mut published: Option<MemberState> = None;
    let mut pause = Duration::from_millis(100);
    let mut endpoint = 0;
    loop {
        let r = session(
            &cfg,
            &keys,
            &member,
            &mut commands,
            &updates,
            &mut published,
            &mut endpoint,
        )
        .await;
        let error = match r {
            Ok(()) => return,
            // A session that had been up for a while ends: the next endpoint is tried at once
            // (losing one etcd member is not losing etcd); only if that fails is etcd lost.
            Err((_, Some(up))) if up >= Duration::from_secs(1) => {
                endpoint += 1;
                continue;
            }
            Err((e, _)) => e.to_string(),
        };
        endpoint += 1;
        if updates.send(Update::Lost { error }).await.is_err() {
            return;
        }
        // Commands that arrive while away: keep the latest state to publish; admin changes are
        // refused by the agent while etcd is lost, so none are queued here.
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                c = commands.recv() => match c {
                    Some(Command::Publish(m)) => published = Some(m),
                    Some(Command::SetAdmin { .. }) => {}
                    None => return,
                },
            }
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

/// Runs [`session_inner`]; the error says for how long the session had been up (snapshot sent).
async fn session(
    cfg: &ClusterConfig,
    keys: &Keys,
    member: &str,
    commands: &mut mpsc::Receiver<Command>,
    updates: &mpsc::Sender<Update>,
    published: &mut Option<MemberState>,
    endpoint: &mut usize,
) -> Result<(), (EtcdError, Option<Duration>)> {
    let mut up = None;
    session_inner(
        cfg, keys, member, commands, updates, published, endpoint, &mut up,
    )
    .await
    .map_err(|e| (e, up.map(|t: tokio::time::Instant| t.elapsed())))
}

/// One connection: lease, snapshot, watch, until an error.
#[allow(clippy::too_many_arguments)]
async fn session_inner(
    cfg: &ClusterConfig,
    keys: &Keys,
    member: &str,
    commands: &mut mpsc::Receiver<Command>,
    updates: &mpsc::Sender<Update>,
    published: &mut Option<MemberState>,
    endpoint: &mut usize,
    up: &mut Option<tokio::time::Instant>,
) -> Result<(), EtcdError> {
    let (mut client, i) = connect_from(cfg, *endpoint).await?;
    *endpoint = i;
    let lease = client.lease_grant(cfg.lease_ttl_s as i64, None).await?;
    let lease_id = lease.id();
    let (mut keeper, mut acks) = client.lease_keep_alive(lease_id).await?;
    let publish = |client: &mut Client, m: &MemberState| {
        let mut c = client.clone();
        let key = keys.member(member);
        let value = serde_json::to_vec(m).expect("member state serialises");
        async move {
            c.put(key, value, Some(PutOptions::new().with_lease(lease_id)))
                .await
                .map(|_| ())
        }
    };
    if let Some(m) = published.as_ref() {
        publish(&mut client, m).await?;
    }
    let snap = snapshot(&mut client, keys).await?;
    let start = snap.revision + 1;
    if updates.send(Update::Snapshot(snap)).await.is_err() {
        return Ok(());
    }
    *up = Some(tokio::time::Instant::now());
    let mut watch = client
        .watch(
            keys.all(),
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await?;
    let mut tick =
        tokio::time::interval(Duration::from_millis((cfg.lease_ttl_s * 1000 / 3).max(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await?;
            }
            ack = acks.message() => {
                match ack? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => {
                        return Err(EtcdError::BadValue {
                            key: keys.member(member),
                            reason: "the member's lease expired".into(),
                        });
                    }
                }
            }
            msg = watch.message() => {
                let Some(w) = msg? else {
                    return Err(EtcdError::BadValue { key: keys.all(), reason: "the watch ended".into() });
                };
                if w.canceled() {
                    return Err(EtcdError::BadValue {
                        key: keys.all(),
                        reason: format!("the watch was cancelled: {}", w.cancel_reason()),
                    });
                }
                for ev in w.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let value = (ev.event_type() == EventType::Put).then(|| kv.value());
                    let u = if key == keys.ids() {
                        // The ids come with the service: read both at the service's revision.
                        None
                    } else {
                        match classify(keys, &key, value, kv.mod_revision()) {
                            Ok(Some(Update::Service(svc))) => {
                                let ids = client.get(keys.ids(), None).await?;
                                let ids = ids.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok());
                                Some(Update::Service(Service { ids, ..svc }))
                            }
                            Ok(u) => u,
                            Err(reason) => Some(Update::Bad { key, reason }),
                        }
                    };
                    if let Some(u) = u && updates.send(u).await.is_err() {
                        return Ok(());
                    }
                }
            }
            c = commands.recv() => {
                match c {
                    None => {
                        let _ = client.lease_revoke(lease_id).await;
                        return Ok(());
                    }
                    Some(Command::Publish(m)) => {
                        publish(&mut client, &m).await?;
                        *published = Some(m);
                    }
                    Some(Command::SetAdmin { backend, value }) => {
                        let key = keys.admin(&backend);
                        match value {
                            Some(v) => { client.put(key, v, None).await?; }
                            None => { client.delete(key, None).await?; }
                        }
                    }
                }
            }
        }
    }
}

/// Writes a service and its ids in one transaction, only if the service key is still at
/// `expected` (its mod revision when read; 0: absent). Returns the new revision.
pub async fn push_service(
    client: &mut Client,
    keys: &Keys,
    text: &str,
    ids: &IdMap,
    expected: i64,
) -> Result<i64, EtcdError> {
    use etcd_client::{Compare, CompareOp};
    let ids = serde_json::to_vec(ids).expect("ids serialise");
    let txn = Txn::new()
        .when(vec![Compare::mod_revision(
            keys.service(),
            CompareOp::Equal,
            expected,
        )])
        .and_then(vec![
            TxnOp::put(keys.service(), text, None),
            TxnOp::put(keys.ids(), ids, None),
        ]);
    let r = client.txn(txn).await?;
    if !r.succeeded() {
        return Err(EtcdError::Conflict { read: expected });
    }
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// Deletes everything under the cluster's prefix (tests).
pub async fn wipe(client: &mut Client, keys: &Keys) -> Result<(), EtcdError> {
    client
        .delete(keys.all(), Some(DeleteOptions::new().with_prefix()))
        .await?;
    Ok(())
}
