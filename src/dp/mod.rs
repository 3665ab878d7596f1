//! The data plane: its redb store, the sync client, and the status listener.
//!
//! [`start`] opens the store (serving the stored configuration at once, CP or not), binds the
//! status listener, and spawns the sync client that follows the control plane(s), or, with
//! `--declarative-config`, applies a file instead and re-reads it on SIGHUP ([`file`]).

pub mod config;
pub mod file;
pub mod link;
pub mod metrics;
pub mod proxy;
pub mod status;
pub mod store;
pub mod v1;
pub mod v2;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{DpConfig, SyncMode};
use store::{DpStore, DpStoreOptions};

/// The link to the control plane, as the status listener shows it.
#[derive(Debug, Clone, Default)]
pub struct LinkStatus {
    /// `host:port` of the control plane currently connected, if any.
    pub connected_to: Option<String>,
    /// The latest version the control plane announced (notify or get_delta answer).
    pub cp_version_seen: i64,
    pub last_error: Option<String>,
    /// Unix seconds of the last successful sync exchange.
    pub last_sync_at: Option<i64>,
    /// The control plane's change-log epoch, from its hello.
    pub cp_epoch: Option<String>,
    /// Applies since start, by kind.
    pub full_syncs: u64,
    pub incremental_syncs: u64,
    /// Applies that arrived as paged transfers (larger than one frame).
    pub paged_transfers: u64,
    /// The protocol of the current (or last) session: `v2` or `v1`; `None` before any.
    pub protocol: Option<crate::proto::SyncProtocol>,
    /// Sync v1: pushes received whose hash equalled the stored one (nothing applied).
    pub v1_skipped: u64,
    /// Sessions since start that completed the hello (v2) or sent `basic_info` (v1).
    pub connects: u64,
    /// `get_delta` requests since start (answers awaited, not status reports).
    pub sync_requests: u64,
    /// Versions the control plane pushed (`deltaplane.push.v1`) that were applied, and
    /// pushes that could not be (a gap, another epoch) and were fetched instead.
    pub pushes_applied: u64,
    pub pushes_refused: u64,
}

/// State shared by the sync client and the status listener.
pub struct DpShared {
    pub store: DpStore,
    pub node_id: String,
    pub hostname: String,
    /// `/metrics`: durations observed by the sessions, transport counters.
    pub metrics: metrics::DpMetrics,
    link: Mutex<LinkStatus>,
    applied: watch::Sender<i64>,
    /// The proxy, when this data plane runs one.
    proxy: std::sync::OnceLock<Arc<proxy::ProxyHandle>>,
    /// The declarative file, when this data plane runs from one instead of a control plane.
    file: std::sync::OnceLock<Arc<file::FileMode>>,
}

impl DpShared {
    pub fn new(
        store: DpStore,
        node_id: String,
        hostname: String,
        metrics: metrics::DpMetrics,
    ) -> DpShared {
        let (applied, _) = watch::channel(store.state().version);
        DpShared {
            store,
            node_id,
            hostname,
            metrics,
            link: Mutex::new(LinkStatus::default()),
            applied,
            proxy: std::sync::OnceLock::new(),
            file: std::sync::OnceLock::new(),
        }
    }

    /// The declarative file, when this data plane runs from one (no control plane).
    pub fn file(&self) -> Option<&Arc<file::FileMode>> {
        self.file.get()
    }

    /// Puts this data plane in file mode; once, before it serves.
    pub fn set_file(&self, mode: file::FileMode) {
        let _ = self.file.set(Arc::new(mode));
    }

    /// The proxy, when this data plane runs one.
    pub fn proxy(&self) -> Option<&Arc<proxy::ProxyHandle>> {
        self.proxy.get()
    }

    pub fn link(&self) -> LinkStatus {
        self.link.lock().expect("link lock").clone()
    }

    pub fn update_link(&self, f: impl FnOnce(&mut LinkStatus)) {
        f(&mut self.link.lock().expect("link lock"));
    }

    /// Versions durably applied, for `deltaplane.watch_version`.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.applied.subscribe()
    }

    pub(crate) fn applied(&self, version: i64) {
        self.metrics.applied(version);
        self.applied.send_replace(version);
    }

    /// `deltaplane.sync_version` on the data plane. `source` is `control_plane`, or `file`
    /// for a data plane running from a declarative file, whose `protocol` is `file` too and
    /// which is `in_sync` when it holds a configuration from the file and its last load
    /// succeeded.
    pub fn sync_version(&self) -> Value {
        let s = self.store.state();
        let link = self.link();
        let connected = link.connected_to.is_some();
        let (source, protocol, in_sync, last_error) = match self.file() {
            Some(f) => {
                let st = f.status();
                let from_file = s.epoch.as_deref() == Some(file::FILE_EPOCH);
                (
                    "file",
                    "file",
                    from_file && s.version > 0 && st.last_error.is_none(),
                    st.last_error,
                )
            }
            None => (
                "control_plane",
                link.protocol
                    .unwrap_or(crate::proto::SyncProtocol::V2)
                    .as_str(),
                connected && s.version > 0 && s.version == link.cp_version_seen,
                link.last_error,
            ),
        };
        serde_json::json!({
            "version": s.version,
            "version_string": crate::proto::version_string(s.version),
            "epoch": s.epoch,
            "state_hash": s.state_hash.to_hex(),
            "source": source,
            "cp_version_seen": link.cp_version_seen,
            "connected": connected,
            "in_sync": in_sync,
            "protocol": protocol,
            "last_error": last_error,
            "proxy_serving_version": self.proxy().map(|p| p.status().serving_version),
            "proxy_refused": self.proxy().and_then(|p| p.status().refused),
        })
    }

    /// `GET /status`.
    pub fn status_json(&self) -> Value {
        let s = self.store.state();
        let link = self.link();
        let mut v = self.sync_version();
        let m = v.as_object_mut().expect("an object");
        m.insert("role".into(), "data_plane".into());
        m.insert("node_id".into(), self.node_id.clone().into());
        m.insert("hostname".into(), self.hostname.clone().into());
        m.insert("entities".into(), s.n_entities.into());
        m.insert("control_plane".into(), link.connected_to.into());
        m.insert("last_sync_at".into(), link.last_sync_at.into());
        m.insert("full_syncs".into(), link.full_syncs.into());
        m.insert("incremental_syncs".into(), link.incremental_syncs.into());
        m.insert("paged_transfers".into(), link.paged_transfers.into());
        m.insert("v1_skipped".into(), link.v1_skipped.into());
        m.insert("connects".into(), link.connects.into());
        m.insert("sync_requests".into(), link.sync_requests.into());
        m.insert(
            "declarative".into(),
            self.file().map_or(Value::Null, |f| f.status_json()),
        );
        m.insert(
            "proxy".into(),
            match self.proxy() {
                None => Value::Null,
                Some(p) => {
                    let st = p.status();
                    serde_json::json!({
                        "listen": st.listen.map(|a| a.to_string()),
                        "listen_tls": st.listen_tls.map(|a| a.to_string()),
                        "serving_version": st.serving_version,
                        "stored_version": s.version,
                        "routes": st.n_routes,
                        "refused": st.refused,
                        "problems": st.problems.iter().map(|p| serde_json::json!({
                            "entity_type": p.entity_type,
                            "id": p.id,
                            "message": p.message,
                        })).collect::<Vec<_>>(),
                        "builds": st.builds,
                        "full_builds": st.full_builds,
                    })
                }
            },
        );
        v
    }
}

/// A running data plane. Call [`RunningDp::shutdown`] to stop it.
pub struct RunningDp {
    pub status_addr: SocketAddr,
    /// The proxy's listeners, when on.
    pub proxy_addr: Option<SocketAddr>,
    pub proxy_tls_addr: Option<SocketAddr>,
    pub shared: Arc<DpShared>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _rpc: jsonrpsee::server::ServerHandle,
}

impl RunningDp {
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Opens the store, binds the status listener, and starts following the control plane, or,
/// with `declarative_config`, applies the file (failing when it cannot be applied) and
/// re-reads it on SIGHUP (`dp::file`).
pub async fn start(cfg: DpConfig) -> anyhow::Result<RunningDp> {
    cfg.check_file_mode()?;
    // The certificate first: a data plane that cannot load it leaves nothing behind. A data
    // plane running from a file has no control plane and needs none.
    let tls = match cfg.file_mode() {
        true => None,
        false => Some(link::tls_for(&cfg)?),
    };
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let node_id = crate::node::persistent_node_id(&cfg.data_dir)?;
    let hostname = crate::node::hostname();
    let store = open_store(&cfg.data_dir, cfg.durable)?;
    let state = store.state();
    tracing::info!(
        version = state.version,
        entities = state.n_entities,
        %node_id,
        "data plane store opened"
    );
    let metrics = metrics::DpMetrics::new(
        cfg.kong_compat_version.clone(),
        tls.as_ref().map_or(0, |t| t.identity().not_after),
    );
    let shared = Arc::new(DpShared::new(store, node_id, hostname, metrics));
    if let Some(path) = &cfg.declarative_config {
        shared.set_file(file::FileMode::new(
            path.clone(),
            cfg.config_token.clone(),
            cfg.config_max_body,
        ));
    }
    let (app, rpc_handle) = status::router(shared.clone())?;
    let listener = tokio::net::TcpListener::bind(cfg.status_listen)
        .await
        .with_context(|| format!("binding the status listener on {}", cfg.status_listen))?;
    let status_addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut rx = shutdown_rx.clone();
    let status_task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "status listener failed");
        }
    });
    let mut tasks = vec![status_task];
    if cfg.proxies() {
        // The proxy executes only these: a version enabling another is rejected.
        let registry = crate::schema::Registry::builtin();
        shared
            .store
            .only_plugins(cfg.announced_plugins(registry).into_iter().map(|(n, _)| n));
    }
    let (proxy_addr, proxy_tls_addr) = if cfg.proxies() {
        start_proxy(&cfg, &shared, &shutdown_rx, &mut tasks).await?
    } else {
        (None, None)
    };
    match (tls, &cfg.declarative_config) {
        (_, Some(path)) => {
            // Installed before the first load, so a SIGHUP sent once we answer is not lost.
            let hangup = match cfg.reload_on_sighup {
                true => Some(
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .context("installing the SIGHUP handler")?,
                ),
                false => None,
            };
            // The stored configuration is served meanwhile; a file that cannot be applied
            // stops the data plane, as Kong refuses to start on an invalid one.
            let s = shared.clone();
            let first =
                tokio::task::spawn_blocking(move || file::load_file(&s, file::When::Startup))
                    .await
                    .context("loading the declarative configuration")?;
            if let Err(e) = first {
                let _ = shutdown_tx.send(true);
                for t in tasks {
                    let _ = t.await;
                }
                anyhow::bail!(
                    "the declarative configuration {} cannot be applied: {e}",
                    path.display()
                );
            }
            tasks.push(tokio::spawn(file::run(shared.clone(), hangup, shutdown_rx)));
        }
        (Some(tls), None) => tasks.push(
            on_own_thread(
                "deltaplane-link",
                link::run(cfg, tls, shared.clone(), shutdown_rx),
            )
            .context("starting the sync link's thread")?,
        ),
        (None, None) => unreachable!("the certificate is loaded without a file"),
    }
    Ok(RunningDp {
        status_addr,
        proxy_addr,
        proxy_tls_addr,
        shared,
        shutdown_tx,
        tasks,
        _rpc: rpc_handle,
    })
}

/// Runs `task` on a thread of its own, on a single-threaded runtime: the sync link, so that
/// applying a pushed version there (a durable commit, a fraction of a millisecond, see
/// `v2::apply_in_place`) holds up only the link, never the proxy's or the status listener's
/// tasks, and the link's own tasks (its connection's reader, the session, the reports) wake
/// each other on one thread. The returned handle ends with the task; dropping or aborting it
/// (the caller's runtime shutting down, say) ends the task too.
fn on_own_thread(
    name: &str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name(name)
        .build()?;
    let (gone_tx, gone_rx) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    () = task => {}
                    // The handle was dropped: nobody waits for this task any more.
                    _ = gone_rx => {}
                }
            });
            // Tasks the link spawned end with its runtime, here.
            drop(rt);
            let _ = done_tx.send(());
        })?;
    Ok(tokio::spawn(async move {
        let _keep = gone_tx;
        let _ = done_rx.await;
    }))
}

/// Binds the proxy's listeners and starts following the store into it.
async fn start_proxy(
    cfg: &DpConfig,
    shared: &Arc<DpShared>,
    shutdown: &watch::Receiver<bool>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<(Option<SocketAddr>, Option<SocketAddr>)> {
    let exporter = proxy::plugins::Exporter::new();
    let empty = proxy::gateway::Gateway::empty(&exporter);
    let p = proxy::server::Proxy::new(empty, cfg.trusted_ips.clone());
    let handle = proxy::ProxyHandle::new(p.clone(), exporter);
    let plain = match cfg.proxy_listen {
        None => None,
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding the proxy listener on {addr} (--proxy-listen; `off` disables it)")
        })?),
    };
    let tls = match cfg.proxy_listen_tls {
        None => None,
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!(
                "binding the proxy TLS listener on {addr} (--proxy-listen-tls; `off` disables it)"
            )
        })?),
    };
    let plain_addr = plain.as_ref().map(|l| l.local_addr()).transpose()?;
    let tls_addr = tls.as_ref().map(|l| l.local_addr()).transpose()?;
    handle.set_listeners(plain_addr, tls_addr);
    let _ = shared.proxy.set(handle.clone());
    if let Some(l) = plain {
        tasks.push(tokio::spawn(proxy::server::serve(
            p.clone(),
            l,
            None,
            shutdown.clone(),
        )));
    }
    if let Some(l) = tls {
        let default = proxy::tls::default_certificate().map_err(anyhow::Error::msg)?;
        let current = {
            let p = p.clone();
            Arc::new(move || p.current().certificates.clone())
        };
        let resolver = proxy::tls::SniResolver::new(current, default);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        tasks.push(tokio::spawn(proxy::server::serve(
            p.clone(),
            l,
            Some(acceptor),
            shutdown.clone(),
        )));
    }
    tasks.push(tokio::spawn(proxy::follow(
        shared.store.clone(),
        handle,
        shutdown.clone(),
    )));
    tracing::info!(
        listen = ?plain_addr,
        listen_tls = ?tls_addr,
        "proxy listening"
    );
    Ok((plain_addr, tls_addr))
}

fn open_store(data_dir: &Path, durable: bool) -> anyhow::Result<DpStore> {
    let path = data_dir.join("config.redb");
    let mut opts = DpStoreOptions::recommended();
    opts.durable = durable;
    DpStore::open(&path, crate::schema::Registry::builtin().clone(), opts).map_err(|e| match e {
        store::DpStoreError::Redb(redb::Error::DatabaseAlreadyOpen) => anyhow::anyhow!(
            "the data directory {} is in use by another process (a running deltaplane-dp?): \
             give each data plane its own --data-dir",
            data_dir.display()
        ),
        e => anyhow::Error::new(e).context(format!("opening {}", path.display())),
    })
}
