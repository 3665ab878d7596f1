//! Sync v2 on the control plane: after the listener's upgrade of `/v2/outlet`, the
//! `kong.meta.v1.hello`, then a symmetric JSON-RPC peer per data plane serving `get_delta`,
//! `notify_validation_error` and `get_page`.
//!
//! Per data plane there is one notifier task: it waits on the change-log head (a `watch`: one
//! latest-version slot and a dirty flag, so no wake-up is lost and bursts coalesce) and calls
//! `kong.sync.v2.notify_new_version` when the head is past what the data plane reported. Each
//! data plane has its own task, so a slow one never delays the others.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio_tungstenite::WebSocketStream;

use super::answers::{Asker, Decision, FeedError};
use super::compat;
use super::fleet::{DpConn, DpIdentity};
use super::listener::ClusterCtx;
use crate::net::hello;
use crate::net::peer::{Handler, Peer, Reply};
use crate::proto::codec::{self, Encoding};
use crate::proto::hello::{Hello, HelloResult};
use crate::proto::jsonrpc::RpcError;
use crate::proto::v2::{GET_DELTA, GET_PAGE, GetDelta, GetPage, NOTIFY_NEW_VERSION};
use crate::proto::v2::{NOTIFY_VALIDATION_ERROR, NotifyNewVersion, NotifyValidationError};
use crate::proto::{CAP_DELTAPLANE_SYNC_V1, CAP_KONG_SYNC_V2, SyncProtocol, Version};

/// Methods the control plane serves.
const CP_METHODS: &[&str] = &[GET_DELTA, NOTIFY_VALIDATION_ERROR, GET_PAGE];

/// Runs one `/v2/outlet` connection from the hello until it closes or `stop`.
pub(super) async fn session<S>(
    mut ws: WebSocketStream<S>,
    addr: SocketAddr,
    cert_expiry: Option<i64>,
    ctx: Arc<ClusterCtx>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = ctx.settings.handshake_timeout;
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
        if let Err(reason) = compat::kong_version_compatible(&cp_version, &h.kong_version) {
            *refused_slot.lock().expect("refused lock") = Some((h.clone(), reason.clone()));
            return Err(format!("kong_version_incompatible: {reason}"));
        }
        let enc = codec::choose(&h.rpc_frame_encodings)
            .ok_or_else(|| "unknown encodings: no common frame encoding".to_owned())?;
        Ok(HelloResult::from_control_plane(
            caps_for_hello,
            enc,
            epoch,
            cp_node,
        ))
    })
    .await;
    let identity = |h: &Hello| DpIdentity {
        protocol: SyncProtocol::V2,
        node_id: h.kong_node_id.clone(),
        hostname: h.kong_hostname.clone(),
        address: addr,
        kong_version: h.kong_version.clone(),
        labels: h.labels(),
        capabilities: h.rpc_capabilities.clone(),
        cert_expiry,
        max_payload: h.max_payload(),
    };
    let (hello, encoding) = match handshake {
        Ok(ok) => ok,
        Err(e) => {
            let refused = refused.lock().expect("refused lock").take();
            if let Some((h, reason)) = refused {
                ctx.fleet.record_refused(&identity(&h), &reason).await;
            }
            return Err(anyhow::anyhow!("hello failed: {e}"));
        }
    };

    let conn = Arc::new(DpConn::new(
        identity(&hello),
        hello.plugins(),
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
    let id = ctx.fleet.register(conn.clone()).await;
    tracing::info!(
        node_id = %conn.who.node_id,
        hostname = %conn.who.hostname,
        peer = %addr,
        kong_version = %conn.who.kong_version,
        encoding = encoding.name(),
        caps = ?conn.who.capabilities,
        "data plane connected"
    );

    let notifier = tokio::spawn(notify_loop(ctx.clone(), conn.clone(), peer.clone()));
    let reason = tokio::select! {
        r = peer.closed() => format!("{r:?}"),
        _ = stop.wait_for(|s| *s) => {
            peer.close(1001, "control plane shutting down");
            "shutdown".to_owned()
        }
    };
    notifier.abort();
    ctx.fleet.unregister(id, &conn).await;
    tracing::info!(node_id = %conn.who.node_id, peer = %addr, %reason, "data plane disconnected");
    Ok(())
}

/// Closes the connection when the task that owns it ends, however it ends (a connection
/// outlives its `Peer` handles otherwise).
struct CloseOnDrop(Peer);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(1001, "control plane closing the connection");
    }
}

/// Calls `notify_new_version` whenever the head moves past what the data plane reported.
async fn notify_loop(ctx: Arc<ClusterCtx>, conn: Arc<DpConn>, peer: Peer) {
    if !conn.who.capabilities.iter().any(|c| c == CAP_KONG_SYNC_V2) {
        return;
    }
    let mut head = ctx.store.subscribe();
    let mut reported = conn.watch_reported();
    // Wait for the data plane's first get_delta: it pulls on connect anyway.
    if reported.wait_for(|v| *v >= 0).await.is_err() {
        return;
    }
    loop {
        let h = *head.borrow_and_update();
        let r = *reported.borrow_and_update();
        if h > r {
            let params = NotifyNewVersion {
                new_version: Version::new(h),
            }
            .to_params();
            if let Err(e) = peer.call(NOTIFY_NEW_VERSION, params).await {
                tracing::debug!(node_id = %conn.who.node_id, error = %e, "notify_new_version failed");
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
                GET_DELTA => get_delta(&ctx, &conn, &peer, encoding, &params, notification).await,
                NOTIFY_VALIDATION_ERROR => {
                    let report = NotifyValidationError::from_params(&params)?;
                    tracing::warn!(node_id = %conn.who.node_id, version = ?report.version, error = %report.message, "data plane rejected deltas");
                    conn.set_error(report.message);
                    Ok(Reply::Value(Value::Bool(true)))
                }
                GET_PAGE => {
                    let p = GetPage::from_params(&params)?;
                    // Pages are as large as answers: the same one-at-a-time slot.
                    let slot = conn.large_answer_slot().await;
                    let text = ctx
                        .answers
                        .page(&p.id, p.page as usize)
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

/// Removes the fields an older data plane does not know from the deltas at `path`.
fn downgrade(
    ctx: &ClusterCtx,
    conn: &DpConn,
    text: &str,
    path: &[&str],
) -> Result<String, RpcError> {
    let (text, removed) =
        compat::strip_answer(ctx.store.registry(), text, path, &conn.who.kong_version)
            .map_err(|e| RpcError::internal_error().with_message(e.to_string()))?;
    if !removed.is_empty() {
        tracing::info!(node_id = %conn.who.node_id, kong_version = %conn.who.kong_version, fields = ?removed, "removed fields the data plane does not know");
    }
    Ok(text)
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
    params: &Value,
    notification: bool,
) -> Result<Reply, RpcError> {
    let GetDelta {
        version,
        state_hash,
    } = GetDelta::from_params(params)?;
    conn.report_v2(version, state_hash);
    if notification {
        // A status report (Kong sends get_delta as a notification after applying): record
        // it, build nothing — the answer would be thrown away.
        return Ok(Reply::Value(Value::Bool(true)));
    }
    if let Err(message) = ctx.fleet.check_plugins(conn).await {
        // Withhold the configuration rather than send what the DP cannot run; it is sent
        // once the configuration or the DP changes (the notifier announces every new head,
        // and a deltaplane DP asks again on it: `proto::is_withheld`).
        tracing::warn!(node_id = %conn.who.node_id, %message, "configuration withheld");
        return Err(RpcError::server_error().with_message(message));
    }
    // The data plane's own limit counts too: a frame above it would make it close the
    // connection (1009) and download the same answer again after reconnecting.
    let max = conn.frame_limit(ctx.settings.max_payload);
    let asker = Asker {
        paging: peer.peer_caps().iter().any(|c| c == CAP_DELTAPLANE_SYNC_V1),
        encoding: encoding.name(),
        max_payload: max,
    };
    let slot = conn.large_answer_slot().await;
    let held = move |reply: Result<Reply, RpcError>| held(reply, slot);
    let fits = move |bytes: &[u8]| codec::encode(encoding, bytes).len() + 64 <= max;
    match ctx
        .answers
        .get_delta(version.map(Version::get), asker, &fits)
        .await
    {
        Ok((text, decision)) => {
            tracing::debug!(node_id = %conn.who.node_id, ?decision, bytes = text.len(), "get_delta");
            // The DP will be at this version once it applies the answer: no need to notify it
            // of that version (it reports where it really is after applying).
            match decision {
                Decision::UpToDate => {}
                Decision::Incremental { to, .. } => conn.promised(to),
                Decision::Full { version } | Decision::Paged { version, .. } => {
                    conn.promised(version)
                }
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
            tracing::error!(node_id = %conn.who.node_id, error = %e, "get_delta refused");
            if matches!(e, FeedError::TooLarge { .. }) {
                // Withheld on both sides: the data plane gets the error, its row says why.
                conn.set_error(e.to_string());
            }
            Err(RpcError::server_error().with_message(e.to_string()))
        }
    }
}
