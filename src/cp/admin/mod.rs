//! The Admin API: Kong's paths, JSON shapes, errors and pagination, generic over the schema.
//!
//! Routing beyond `/` and `/status` is done here from the path segments, because every
//! collection, nested collection and many-to-one path is derived from `schema/`:
//! `/{collection}`, `/{collection}/{key}`, `/{parent}/{key}/{children}`,
//! `/{parent}/{key}/{children}/{child_key}` and `/{child}/{key}/{foreign_field}`.

// Early responses travel as `Err(Response)`; they are built at most once per request.
#![allow(clippy::result_large_err)]

pub mod clustering;
pub mod config;
mod schemas;
mod tags;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use super::writer::Writer;
use crate::cp::store::{
    ListQuery, Op, Scope, Store, StoreError, TagFilter, UnresolvedForeignKey, kong_pretty,
};
use crate::schema::{EntitySchema, FieldType, Registry, form};

/// What the Admin API handlers share.
pub struct AdminState {
    pub store: Store,
    pub writer: Writer,
    pub node: NodeInfo,
    pub admin_token: Option<String>,
    pub body_limit: usize,
    /// Largest `POST /config` body.
    pub config_body_limit: usize,
    pub requests: AtomicU64,
    /// The plugins this control plane accepts (`--plugins`).
    pub enabled_plugins: Arc<std::collections::BTreeSet<String>>,
    /// Stored entities that did not validate under this release's schemas at start.
    pub invalid_in_store: Arc<Vec<crate::cp::store::Invalid>>,
}

/// Static facts about this node, for `GET /`.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node_id: String,
    pub hostname: String,
    pub kong_compat_version: String,
}

/// The Admin API router. `extra` is merged in (the sync issue's `/rpc` lives there).
pub fn router(state: Arc<AdminState>, extra: Router) -> Router {
    Router::new()
        .route("/", get(root))
        .route("/status", get(status))
        .route("/config", get(config::get).post(config::post))
        .route("/plugins/enabled", get(enabled_plugins))
        .route("/endpoints", get(endpoints))
        .route("/tags", get(tags::all))
        .route("/tags/{tag}", get(tags::by_tag))
        .route("/schemas/{name}", get(schemas::entity))
        .route("/schemas/{name}/validate", post(schemas::validate_entity))
        .route("/schemas/plugins/{name}", get(schemas::plugin))
        .route("/schemas/plugins/validate", post(schemas::validate_plugin))
        .fallback(dispatch)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .merge(extra)
        .layer(axum::middleware::from_fn_with_state(state, guard))
}

/// The header decK and Kong's clients send an Admin API token in (`--headers
/// 'Kong-Admin-Token:…'`), accepted beside `Authorization: Bearer`.
const KONG_ADMIN_TOKEN: &str = "kong-admin-token";

/// The Admin API's fixed paths, in Kong's notation (`{param}`), for `GET /endpoints`; the
/// entity paths are derived from the registry (`entity_paths`). `/clustering/*` is served by
/// `clustering::router` and `/metrics` by `cp::metrics::router`, merged in by the caller.
const FIXED_PATHS: &[&str] = &[
    "/",
    "/status",
    "/endpoints",
    "/config",
    "/tags",
    "/tags/{tags}",
    "/schemas/{name}",
    "/schemas/{db_entity_name}/validate",
    "/schemas/plugins/{name}",
    "/schemas/plugins/validate",
    "/clustering/data-planes",
    "/clustering/status",
    "/metrics",
];

/// Every path `dispatch` serves for the registry's entity types, as Kong's
/// `generate_endpoints` (`kong/api/endpoints.lua`) names them: `/{collection}`,
/// `/{collection}/{entity}`, and for each foreign key the many-to-one path, the nested
/// collection and the nested entity. Workspaces have none (open-source Kong).
fn entity_paths(registry: &Registry) -> Vec<String> {
    let mut paths = Vec::new();
    for schema in registry.entities() {
        if schema.name == crate::schema::WORKSPACES {
            continue;
        }
        let collection = format!("/{}", schema.admin_api_name);
        paths.push(collection.clone());
        paths.push(format!("{collection}/{{{}}}", schema.name));
        for fk in registry
            .references_of(&schema.name)
            .filter(|fk| !fk.is_array)
        {
            let Some(parent) = registry.get(&fk.parent) else {
                continue;
            };
            if parent.name == crate::schema::WORKSPACES {
                continue;
            }
            let nested = schema
                .admin_api_nested_name
                .as_deref()
                .unwrap_or(&schema.admin_api_name);
            paths.push(format!("{collection}/{{{}}}/{}", schema.name, fk.field));
            let under = format!("/{}/{{{}}}/{nested}", parent.admin_api_name, parent.name);
            paths.push(format!("{under}/{{{}}}", schema.name));
            paths.push(under);
        }
    }
    paths
}

/// `GET /endpoints` (`kong/api/routes/kong.lua`): every path, sorted segment by segment.
async fn endpoints(State(state): State<Arc<AdminState>>) -> Response {
    let mut paths: Vec<String> = FIXED_PATHS.iter().map(|p| (*p).to_owned()).collect();
    paths.extend(entity_paths(state.store.registry()));
    // Kong sorts with `/` as the lowest character, so `/a/z` comes before `/ab`.
    paths.sort_by_cached_key(|p| p.replace('/', "\0"));
    paths.dedup();
    Json(json!({ "data": paths })).into_response()
}

/// Counts requests and checks the admin token when one is configured: either
/// `Authorization: Bearer <token>` or `Kong-Admin-Token: <token>` must carry it.
async fn guard(
    State(state): State<Arc<AdminState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    if let Some(token) = &state.admin_token {
        let headers = req.headers();
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok()?.strip_prefix("Bearer "));
        let kong = headers
            .get_all(KONG_ADMIN_TOKEN)
            .iter()
            .filter_map(|v| v.to_str().ok());
        let mut given = bearer.chain(kong);
        if !given.any(|g| crate::net::constant_time_eq(g.as_bytes(), token.as_bytes())) {
            let mut resp = message(
                StatusCode::UNAUTHORIZED,
                "Unauthorized: this Admin API requires its admin token, sent as \
                 'Authorization: Bearer <token>' or 'Kong-Admin-Token: <token>'",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}

pub fn message(status: StatusCode, msg: &str) -> Response {
    (status, Json(json!({ "message": msg }))).into_response()
}

async fn method_not_allowed() -> Response {
    message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
}

async fn root(State(state): State<Arc<AdminState>>) -> Response {
    let backend = match state.store.backend() {
        crate::cp::store::Backend::Sqlite => "sqlite",
        crate::cp::store::Backend::Postgres => "postgres",
    };
    let registry = state.store.registry();
    // Kong's `GET /` (`kong/api/routes/kong.lua`): the loaded plugins with their handler's
    // version and priority, and the distinct plugin names the configuration uses.
    let available: serde_json::Map<String, Value> = registry
        .plugins()
        .filter(|p| state.enabled_plugins.contains(&p.name))
        .map(|p| {
            (
                p.name.clone(),
                json!({"version": p.version, "priority": p.priority}),
            )
        })
        .collect();
    let in_cluster = match state.store.plugins_in_use(false).await {
        Ok(p) => p.names,
        Err(e) => return error_response(e),
    };
    // Plugins stored before this node refused them (an older deltaplane stored any name):
    // still served as stored, and named here so an operator can fix or remove them.
    let not_enabled: Vec<&String> = in_cluster
        .iter()
        .filter(|n| !state.enabled_plugins.contains(*n))
        .collect();
    Json(json!({
        "tagline": "Welcome to deltaplane",
        "version": state.node.kong_compat_version,
        "kong_compat_version": state.node.kong_compat_version,
        "deltaplane_version": env!("CARGO_PKG_VERSION"),
        "node_id": state.node.node_id,
        "hostname": state.node.hostname,
        "role": "control_plane",
        "configuration": { "role": "control_plane", "database": backend },
        "plugins": {
            "available_on_server": available,
            "enabled_in_cluster": in_cluster,
            "deltaplane_not_enabled_in_cluster": not_enabled,
        },
        "deltaplane_invalid_in_store": state.invalid_in_store.iter().map(|i| json!({
            "type": i.entity_type,
            "id": i.id,
            "name": i.name,
            "disabled": i.disabled,
            "errors": Value::Object(i.errors.0.clone()),
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// `GET /plugins/enabled` (`kong/api/routes/plugins.lua`): the plugins this node accepts.
async fn enabled_plugins(State(state): State<Arc<AdminState>>) -> Response {
    Json(json!({ "enabled_plugins": *state.enabled_plugins })).into_response()
}

async fn status(State(state): State<Arc<AdminState>>) -> Response {
    let info = state.store.version_info().await;
    let reachable = info.is_ok();
    let mut body = json!({
        "database": { "reachable": reachable },
        "server": { "total_requests": state.requests.load(Ordering::Relaxed) },
    });
    if let Ok(info) = info {
        body["configuration"] = json!({
            "version": info.version,
            "oldest_version": info.oldest_version,
            "epoch": info.epoch,
            "state_hash": info.state_hash.to_hex(),
        });
    }
    let code = if reachable {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// Maps a store error to Kong's status code and body; internal causes are logged, not sent.
pub fn error_response(e: StoreError) -> Response {
    let kong =
        |status: StatusCode, code: u32, name: &str, message: String, fields: Option<Value>| {
            let mut body = json!({ "code": code, "name": name, "message": message });
            if let Some(f) = fields {
                body["fields"] = f;
            }
            (status, Json(body)).into_response()
        };
    match e {
        StoreError::Schema(fields) => {
            let msg = fields.message();
            kong(
                StatusCode::BAD_REQUEST,
                2,
                "schema violation",
                msg,
                Some(Value::Object(fields.0)),
            )
        }
        StoreError::Unique(fields) => {
            let msg = StoreError::Unique(fields.clone()).to_string();
            kong(
                StatusCode::CONFLICT,
                5,
                "unique constraint violation",
                msg,
                Some(Value::Object(fields)),
            )
        }
        StoreError::ForeignKey { message, fields } => kong(
            StatusCode::BAD_REQUEST,
            4,
            "foreign key violation",
            message,
            Some(Value::Object(fields)),
        ),
        StoreError::ForeignKeysUnresolved(keys) => {
            let (message, fields) = unresolved_body(&keys);
            kong(
                StatusCode::BAD_REQUEST,
                13,
                "foreign keys unresolved",
                message,
                Some(Value::Object(fields)),
            )
        }
        StoreError::PrimaryKey { message, fields } => kong(
            StatusCode::BAD_REQUEST,
            3,
            "primary key violation",
            message,
            Some(Value::Object(fields)),
        ),
        StoreError::ReferencedByOthers(message) => kong(
            StatusCode::BAD_REQUEST,
            19,
            "referenced by others",
            message,
            None,
        ),
        StoreError::InvalidConfig(invalid) => (
            StatusCode::BAD_REQUEST,
            Json(crate::declarative::Error::Invalid(*invalid).kong_body(false)),
        )
            .into_response(),
        StoreError::NotFound => message(StatusCode::NOT_FOUND, "Not found"),
        StoreError::BadRequest(m) => message(StatusCode::BAD_REQUEST, &m),
        StoreError::Unavailable(cause) => {
            tracing::warn!(%cause, "database unavailable");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "database unavailable; the request was not applied",
            )
        }
        StoreError::CommitUnknown(cause) => {
            tracing::error!(%cause, "commit outcome unknown");
            message(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database connection failed during commit: the write may or may not have been applied; read the entity to find out",
            )
        }
        StoreError::Internal(cause) => {
            tracing::error!(%cause, "internal error");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            )
        }
    }
}

/// Kong's `foreign_keys_unresolved` message and field tree (`kong/db/errors.lua`):
/// `foreign key unresolved (service.name: the foreign key cannot be resolved with
/// '{name="x"}' for an existing 'services' entity)`, `{"service": {"name": "the foreign…"}}`.
fn unresolved_body(keys: &[UnresolvedForeignKey]) -> (String, serde_json::Map<String, Value>) {
    let mut fields = serde_json::Map::new();
    let mut parts = Vec::new();
    for key in keys {
        let mut probe = serde_json::Map::new();
        probe.insert(key.unique_field.clone(), key.value.clone());
        let msg = format!(
            "the foreign key cannot be resolved with '{}' for an existing '{}' entity",
            kong_pretty(&probe),
            key.entity
        );
        parts.push(format!("{}.{}: {msg}", key.field, key.unique_field));
        if let Value::Object(m) = fields
            .entry(key.field.clone())
            .or_insert_with(|| Value::Object(serde_json::Map::new()))
        {
            m.insert(key.unique_field.clone(), Value::String(msg));
        }
    }
    let message = match parts.as_slice() {
        [one] => format!("foreign key unresolved ({one})"),
        _ => format!(
            "{} foreign keys unresolved ({})",
            parts.len(),
            parts.join("; ")
        ),
    };
    (message, fields)
}

/// The target of a request path, resolved against the schema.
enum Target {
    Collection {
        schema: Arc<EntitySchema>,
        scope: Option<Scope>,
    },
    Entity {
        schema: Arc<EntitySchema>,
        key: String,
        scope: Option<Scope>,
    },
    /// `/routes/{r}/service`: the entity a foreign field points at.
    Foreign {
        child: Arc<EntitySchema>,
        child_key: String,
        field: String,
        parent: Arc<EntitySchema>,
    },
}

fn decode_segment(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

/// The child collection named `nested` under `parent` and the foreign field that links them.
fn nested_collection(
    registry: &Registry,
    parent: &EntitySchema,
    nested: &str,
) -> Option<(Arc<EntitySchema>, String)> {
    registry.entities().find_map(|child| {
        let named = child.admin_api_nested_name.as_deref() == Some(nested)
            || child.admin_api_name == nested;
        if !named {
            return None;
        }
        registry
            .references_of(&child.name)
            .find(|fk| fk.parent == parent.name && !fk.is_array)
            .map(|fk| (child.clone(), fk.field.clone()))
    })
}

fn resolve_target(registry: &Registry, segments: &[String]) -> Option<Target> {
    let schema = registry.by_admin_name(segments.first()?)?.clone();
    if schema.name == crate::schema::WORKSPACES {
        // Open-source Kong has no workspace paths.
        return None;
    }
    match segments.len() {
        1 => Some(Target::Collection {
            schema,
            scope: None,
        }),
        2 => Some(Target::Entity {
            schema,
            key: segments[1].clone(),
            scope: None,
        }),
        3 | 4 => {
            let nested = &segments[2];
            if let Some((child, field)) = nested_collection(registry, &schema, nested) {
                let scope = Some(Scope {
                    parent: schema.name.clone(),
                    parent_key: segments[1].clone(),
                    field,
                });
                return Some(if segments.len() == 3 {
                    Target::Collection {
                        schema: child,
                        scope,
                    }
                } else {
                    Target::Entity {
                        schema: child,
                        key: segments[3].clone(),
                        scope,
                    }
                });
            }
            if segments.len() == 3
                && let Some(f) = schema.field(nested).filter(|f| f.ty == FieldType::Foreign)
            {
                let parent = registry.get(f.reference.as_deref()?)?.clone();
                return Some(Target::Foreign {
                    child: schema,
                    child_key: segments[1].clone(),
                    field: nested.clone(),
                    parent,
                });
            }
            None
        }
        _ => None,
    }
}

/// A request's query parameters (the last of a repeated name wins).
pub(super) fn query_of(req: &Request) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn dispatch(State(state): State<Arc<AdminState>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = query_of(&req);
    let headers = req.headers().clone();
    let segments: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .map(decode_segment)
        .collect();
    let registry = state.store.registry().clone();
    let Some(target) = resolve_target(&registry, &segments) else {
        return message(StatusCode::NOT_FOUND, "Not found");
    };
    let allowed = match (&target, &method) {
        (Target::Collection { .. }, m) => *m == Method::GET || *m == Method::POST,
        (_, m) => [Method::GET, Method::PATCH, Method::PUT, Method::DELETE].contains(m),
    };
    if !allowed {
        return method_not_allowed().await;
    }
    let body = if method == Method::GET || method == Method::DELETE {
        None
    } else {
        match read_payload(&headers, req.into_body(), state.body_limit).await {
            Ok(p) => Some(p),
            Err(resp) => return resp,
        }
    };
    match handle(&state, target, method, &path, &query, &headers, body).await {
        Ok(resp) => resp,
        Err(e) => error_response(e),
    }
}

/// A request body as read: its bytes, or the `(name, value)` parts of a
/// `multipart/form-data` body, which then follow the form conventions.
pub(crate) enum Payload {
    Raw(Bytes),
    Multipart(Vec<(String, String)>),
}

/// Reads the body (up to `limit`) and splits a `multipart/form-data` body into its parts.
pub(crate) async fn read_payload(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Payload, Response> {
    let bytes = read_body(body, limit).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if mime_of(content_type) != "multipart/form-data" {
        return Ok(Payload::Raw(bytes));
    }
    multipart_parts(content_type, bytes)
        .await
        .map(Payload::Multipart)
        .map_err(|e| {
            message(
                StatusCode::BAD_REQUEST,
                &format!("Cannot parse multipart body: {e}"),
            )
        })
}

/// The parts of a buffered `multipart/form-data` body, in order, as text (a file part's value
/// is its content, as Kong's `kong/api/arguments.lua` takes it). Parts without a name are
/// skipped: nothing could refer to them.
async fn multipart_parts(content_type: &str, body: Bytes) -> Result<Vec<(String, String)>, String> {
    let boundary = multer::parse_boundary(content_type).map_err(|e| e.to_string())?;
    let stream = futures::stream::once(async move { Ok::<Bytes, std::convert::Infallible>(body) });
    let mut multipart = multer::Multipart::new(stream, boundary);
    let mut parts = Vec::new();
    while let Some(field) = multipart.next_field().await.map_err(|e| e.to_string())? {
        let Some(name) = field.name().map(str::to_owned) else {
            continue;
        };
        let data = field.bytes().await.map_err(|e| e.to_string())?;
        let text = String::from_utf8(data.to_vec())
            .map_err(|_| format!("the value of part '{name}' is not UTF-8"))?;
        parts.push((name, text));
    }
    Ok(parts)
}

/// The media type of a `Content-Type` value, lower-cased, without parameters.
pub(crate) fn mime_of(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        // The limit error may sit a few sources down (axum wraps hyper's body error).
        let too_large =
            std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
            .any(|s| s.is::<http_body_util::LengthLimitError>());
        if too_large {
            message(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("request body is larger than {limit} bytes"),
            )
        } else {
            message(StatusCode::BAD_REQUEST, "could not read the request body")
        }
    })
}

/// Parses a JSON, form or multipart body into the entity input.
pub(crate) fn parse_input(
    registry: &Registry,
    schema: &EntitySchema,
    headers: &HeaderMap,
    payload: &Payload,
) -> Result<Value, Response> {
    let body = match payload {
        Payload::Raw(body) => body,
        Payload::Multipart(parts) => {
            return match form::parse_pairs(parts.iter().map(|(k, v)| (k, v))) {
                Ok(v) => Ok(form_transients(schema, registry.coerce_form(schema, v))),
                Err(e) => Err(message(
                    StatusCode::BAD_REQUEST,
                    &format!("Cannot parse multipart body: {e}"),
                )),
            };
        }
    };
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = mime_of(content_type);
    if body.iter().all(u8::is_ascii_whitespace)
        && (mime.is_empty()
            || mime == "application/json"
            || mime == "application/x-www-form-urlencoded")
    {
        return Ok(json!({}));
    }
    match mime.as_str() {
        "application/json" | "" => {
            if mime.is_empty() {
                return Err(message(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Unsupported Content-Type: a body needs application/json, application/x-www-form-urlencoded or multipart/form-data",
                ));
            }
            match serde_json::from_slice::<Value>(body) {
                Ok(v @ Value::Object(_)) => Ok(v),
                Ok(_) => Err(message(
                    StatusCode::BAD_REQUEST,
                    "Cannot parse JSON body: expected a JSON object",
                )),
                Err(_) => Err(message(StatusCode::BAD_REQUEST, "Cannot parse JSON body")),
            }
        }
        "application/x-www-form-urlencoded" => match form::parse(body) {
            Ok(v) => Ok(form_transients(schema, registry.coerce_form(schema, v))),
            Err(e) => Err(message(
                StatusCode::BAD_REQUEST,
                &format!("Cannot parse form body: {e}"),
            )),
        },
        other => Err(message(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            &format!("Unsupported Content-Type: {other}"),
        )),
    }
}

/// Kong refuses a plugin that is not enabled on the node with a schema violation on `name`
/// (`subschema_error` in `kong/db/schema/entities/plugins.lua`). Stored plugins keep working.
fn refuse_disabled_plugin(
    state: &AdminState,
    schema: &EntitySchema,
    input: &Value,
) -> Result<(), Response> {
    if schema.name != crate::schema::PLUGINS {
        return Ok(());
    }
    match input.get("name").and_then(Value::as_str) {
        Some(name) if !state.enabled_plugins.contains(name) => {
            let mut errors = crate::schema::FieldErrors::default();
            errors.field(
                "name",
                format!(
                    "plugin '{name}' not enabled; add it to the 'plugins' configuration property"
                ),
            );
            Err(error_response(StoreError::Schema(errors)))
        }
        _ => Ok(()),
    }
}

/// Transient fields are lists of names (Kong's `certificates.snis` is a transient array): in a
/// form or multipart body a single value is a one-element list, as Kong infers it.
fn form_transients(schema: &EntitySchema, mut input: Value) -> Value {
    if let Value::Object(m) = &mut input {
        for name in &schema.transient_fields {
            if let Some(v) = m.get_mut(name)
                && v.is_string()
            {
                *v = Value::Array(vec![v.take()]);
            }
        }
    }
    input
}

pub(super) fn parse_size(query: &HashMap<String, String>) -> Result<usize, Response> {
    let bad = || {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"code": 9, "name": "invalid size", "message": "size must be an integer between 1 and 1000"})),
        )
            .into_response()
    };
    match query.get("size") {
        None => Ok(100),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=1000).contains(&n) => Ok(n),
            _ => Err(bad()),
        },
    }
}

async fn handle(
    state: &AdminState,
    target: Target,
    method: Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: Option<Payload>,
) -> Result<Response, StoreError> {
    let store = &state.store;
    let registry = store.registry().clone();
    let empty = Payload::Raw(Bytes::new());
    let input = |schema: &EntitySchema| -> Result<Value, Response> {
        let input = parse_input(&registry, schema, headers, body.as_ref().unwrap_or(&empty))?;
        refuse_disabled_plugin(state, schema, &input)?;
        Ok(input)
    };
    macro_rules! input_or_return {
        ($schema:expr) => {
            match input($schema) {
                Ok(v) => v,
                Err(resp) => return Ok(resp),
            }
        };
    }
    if let Some(resp) = alias_miss(store, &target, &method).await? {
        return Ok(resp);
    }
    match target {
        Target::Collection { schema, scope } => {
            if method == Method::POST {
                let input = input_or_return!(&schema);
                let outcome = state
                    .writer
                    .write(Op::Create {
                        entity: schema.name.clone(),
                        input,
                        scope,
                    })
                    .await?;
                return Ok((
                    StatusCode::CREATED,
                    Json(outcome.entity.unwrap_or(Value::Null)),
                )
                    .into_response());
            }
            let size = match parse_size(query) {
                Ok(s) => s,
                Err(resp) => return Ok(resp),
            };
            let tags = match query.get("tags").map(|t| TagFilter::parse(t)) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(e)) => {
                    return Ok((
                        StatusCode::BAD_REQUEST,
                        Json(json!({"code": 11, "name": "invalid options", "message": format!("invalid option (tags: {e})"), "options": {"tags": e}})),
                    )
                        .into_response());
                }
            };
            let parent = match &scope {
                Some(scope) => {
                    let parent = store
                        .find(&scope.parent, &scope.parent_key, None)
                        .await?
                        .ok_or(StoreError::NotFound)?;
                    let pid = parent
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    Some((scope.parent.clone(), pid, scope.field.clone()))
                }
                None => None,
            };
            let q = ListQuery {
                entity: schema.name.clone(),
                size,
                offset: query.get("offset").cloned(),
                tags: tags.clone(),
                parent,
            };
            let page = match store.list(&q).await {
                Ok(p) => p,
                Err(StoreError::BadRequest(m)) => {
                    return Ok((
                        StatusCode::BAD_REQUEST,
                        Json(json!({"code": 7, "name": "invalid offset", "message": m})),
                    )
                        .into_response());
                }
                Err(e) => return Err(e),
            };
            let mut data = page.data;
            for e in &mut data {
                decorate(store, &schema, e).await?;
            }
            let (next, offset) = match &page.next_offset {
                Some(o) => {
                    let mut next = format!("{path}?offset={}", urlencode(o));
                    if query.contains_key("size") {
                        next.push_str(&format!("&size={size}"));
                    }
                    if let Some(t) = query.get("tags") {
                        next.push_str(&format!("&tags={}", urlencode(t)));
                    }
                    (Value::String(next), Value::String(o.clone()))
                }
                None => (Value::Null, Value::Null),
            };
            let mut resp = json!({ "data": data, "next": next });
            if !offset.is_null() {
                resp["offset"] = offset;
            }
            Ok(Json(resp).into_response())
        }
        Target::Entity { schema, key, scope } => {
            entity_op(state, &schema, key, scope, method, || input(&schema)).await
        }
        Target::Foreign {
            child,
            child_key,
            field,
            parent,
        } => {
            let child_entity = store
                .find(&child.name, &child_key, None)
                .await?
                .ok_or(StoreError::NotFound)?;
            let Some(pid) = child_entity
                .get(&field)
                .and_then(|f| f.get("id"))
                .and_then(Value::as_str)
            else {
                return Err(StoreError::NotFound);
            };
            if method == Method::DELETE {
                // Kong refuses to delete through a many-to-one path (`delete_entity_endpoint`
                // in `kong/api/endpoints.lua`): the parent is not the child's to delete.
                return Ok(message(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "Method not allowed",
                ));
            }
            entity_op(state, &parent, pid.to_owned(), None, method, || {
                input(&parent)
            })
            .await
        }
    }
}

async fn entity_op(
    state: &AdminState,
    schema: &Arc<EntitySchema>,
    key: String,
    scope: Option<Scope>,
    method: Method,
    input: impl FnOnce() -> Result<Value, Response>,
) -> Result<Response, StoreError> {
    let store = &state.store;
    let entity = schema.name.clone();
    let op = match method {
        Method::GET => {
            let parent = match &scope {
                Some(s) => {
                    let p = store
                        .find(&s.parent, &s.parent_key, None)
                        .await?
                        .ok_or(StoreError::NotFound)?;
                    Some((
                        s.field.clone(),
                        p.get("id")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    ))
                }
                None => None,
            };
            let mut found = store
                .find(
                    &entity,
                    &key,
                    parent.as_ref().map(|(f, p)| (f.as_str(), p.as_str())),
                )
                .await?
                .ok_or(StoreError::NotFound)?;
            decorate(store, schema, &mut found).await?;
            return Ok(Json(found).into_response());
        }
        Method::DELETE => Op::Delete { entity, key, scope },
        Method::PATCH => match input() {
            Ok(input) => Op::Patch {
                entity,
                key,
                input,
                scope,
            },
            Err(resp) => return Ok(resp),
        },
        Method::PUT => match input() {
            Ok(mut input) => {
                if scope.is_none() {
                    alias_put_input(schema, &key, &mut input);
                }
                Op::Put {
                    entity,
                    key,
                    input,
                    scope,
                }
            }
            Err(resp) => return Ok(resp),
        },
        _ => {
            return Ok(message(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
            ));
        }
    };
    let is_delete = matches!(op, Op::Delete { .. });
    let outcome = state.writer.write(op).await?;
    if is_delete {
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    Ok((StatusCode::OK, Json(outcome.entity.unwrap_or(Value::Null))).into_response())
}

/// The 404 of a path key that names an entity through a child that does not exist
/// (`/certificates/{sni}`: "SNI not found", Kong's `prepare_params` in
/// `kong/api/routes/certificates.lua`), for the entity itself or a nested path's parent. A PUT
/// of the entity itself creates it instead; a nested PUT under it finds no parent (404).
async fn alias_miss(
    store: &Store,
    target: &Target,
    method: &Method,
) -> Result<Option<Response>, StoreError> {
    let (schema, key) = match target {
        Target::Entity {
            schema,
            key,
            scope: None,
        } => (schema.as_ref(), key),
        Target::Collection {
            scope: Some(scope), ..
        }
        | Target::Entity {
            scope: Some(scope), ..
        } => match store.registry().get(&scope.parent) {
            Some(parent) => (parent.as_ref(), &scope.parent_key),
            None => return Ok(None),
        },
        Target::Foreign {
            child, child_key, ..
        } => (child.as_ref(), child_key),
        Target::Collection { scope: None, .. } => return Ok(None),
    };
    let Some(alias) = &schema.alias_key else {
        return Ok(None);
    };
    if crate::schema::is_uuid(key) || *method == Method::PUT {
        return Ok(None);
    }
    if store.find(&schema.name, key, None).await?.is_some() {
        return Ok(None);
    }
    Ok(Some(message(StatusCode::NOT_FOUND, &alias.not_found)))
}

/// `PUT /certificates/{sni}`: the SNI named by the path joins the `snis` the body lists (Kong's
/// `prepare_args`); a body without `snis` leaves the list empty, as in Kong.
fn alias_put_input(schema: &EntitySchema, key: &str, input: &mut Value) {
    let Some(alias) = &schema.alias_key else {
        return;
    };
    if crate::schema::is_uuid(key) || !schema.transient_fields.contains(&alias.entity) {
        return;
    }
    let Value::Object(m) = input else {
        return;
    };
    match m.get_mut(&alias.entity) {
        Some(Value::Array(list)) if !list.iter().any(|v| v.as_str() == Some(key)) => {
            list.push(Value::String(key.to_owned()));
        }
        Some(v @ Value::String(_)) => {
            let one = v.take();
            *v = if one.as_str() == Some(key) {
                Value::Array(vec![one])
            } else {
                Value::Array(vec![one, Value::String(key.to_owned())])
            };
        }
        _ => {}
    }
}

/// Adds transient fields (`certificates.snis`) to an entity read from the store.
async fn decorate(
    store: &Store,
    schema: &EntitySchema,
    entity: &mut Value,
) -> Result<(), StoreError> {
    if schema.transient_fields.is_empty() {
        return Ok(());
    }
    let id = entity
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    for name in &schema.transient_fields {
        let list = store.transient_list(&schema.name, &id, name).await?;
        entity[name.as_str()] = list.into_iter().map(Value::String).collect();
    }
    Ok(())
}

pub(super) fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entity path `/endpoints` lists is one `dispatch` serves.
    #[test]
    fn every_listed_entity_path_resolves() {
        let registry = Registry::builtin();
        let paths = entity_paths(registry);
        assert!(
            paths
                .iter()
                .any(|p| p == "/consumers/{consumers}/key-auth/{keyauth_credentials}")
        );
        assert!(paths.iter().any(|p| p == "/routes/{routes}/service"));
        for path in paths {
            let segments: Vec<String> = path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.starts_with('{') {
                        "k".to_owned()
                    } else {
                        s.to_owned()
                    }
                })
                .collect();
            assert!(resolve_target(registry, &segments).is_some(), "{path}");
        }
    }
}
