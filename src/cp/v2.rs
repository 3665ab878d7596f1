//! Sync v2 on the control plane: after the listener's upgrade of `/v2/outlet`, the
//! `kong.meta.v1.hello`, then a symmetric JSON-RPC peer per data plane serving `get_delta`,
//! `notify_validation_error` and `get_page`.
//!
//! One fan-out task per control plane ([`fan_out`]) waits on the change-log head (a `watch`:
//! one latest-version slot and a dirty flag, so no wake-up is lost and bursts coalesce) and
//! announces each new head to every data plane: pushed deltas (`deltaplane.push.v1.deltas`,
//! one frame for all) to those that announced `deltaplane.push.v1` and hold the version
//! before, `kong.sync.v2.notify_new_version` to the others. It never waits on a data plane:
//! frames are queued without blocking, and a full queue means "notify later".

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
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
use super::metrics::{HandshakeRefusal, How};
use crate::net::hello::{self, HelloGate};
use crate::net::peer::{Handler, Peer, PeerConfig, Reply};
use crate::proto::codec::{self, Encoding};
use crate::proto::hello::{Hello, HelloResult};
use crate::proto::jsonrpc::RpcError;
use crate::proto::v2::{GET_DELTA, GET_PAGE, GetDelta, GetPage, NOTIFY_NEW_VERSION};
use crate::proto::v2::{NOTIFY_VALIDATION_ERROR, NotifyNewVersion, NotifyValidationError};
use crate::proto::v2::{PUSH_DELTAS, write_push};
use crate::proto::{CAP_DELTAPLANE_PUSH_V1, CAP_DELTAPLANE_SYNC_V1, CAP_KONG_SYNC_V2};
use crate::proto::{SyncProtocol, Version};

/// Methods the control plane serves.
const CP_METHODS: &[&str] = &[GET_DELTA, NOTIFY_VALIDATION_ERROR, GET_PAGE];

/// Runs one `/v2/outlet` connection from the hello until it closes or `stop`.
///
/// Two futures (issue 11: memory per idle DP): the setup, boxed and freed once the connection
/// runs, holds the socket, the hello and the handshake's state; the one that lives as long as
/// the connection holds only the handles it waits on. As one `async fn` the socket alone
/// (moved into the peer, but an argument's slot stays) made it some 4 KiB.
pub(super) fn session<S>(
    ws: WebSocketStream<HelloGate<S>>,
    addr: SocketAddr,
    cert_expiry: Option<i64>,
    ctx: Arc<ClusterCtx>,
    mut stop: watch::Receiver<bool>,
) -> impl Future<Output = anyhow::Result<()>> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let setup = Box::pin(set_up(ws, addr, cert_expiry, ctx.clone()));
    async move {
        let Running { closer, conn, id } = setup.await?;
        let peer = &closer.0;
        let reason = tokio::select! {
            r = peer.closed() => format!("{r:?}"),
            _ = stop.wait_for(|s| *s) => {
                peer.close(1001, "control plane shutting down");
                "shutdown".to_owned()
            }
        };
        Box::pin(ctx.fleet.unregister(id, &conn)).await;
        tracing::info!(node_id = %conn.who.node_id, peer = %addr, %reason, "data plane disconnected");
        Ok(())
    }
}

/// A connection past its setup.
struct Running {
    /// The peer, closed when the session ends however it ends.
    closer: CloseOnDrop,
    conn: Arc<DpConn>,
    /// Its key in the fleet.
    id: u64,
}

/// The hello, then the peer started on `ws` and the data plane registered in the fleet.
async fn set_up<S>(
    mut ws: WebSocketStream<HelloGate<S>>,
    addr: SocketAddr,
    cert_expiry: Option<i64>,
    ctx: Arc<ClusterCtx>,
) -> anyhow::Result<Running>
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
            CAP_DELTAPLANE_PUSH_V1.to_owned(),
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
            ctx.metrics.handshake_refused(if refused.is_some() {
                HandshakeRefusal::KongVersionIncompatible
            } else {
                HandshakeRefusal::Hello
            });
            if let Some((h, reason)) = refused {
                ctx.fleet.record_refused(&identity(&h), &reason).await;
            }
            return Err(anyhow::anyhow!("hello failed: {e}"));
        }
    };

    let mut conn = DpConn::new(identity(&hello), hello.plugins(), &ctx.kong_compat_version);
    let both = |cap: &str| {
        our_caps.iter().any(|c| c == cap) && hello.rpc_capabilities.iter().any(|c| c == cap)
    };
    conn.can_push = both(CAP_DELTAPLANE_PUSH_V1);
    conn.can_notify = both(CAP_KONG_SYNC_V2);
    let conn = Arc::new(conn);
    let handler = Arc::new(CpHandler {
        ctx: ctx.clone(),
        conn: conn.clone(),
        encoding,
    });
    // The hello (its `kong_conf` as a `serde_json::Value`, some 30 KiB with a Kong node's
    // plugin list) is dropped before the peer starts: what the session needs was copied out
    // above.
    let peer_caps = hello.rpc_capabilities.clone();
    drop(hello);
    // The WebSocket that read the hello keeps a read buffer of the hello's size (a Kong
    // node's is its whole configuration); the connection goes on under a fresh one.
    let ws = hello::fresh_after_hello(ws).await;
    let peer = Peer::start(
        ws,
        encoding,
        PeerConfig {
            stats: Some(ctx.metrics.link().clone()),
            ..ctx.settings.peer_config()
        },
        our_caps,
        peer_caps,
        handler,
    );
    conn.attach(peer.clone());
    let closer = CloseOnDrop(peer);
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
    Ok(Running { closer, conn, id })
}

/// Closes the connection when the task that owns it ends, however it ends (a connection
/// outlives its `Peer` handles otherwise).
struct CloseOnDrop(Peer);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(1001, "control plane closing the connection");
    }
}

/// Announces every new head to the connected v2 data planes, from one task for the whole
/// fleet: a deltaplane data plane that holds the version just before gets the new deltas
/// pushed (one encoded frame shared by all of them); any other gets `notify_new_version`, at
/// most once per version, and none for a version it holds or was just sent in an answer.
pub(super) async fn fan_out(ctx: Arc<ClusterCtx>, mut stop: watch::Receiver<bool>) {
    let mut head = ctx.store.subscribe();
    // The window of recent versions starts at the head this control plane starts with.
    let start = *head.borrow_and_update();
    if let Err(e) = ctx.answers.recent().catch_up(start).await {
        tracing::debug!(error = %e, "reading the change-log head failed");
    }
    loop {
        tokio::select! {
            c = head.changed() => if c.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let h = *head.borrow_and_update();
        announce(&ctx, h).await;
    }
}

/// One pushed answer, encoded for one frame encoding.
struct PushFrame {
    frame: Bytes,
    /// The version the data plane is at once it applied the push.
    to: i64,
}

/// Records, when the last clone is dropped (every frame announcing a version written, or its
/// connection gone), how long the announcement took from the head being seen.
struct Written {
    started: std::time::Instant,
    metrics: Arc<super::metrics::CpMetrics>,
    /// At least one frame was queued (an announcement to nobody is not recorded).
    queued: std::sync::atomic::AtomicBool,
}

impl Drop for Written {
    fn drop(&mut self) {
        if *self.queued.get_mut() {
            self.metrics.fan_out_written(self.started.elapsed());
        }
    }
}

async fn announce(ctx: &ClusterCtx, head: i64) {
    let started = std::time::Instant::now();
    let written = Arc::new(Written {
        started,
        metrics: ctx.metrics.clone(),
        queued: std::sync::atomic::AtomicBool::new(false),
    });
    let guard = || Some(Box::new(written.clone()) as crate::net::peer::Guard);
    let queued = || {
        written
            .queued
            .store(true, std::sync::atomic::Ordering::Relaxed)
    };
    let conns = ctx.fleet.connected();
    let notify_params = NotifyNewVersion {
        new_version: Version::new(head),
    }
    .to_params();
    // One read of the new versions for the whole fleet: the pushes below, and the get_delta
    // of every data plane notified, are answered from it. (Read with no data plane connected
    // too: the next one to connect is then answered from memory.)
    if let Err(e) = ctx.answers.recent().catch_up(head).await {
        tracing::debug!(error = %e, "reading the new versions failed; notifying only");
    }
    // Pushed frames by (the version the data planes hold, encoding).
    let mut frames: HashMap<(i64, Encoding), Option<PushFrame>> = HashMap::new();
    let (mut pushed, mut notified) = (0usize, 0usize);
    for (n, conn) in conns.iter().enumerate() {
        if n % 256 == 255 {
            // A fleet of thousands: let the connections' own tasks write meanwhile.
            tokio::task::yield_now().await;
        }
        let Some(peer) = conn.peer() else { continue };
        let at = conn.reported_or_promised();
        if at >= head {
            continue;
        }
        if conn.can_push && at > 0 && !conn.older && ctx.fleet.check_plugins(conn).await.is_ok() {
            let encoding = peer.encoding();
            let push = frames
                .entry((at, encoding))
                .or_insert_with(|| push_frame(ctx, at, encoding));
            if let Some(p) = push
                && p.frame.len() <= conn.frame_limit(ctx.settings.max_payload)
                && peer
                    .try_send_frame(PUSH_DELTAS, p.frame.clone(), guard())
                    .is_ok()
            {
                queued();
                conn.promised(p.to);
                ctx.metrics.deltas_sent(How::Pushed);
                pushed += 1;
                continue;
            }
        }
        if conn.can_notify && conn.mark_notified(head) {
            match peer.call_detached(NOTIFY_NEW_VERSION, &notify_params, guard()) {
                Ok(()) => {
                    queued();
                    ctx.metrics.notification_sent();
                    notified += 1;
                }
                Err(e) => {
                    tracing::debug!(node_id = %conn.who.node_id, error = %e, "notify_new_version not sent")
                }
            }
        }
    }
    if pushed + notified > 0 {
        tracing::debug!(
            version = head,
            pushed,
            notified,
            took = ?started.elapsed(),
            "new version announced"
        );
    }
}

/// The push for data planes at `after`, encoded once for every data plane that can take it;
/// `None` when the recent versions do not cover `after` or the answer would not fit a frame.
fn push_frame(ctx: &ClusterCtx, after: i64, encoding: Encoding) -> Option<PushFrame> {
    // As a get_delta answer to one of our data planes at the control plane's frame limit.
    let asker = Asker {
        paging: true,
        encoding: encoding.name(),
        max_payload: ctx.settings.max_payload,
    };
    let a = ctx.answers.recent_answer(after, asker)?;
    let Decision::Incremental { to, .. } = a.decision else {
        return None;
    };
    let message = write_push(Version::new(after), &a.epoch, &a.text);
    let frame = codec::try_encode(encoding, &message).ok()?;
    Some(PushFrame {
        frame: frame.into(),
        to,
    })
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

    /// A status report (`get_delta` as a notification, after each apply: Kong's DPs and
    /// ours) only records where the DP is: done on the reader, no task per report (issue 11:
    /// CPU per DP per version).
    fn notify_now(
        &self,
        _peer: &Peer,
        method: &str,
        params: &RawValue,
    ) -> Option<Result<(), RpcError>> {
        if method != GET_DELTA {
            return None;
        }
        let params: Value = match serde_json::from_str(params.get()) {
            Ok(params) => params,
            Err(e) => return Some(Err(RpcError::invalid_params().with_message(e.to_string()))),
        };
        Some(GetDelta::from_params(&params).map(|r| {
            self.conn.report_v2(r.version, r.state_hash, true);
        }))
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
                    let text = if conn.older {
                        downgrade(&ctx, &conn, &text, &["deltas"])?
                    } else {
                        text
                    };
                    Ok(held(text, slot))
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

/// An answer written by `cp::answers` (or downgraded from one), held with its slot until
/// written (see [`DpConn::large_answer_slot`]). Sent as written: it is not parsed again to
/// be checked (perf put that at 12% of the CP's CPU while paging a 100k full sync).
fn held(text: String, slot: OwnedSemaphorePermit) -> Reply {
    Reply::Held(Box::new(Reply::Text(text)), Box::new(slot))
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
    conn.report_v2(version, state_hash, notification);
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
    let held = move |text: String| Ok(held(text, slot));
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
                Decision::Incremental { to, .. } => {
                    ctx.metrics.deltas_sent(How::Fetched);
                    conn.promised(to)
                }
                Decision::Paged {
                    version,
                    full_sync: false,
                } => {
                    ctx.metrics.deltas_sent(How::Fetched);
                    conn.promised(version)
                }
                Decision::Full { version }
                | Decision::Paged {
                    version,
                    full_sync: true,
                } => {
                    ctx.metrics.full_sync_sent(SyncProtocol::V2);
                    conn.promised(version)
                }
            }
            if conn.older {
                return held(downgrade(ctx, conn, &text, &["default", "deltas"])?);
            }
            held(text)
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
