//! `/config`: a declarative file in (`POST`) and out (`GET`), Kong's
//! `kong/api/routes/config.lua`.
//!
//! Kong serves `/config` only without a database (DB-less) and answers 400 otherwise; here it
//! is a deliberate extension on a control plane with a database: `POST /config` imports the
//! file as the whole configuration in one version (`Store::import`), so connected data
//! planes receive the difference as one delta.
//!
//! `POST /config` takes the file as the body (YAML or JSON), or a JSON, form or multipart
//! body whose `config` field holds the file's text (or, in JSON, the file as an object).
//! Query: `upsert=true` (Kong's `kong config db_import`: never delete), `dry_run=true` (200
//! with the difference, nothing written), `check_hash=1` (304 when the import changes
//! nothing), `flatten_errors=1` (Kong's `flattened_errors`). Success is 201 with Kong's body
//! (the entities by type and id) plus `_deltaplane` (version and per-type counts).

use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{AdminState, Payload, error_response, message, mime_of, query_of, read_body};
use crate::cp::store::{ConfigProblems, ImportMode, ImportOutcome, StoreError};
use crate::declarative::{self, OutputFormat, ParseOptions, WriteOptions};

/// Kong's `truthy` (`config.lua`): `true`, `1`, `on`, `yes`, any case.
fn truthy(v: Option<&String>) -> bool {
    v.is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "on" | "yes"))
}

fn invalid_response(e: &declarative::Error, flatten: bool) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(e.kong_body(flatten))).into_response()
}

/// `POST /config`.
pub(super) async fn post(State(state): State<Arc<AdminState>>, req: Request) -> Response {
    let query = query_of(&req);
    let headers = req.headers().clone();
    let body = match read_body(req.into_body(), state.config_body_limit).await {
        Ok(b) => b,
        Err(resp) => return resp,
    };
    let upsert = truthy(query.get("upsert"));
    let dry_run = truthy(query.get("dry_run"));
    let flatten = truthy(query.get("flatten_errors"));
    // Kong compares `tostring(check_hash) == "1"` (older than `truthy`).
    let check_hash = query.get("check_hash").is_some_and(|v| v == "1");
    let text = match config_text(&headers, body).await {
        Ok(t) => t,
        Err(resp) => return resp,
    };
    let registry = state.store.registry().clone();
    let options = ParseOptions {
        now: crate::node::now_secs(),
    };
    let large = text.len() >= TRIM_AFTER_BYTES;
    // Parsing a large file is CPU work: off the async workers.
    let parsed = tokio::task::spawn_blocking(move || {
        let parsed = declarative::parse(&registry, &text, &options);
        drop(text);
        if large {
            // The file's tree is freed; its memory goes back before the import allocates
            // on another thread (another malloc arena).
            release_freed_memory();
        }
        parsed
    })
    .await;
    let config = match parsed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return invalid_response(&e, flatten),
        Err(e) => {
            tracing::error!(error = %e, "declarative parse task failed");
            return message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            );
        }
    };
    if let Some(problems) = refuse_disabled_plugins(&state, &config) {
        return invalid_response(
            &declarative::Error::Invalid(problems.into_invalid()),
            flatten,
        );
    }
    let mode = if upsert {
        ImportMode::Upsert
    } else {
        ImportMode::Sync
    };
    let outcome = match state.store.import(config, mode, dry_run).await {
        Ok(o) => o,
        Err(StoreError::InvalidConfig(invalid)) => {
            return invalid_response(&declarative::Error::Invalid(*invalid), flatten);
        }
        Err(e) => return error_response(e),
    };
    if large {
        release_freed_memory();
    }
    if check_hash && outcome.version.is_none() {
        return StatusCode::NOT_MODIFIED.into_response();
    }
    if dry_run {
        return (
            StatusCode::OK,
            axum::Json(json!({ "_deltaplane": summary(&outcome) })),
        )
            .into_response();
    }
    let body = success_body(outcome);
    (
        StatusCode::CREATED,
        [(header::CONTENT_TYPE, "application/json; charset=utf-8")],
        body,
    )
        .into_response()
}

/// Files at least this large give the memory their import freed back to the system.
const TRIM_AFTER_BYTES: usize = 1 << 20;

/// Returns freed heap memory to the system. glibc keeps what a thread frees in that thread's
/// arena, and a large import frees tens of MiB on one thread (the parse) before allocating
/// on another (the import); without this the process's peak is the sum of the two.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of glibc's arenas; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What an import did: the new version (none when nothing changed) and per-type counts.
fn summary(outcome: &ImportOutcome) -> Value {
    json!({
        "version": outcome.version,
        "previous_version": outcome.previous_version,
        "dry_run": outcome.dry_run,
        "changes": outcome.counts,
    })
}

/// Kong's 201 body (`config.lua`: the entities by type, then by id, without workspaces and
/// `ws_id`), written from the stored text, plus `_deltaplane`. Streamed in chunks, so a large
/// import's answer is never one more copy of the configuration in memory.
fn success_body(outcome: ImportOutcome) -> axum::body::Body {
    let chunks = SuccessChunks {
        outcome,
        next: 0,
        done: false,
    };
    axum::body::Body::from_stream(futures::stream::iter(
        chunks.map(Ok::<_, std::convert::Infallible>),
    ))
}

/// The chunks of [`success_body`]: entities arrive grouped by type (registry order).
struct SuccessChunks {
    outcome: ImportOutcome,
    /// The next entity to write.
    next: usize,
    done: bool,
}

impl Iterator for SuccessChunks {
    type Item = axum::body::Bytes;

    fn next(&mut self) -> Option<axum::body::Bytes> {
        const CHUNK: usize = 64 * 1024;
        if self.done {
            return None;
        }
        let entities = &self.outcome.entities;
        let mut out = String::with_capacity(CHUNK + 1024);
        if self.next == 0 {
            out.push('{');
        }
        while self.next < entities.len() && out.len() < CHUNK {
            let e = &entities[self.next];
            let first_of_type =
                self.next == 0 || entities[self.next - 1].entity_type != e.entity_type;
            if first_of_type {
                let _ = write!(out, "{}:{{", Value::String(e.entity_type.to_string()));
            } else {
                out.push(',');
            }
            let _ = write!(out, "{}:{}", Value::String(e.id.to_string()), e.body);
            self.next += 1;
            let last_of_type = entities
                .get(self.next)
                .is_none_or(|n| n.entity_type != e.entity_type);
            if last_of_type {
                out.push_str("},");
            }
        }
        if self.next >= entities.len() {
            let _ = write!(out, "\"_deltaplane\":{}}}", summary(&self.outcome));
            self.done = true;
        }
        Some(axum::body::Bytes::from(out))
    }
}

/// The file's text: the body itself, or its `config` field (JSON, form or multipart).
/// The raw body is returned as it is (not copied: a large file is held once).
async fn config_text(
    headers: &HeaderMap,
    body: axum::body::Bytes,
) -> Result<axum::body::Bytes, Response> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = mime_of(content_type);
    let missing = || {
        message(
            StatusCode::BAD_REQUEST,
            "expected a declarative configuration",
        )
    };
    match mime.as_str() {
        "multipart/form-data" => {
            match super::read_payload(headers, axum::body::Body::from(body), usize::MAX).await? {
                Payload::Multipart(parts) => parts
                    .into_iter()
                    .find(|(k, _)| k == "config")
                    .map(|(_, v)| v.into_bytes().into())
                    .ok_or_else(missing),
                Payload::Raw(b) => Ok(b),
            }
        }
        "application/x-www-form-urlencoded" => form_urlencoded::parse(&body)
            .find(|(k, _)| k == "config")
            .map(|(_, v)| v.into_owned().into_bytes().into())
            .ok_or_else(missing),
        _ => {
            if body.iter().all(u8::is_ascii_whitespace) {
                return Err(missing());
            }
            // A JSON object with a `config` field and no `_format_version` wraps the file.
            let first = body.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'{')
                && let Ok(Value::Object(mut m)) = serde_json::from_slice::<Value>(&body)
                && !m.contains_key("_format_version")
                && let Some(config) = m.remove("config")
            {
                return match config {
                    Value::String(s) => Ok(s.into_bytes().into()),
                    other => Ok(other.to_string().into_bytes().into()),
                };
            }
            Ok(body)
        }
    }
}

/// Plugins of the file this control plane does not accept (`--plugins`), as Kong refuses a
/// plugin not enabled on the node (`subschema_error`, `kong/db/schema/entities/plugins.lua`).
fn refuse_disabled_plugins(
    state: &AdminState,
    config: &declarative::Config,
) -> Option<ConfigProblems> {
    let registry = state.store.registry();
    let schema = registry.get(crate::schema::PLUGINS)?;
    let mut problems = ConfigProblems::default();
    for e in config
        .entities
        .iter()
        .filter(|e| e.entity_type == crate::schema::PLUGINS)
    {
        let body = e.value();
        if let Some(name) = body.get("name").and_then(Value::as_str)
            && !state.enabled_plugins.contains(name)
        {
            problems.entity(
                schema,
                &e.id,
                &body,
                Some("name"),
                format!(
                    "plugin '{name}' not enabled; add it to the 'plugins' configuration property"
                ),
            );
        }
    }
    (!problems.is_empty()).then_some(problems)
}

/// `GET /config`: Kong's `{"config": "<YAML>"}`, the flat `db_export` shape, from one
/// snapshot. Extensions: `format=json` and `nested=true` (decK's nesting).
pub(super) async fn get(State(state): State<Arc<AdminState>>, req: Request) -> Response {
    let query = query_of(&req);
    let format = match query.get("format").map(String::as_str) {
        None | Some("yaml") => OutputFormat::Yaml,
        Some("json") => OutputFormat::Json,
        Some(other) => {
            return message(
                StatusCode::BAD_REQUEST,
                &format!("format must be yaml or json, not '{other}'"),
            );
        }
    };
    let options = WriteOptions {
        format,
        nested: truthy(query.get("nested")),
    };
    match export(&state.store, options).await {
        Ok((text, version)) => (
            StatusCode::OK,
            [("deltaplane-version", version.to_string())],
            axum::Json(json!({ "config": text })),
        )
            .into_response(),
        Err(e) => error_response(e),
    }
}

/// The whole configuration as a file, from one snapshot, with the version it is the state of.
pub async fn export(
    store: &crate::cp::store::Store,
    options: WriteOptions,
) -> Result<(String, i64), StoreError> {
    let mut entities: Vec<(String, Value)> = Vec::new();
    let info = store
        .snapshot(|c| {
            if c.entity_type != crate::schema::WORKSPACES
                && let Some(e) = c.entity
            {
                entities.push((c.entity_type, e));
            }
            Ok(())
        })
        .await?;
    let registry = store.registry().clone();
    let text = tokio::task::spawn_blocking(move || {
        declarative::write(
            &registry,
            entities.iter().map(|(t, e)| (t.as_str(), e)),
            options,
        )
    })
    .await
    .map_err(|e| StoreError::Internal(format!("export task failed: {e}")))?;
    Ok((text, info.version))
}
