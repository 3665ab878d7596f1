//! What makes an apply valid: the [`Checker`] (version rules and per-entity validation, which
//! need no table), the checks of the final state (foreign references and unique keys, which
//! need the tables at commit), and Kong-style error collection ([`Errors`]).

use std::collections::HashSet;
use std::sync::Arc;

use redb::{ReadableTable, WriteTransaction};
use serde_json::{Map, Value, json};

use crate::dp::store::apply::{Pending, Upsert, Work};
use crate::dp::store::tables::{ENTITIES, KEYS, REFS, key_ws, parse_body};
use crate::dp::store::{ApplyError, ApplyKind, VersionError};
use crate::proto::{Delta, StateHash};
use crate::schema::index::CACHE_KEY;
use crate::schema::{EntitySchema, FieldErrors, Mode, Registry};

/// At most this many entities are reported in one validation error.
const MAX_REPORTED: usize = 100;

/// The part of an apply that reads no table: it turns deltas into [`Pending`] writes (or
/// collected errors), so it can run on another thread than the one writing.
pub(super) struct Checker {
    pub(super) registry: Arc<Registry>,
    pub(super) kind: ApplyKind,
    /// The version stored when the transaction began.
    pub(super) stored_version: i64,
    pub(super) last_version: Option<i64>,
    pub(super) errors: Errors,
    pub(super) version_error: Option<VersionError>,
    pub(super) n_deltas: u64,
    /// The plugins this data plane runs, when it says ([`DpStore::only_plugins`]).
    ///
    /// [`DpStore::only_plugins`]: crate::dp::store::DpStore::only_plugins
    pub(super) runnable_plugins: Option<Arc<std::collections::HashSet<String>>>,
    /// Enabled plugins of this apply that this data plane cannot run, by id, as of the
    /// latest delta naming them: the final state is what counts (a later version of the
    /// batch may disable or delete one).
    pub(super) unrunnable: std::collections::BTreeMap<String, String>,
}

/// Validation errors collected Kong-style.
#[derive(Default)]
pub(super) struct Errors {
    fields: Map<String, Value>,
    flattened: Vec<Value>,
    n: usize,
}

// === impl Checker ===

impl Checker {
    pub(super) fn new(
        registry: Arc<Registry>,
        kind: ApplyKind,
        stored_version: i64,
        runnable_plugins: Option<Arc<std::collections::HashSet<String>>>,
    ) -> Checker {
        Checker {
            registry,
            kind,
            stored_version,
            last_version: None,
            errors: Errors::default(),
            version_error: None,
            n_deltas: 0,
            runnable_plugins,
            unrunnable: Default::default(),
        }
    }

    /// Tracks whether plugin `id`, as this delta leaves it (`None`: deleted), is one this
    /// data plane cannot run.
    fn note_plugin(&mut self, id: &str, entity: Option<&Value>) {
        let Some(runnable) = &self.runnable_plugins else {
            return;
        };
        let name = entity
            .filter(|e| e["enabled"].as_bool() != Some(false))
            .and_then(|e| e["name"].as_str())
            .filter(|n| !runnable.contains(*n));
        match name {
            Some(n) => {
                self.unrunnable.insert(id.to_owned(), n.to_owned());
            }
            None => {
                self.unrunnable.remove(id);
            }
        }
    }

    /// Reports the plugins the batch leaves enabled that this data plane cannot run, in
    /// Kong's words for a plugin missing from its `plugins` property
    /// (`kong/db/schema/entities/plugins.lua`).
    pub(super) fn check_runnable(&mut self) {
        for (id, name) in std::mem::take(&mut self.unrunnable) {
            let message = format!(
                "plugin '{name}' not enabled; add it to the 'plugins' configuration property"
            );
            self.errors.push(
                crate::schema::PLUGINS,
                &id,
                None,
                json!({ "name": message }),
            );
        }
    }

    /// The delta as a write, `None` when it is not to be written (it is invalid, or the
    /// batch is rejected anyway). Version errors end the apply.
    pub(super) fn check(&mut self, d: Delta) -> Result<Option<Pending>, ApplyError> {
        if let Some(e) = &self.version_error {
            return Err(e.clone().into());
        }
        if let Err(e) = self.check_version(d.version) {
            self.version_error = Some(e.clone());
            return Err(e.into());
        }
        self.n_deltas += 1;
        let Some(schema) = self.registry.get(&d.entity_type).cloned() else {
            self.errors.push(
                &d.entity_type,
                &d.id,
                None,
                json!({"@entity": [format!("unknown entity type: {}", d.entity_type)]}),
            );
            return Ok(None);
        };
        if d.ws_id.is_empty() {
            self.errors.push(
                &d.entity_type,
                &d.id,
                None,
                json!({"@entity": ["workspace id not found"]}),
            );
            return Ok(None);
        }
        if d.entity.is_none() && schema.name == crate::schema::PLUGINS {
            self.note_plugin(&d.id, None);
        }
        let upsert = match d.entity {
            None => None,
            Some(entity) => {
                // What is derived from the value first: validation consumes it (no copy).
                let body = serde_json::to_vec(&entity).unwrap_or_default();
                if schema.name == crate::schema::PLUGINS {
                    self.note_plugin(&d.id, Some(&entity));
                }
                let index = schema.index_of(&entity);
                if let Err(tree) = check_entity(&self.registry, &schema, &d.id, entity) {
                    let entity: Value = serde_json::from_slice(&body).unwrap_or_default();
                    let name = entity
                        .get(schema.endpoint_key.as_deref().unwrap_or("name"))
                        .and_then(Value::as_str);
                    self.errors.push(&d.entity_type, &d.id, name, tree);
                    return Ok(None);
                }
                if !self.errors.is_empty() {
                    // The batch is rejected anyway: validate the rest, write nothing more.
                    return Ok(None);
                }
                let hash = StateHash::of_entity_bytes(&schema.name, &d.ws_id, &d.id, &body);
                Some(Upsert { body, hash, index })
            }
        };
        if !self.errors.is_empty() {
            return Ok(None);
        }
        Ok(Some(Pending {
            schema,
            id: d.id,
            ws: d.ws_id,
            upsert,
        }))
    }

    fn check_version(&mut self, v: i64) -> Result<(), VersionError> {
        match (&self.kind, self.last_version) {
            (ApplyKind::Full { version, .. }, _) => {
                if v != *version {
                    return Err(VersionError::FullSyncMismatch {
                        expected: *version,
                        got: v,
                    });
                }
            }
            (ApplyKind::Incremental { .. }, None) => {
                if v != self.stored_version + 1 {
                    return Err(VersionError::Gap {
                        after: self.stored_version,
                        got: v,
                    });
                }
            }
            (ApplyKind::Incremental { .. }, Some(last)) => {
                if v != last && v != last + 1 {
                    return Err(VersionError::Gap {
                        after: last,
                        got: v,
                    });
                }
            }
        }
        self.last_version = Some(v);
        Ok(())
    }
}

// === impl Errors ===

impl Errors {
    pub(super) fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub(super) fn push(&mut self, ty: &str, id: &str, name: Option<&str>, tree: Value) {
        self.n += 1;
        if self.flattened.len() >= MAX_REPORTED {
            return;
        }
        let mut errors = Vec::new();
        flatten_tree(None, &tree, &mut errors);
        let mut item = Map::new();
        item.insert("entity_type".into(), Value::from(ty));
        item.insert("entity_id".into(), Value::from(id));
        if let Some(name) = name {
            item.insert("entity_name".into(), Value::from(name));
        }
        item.insert("errors".into(), Value::Array(errors));
        self.flattened.push(Value::Object(item));
        let by_id = self
            .fields
            .entry(ty.to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(m) = by_id {
            m.entry(id.to_owned()).or_insert(tree);
        }
    }

    pub(super) fn into_error(self) -> ApplyError {
        let mut parts = Vec::new();
        for item in self.flattened.iter().take(5) {
            let ty = item["entity_type"].as_str().unwrap_or_default();
            let id = item["entity_id"].as_str().unwrap_or_default();
            let msgs: Vec<String> = item["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| match e.get("field").and_then(Value::as_str) {
                    Some(f) => format!("{f}: {}", e["message"].as_str().unwrap_or_default()),
                    None => e["message"].as_str().unwrap_or_default().to_owned(),
                })
                .collect();
            parts.push(format!("{ty} {id}: {}", msgs.join("; ")));
        }
        let more = self.n.saturating_sub(parts.len());
        let mut message = format!("sync deltas is invalid: {}", parts.join(", "));
        if more > 0 {
            message.push_str(&format!(" (and {more} more)"));
        }
        ApplyError::Invalid {
            message,
            fields: Value::Object(self.fields),
            flattened: self.flattened,
        }
    }
}

// === final state ===

/// The checks that need the final state of the batch: every foreign reference written points
/// at a stored parent, no deleted entity is still referenced, and each contested unique key
/// has exactly one holder (whose key row is then set). Failures go to `errors`.
pub(super) fn check_final_state(
    registry: &Registry,
    txn: &WriteTransaction,
    work: &Work,
    errors: &mut Errors,
) -> Result<(), ApplyError> {
    let entities = txn.open_table(ENTITIES)?;
    let mut keys = txn.open_table(KEYS)?;
    let refs = txn.open_table(REFS)?;
    let mut reported = HashSet::new();
    let mut dangling = |[parent_ty, parent_id, child_ty, field, child_id]: [&str; 5]| {
        if reported.insert((child_ty.to_owned(), child_id.to_owned(), field.to_owned())) {
            let shown = json!({ "id": parent_id });
            errors.push(
                child_ty,
                child_id,
                None,
                json!({
                    "@entity": [format!("could not find {child_ty}'s foreign references {parent_ty} ({shown})")],
                    field: format!("does not reference an existing '{parent_ty}' entity"),
                }),
            );
        }
    };
    if work.full {
        // Every row is this sync's: check each, looking each parent up once (rows are in
        // parent order).
        let mut last_parent: Option<(String, String, bool)> = None;
        for row in refs.iter()? {
            let (key, _) = row?;
            let (parent_ty, parent_id, child_ty, field, child_id) = key.value();
            let exists = match &last_parent {
                Some((t, i, exists)) if t == parent_ty && i == parent_id => *exists,
                _ => {
                    let exists = entities.get((parent_ty, parent_id))?.is_some();
                    last_parent = Some((parent_ty.to_owned(), parent_id.to_owned(), exists));
                    exists
                }
            };
            if !exists {
                dangling([parent_ty, parent_id, child_ty, field, child_id]);
            }
        }
    }
    for [parent_ty, parent_id, child_ty, field, child_id] in &work.refs_written {
        let current = refs
            .get((
                parent_ty.as_str(),
                parent_id.as_str(),
                child_ty.as_str(),
                field.as_str(),
                child_id.as_str(),
            ))?
            .is_some();
        if !current
            || entities
                .get((parent_ty.as_str(), parent_id.as_str()))?
                .is_some()
        {
            continue;
        }
        dangling([parent_ty, parent_id, child_ty, field, child_id].map(String::as_str));
    }
    for (ty, id) in &work.deleted {
        if entities.get((ty.as_str(), id.as_str()))?.is_some() {
            continue; // deleted, then written again
        }
        let mut range = refs.range((ty.as_str(), id.as_str(), "", "", "")..)?;
        if let Some(row) = range.next() {
            let (key, _) = row?;
            let (p, pid, child_ty, field, child_id) = key.value();
            if (p, pid) == (ty.as_str(), id.as_str()) {
                errors.push(
                    ty,
                    id,
                    None,
                    json!({"@entity": [format!(
                        "deleted, but {child_ty} {child_id} still references it ({field})"
                    )]}),
                );
            }
        }
    }
    for ([ty, ws, field, value], candidates) in &work.contested {
        let key = (ty.as_str(), ws.as_str(), field.as_str(), value.as_str());
        let Some(schema) = registry.get(ty) else {
            continue;
        };
        let holds = |id: &str| -> Result<bool, ApplyError> {
            let Some(row) = entities.get((ty.as_str(), id))? else {
                return Ok(false);
            };
            let (row_ws, body) = row.value();
            let entity = parse_body(body)?;
            Ok(key_ws(schema, row_ws) == ws
                && schema
                    .index_of(&entity)
                    .keys
                    .iter()
                    .any(|(f, v)| f == field && v == value))
        };
        let mut holders = Vec::new();
        for id in candidates {
            if holds(id)? {
                holders.push(id.as_str());
            }
        }
        match holders.as_slice() {
            [] => {
                keys.remove(key)?;
            }
            [holder] => {
                keys.insert(key, *holder)?;
            }
            [first, rest @ ..] => {
                let shown = if field == CACHE_KEY {
                    format!("cache key {value}")
                } else {
                    format!("{field} = {value}")
                };
                for other in rest {
                    errors.push(
                        ty,
                        other,
                        None,
                        json!({"@entity": [format!("UNIQUE violation: {shown} already belongs to {first}")]}),
                    );
                }
            }
        }
    }
    Ok(())
}

// === helpers ===

/// Kong's flattened errors: `{"type": "entity", "message"}` or `{"type": "field", "field",
/// "message"}` with dotted paths.
fn flatten_tree(prefix: Option<&str>, tree: &Value, out: &mut Vec<Value>) {
    match (prefix, tree) {
        (None, Value::Object(m)) => {
            for (k, v) in m {
                if k == "@entity" {
                    for msg in v.as_array().into_iter().flatten() {
                        out.push(json!({"type": "entity", "message": msg}));
                    }
                } else {
                    flatten_tree(Some(k), v, out);
                }
            }
        }
        (Some(p), Value::Object(m)) => {
            for (k, v) in m {
                flatten_tree(Some(&format!("{p}.{k}")), v, out);
            }
        }
        (Some(p), Value::Array(a)) => {
            for (i, v) in a.iter().enumerate() {
                if !v.is_null() {
                    flatten_tree(Some(&format!("{p}.{}", i + 1)), v, out);
                }
            }
        }
        (Some(p), v) => out.push(json!({"type": "field", "field": p, "message": v
            .as_str()
            .map(Value::from)
            .unwrap_or_else(|| Value::from(v.to_string()))})),
        (None, v) => out.push(json!({"type": "entity", "message": v})),
    }
}

/// Validates one upsert: an object whose primary key is the delta's id, valid for its schema.
/// Returns Kong's field error tree.
fn check_entity(
    registry: &Registry,
    schema: &EntitySchema,
    id: &str,
    entity: Value,
) -> Result<(), Value> {
    if !entity.is_object() {
        return Err(json!({"@entity": ["expected an object"]}));
    }
    match entity.get(&schema.primary_key) {
        Some(Value::String(pk)) if pk == id => {}
        _ => {
            return Err(json!({ schema.primary_key.as_str(): format!(
                "does not match the delta's primary key '{id}'"
            ) }));
        }
    }
    validate_entity(registry, schema, entity).map_err(|e| Value::Object(e.0))
}

/// Schema validation of a stored-form entity: [`Registry::accepts_stored`] on a value the
/// caller no longer needs, so it is not copied first (the deep copy of every entity was a
/// fifth of the CPU a full sync spends decoding and validating: 1.39 s → 1.10 s for 100k
/// services in `benches/dp_apply.rs`). `prepare` also applies defaults and transforms; only its
/// verdict is used, never its output. A disabled entity that does not validate is accepted.
fn validate_entity(
    registry: &Registry,
    schema: &EntitySchema,
    entity: Value,
) -> Result<(), FieldErrors> {
    let disabled = entity.get("enabled") == Some(&Value::Bool(false));
    match registry.prepare(schema, entity, None, Mode::Insert, 0) {
        Ok(_) => Ok(()),
        Err(_) if disabled => Ok(()),
        Err(e) => Err(e),
    }
}
