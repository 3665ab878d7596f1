//! The data plane's status listener: `GET /status`, `GET /status/ready`, `GET /metrics`
//! (`dp::metrics`), and operator JSON-RPC at `/rpc`; `POST /config` for a data plane running
//! from a file with `--config-token`; and `deltaplane-dp status`.

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
    let mut app = axum::Router::new()
        .route("/status", get(status))
        .route("/status/ready", get(ready))
        .route("/metrics", get(super::metrics::metrics));
    // Only with a token: the status listener also serves /metrics to remote scrapers, so
    // without one there is no way to change the configuration through it.
    if let Some(fm) = shared.file()
        && fm.token().is_some()
    {
        app = app.route("/config", axum::routing::post(post_config).get(get_config));
    }
    let app = app.with_state(shared).merge(rpc_router);
    Ok((app, handle))
}

async fn status(State(dp): State<Arc<DpShared>>) -> Json<Value> {
    Json(dp.status_json())
}

/// Ready once a configuration is applied and, with the proxy on, served by it (Kong's
/// `/status/ready` waits for the router and plugins to be built: `kong/api/routes/health.lua`).
/// A data plane running from a file is ready once it holds a configuration applied from a
/// file (a store a control plane filled is not one).
async fn ready(State(dp): State<Arc<DpShared>>) -> impl IntoResponse {
    let s = dp.store.state();
    if dp.file().is_some() && s.epoch.as_deref() != Some(super::file::FILE_EPOCH) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "message": "no declarative configuration applied yet" })),
        );
    }
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
    if v["source"].as_str() == Some("file") {
        println!(
            "source: declarative file, {}",
            if v["in_sync"].as_bool() == Some(true) {
                "applied"
            } else {
                "not applied (see last error)"
            }
        );
    } else {
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
    }
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

/// `POST /config`, as Kong's DB-less `/config` (`kong/api/routes/config.lua`): the body is
/// the configuration (YAML or JSON), or a JSON object, form or multipart body whose `config`
/// field holds it; `flatten_errors` and `check_hash` come from the query or that body. 201
/// with the entities by type and id when applied (or unchanged), 304 under `check_hash=1`
/// when nothing would change, 400 with Kong's code 14 body when invalid (the configuration
/// served stays), 401 without the bearer token, 413 past `--config-max-body`.
///
/// The posted configuration is applied to the store, never written to the file: a SIGHUP or
/// a restart reads the file again and replaces it, as Kong DB-less does.
async fn post_config(
    State(dp): State<Arc<DpShared>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let fm = match guard(&dp, request.headers()) {
        Ok(fm) => fm,
        Err(refused) => return refused.into_response(),
    };
    let (parts, body) = request.into_parts();
    let too_large = || {
        message(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!(
                "the configuration is larger than {} bytes (--config-max-body)",
                fm.max_body()
            ),
        )
    };
    let declared = parts
        .headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > fm.max_body() as u64) {
        return too_large();
    }
    let bytes = match axum::body::to_bytes(body, fm.max_body()).await {
        Ok(b) => b,
        Err(e) => {
            let limited = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if limited {
                return too_large();
            }
            return message(
                StatusCode::BAD_REQUEST,
                &format!("reading the request body: {e}"),
            );
        }
    };
    let query: Vec<(String, String)> =
        form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let content_type = parts
        .headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let posted = match PostedConfig::read(&content_type, bytes, query).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let shared = dp.clone();
    let check_hash = posted.check_hash;
    let flatten = posted.flatten_errors;
    let loaded =
        tokio::task::spawn_blocking(move || super::file::load_posted(&shared, &posted.text)).await;
    match loaded {
        Ok(Ok(l)) if check_hash && !l.changed => StatusCode::NOT_MODIFIED.into_response(),
        Ok(Ok(l)) => {
            let mut resp = (
                StatusCode::CREATED,
                Json(l.entities.unwrap_or_else(|| serde_json::json!({}))),
            )
                .into_response();
            if let Ok(v) = axum::http::HeaderValue::from_str(&l.version.to_string()) {
                resp.headers_mut().insert("x-deltaplane-version", v);
            }
            resp
        }
        Ok(Err(e)) => match e.kong_body(flatten) {
            Some(body) => (StatusCode::BAD_REQUEST, Json(body)).into_response(),
            None => {
                // Logged with the cause by the load; the client learns only that it failed.
                message(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "An unexpected error occurred",
                )
            }
        },
        Err(e) => {
            tracing::error!(error = %e, "POST /config: the load task failed");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            )
        }
    }
}

/// `GET /config`, as Kong's DB-less one: `{"config": "<YAML>"}`, the served configuration
/// in Kong's `db_export` shape (`declarative::write`). Behind the same token as `POST`.
async fn get_config(
    State(dp): State<Arc<DpShared>>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    if let Err(refused) = guard(&dp, &headers) {
        return refused.into_response();
    }
    let shared = dp.clone();
    match tokio::task::spawn_blocking(move || super::file::export(&shared)).await {
        Ok(Ok(yaml)) => {
            (StatusCode::OK, Json(serde_json::json!({ "config": yaml }))).into_response()
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "GET /config: reading the store failed");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            )
        }
        Err(e) => {
            tracing::error!(error = %e, "GET /config: the export task failed");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            )
        }
    }
}

/// The file mode, when the request carries its `--config-token` as a bearer token.
fn guard(
    dp: &DpShared,
    headers: &axum::http::HeaderMap,
) -> Result<Arc<super::file::FileMode>, Refused> {
    let fm = dp.file().cloned().ok_or(Refused::NotFound)?;
    let token = fm.token().ok_or(Refused::NotFound)?;
    let authorized = headers
        .get_all(axum::http::header::AUTHORIZATION)
        .iter()
        .filter_map(|v| v.to_str().ok()?.strip_prefix("Bearer "))
        .any(|given| crate::net::constant_time_eq(given.as_bytes(), token.as_bytes()));
    if !authorized {
        return Err(Refused::Unauthorized);
    }
    Ok(fm)
}

/// Why [`guard`] refused a `/config` request.
enum Refused {
    /// Not in file mode, or no token configured: the endpoint does not exist.
    NotFound,
    /// A missing or wrong token.
    Unauthorized,
}

impl IntoResponse for Refused {
    fn into_response(self) -> axum::response::Response {
        match self {
            Refused::NotFound => message(StatusCode::NOT_FOUND, "Not found"),
            Refused::Unauthorized => {
                let mut resp = message(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized: /config requires the data plane's --config-token, sent as \
                     'Authorization: Bearer <token>'",
                );
                resp.headers_mut().insert(
                    axum::http::header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer"),
                );
                resp
            }
        }
    }
}

/// What a `POST /config` carries.
struct PostedConfig {
    text: Vec<u8>,
    flatten_errors: bool,
    check_hash: bool,
}

impl PostedConfig {
    /// Reads the body as Kong's `hydrate_config_from_request` and `parse_config_post_opts`
    /// do: the parameters from the query and the body, the configuration from the body's
    /// `config` field, else the whole body (a JSON body with `_format_version` is the
    /// configuration itself).
    async fn read(
        content_type: &str,
        bytes: axum::body::Bytes,
        mut params: Vec<(String, String)>,
    ) -> Result<PostedConfig, axum::response::Response> {
        let mime = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let mut text: Option<Vec<u8>> = None;
        if mime == "application/x-www-form-urlencoded" {
            for (k, v) in form_urlencoded::parse(&bytes).into_owned() {
                if k == "config" {
                    text = Some(v.into_bytes());
                } else {
                    params.push((k, v));
                }
            }
        } else if mime == "multipart/form-data" {
            let boundary = multer::parse_boundary(content_type)
                .map_err(|e| message(StatusCode::BAD_REQUEST, &format!("multipart body: {e}")))?;
            let stream = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
            let mut multipart = multer::Multipart::new(stream, boundary);
            loop {
                let field = multipart.next_field().await.map_err(|e| {
                    message(StatusCode::BAD_REQUEST, &format!("multipart body: {e}"))
                })?;
                let Some(field) = field else { break };
                let name = field.name().unwrap_or("").to_owned();
                let value = field.bytes().await.map_err(|e| {
                    message(StatusCode::BAD_REQUEST, &format!("multipart body: {e}"))
                })?;
                if name == "config" {
                    text = Some(value.to_vec());
                } else {
                    params.push((name, String::from_utf8_lossy(&value).into_owned()));
                }
            }
        } else {
            // JSON with a `config` field (a string, or the configuration as an object), or
            // the configuration itself, YAML or JSON.
            if let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&bytes)
                && !m.contains_key("_format_version")
            {
                for key in ["flatten_errors", "check_hash"] {
                    if let Some(v) = m.remove(key) {
                        let v = match v {
                            Value::String(s) => s,
                            other => other.to_string(),
                        };
                        params.push((key.to_owned(), v));
                    }
                }
                match m.remove("config") {
                    Some(Value::String(s)) => text = Some(s.into_bytes()),
                    Some(v @ Value::Object(_)) => text = Some(v.to_string().into_bytes()),
                    Some(_) => {
                        return Err(message(
                            StatusCode::BAD_REQUEST,
                            "'config' must be the configuration's text or object",
                        ));
                    }
                    None => {}
                }
            }
            if text.is_none() {
                text = Some(bytes.to_vec());
            }
        }
        let text = text.unwrap_or_default();
        if text.iter().all(u8::is_ascii_whitespace) {
            // Kong's answer to a body without a configuration.
            return Err(message(
                StatusCode::BAD_REQUEST,
                "expected a declarative configuration",
            ));
        }
        let param = |name: &str| params.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
        Ok(PostedConfig {
            text,
            // Kong's `truthy`.
            flatten_errors: param("flatten_errors").is_some_and(|v| {
                matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "on" | "yes")
            }),
            // Kong compares `tostring(check_hash) == "1"`.
            check_hash: param("check_hash").is_some_and(|v| v == "1"),
        })
    }
}

fn message(status: StatusCode, msg: &str) -> axum::response::Response {
    (status, Json(serde_json::json!({ "message": msg }))).into_response()
}
