//! The data plane's status listener: `GET /status`, `GET /status/ready`, `GET /metrics`
//! (`dp::metrics`), and operator JSON-RPC at `/rpc`; and `deltaplane-dp status`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use jsonrpsee::RpcModule;
use serde_json::Value;

use super::DpShared;
use super::config::StatusArgs;
use crate::net::operator;

/// The status listener's routes.
pub fn router(
    shared: Arc<DpShared>,
) -> anyhow::Result<(axum::Router, jsonrpsee::server::ServerHandle)> {
    let mut module = RpcModule::from_arc(shared.clone());
    module.register_method("deltaplane.sync_version", |_params, dp: &DpShared, _| {
        Ok::<_, operator::ErrorObjectOwned>(dp.sync_version())
    })?;
    operator::register_watch(
        &mut module,
        |dp: &DpShared| dp.subscribe(),
        |dp: Arc<DpShared>, _v| async move {
            let s = dp.store.state();
            Some(serde_json::json!({
                "version": s.version,
                "version_string": crate::proto::version_string(s.version),
                "state_hash": s.state_hash.to_hex(),
            }))
        },
    )?;
    let (rpc_router, handle) = operator::router(module);
    let app = axum::Router::new()
        .route("/status", get(status))
        .route("/status/ready", get(ready))
        .route("/metrics", get(super::metrics::metrics))
        .with_state(shared)
        .merge(rpc_router);
    Ok((app, handle))
}

async fn status(State(dp): State<Arc<DpShared>>) -> Json<Value> {
    Json(dp.status_json())
}

/// Ready once a configuration is applied and, with the proxy on, served by it (Kong's
/// `/status/ready` waits for the router and plugins to be built: `kong/api/routes/health.lua`).
async fn ready(State(dp): State<Arc<DpShared>>) -> impl IntoResponse {
    let s = dp.store.state();
    let serving = dp.proxy().map(|p| p.status().serving_version);
    if serving.is_some_and(|v| v == 0) && s.version > 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "message": "the proxy is not serving a configuration yet" })),
        );
    }
    if s.version > 0 {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "message": "ready", "version": s.version })),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "message": "no configuration received yet" })),
        )
    }
}

/// `deltaplane-dp status`.
pub async fn print(args: &StatusArgs) -> anyhow::Result<()> {
    let v = operator::call(&args.rpc, None, "deltaplane.sync_version", None).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "data plane: version {} ({}), protocol {}",
        v["version"],
        v["version_string"].as_str().unwrap_or("?"),
        v["protocol"].as_str().unwrap_or("?")
    );
    println!("state hash: {}", v["state_hash"].as_str().unwrap_or("?"));
    println!(
        "control plane: {} (last version seen {}), {}",
        if v["connected"].as_bool() == Some(true) {
            "connected"
        } else {
            "not connected"
        },
        v["cp_version_seen"],
        if v["in_sync"].as_bool() == Some(true) {
            "in sync"
        } else {
            "not in sync"
        }
    );
    match v["proxy_serving_version"].as_i64() {
        None => println!("proxy: off"),
        Some(p) => println!(
            "proxy: serving version {p}{}",
            if Some(p) == v["version"].as_i64() {
                " (the stored one)".to_owned()
            } else {
                format!(" (stored: {})", v["version"])
            }
        ),
    }
    if let Some(r) = v["proxy_refused"].as_str() {
        println!("proxy refused: {r}");
    }
    if let Some(e) = v["last_error"].as_str() {
        println!("last error: {e}");
    }
    Ok(())
}
