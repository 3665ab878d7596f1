//! The control plane's cluster listener: TLS (mTLS) → WebSocket `/v2/outlet` with subprotocol
//! `kong.meta.v1` → `kong.meta.v1.hello` → a symmetric JSON-RPC peer per data plane.
//! `/v1/outlet` (Kong's full-config push) is handed to `cp::v1`.
//!
//! Per data plane there is one notifier task: it waits on the change-log head (a `watch`: one
//! latest-version slot and a dirty flag, so no wake-up is lost and bursts coalesce) and calls
//! `kong.sync.v2.notify_new_version` when the head is past what the data plane reported. Each
//! data plane has its own task, so a slow one never delays the others.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::answers::{Asker, Decision, Feed, FeedError};
use crate::cp::store::{DataPlaneRow, Store};
use crate::net::hello;
use crate::net::peer::{Handler, Peer, Reply};
use crate::net::tls::ClusterTls;
use crate::proto::codec::{self, Encoding};
use crate::proto::hello::{Hello, HelloResult};
use crate::proto::jsonrpc::RpcError;
use crate::proto::{
    CAP_DELTAPLANE_SYNC_V1, CAP_KONG_SYNC_V2, PLUGIN_SET_INCOMPATIBLE, PLUGIN_VERSION_INCOMPATIBLE,
    parse_version, version_string,
};
use crate::settings::ClusterSettings;

/// The subprotocol of `/v2/outlet`.
pub use crate::proto::hello::SUBPROTOCOL;

/// Methods the control plane serves.
const CP_METHODS: &[&str] = &[
    "kong.sync.v2.get_delta",
    "kong.sync.v2.notify_validation_error",
    "deltaplane.sync.v1.get_page",
];

/// What the cluster listener shares across connections.
pub struct ClusterCtx {
    pub store: Store,
    pub feed: Feed,
    pub node_id: String,
    pub kong_compat_version: String,
    pub settings: ClusterSettings,
    conns: Mutex<HashMap<u64, Arc<DpConn>>>,
    next_conn: AtomicU64,
    /// Plugins the configuration uses, at a version (computed only for DPs that announce a
    /// plugin list).
    plugins_in_use: tokio::sync::Mutex<Option<(i64, Arc<std::collections::BTreeSet<String>>)>>,
    /// Sync v1 (`/v1/outlet`): the shared per-version payload and the push loop's state.
    pub v1: super::v1::V1Hub,
}

/// One connected data plane.
pub struct DpConn {
    /// `v2` (`/v2/outlet`) or `v1` (`/v1/outlet`).
    pub protocol: &'static str,
    pub node_id: String,
    pub hostname: String,
    pub address: SocketAddr,
    pub kong_version: String,
    pub labels: Value,
    pub capabilities: Vec<String>,
    pub cert_expiry: Option<i64>,
    /// The plugins the DP can run (name → version), from `kong_conf.plugins` in its hello;
    /// `None` when it did not say (then it runs every plugin this CP knows).
    pub plugins: Option<HashMap<String, Option<String>>>,
    /// The DP follows an older Kong line: fields it does not know are removed before sending.
    pub older: bool,
    status: Mutex<DpStatus>,
    /// The version the DP last reported (its get_delta `version`).
    reported: watch::Sender<i64>,
    /// The status changed since the flusher last wrote it.
    dirty: std::sync::atomic::AtomicBool,
    /// One get_delta answer at a time per DP, from building it until it is written: a DP
    /// that pipelines requests and reads nothing holds one answer, not one per request.
    answer_slot: Arc<tokio::sync::Semaphore>,
}

#[derive(Debug, Clone, Default)]
struct DpStatus {
    version: i64,
    /// The state hash the DP reported with `version` (deltaplane DPs only).
    state_hash: Option<String>,
    last_error: Option<String>,
    /// Kong's sync_status.
    sync_status: &'static str,
    /// The hash a v1 data plane pinged (v2: the version string is the config hash).
    config_hash: Option<String>,
}

impl ClusterCtx {
    pub fn new(
        store: Store,
        node_id: String,
        kong_compat_version: String,
        settings: ClusterSettings,
    ) -> Arc<ClusterCtx> {
        let feed = Feed::new(
            store.clone(),
            super::answers::FeedLimits {
                // Leave room for the JSON-RPC envelope; JSON compresses, so an uncompressed
                // answer this size always fits a frame once encoded.
                frame_bytes: settings.max_payload.saturating_sub(1024).max(1024),
                max_decompressed: settings.max_decompressed(),
                max_versions: 10_000,
            },
        );
        Arc::new(ClusterCtx {
            store,
            feed,
            node_id,
            kong_compat_version,
            settings,
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            plugins_in_use: tokio::sync::Mutex::new(None),
            v1: super::v1::V1Hub::default(),
        })
    }

    /// Adds a connected data plane to [`ClusterCtx::connected`]; returns its key.
    pub(crate) fn register(&self, conn: Arc<DpConn>) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns.lock().expect("conns lock").insert(id, conn);
        id
    }

    /// Removes a connection and records the disconnect.
    pub(crate) async fn unregister(&self, id: u64, conn: &DpConn) {
        self.conns.lock().expect("conns lock").remove(&id);
        if let Err(e) = self
            .store
            .disconnect_data_plane(&conn.node_id, &self.node_id, crate::node::now_secs())
            .await
        {
            tracing::debug!(error = %e, "recording a disconnect failed");
        }
    }

    /// Data planes connected to this control plane right now.
    pub fn connected(&self) -> Vec<Arc<DpConn>> {
        self.conns
            .lock()
            .expect("conns lock")
            .values()
            .cloned()
            .collect()
    }

    fn row(&self, conn: &DpConn, connected: bool) -> DataPlaneRow {
        let st = conn.status.lock().expect("status lock").clone();
        DataPlaneRow {
            node_id: conn.node_id.clone(),
            hostname: conn.hostname.clone(),
            address: conn.address.ip().to_string(),
            kong_version: conn.kong_version.clone(),
            protocol: conn.protocol.into(),
            version: st.version,
            state_hash: st.state_hash.clone(),
            connected_to: connected.then(|| self.node_id.clone()),
            last_seen: crate::node::now_secs(),
            last_error: st.last_error,
            labels: conn.labels.to_string(),
            capabilities: Value::from(conn.capabilities.clone()).to_string(),
            cert_expiry: conn.cert_expiry,
            sync_status: st.sync_status.to_owned(),
            config_hash: st.config_hash.or_else(|| Some(version_string(st.version))),
            updated_at: crate::node::now_secs(),
        }
    }

    /// Every data plane known to the cluster (rows from the shared table, overlaid with this
    /// control plane's live view of its own connections), by node id.
    pub async fn data_plane_rows(&self) -> Result<Vec<DataPlaneRow>, crate::cp::store::StoreError> {
        let mut rows: std::collections::BTreeMap<String, DataPlaneRow> = self
            .store
            .data_planes()
            .await?
            .into_iter()
            .map(|r| (r.node_id.clone(), r))
            .collect();
        for c in self.connected() {
            rows.insert(c.node_id.clone(), self.row(&c, true));
        }
        Ok(rows.into_values().collect())
    }

    /// Kong's plugin compatibility check for a DP that announced its plugins: the
    /// configuration must use only plugins it has, at a major version it runs and a minor not
    /// above its own. Records the DP's `sync_status` either way.
    pub(crate) async fn check_plugins(&self, conn: &DpConn) -> Result<(), String> {
        let Some(dp_plugins) = &conn.plugins else {
            return Ok(());
        };
        let used = {
            let mut cache = self.plugins_in_use.lock().await;
            let head = *self.store.subscribe().borrow();
            match cache.as_ref().filter(|(v, _)| *v == head) {
                Some((_, used)) => used.clone(),
                None => {
                    let (v, used) = self
                        .store
                        .plugins_in_use()
                        .await
                        .map_err(|e| format!("database unavailable: {e}"))?;
                    let used = Arc::new(used);
                    *cache = Some((v, used.clone()));
                    used
                }
            }
        };
        let missing: Vec<&str> = used
            .iter()
            .filter(|p| !dp_plugins.contains_key(*p))
            .map(String::as_str)
            .collect();
        let verdict = if !missing.is_empty() {
            Err((
                PLUGIN_SET_INCOMPATIBLE,
                format!(
                    "{PLUGIN_SET_INCOMPATIBLE}: the configuration uses plugins this data plane does not have: {}",
                    missing.join(", ")
                ),
            ))
        } else {
            let cp = &self.kong_compat_version;
            let newer: Vec<String> = used
                .iter()
                .filter_map(|p| {
                    let v = dp_plugins.get(p)?.as_deref()?;
                    plugin_version_incompatible(cp, v).then(|| format!("{p} {v}"))
                })
                .collect();
            if newer.is_empty() {
                Ok(())
            } else {
                Err((
                    PLUGIN_VERSION_INCOMPATIBLE,
                    format!(
                        "{PLUGIN_VERSION_INCOMPATIBLE}: the data plane runs plugins of another major or a newer minor version than the control plane ({cp}): {}",
                        newer.join(", ")
                    ),
                ))
            }
        };
        let mut st = conn.status.lock().expect("status lock");
        let result = match verdict {
            Ok(()) => {
                if st.sync_status != "normal" {
                    st.sync_status = "normal";
                    st.last_error = None;
                }
                Ok(())
            }
            Err((status, message)) => {
                st.sync_status = status;
                st.last_error = Some(message.clone());
                Err(message)
            }
        };
        conn.dirty.store(true, Ordering::Relaxed);
        result
    }

    /// `deltaplane.data_planes`.
    pub async fn data_planes(&self) -> Result<Vec<Value>, crate::cp::store::StoreError> {
        let head = self.store.version_info().await?.version;
        let now = crate::node::now_secs();
        Ok(self
            .data_plane_rows()
            .await?
            .into_iter()
            .map(|r| {
                let health = health(&r, head, now);
                serde_json::json!({
                    "node_id": r.node_id,
                    "hostname": r.hostname,
                    "address": r.address,
                    "kong_version": r.kong_version,
                    "protocol": r.protocol,
                    "version": r.version,
                    "version_string": version_string(r.version),
                    "state_hash": r.state_hash,
                    "connected_to": r.connected_to.filter(|_| health != "disconnected"),
                    "last_seen": r.last_seen,
                    "last_error": r.last_error,
                    "sync_status": r.sync_status,
                    "health": health,
                    "labels": serde_json::from_str::<Value>(&r.labels).unwrap_or(Value::Null),
                })
            })
            .collect())
    }
}

impl DpConn {
    /// Waits for this DP's one slot for a large answer (get_delta, get_page); hold the permit
    /// until the answer is written ([`Reply::Held`]).
    async fn large_answer_slot(&self) -> OwnedSemaphorePermit {
        self.answer_slot
            .clone()
            .acquire_owned()
            .await
            .expect("the answer slot is never closed")
    }

    /// A data plane that just connected, `sync_status` normal, nothing reported yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        protocol: &'static str,
        node_id: String,
        hostname: String,
        address: SocketAddr,
        kong_version: String,
        labels: Value,
        capabilities: Vec<String>,
        cert_expiry: Option<i64>,
        plugins: Option<HashMap<String, Option<String>>>,
        cp_version: &str,
    ) -> DpConn {
        DpConn {
            protocol,
            older: crate::schema::version_cmp(&kong_version, cp_version)
                == std::cmp::Ordering::Less,
            node_id,
            hostname,
            address,
            kong_version,
            labels,
            capabilities,
            cert_expiry,
            plugins,
            status: Mutex::new(DpStatus {
                sync_status: "normal",
                ..DpStatus::default()
            }),
            reported: watch::channel(-1).0,
            dirty: std::sync::atomic::AtomicBool::new(true),
            answer_slot: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// A v1 ping: the data plane holds `hash`, the configuration of `version` when the control
    /// plane knows which version it sent with that hash. Written by the flusher.
    pub(crate) fn report_v1(&self, hash: &str, version: Option<i64>) {
        let mut st = self.status.lock().expect("status lock");
        if let Some(v) = version {
            if v > st.version {
                st.last_error = None;
            }
            st.version = v;
        }
        st.config_hash = Some(hash.to_owned());
        drop(st);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Records why the data plane's configuration could not be sent.
    pub(crate) fn set_error(&self, message: String) {
        self.status.lock().expect("status lock").last_error = Some(message);
        self.dirty.store(true, Ordering::Relaxed);
    }
}

/// The row of a data plane refused for its Kong version (Kong records it, then closes).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn record_refused(
    ctx: &ClusterCtx,
    protocol: &str,
    node_id: &str,
    hostname: &str,
    address: SocketAddr,
    kong_version: &str,
    labels: &Value,
    capabilities: &[String],
    cert_expiry: Option<i64>,
    reason: &str,
) {
    tracing::warn!(%node_id, %kong_version, %reason, protocol, "data plane refused: kong_version_incompatible");
    let row = DataPlaneRow {
        node_id: node_id.to_owned(),
        hostname: hostname.to_owned(),
        address: address.ip().to_string(),
        kong_version: kong_version.to_owned(),
        protocol: protocol.into(),
        version: 0,
        state_hash: None,
        connected_to: None,
        last_seen: crate::node::now_secs(),
        last_error: Some(format!("kong_version_incompatible: {reason}")),
        labels: labels.to_string(),
        capabilities: Value::from(capabilities.to_vec()).to_string(),
        cert_expiry,
        sync_status: "kong_version_incompatible".into(),
        config_hash: None,
        updated_at: crate::node::now_secs(),
    };
    if let Err(e) = ctx.store.upsert_data_plane(&row).await {
        tracing::debug!(error = %e, "recording a refused data plane failed");
    }
}

/// How long a row may go without a refresh before its connection is considered gone (the
/// flusher refreshes connected rows every 10 s; a control plane that crashed cannot say its
/// data planes disconnected).
pub const STALE_AFTER_SECS: i64 = 60;

/// One word for a data plane's state: `disconnected`, `incompatible` (withheld by a
/// compatibility check), `failing` (its last apply failed), `behind` (below the head) or
/// `in_sync`.
pub fn health(r: &DataPlaneRow, head: i64, now: i64) -> &'static str {
    if r.connected_to.is_none() || now - r.last_seen > STALE_AFTER_SECS {
        "disconnected"
    } else if r.sync_status.ends_with("_incompatible") {
        "incompatible"
    } else if r.last_error.is_some() {
        "failing"
    } else if r.version < head {
        "behind"
    } else {
        "in_sync"
    }
}

/// Accepts cluster connections until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    tls: ClusterTls,
    ctx: Arc<ClusterCtx>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    let flusher = tokio::spawn(flush_status(ctx.clone(), shutdown.clone()));
    let pusher = tokio::spawn(super::v1::push_loop(ctx.clone(), shutdown.clone()));
    let mut expiry = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = expiry.tick() => ctx.feed.expire_idle(Duration::from_secs(30)),
            accepted = listener.accept() => {
                let (tcp, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "cluster accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let tls = tls.clone();
                let ctx = ctx.clone();
                let stop = shutdown.clone();
                tasks.spawn(async move {
                    if let Err(e) = connection(tcp, addr, tls, ctx, stop).await {
                        tracing::info!(peer = %addr, error = %e, "cluster connection ended");
                    }
                });
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    // Connections close themselves on shutdown (1001); give them a moment, then abort.
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        tasks.shutdown().await;
    }
    let _ = flusher.await;
    let _ = pusher.await;
}

/// Closes the connection when the task that owns it ends, however it ends (a connection
/// outlives its `Peer` handles otherwise).
struct CloseOnDrop(Peer);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(1001, "control plane closing the connection");
    }
}

#[allow(clippy::result_large_err)] // tungstenite's upgrade callback returns a whole response
async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    tls: ClusterTls,
    ctx: Arc<ClusterCtx>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let timeout = ctx.settings.handshake_timeout;
    let (tls, identity) = tokio::time::timeout(timeout, tls.accept(tcp))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))?
        .map_err(|e| anyhow::anyhow!("TLS handshake refused: {e}"))?;
    let identity = Some(identity);
    let ws_config = crate::net::peer::ws_config(&ctx.settings.peer_config());
    let route: Mutex<Option<Route>> = Mutex::new(None);
    let settings = &ctx.settings;
    let callback =
        |req: &tokio_tungstenite::tungstenite::handshake::server::Request,
         mut resp: tokio_tungstenite::tungstenite::handshake::server::Response| {
            let r = check_upgrade(req, &mut resp, settings)?;
            *route.lock().expect("route lock") = Some(r);
            Ok(resp)
        };
    let mut ws = tokio::time::timeout(
        timeout,
        tokio_tungstenite::accept_hdr_async_with_config(tls, callback, Some(ws_config)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("WebSocket handshake timed out"))?
    .map_err(|e| anyhow::anyhow!("WebSocket handshake failed: {e}"))?;
    if let Some(Route::V1(query)) = route.into_inner().expect("route lock") {
        let cert_expiry = identity.as_ref().map(|i| i.not_after);
        return super::v1::serve(ws, addr, cert_expiry, query, ctx, stop).await;
    }

    let epoch = ctx
        .store
        .version_info()
        .await
        .map_err(|e| anyhow::anyhow!("reading the change log: {e}"))?
        .epoch;
    // With sync v2 off the hello offers nothing (Kong's cluster_rpc_sync = off): data planes
    // fall back to v1.
    let our_caps = if ctx.settings.sync_v2 {
        vec![
            CAP_KONG_SYNC_V2.to_owned(),
            CAP_DELTAPLANE_SYNC_V1.to_owned(),
        ]
    } else {
        Vec::new()
    };
    let caps_for_hello = our_caps.clone();
    let cp_node = ctx.node_id.clone();
    let cp_version = ctx.kong_compat_version.clone();
    let refused: Arc<Mutex<Option<(Hello, String)>>> = Arc::default();
    let refused_slot = refused.clone();
    let handshake = hello::server_handshake(&mut ws, timeout, move |h: &Hello| {
        if let Err(reason) = kong_version_compatible(&cp_version, &h.kong_version) {
            *refused_slot.lock().expect("refused lock") = Some((h.clone(), reason.clone()));
            return Err(format!("kong_version_incompatible: {reason}"));
        }
        let enc = codec::choose(&h.rpc_frame_encodings)
            .ok_or_else(|| "unknown encodings: no common frame encoding".to_owned())?;
        let mut extra = serde_json::Map::new();
        extra.insert("epoch".into(), Value::String(epoch));
        extra.insert("node_id".into(), Value::String(cp_node));
        Ok(HelloResult {
            rpc_capabilities: caps_for_hello,
            rpc_frame_encoding: enc.name().to_owned(),
            extra,
        })
    })
    .await;
    let (hello, encoding) = match handshake {
        Ok(ok) => ok,
        Err(e) => {
            let refused = refused.lock().expect("refused lock").take();
            if let Some((h, reason)) = refused {
                record_refused(
                    &ctx,
                    "v2",
                    &h.kong_node_id,
                    &h.kong_hostname,
                    addr,
                    &h.kong_version,
                    &labels_of(&h.kong_conf),
                    &h.rpc_capabilities,
                    identity.as_ref().map(|i| i.not_after),
                    &reason,
                )
                .await;
            }
            return Err(anyhow::anyhow!("hello failed: {e}"));
        }
    };

    let conn = Arc::new(DpConn::new(
        "v2",
        hello.kong_node_id.clone(),
        hello.kong_hostname.clone(),
        addr,
        hello.kong_version.clone(),
        labels_of(&hello.kong_conf),
        hello.rpc_capabilities.clone(),
        identity.as_ref().map(|i| i.not_after),
        plugins_of(&hello.kong_conf),
        &ctx.kong_compat_version,
    ));
    let handler = Arc::new(CpHandler {
        ctx: ctx.clone(),
        conn: conn.clone(),
        encoding,
    });
    let peer = Peer::start(
        ws,
        encoding,
        ctx.settings.peer_config(),
        our_caps,
        hello.rpc_capabilities.clone(),
        handler,
    );
    let _closer = CloseOnDrop(peer.clone());
    let id = ctx.register(conn.clone());
    tracing::info!(
        node_id = %conn.node_id,
        hostname = %conn.hostname,
        peer = %addr,
        kong_version = %conn.kong_version,
        encoding = encoding.name(),
        caps = ?conn.capabilities,
        "data plane connected"
    );
    record(&ctx, &conn, true).await;

    let notifier = tokio::spawn(notify_loop(ctx.clone(), conn.clone(), peer.clone()));
    let reason = tokio::select! {
        r = peer.closed() => format!("{r:?}"),
        _ = stop.wait_for(|s| *s) => {
            peer.close(1001, "control plane shutting down");
            "shutdown".to_owned()
        }
    };
    notifier.abort();
    ctx.unregister(id, &conn).await;
    tracing::info!(node_id = %conn.node_id, peer = %addr, %reason, "data plane disconnected");
    Ok(())
}

/// Where an upgrade goes.
enum Route {
    /// `/v2/outlet`: hello, then JSON-RPC.
    V2,
    /// `/v1/outlet` with its query arguments.
    V1(super::v1::V1Query),
}

/// Accepts `/v2/outlet` with subprotocol `kong.meta.v1` (unless `--cluster-rpc` is off, as a
/// Kong CP with `cluster_rpc = off` has no such location) and `/v1/outlet` with its required
/// query arguments (400 without them); refuses anything else.
#[allow(clippy::result_large_err)]
fn check_upgrade(
    req: &tokio_tungstenite::tungstenite::handshake::server::Request,
    resp: &mut tokio_tungstenite::tungstenite::handshake::server::Response,
    settings: &ClusterSettings,
) -> Result<Route, tokio_tungstenite::tungstenite::handshake::server::ErrorResponse> {
    use tokio_tungstenite::tungstenite::http;
    let reject = |status: http::StatusCode, msg: &str| {
        let mut r = http::Response::new(Some(msg.to_owned()));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() == crate::proto::v1::PATH {
        return super::v1::V1Query::parse(req.uri().query())
            .map(Route::V1)
            .map_err(|msg| reject(http::StatusCode::BAD_REQUEST, &msg));
    }
    if req.uri().path() != "/v2/outlet" || !settings.rpc {
        return Err(reject(http::StatusCode::NOT_FOUND, "not found"));
    }
    let offered = req
        .headers()
        .get_all(http::header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL);
    if !offered {
        return Err(reject(
            http::StatusCode::BAD_REQUEST,
            "unknown RPC protocol: Sec-WebSocket-Protocol must include kong.meta.v1",
        ));
    }
    resp.headers_mut().insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(SUBPROTOCOL),
    );
    Ok(Route::V2)
}

/// Kong's rule: a data plane of another major version, or of a newer minor, cannot follow this
/// control plane; an older minor can (fields it does not know are removed).
pub fn kong_version_compatible(cp: &str, dp: &str) -> Result<(), String> {
    let parts = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some((major, minor))
    };
    let (Some((cmaj, cmin)), Some((dmaj, dmin))) = (parts(cp), parts(dp)) else {
        return Err(format!(
            "cannot compare data plane version '{dp}' with '{cp}'"
        ));
    };
    if cmaj != dmaj {
        return Err(format!(
            "data plane version {dp} has a different major version than the control plane ({cp})"
        ));
    }
    if dmin > cmin {
        return Err(format!(
            "data plane version {dp} is newer than the control plane ({cp})"
        ));
    }
    Ok(())
}

/// Kong's rule for a configured plugin's versions: another major, or a DP minor above the
/// CP's, is incompatible.
fn plugin_version_incompatible(cp: &str, dp: &str) -> bool {
    let parts = |v: &str| -> Option<(u64, u64)> {
        let mut it = v.split('.');
        Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    };
    match (parts(cp), parts(dp)) {
        (Some((cmaj, cmin)), Some((dmaj, dmin))) => cmaj != dmaj || dmin > cmin,
        _ => false,
    }
}

/// `kong_conf.plugins`: names, or `{name, version}` objects; `None` when absent.
pub(crate) fn plugins_of(conf: &Value) -> Option<HashMap<String, Option<String>>> {
    let items = conf.get("plugins")?.as_array()?;
    Some(
        items
            .iter()
            .filter_map(|p| match p {
                Value::String(name) => Some((name.clone(), None)),
                Value::Object(o) => Some((
                    o.get("name")?.as_str()?.to_owned(),
                    o.get("version").and_then(Value::as_str).map(str::to_owned),
                )),
                _ => None,
            })
            .collect(),
    )
}

/// `kong_conf.cluster_dp_labels` (`["key:value", ...]`) as an object.
fn labels_of(conf: &Value) -> Value {
    let mut m = serde_json::Map::new();
    if let Some(items) = conf.get("cluster_dp_labels").and_then(Value::as_array) {
        for item in items.iter().filter_map(Value::as_str) {
            if let Some((k, v)) = item.split_once(':') {
                m.insert(k.to_owned(), Value::String(v.to_owned()));
            }
        }
    }
    Value::Object(m)
}

/// Writes the status rows of connected data planes that changed (and, every `refresh`, of all
/// of them, so `last_seen` stays fresh) in one transaction per tick — never on the notify
/// path, where a slow status write would delay a DP's notification.
pub async fn flush_status(ctx: Arc<ClusterCtx>, mut stop: watch::Receiver<bool>) {
    let tick = Duration::from_secs(1);
    let refresh = Duration::from_secs(10);
    let mut last_refresh = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = stop.changed() => return,
        }
        let all = last_refresh.elapsed() >= refresh;
        if all {
            last_refresh = std::time::Instant::now();
        }
        let rows: Vec<DataPlaneRow> = ctx
            .connected()
            .into_iter()
            .filter(|c| c.dirty.swap(false, Ordering::Relaxed) || all)
            .map(|c| ctx.row(&c, true))
            .collect();
        if let Err(e) = ctx.store.upsert_data_planes(&rows).await {
            tracing::debug!(error = %e, rows = rows.len(), "writing data-plane status failed; will retry");
            for c in ctx.connected() {
                c.dirty.store(true, Ordering::Relaxed);
            }
        }
    }
}

pub(crate) async fn record(ctx: &ClusterCtx, conn: &DpConn, connected: bool) {
    if let Err(e) = ctx.store.upsert_data_plane(&ctx.row(conn, connected)).await {
        tracing::debug!(error = %e, node_id = %conn.node_id, "recording data-plane status failed");
    }
}

/// Calls `notify_new_version` whenever the head moves past what the data plane reported.
async fn notify_loop(ctx: Arc<ClusterCtx>, conn: Arc<DpConn>, peer: Peer) {
    if !conn.capabilities.iter().any(|c| c == CAP_KONG_SYNC_V2) {
        return;
    }
    let mut head = ctx.store.subscribe();
    let mut reported = conn.reported.subscribe();
    // Wait for the data plane's first get_delta: it pulls on connect anyway.
    if reported.wait_for(|v| *v >= 0).await.is_err() {
        return;
    }
    loop {
        let h = *head.borrow_and_update();
        let r = *reported.borrow_and_update();
        if h > r {
            let params = serde_json::json!([{ "default": { "new_version": version_string(h) } }]);
            match peer.call("kong.sync.v2.notify_new_version", params).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(node_id = %conn.node_id, error = %e, "notify_new_version failed");
                }
            }
            // Wait for the DP to report progress (or for a newer head) before notifying again.
            tokio::select! {
                c = head.changed() => if c.is_err() { return },
                c = reported.changed() => if c.is_err() { return },
                _ = tokio::time::sleep(ctx.settings.ping_interval) => {}
            }
        } else {
            tokio::select! {
                c = head.changed() => if c.is_err() { return },
                c = reported.changed() => if c.is_err() { return },
            }
        }
    }
}

struct CpHandler {
    ctx: Arc<ClusterCtx>,
    conn: Arc<DpConn>,
    encoding: Encoding,
}

impl Handler for CpHandler {
    fn methods(&self) -> &[&'static str] {
        CP_METHODS
    }

    fn call(
        &self,
        peer: Peer,
        method: String,
        params: Value,
        notification: bool,
    ) -> BoxFuture<'static, Result<Reply, RpcError>> {
        let ctx = self.ctx.clone();
        let conn = self.conn.clone();
        let encoding = self.encoding;
        Box::pin(async move {
            match method.as_str() {
                "kong.sync.v2.get_delta" => {
                    get_delta(&ctx, &conn, &peer, encoding, params, notification).await
                }
                "kong.sync.v2.notify_validation_error" => {
                    let p = first_param(&params)?;
                    let msg = p
                        .get("error")
                        .and_then(|e| e.get("message"))
                        .and_then(Value::as_str)
                        .unwrap_or("validation error")
                        .to_owned();
                    tracing::warn!(node_id = %conn.node_id, version = ?p.get("version"), error = %msg, "data plane rejected deltas");
                    conn.status.lock().expect("status lock").last_error = Some(msg);
                    conn.dirty.store(true, Ordering::Relaxed);
                    Ok(Reply::Value(Value::Bool(true)))
                }
                "deltaplane.sync.v1.get_page" => {
                    let p = first_param(&params)?;
                    let id = p.get("id").and_then(Value::as_str).ok_or_else(|| {
                        RpcError::invalid_params().with_message("'id' must be a string")
                    })?;
                    let page = p.get("page").and_then(Value::as_u64).ok_or_else(|| {
                        RpcError::invalid_params().with_message("'page' must be a number")
                    })?;
                    // Pages are as large as answers: the same one-at-a-time slot.
                    let slot = conn.large_answer_slot().await;
                    let text = ctx
                        .feed
                        .page(id, page as usize)
                        .map_err(|e| RpcError::server_error().with_message(e.to_string()))?;
                    let reply = if conn.older {
                        raw_value(downgrade(&ctx, &conn, &text, &["deltas"])?)
                    } else {
                        raw_value(text)
                    };
                    held(reply, slot)
                }
                _ => Err(RpcError::method_not_found()),
            }
        })
    }
}

/// Removes from the deltas at `path` of an answer the fields an older data plane does not know
/// (Kong does this only on v1, and pushes older DPs to v1).
fn downgrade(
    ctx: &ClusterCtx,
    conn: &DpConn,
    text: &str,
    path: &[&str],
) -> Result<String, RpcError> {
    let mut answer: Value = serde_json::from_str(text)
        .map_err(|e| RpcError::internal_error().with_message(e.to_string()))?;
    let mut deltas = &mut answer;
    for key in path {
        deltas = &mut deltas[*key];
    }
    let registry = ctx.store.registry();
    let mut removed = std::collections::BTreeSet::new();
    if let Some(items) = deltas.as_array_mut() {
        for d in items {
            let ty = d["type"].as_str().unwrap_or_default().to_owned();
            if let Some(entity) = d.get_mut("entity").filter(|e| e.is_object()) {
                for f in registry.strip_newer_fields(&ty, entity, &conn.kong_version) {
                    removed.insert(format!("{ty}.{f}"));
                }
            }
        }
    }
    if !removed.is_empty() {
        tracing::info!(node_id = %conn.node_id, kong_version = %conn.kong_version, fields = ?removed, "removed fields the data plane does not know");
    }
    serde_json::to_string(&answer)
        .map_err(|e| RpcError::internal_error().with_message(e.to_string()))
}

fn first_param(params: &Value) -> Result<&Value, RpcError> {
    params
        .get(0)
        .filter(|p| p.is_object())
        .ok_or_else(|| RpcError::invalid_params().with_message("params must be [ { ... } ]"))
}

/// A large answer held with its slot until written (see [`DpConn::large_answer_slot`]).
fn held(reply: Result<Reply, RpcError>, slot: OwnedSemaphorePermit) -> Result<Reply, RpcError> {
    reply.map(|r| Reply::Held(Box::new(r), Box::new(slot)))
}

fn raw_value(text: String) -> Result<Reply, RpcError> {
    RawValue::from_string(text)
        .map(Reply::Raw)
        .map_err(|e| RpcError::internal_error().with_message(e.to_string()))
}

async fn get_delta(
    ctx: &ClusterCtx,
    conn: &DpConn,
    peer: &Peer,
    encoding: Encoding,
    params: Value,
    notification: bool,
) -> Result<Reply, RpcError> {
    let p = first_param(&params)?;
    let ns = p.get("default").ok_or_else(|| {
        RpcError::server_error().with_message("default namespace does not exist inside params")
    })?;
    let version = ns
        .get("version")
        .and_then(Value::as_str)
        .and_then(parse_version);
    if let Some(v) = version {
        let mut st = conn.status.lock().expect("status lock");
        if v > st.version {
            // Progress: whatever failed before has been overcome.
            st.last_error = None;
        }
        st.version = v;
        st.state_hash = ns
            .get("state_hash")
            .and_then(Value::as_str)
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_owned);
        drop(st);
        conn.dirty.store(true, Ordering::Relaxed);
        conn.reported.send_replace(v);
    } else {
        conn.reported.send_replace(0);
    }
    if notification {
        // A status report (Kong sends get_delta as a notification after applying): record
        // it, build nothing — the answer would be thrown away.
        return Ok(Reply::Value(Value::Bool(true)));
    }
    if let Err(message) = ctx.check_plugins(conn).await {
        // Withhold the configuration rather than send what the DP cannot run; it is sent
        // once the configuration or the DP changes (the notifier announces every new head,
        // and a deltaplane DP asks again on it: `sync::is_withheld`).
        tracing::warn!(node_id = %conn.node_id, %message, "configuration withheld");
        return Err(RpcError::server_error().with_message(message));
    }
    let asker = Asker {
        paging: peer.peer_caps().iter().any(|c| c == CAP_DELTAPLANE_SYNC_V1),
        encoding: encoding.name(),
    };
    let slot = conn.large_answer_slot().await;
    let held = move |reply: Result<Reply, RpcError>| held(reply, slot);
    let max = ctx.settings.max_payload;
    let fits = move |bytes: &[u8]| codec::encode(encoding, bytes).len() + 64 <= max;
    match ctx.feed.get_delta(version, asker, &fits).await {
        Ok((text, decision)) => {
            tracing::debug!(node_id = %conn.node_id, ?decision, bytes = text.len(), "get_delta");
            // The DP will be at this version once it applies the answer: no need to notify it
            // of that version (it reports where it really is after applying).
            let promised = match decision {
                Decision::UpToDate => None,
                Decision::Incremental { to, .. } => Some(to),
                Decision::Full { version } | Decision::Paged { version, .. } => Some(version),
            };
            if let Some(p) = promised {
                conn.reported.send_if_modified(|r| {
                    let newer = p > *r;
                    if newer {
                        *r = p;
                    }
                    newer
                });
            }
            if conn.older {
                return held(raw_value(downgrade(
                    ctx,
                    conn,
                    &text,
                    &["default", "deltas"],
                )?));
            }
            held(raw_value(text))
        }
        Err(FeedError::Store(e)) => {
            tracing::warn!(error = %e, "get_delta: database unavailable");
            Err(RpcError::server_error().with_message(format!("database unavailable: {e}")))
        }
        Err(e) => {
            tracing::error!(node_id = %conn.node_id, error = %e, "get_delta refused");
            Err(RpcError::server_error().with_message(e.to_string()))
        }
    }
}
