//! Sync v1 on the control plane: `/v1/outlet`, Kong's full-configuration push.
//!
//! The data plane's first frame is an uncompressed `basic_info` (plugins, labels). After that
//! the control plane only pushes gzip-compressed `reconfigure` messages and answers the data
//! plane's pings (each a 32-character config hash: its status report); any other frame from
//! the data plane ends the connection.
//!
//! A version is exported and compressed once ([`V1Hub`]) and the same bytes go to every v1 data
//! plane of the same Kong line (older lines get one stripped copy per Kong version). The push
//! loop sends the first change after a quiet period at once and then at most one push per
//! `push_interval`; each connection keeps only the latest payload (a `watch`), so a slow data
//! plane skips intermediate versions and always ends on the last one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::compat::kong_version_compatible;
use super::fleet::{DpConn, DpIdentity, Fleet};
use super::metrics::{CpMetrics, HandshakeRefusal};
use crate::cp::store::{Store, StoreError};
use crate::net::stats::Refusal;
use crate::proto::SyncProtocol;
use crate::proto::v1::export::ExportBuilder;
use crate::proto::v1::hash::EMPTY_HASH;
use crate::settings::ClusterSettings;

/// `/v1/outlet?node_id=..&node_hostname=..&node_version=..`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V1Query {
    pub node_id: String,
    pub hostname: String,
    pub version: String,
}

impl V1Query {
    /// Kong requires `node_id` and `node_version` (400 otherwise); the hostname defaults to
    /// the node id.
    pub fn parse(query: Option<&str>) -> Result<V1Query, String> {
        let mut id = None;
        let mut hostname = None;
        let mut version = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let slot = match k.as_ref() {
                "node_id" => &mut id,
                "node_hostname" => &mut hostname,
                "node_version" => &mut version,
                _ => continue,
            };
            *slot = Some(v.into_owned()).filter(|v| !v.is_empty());
        }
        let id = id.ok_or("'node_id' argument required")?;
        let version = version.ok_or("'node_version' argument required")?;
        Ok(V1Query {
            hostname: hostname.unwrap_or_else(|| id.clone()),
            node_id: id,
            version,
        })
    }
}

/// One exported, compressed version.
#[derive(Debug)]
pub struct Payload {
    pub version: i64,
    pub epoch: String,
    /// The control plane's config hash (before any compatibility transform).
    pub config_hash: String,
    /// The hash a data plane reports once it holds this configuration: the config hash, or
    /// 32 zeros when there is nothing but workspaces (as Kong's data plane stores).
    pub reported_hash: String,
    /// The gzip-compressed reconfigure message.
    pub bytes: Bytes,
    /// Its size uncompressed.
    pub raw_len: usize,
    pub n_entities: usize,
}

/// What the v1 connections of one control plane share.
pub struct V1Hub {
    store: Store,
    fleet: Arc<Fleet>,
    kong_compat_version: String,
    settings: ClusterSettings,
    metrics: Arc<CpMetrics>,
    /// The latest payload; each connection watches it (only the latest is ever kept).
    latest: watch::Sender<Option<Arc<Payload>>>,
    /// One export at a time: a version is exported once, whoever asks.
    exporting: tokio::sync::Mutex<()>,
    /// Stripped copies for older data planes: (version, Kong version → bytes).
    compat: Mutex<Option<(i64, HashMap<String, Bytes>)>>,
    clients: AtomicUsize,
    joined: Notify,
    /// Versions exported (each once) and push rounds, for tests and benchmarks.
    exports: AtomicU64,
    pushes: AtomicU64,
}

impl V1Hub {
    pub fn new(
        store: Store,
        fleet: Arc<Fleet>,
        kong_compat_version: String,
        settings: ClusterSettings,
        metrics: Arc<CpMetrics>,
    ) -> V1Hub {
        V1Hub {
            store,
            fleet,
            kong_compat_version,
            settings,
            metrics,
            latest: watch::channel(None).0,
            exporting: tokio::sync::Mutex::new(()),
            compat: Mutex::new(None),
            clients: AtomicUsize::new(0),
            joined: Notify::new(),
            exports: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
        }
    }

    /// Versions exported and compressed so far.
    pub fn exports(&self) -> u64 {
        self.exports.load(Ordering::Relaxed)
    }

    /// Push rounds (one per payload published by the push loop).
    pub fn pushes(&self) -> u64 {
        self.pushes.load(Ordering::Relaxed)
    }

    /// The latest payload, if any.
    pub fn latest(&self) -> Option<Arc<Payload>> {
        self.latest.borrow().clone()
    }

    /// The payload of `head` or later: the cached one, or a new export (shared by everyone
    /// waiting for it).
    pub async fn ensure(&self, head: i64) -> Result<Arc<Payload>, StoreError> {
        if let Some(p) = self.latest().filter(|p| p.version >= head) {
            return Ok(p);
        }
        let _one = self.exporting.lock().await;
        if let Some(p) = self.latest().filter(|p| p.version >= head) {
            return Ok(p);
        }
        let p = Arc::new(export(&self.store).await?);
        self.exports.fetch_add(1, Ordering::Relaxed);
        self.latest.send_if_modified(|cur| {
            let newer = cur.as_ref().is_none_or(|c| c.version < p.version);
            if newer {
                *cur = Some(p.clone());
            }
            newer
        });
        Ok(p)
    }

    /// The payload for a data plane of Kong `dp_version` (older than the control plane):
    /// fields it does not know removed, compressed again; cached per version and Kong version.
    async fn downgraded(&self, p: &Payload, dp_version: &str) -> anyhow::Result<Bytes> {
        if let Some((v, m)) = self.compat.lock().expect("compat lock").as_ref()
            && *v == p.version
            && let Some(b) = m.get(dp_version)
        {
            return Ok(b.clone());
        }
        let registry = self.store.registry().clone();
        let bytes = p.bytes.clone();
        let max = self.settings.max_decompressed().max(p.raw_len);
        let dp = dp_version.to_owned();
        let out = tokio::task::spawn_blocking(move || -> anyhow::Result<Bytes> {
            let raw = crate::proto::v1::gunzip(&bytes, max).map_err(anyhow::Error::msg)?;
            let mut msg: Value = serde_json::from_slice(&raw)?;
            let mut removed = std::collections::BTreeSet::new();
            if let Some(Value::Object(table)) = msg.get_mut("config_table") {
                for (ty, items) in table.iter_mut() {
                    for e in items.as_array_mut().into_iter().flatten() {
                        for f in registry.strip_newer_fields(ty, e, &dp) {
                            removed.insert(format!("{ty}.{f}"));
                        }
                    }
                }
            }
            if !removed.is_empty() {
                tracing::info!(kong_version = %dp, fields = ?removed, "removed fields the data plane does not know");
            }
            Ok(Bytes::from(crate::proto::v1::gzip(&serde_json::to_vec(&msg)?)?))
        })
        .await
        .context("downgrade task")??;
        let mut compat = self.compat.lock().expect("compat lock");
        if compat.as_ref().is_none_or(|(v, _)| *v != p.version) {
            *compat = Some((p.version, HashMap::new()));
        }
        if let Some((_, m)) = compat.as_mut() {
            m.insert(dp_version.to_owned(), out.clone());
        }
        Ok(out)
    }
}

/// Exports the current configuration (one snapshot) as a compressed reconfigure message.
async fn export(store: &Store) -> Result<Payload, StoreError> {
    let started = std::time::Instant::now();
    let registry = store.registry().clone();
    let mut builder = ExportBuilder::new();
    let info = store
        .snapshot(|c| {
            if let Some(entity) = c.entity {
                builder.push(&registry, &c.entity_type, &c.ws_id, entity);
            }
            Ok(())
        })
        .await?;
    let read = started.elapsed();
    let epoch = info.epoch.clone();
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let payload = tokio::task::spawn_blocking(move || {
        let export = builder.finish();
        let bytes = crate::proto::v1::reconfigure_gzip(&export, timestamp, info.version, &epoch)
            .expect("writing to memory does not fail");
        Payload {
            version: info.version,
            epoch,
            reported_hash: if export.only_workspaces {
                EMPTY_HASH.to_owned()
            } else {
                export.config_hash.clone()
            },
            config_hash: export.config_hash,
            raw_len: export.table.len(),
            n_entities: export.n_entities,
            bytes: Bytes::from(bytes),
        }
    })
    .await
    .map_err(|e| StoreError::Internal(format!("export task: {e}")))?;
    tracing::info!(
        version = payload.version,
        entities = payload.n_entities,
        raw_bytes = payload.raw_len,
        gzip_bytes = payload.bytes.len(),
        ?read,
        total = ?started.elapsed(),
        "sync v1: exported the configuration"
    );
    Ok(payload)
}

impl V1Hub {
    /// Publishes a payload whenever the head moves and v1 data planes are connected: the first
    /// change after a quiet period at once, later ones at most once per `push_interval` (changes
    /// meanwhile coalesce into the next push; the last state is always pushed).
    pub async fn push_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let hub = &self;
        let mut head = self.store.subscribe();
        loop {
            tokio::select! {
                c = head.changed() => if c.is_err() { return },
                _ = hub.joined.notified() => {}
                _ = stopped(&mut stop) => return,
            }
            if hub.clients.load(Ordering::Relaxed) == 0 {
                // Nobody to push to: keep no copy of the configuration.
                hub.latest.send_replace(None);
                continue;
            }
            let h = *head.borrow_and_update();
            if hub.latest().is_some_and(|p| p.version >= h) {
                continue;
            }
            match hub.ensure(h).await {
                Ok(_) => {
                    hub.pushes.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "sync v1: export failed; will retry");
                    head.mark_changed();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.push_interval) => {}
                _ = stopped(&mut stop) => return,
            }
        }
    }
}

/// Serves one `/v1/outlet` connection until it ends or `stop`.
pub(super) async fn serve<S>(
    mut ws: WebSocketStream<S>,
    addr: SocketAddr,
    cert_expiry: Option<i64>,
    query: V1Query,
    hub: Arc<V1Hub>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let settings = hub.settings.clone();
    let info = match basic_info(&mut ws, settings.handshake_timeout).await {
        Ok(info) => info,
        Err(e) => {
            hub.metrics.handshake_refused(HandshakeRefusal::Hello);
            close(&mut ws, CloseCode::Policy, &e, settings.write_timeout).await;
            anyhow::bail!("v1 {}: {e}", query.node_id);
        }
    };
    let labels = info
        .get("labels")
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    let labels = if labels.is_object() {
        labels
    } else {
        Value::Object(Default::default())
    };
    let who = DpIdentity {
        protocol: SyncProtocol::V1,
        node_id: query.node_id.clone(),
        hostname: query.hostname.clone(),
        address: addr,
        kong_version: query.version.clone(),
        labels,
        capabilities: Vec::new(),
        cert_expiry,
        max_payload: info
            .get("process_conf")
            .and_then(crate::proto::hello::max_payload_of),
    };
    if let Err(reason) = kong_version_compatible(&hub.kong_compat_version, &query.version) {
        hub.metrics
            .handshake_refused(HandshakeRefusal::KongVersionIncompatible);
        hub.fleet.record_refused(&who, &reason).await;
        close(
            &mut ws,
            CloseCode::Policy,
            &format!("kong_version_incompatible: {reason}"),
            settings.write_timeout,
        )
        .await;
        anyhow::bail!("v1 {}: kong_version_incompatible: {reason}", query.node_id);
    }
    let plugins = crate::proto::hello::plugins_of(&info);
    let conn = Arc::new(DpConn::new(who, plugins, &hub.kong_compat_version));
    let id = hub.fleet.register(conn.clone()).await;
    tracing::info!(node_id = %conn.who.node_id, hostname = %conn.who.hostname, peer = %addr, kong_version = %conn.who.kong_version, "data plane connected (sync v1)");
    hub.clients.fetch_add(1, Ordering::Relaxed);
    hub.joined.notify_one();
    let notices = info.get(crate::proto::v1::NOTICES) == Some(&Value::Bool(true));
    let reason = run(&mut ws, &hub, &conn, notices, &mut stop).await;
    hub.clients.fetch_sub(1, Ordering::Relaxed);
    hub.fleet.unregister(id, &conn).await;
    tracing::info!(node_id = %conn.who.node_id, peer = %addr, %reason, "data plane disconnected (sync v1)");
    Ok(())
}

/// Reads the data plane's first frame: `{"type":"basic_info","plugins":[…],…}`.
async fn basic_info<S>(ws: &mut WebSocketStream<S>, timeout: Duration) -> Result<Value, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let msg = tokio::time::timeout(timeout, ws.next())
        .await
        .map_err(|_| "no basic_info in time".to_owned())?
        .ok_or("closed before basic_info")?
        .map_err(|e| format!("reading basic_info: {e}"))?;
    let bytes = match msg {
        Message::Binary(b) => b,
        Message::Text(t) => Bytes::from(t.as_str().to_owned()),
        other => {
            return Err(format!(
                "invalid websocket frame before basic_info: {other:?}"
            ));
        }
    };
    let info: Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("basic_info is not JSON: {e}"))?;
    if info.get("type").and_then(Value::as_str) != Some(crate::proto::v1::BASIC_INFO) {
        return Err("the first message must be basic_info".into());
    }
    if !info.get("plugins").is_some_and(Value::is_array) {
        return Err("basic_info has no plugins list".into());
    }
    Ok(info)
}

/// The connection's life after `basic_info`; returns why it ended.
async fn run<S>(
    ws: &mut WebSocketStream<S>,
    hub: &V1Hub,
    conn: &DpConn,
    notices: bool,
    stop: &mut watch::Receiver<bool>,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let s = &hub.settings;
    let mut latest = hub.latest.subscribe();
    // The hashes sent to this data plane and their versions, newest last (a ping maps to a
    // version through them).
    let mut sent: Vec<(String, i64)> = Vec::new();
    let mut sent_version: Option<(i64, String)> = None;
    // The configuration as of now, then every newer one the push loop publishes.
    let head = *hub.store.subscribe().borrow();
    let ensured = match hub.ensure(head).await {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(error = %e, "sync v1: export failed");
            None
        }
    };
    // The push loop may have published a newer one meanwhile: send whichever is newer.
    let published = latest.borrow_and_update().clone();
    let mut pending = match (ensured, published) {
        (Some(a), Some(b)) => Some(if b.version > a.version { b } else { a }),
        (a, b) => a.or(b),
    };
    let idle = tokio::time::sleep(s.idle_timeout);
    tokio::pin!(idle);
    loop {
        if let Some(p) = pending.take()
            && sent_version.as_ref() != Some(&(p.version, p.epoch.clone()))
        {
            match push(ws, hub, conn, &p).await {
                Ok(Pushed::Withheld(message)) => {
                    // A deltaplane data plane asked to be told why; a Kong one gets nothing,
                    // as from Kong's control plane.
                    if notices {
                        let notice = crate::proto::v1::withheld_notice(&message);
                        let sent = tokio::time::timeout(
                            s.write_timeout,
                            ws.send(Message::Text(notice.into())),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            return "write stalled or failed".into();
                        }
                    }
                }
                Ok(Pushed::Sent) => {
                    sent_version = Some((p.version, p.epoch.clone()));
                    sent.push((p.reported_hash.clone(), p.version));
                    if sent.len() > 4 {
                        sent.remove(0);
                    }
                }
                Err(e) => return e,
            }
        }
        tokio::select! {
            msg = ws.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + s.idle_timeout);
                match msg {
                    Some(Ok(Message::Ping(hash))) => {
                        let Some(hash) = std::str::from_utf8(&hash).ok().filter(|h| h.len() == 32) else {
                            hub.metrics.link().refused(Refusal::Protocol);
                            close(ws, CloseCode::Policy, "invalid hash", s.write_timeout).await;
                            return "invalid hash in a ping".into();
                        };
                        // The pong is queued by the WebSocket layer and sent with the next
                        // read or write.
                        let version = sent.iter().rev().find(|(h, _)| h == hash).map(|(_, v)| *v);
                        conn.report_v1(hash, version);
                    }
                    Some(Ok(Message::Close(_))) | None => return "closed by the data plane".into(),
                    Some(Ok(other)) => {
                        hub.metrics.link().refused(Refusal::UnsupportedFrame);
                        close(ws, CloseCode::Unsupported, "invalid websocket frame", s.write_timeout).await;
                        return format!("invalid websocket frame: {}", kind(&other));
                    }
                    Some(Err(e)) => {
                        if let Some(r) = crate::net::stats::refusal_of(&e) {
                            hub.metrics.link().refused(r);
                        }
                        return format!("read: {e}");
                    }
                }
            }
            c = latest.changed() => {
                if c.is_err() { return "control plane stopping".into() }
                pending = latest.borrow_and_update().clone();
            }
            _ = &mut idle => {
                close(ws, CloseCode::Away, "no ping in time", s.write_timeout).await;
                return format!("silent for {:?}", s.idle_timeout);
            }
            _ = stopped(stop) => {
                close(ws, CloseCode::Away, "control plane shutting down", s.write_timeout).await;
                return "shutdown".into();
            }
        }
    }
}

/// Resolves once `stop` is true (without holding the watch guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn kind(m: &Message) -> &'static str {
    match m {
        Message::Text(_) => "text",
        Message::Binary(_) => "binary",
        Message::Ping(_) => "ping",
        Message::Pong(_) => "pong",
        Message::Close(_) => "close",
        Message::Frame(_) => "frame",
    }
}

/// What became of a payload.
enum Pushed {
    Sent,
    /// Not sent, for this reason (also recorded on the data plane's row).
    Withheld(String),
}

/// Sends `p` unless a compatibility check withholds it; `Err`: the connection is done.
async fn push<S>(
    ws: &mut WebSocketStream<S>,
    hub: &V1Hub,
    conn: &DpConn,
    p: &Payload,
) -> Result<Pushed, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    if let Err(message) = hub.fleet.check_plugins(conn).await {
        tracing::warn!(node_id = %conn.who.node_id, %message, "configuration withheld (sync v1)");
        return Ok(Pushed::Withheld(message));
    }
    let bytes = if conn.older {
        match hub.downgraded(p, &conn.who.kong_version).await {
            Ok(b) => b,
            Err(e) => {
                let message = format!(
                    "preparing the configuration for {}: {e:#}",
                    conn.who.kong_version
                );
                tracing::error!(node_id = %conn.who.node_id, %message);
                conn.set_error(message.clone());
                return Ok(Pushed::Withheld(message));
            }
        }
    } else {
        p.bytes.clone()
    };
    let limit = conn.frame_limit(hub.settings.max_payload);
    if bytes.len() > limit {
        let message = format!(
            "the configuration at version {} is {} bytes compressed, more than cluster_max_payload ({})",
            p.version,
            bytes.len(),
            limit
        );
        tracing::error!(node_id = %conn.who.node_id, %message);
        conn.set_error(message.clone());
        return Ok(Pushed::Withheld(message));
    }
    let len = bytes.len();
    let sent = tokio::time::timeout(
        hub.settings.write_timeout.max(Duration::from_secs(1)),
        ws.send(Message::Binary(bytes)),
    )
    .await;
    match sent {
        Ok(Ok(())) => {
            hub.metrics.v1_pushed(len);
            tracing::debug!(node_id = %conn.who.node_id, version = p.version, hash = %p.config_hash, "sync v1: pushed");
            Ok(Pushed::Sent)
        }
        Ok(Err(e)) => Err(format!("write: {e}")),
        Err(_) => Err("write stalled".into()),
    }
}

async fn close<S>(ws: &mut WebSocketStream<S>, code: CloseCode, reason: &str, timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = crate::net::peer::close_frame(code, reason);
    let _ = tokio::time::timeout(timeout, ws.close(Some(frame))).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_needs_node_id_and_version() {
        let q = V1Query::parse(Some("node_id=a&node_hostname=h&node_version=3.9.0")).unwrap();
        assert_eq!(
            q,
            V1Query {
                node_id: "a".into(),
                hostname: "h".into(),
                version: "3.9.0".into()
            }
        );
        assert_eq!(
            V1Query::parse(Some("node_id=a&node_version=3.9.0"))
                .unwrap()
                .hostname,
            "a"
        );
        assert!(
            V1Query::parse(Some("node_id=a"))
                .unwrap_err()
                .contains("node_version")
        );
        assert!(
            V1Query::parse(Some("node_version=3.9.0"))
                .unwrap_err()
                .contains("node_id")
        );
        assert!(V1Query::parse(None).is_err());
    }
}
