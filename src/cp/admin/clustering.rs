//! Kong's data-plane status endpoints on the Admin API: `GET /clustering/data-planes`
//! (paginated, Kong's row shape with a computed `ttl`) and the deprecated
//! `GET /clustering/status`. Rows are shared by every control plane on the same database.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use serde_json::{Value, json};

use crate::cp::fleet::{Fleet, health};
use crate::cp::store::DataPlaneRow;
use crate::cp::store::Store;

#[derive(Clone)]
struct ClusteringState {
    store: Store,
    fleet: Arc<Fleet>,
    purge_delay: Duration,
}

pub fn router(store: Store, fleet: Arc<Fleet>, purge_delay: Duration) -> axum::Router {
    axum::Router::new()
        .route("/clustering/data-planes", get(data_planes))
        .route("/clustering/status", get(status))
        .with_state(ClusteringState {
            store,
            fleet,
            purge_delay,
        })
}

#[derive(serde::Deserialize)]
struct PageQuery {
    size: Option<String>,
    offset: Option<String>,
}

fn kong_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "message": message }))).into_response()
}

/// Kong's `clustering_data_planes` row, plus deltaplane's own fields.
fn kong_row(r: &DataPlaneRow, head: i64, now: i64, purge_delay: Duration) -> Value {
    let labels: Value = serde_json::from_str(&r.labels).unwrap_or_else(|_| json!({}));
    let caps: Value = serde_json::from_str(&r.capabilities).unwrap_or_else(|_| json!([]));
    let ttl = (purge_delay.as_secs() as i64 - (now - r.last_seen)).max(0);
    let health = health(r, head, now);
    json!({
        "id": r.node_id,
        "ip": r.address,
        "hostname": r.hostname,
        "version": r.kong_version,
        "sync_status": r.sync_status,
        "config_hash": r.config_hash,
        "last_seen": r.last_seen,
        "updated_at": r.updated_at,
        "labels": labels,
        "cert_details": { "expiry_timestamp": r.cert_expiry },
        "rpc_capabilities": caps,
        "ttl": ttl,
        // deltaplane's additions
        "sync_protocol": r.protocol,
        "sync_version": r.version,
        "state_hash": r.state_hash,
        "connected_to": r.connected_to.as_ref().filter(|_| health != "disconnected"),
        "last_error": r.last_error,
        "health": health,
    })
}

async fn data_planes(State(s): State<ClusteringState>, Query(q): Query<PageQuery>) -> Response {
    let size = match q.size.as_deref().map(str::parse::<i64>) {
        None => 100,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return kong_error(
                StatusCode::BAD_REQUEST,
                "size must be an integer between 1 and 1000",
            );
        }
    };
    let after = match q.offset.as_deref() {
        None => None,
        Some(o) => match base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(o)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
        {
            Some(id) => Some(id),
            None => {
                return kong_error(
                    StatusCode::BAD_REQUEST,
                    &format!("'{o}' is not a valid offset: bad base64 encoding"),
                );
            }
        },
    };
    let head = match s.store.version_info().await {
        Ok(i) => i.version,
        Err(e) => return super::error_response(e),
    };
    // The shared table, with this CP's live connections overlaid.
    let all = match s.fleet.data_plane_rows().await {
        Ok(rows) => rows,
        Err(e) => return super::error_response(e),
    };
    let now = crate::node::now_secs();
    let mut page: Vec<&DataPlaneRow> = all
        .iter()
        .filter(|r| after.as_deref().is_none_or(|a| r.node_id.as_str() > a))
        .take(size as usize + 1)
        .collect();
    let more = page.len() > size as usize;
    page.truncate(size as usize);
    let data: Vec<Value> = page
        .iter()
        .map(|r| kong_row(r, head, now, s.purge_delay))
        .collect();
    let (next, offset) = match (more, page.last()) {
        (true, Some(last)) => {
            let o = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&last.node_id);
            (
                Value::String(format!("/clustering/data-planes?offset={o}&size={size}")),
                Value::String(o),
            )
        }
        _ => (Value::Null, Value::Null),
    };
    let mut body = json!({ "data": data, "next": next });
    if !offset.is_null() {
        body["offset"] = offset;
    }
    Json(body).into_response()
}

/// Kong's deprecated map form: `{node_id: {config_hash, hostname, ip, last_seen}}`.
async fn status(State(s): State<ClusteringState>) -> Response {
    let rows = match s.fleet.data_plane_rows().await {
        Ok(rows) => rows,
        Err(e) => return super::error_response(e),
    };
    let map: serde_json::Map<String, Value> = rows
        .into_iter()
        .map(|r| {
            (
                r.node_id.clone(),
                json!({
                    "config_hash": r.config_hash,
                    "hostname": r.hostname,
                    "ip": r.address,
                    "last_seen": r.last_seen,
                }),
            )
        })
        .collect();
    let mut resp = Json(Value::Object(map)).into_response();
    resp.headers_mut()
        .insert("Deprecation", HeaderValue::from_static("true"));
    resp
}
