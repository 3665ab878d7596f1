//! The write path: operations, the version lock, cascades, and the change-log append.
//!
//! One call to [`Store::write_batch`] is one database transaction:
//!
//! 1. take the version lock (`SELECT ... FOR UPDATE` on PostgreSQL; `BEGIN IMMEDIATE` on SQLite)
//!    before any read, so unique and foreign-key checks cannot race;
//! 2. per operation, inside a savepoint: validate, check keys and references, write the entity
//!    and its index rows, cascade, and append one version with its deltas and state hash;
//!    a failing operation rolls back to its savepoint and consumes no version;
//! 3. move the head, `pg_notify`, commit once (group commit: one fsync for the whole batch).

use serde_json::{Map, Value};

use super::{Pool, StateHash, Store, StoreError, UnresolvedForeignKey};
use crate::node::now_secs;
pub(super) use crate::schema::index::canonical;
use crate::schema::index::{CACHE_KEY, EntityIndex, foreign_id, tags_of};
use crate::schema::{EntitySchema, Mode, OnDelete, Registry};

/// One Admin API write.
#[derive(Debug, Clone)]
pub enum Op {
    /// POST: create an entity.
    Create {
        entity: String,
        input: Value,
        scope: Option<Scope>,
    },
    /// PUT: create or replace the entity with this id or endpoint key.
    Put {
        entity: String,
        key: String,
        input: Value,
        scope: Option<Scope>,
    },
    /// PATCH: merge `input` into an existing entity.
    Patch {
        entity: String,
        key: String,
        input: Value,
        scope: Option<Scope>,
    },
    /// DELETE: remove an entity (and cascade). An absent entity is not an error, except under
    /// a scope: a child that is absent or belongs to another parent is `NotFound`.
    Delete {
        entity: String,
        key: String,
        scope: Option<Scope>,
    },
    /// After an upgrade (never from the Admin API): validate a stored entity against the
    /// current schema inside the write transaction. Valid: it is stored as prepared (defaults
    /// of fields new to the schema filled), a new version only if that changes it. Invalid
    /// with `enabled: true`: it is stored as is but disabled (a data plane accepts a disabled
    /// entity that does not validate: it never runs). Otherwise nothing is written;
    /// [`Outcome::invalid`] says why it does not validate.
    Revalidate { entity: String, id: String },
}

/// A nested collection: `/services/{parent_key}/routes` is entity `routes` scoped by
/// `Scope { parent: "services", parent_key, field: "service" }`.
#[derive(Debug, Clone)]
pub struct Scope {
    pub parent: String,
    pub parent_key: String,
    pub field: String,
}

/// What a write did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The version this write created, `None` when it changed nothing.
    pub version: Option<i64>,
    /// The entity after the write (with transient fields), `None` after a delete.
    pub entity: Option<Value>,
    /// True when the write inserted a new entity.
    pub created: bool,
    /// [`Op::Revalidate`]: why the stored entity does not validate under the current schema.
    pub invalid: Option<crate::schema::FieldErrors>,
}

/// A write transaction on either backend.
pub(super) enum Txn {
    Sqlite(sqlx::Transaction<'static, sqlx::Sqlite>),
    Postgres(sqlx::Transaction<'static, sqlx::Postgres>),
}

macro_rules! on_tx {
    ($t:expr, $c:ident => $body:expr) => {
        match $t {
            Txn::Sqlite($c) => $body,
            Txn::Postgres($c) => $body,
        }
    };
}

/// One entity as stored, with the derived index rows.
struct Indexed {
    keys: Vec<(String, String)>,
    refs: Vec<(String, String, String)>,
    tags: Vec<String>,
}

/// Index rows of an entity: unique and cache keys, foreign references (`schema::index`), tags.
fn index_of(schema: &EntitySchema, entity: &Value) -> Indexed {
    let EntityIndex { keys, refs } = schema.index_of(entity);
    Indexed {
        keys,
        refs,
        tags: tags_of(entity),
    }
}

/// A recorded change, before it is appended to the log.
struct Delta {
    ty: String,
    id: String,
    ws: String,
    /// What the entity was before this change (for the state hash), `None` when new.
    old: Option<Value>,
    /// What it is now, `None` when deleted.
    entity: Option<Value>,
}

fn id_of(v: &Value) -> Option<&str> {
    v.get("id").and_then(Value::as_str)
}

impl Txn {
    /// Runs one or more parameterless statements in a single round trip.
    async fn raw(&mut self, sql: &'static str) -> Result<(), sqlx::Error> {
        on_tx!(self, c => sqlx::raw_sql(sql).execute(&mut **c).await.map(|_| ()))
    }

    async fn lock_head(&mut self) -> Result<(i64, StateHash), StoreError> {
        let (version, hash): (i64, String) = match self {
            Txn::Sqlite(c) => {
                sqlx::query_as("SELECT version, state_hash FROM dp_meta WHERE id = 1")
                    .fetch_one(&mut **c)
                    .await?
            }
            Txn::Postgres(c) => {
                sqlx::query_as("SELECT version, state_hash FROM dp_meta WHERE id = 1 FOR UPDATE")
                    .fetch_one(&mut **c)
                    .await?
            }
        };
        let hash = StateHash::from_hex(&hash)
            .ok_or_else(|| StoreError::Internal("corrupt state hash in dp_meta".into()))?;
        Ok((version, hash))
    }

    async fn set_head(&mut self, version: i64, hash: &StateHash) -> Result<(), sqlx::Error> {
        on_tx!(self, c => sqlx::query("UPDATE dp_meta SET version = $1, state_hash = $2 WHERE id = 1")
            .bind(version)
            .bind(hash.to_hex())
            .execute(&mut **c)
            .await
            .map(|_| ()))?;
        if let Txn::Postgres(c) = self {
            sqlx::query("SELECT pg_notify('deltaplane_versions', $1)") // fleet::VERSIONS_CHANNEL
                .bind(version.to_string())
                .execute(&mut **c)
                .await?;
        }
        Ok(())
    }

    async fn get(&mut self, ty: &str, id: &str) -> Result<Option<(String, Value)>, StoreError> {
        let row: Option<(String, String)> = on_tx!(self, c => sqlx::query_as("SELECT ws_id, body FROM dp_entities WHERE type = $1 AND id = $2")
            .bind(ty)
            .bind(id)
            .fetch_optional(&mut **c)
            .await?);
        match row {
            Some((ws, body)) => Ok(Some((
                ws,
                serde_json::from_str(&body)
                    .map_err(|e| StoreError::Internal(format!("corrupt entity {ty}/{id}: {e}")))?,
            ))),
            None => Ok(None),
        }
    }

    async fn find_key(
        &mut self,
        ty: &str,
        ws: &str,
        name: &str,
        value: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        on_tx!(self, c => sqlx::query_scalar("SELECT id FROM dp_keys WHERE type = $1 AND ws_id = $2 AND name = $3 AND value = $4")
            .bind(ty)
            .bind(ws)
            .bind(name)
            .bind(value)
            .fetch_optional(&mut **c)
            .await)
    }

    /// Children of `parent` through `child_type.field`, as (child id).
    async fn children(
        &mut self,
        parent_ty: &str,
        parent_id: &str,
        child_ty: &str,
        field: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        on_tx!(self, c => sqlx::query_scalar(
            "SELECT child_id FROM dp_refs WHERE parent_type = $1 AND parent_id = $2 AND child_type = $3 AND field = $4 ORDER BY child_id")
            .bind(parent_ty)
            .bind(parent_id)
            .bind(child_ty)
            .bind(field)
            .fetch_all(&mut **c)
            .await)
    }

    async fn put(
        &mut self,
        ty: &str,
        id: &str,
        ws: &str,
        entity: &Value,
        index: &Indexed,
        is_new: bool,
    ) -> Result<(), sqlx::Error> {
        let body = canonical(entity);
        on_tx!(self, c => {
            sqlx::query("INSERT INTO dp_entities (type, id, ws_id, body) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (type, id) DO UPDATE SET ws_id = excluded.ws_id, body = excluded.body")
                .bind(ty).bind(id).bind(ws).bind(&body)
                .execute(&mut **c).await?;
            if !is_new {
                sqlx::query("DELETE FROM dp_keys WHERE type = $1 AND id = $2").bind(ty).bind(id).execute(&mut **c).await?;
                sqlx::query("DELETE FROM dp_refs WHERE child_type = $1 AND child_id = $2").bind(ty).bind(id).execute(&mut **c).await?;
                sqlx::query("DELETE FROM dp_tags WHERE type = $1 AND id = $2").bind(ty).bind(id).execute(&mut **c).await?;
            }
            if !index.keys.is_empty() {
                let sql = values_sql("INSERT INTO dp_keys (type, ws_id, name, value, id) VALUES ", 5, index.keys.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (name, value) in &index.keys {
                    q = q.bind(ty).bind(ws).bind(name).bind(value).bind(id);
                }
                q.execute(&mut **c).await?;
            }
            if !index.refs.is_empty() {
                let sql = values_sql("INSERT INTO dp_refs (parent_type, parent_id, child_type, field, child_id) VALUES ", 5, index.refs.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (field, parent_ty, parent_id) in &index.refs {
                    q = q.bind(parent_ty).bind(parent_id).bind(ty).bind(field).bind(id);
                }
                q.execute(&mut **c).await?;
            }
            if !index.tags.is_empty() {
                let sql = values_sql("INSERT INTO dp_tags (type, tag, id) VALUES ", 3, index.tags.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for tag in &index.tags {
                    q = q.bind(ty).bind(tag).bind(id);
                }
                q.execute(&mut **c).await?;
            }
            Ok(())
        })
    }

    async fn delete(&mut self, ty: &str, id: &str) -> Result<(), sqlx::Error> {
        on_tx!(self, c => {
            sqlx::query("DELETE FROM dp_entities WHERE type = $1 AND id = $2").bind(ty).bind(id).execute(&mut **c).await?;
            sqlx::query("DELETE FROM dp_keys WHERE type = $1 AND id = $2").bind(ty).bind(id).execute(&mut **c).await?;
            sqlx::query("DELETE FROM dp_refs WHERE child_type = $1 AND child_id = $2").bind(ty).bind(id).execute(&mut **c).await?;
            sqlx::query("DELETE FROM dp_tags WHERE type = $1 AND id = $2").bind(ty).bind(id).execute(&mut **c).await?;
            Ok(())
        })
    }

    async fn append_version(
        &mut self,
        version: i64,
        hash: &StateHash,
        now: i64,
        deltas: &[Delta],
    ) -> Result<(), sqlx::Error> {
        on_tx!(self, c => {
            sqlx::query("INSERT INTO dp_versions (version, state_hash, created_at, n_deltas) VALUES ($1, $2, $3, $4)")
                .bind(version).bind(hash.to_hex()).bind(now).bind(deltas.len() as i32)
                .execute(&mut **c).await?;
            // Chunked so a large cascade stays under the backends' bind-parameter limits.
            for (chunk_idx, chunk) in deltas.chunks(500).enumerate() {
                let sql = values_sql("INSERT INTO dp_changes (version, seq, type, pk, ws_id, entity) VALUES ", 6, chunk.len());
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
                for (i, d) in chunk.iter().enumerate() {
                    let pk = canonical(&serde_json::json!({ "id": d.id }));
                    q = q.bind(version).bind((chunk_idx * 500 + i) as i32).bind(&d.ty).bind(pk).bind(&d.ws).bind(d.entity.as_ref().map(canonical));
                }
                q.execute(&mut **c).await?;
            }
            Ok(())
        })
    }
}

/// `prefix ($1, $2, ..), ($n+1, ..)` for `rows` rows of `cols` columns.
fn values_sql(prefix: &str, cols: usize, rows: usize) -> String {
    let mut sql = String::with_capacity(prefix.len() + rows * cols * 5);
    sql.push_str(prefix);
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..cols {
            if c > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(r * cols + c + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

/// The state of one transaction while it applies operations.
struct WriteCtx<'a> {
    tx: &'a mut Txn,
    registry: &'a Registry,
    ws: String,
    now: i64,
    deltas: Vec<Delta>,
}

impl Store {
    /// Applies `ops` in one transaction (group commit), each with its own version.
    ///
    /// Returns one result per operation. A transaction-level failure (database unreachable,
    /// commit failed) is returned for every operation.
    pub async fn write_batch(&self, ops: Vec<Op>) -> Vec<Result<Outcome, StoreError>> {
        let n = ops.len();
        match self.write_batch_inner(ops).await {
            Ok(results) => results,
            Err(e) => {
                if let StoreError::CommitUnknown(cause)
                | StoreError::Unavailable(cause)
                | StoreError::Internal(cause) = &e
                {
                    tracing::warn!(%cause, "write transaction failed: {e}");
                }
                vec![Err(e); n]
            }
        }
    }

    /// Applies one operation in its own transaction.
    pub async fn write(&self, op: Op) -> Result<Outcome, StoreError> {
        self.write_batch(vec![op])
            .await
            .pop()
            .expect("one result per op")
    }

    async fn begin_write(&self) -> Result<Txn, StoreError> {
        // Failing to get a connection and a transaction means nothing was written.
        let unavailable = |e: sqlx::Error| StoreError::Unavailable(e.to_string());
        Ok(match self.pool() {
            Pool::Sqlite(p) => {
                Txn::Sqlite(p.begin_with("BEGIN IMMEDIATE").await.map_err(unavailable)?)
            }
            Pool::Postgres(p) => Txn::Postgres(p.begin().await.map_err(unavailable)?),
        })
    }

    async fn write_batch_inner(
        &self,
        ops: Vec<Op>,
    ) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let mut tx = self.begin_write().await?;
        match self.apply_all(&mut tx, ops).await {
            Ok((results, head)) => {
                if let Some(hook) = &self.inner.options.before_commit {
                    let delay = hook();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                let committed = on_tx!(tx, c => c.commit().await);
                if let Err(e) = committed {
                    return Err(StoreError::CommitUnknown(e.to_string()));
                }
                if let Some(head) = head {
                    self.observe(head);
                }
                Ok(results)
            }
            Err(e) => {
                let _ = on_tx!(tx, c => c.rollback().await);
                Err(e)
            }
        }
    }

    /// Runs every op; returns the results and the new head when at least one version was made.
    async fn apply_all(
        &self,
        tx: &mut Txn,
        ops: Vec<Op>,
    ) -> Result<(Vec<Result<Outcome, StoreError>>, Option<i64>), StoreError> {
        // The version lock comes first: every check below runs serialised against other writers.
        let (start, mut hash) = tx.lock_head().await?;
        let mut head = start;
        // Bootstrap writes the workspace itself; afterwards the default workspace always exists.
        let ws = self.default_workspace_id().await?.unwrap_or_default();
        let now = now_secs();
        let mut results = Vec::with_capacity(ops.len());
        let n_ops = ops.len();
        // Savepoint bookkeeping rides along in one round trip between operations.
        if n_ops > 0 {
            tx.raw("SAVEPOINT dp_op").await?;
        }
        for (i, op) in ops.into_iter().enumerate() {
            let last = i + 1 == n_ops;
            let (release, rollback) = if last {
                (
                    "RELEASE SAVEPOINT dp_op",
                    "ROLLBACK TO SAVEPOINT dp_op; RELEASE SAVEPOINT dp_op",
                )
            } else {
                (
                    "RELEASE SAVEPOINT dp_op; SAVEPOINT dp_op",
                    "ROLLBACK TO SAVEPOINT dp_op; RELEASE SAVEPOINT dp_op; SAVEPOINT dp_op",
                )
            };
            let mut ctx = WriteCtx {
                tx: &mut *tx,
                registry: self.registry(),
                ws: ws.clone(),
                now,
                deltas: Vec::new(),
            };
            let applied = ctx.apply(op).await;
            let deltas = std::mem::take(&mut ctx.deltas);
            let applied = match applied {
                Ok(mut outcome) if !deltas.is_empty() => {
                    let mut new_hash = hash;
                    fold_hash(&mut new_hash, &deltas);
                    let version = head + 1;
                    match tx.append_version(version, &new_hash, now, &deltas).await {
                        Ok(()) => {
                            head = version;
                            hash = new_hash;
                            outcome.version = Some(version);
                            Ok(outcome)
                        }
                        Err(e) => Err(StoreError::from(e)),
                    }
                }
                other => other,
            };
            match applied {
                Ok(outcome) => {
                    tx.raw(release).await?;
                    results.push(Ok(outcome));
                }
                Err(e) => {
                    tx.raw(rollback).await?;
                    if matches!(e, StoreError::Unavailable(_)) {
                        return Err(e);
                    }
                    results.push(Err(e));
                }
            }
        }
        if head == start {
            return Ok((results, None));
        }
        tx.set_head(head, &hash).await?;
        Ok((results, Some(head)))
    }
}

fn fold_hash(hash: &mut StateHash, deltas: &[Delta]) {
    for d in deltas {
        if let Some(old) = &d.old {
            hash.sub(&StateHash::of_entity(&d.ty, &d.ws, &d.id, old));
        }
        if let Some(new) = &d.entity {
            hash.add(&StateHash::of_entity(&d.ty, &d.ws, &d.id, new));
        }
    }
}

impl WriteCtx<'_> {
    /// The workspace an entity lives in; a workspace is its own.
    fn ws_for(&self, schema: &EntitySchema, id: &str) -> String {
        if schema.workspaceable {
            self.ws.clone()
        } else {
            id.to_owned()
        }
    }

    fn schema(&self, name: &str) -> Result<std::sync::Arc<EntitySchema>, StoreError> {
        self.registry.get(name).cloned().ok_or(StoreError::NotFound)
    }

    async fn apply(&mut self, op: Op) -> Result<Outcome, StoreError> {
        match op {
            Op::Create {
                entity,
                input,
                scope,
            } => {
                let schema = self.schema(&entity)?;
                let mut input = self.scoped_input(input, scope.as_ref()).await?;
                self.resolve_foreign(&schema, &mut input).await?;
                let prepared = self
                    .registry
                    .prepare(&schema, input, None, Mode::Insert, self.now)
                    .map_err(StoreError::Schema)?;
                let id = id_of(&prepared.entity).unwrap_or_default().to_owned();
                if self.tx.get(&schema.name, &id).await?.is_some() {
                    let mut fields = Map::new();
                    fields.insert("id".into(), Value::String(id.clone()));
                    return Err(StoreError::PrimaryKey {
                        message: format!("primary key violation on key '{{id=\"{id}\"}}'"),
                        fields,
                    });
                }
                let entity = self
                    .save(&schema, prepared.entity, None, prepared.transient)
                    .await?;
                Ok(Outcome {
                    version: None,
                    entity: Some(entity),
                    created: true,
                    invalid: None,
                })
            }
            Op::Put {
                entity,
                key,
                input,
                scope,
            } => {
                let schema = self.schema(&entity)?;
                let existing = self.resolve(&schema, &key, scope.as_ref()).await?;
                let mut input = self.scoped_input(input, scope.as_ref()).await?;
                if let Value::Object(m) = &mut input {
                    if crate::schema::is_uuid(&key)
                        && existing
                            .as_ref()
                            .is_none_or(|e| id_of(e) == Some(key.as_str()))
                    {
                        m.insert(schema.primary_key.clone(), Value::String(key.clone()));
                    } else if let Some(ek) = &schema.endpoint_key {
                        m.insert(ek.clone(), Value::String(key.clone()));
                    }
                }
                self.resolve_foreign(&schema, &mut input).await?;
                let mode = if existing.is_some() {
                    Mode::Replace
                } else {
                    Mode::Insert
                };
                let mut prepared = self
                    .registry
                    .prepare(&schema, input, existing.as_ref(), mode, self.now)
                    .map_err(StoreError::Schema)?;
                // PUT replaces the whole entity: a transient list it does not give is emptied
                // (Kong's `prepare_args` in `kong/api/routes/certificates.lua`).
                for name in &schema.transient_fields {
                    prepared
                        .transient
                        .entry(name.clone())
                        .or_insert(Value::Null);
                }
                let created = existing.is_none();
                let entity = self
                    .save(&schema, prepared.entity, existing, prepared.transient)
                    .await?;
                Ok(Outcome {
                    version: None,
                    entity: Some(entity),
                    created,
                    invalid: None,
                })
            }
            Op::Patch {
                entity,
                key,
                input,
                scope,
            } => {
                let schema = self.schema(&entity)?;
                let existing = self
                    .resolve(&schema, &key, scope.as_ref())
                    .await?
                    .ok_or(StoreError::NotFound)?;
                let mut input = self.scoped_input(input, scope.as_ref()).await?;
                self.resolve_foreign(&schema, &mut input).await?;
                let prepared = self
                    .registry
                    .prepare(&schema, input, Some(&existing), Mode::Update, self.now)
                    .map_err(StoreError::Schema)?;
                let entity = self
                    .save(&schema, prepared.entity, Some(existing), prepared.transient)
                    .await?;
                Ok(Outcome {
                    version: None,
                    entity: Some(entity),
                    created: false,
                    invalid: None,
                })
            }
            Op::Revalidate { entity, id } => {
                let schema = self.schema(&entity)?;
                let Some((_, stored)) = self.tx.get(&schema.name, &id).await? else {
                    return Err(StoreError::NotFound);
                };
                let (body, invalid) = match self.registry.prepare(
                    &schema,
                    stored.clone(),
                    Some(&stored),
                    Mode::Replace,
                    self.now,
                ) {
                    Ok(prepared) => (prepared.entity, None),
                    Err(errors) => {
                        let mut body = stored.clone();
                        if let Some(flag) =
                            body.get_mut("enabled").filter(|e| **e == Value::Bool(true))
                        {
                            *flag = Value::Bool(false);
                        }
                        (body, Some(errors))
                    }
                };
                // No transient list is rewritten: only the entity's own fields.
                let entity = self.save(&schema, body, Some(stored), Map::new()).await?;
                Ok(Outcome {
                    version: None,
                    entity: Some(entity),
                    created: false,
                    invalid,
                })
            }
            Op::Delete { entity, key, scope } => {
                let schema = self.schema(&entity)?;
                match self.resolve(&schema, &key, scope.as_ref()).await? {
                    Some(existing) => self.delete_cascade(&schema, existing).await?,
                    // Kong's nested DELETE answers 404 for a child that is absent or belongs to
                    // another parent (`delete_entity_endpoint` in `kong/api/endpoints.lua`).
                    None if scope.is_some() => return Err(StoreError::NotFound),
                    None => {}
                }
                Ok(Outcome {
                    version: None,
                    entity: None,
                    created: false,
                    invalid: None,
                })
            }
        }
    }

    /// Resolves `scope`'s parent and sets the child's foreign field to it.
    async fn scoped_input(
        &mut self,
        mut input: Value,
        scope: Option<&Scope>,
    ) -> Result<Value, StoreError> {
        if let Some(scope) = scope {
            let parent_schema = self.schema(&scope.parent)?;
            let parent = self
                .resolve(&parent_schema, &scope.parent_key, None)
                .await?
                .ok_or(StoreError::NotFound)?;
            let parent_id = id_of(&parent).unwrap_or_default().to_owned();
            if let Value::Object(m) = &mut input {
                m.insert(scope.field.clone(), serde_json::json!({ "id": parent_id }));
            }
        }
        Ok(input)
    }

    /// Kong's `resolve_foreign` (`kong/db/dao/init.lua`), run on insert, update and upsert
    /// inside the write transaction, so a rename or delete of the referenced entity cannot
    /// slip between the lookup and the write: a foreign key given without a valid primary key
    /// (`{"service": {"name": "billing"}}`, `{"consumer": {"username": "alice"}}`) is looked up
    /// by each unique field of the referenced entity that it carries with a valid value, in
    /// schema order, and replaced by `{"id": ..}` at the first match. Every unique value that
    /// matched nothing is reported, as Kong does (also when a later one matched). A value with
    /// a valid primary key keeps only it (Kong ignores the other keys). Anything else is left
    /// for schema validation to report.
    async fn resolve_foreign(
        &mut self,
        schema: &EntitySchema,
        input: &mut Value,
    ) -> Result<(), StoreError> {
        let Value::Object(input) = input else {
            return Ok(());
        };
        let mut unresolved: Vec<UnresolvedForeignKey> = Vec::new();
        let fks: Vec<_> = self
            .registry
            .references_of(&schema.name)
            .filter(|fk| !fk.is_array)
            .cloned()
            .collect();
        for fk in fks {
            let Some(Value::Object(given)) = input.get(&fk.field) else {
                continue;
            };
            let parent = self.schema(&fk.parent)?;
            let pk = &parent.primary_key;
            if let Some(id) = given.get(pk).and_then(Value::as_str)
                && crate::schema::is_uuid(id)
            {
                let id = id.to_owned();
                input.insert(fk.field.clone(), serde_json::json!({ pk.clone(): id }));
                continue;
            }
            let given = given.clone();
            let mut resolved = None;
            for unique in parent.unique_fields() {
                let Some(value) = given.get(&unique.name).filter(|v| unique.accepts(v)) else {
                    continue;
                };
                let ws = self.ws.clone();
                match self
                    .tx
                    .find_key(&parent.name, &ws, &unique.name, &canonical(value))
                    .await?
                {
                    Some(id) => {
                        resolved = Some(id);
                        break;
                    }
                    None => unresolved.push(UnresolvedForeignKey {
                        field: fk.field.clone(),
                        unique_field: unique.name.clone(),
                        value: value.clone(),
                        entity: parent.name.clone(),
                    }),
                }
            }
            if let Some(id) = resolved {
                input.insert(fk.field.clone(), serde_json::json!({ pk.clone(): id }));
            }
        }
        if unresolved.is_empty() {
            return Ok(());
        }
        // Kong's `foreign_keys_unresolved` (`kong/db/errors.lua`) sorts by field, then by the
        // unique field within it.
        unresolved.sort_by(|a, b| (&a.field, &a.unique_field).cmp(&(&b.field, &b.unique_field)));
        Err(StoreError::ForeignKeysUnresolved(unresolved))
    }

    /// Finds an entity by id or endpoint key, within `scope` when given.
    async fn resolve(
        &mut self,
        schema: &EntitySchema,
        key: &str,
        scope: Option<&Scope>,
    ) -> Result<Option<Value>, StoreError> {
        let parent_id = match scope {
            Some(scope) => {
                let parent_schema = self.schema(&scope.parent)?;
                match self
                    .resolve_unscoped(&parent_schema, &scope.parent_key, None)
                    .await?
                {
                    Some(p) => Some((
                        scope.field.clone(),
                        id_of(&p).unwrap_or_default().to_owned(),
                    )),
                    None => return Err(StoreError::NotFound),
                }
            }
            None => None,
        };
        let found = self
            .resolve_unscoped(schema, key, parent_id.as_ref())
            .await?;
        match (found, parent_id) {
            (Some(e), Some((field, pid))) => {
                Ok((foreign_id(e.get(&field)) == Some(pid.as_str())).then_some(e))
            }
            (found, _) => Ok(found),
        }
    }

    async fn resolve_unscoped(
        &mut self,
        schema: &EntitySchema,
        key: &str,
        scope: Option<&(String, String)>,
    ) -> Result<Option<Value>, StoreError> {
        if crate::schema::is_uuid(key)
            && let Some((_, e)) = self.tx.get(&schema.name, key).await?
        {
            return Ok(Some(e));
        }
        if let Some(alias) = &schema.alias_key
            && !crate::schema::is_uuid(key)
        {
            // `/certificates/{sni}`: the entity the named child references.
            let child = self.schema(&alias.entity)?;
            let (Some(ek), Some(fk)) = (
                child.endpoint_key.clone(),
                self.registry
                    .references_of(&child.name)
                    .find(|fk| fk.parent == schema.name && !fk.is_array)
                    .cloned(),
            ) else {
                return Ok(None);
            };
            let value = canonical(&Value::String(key.to_owned()));
            let Some(cid) = self.tx.find_key(&child.name, &self.ws, &ek, &value).await? else {
                return Ok(None);
            };
            let Some((_, found)) = self.tx.get(&child.name, &cid).await? else {
                return Ok(None);
            };
            let Some(pid) = foreign_id(found.get(&fk.field)).map(str::to_owned) else {
                return Ok(None);
            };
            return Ok(self.tx.get(&schema.name, &pid).await?.map(|(_, e)| e));
        }
        let Some(ek) = &schema.endpoint_key else {
            return Ok(None);
        };
        let value = canonical(&Value::String(key.to_owned()));
        let unique = schema.field(ek).is_some_and(|f| f.unique);
        let id = if unique {
            self.tx.find_key(&schema.name, &self.ws, ek, &value).await?
        } else if let (Some(cache_key), Some((field, pid))) = (&schema.cache_key, scope) {
            // A non-unique endpoint key (targets.target, acls.group) is unique within its parent:
            // look it up through the cache key made of exactly those two fields.
            if cache_key.len() == 2 && cache_key.contains(ek) && cache_key.contains(field) {
                let mut probe = Map::new();
                probe.insert(ek.clone(), Value::String(key.to_owned()));
                probe.insert(field.clone(), serde_json::json!({ "id": pid }));
                let ck = schema.cache_key_value(cache_key, &Value::Object(probe));
                self.tx
                    .find_key(&schema.name, &self.ws, CACHE_KEY, &ck)
                    .await?
            } else {
                None
            }
        } else {
            None
        };
        match id {
            Some(id) => Ok(self.tx.get(&schema.name, &id).await?.map(|(_, e)| e)),
            None => Ok(None),
        }
    }

    /// Writes `entity` (new or replacing `existing`) after key and reference checks, then its
    /// transient children. Returns the entity as the Admin API shows it.
    async fn save(
        &mut self,
        schema: &EntitySchema,
        entity: Value,
        existing: Option<Value>,
        transient: Map<String, Value>,
    ) -> Result<Value, StoreError> {
        let id = id_of(&entity).unwrap_or_default().to_owned();
        let ws = self.ws_for(schema, &id);
        let unchanged = existing
            .as_ref()
            .is_some_and(|old| same_ignoring_updated_at(old, &entity));
        let mut shown = if unchanged {
            existing.clone().unwrap_or_default()
        } else {
            entity.clone()
        };
        if !unchanged {
            let index = index_of(schema, &entity);
            self.check_keys(schema, &id, &entity, &index).await?;
            self.check_references(schema, &entity).await?;
            self.tx
                .put(&schema.name, &id, &ws, &entity, &index, existing.is_none())
                .await?;
            self.deltas.push(Delta {
                ty: schema.name.clone(),
                id: id.clone(),
                ws,
                old: existing,
                entity: Some(entity),
            });
        }
        for name in &schema.transient_fields {
            let list = self
                .save_transient(schema, &id, name, transient.get(name))
                .await?;
            if let Value::Object(m) = &mut shown {
                m.insert(name.clone(), list);
            }
        }
        Ok(shown)
    }

    async fn check_keys(
        &mut self,
        schema: &EntitySchema,
        id: &str,
        entity: &Value,
        index: &Indexed,
    ) -> Result<(), StoreError> {
        for (name, value) in &index.keys {
            let Some(other) = self
                .tx
                .find_key(&schema.name, &self.ws, name, value)
                .await?
            else {
                continue;
            };
            if other == id {
                continue;
            }
            let mut fields = Map::new();
            if name == CACHE_KEY {
                for f in schema.cache_key.iter().flatten() {
                    fields.insert(f.clone(), entity.get(f).cloned().unwrap_or(Value::Null));
                }
            } else {
                fields.insert(
                    name.clone(),
                    entity.get(name).cloned().unwrap_or(Value::Null),
                );
            }
            return Err(StoreError::Unique(fields));
        }
        Ok(())
    }

    async fn check_references(
        &mut self,
        schema: &EntitySchema,
        entity: &Value,
    ) -> Result<(), StoreError> {
        for fk in self.registry.references_of(&schema.name) {
            let ids: Vec<String> = if fk.is_array {
                entity
                    .get(&fk.field)
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                foreign_id(entity.get(&fk.field))
                    .map(|s| vec![s.to_owned()])
                    .unwrap_or_default()
            };
            for pid in ids {
                if self.tx.get(&fk.parent, &pid).await?.is_none() {
                    let mut fields = Map::new();
                    let key = serde_json::json!({ "id": pid });
                    let shown = if fk.is_array {
                        Value::Array(vec![key.clone()])
                    } else {
                        key.clone()
                    };
                    fields.insert(fk.field.clone(), shown);
                    let pretty = super::kong_pretty(key.as_object().expect("object"));
                    return Err(StoreError::ForeignKey {
                        message: format!(
                            "the foreign key '{pretty}' does not reference an existing '{}' entity.",
                            fk.parent
                        ),
                        fields,
                    });
                }
            }
        }
        Ok(())
    }

    /// A transient field `name` of `parent_schema` is the list of endpoint keys of the `name`
    /// entities that reference the parent (`certificates.snis` lists the names of its snis).
    /// With `wanted` given, the children are made to match it.
    async fn save_transient(
        &mut self,
        parent_schema: &EntitySchema,
        parent_id: &str,
        name: &str,
        wanted: Option<&Value>,
    ) -> Result<Value, StoreError> {
        let child_schema = self.schema(name)?;
        let (Some(fk), Some(ek)) = (
            self.registry
                .references_of(name)
                .find(|fk| fk.parent == parent_schema.name && !fk.is_array)
                .cloned(),
            child_schema.endpoint_key.clone(),
        ) else {
            return Err(StoreError::Internal(format!(
                "transient field {name} has no foreign key to {}",
                parent_schema.name
            )));
        };
        let mut current = Vec::new();
        for cid in self
            .tx
            .children(&parent_schema.name, parent_id, name, &fk.field)
            .await?
        {
            if let Some((_, e)) = self.tx.get(name, &cid).await? {
                current.push(e);
            }
        }
        let key_of = |e: &Value| e.get(&ek).and_then(Value::as_str).map(str::to_owned);
        // Absent: keep the children. Null: none (Kong's `parse_name_list` in
        // `kong/db/dao/certificates.lua` turns null into an empty list).
        let none = Value::Array(Vec::new());
        let wanted = match wanted {
            None => {
                let mut names: Vec<String> = current.iter().filter_map(key_of).collect();
                names.sort();
                return Ok(names.into_iter().map(Value::String).collect());
            }
            Some(Value::Null) => &none,
            Some(w) => w,
        };
        let Some(list) = wanted.as_array() else {
            return Err(StoreError::Schema(crate::schema::FieldErrors::single(
                name,
                "expected an array",
            )));
        };
        let mut wanted_names: Vec<String> = Vec::new();
        let mut errors = Vec::new();
        let mut duplicate = None;
        for (i, v) in list.iter().enumerate() {
            match v.as_str() {
                Some(s) if !wanted_names.iter().any(|w| w == s) => wanted_names.push(s.to_owned()),
                Some(s) => {
                    duplicate.get_or_insert_with(|| s.to_owned());
                }
                None => errors.push((i, "expected a string".to_owned())),
            }
        }
        if errors.is_empty()
            && let Some(s) = duplicate
        {
            // Kong's message: "schema violation (snis: a.test is duplicated)".
            return Err(StoreError::Schema(crate::schema::FieldErrors::single(
                name,
                format!("{s} is duplicated"),
            )));
        }
        if !errors.is_empty() {
            let mut arr = vec![Value::Null; list.len()];
            for (i, e) in errors {
                arr[i] = Value::String(e);
            }
            return Err(StoreError::Schema(crate::schema::FieldErrors::single(
                name,
                Value::Array(arr),
            )));
        }
        for old in &current {
            if key_of(old).is_some_and(|k| !wanted_names.contains(&k)) {
                self.delete_cascade(&child_schema, old.clone()).await?;
            }
        }
        for wanted_name in &wanted_names {
            if current
                .iter()
                .any(|c| key_of(c).as_deref() == Some(wanted_name.as_str()))
            {
                continue;
            }
            let value = canonical(&Value::String(wanted_name.clone()));
            if let Some(other) = self.tx.find_key(name, &self.ws, &ek, &value).await? {
                let owner = self
                    .tx
                    .get(name, &other)
                    .await?
                    .and_then(|(_, e)| foreign_id(e.get(&fk.field)).map(str::to_owned));
                return Err(StoreError::Schema(crate::schema::FieldErrors::single(
                    name,
                    format!(
                        "{wanted_name} already associated with existing certificate '{}'",
                        owner.unwrap_or_default()
                    ),
                )));
            }
            let input = serde_json::json!({ ek.clone(): wanted_name, fk.field.clone(): { "id": parent_id } });
            let prepared = self
                .registry
                .prepare(&child_schema, input, None, Mode::Insert, self.now)
                .map_err(|e| {
                    StoreError::Schema(crate::schema::FieldErrors::single(name, Value::Object(e.0)))
                })?;
            Box::pin(self.save(&child_schema, prepared.entity, None, Map::new())).await?;
        }
        wanted_names.sort();
        Ok(wanted_names.into_iter().map(Value::String).collect())
    }

    /// Deletes `entity` after applying the delete rules of everything that references it:
    /// restrict refuses, cascade deletes (children first), null clears the reference.
    async fn delete_cascade(
        &mut self,
        schema: &EntitySchema,
        entity: Value,
    ) -> Result<(), StoreError> {
        let id = id_of(&entity).unwrap_or_default().to_owned();
        let fks: Vec<_> = self.registry.referencing(&schema.name).cloned().collect();
        // Refusals first, so nothing is half-done when one applies.
        for fk in fks.iter().filter(|fk| fk.on_delete == OnDelete::Restrict) {
            let children = self
                .tx
                .children(&schema.name, &id, &fk.child, &fk.field)
                .await?;
            if let Some(first) = children.first() {
                if fk.is_array {
                    return Err(StoreError::ReferencedByOthers(format!(
                        "{} {id} is still referenced by {} (id = {first})",
                        singular(&schema.name).replace('_', " "),
                        fk.child
                    )));
                }
                let mut fields = Map::new();
                fields.insert("@referenced_by".into(), Value::String(fk.child.clone()));
                return Err(StoreError::ForeignKey {
                    message: format!(
                        "an existing '{}' entity references this '{}' entity",
                        fk.child, schema.name
                    ),
                    fields,
                });
            }
        }
        for fk in &fks {
            if fk.on_delete == OnDelete::Restrict {
                continue;
            }
            let child_schema = self.schema(&fk.child)?;
            for cid in self
                .tx
                .children(&schema.name, &id, &fk.child, &fk.field)
                .await?
            {
                let Some((_, child)) = self.tx.get(&fk.child, &cid).await? else {
                    continue;
                };
                match fk.on_delete {
                    OnDelete::Cascade => {
                        Box::pin(self.delete_cascade(&child_schema, child)).await?
                    }
                    OnDelete::Null => {
                        let mut updated = child.clone();
                        if let Value::Object(m) = &mut updated {
                            m.insert(fk.field.clone(), Value::Null);
                            if child_schema.field("updated_at").is_some() {
                                m.insert("updated_at".into(), Value::from(self.now));
                            }
                        }
                        let index = index_of(&child_schema, &updated);
                        self.tx
                            .put(&fk.child, &cid, &self.ws.clone(), &updated, &index, false)
                            .await?;
                        self.deltas.push(Delta {
                            ty: fk.child.clone(),
                            id: cid,
                            ws: self.ws.clone(),
                            old: Some(child),
                            entity: Some(updated),
                        });
                    }
                    OnDelete::Restrict => {}
                }
            }
        }
        self.tx.delete(&schema.name, &id).await?;
        let ws = self.ws_for(schema, &id);
        self.deltas.push(Delta {
            ty: schema.name.clone(),
            id,
            ws,
            old: Some(entity),
            entity: None,
        });
        Ok(())
    }
}

fn singular(s: &str) -> &str {
    s.strip_suffix('s').unwrap_or(s)
}

fn same_ignoring_updated_at(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| k == "updated_at" || y.get(k) == Some(v))
        }
        _ => a == b,
    }
}
