//! A data plane that runs from a declarative file with no control plane (Kong's DB-less
//! mode, `declarative_config`): `deltaplane-dp run --declarative-config FILE`.
//!
//! The file is read with [`crate::declarative::parse`] and applied to the same redb store a
//! control plane's sync fills, as **one full apply** under the file epoch ([`FILE_EPOCH`]) at
//! the stored version + 1. The proxy, `/status`, `/rpc` and `/metrics` follow the store as
//! they do for a synced data plane.
//!
//! - **Its own epoch.** A control plane's epoch is a random UUID, [`FILE_EPOCH`] is not one,
//!   so a store applied from a file is never taken for a control plane's: pointed at a CP
//!   later, `dp::v2` sees another epoch and asks for a full sync; and a CP-synced store
//!   restarted in file mode gets a full apply with the file epoch.
//! - **One version per applied file.** A file whose entities give the stored state under the
//!   file epoch applies nothing and makes no version ([`Apply::skip_if_unchanged`]): re-reading
//!   an unchanged file, or restarting on it, keeps the version. Values the reader generated
//!   at random (a key-auth `key` the file omits: [`crate::declarative::Entity::generated`]) and
//!   timestamps the file does not fix are taken from the stored entity of the same type and
//!   id, so they do not count as changes; an entity that changed otherwise keeps its stored
//!   `created_at`.
//! - **Reloads.** SIGHUP re-reads the file; `POST /config` on the status listener (only with
//!   `--config-token`, see `dp::status`) applies a posted configuration without writing the
//!   file, so a later SIGHUP (or restart) replaces a posted configuration by the file's, as
//!   Kong DB-less does. Loads are serialised.
//! - **Failures.** At startup an unreadable or invalid file (or one using a plugin the proxy
//!   does not execute) stops the data plane with the error, as Kong does
//!   (`kong/init.lua`: `declarative config is invalid`); the binary exits non-zero. A reload
//!   that fails keeps serving the last good configuration and reports the error in
//!   `/status` (`declarative.last_error`) and the log.
//!
//! The default workspace: the file's `workspaces` entity named `default` when it has one,
//! else Kong's `DECLARATIVE_DEFAULT_WORKSPACE_ID` (`kong/constants.lua`, inserted by
//! `insert_default_workspace_if_not_given` in `kong/db/schema/others/declarative_config.lua`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::DpShared;
use super::store::{ApplyError, ApplyKind, DpStoreError};
use crate::declarative::{self, ParseOptions};
use crate::proto::Delta;

/// The epoch of a store applied from a declarative file. Control planes' epochs are random
/// UUIDs, so this one never equals a control plane's.
pub const FILE_EPOCH: &str = "declarative-file";

/// Kong's id for the default workspace of a declarative configuration that gives none
/// (`DECLARATIVE_DEFAULT_WORKSPACE_ID`, `kong/constants.lua`).
pub const DEFAULT_WORKSPACE_ID: &str = "0dc6f45b-8f8d-40d2-a504-473544ee190b";

/// Where a configuration came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The file, at startup or on SIGHUP.
    File,
    /// `POST /config`.
    Post,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Post => "post",
        }
    }
}

/// What `/status` shows of a data plane running from a file.
#[derive(Debug, Clone, Default)]
pub struct FileStatus {
    /// The version the last applied configuration became (unchanged loads keep it).
    pub last_applied_version: Option<i64>,
    /// Unix seconds of the last load that succeeded (applied or unchanged).
    pub last_loaded_at: Option<i64>,
    pub last_source: Option<Source>,
    /// The last failure, kept until a later load succeeds.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    /// Loads since start: configurations applied, found unchanged, and refused.
    pub applied: u64,
    pub unchanged: u64,
    pub failed: u64,
}

/// A data plane's file mode: the file, the `POST /config` settings, and the status.
pub struct FileMode {
    path: PathBuf,
    token: Option<String>,
    max_body: usize,
    status: Mutex<FileStatus>,
    /// One load at a time: each computes its version from the stored one.
    one_load: Mutex<()>,
}

/// A successful load.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The version the store is at afterwards.
    pub version: i64,
    /// False when the configuration equalled the stored one (no new version).
    pub changed: bool,
    pub n_entities: u64,
    /// Kong's `POST /config` answer (entities by type, then by id), when asked for.
    pub entities: Option<Value>,
}

/// Why a configuration was not applied. Nothing of it was.
#[derive(Debug)]
pub enum LoadError {
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not a valid declarative configuration (Kong's code 14).
    Parse(declarative::Error),
    /// Valid, but the store refused it: a plugin this data plane does not execute, a
    /// reference to nothing. Kong's code 14 too.
    Refused {
        message: String,
        fields: Value,
        flattened: Vec<Value>,
    },
    /// The store could not apply it.
    Storage(String),
}

// === impl FileMode ===

impl FileMode {
    pub fn new(path: PathBuf, token: Option<String>, max_body: usize) -> FileMode {
        FileMode {
            path,
            token,
            max_body,
            status: Mutex::new(FileStatus::default()),
            one_load: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `POST /config` token; `None`: the endpoint is off.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    pub fn max_body(&self) -> usize {
        self.max_body
    }

    pub fn status(&self) -> FileStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut FileStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// `/status`'s `declarative` object.
    pub fn status_json(&self) -> Value {
        let s = self.status();
        json!({
            "path": self.path.display().to_string(),
            "epoch": FILE_EPOCH,
            "last_applied_version": s.last_applied_version,
            "last_loaded_at": s.last_loaded_at,
            "last_source": s.last_source.map(Source::as_str),
            "last_error": s.last_error,
            "last_error_at": s.last_error_at,
            "applied": s.applied,
            "unchanged": s.unchanged,
            "failed": s.failed,
            "post_config": self.token.is_some(),
        })
    }
}

// === impl LoadError ===

impl LoadError {
    /// Kong's `POST /config` answer body for an invalid configuration (code 14,
    /// `kong/db/errors.lua`); `None` for errors that are not the configuration's.
    pub fn kong_body(&self, flatten: bool) -> Option<Value> {
        match self {
            LoadError::Parse(e) => Some(e.kong_body(flatten)),
            LoadError::Refused {
                message,
                fields,
                flattened,
            } => {
                let mut body = json!({
                    "code": 14,
                    "name": "invalid declarative configuration",
                    "message": message,
                    "fields": fields,
                });
                if flatten {
                    body["fields"] = json!({});
                    body["flattened_errors"] = Value::Array(flattened.clone());
                }
                Some(body)
            }
            LoadError::Read { .. } | LoadError::Storage(_) => None,
        }
    }
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Read { path, error } => write!(f, "reading {}: {error}", path.display()),
            LoadError::Parse(e) => write!(f, "{e}"),
            LoadError::Refused { message, .. } => f.write_str(message),
            LoadError::Storage(e) => write!(f, "storing the configuration: {e}"),
        }
    }
}

impl std::error::Error for LoadError {}

impl From<DpStoreError> for LoadError {
    fn from(e: DpStoreError) -> LoadError {
        LoadError::Storage(e.to_string())
    }
}

impl From<ApplyError> for LoadError {
    fn from(e: ApplyError) -> LoadError {
        match e {
            ApplyError::Invalid {
                message,
                fields,
                flattened,
            } => LoadError::Refused {
                // The store words it for a sync; this is a file.
                message: match message.strip_prefix("sync deltas is invalid: ") {
                    Some(rest) => format!("declarative config is invalid: {rest}"),
                    None => message,
                },
                fields,
                flattened,
            },
            other => LoadError::Storage(other.to_string()),
        }
    }
}

// === loading ===

/// When a load happens: at startup a failure stops the data plane, later it is reported and
/// the last good configuration stays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    Startup,
    Reload,
}

/// Reads the file and applies it (blocking: run it on a blocking thread).
pub fn load_file(shared: &DpShared, when: When) -> Result<Loaded, LoadError> {
    let fm = shared.file().expect("a data plane in file mode");
    let text = std::fs::read(fm.path()).map_err(|error| LoadError::Read {
        path: fm.path().to_owned(),
        error,
    });
    let result = text.and_then(|text| load_text(shared, &text, false));
    report(shared, Source::File, when, &result);
    result
}

/// Applies a posted configuration (blocking: run it on a blocking thread).
pub fn load_posted(shared: &DpShared, text: &[u8]) -> Result<Loaded, LoadError> {
    let result = load_text(shared, text, true);
    report(shared, Source::Post, When::Reload, &result);
    result
}

/// Records a load's outcome in the status and the log.
fn report(shared: &DpShared, source: Source, when: When, result: &Result<Loaded, LoadError>) {
    let Some(fm) = shared.file() else { return };
    let now = crate::node::now_secs();
    match result {
        Ok(l) => {
            if l.changed {
                tracing::info!(
                    source = source.as_str(),
                    version = l.version,
                    entities = l.n_entities,
                    "declarative configuration applied"
                );
            } else {
                tracing::info!(
                    source = source.as_str(),
                    version = l.version,
                    "declarative configuration unchanged: nothing applied"
                );
            }
            fm.update(|s| {
                s.last_applied_version = Some(l.version);
                s.last_loaded_at = Some(now);
                s.last_source = Some(source);
                s.last_error = None;
                s.last_error_at = None;
                if l.changed {
                    s.applied += 1;
                } else {
                    s.unchanged += 1;
                }
            });
        }
        Err(e) => {
            let shown = match source {
                Source::File => format!("{}: {e}", fm.path().display()),
                Source::Post => format!("POST /config: {e}"),
            };
            match when {
                // `dp::start` fails with it, and the binary prints it.
                When::Startup => {
                    tracing::debug!(error = %shown, "declarative configuration refused")
                }
                When::Reload => tracing::error!(
                    source = source.as_str(),
                    error = %shown,
                    "declarative configuration refused; the last good configuration is still served"
                ),
            }
            fm.update(|s| {
                s.last_error = Some(shown);
                s.last_error_at = Some(now);
                s.failed += 1;
            });
        }
    }
}

/// Parses `text` and applies it as one full apply under [`FILE_EPOCH`] at the stored version
/// + 1, or nothing when it equals the stored configuration.
fn load_text(shared: &DpShared, text: &[u8], want_entities: bool) -> Result<Loaded, LoadError> {
    let fm = shared.file().expect("a data plane in file mode");
    let store = &shared.store;
    let registry = store.registry();
    let config = declarative::parse(
        registry,
        text,
        &ParseOptions {
            now: crate::node::now_secs(),
        },
    )
    .map_err(LoadError::Parse)?;
    let _one = fm.one_load.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let before = store.state();
    let version = before.version + 1;
    let snapshot = store.snapshot()?;
    let default_ws = config
        .entities
        .iter()
        .find(|e| {
            e.entity_type == crate::schema::WORKSPACES
                && e.value().get("name").and_then(Value::as_str) == Some("default")
        })
        .map(|e| e.id.clone());
    // Settled bodies are held as JSON text until the write transaction takes them one at a
    // time: a tree per entity would be several times the configuration.
    let mut entities: Vec<(String, String, String, String)> =
        Vec::with_capacity(config.entities.len() + 1);
    let now = crate::node::now_secs();
    let ws_id = match default_ws {
        Some(id) => id,
        None => {
            let id = DEFAULT_WORKSPACE_ID.to_owned();
            let body = json!({
                "id": id,
                "name": "default",
                "comment": null,
                "config": {},
                "meta": {},
                "created_at": now,
                "updated_at": now,
            });
            let stored = stored_in(&snapshot, crate::schema::WORKSPACES, &id, &id)?;
            let body = settle(body, &[], stored.as_ref(), now);
            entities.push((
                crate::schema::WORKSPACES.into(),
                id.clone(),
                id.clone(),
                body.to_string(),
            ));
            id
        }
    };
    for e in config.entities {
        let workspaceable = registry
            .get(&e.entity_type)
            .is_none_or(|schema| schema.workspaceable);
        let ws = if workspaceable {
            ws_id.clone()
        } else {
            e.id.clone()
        };
        let stored = stored_in(&snapshot, &e.entity_type, &ws, &e.id)?;
        // Parsed back one entity at a time.
        let body = settle(e.value(), &e.generated, stored.as_ref(), now);
        entities.push((e.entity_type, e.id, ws, body.to_string()));
    }
    drop(snapshot);
    let mut apply = store.begin(ApplyKind::Full {
        version,
        epoch: Some(FILE_EPOCH.to_owned()),
    })?;
    apply.skip_if_unchanged();
    let mut out = want_entities.then(Map::new);
    for (entity_type, id, ws_id, text) in entities {
        let body: Value = serde_json::from_str(&text).map_err(|e| {
            LoadError::Storage(format!("settled entity {entity_type}/{id} unreadable: {e}"))
        })?;
        drop(text);
        if let Some(out) = &mut out
            && entity_type != crate::schema::WORKSPACES
        {
            let by_id = out
                .entry(entity_type.clone())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(m) = by_id {
                m.insert(id.clone(), body.clone());
            }
        }
        apply.delta(Delta {
            entity_type,
            id,
            ws_id,
            version,
            entity: Some(body),
        })?;
    }
    let applied = apply.commit().map_err(|e| {
        let mut e = LoadError::from(e);
        if let (LoadError::Refused { message, .. }, Some(_)) = (&mut e, shared.proxy())
            && message.contains("not enabled")
        {
            // The store words it as Kong; say what this data plane can do about it.
            message.push_str(&format!(
                " (this data plane's proxy executes only {}; a data plane started with \
                 --proxy-listen off stores any plugin without executing it)",
                super::proxy::plugins::EXECUTED
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        e
    })?;
    let changed = !(applied.n_deltas == 0 && applied.version == before.version);
    if changed {
        shared
            .metrics
            .apply_duration(super::metrics::ApplyKind::Full, started.elapsed());
        shared.applied(applied.version);
    }
    Ok(Loaded {
        version: applied.version,
        changed,
        n_entities: applied.n_entities,
        entities: out.map(Value::Object),
    })
}

/// The served configuration as a file in Kong's `db_export` shape (YAML), for `GET /config`.
pub fn export(shared: &DpShared) -> Result<String, DpStoreError> {
    let registry = shared.store.registry();
    let snapshot = shared.store.snapshot()?;
    let mut entities = Vec::new();
    for schema in registry.entities() {
        for mut v in snapshot.list(&schema.name)? {
            if let Value::Object(m) = &mut v {
                m.remove("ws_id");
            }
            entities.push((schema.name.clone(), v));
        }
    }
    Ok(declarative::write(
        registry,
        entities.iter().map(|(t, v)| (t.as_str(), v)),
        declarative::WriteOptions {
            format: declarative::OutputFormat::Yaml,
            nested: false,
        },
    ))
}

/// The stored entity `id` of `entity_type`, when it is in workspace `ws_id`.
fn stored_in(
    snapshot: &super::store::Snapshot,
    entity_type: &str,
    ws_id: &str,
    id: &str,
) -> Result<Option<Value>, LoadError> {
    Ok(snapshot
        .get_by_id(entity_type, id)?
        .and_then(|(ws, v)| (ws == ws_id).then_some(v)))
}

/// The entity to store for `body` (as the reader gave it) given the stored entity of the
/// same type and id: see [`declarative::settle`].
fn settle(mut body: Value, generated: &[String], stored: Option<&Value>, now: i64) -> Value {
    if let Some(stored) = stored {
        declarative::settle(&mut body, stored, generated, now);
    }
    body
}

/// The file task: re-reads the file on SIGHUP until `stop`. The first load happens in
/// `dp::start`, which fails when it does.
pub async fn run(
    shared: Arc<DpShared>,
    mut hangup: Option<tokio::signal::unix::Signal>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let hup = async {
            match &mut hangup {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        let got = tokio::select! {
            got = hup => got,
            _ = stop.wait_for(|s| *s) => return,
        };
        if got.is_none() {
            hangup = None;
            continue;
        }
        tracing::info!("SIGHUP: reading the declarative configuration again");
        let s = shared.clone();
        // The outcome is in the status and the log.
        let _ = tokio::task::spawn_blocking(move || load_file(&s, When::Reload)).await;
    }
}
