//! Declarative import: a whole configuration file applied as one version of the change log.
//!
//! [`Store::import`] takes a parsed [`declarative::Config`] and makes the default workspace
//! hold exactly that configuration (decK `sync`, Kong DB-less), or, in
//! [`ImportMode::Upsert`], adds and replaces its entities without deleting any (Kong's
//! `kong config db_import`, `kong/db/declarative/import.lua` `load_into_db`). One
//! transaction, one version:
//!
//! 1. the version lock is taken first (`Store::begin_on`, as every write);
//! 2. the stored entities, key rows and references are read once, as text;
//! 3. the file is diffed against them in memory: an entity equal to its stored self once
//!    timestamps and generated fields are taken from the stored one is left alone; the others
//!    are created, updated (keeping `created_at`, with `updated_at` now) or deleted;
//! 4. the final state's unique keys and references are checked, every problem at once, in
//!    the declarative error shape (Kong's code 14);
//! 5. the changes are written in multi-row statements (chunked under SQLite's bind-parameter
//!    limit), with one version holding every delta, its state hash folded from the stored
//!    text, the head moved and `pg_notify` sent with the commit.
//!
//! Deliberate rules, where Kong has none (its DB-less import replaces everything):
//! - with decK's `select_tags`, only stored entities carrying all of those tags are deleted;
//!   a stored entity the import would delete that a kept entity (one without the tags)
//!   still references makes the import fail, naming both: nothing is cascaded silently;
//! - an entity whose id the reader generated at random (`Entity::generated` holds the
//!   primary key: certificates, unnamed services and routes, consumers without a username)
//!   takes the id of an unclaimed stored entity of its type with the same content
//!   (ignoring id, timestamps and generated fields), and its children's references follow,
//!   so a file without ids imports again as a no-op.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::write::{Indexed, PgScript, SqliteScript, Txn, WriteConn, canonical, index_of, pk_json};
use super::{StateHash, Store, StoreError};
use crate::declarative;
use crate::node::now_secs;
use crate::schema::{EntitySchema, Registry, WORKSPACES};

/// How [`Store::import`] treats stored entities the file does not name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// The file is the whole configuration: entities absent from it are deleted (only those
    /// carrying every `select_tags` tag when the file has some).
    Sync,
    /// Upsert by primary key, never delete (`kong config db_import`).
    Upsert,
}

/// Changes of one entity type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TypeCounts {
    pub created: usize,
    pub updated: usize,
    pub deleted: usize,
}

/// What an import did, or (dry run) would do.
#[derive(Debug, Clone)]
pub struct ImportOutcome {
    /// The version the import created (for a dry run: would create); `None` when the file
    /// changes nothing.
    pub version: Option<i64>,
    /// The head before the import.
    pub previous_version: i64,
    /// True when nothing was written.
    pub dry_run: bool,
    /// Per entity type with at least one change.
    pub counts: BTreeMap<String, TypeCounts>,
    /// Every entity of the file as stored after the import (canonical JSON text), in the
    /// file's order: an unchanged entity as it was stored, with its timestamps and generated
    /// fields.
    pub entities: Vec<ImportedEntity>,
}

impl ImportOutcome {
    /// The number of deltas (created + updated + deleted, every type).
    pub fn n_changes(&self) -> usize {
        self.counts
            .values()
            .map(|c| c.created + c.updated + c.deleted)
            .sum()
    }
}

/// One entity of the file after an import.
#[derive(Debug, Clone)]
pub struct ImportedEntity {
    /// Shared by every entity of the type.
    pub entity_type: Arc<str>,
    /// Shared with the import's own record of the change.
    pub id: Arc<str>,
    /// Canonical JSON text, as stored (shared with the write that stored it).
    pub body: Arc<str>,
}

/// `(type, id)` of an entity the file names.
type FileKey = (Arc<str>, Arc<str>);

fn file_key(ty: &str, id: &str) -> FileKey {
    (Arc::from(ty), Arc::from(id))
}

/// A stored entity, as read at the start of the import.
struct Stored {
    ws: Arc<str>,
    /// Shared with the outcome (unchanged entities) and the plans (the text before a change),
    /// so one stored text is held once.
    body: Arc<str>,
    /// Named by the file (kept, updated or replaced), so never deleted.
    in_file: bool,
}

/// One change the import makes.
struct Planned {
    ty: Arc<str>,
    id: Arc<str>,
    ws: Arc<str>,
    /// The stored workspace and text before the change, `None` when new.
    old: Option<(Arc<str>, Arc<str>)>,
    /// The text after the change, `None` when deleted. Its index rows are computed from it
    /// where they are needed (the final-state check, the writes, a chunk at a time) rather
    /// than held for every change: a large import's rows would be one more copy of it.
    new: Option<Arc<str>>,
}

impl Planned {
    /// The new index rows (created and updated entities).
    fn index(&self, registry: &Registry) -> Result<Option<(Value, Indexed)>, StoreError> {
        let (Some(new), Some(schema)) = (&self.new, registry.get(&self.ty)) else {
            return Ok(None);
        };
        let body: Value = serde_json::from_str(new).map_err(|e| {
            StoreError::Internal(format!(
                "entity {}/{} written unreadable: {e}",
                self.ty, self.id
            ))
        })?;
        let index = index_of(schema, &body);
        Ok(Some((body, index)))
    }
}

/// Most bind parameters in one statement: SQLite's limit is 32766, PostgreSQL's 65535.
const MAX_PARAMS: usize = 30_000;
/// Most ids in one `IN (...)` list.
const MAX_IDS: usize = 5_000;

/// A bound value of a bulk statement.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    Int(i64),
    Int4(i32),
}

impl Store {
    /// Applies a declarative configuration to the default workspace in one transaction and
    /// at most one version (none when nothing changes). With `dry_run`, everything is
    /// computed under the version lock and rolled back. Problems of the final state
    /// (unique keys, references) are [`StoreError::InvalidConfig`], every one at once, and
    /// nothing is written.
    pub async fn import(
        &self,
        config: declarative::Config,
        mode: ImportMode,
        dry_run: bool,
    ) -> Result<ImportOutcome, StoreError> {
        let mut slot = self.inner.write_slot.lock().await;
        let slot = &mut *slot;
        let (start, hash) = self.begin_on(slot).await?;
        let Some(conn) = &mut slot.conn else {
            return Err(StoreError::Internal("write connection missing".into()));
        };
        let mut tx = Txn::on(conn);
        let result = self
            .import_in(&mut tx, config, mode, dry_run, start, hash)
            .await;
        match result {
            Ok((outcome, Some(head))) => {
                if let Some(hook) = &self.inner.options.before_commit {
                    let delay = hook();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                if let Err(e) = tx.commit(Some((head.0, &head.1))).await {
                    slot.discard();
                    return Err(StoreError::CommitUnknown(e.to_string()));
                }
                slot.in_txn = false;
                self.observe(head.0);
                Ok(outcome)
            }
            other => {
                if tx.raw("ROLLBACK").await.is_ok() {
                    slot.in_txn = false;
                } else {
                    slot.discard();
                }
                other.map(|(outcome, _)| outcome)
            }
        }
    }

    /// The import inside the transaction. Returns the outcome and, when something is to be
    /// committed, the new head.
    async fn import_in(
        &self,
        tx: &mut Txn<'_>,
        config: declarative::Config,
        mode: ImportMode,
        dry_run: bool,
        start: i64,
        mut hash: StateHash,
    ) -> Result<(ImportOutcome, Option<(i64, StateHash)>), StoreError> {
        let registry = self.registry().clone();
        let ws_default: Arc<str> = self.ws().await?.into();
        let now = now_secs();
        // One shared name per type: a large import holds a type and id per change.
        let mut type_names: HashMap<String, Arc<str>> = HashMap::new();

        let mut stored = load_entities(tx.conn).await?;
        let mut problems = ConfigProblems::default();
        let mut plans: Vec<Planned> = Vec::with_capacity(config.entities.len());
        let declarative::Config {
            entities: file_entities,
            select_tags,
            ..
        } = config;
        let mut entities = Vec::with_capacity(file_entities.len());
        // (type, id the file gave or the reader generated) -> stored id, for random ids.
        let mut remap: HashMap<(String, String), String> = HashMap::new();
        // Per type, stored entities by content, built when a file entity has a random id.
        let mut by_content: HashMap<String, HashMap<String, Vec<String>>> = HashMap::new();
        // Shares the type names and ids the plans and the outcome hold.
        let mut file_ids: HashSet<FileKey> = HashSet::new();

        // The file's entities are consumed one at a time: each body is parsed, compared and
        // dropped, so the file's texts and the planned ones are never both held whole.
        for entity in file_entities {
            let ty = entity.entity_type.as_str();
            if ty == WORKSPACES {
                // The file's entities all live in the default workspace.
                continue;
            }
            let Some(schema) = registry.get(ty).cloned() else {
                return Err(StoreError::BadRequest(format!(
                    "unknown entity type '{ty}'"
                )));
            };
            let mut body = entity.value();
            remap_references(&registry, &schema, &mut body, &remap);
            let mut id = entity.id.clone();
            if entity.generated.iter().any(|g| *g == schema.primary_key) {
                let contents = by_content
                    .entry(format!("{ty}\0{}", entity.generated.join(",")))
                    .or_insert_with(|| {
                        content_index(&schema, &stored, &file_ids, &entity.generated)
                    });
                let key = content_key(&schema, &body, &entity.generated);
                if let Some(stored_id) = contents.get_mut(&key).and_then(Vec::pop) {
                    remap.insert((ty.to_owned(), id.clone()), stored_id.clone());
                    if let Value::Object(m) = &mut body {
                        m.insert(schema.primary_key.clone(), Value::String(stored_id.clone()));
                    }
                    id = stored_id;
                }
            }
            let text_key = (ty.to_owned(), id.clone());
            let ty_name = type_names
                .entry(ty.to_owned())
                .or_insert_with(|| Arc::from(ty))
                .clone();
            let id: Arc<str> = Arc::from(id);
            if !file_ids.insert((ty_name.clone(), id.clone())) {
                problems.entity(
                    &schema,
                    &id,
                    &body,
                    None,
                    format!(
                        "uniqueness violation: '{ty}' entity with primary key set to '{id}' already declared"
                    ),
                );
                continue;
            }
            let ws = if schema.workspaceable {
                ws_default.clone()
            } else {
                id.clone()
            };
            let text = match stored.get_mut(&text_key) {
                Some(old) => {
                    old.in_file = true;
                    let previous: Value = serde_json::from_str(&old.body).map_err(|e| {
                        StoreError::Internal(format!("corrupt entity {ty}/{id}: {e}"))
                    })?;
                    let changed = declarative::settle(&mut body, &previous, &entity.generated, now);
                    drop(previous);
                    if !changed {
                        // Unchanged: the stored text itself, shared.
                        old.body.clone()
                    } else {
                        let text: Arc<str> = Arc::from(canonical(&body));
                        plans.push(Planned {
                            ty: ty_name.clone(),
                            id: id.clone(),
                            ws: ws.clone(),
                            old: Some((old.ws.clone(), old.body.clone())),
                            new: Some(text.clone()),
                        });
                        text
                    }
                }
                None => {
                    // The reader's text unless a reference was remapped above.
                    let text = canonical(&body);
                    let text: Arc<str> = if text == *entity.body {
                        drop(text);
                        entity.body
                    } else {
                        Arc::from(text)
                    };
                    plans.push(Planned {
                        ty: ty_name.clone(),
                        id: id.clone(),
                        ws: ws.clone(),
                        old: None,
                        new: Some(text.clone()),
                    });
                    text
                }
            };
            drop(text_key);
            entities.push(ImportedEntity {
                entity_type: ty_name,
                id,
                body: text,
            });
        }

        // Stored entities the file does not name.
        let mut deleted: HashSet<(String, String)> = HashSet::new();
        if mode == ImportMode::Sync {
            let mut gone: Vec<(&(String, String), &Stored)> = stored
                .iter()
                .filter(|((ty, _), s)| !s.in_file && ty != WORKSPACES)
                .collect();
            if !select_tags.is_empty() {
                gone.retain(|(_, s)| {
                    let tags = serde_json::from_str::<Value>(&s.body)
                        .map(|v| crate::schema::index::tags_of(&v))
                        .unwrap_or_default();
                    select_tags.iter().all(|t| tags.contains(t))
                });
            }
            // Children first, for readers of the log that apply in order.
            gone.sort_by_key(|((ty, id), _)| (std::cmp::Reverse(registry.rank(ty)), id.clone()));
            let mut deletes = Vec::with_capacity(gone.len());
            for ((ty, id), s) in gone {
                deleted.insert((ty.clone(), id.clone()));
                deletes.push(Planned {
                    ty: Arc::from(ty.as_str()),
                    id: Arc::from(id.as_str()),
                    ws: s.ws.clone(),
                    old: Some((s.ws.clone(), s.body.clone())),
                    new: None,
                });
            }
            if !deletes.is_empty() {
                deletes.append(&mut plans);
                plans = deletes;
            }
        }

        check_final_state(
            tx.conn,
            &registry,
            &stored,
            &plans,
            &deleted,
            &file_ids,
            &mut problems,
        )
        .await?;
        if !problems.is_empty() {
            return Err(StoreError::InvalidConfig(Box::new(problems.into_invalid())));
        }

        let mut counts: BTreeMap<String, TypeCounts> = BTreeMap::new();
        for p in &plans {
            let c = counts.entry(p.ty.to_string()).or_default();
            match (&p.old, &p.new) {
                (None, _) => c.created += 1,
                (Some(_), Some(_)) => c.updated += 1,
                (Some(_), None) => c.deleted += 1,
            }
        }
        let version = (!plans.is_empty()).then_some(start + 1);
        let outcome = ImportOutcome {
            version,
            previous_version: start,
            dry_run,
            counts,
            entities,
        };
        // The stored texts are no longer needed: free them before building statements.
        drop(stored);
        let Some(version) = version.filter(|_| !dry_run) else {
            return Ok((outcome, None));
        };
        for p in &plans {
            if let Some((ws, old)) = &p.old {
                hash.sub(&StateHash::of_entity_bytes(
                    &p.ty,
                    ws,
                    &p.id,
                    old.as_bytes(),
                ));
            }
            if let Some(new) = &p.new {
                hash.add(&StateHash::of_entity_bytes(
                    &p.ty,
                    &p.ws,
                    &p.id,
                    new.as_bytes(),
                ));
            }
        }
        write_plans(tx.conn, &registry, &plans, version, &hash, now).await?;
        Ok((outcome, Some((version, hash))))
    }
}

/// What identifies an entity whose id is random: its content without the id, timestamps and
/// generated fields.
fn content_key(schema: &EntitySchema, body: &Value, generated: &[String]) -> String {
    let mut body = body.clone();
    if let Value::Object(m) = &mut body {
        m.remove(&schema.primary_key);
        m.remove("created_at");
        m.remove("updated_at");
        for g in generated {
            m.remove(g);
        }
    }
    canonical(&body)
}

/// Stored entities of `schema`'s type not yet named by the file, by content without the
/// fields the file's entity had generated.
fn content_index(
    schema: &EntitySchema,
    stored: &HashMap<(String, String), Stored>,
    file_ids: &HashSet<FileKey>,
    generated: &[String],
) -> HashMap<String, Vec<String>> {
    let mut index: HashMap<String, Vec<String>> = HashMap::new();
    for ((ty, id), s) in stored {
        if *ty != schema.name || file_ids.contains(&file_key(ty, id)) {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&s.body) {
            index
                .entry(content_key(schema, &v, generated))
                .or_default()
                .push(id.clone());
        }
    }
    // Deterministic choice among equal contents.
    for ids in index.values_mut() {
        ids.sort_unstable_by(|a, b| b.cmp(a));
    }
    index
}

/// Rewrites foreign keys of `body` that name an entity whose random id was replaced by a
/// stored one.
fn remap_references(
    registry: &Registry,
    schema: &EntitySchema,
    body: &mut Value,
    remap: &HashMap<(String, String), String>,
) {
    if remap.is_empty() {
        return;
    }
    let Value::Object(m) = body else { return };
    for fk in registry.references_of(&schema.name) {
        match m.get_mut(&fk.field) {
            Some(Value::Object(key)) => {
                if let Some(Value::String(id)) = key.get_mut("id")
                    && let Some(to) = remap.get(&(fk.parent.clone(), id.clone()))
                {
                    *id = to.clone();
                }
            }
            Some(Value::Array(ids)) if fk.is_array => {
                for v in ids {
                    if let Value::String(id) = v
                        && let Some(to) = remap.get(&(fk.parent.clone(), id.clone()))
                    {
                        *id = to.clone();
                    }
                }
            }
            _ => {}
        }
    }
}

/// Every stored entity, as text.
async fn load_entities(
    conn: &mut WriteConn,
) -> Result<HashMap<(String, String), Stored>, StoreError> {
    const SQL: &str = "SELECT type, id, ws_id, body FROM dp_entities";
    let rows: Vec<(String, String, String, String)> = match conn {
        WriteConn::Sqlite(c) => sqlx::query_as(SQL).fetch_all(&mut **c).await?,
        WriteConn::Postgres(c) => sqlx::query_as(SQL).fetch_all(&mut **c).await?,
    };
    Ok(rows
        .into_iter()
        .map(|(ty, id, ws, body)| {
            (
                (ty, id),
                Stored {
                    ws: ws.into(),
                    body: Arc::from(body),
                    in_file: false,
                },
            )
        })
        .collect())
}

/// The final state's unique keys and references: keys of kept entities (read from the key
/// rows) and of written ones must not collide, every reference of a written entity must name
/// an entity of the final state, and no kept entity may reference a deleted one.
async fn check_final_state(
    conn: &mut WriteConn,
    registry: &Registry,
    stored: &HashMap<(String, String), Stored>,
    plans: &[Planned],
    deleted: &HashSet<(String, String)>,
    file_ids: &HashSet<FileKey>,
    problems: &mut ConfigProblems,
) -> Result<(), StoreError> {
    // Built only when keys are stored (a first import has none).
    let mut changed: HashSet<(&str, &str)> = HashSet::new();
    // (type, ws, name, value) -> id, of entities the import leaves as they are.
    const KEYS: &str = "SELECT type, ws_id, name, value, id FROM dp_keys";
    let rows: Vec<(String, String, String, String, String)> = match conn {
        WriteConn::Sqlite(c) => sqlx::query_as(KEYS).fetch_all(&mut **c).await?,
        WriteConn::Postgres(c) => sqlx::query_as(KEYS).fetch_all(&mut **c).await?,
    };
    // One joined text per key (`type NUL ws NUL name NUL value`): a large import adds a key
    // or two per entity.
    let joined = |ty: &str, ws: &str, name: &str, value: &str| -> Box<str> {
        [ty, ws, name, value].join("\0").into_boxed_str()
    };
    if !rows.is_empty() {
        changed = plans.iter().map(|p| (&*p.ty, &*p.id)).collect();
    }
    let kept: HashMap<Box<str>, Arc<str>> = rows
        .into_iter()
        .filter(|(ty, _, _, _, id)| !changed.contains(&(ty.as_str(), id.as_str())))
        .map(|(ty, ws, name, value, id)| (joined(&ty, &ws, &name, &value), Arc::from(id)))
        .collect();
    drop(changed);
    // The file's own keys, by a hash of the joined key to the plan holding it: a match is
    // compared exactly (the other plan's keys are computed again), so the hash only saves
    // holding every key's text. Keys that differ but share a hash go to `spill`, exactly.
    let hasher = std::hash::RandomState::new();
    let mut file_keys: HashMap<u64, u32> = HashMap::with_capacity(plans.len());
    let mut spill: HashMap<Box<str>, Arc<str>> = HashMap::new();
    let exists = |ty: &str, id: &str| -> bool {
        let k = (ty.to_owned(), id.to_owned());
        file_ids.contains(&file_key(ty, id)) || (stored.contains_key(&k) && !deleted.contains(&k))
    };
    for (pi, p) in plans.iter().enumerate() {
        let Some((body, index)) = p.index(registry)? else {
            continue;
        };
        let Some(schema) = registry.get(&p.ty) else {
            continue;
        };
        let body = || body.clone();
        for (name, value) in &index.keys {
            let k = joined(&p.ty, &p.ws, name, value);
            let other: Option<Arc<str>> = match kept.get(&k) {
                Some(other) => Some(other.clone()),
                None => {
                    use std::collections::hash_map::Entry;
                    match file_keys.entry(std::hash::BuildHasher::hash_one(&hasher, &*k)) {
                        Entry::Vacant(slot) => {
                            slot.insert(u32::try_from(pi).map_err(|_| {
                                StoreError::BadRequest("too many changes for one version".into())
                            })?);
                            None
                        }
                        Entry::Occupied(slot) => {
                            let q = &plans[*slot.get() as usize];
                            let same = q.ty == p.ty
                                && q.ws == p.ws
                                && q.index(registry)?.is_some_and(|(_, ix)| {
                                    ix.keys.iter().any(|(n, v)| n == name && v == value)
                                });
                            if same {
                                Some(q.id.clone())
                            } else {
                                match spill.get(&k) {
                                    Some(other) => Some(other.clone()),
                                    None => {
                                        spill.insert(k, p.id.clone());
                                        None
                                    }
                                }
                            }
                        }
                    }
                }
            };
            match other {
                Some(other) if *other != *p.id => {
                    let what = if name == crate::schema::index::CACHE_KEY {
                        "cache key".to_owned()
                    } else {
                        name.clone()
                    };
                    let shown = value.trim_matches('"');
                    let field = (name != crate::schema::index::CACHE_KEY).then_some(name.as_str());
                    problems.entity(
                        schema,
                        &p.id,
                        &body(),
                        field,
                        format!(
                            "uniqueness violation: '{}' entity with {what} set to '{shown}' already declared (by '{other}')",
                            p.ty
                        ),
                    );
                }
                _ => {}
            }
        }
        for (field, parent, pid) in &index.refs {
            if !exists(parent, pid) {
                problems.entity(
                    schema,
                    &p.id,
                    &body(),
                    Some(field),
                    format!("invalid reference '{field}: {{id=\"{pid}\"}}' (no such entry in '{parent}')"),
                );
            }
        }
    }
    if !deleted.is_empty() {
        const REFS: &str =
            "SELECT parent_type, parent_id, child_type, field, child_id FROM dp_refs";
        let rows: Vec<(String, String, String, String, String)> = match conn {
            WriteConn::Sqlite(c) => sqlx::query_as(REFS).fetch_all(&mut **c).await?,
            WriteConn::Postgres(c) => sqlx::query_as(REFS).fetch_all(&mut **c).await?,
        };
        for (parent_ty, parent_id, child_ty, field, child_id) in rows {
            let child = (child_ty.clone(), child_id.clone());
            if !deleted.contains(&(parent_ty.clone(), parent_id.clone()))
                || deleted.contains(&child)
                || file_ids.contains(&file_key(&child.0, &child.1))
            {
                continue;
            }
            let (Some(schema), Some(s)) = (registry.get(&child_ty), stored.get(&child)) else {
                continue;
            };
            let body = serde_json::from_str::<Value>(&s.body).unwrap_or(Value::Null);
            problems.entity(
                schema,
                &child_id,
                &body,
                Some(&field),
                format!(
                    "the stored '{child_ty}' entity '{child_id}', which the file does not manage (select_tags), references '{parent_ty}' entity '{parent_id}', which the import would delete"
                ),
            );
        }
    }
    Ok(())
}

/// Problems of a declarative configuration found after reading it (the final state's keys
/// and references; plugins a control plane does not accept), in Kong's declarative error
/// shapes: `fields` as `{type: {id: {field: message}}}` and one flattened entry per problem.
#[derive(Default)]
pub struct ConfigProblems {
    /// type -> id -> field (or `@entity`) -> messages.
    fields: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<String>>>>,
    flattened: Vec<Value>,
}

/// At most this many problems are reported.
const MAX_PROBLEMS: usize = 1000;

impl ConfigProblems {
    pub fn is_empty(&self) -> bool {
        self.flattened.is_empty()
    }

    /// One problem of entity `id`, on `field` or (None) the entity.
    pub fn entity(
        &mut self,
        schema: &EntitySchema,
        id: &str,
        body: &Value,
        field: Option<&str>,
        message: String,
    ) {
        if self.flattened.len() >= MAX_PROBLEMS {
            return;
        }
        let error = match field {
            Some(f) => json!({ "type": "field", "field": f, "message": message }),
            None => json!({ "type": "entity", "message": message }),
        };
        let name = schema
            .endpoint_key
            .as_deref()
            .and_then(|k| body.get(k))
            .cloned()
            .unwrap_or(Value::Null);
        let mut entity = body.clone();
        if let Value::Object(m) = &mut entity {
            m.remove("created_at");
            m.remove("updated_at");
        }
        self.flattened.push(json!({
            "entity_type": schema.name.strip_suffix('s').unwrap_or(&schema.name),
            "entity_id": id,
            "entity_name": name,
            "entity_tags": body.get("tags").cloned().unwrap_or(Value::Null),
            "entity": entity,
            "errors": [error],
        }));
        self.fields
            .entry(schema.name.clone())
            .or_default()
            .entry(id.to_owned())
            .or_default()
            .entry(field.unwrap_or("@entity").to_owned())
            .or_default()
            .push(message);
    }

    pub fn into_invalid(self) -> declarative::Invalid {
        let mut fields = Map::new();
        for (ty, by_id) in self.fields {
            let mut ids = Map::new();
            for (id, by_field) in by_id {
                let mut f = Map::new();
                for (field, mut messages) in by_field {
                    let v = if messages.len() == 1 {
                        Value::String(messages.remove(0))
                    } else {
                        Value::Array(messages.into_iter().map(Value::String).collect())
                    };
                    f.insert(field, v);
                }
                ids.insert(id, Value::Object(f));
            }
            fields.insert(ty, Value::Object(ids));
        }
        let lines = vec![None; self.flattened.len()];
        declarative::Invalid {
            fields: Value::Object(fields),
            flattened: self.flattened,
            lines,
            unflattened: Value::Object(Map::new()),
        }
    }
}

/// The changes, written a chunk of entities at a time: the statements' rows (and the index
/// rows computed from each text) exist for one chunk, never for the whole import.
async fn write_plans(
    conn: &mut WriteConn,
    registry: &Registry,
    plans: &[Planned],
    version: i64,
    hash: &StateHash,
    now: i64,
) -> Result<(), StoreError> {
    /// Entities per chunk.
    const CHUNK: usize = 1000;
    // Index rows of every updated or deleted entity go; deleted entities too.
    let mut old_by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut gone_by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for p in plans {
        if p.old.is_some() {
            old_by_type.entry(&p.ty).or_default().push(&p.id);
            if p.new.is_none() {
                gone_by_type.entry(&p.ty).or_default().push(&p.id);
            }
        }
    }
    for (ty, ids) in &gone_by_type {
        delete_ids(conn, "dp_entities", "type", "id", ty, ids).await?;
    }
    for (ty, ids) in &old_by_type {
        delete_ids(conn, "dp_keys", "type", "id", ty, ids).await?;
        delete_ids(conn, "dp_refs", "child_type", "child_id", ty, ids).await?;
        delete_ids(conn, "dp_tags", "type", "id", ty, ids).await?;
    }
    drop((old_by_type, gone_by_type));

    let n = i32::try_from(plans.len())
        .map_err(|_| StoreError::BadRequest("too many changes for one version".into()))?;
    let hash = hash.to_hex();
    bulk(
        conn,
        "INSERT INTO dp_versions (version, state_hash, created_at, n_deltas) VALUES ",
        &[vec![
            Arg::Int(version),
            Arg::Text(&hash),
            Arg::Int(now),
            Arg::Int4(n),
        ]],
        "",
    )
    .await?;

    for (c, chunk) in plans.chunks(CHUNK).enumerate() {
        let mut written: Vec<(&Planned, &str, Indexed)> = Vec::with_capacity(chunk.len());
        for p in chunk {
            if let (Some(new), Some((_, index))) = (p.new.as_deref(), p.index(registry)?) {
                written.push((p, new, index));
            }
        }
        let rows: Vec<Vec<Arg>> = written
            .iter()
            .map(|(p, body, _)| {
                vec![
                    Arg::Text(&p.ty),
                    Arg::Text(&p.id),
                    Arg::Text(&p.ws),
                    Arg::Text(body),
                ]
            })
            .collect();
        bulk(
            conn,
            "INSERT INTO dp_entities (type, id, ws_id, body) VALUES ",
            &rows,
            " ON CONFLICT (type, id) DO UPDATE SET ws_id = excluded.ws_id, body = excluded.body",
        )
        .await?;
        // The index rows of the chunk, in one pass.
        let mut keys: Vec<Vec<Arg>> = Vec::new();
        let mut refs: Vec<Vec<Arg>> = Vec::new();
        let mut tags: Vec<Vec<Arg>> = Vec::new();
        for (p, _, index) in &written {
            for (name, value) in &index.keys {
                keys.push(vec![
                    Arg::Text(&p.ty),
                    Arg::Text(&p.ws),
                    Arg::Text(name),
                    Arg::Text(value),
                    Arg::Text(&p.id),
                ]);
            }
            for (field, parent_ty, parent_id) in &index.refs {
                refs.push(vec![
                    Arg::Text(parent_ty),
                    Arg::Text(parent_id),
                    Arg::Text(&p.ty),
                    Arg::Text(field),
                    Arg::Text(&p.id),
                ]);
            }
            for tag in &index.tags {
                tags.push(vec![Arg::Text(&p.ty), Arg::Text(tag), Arg::Text(&p.id)]);
            }
        }
        bulk(
            conn,
            "INSERT INTO dp_keys (type, ws_id, name, value, id) VALUES ",
            &keys,
            "",
        )
        .await?;
        bulk(
            conn,
            "INSERT INTO dp_refs (parent_type, parent_id, child_type, field, child_id) VALUES ",
            &refs,
            "",
        )
        .await?;
        bulk(
            conn,
            "INSERT INTO dp_tags (type, tag, id) VALUES ",
            &tags,
            "",
        )
        .await?;

        let pks: Vec<String> = chunk.iter().map(|p| pk_json(&p.id)).collect();
        let rows: Vec<Vec<Arg>> = chunk
            .iter()
            .zip(&pks)
            .enumerate()
            .map(|(i, (p, pk))| {
                vec![
                    Arg::Int(version),
                    Arg::Int4((c * CHUNK + i) as i32),
                    Arg::Text(&p.ty),
                    Arg::Text(pk),
                    Arg::Text(&p.ws),
                    Arg::OptText(p.new.as_deref()),
                ]
            })
            .collect();
        bulk(
            conn,
            "INSERT INTO dp_changes (version, seq, type, pk, ws_id, entity) VALUES ",
            &rows,
            "",
        )
        .await?;
    }
    Ok(())
}

/// `DELETE FROM table WHERE type_col = ty AND id_col IN (ids…)`, in chunks.
async fn delete_ids(
    conn: &mut WriteConn,
    table: &str,
    type_col: &str,
    id_col: &str,
    ty: &str,
    ids: &[&str],
) -> Result<(), StoreError> {
    for chunk in ids.chunks(MAX_IDS) {
        let head = format!("DELETE FROM {table} WHERE {type_col} = ");
        macro_rules! run {
            ($script:ty, $c:expr) => {{
                let mut s = <$script>::new();
                s.push(&head);
                s.bind(ty)?;
                s.push(&format!(" AND {id_col} IN ("));
                for (i, id) in chunk.iter().enumerate() {
                    if i > 0 {
                        s.push(", ");
                    }
                    s.bind(*id)?;
                }
                s.push(")");
                sqlx::query_with(sqlx::AssertSqlSafe(s.sql), s.args)
                    .persistent(false)
                    .execute(&mut **$c)
                    .await?;
            }};
        }
        match conn {
            WriteConn::Sqlite(c) => run!(SqliteScript, c),
            WriteConn::Postgres(c) => run!(PgScript, c),
        }
    }
    Ok(())
}

/// `head (row), (row), … tail`, in chunks under the bind-parameter limit.
async fn bulk(
    conn: &mut WriteConn,
    head: &str,
    rows: &[Vec<Arg<'_>>],
    tail: &str,
) -> Result<(), StoreError> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let per_chunk = (MAX_PARAMS / first.len().max(1)).max(1);
    for chunk in rows.chunks(per_chunk) {
        macro_rules! run {
            ($script:ty, $c:expr) => {{
                let mut s = <$script>::new();
                s.push(head);
                s.values(chunk, |s, row| {
                    for (i, a) in row.iter().enumerate() {
                        if i > 0 {
                            s.push(", ");
                        }
                        match *a {
                            Arg::Text(t) => s.bind(t)?,
                            Arg::OptText(t) => s.bind(t)?,
                            Arg::Int(n) => s.bind(n)?,
                            Arg::Int4(n) => s.bind(n)?,
                        };
                    }
                    Ok(())
                })?;
                s.push(tail);
                sqlx::query_with(sqlx::AssertSqlSafe(s.sql), s.args)
                    .persistent(false)
                    .execute(&mut **$c)
                    .await?;
            }};
        }
        match conn {
            WriteConn::Sqlite(c) => run!(SqliteScript, c),
            WriteConn::Postgres(c) => run!(PgScript, c),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::cp::store::{Op, StoreOptions};
    use crate::declarative::{Config, Entity, FormatVersion};
    use crate::schema::Mode;

    async fn store(dir: &tempfile::TempDir) -> Store {
        let mut options = StoreOptions::sqlite_in(dir.path());
        options.sqlite_synchronous_full = false;
        Store::open(options).await.expect("store opens")
    }

    /// An entity as the reader gives it: prepared by the registry, at time `now`.
    fn entity(store: &Store, ty: &str, input: Value, now: i64) -> Entity {
        let registry = store.registry();
        let schema = registry.get(ty).expect("known type");
        let prepared = registry
            .prepare(schema, input, None, Mode::Insert, now)
            .expect("valid entity");
        Entity {
            entity_type: ty.into(),
            id: prepared.entity["id"].as_str().expect("id").into(),
            body: canonical(&prepared.entity).into(),
            generated: Vec::new(),
        }
    }

    fn config(entities: Vec<Entity>) -> Config {
        Config {
            format_version: FormatVersion::V3_0,
            transform: true,
            select_tags: Vec::new(),
            entities,
        }
    }

    const S1: &str = "aa93ac78-2b4d-59d0-9897-62a161ae6928";
    const S2: &str = "bb93ac78-2b4d-59d0-9897-62a161ae6928";
    const R1: &str = "cc93ac78-2b4d-59d0-9897-62a161ae6928";

    fn base(store: &Store, now: i64) -> Vec<Entity> {
        vec![
            entity(
                store,
                "services",
                json!({"id": S1, "name": "billing", "host": "b.test"}),
                now,
            ),
            entity(
                store,
                "services",
                json!({"id": S2, "name": "orders", "host": "o.test"}),
                now,
            ),
            entity(
                store,
                "routes",
                json!({"id": R1, "name": "r1", "paths": ["/b"], "service": {"id": S1}}),
                now,
            ),
        ]
    }

    fn counts(o: &ImportOutcome, ty: &str) -> (usize, usize, usize) {
        let c = o.counts.get(ty).copied().unwrap_or_default();
        (c.created, c.updated, c.deleted)
    }

    #[tokio::test]
    async fn one_version_then_no_op_then_the_difference() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let head = store.version_info().await.unwrap().version;
        let first = store
            .import(config(base(&store, 100)), ImportMode::Sync, false)
            .await
            .unwrap();
        assert_eq!(first.version, Some(head + 1));
        assert_eq!(counts(&first, "services"), (2, 0, 0));
        assert_eq!(counts(&first, "routes"), (1, 0, 0));
        let info = store.version_info().await.unwrap();
        assert_eq!(info.version, head + 1);

        // The same file later: timestamps differ, nothing else: no version.
        let again = store
            .import(config(base(&store, 200)), ImportMode::Sync, false)
            .await
            .unwrap();
        assert_eq!(again.version, None);
        assert_eq!(again.n_changes(), 0);
        assert_eq!(store.version_info().await.unwrap().version, head + 1);

        // One service changed, one gone (with nothing referencing it): two deltas.
        let mut next = base(&store, 300);
        next.remove(1);
        next[0] = entity(
            &store,
            "services",
            json!({"id": S1, "name": "billing", "host": "billing.test"}),
            300,
        );
        let changed = store
            .import(config(next), ImportMode::Sync, false)
            .await
            .unwrap();
        assert_eq!(changed.version, Some(head + 2));
        assert_eq!(counts(&changed, "services"), (0, 1, 1));
        assert_eq!(counts(&changed, "routes"), (0, 0, 0));
        let s1 = store.get("services", S1).await.unwrap().unwrap();
        assert_eq!(s1["host"], "billing.test");
        assert_eq!(s1["created_at"], 100, "created_at is kept");
        assert!(
            s1["updated_at"].as_i64().unwrap() > 300,
            "updated_at is now"
        );
        assert!(store.get("services", S2).await.unwrap().is_none());
        let mut deltas = Vec::new();
        store
            .changes_after(head + 1, 10, |c| {
                deltas.push((c.entity_type.clone(), c.entity.is_some()));
                Ok(())
            })
            .await
            .unwrap()
            .unwrap();
        deltas.sort();
        assert_eq!(
            deltas,
            vec![("services".into(), false), ("services".into(), true)]
        );
        // The folded hash equals one computed over the stored entities.
        let info = store.version_info().await.unwrap();
        let mut hash = StateHash::ZERO;
        store
            .snapshot(|c| {
                if let Some(e) = &c.entity {
                    hash.add(&StateHash::of_entity(&c.entity_type, &c.ws_id, &c.id, e));
                }
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(info.state_hash, hash);
    }

    #[tokio::test]
    async fn upsert_never_deletes_and_dry_run_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        store
            .import(config(base(&store, 100)), ImportMode::Sync, false)
            .await
            .unwrap();
        let head = store.version_info().await.unwrap();
        let only = vec![entity(
            &store,
            "services",
            json!({"id": S2, "name": "orders", "host": "orders.test"}),
            100,
        )];
        let dry = store
            .import(config(only.clone()), ImportMode::Sync, true)
            .await
            .unwrap();
        assert!(dry.dry_run);
        assert_eq!(dry.version, Some(head.version + 1));
        assert_eq!(counts(&dry, "services"), (0, 1, 1));
        assert_eq!(counts(&dry, "routes"), (0, 0, 1));
        let after = store.version_info().await.unwrap();
        assert_eq!(after.version, head.version);
        assert_eq!(after.state_hash, head.state_hash);
        assert!(store.get("routes", R1).await.unwrap().is_some());

        let up = store
            .import(config(only), ImportMode::Upsert, false)
            .await
            .unwrap();
        assert_eq!(counts(&up, "services"), (0, 1, 0));
        assert!(store.get("routes", R1).await.unwrap().is_some());
        assert!(store.get("services", S1).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn final_state_conflicts_are_reported_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        store
            .import(config(base(&store, 100)), ImportMode::Sync, false)
            .await
            .unwrap();
        let head = store.version_info().await.unwrap().version;
        // Upsert keeps `billing` (S1); a new service with the same name collides.
        let clash = vec![entity(
            &store,
            "services",
            json!({"id": "dd93ac78-2b4d-59d0-9897-62a161ae6928", "name": "billing", "host": "x.test"}),
            100,
        )];
        let err = store
            .import(config(clash.clone()), ImportMode::Upsert, false)
            .await
            .unwrap_err();
        let StoreError::InvalidConfig(invalid) = err else {
            panic!("expected InvalidConfig, got {err:?}")
        };
        assert_eq!(invalid.flattened.len(), 1);
        assert_eq!(invalid.flattened[0]["entity_type"], "service");
        assert_eq!(invalid.flattened[0]["errors"][0]["field"], "name");
        assert_eq!(store.version_info().await.unwrap().version, head);
        // In sync mode the old `billing` goes with its route, so the name is free.
        let replaced = store
            .import(config(clash), ImportMode::Sync, false)
            .await
            .unwrap();
        assert_eq!(counts(&replaced, "services"), (1, 0, 2));
        assert_eq!(counts(&replaced, "routes"), (0, 0, 1));
    }

    #[tokio::test]
    async fn select_tags_delete_only_tagged_and_refuse_orphans() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        // A route without the tag references a tagged service.
        let svc = entity(
            &store,
            "services",
            json!({"id": S1, "name": "billing", "host": "b.test", "tags": ["team-a"]}),
            100,
        );
        let other = entity(
            &store,
            "services",
            json!({"id": S2, "name": "orders", "host": "o.test"}),
            100,
        );
        let route = entity(
            &store,
            "routes",
            json!({"id": R1, "name": "r1", "paths": ["/b"], "service": {"id": S1}}),
            100,
        );
        store
            .import(config(vec![svc, other, route]), ImportMode::Sync, false)
            .await
            .unwrap();
        let head = store.version_info().await.unwrap().version;
        let mut tagged = config(Vec::new());
        tagged.select_tags = vec!["team-a".into()];
        let err = store
            .import(tagged.clone(), ImportMode::Sync, false)
            .await
            .unwrap_err();
        let StoreError::InvalidConfig(invalid) = err else {
            panic!("expected InvalidConfig, got {err:?}")
        };
        assert_eq!(invalid.flattened[0]["entity_id"], R1);
        assert_eq!(store.version_info().await.unwrap().version, head);
        // Without the route, only the tagged service goes; the untagged one stays.
        store
            .write(Op::Delete {
                entity: "routes".into(),
                key: R1.into(),
                scope: None,
            })
            .await
            .unwrap();
        let done = store
            .import(tagged.clone(), ImportMode::Sync, false)
            .await
            .unwrap();
        assert_eq!(counts(&done, "services"), (0, 0, 1));
        assert!(store.get("services", S2).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn random_ids_and_generated_fields_keep_their_stored_values() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let file = |store: &Store| {
            // An unnamed service (random id) with a route, as a reader generates them.
            let mut svc = entity(store, "services", json!({"host": "anon.test"}), 100);
            svc.generated = vec!["id".into()];
            let sid = svc.id.clone();
            let mut route = entity(
                store,
                "routes",
                json!({"paths": ["/anon"], "service": {"id": sid}}),
                100,
            );
            route.generated = vec!["id".into()];
            let consumer = entity(
                store,
                "consumers",
                json!({"id": "ff93ac78-2b4d-59d0-9897-62a161ae6928", "username": "alice"}),
                100,
            );
            let cid = consumer.id.clone();
            let mut key = entity(
                store,
                "keyauth_credentials",
                json!({"id": "ee93ac78-2b4d-59d0-9897-62a161ae6928", "consumer": {"id": cid}}),
                100,
            );
            key.generated = vec!["key".into()];
            config(vec![svc, route, consumer, key])
        };
        let first = store
            .import(file(&store), ImportMode::Sync, false)
            .await
            .unwrap();
        assert!(first.version.is_some());
        let again = store
            .import(file(&store), ImportMode::Sync, false)
            .await
            .unwrap();
        assert_eq!(again.version, None, "{:?}", again.counts);
        let ids = |o: &ImportOutcome| -> Vec<String> {
            o.entities.iter().map(|e| e.id.to_string()).collect()
        };
        assert_eq!(ids(&first), ids(&again));
    }
}
