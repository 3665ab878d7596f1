//! The control plane: configuration, the Admin API, the group-commit writer, change-log purge,
//! and the serve loop with graceful shutdown.

pub mod admin;
pub mod answers;
pub mod compat;
pub mod config;
pub mod config_cmd;
pub mod fleet;
pub mod listener;
pub mod metrics;
pub mod recent;
pub mod status;
pub mod store;
pub mod v1;
pub mod v2;
pub mod writer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cp::store::{Store, StoreOptions};

pub use config::CpConfig;

/// A running control plane. Dropping it does not stop it; call [`RunningCp::shutdown`].
pub struct RunningCp {
    pub admin_addr: SocketAddr,
    pub cluster_addr: SocketAddr,
    pub store: Store,
    pub node_id: String,
    /// The data planes connected to this control plane, and the shared status table.
    pub fleet: Arc<fleet::Fleet>,
    /// Sync v1's shared payloads.
    pub v1: Arc<v1::V1Hub>,
    /// The cluster certificate and key files (generated in the data dir when not configured).
    pub cluster_cert_files: Option<(PathBuf, PathBuf)>,
    /// Other control planes on this database presenting a different cluster certificate in
    /// shared mode (data planes cannot fail over between them), found at start.
    pub cluster_cert_conflicts: Vec<String>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _rpc: jsonrpsee::server::ServerHandle,
    /// Held while this control plane runs on an embedded SQLite database, so that
    /// `deltaplane-cp config import` never writes that database behind its back.
    _data_dir_lock: Option<config_cmd::DataDirLock>,
}

impl RunningCp {
    /// Stops accepting requests, lets in-flight ones finish, and closes the database.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.store.close().await;
    }
}

pub fn store_options(cfg: &CpConfig) -> StoreOptions {
    let mut opts = match &cfg.database_url {
        Some(url) => StoreOptions::new(url.clone()),
        None => StoreOptions::sqlite_in(&cfg.data_dir),
    };
    opts.sqlite_synchronous_full = cfg.sqlite_synchronous_full;
    opts.acquire_timeout = cfg.database_timeout;
    opts
}

/// Starts a control plane: opens (and migrates) the store, binds the Admin API, spawns the
/// writer and the purge task.
pub async fn start(cfg: CpConfig) -> anyhow::Result<RunningCp> {
    cfg.check_admin_exposure()?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data dir {}", cfg.data_dir.display()))?;
    let data_dir_lock = if cfg.database_url.is_none() {
        match config_cmd::DataDirLock::try_acquire(&cfg.data_dir) {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => {
                tracing::warn!(
                    data_dir = %cfg.data_dir.display(),
                    "another control plane holds this data directory's lock"
                );
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not lock the data directory");
                None
            }
        }
    } else {
        None
    };
    let store = Store::open(store_options(&cfg))
        .await
        .map_err(|e| anyhow::anyhow!("opening the database: {e}"))?;
    let node_id = crate::node::persistent_node_id(&cfg.data_dir)?;
    let invalid = store
        .revalidate(crate::schema::Registry::builtin_fingerprint())
        .await
        .map_err(|e| anyhow::anyhow!("validating stored entities against the schemas: {e}"))?;
    for i in &invalid {
        tracing::warn!(
            entity = %i.entity_type,
            id = %i.id,
            name = ?i.name,
            disabled = i.disabled,
            errors = %serde_json::Value::Object(i.errors.0.clone()),
            "a stored entity does not validate under this release's schemas; fix or delete it \
             (a disabled one is served to data planes as stored)"
        );
    }
    match store.release_data_planes(&node_id).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            data_planes = n,
            "marked the data planes of this node's previous run disconnected"
        ),
        Err(e) => tracing::warn!(error = %e, "could not mark old connections disconnected"),
    }
    let hostname = crate::node::hostname();
    let writer = writer::Writer::spawn(store.clone(), cfg.max_batch);
    let state = Arc::new(admin::AdminState {
        store: store.clone(),
        writer,
        node: admin::NodeInfo {
            node_id: node_id.clone(),
            hostname,
            kong_compat_version: cfg.kong_compat_version.clone(),
        },
        admin_token: cfg.admin_token.clone(),
        body_limit: cfg.body_limit,
        config_body_limit: cfg.config_body_limit,
        requests: AtomicU64::new(0),
        enabled_plugins: Arc::new(cfg.enabled_plugins(store.registry())?),
        invalid_in_store: Arc::new(invalid),
    });
    let (tls, cluster_cert_files) = cluster_tls(&cfg)?;
    let cluster_cert_conflicts = check_cluster_cert(&store, &node_id, &tls).await;
    let cluster = listener::ClusterCtx::new(
        store.clone(),
        node_id.clone(),
        cfg.kong_compat_version.clone(),
        cfg.cluster.clone(),
    );
    let (rpc_router, rpc_handle) = crate::net::operator::router(rpc_module(cluster.clone())?);
    let app = admin::router(
        state,
        rpc_router
            .merge(admin::clustering::router(
                store.clone(),
                cluster.fleet.clone(),
                cfg.data_plane_purge_delay,
            ))
            .merge(metrics::router(cluster.clone())),
    );
    let cluster_listener = tokio::net::TcpListener::bind(cfg.cluster_listen)
        .await
        .with_context(|| format!("binding the cluster listener on {}", cfg.cluster_listen))?;
    let cluster_addr = cluster_listener.local_addr()?;
    let listener = tokio::net::TcpListener::bind(cfg.admin_listen)
        .await
        .with_context(|| format!("binding the Admin API on {}", cfg.admin_listen))?;
    let admin_addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let mut rx = shutdown_rx.clone();
    let admin_task = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin API server failed");
        }
    });
    let purge_task = tokio::spawn(purge_loop(store.clone(), cfg.clone(), shutdown_rx.clone()));
    let cluster_task = tokio::spawn(listener::serve(
        cluster_listener,
        tls,
        cluster.clone(),
        shutdown_rx.clone(),
    ));
    let follow_store = store.clone();
    let follow_stop = shutdown_rx.clone();
    let follow_task = tokio::spawn(async move {
        follow_store
            .follow_other_writers(Duration::from_secs(5), follow_stop)
            .await
    });
    tracing::info!(%admin_addr, %cluster_addr, backend = ?store.backend(), %node_id, "control plane started");
    Ok(RunningCp {
        admin_addr,
        cluster_addr,
        store,
        node_id,
        fleet: cluster.fleet.clone(),
        v1: cluster.v1.clone(),
        cluster_cert_files,
        cluster_cert_conflicts,
        shutdown_tx,
        tasks: vec![admin_task, purge_task, cluster_task, follow_task],
        _rpc: rpc_handle,
        _data_dir_lock: data_dir_lock,
    })
}

/// The cluster TLS material: configured, or the dev certificate in the data dir (generated on
/// first start).
fn cluster_tls(
    cfg: &CpConfig,
) -> anyhow::Result<(crate::net::tls::ClusterTls, Option<(PathBuf, PathBuf)>)> {
    let (cert, key, files) = match &cfg.cluster_cert {
        Some((c, k)) => (c.clone(), k.clone(), None),
        None => {
            let (crt, key, created) = crate::net::tls::ensure_dev_cert(&cfg.data_dir)?;
            if created {
                tracing::info!(cert = %crt.display(), key = %key.display(), "generated a shared-mode cluster certificate; give data planes the same pair");
            }
            (
                crt.display().to_string(),
                key.display().to_string(),
                Some((crt, key)),
            )
        }
    };
    let tls = crate::net::tls::ClusterTls::load(&crate::net::tls::TlsSettings {
        mode: cfg.cluster_mtls,
        cert,
        key,
        ca_cert: cfg.cluster_ca_cert.clone(),
        server_name: None,
        allowed_common_names: cfg.cluster_allowed_common_names.clone(),
    })
    .context("loading the cluster certificate")?;
    Ok((tls, files))
}

/// Records this control plane's cluster certificate in the database and warns when another
/// control plane on it presents a different one in shared mode, where a data plane pins one
/// certificate and so cannot fail over between the two. Returns those control planes.
async fn check_cluster_cert(
    store: &Store,
    node_id: &str,
    tls: &crate::net::tls::ClusterTls,
) -> Vec<String> {
    use crate::net::tls::MtlsMode;
    // Control planes that ran within the last week count.
    const RECENT: i64 = 7 * 86400;
    let mode = tls.mode();
    let digest = &tls.identity().fingerprint_sha256;
    let now = crate::node::now_secs();
    match store
        .record_cluster_cert(node_id, mode.as_str(), digest, now, RECENT)
        .await
    {
        Ok(others) if mode == MtlsMode::Shared && !others.is_empty() => {
            tracing::warn!(
                control_planes = ?others,
                "other control planes on this database present a different cluster certificate \
                 (shared mode): data planes can fail over only between control planes with the \
                 same cluster.crt and cluster.key; give every control plane the same pair"
            );
            others
        }
        Ok(_) => Vec::new(),
        Err(e) => {
            tracing::warn!(error = %e, "could not record the cluster certificate");
            Vec::new()
        }
    }
}

/// The control plane's operator JSON-RPC methods.
fn rpc_module(
    cluster: Arc<listener::ClusterCtx>,
) -> anyhow::Result<jsonrpsee::RpcModule<listener::ClusterCtx>> {
    use crate::net::operator::server_error;
    let mut module = jsonrpsee::RpcModule::from_arc(cluster);
    module.register_async_method("deltaplane.sync_version", |params, ctx, _| async move {
        let at = params
            .parse::<Vec<serde_json::Value>>()
            .ok()
            .and_then(|v| v.into_iter().next())
            .or_else(|| params.parse::<serde_json::Value>().ok())
            .and_then(|v| v.get("at").and_then(serde_json::Value::as_i64));
        let info = ctx.store.version_info().await.map_err(server_error)?;
        let mut out = status::sync_version_json(&info);
        if let Some(at) = at {
            let hash = ctx.store.state_hash_at(at).await.map_err(server_error)?;
            let Some(hash) = hash else {
                return Err(server_error(format!(
                    "version {at} is not retained (oldest is {}, head is {})",
                    info.oldest_version, info.version
                )));
            };
            out["at"] = at.into();
            out["state_hash_at"] = hash.to_hex().into();
        }
        Ok::<_, crate::net::operator::ErrorObjectOwned>(out)
    })?;
    module.register_async_method("deltaplane.data_planes", |_params, ctx, _| async move {
        ctx.fleet.data_planes().await.map_err(server_error)
    })?;
    crate::net::operator::register_watch(
        &mut module,
        |ctx: &listener::ClusterCtx| ctx.store.subscribe(),
        |ctx: Arc<listener::ClusterCtx>, v| async move {
            let hash = ctx.store.state_hash_at(v).await.ok().flatten()?;
            Some(serde_json::json!({
                "version": v,
                "version_string": crate::proto::version_string(v),
                "state_hash": hash.to_hex(),
            }))
        },
    )?;
    Ok(module)
}

/// Purges old change-log versions in small batches, so writers are never blocked for long.
async fn purge_loop(store: Store, cfg: CpConfig, mut shutdown: watch::Receiver<bool>) {
    let age = cfg.changelog_retention_age.as_secs() as i64;
    loop {
        loop {
            match store
                .purge_once(age, cfg.changelog_retention_versions, 1000)
                .await
            {
                Ok(0) => break,
                Ok(n) => tracing::debug!(purged = n, "purged change-log versions"),
                Err(e) => {
                    tracing::warn!(error = %e, "change-log purge failed");
                    break;
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
        let before = crate::node::now_secs() - cfg.data_plane_purge_delay.as_secs() as i64;
        match store.purge_data_planes(before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                purged = n,
                "forgot data planes not seen within the purge delay"
            ),
            Err(e) => tracing::warn!(error = %e, "data-plane purge failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.purge_interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// The default data directory of `deltaplane-cp`.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from("./deltaplane-cp")
}
