//! The control plane's cluster listener: TLS (mTLS), then the WebSocket upgrade, which routes
//! `/v2/outlet` (subprotocol `kong.meta.v1`) to the v2 session (`cp::v2`) and `/v1/outlet`
//! (Kong's full-config push) to `cp::v1`. Anything else is refused during the upgrade.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use super::answers::{Feed, FeedLimits};
use super::fleet::Fleet;
use super::metrics::{CpMetrics, HandshakeRefusal};
use super::v1::{V1Hub, V1Query};
use crate::cp::store::Store;
use crate::net::tls::ClusterTls;
use crate::proto::hello::{SUBPROTOCOL, V2_PATH};
use crate::settings::ClusterSettings;

/// What the cluster listener shares across connections.
pub struct ClusterCtx {
    pub store: Store,
    /// Builds `get_delta` answers and pages.
    pub answers: Feed,
    pub fleet: Arc<Fleet>,
    /// Sync v1 (`/v1/outlet`): the shared per-version payload and the push loop's state.
    pub v1: Arc<V1Hub>,
    pub node_id: String,
    pub kong_compat_version: String,
    pub settings: ClusterSettings,
    /// `/metrics`: counters of what the sessions do.
    pub metrics: Arc<CpMetrics>,
    /// Spaces out TLS handshakes (`--cluster-handshake-rate`).
    pacer: Pacer,
}

/// Admits new connections at a bounded rate: each takes the next free slot, `1/rate` after
/// the previous one. A reconnecting fleet then costs the connected data planes a bounded
/// share of the CPU, and the handshakes that do run finish within their timeout instead of
/// all of them crawling together.
struct Pacer {
    interval: Option<Duration>,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    fn new(rate: u32) -> Pacer {
        Pacer {
            interval: (rate > 0).then(|| Duration::from_secs(1) / rate),
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// The time to start the next handshake, or `None` when the queue is longer than
    /// `longest` (the connection is refused; the data plane retries after its back-off).
    fn admit(&self, longest: Duration) -> Option<tokio::time::Instant> {
        let Some(interval) = self.interval else {
            return Some(tokio::time::Instant::now());
        };
        let now = tokio::time::Instant::now();
        let mut next = self.next.lock().expect("pacer lock");
        let at = (*next).max(now);
        if at - now > longest {
            return None;
        }
        *next = at + interval;
        Some(at)
    }
}

impl ClusterCtx {
    pub fn new(
        store: Store,
        node_id: String,
        kong_compat_version: String,
        settings: ClusterSettings,
    ) -> Arc<ClusterCtx> {
        let answers = Feed::new(
            store.clone(),
            FeedLimits {
                // Leave room for the JSON-RPC envelope; JSON compresses, so an uncompressed
                // answer this size always fits a frame once encoded.
                frame_bytes: settings.max_payload.saturating_sub(1024).max(1024),
                max_decompressed: settings.max_decompressed(),
                max_versions: 10_000,
                recent_bytes: settings.delta_cache_bytes,
            },
        );
        let fleet = Arc::new(Fleet::new(
            store.clone(),
            node_id.clone(),
            kong_compat_version.clone(),
        ));
        let metrics = Arc::new(CpMetrics::new(node_id.clone(), kong_compat_version.clone()));
        let v1 = Arc::new(V1Hub::new(
            store.clone(),
            fleet.clone(),
            kong_compat_version.clone(),
            settings.clone(),
            metrics.clone(),
        ));
        Arc::new(ClusterCtx {
            store,
            answers,
            fleet,
            v1,
            node_id,
            kong_compat_version,
            pacer: Pacer::new(settings.handshake_rate),
            settings,
            metrics,
        })
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
    let flusher = tokio::spawn(ctx.fleet.clone().flush_status(shutdown.clone()));
    let pusher = tokio::spawn(ctx.v1.clone().push_loop(shutdown.clone()));
    let fan_out = tokio::spawn(super::v2::fan_out(ctx.clone(), shutdown.clone()));
    let mut expiry = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = expiry.tick() => ctx.answers.expire_idle(Duration::from_secs(30)),
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
    let _ = fan_out.await;
}

#[allow(clippy::result_large_err)] // tungstenite's upgrade callback returns a whole response
async fn connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    tls: ClusterTls,
    ctx: Arc<ClusterCtx>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let timeout = ctx.settings.handshake_timeout;
    let refused = |why| ctx.metrics.handshake_refused(why);
    // Half the handshake timeout queued at most: the handshake itself needs the rest.
    let Some(at) = ctx.pacer.admit(timeout / 2) else {
        refused(HandshakeRefusal::RateLimited);
        anyhow::bail!("too many connections at once (--cluster-handshake-rate); refused");
    };
    tokio::time::sleep_until(at).await;
    // The TLS and WebSocket handshakes are boxed: their state is needed only while they
    // run, and this future lives as long as the connection (issue 11: memory per idle
    // connection).
    let (tls, identity) = tokio::time::timeout(timeout, Box::pin(tls.accept(tcp)))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))
        .and_then(|r| r.map_err(|e| anyhow::anyhow!("TLS handshake refused: {e}")))
        .inspect_err(|_| refused(HandshakeRefusal::Tls))?;
    let cert_expiry = Some(identity.not_after);
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
    let ws = tokio::time::timeout(
        timeout,
        Box::pin(tokio_tungstenite::accept_hdr_async_with_config(
            crate::net::hello::HelloGate::new(tls),
            callback,
            Some(ws_config),
        )),
    )
    .await
    .map_err(|_| anyhow::anyhow!("WebSocket handshake timed out"))
    .and_then(|r| r.map_err(|e| anyhow::anyhow!("WebSocket handshake failed: {e}")))
    .inspect_err(|_| refused(HandshakeRefusal::Upgrade))?;
    // Boxed so this task holds only the session it runs: the two are inlined otherwise, and
    // the task of every connection is as large as the larger of them.
    match route.into_inner().expect("route lock") {
        Some(Route::V1(query)) => {
            Box::pin(super::v1::serve(
                ws,
                addr,
                cert_expiry,
                query,
                ctx.v1.clone(),
                stop,
            ))
            .await
        }
        Some(Route::V2) => Box::pin(super::v2::session(ws, addr, cert_expiry, ctx, stop)).await,
        None => anyhow::bail!("the upgrade succeeded without a route"),
    }
}

/// Where an upgrade goes.
enum Route {
    /// `/v2/outlet`: hello, then JSON-RPC.
    V2,
    /// `/v1/outlet` with its query arguments.
    V1(V1Query),
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
        return V1Query::parse(req.uri().query())
            .map(Route::V1)
            .map_err(|msg| reject(http::StatusCode::BAD_REQUEST, &msg));
    }
    if req.uri().path() != V2_PATH || !settings.rpc {
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
