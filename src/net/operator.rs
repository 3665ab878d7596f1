//! Operator JSON-RPC (`/rpc`, HTTP POST and WebSocket) on the CP's admin listener and the DP's
//! status listener, served by jsonrpsee; and the small client the `status` commands use.
//!
//! Methods (both planes unless noted): `deltaplane.sync_version`, `deltaplane.data_planes`
//! (CP), and the subscription `deltaplane.watch_version` / `deltaplane.unwatch_version`, whose
//! notifications are `deltaplane.version`.

use std::time::Duration;

use axum::response::IntoResponse;
use jsonrpsee::server::{Server, ServerConfig, StopHandle, TowerServiceBuilder};
use jsonrpsee::{Methods, RpcModule};
use serde_json::Value;
use tokio::sync::watch;

pub use jsonrpsee::types::ErrorObjectOwned;

pub const WATCH_METHOD: &str = "deltaplane.watch_version";
pub const UNWATCH_METHOD: &str = "deltaplane.unwatch_version";
pub const VERSION_NOTIFICATION: &str = "deltaplane.version";

/// Mounts `methods` at `/rpc` (POST and WebSocket upgrade). The returned stop handle's
/// sender must be kept alive for as long as the router serves; dropping or sending on it
/// closes open WebSocket sessions.
pub fn router(methods: impl Into<Methods>) -> (axum::Router, jsonrpsee::server::ServerHandle) {
    let methods: Methods = methods.into();
    let (stop, handle) = jsonrpsee::server::stop_channel();
    let builder: TowerServiceBuilder<_, _> = Server::builder()
        .set_config(
            ServerConfig::builder()
                .max_connections(1024)
                .max_request_body_size(1024 * 1024)
                .max_response_body_size(64 * 1024 * 1024)
                .build(),
        )
        .to_service_builder();
    let svc = tower::service_fn(move |req: axum::extract::Request| {
        // One jsonrpsee service per request: a WebSocket upgrade is one connection with its
        // own connection id (subscriptions are keyed by it).
        let mut rpc = builder
            .clone()
            .build(methods.clone(), StopHandle::clone(&stop));
        async move {
            use tower::Service as _;
            Ok::<_, std::convert::Infallible>(match rpc.call(req).await {
                Ok(resp) => resp.into_response(),
                Err(e) => (
                    axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                    format!("rpc error: {e}"),
                )
                    .into_response(),
            })
        }
    });
    (axum::Router::new().route_service("/rpc", svc), handle)
}

/// Registers `deltaplane.watch_version`: pushes `current()` whenever `versions` moves (the
/// latest is always delivered; intermediate ones may be skipped under bursts).
pub fn register_watch<C, F, Fut>(
    module: &mut RpcModule<C>,
    versions: impl Fn(&C) -> watch::Receiver<i64> + Send + Sync + Clone + 'static,
    current: F,
) -> anyhow::Result<()>
where
    C: Send + Sync + 'static,
    F: Fn(std::sync::Arc<C>, i64) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Option<Value>> + Send + 'static,
{
    module.register_subscription(
        WATCH_METHOD,
        VERSION_NOTIFICATION,
        UNWATCH_METHOD,
        move |_params, pending, ctx, _ext| {
            let versions = versions.clone();
            let current = current.clone();
            async move {
                let mut rx = versions(&ctx);
                let sink = pending.accept().await?;
                let mut sent = i64::MIN;
                loop {
                    let v = *rx.borrow_and_update();
                    if v != sent {
                        if let Some(msg) = current(ctx.clone(), v).await {
                            let raw = serde_json::value::to_raw_value(&msg)?;
                            if sink.send(raw).await.is_err() {
                                return Ok(());
                            }
                        }
                        sent = v;
                    }
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { return Ok(()) },
                        _ = sink.closed() => return Ok(()),
                    }
                }
            }
        },
    )?;
    Ok(())
}

/// A JSON-RPC error with code -32000 (server error) and `message`.
pub fn server_error(message: impl std::fmt::Display) -> ErrorObjectOwned {
    ErrorObjectOwned::owned(-32000, message.to_string(), None::<()>)
}

/// Calls `method` at the `/rpc` endpoint `url` (http://…) with optional bearer token.
pub async fn call(
    url: &str,
    token: Option<&str>,
    method: &str,
    params: Option<Value>,
) -> anyhow::Result<Value> {
    use jsonrpsee::core::client::ClientT as _;
    let mut headers = axum::http::HeaderMap::new();
    if let Some(t) = token {
        headers.insert(
            axum::http::header::AUTHORIZATION,
            format!("Bearer {t}")
                .parse()
                .map_err(|_| anyhow::anyhow!("the token is not a valid header value"))?,
        );
    }
    let client = jsonrpsee_http_client::HttpClient::builder()
        .request_timeout(Duration::from_secs(10))
        .set_headers(headers)
        .build(url)
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
    let mut p = jsonrpsee::core::params::ArrayParams::new();
    if let Some(v) = params {
        p.insert(v)?;
    }
    client
        .request::<Value, _>(method, p)
        .await
        .map_err(|e| anyhow::anyhow!("{method} at {url}: {e}"))
}
