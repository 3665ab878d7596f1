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
//!
//! On PostgreSQL, creates that need no read before their write ([`plannable`]) are planned in
//! memory and applied by the function `dp_apply_creates` (migration 0005): each operation in
//! its own `BEGIN ... EXCEPTION` block (a subtransaction, its savepoint), its checks folded in,
//! a run of them in one round trip. A batch made only of them runs as one statement that does
//! steps 1–3 itself ([`Store::write_planned_alone`]).

use serde_json::{Map, Value};

use super::{Pool, StateHash, Store, StoreError, UnresolvedForeignKey};
use crate::node::now_secs;
use crate::proto::v2::RawDelta;
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

impl Outcome {
    /// A new entity inserted (its version, if any, is set once appended).
    fn created(entity: Value) -> Outcome {
        Outcome {
            version: None,
            entity: Some(entity),
            created: true,
            invalid: None,
        }
    }
}

/// A write transaction on either backend, with the write it holds back.
///
/// Round trips are the cost of the write path (each costs both processes a wake-up and a
/// loopback send), so the last write of an operation is held back and sent with the next one:
/// usually the operation's version, so an insert and its version cost one round trip. Every
/// read, and every other write, sends what is held back first, so reads see every write
/// before them, and the order of writes is kept.
pub(super) struct Txn<'c> {
    pub(super) conn: &'c mut WriteConn,
    /// At most one write, not yet sent.
    pending: Option<Pending>,
    /// True when a statement since the operation's savepoint wrote or failed, so the
    /// savepoint must be released (or rolled back to) and taken again for the next operation.
    dirty: bool,
}

/// The connection write transactions run on. It is kept between transactions (in
/// [`WriteSlot`]) rather than taken from the pool each time, which would cost two more round
/// trips per transaction (the pool pings a connection when it lends it and when it gets it
/// back), and transactions are opened and closed by plain `BEGIN`/`COMMIT` text that rides
/// with the first and last statements (on SQLite, in statements the connection keeps
/// prepared; on PostgreSQL, as simple queries).
pub(super) enum WriteConn {
    Sqlite(sqlx::pool::PoolConnection<sqlx::Sqlite>),
    Postgres(sqlx::pool::PoolConnection<sqlx::Postgres>),
}

/// Where the store keeps its [`WriteConn`]; its mutex also orders this store's write
/// transactions (they would queue on the version lock anyway).
#[derive(Default)]
pub(super) struct WriteSlot {
    pub(super) conn: Option<WriteConn>,
    /// True from `BEGIN` until the transaction ended. Still true at the next write when a
    /// write was cancelled halfway: that connection is closed, never reused.
    pub(super) in_txn: bool,
    /// The change log's epoch as the open transaction read it.
    pub(super) epoch: String,
    /// The head (version and state hash) as this store last saw it under the version lock:
    /// what a batch of planned creates assumes when it runs as one statement
    /// ([`Store::write_planned_alone`]), which checks it.
    head: Option<(i64, StateHash)>,
    /// When the kept connection last answered at the end of a transaction.
    last_used: Option<std::time::Instant>,
}

macro_rules! on_tx {
    ($t:expr, $c:ident => $body:expr) => {
        match $t {
            WriteConn::Sqlite($c) => $body,
            WriteConn::Postgres($c) => $body,
        }
    };
}

impl WriteSlot {
    /// Closes the kept connection (the server rolls back what it had open).
    pub(super) fn discard(&mut self) {
        if let Some(mut conn) = self.conn.take() {
            on_tx!(&mut conn, c => c.close_on_drop());
        }
        self.in_txn = false;
        self.last_used = None;
    }
}

impl Drop for WriteSlot {
    /// Never hands the connection back to the pool: it may be inside a transaction.
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.discard();
        } else if let Some(conn) = self.conn.take() {
            // Closing through the pool needs a runtime; dropping the bare connection closes
            // its socket (or SQLite handle) here.
            on_tx!(conn, c => drop(c.leak()));
        }
    }
}

/// A write held back by [`Txn`].
enum Pending {
    /// Insert or replace an entity with its index rows.
    Put {
        ty: String,
        id: String,
        ws: String,
        body: String,
        index: Indexed,
        is_new: bool,
    },
    /// Remove an entity and its index rows.
    Delete { ty: String, id: String },
}

/// One version of the change log, as [`Txn::append_version`] writes it.
struct VersionRows<'a> {
    version: i64,
    hash: String,
    now: i64,
    deltas: &'a [Delta],
    /// Each delta's entity as canonical JSON (`None`: deleted), computed once for the row
    /// and for [`Store::committed_after`].
    entities: &'a [Option<String>],
}

/// One entity as stored, with the derived index rows.
pub(super) struct Indexed {
    pub(super) keys: Vec<(String, String)>,
    pub(super) refs: Vec<(String, String, String)>,
    pub(super) tags: Vec<String>,
}

/// Index rows of an entity: unique and cache keys, foreign references (`schema::index`), tags.
pub(super) fn index_of(schema: &EntitySchema, entity: &Value) -> Indexed {
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

/// SQL text and its bind values, built together so placeholders always match the values:
/// `$n` on PostgreSQL, `?` (numbered per statement) on SQLite.
pub(super) struct Script<A> {
    pub(super) sql: String,
    pub(super) args: A,
}

impl<A: sqlx::Arguments> Script<A> {
    pub(super) fn new() -> Script<A> {
        Script {
            sql: String::with_capacity(1024),
            args: A::default(),
        }
    }

    pub(super) fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    /// Adds a value and writes its placeholder.
    pub(super) fn bind<'t, T>(&mut self, value: T) -> Result<&mut Self, sqlx::Error>
    where
        T: sqlx::Encode<'t, A::Database> + sqlx::Type<A::Database>,
    {
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        self.args
            .format_placeholder(&mut self.sql)
            .map_err(|e| sqlx::Error::Encode(e.into()))?;
        Ok(self)
    }

    /// Adds a value and returns its placeholder, for a statement that uses it more than once
    /// (PostgreSQL only: SQLite's `?` takes the next value each time).
    fn param<'t, T>(&mut self, value: T) -> Result<String, sqlx::Error>
    where
        T: sqlx::Encode<'t, A::Database> + sqlx::Type<A::Database>,
    {
        self.args.add(value).map_err(sqlx::Error::Encode)?;
        let mut placeholder = String::new();
        self.args
            .format_placeholder(&mut placeholder)
            .map_err(|e| sqlx::Error::Encode(e.into()))?;
        Ok(placeholder)
    }

    /// `?, ?, ..`: the values bound, comma-separated.
    fn row(&mut self, values: &[&str]) -> Result<(), sqlx::Error>
    where
        for<'t> &'t str: sqlx::Encode<'t, A::Database> + sqlx::Type<A::Database>,
    {
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(*v)?;
        }
        Ok(())
    }

    /// `(?, ?, ..), (?, ..)` for `rows`, each bound by `bind_row`.
    pub(super) fn values<R>(
        &mut self,
        rows: &[R],
        mut bind_row: impl FnMut(&mut Self, &R) -> Result<(), sqlx::Error>,
    ) -> Result<(), sqlx::Error> {
        for (i, row) in rows.iter().enumerate() {
            self.push(if i == 0 { "(" } else { ", (" });
            bind_row(self, row)?;
            self.push(")");
        }
        Ok(())
    }
}

pub(super) type PgScript = Script<sqlx::postgres::PgArguments>;
pub(super) type SqliteScript = Script<sqlx::sqlite::SqliteArguments>;

/// The `pk` of a change-log row: the entity's primary key as canonical JSON.
pub(super) fn pk_json(id: &str) -> String {
    canonical(&serde_json::json!({ "id": id }))
}

/// PostgreSQL: the writes as data-modifying CTEs of one statement, row sets as arrays, so
/// each shape of write has one fixed statement text (prepared once per connection).
///
/// All CTEs of a statement see the same snapshot and run in no defined order, so no two of
/// them may touch the same row: replacing an entity's index rows deletes only the old rows
/// that are not also new, and inserts only the new rows that are not already there.
fn pg_script(
    pending: Option<&Pending>,
    version: Option<&VersionRows>,
) -> Result<PgScript, sqlx::Error> {
    let mut s = PgScript::new();
    s.push("WITH ");
    match pending {
        Some(Pending::Put {
            ty,
            id,
            ws,
            body,
            index,
            is_new,
        }) => {
            let ty = s.param(ty.as_str())?;
            let id = s.param(id.as_str())?;
            let ws = s.param(ws.as_str())?;
            let body = s.param(body.as_str())?;
            let (names, values): (Vec<&str>, Vec<&str>) = index
                .keys
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .unzip();
            let names = s.param(names)?;
            let values = s.param(values)?;
            let ref_fields: Vec<&str> = index.refs.iter().map(|r| r.0.as_str()).collect();
            let ref_types: Vec<&str> = index.refs.iter().map(|r| r.1.as_str()).collect();
            let ref_ids: Vec<&str> = index.refs.iter().map(|r| r.2.as_str()).collect();
            let ref_fields = s.param(ref_fields)?;
            let ref_types = s.param(ref_types)?;
            let ref_ids = s.param(ref_ids)?;
            let tags: Vec<&str> = index.tags.iter().map(String::as_str).collect();
            let tags = s.param(tags)?;
            s.push(&format!(
                "e AS (INSERT INTO dp_entities (type, id, ws_id, body) VALUES ({ty}, {id}, {ws}, {body}) \
                   ON CONFLICT (type, id) DO UPDATE SET ws_id = excluded.ws_id, body = excluded.body), \
                 nk AS (SELECT * FROM UNNEST({names}::text[], {values}::text[]) AS nk(name, value)), \
                 nr AS (SELECT * FROM UNNEST({ref_fields}::text[], {ref_types}::text[], {ref_ids}::text[]) \
                   AS nr(field, parent_type, parent_id)), \
                 nt AS (SELECT * FROM UNNEST({tags}::text[]) AS nt(tag)), "
            ));
            if *is_new {
                // Nothing to replace: plain inserts, so a key taken meanwhile fails loudly.
                s.push(&format!(
                    "ki AS (INSERT INTO dp_keys (type, ws_id, name, value, id) \
                       SELECT {ty}, {ws}, nk.name, nk.value, {id} FROM nk), \
                     ri AS (INSERT INTO dp_refs (parent_type, parent_id, child_type, field, child_id) \
                       SELECT nr.parent_type, nr.parent_id, {ty}, nr.field, {id} FROM nr), \
                     ti AS (INSERT INTO dp_tags (type, tag, id) SELECT {ty}, nt.tag, {id} FROM nt)"
                ));
            } else {
                // A key row is (type, ws_id, name, value) -> id, so a new key row that another
                // entity holds is inserted, and fails, as above.
                s.push(&format!(
                    "kd AS (DELETE FROM dp_keys d WHERE d.type = {ty} AND d.id = {id} AND NOT EXISTS \
                       (SELECT 1 FROM nk WHERE nk.name = d.name AND nk.value = d.value AND d.ws_id = {ws})), \
                     ki AS (INSERT INTO dp_keys (type, ws_id, name, value, id) \
                       SELECT {ty}, {ws}, nk.name, nk.value, {id} FROM nk WHERE NOT EXISTS (SELECT 1 FROM dp_keys d \
                       WHERE d.type = {ty} AND d.ws_id = {ws} AND d.name = nk.name AND d.value = nk.value AND d.id = {id})), \
                     rd AS (DELETE FROM dp_refs d WHERE d.child_type = {ty} AND d.child_id = {id} AND NOT EXISTS \
                       (SELECT 1 FROM nr WHERE nr.field = d.field AND nr.parent_type = d.parent_type \
                       AND nr.parent_id = d.parent_id)), \
                     ri AS (INSERT INTO dp_refs (parent_type, parent_id, child_type, field, child_id) \
                       SELECT nr.parent_type, nr.parent_id, {ty}, nr.field, {id} FROM nr ON CONFLICT DO NOTHING), \
                     td AS (DELETE FROM dp_tags d WHERE d.type = {ty} AND d.id = {id} AND NOT EXISTS \
                       (SELECT 1 FROM nt WHERE nt.tag = d.tag)), \
                     ti AS (INSERT INTO dp_tags (type, tag, id) SELECT {ty}, nt.tag, {id} FROM nt ON CONFLICT DO NOTHING)"
                ));
            }
        }
        Some(Pending::Delete { ty, id }) => {
            let ty = s.param(ty.as_str())?;
            let id = s.param(id.as_str())?;
            s.push(&format!(
                "de AS (DELETE FROM dp_entities WHERE type = {ty} AND id = {id}), \
                 dk AS (DELETE FROM dp_keys WHERE type = {ty} AND id = {id}), \
                 dr AS (DELETE FROM dp_refs WHERE child_type = {ty} AND child_id = {id}), \
                 dt AS (DELETE FROM dp_tags WHERE type = {ty} AND id = {id})"
            ));
        }
        None => {}
    }
    if let Some(v) = version {
        if pending.is_some() {
            s.push(", ");
        }
        let n = i32::try_from(v.deltas.len()).unwrap_or(i32::MAX);
        let seqs: Vec<i32> = (0..n).collect();
        let types: Vec<&str> = v.deltas.iter().map(|d| d.ty.as_str()).collect();
        let pks: Vec<String> = v.deltas.iter().map(|d| pk_json(&d.id)).collect();
        let wss: Vec<&str> = v.deltas.iter().map(|d| d.ws.as_str()).collect();
        let entities: Vec<Option<&str>> = v.entities.iter().map(Option::as_deref).collect();
        let version = s.param(v.version)?;
        let hash = s.param(v.hash.as_str())?;
        let now = s.param(v.now)?;
        let n = s.param(n)?;
        let seqs = s.param(seqs)?;
        let types = s.param(types)?;
        let pks = s.param(pks)?;
        let wss = s.param(wss)?;
        let entities = s.param(entities)?;
        s.push(&format!(
            "v AS (INSERT INTO dp_versions (version, state_hash, created_at, n_deltas) \
               VALUES ({version}, {hash}, {now}, {n})), \
             c AS (INSERT INTO dp_changes (version, seq, type, pk, ws_id, entity) \
               SELECT {version}, c.seq, c.type, c.pk, c.ws_id, c.entity FROM UNNEST({seqs}::int4[], \
               {types}::text[], {pks}::text[], {wss}::text[], {entities}::text[]) AS c(seq, type, pk, ws_id, entity))"
        ));
    }
    s.push(" SELECT 1");
    Ok(s)
}

/// SQLite: the writes as consecutive statements of one script, run in order by one call
/// into SQLite's thread. Rows go in chunks that stay under SQLite's bind-parameter limit.
fn sqlite_script(
    pending: Option<&Pending>,
    version: Option<&VersionRows>,
) -> Result<SqliteScript, sqlx::Error> {
    const CHUNK: usize = 500;
    let mut s = SqliteScript::new();
    match pending {
        Some(Pending::Put {
            ty,
            id,
            ws,
            body,
            index,
            is_new,
        }) => {
            s.push("INSERT INTO dp_entities (type, id, ws_id, body) VALUES (");
            s.row(&[ty, id, ws, body])?;
            s.push(") ON CONFLICT (type, id) DO UPDATE SET ws_id = excluded.ws_id, body = excluded.body;");
            if !is_new {
                s.push("DELETE FROM dp_keys WHERE type = ");
                s.bind(ty.as_str())?.push(" AND id = ").bind(id.as_str())?;
                s.push(";DELETE FROM dp_refs WHERE child_type = ");
                s.bind(ty.as_str())?
                    .push(" AND child_id = ")
                    .bind(id.as_str())?;
                s.push(";DELETE FROM dp_tags WHERE type = ");
                s.bind(ty.as_str())?.push(" AND id = ").bind(id.as_str())?;
                s.push(";");
            }
            for chunk in index.keys.chunks(CHUNK) {
                s.push("INSERT INTO dp_keys (type, ws_id, name, value, id) VALUES ");
                s.values(chunk, |s, (name, value)| s.row(&[ty, ws, name, value, id]))?;
                s.push(";");
            }
            for chunk in index.refs.chunks(CHUNK) {
                s.push("INSERT INTO dp_refs (parent_type, parent_id, child_type, field, child_id) VALUES ");
                s.values(chunk, |s, (field, parent_ty, parent_id)| {
                    s.row(&[parent_ty, parent_id, ty, field, id])
                })?;
                s.push(";");
            }
            for chunk in index.tags.chunks(CHUNK) {
                s.push("INSERT INTO dp_tags (type, tag, id) VALUES ");
                s.values(chunk, |s, tag| s.row(&[ty, tag, id]))?;
                s.push(";");
            }
        }
        Some(Pending::Delete { ty, id }) => {
            s.push("DELETE FROM dp_entities WHERE type = ");
            s.bind(ty.as_str())?.push(" AND id = ").bind(id.as_str())?;
            s.push(";DELETE FROM dp_keys WHERE type = ");
            s.bind(ty.as_str())?.push(" AND id = ").bind(id.as_str())?;
            s.push(";DELETE FROM dp_refs WHERE child_type = ");
            s.bind(ty.as_str())?
                .push(" AND child_id = ")
                .bind(id.as_str())?;
            s.push(";DELETE FROM dp_tags WHERE type = ");
            s.bind(ty.as_str())?.push(" AND id = ").bind(id.as_str())?;
            s.push(";");
        }
        None => {}
    }
    if let Some(v) = version {
        s.push("INSERT INTO dp_versions (version, state_hash, created_at, n_deltas) VALUES (");
        s.bind(v.version)?
            .push(", ")
            .bind(v.hash.as_str())?
            .push(", ");
        s.bind(v.now)?
            .push(", ")
            .bind(v.deltas.len() as i32)?
            .push(");");
        for (chunk_idx, chunk) in v.deltas.chunks(CHUNK).enumerate() {
            s.push("INSERT INTO dp_changes (version, seq, type, pk, ws_id, entity) VALUES ");
            let mut seq = (chunk_idx * CHUNK) as i32;
            s.values(chunk, |s, d| {
                s.bind(v.version)?.push(", ").bind(seq)?.push(", ");
                s.bind(d.ty.as_str())?
                    .push(", ")
                    .bind(pk_json(&d.id))?
                    .push(", ");
                s.bind(d.ws.as_str())?
                    .push(", ")
                    .bind(v.entities[seq as usize].as_deref())?;
                seq += 1;
                Ok(())
            })?;
            s.push(";");
        }
    }
    Ok(s)
}

/// What [`Txn::probe`] found.
#[derive(Default)]
struct Probe {
    /// The asked (type, id) pairs that exist.
    found: std::collections::HashSet<(String, String)>,
    /// The asked keys (name, value) that an entity holds, with its id.
    owners: std::collections::HashMap<(String, String), String>,
}

/// The probe's one statement, the same on both backends: entities by (type, id) and key
/// owners by (name, value), each an `OR` of index lookups.
fn probe_script<A>(
    entities: &[(&str, &str)],
    ty: &str,
    ws: &str,
    keys: &[(String, String)],
) -> Result<Script<A>, sqlx::Error>
where
    A: sqlx::Arguments,
    for<'t> &'t str: sqlx::Encode<'t, A::Database> + sqlx::Type<A::Database>,
{
    let mut s = Script::<A>::new();
    if !entities.is_empty() {
        s.push("SELECT 0, type, id, CAST(NULL AS TEXT) FROM dp_entities WHERE ");
        for (i, (ty, id)) in entities.iter().enumerate() {
            s.push(if i == 0 { "(type = " } else { " OR (type = " });
            s.bind(*ty)?.push(" AND id = ").bind(*id)?.push(")");
        }
    }
    if !keys.is_empty() {
        if !entities.is_empty() {
            s.push(" UNION ALL ");
        }
        s.push("SELECT 1, name, value, id FROM dp_keys WHERE type = ");
        s.bind(ty)?.push(" AND ws_id = ").bind(ws)?.push(" AND (");
        for (i, (name, value)) in keys.iter().enumerate() {
            s.push(if i == 0 { "(name = " } else { " OR (name = " });
            s.bind(name.as_str())?
                .push(" AND value = ")
                .bind(value.as_str())?
                .push(")");
        }
        s.push(")");
    }
    Ok(s)
}

/// PostgreSQL: a create that needs no read before its write ([`plannable`]), planned in memory
/// (validated, index rows and its term of the state hash computed) and then applied with the
/// other planned creates next to it in one call of `dp_apply_creates` (migration 0005): one
/// round trip for the run instead of three per operation. The function probes each operation
/// inside its own subtransaction (the operation's savepoint) and stops at the first that fails.
pub(super) struct PlannedCreate {
    schema: std::sync::Arc<EntitySchema>,
    id: String,
    entity: Value,
    /// The entity as stored, also the delta's entity.
    body: String,
    index: Indexed,
    /// The foreign keys to check ([`refs_to_check`]).
    refs: Vec<(String, String, bool, String)>,
    /// The entity's term of the state hash.
    term: StateHash,
}

/// What a `dp_apply_creates` call did.
enum Called {
    /// Every operation applied (`None`), or those before the one that failed.
    Applied(Option<CreateFailed>),
    /// A call as its own transaction found another head than the one it was given, and wrote
    /// nothing: the head and its state hash.
    Stale(i64, StateHash),
}

/// The operation of a `dp_apply_creates` call that failed, as the function reported it.
struct CreateFailed {
    /// Its position in the call.
    at: usize,
    sqlstate: String,
    message: String,
    /// What its probe found, after its writes were undone.
    probe: Probe,
}

impl CreateFailed {
    /// The error the other path reports: from the checks when the probe explains the failure,
    /// else the database's error as `From<sqlx::Error>` maps it.
    fn into_error(self, p: PlannedCreate) -> StoreError {
        match check_verdict(
            &p.schema,
            &p.id,
            &p.entity,
            &p.index,
            true,
            p.refs,
            &self.probe,
        ) {
            Err(e) => e,
            Ok(()) => StoreError::from_database(&self.sqlstate, &self.message),
        }
    }
}

/// True when `op` is a create whose only reads are its checks, so it can be planned without
/// the database ([`plan_create`]): no scope, no transient fields, a workspaceable type (its key
/// rows and its probe use the same workspace), and every foreign key absent or given by id.
fn plannable(registry: &Registry, ws: &str, op: &Op) -> bool {
    let Op::Create {
        entity,
        input,
        scope: None,
    } = op
    else {
        return false;
    };
    let Some(schema) = registry.get(entity) else {
        return false;
    };
    if ws.is_empty() || !schema.workspaceable || !schema.transient_fields.is_empty() {
        return false;
    }
    registry
        .references_of(&schema.name)
        .filter(|fk| !fk.is_array)
        .all(|fk| match input.get(&fk.field) {
            Some(Value::Object(given)) => registry.get(&fk.parent).is_some_and(|parent| {
                given
                    .get(&parent.primary_key)
                    .and_then(Value::as_str)
                    .is_some_and(crate::schema::is_uuid)
            }),
            _ => true,
        })
}

/// A [`plannable`] create, validated and completed as [`WriteCtx::apply`] would (its
/// `resolve_foreign` keeps only the id of a foreign key given by id), without the database.
fn plan_create(
    registry: &Registry,
    ws: &str,
    now: i64,
    op: Op,
) -> Result<PlannedCreate, StoreError> {
    let Op::Create {
        entity, mut input, ..
    } = op
    else {
        return Err(StoreError::Internal("only a create is planned".into()));
    };
    let schema = registry.get(&entity).cloned().ok_or(StoreError::NotFound)?;
    if let Value::Object(m) = &mut input {
        for fk in registry
            .references_of(&schema.name)
            .filter(|fk| !fk.is_array)
        {
            let Some(parent) = registry.get(&fk.parent) else {
                continue;
            };
            let pk = &parent.primary_key;
            let id = match m.get(&fk.field) {
                Some(Value::Object(given)) => given
                    .get(pk)
                    .and_then(Value::as_str)
                    .filter(|id| crate::schema::is_uuid(id))
                    .map(str::to_owned),
                _ => None,
            };
            if let Some(id) = id {
                m.insert(fk.field.clone(), serde_json::json!({ pk.clone(): id }));
            }
        }
    }
    let prepared = registry
        .prepare(&schema, input, None, Mode::Insert, now)
        .map_err(StoreError::Schema)?;
    let entity = prepared.entity;
    let id = id_of(&entity).unwrap_or_default().to_owned();
    let index = index_of(&schema, &entity);
    let refs = refs_to_check(registry, &schema, &entity);
    let body = canonical(&entity);
    let term = StateHash::of_entity(&schema.name, ws, &id, &entity);
    Ok(PlannedCreate {
        schema,
        id,
        entity,
        body,
        index,
        refs,
        term,
    })
}

/// What [`Store::apply_one`] applies: an operation, or a planned create whose call failed
/// as a whole.
enum Work {
    Op(Op),
    Planned(PlannedCreate),
}

impl<'c> Txn<'c> {
    /// A transaction on `conn`, already begun ([`Store::begin_on`]).
    pub(super) fn on(conn: &'c mut WriteConn) -> Txn<'c> {
        Txn {
            conn,
            pending: None,
            dirty: false,
        }
    }

    /// Opens the transaction, takes the version lock and the first operation's savepoint, in
    /// one round trip.
    async fn begin(conn: &mut WriteConn) -> Result<(i64, StateHash, String), StoreError> {
        use sqlx::Row as _;
        let (version, hash, epoch): (i64, String, String) = match conn {
            // A prepared statement kept by the connection (SQLite takes several statements in
            // one): parsing this text on every write was most of the 7% of the CP's CPU spent
            // in SQLite's parser (issue 11). PostgreSQL runs several statements only as a
            // simple query, which is never prepared.
            WriteConn::Sqlite(c) => {
                let rows = sqlx::query(
                    "BEGIN IMMEDIATE; SELECT version, state_hash, epoch FROM dp_meta WHERE id = 1; SAVEPOINT dp_op",
                )
                .fetch_all(&mut **c)
                .await?;
                let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)
            }
            WriteConn::Postgres(c) => {
                let rows = sqlx::raw_sql(
                    "BEGIN; SELECT version, state_hash, epoch FROM dp_meta WHERE id = 1 FOR UPDATE; SAVEPOINT dp_op",
                )
                .fetch_all(&mut **c)
                .await?;
                let row = rows.first().ok_or(sqlx::Error::RowNotFound)?;
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?)
            }
        };
        let hash = StateHash::from_hex(&hash)
            .ok_or_else(|| StoreError::Internal("corrupt state hash in dp_meta".into()))?;
        Ok((version, hash, epoch))
    }

    /// Moves the head to `head` (and, on PostgreSQL, sends the version notification) when the
    /// transaction made versions, and commits, in one round trip.
    pub(super) async fn commit(
        &mut self,
        head: Option<(i64, &StateHash)>,
    ) -> Result<(), sqlx::Error> {
        let Some((version, hash)) = head else {
            return self.raw("COMMIT").await;
        };
        let hash = hash.to_hex();
        match &mut *self.conn {
            // Prepared once per connection, as `begin`'s.
            WriteConn::Sqlite(c) => {
                sqlx::query("UPDATE dp_meta SET version = ?, state_hash = ? WHERE id = 1; COMMIT")
                    .bind(version)
                    .bind(hash)
                    .execute(&mut **c)
                    .await?;
                Ok(())
            }
            // Only an integer and a hex digest are formatted into the text: nothing to escape.
            // fleet::VERSIONS_CHANNEL
            WriteConn::Postgres(c) => {
                let sql = format!(
                    "UPDATE dp_meta SET version = {version}, state_hash = '{hash}' WHERE id = 1; \
                     SELECT pg_notify('deltaplane_versions', '{version}'); COMMIT"
                );
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut **c)
                    .await?;
                Ok(())
            }
        }
    }

    /// Runs one or more parameterless statements in a single round trip (on SQLite, prepared
    /// once per connection).
    pub(super) async fn raw(&mut self, sql: &'static str) -> Result<(), sqlx::Error> {
        match &mut *self.conn {
            WriteConn::Sqlite(c) => sqlx::query(sql).execute(&mut **c).await.map(|_| ()),
            WriteConn::Postgres(c) => sqlx::raw_sql(sql).execute(&mut **c).await.map(|_| ()),
        }
    }

    /// Ends an operation that succeeded: its savepoint is released and the next one's taken,
    /// unless nothing was written since (then the savepoint still serves).
    async fn next_op(&mut self) -> Result<(), StoreError> {
        self.flush().await?;
        if self.dirty {
            self.raw("RELEASE SAVEPOINT dp_op; SAVEPOINT dp_op").await?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Ends an operation that failed: what it held back is dropped and what it wrote undone.
    async fn undo_op(&mut self, last: bool) -> Result<(), StoreError> {
        self.pending = None;
        if self.dirty {
            self.raw(if last {
                "ROLLBACK TO SAVEPOINT dp_op"
            } else {
                "ROLLBACK TO SAVEPOINT dp_op; RELEASE SAVEPOINT dp_op; SAVEPOINT dp_op"
            })
            .await?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Sends the held-back write, with `version` when given.
    async fn send(&mut self, version: Option<&VersionRows<'_>>) -> Result<(), sqlx::Error> {
        let pending = self.pending.take();
        if pending.is_none() && version.is_none() {
            return Ok(());
        }
        self.dirty = true;
        match &mut *self.conn {
            WriteConn::Sqlite(c) => {
                let s = sqlite_script(pending.as_ref(), version)?;
                sqlx::query_with(sqlx::AssertSqlSafe(s.sql), s.args)
                    .execute(&mut **c)
                    .await?;
            }
            WriteConn::Postgres(c) => {
                let s = pg_script(pending.as_ref(), version)?;
                sqlx::query_with(sqlx::AssertSqlSafe(s.sql), s.args)
                    .execute(&mut **c)
                    .await?;
            }
        }
        Ok(())
    }

    /// Sends the held-back write, if any: before every read and every other write.
    async fn flush(&mut self) -> Result<(), sqlx::Error> {
        if self.pending.is_some() {
            self.send(None).await?;
        }
        Ok(())
    }

    /// Marks the operation dirty when a read fails (PostgreSQL then refuses everything
    /// until the savepoint is rolled back to).
    fn read_failed<T>(&mut self, r: Result<T, sqlx::Error>) -> Result<T, sqlx::Error> {
        if r.is_err() {
            self.dirty = true;
        }
        r
    }

    /// In one round trip: which of `entities` exist, and which entity holds each of `keys`
    /// (of type `ty` in workspace `ws`).
    async fn probe(
        &mut self,
        entities: &[(&str, &str)],
        ty: &str,
        ws: &str,
        keys: &[(String, String)],
    ) -> Result<Probe, sqlx::Error> {
        let mut probe = Probe::default();
        if entities.is_empty() && keys.is_empty() {
            return Ok(probe);
        }
        self.flush().await?;
        type Row = (i32, String, String, Option<String>);
        let rows: Result<Vec<Row>, sqlx::Error> = match &mut *self.conn {
            WriteConn::Sqlite(c) => {
                let s = probe_script::<sqlx::sqlite::SqliteArguments>(entities, ty, ws, keys)?;
                sqlx::query_as_with(sqlx::AssertSqlSafe(s.sql), s.args)
                    .fetch_all(&mut **c)
                    .await
            }
            WriteConn::Postgres(c) => {
                let s = probe_script::<sqlx::postgres::PgArguments>(entities, ty, ws, keys)?;
                sqlx::query_as_with(sqlx::AssertSqlSafe(s.sql), s.args)
                    .fetch_all(&mut **c)
                    .await
            }
        };
        for (kind, a, b, id) in self.read_failed(rows)? {
            match (kind, id) {
                (0, _) => {
                    probe.found.insert((a, b));
                }
                (_, Some(id)) => {
                    probe.owners.insert((a, b), id);
                }
                (_, None) => {}
            }
        }
        Ok(probe)
    }

    /// PostgreSQL: applies `plans` (versions from `first_version`, state hashes `hashes`) in
    /// one call of `dp_apply_creates`, inside this transaction, or, with `head` (the head the
    /// versions follow), as a transaction of its own that takes the version lock and commits.
    async fn apply_creates(
        &mut self,
        plans: &[(usize, PlannedCreate)],
        ws: &str,
        first_version: i64,
        hashes: Vec<String>,
        now: i64,
        head: Option<(i64, String)>,
    ) -> Result<Called, sqlx::Error> {
        self.flush().await?;
        let WriteConn::Postgres(c) = &mut *self.conn else {
            return Err(sqlx::Error::Protocol(
                "planned creates run on PostgreSQL".into(),
            ));
        };
        let n = plans.len();
        let mut types = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut bodies = Vec::with_capacity(n);
        let mut pks = Vec::with_capacity(n);
        let mut versions = Vec::with_capacity(n);
        let (mut key_end, mut key_names, mut key_values) = (Vec::with_capacity(n), vec![], vec![]);
        let (mut ref_end, mut ref_fields, mut ref_types, mut ref_ids) =
            (Vec::with_capacity(n), vec![], vec![], vec![]);
        let (mut tag_end, mut tags) = (Vec::with_capacity(n), vec![]);
        let (mut par_end, mut par_types, mut par_ids) = (Vec::with_capacity(n), vec![], vec![]);
        let end = |v: &Vec<&str>| i32::try_from(v.len()).unwrap_or(i32::MAX);
        for (k, (_, p)) in plans.iter().enumerate() {
            types.push(p.schema.name.as_str());
            ids.push(p.id.as_str());
            bodies.push(p.body.as_str());
            pks.push(pk_json(&p.id));
            versions.push(first_version + k as i64);
            for (name, value) in &p.index.keys {
                key_names.push(name.as_str());
                key_values.push(value.as_str());
            }
            key_end.push(end(&key_names));
            for (field, ty, id) in &p.index.refs {
                ref_fields.push(field.as_str());
                ref_types.push(ty.as_str());
                ref_ids.push(id.as_str());
            }
            ref_end.push(end(&ref_fields));
            tags.extend(p.index.tags.iter().map(String::as_str));
            tag_end.push(end(&tags));
            for (_, ty, _, id) in &p.refs {
                par_types.push(ty.as_str());
                par_ids.push(id.as_str());
            }
            par_end.push(end(&par_types));
        }
        type Row = (i32, i32, Option<String>, Option<String>, Option<String>);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT r_kind, r_op, r_a, r_b, r_c FROM dp_apply_creates($1, $2, $3, $4, $5, $6, \
             $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
        )
        .bind(types)
        .bind(ids)
        .bind(vec![ws; n])
        .bind(bodies)
        .bind(pks)
        .bind(versions)
        .bind(hashes)
        .bind(now)
        .bind(key_end)
        .bind(key_names)
        .bind(key_values)
        .bind(ref_end)
        .bind(ref_fields)
        .bind(ref_types)
        .bind(ref_ids)
        .bind(tag_end)
        .bind(tags)
        .bind(par_end)
        .bind(par_types)
        .bind(par_ids)
        .bind(head.as_ref().map(|h| h.0))
        .bind(head.map(|h| h.1))
        .fetch_all(&mut **c)
        .await?;
        if let Some((3, _, Some(version), Some(hash), _)) = rows.first() {
            let stale = || sqlx::Error::Protocol(format!("dp_apply_creates: head {version}"));
            return Ok(Called::Stale(
                version.parse().map_err(|_| stale())?,
                StateHash::from_hex(hash).ok_or_else(stale)?,
            ));
        }
        let mut failed: Option<CreateFailed> = None;
        for (kind, op, a, b, c) in rows {
            let at = usize::try_from(op - 1).unwrap_or(usize::MAX);
            let f = failed.get_or_insert_with(|| CreateFailed {
                at,
                sqlstate: String::new(),
                message: String::new(),
                probe: Probe::default(),
            });
            if at != f.at || at >= n {
                return Err(sqlx::Error::Protocol(format!(
                    "dp_apply_creates reported operation {op} of {n} after {}",
                    f.at + 1
                )));
            }
            match (kind, a, b, c) {
                (2, Some(state), _, message) => {
                    f.sqlstate = state;
                    f.message = message.unwrap_or_default();
                }
                (0, Some(ty), Some(id), _) => {
                    f.probe.found.insert((ty, id));
                }
                (1, Some(name), Some(value), Some(id)) => {
                    f.probe.owners.insert((name, value), id);
                }
                _ => {}
            }
        }
        Ok(Called::Applied(failed))
    }

    async fn get(&mut self, ty: &str, id: &str) -> Result<Option<(String, Value)>, StoreError> {
        self.flush().await?;
        let row: Result<Option<(String, String)>, _> = on_tx!(&mut *self.conn, c => sqlx::query_as("SELECT ws_id, body FROM dp_entities WHERE type = $1 AND id = $2")
            .bind(ty)
            .bind(id)
            .fetch_optional(&mut **c)
            .await);
        match self.read_failed(row)? {
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
        self.flush().await?;
        let r = on_tx!(&mut *self.conn, c => sqlx::query_scalar("SELECT id FROM dp_keys WHERE type = $1 AND ws_id = $2 AND name = $3 AND value = $4")
            .bind(ty)
            .bind(ws)
            .bind(name)
            .bind(value)
            .fetch_optional(&mut **c)
            .await);
        self.read_failed(r)
    }

    /// Children of `parent` through `child_type.field`, as (child id).
    async fn children(
        &mut self,
        parent_ty: &str,
        parent_id: &str,
        child_ty: &str,
        field: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        self.flush().await?;
        let r = on_tx!(&mut *self.conn, c => sqlx::query_scalar(
            "SELECT child_id FROM dp_refs WHERE parent_type = $1 AND parent_id = $2 AND child_type = $3 AND field = $4 ORDER BY child_id")
            .bind(parent_ty)
            .bind(parent_id)
            .bind(child_ty)
            .bind(field)
            .fetch_all(&mut **c)
            .await);
        self.read_failed(r)
    }

    /// Writes an entity with its index rows (held back until the next statement).
    async fn put(
        &mut self,
        ty: &str,
        id: &str,
        ws: &str,
        entity: &Value,
        index: Indexed,
        is_new: bool,
    ) -> Result<(), sqlx::Error> {
        self.flush().await?;
        self.pending = Some(Pending::Put {
            ty: ty.to_owned(),
            id: id.to_owned(),
            ws: ws.to_owned(),
            body: canonical(entity),
            index,
            is_new,
        });
        Ok(())
    }

    /// Removes an entity with its index rows (held back until the next statement).
    async fn delete(&mut self, ty: &str, id: &str) -> Result<(), sqlx::Error> {
        self.flush().await?;
        self.pending = Some(Pending::Delete {
            ty: ty.to_owned(),
            id: id.to_owned(),
        });
        Ok(())
    }

    /// Appends a version with its deltas, together with the held-back write.
    async fn append_version(
        &mut self,
        version: i64,
        hash: &StateHash,
        now: i64,
        deltas: &[Delta],
        entities: &[Option<String>],
    ) -> Result<(), sqlx::Error> {
        self.send(Some(&VersionRows {
            version,
            hash: hash.to_hex(),
            now,
            deltas,
            entities,
        }))
        .await
    }
}

/// The state of one transaction while it applies operations.
struct WriteCtx<'a, 'c> {
    tx: &'a mut Txn<'c>,
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

    /// A connection from the pool for write transactions.
    async fn acquire_write(&self) -> Result<WriteConn, StoreError> {
        // Failing to get a connection means nothing was written.
        let unavailable = |e: sqlx::Error| StoreError::Unavailable(e.to_string());
        Ok(match self.pool() {
            Pool::Sqlite(p) => WriteConn::Sqlite(p.acquire().await.map_err(unavailable)?),
            Pool::Postgres(p) => WriteConn::Postgres(p.acquire().await.map_err(unavailable)?),
        })
    }

    /// Opens a write transaction on the kept connection, or on a new one when there is none
    /// or the kept one turns out dead (as the pool's test before lending would have found).
    /// On PostgreSQL the first round trip is bounded like the pool's wait for a connection.
    pub(super) async fn begin_on(
        &self,
        slot: &mut WriteSlot,
    ) -> Result<(i64, StateHash), StoreError> {
        if slot.in_txn {
            slot.discard();
        }
        let timeout = self.inner.options.acquire_timeout;
        loop {
            let fresh = slot.conn.is_none();
            let conn = match &mut slot.conn {
                Some(conn) => conn,
                None => slot.conn.insert(self.acquire_write().await?),
            };
            slot.in_txn = true;
            let begun = match conn {
                WriteConn::Sqlite(_) => Txn::begin(conn).await,
                WriteConn::Postgres(_) => {
                    match tokio::time::timeout(timeout, Txn::begin(conn)).await {
                        Ok(begun) => begun,
                        Err(_) => Err(StoreError::Unavailable(format!(
                            "no answer from the database within {timeout:?}"
                        ))),
                    }
                }
            };
            match begun {
                Ok((version, hash, epoch)) => {
                    slot.epoch = epoch;
                    return Ok((version, hash));
                }
                Err(e) => {
                    slot.discard();
                    if fresh || !matches!(e, StoreError::Unavailable(_)) {
                        return Err(e);
                    }
                }
            }
        }
    }

    async fn write_batch_inner(
        &self,
        ops: Vec<Op>,
    ) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut slot = self.inner.write_slot.lock().await;
        let slot = &mut *slot;
        let mut results = Vec::with_capacity(ops.len());
        // Bootstrap writes the workspace itself; afterwards the default workspace always exists.
        let ws = self.default_workspace_id().await?.unwrap_or_default();
        let now = now_secs();
        let batch = if self.alone_possible(slot, &ws, &ops) {
            let pending = plan_all(self.registry(), &ws, now, ops, &mut results);
            match self
                .write_planned_alone(slot, &ws, now, pending, &mut results)
                .await?
            {
                None => return Ok(results),
                Some(pending) => Batch::Planned(pending),
            }
        } else {
            Batch::Ops(ops)
        };
        // The version lock comes first: every check below runs serialised against other writers.
        let (start, hash) = self.begin_on(slot).await?;
        slot.head = Some((start, hash));
        let Some(conn) = &mut slot.conn else {
            return Err(StoreError::Internal("write connection missing".into()));
        };
        let mut tx = Txn {
            conn,
            pending: None,
            dirty: false,
        };
        let mut log = Log {
            head: start,
            hash,
            now,
            ws,
            written: Vec::new(),
        };
        match self.apply_all(&mut tx, &mut log, batch, &mut results).await {
            Ok(()) => {
                let head = (log.head != start).then_some((log.head, log.hash));
                if let Some(hook) = &self.inner.options.before_commit {
                    let delay = hook();
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                }
                let committed = tx.commit(head.as_ref().map(|(v, h)| (*v, h))).await;
                if let Err(e) = committed {
                    slot.discard();
                    return Err(StoreError::CommitUnknown(e.to_string()));
                }
                slot.in_txn = false;
                slot.last_used = Some(std::time::Instant::now());
                if let Some((head, hash)) = head {
                    slot.head = Some((head, hash));
                    // Before the head moves: whoever wakes up for it finds the deltas here.
                    self.record_committed(&slot.epoch, log.written);
                    self.observe(head);
                }
                Ok(results)
            }
            Err(e) => {
                if tx.raw("ROLLBACK").await.is_ok() {
                    slot.in_txn = false;
                } else {
                    slot.discard();
                }
                Err(e)
            }
        }
    }

    /// True when `ops` can run as planned creates in a statement of their own
    /// ([`Store::write_planned_alone`]): PostgreSQL, every operation [`plannable`], the head
    /// known, no test hook before the commit, and a kept connection that answered less than
    /// a second ago. A connection idle longer may have died meanwhile: a transaction begun
    /// on it finds that out by `BEGIN` and retries on a new one ([`Store::begin_on`]), while a
    /// statement that commits by itself could not tell whether it committed.
    fn alone_possible(&self, slot: &WriteSlot, ws: &str, ops: &[Op]) -> bool {
        matches!(slot.conn, Some(WriteConn::Postgres(_)))
            && !slot.in_txn
            && slot.head.is_some()
            && self.inner.options.before_commit.is_none()
            && slot
                .last_used
                .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1))
            && ops.iter().all(|op| plannable(self.registry(), ws, op))
    }

    /// PostgreSQL: applies planned creates with one round trip per transaction: each call of
    /// `dp_apply_creates` takes the version lock, checks that the head is the one this store
    /// last saw, applies the operations (each in its own subtransaction, stopping at the first
    /// that fails), moves the head and commits, as one statement. After a failed operation
    /// the rest go in the next call. Returns the operations left for a transaction of the
    /// usual kind: when the head moved (another writer), or a call failed as a whole (the
    /// statement rolled back: nothing of it was written).
    async fn write_planned_alone(
        &self,
        slot: &mut WriteSlot,
        ws: &str,
        now: i64,
        mut pending: PlannedRun,
        results: &mut [Result<Outcome, StoreError>],
    ) -> Result<Option<PlannedRun>, StoreError> {
        while !pending.is_empty() {
            let Some((head, hash)) = slot.head else {
                return Ok(Some(pending));
            };
            let Some(conn) = &mut slot.conn else {
                return Ok(Some(pending));
            };
            let mut tx = Txn::on(conn);
            let hashes = chain(hash, &pending);
            // A call cancelled halfway leaves this set: the connection is then closed.
            slot.in_txn = true;
            let called = tx
                .apply_creates(
                    pending.make_contiguous(),
                    ws,
                    head + 1,
                    hashes,
                    now,
                    Some((head, hash.to_hex())),
                )
                .await;
            let failed = match called {
                Ok(Called::Applied(failed)) => failed,
                Ok(Called::Stale(head, hash)) => {
                    slot.in_txn = false;
                    slot.head = Some((head, hash));
                    return Ok(Some(pending));
                }
                Err(sqlx::Error::Database(e)) => {
                    slot.in_txn = false;
                    tracing::warn!(cause = %e, "dp_apply_creates failed; applying its operations in a transaction");
                    return Ok(Some(pending));
                }
                Err(e) => {
                    // The statement may or may not have committed.
                    slot.discard();
                    tracing::warn!(cause = %e, "write statement failed: commit outcome unknown");
                    let e = StoreError::CommitUnknown(e.to_string());
                    for (i, _) in pending {
                        results[i] = Err(e.clone());
                    }
                    return Ok(None);
                }
            };
            slot.in_txn = false;
            slot.last_used = Some(std::time::Instant::now());
            let applied = failed.as_ref().map_or(pending.len(), |f| f.at);
            let mut log = Log {
                head,
                hash,
                now,
                ws: ws.to_owned(),
                written: Vec::new(),
            };
            for (i, p) in pending.drain(..applied) {
                results[i] = Ok(log.push(p));
            }
            if applied > 0 {
                slot.head = Some((log.head, log.hash));
                // The call checked the head this store last saw under the version lock, so
                // the epoch read then still holds.
                self.record_committed(&slot.epoch, log.written);
                self.observe(log.head);
            }
            if let Some(f) = failed {
                let (i, p) = pending.pop_front().expect("the failed operation");
                results[i] = Err(f.into_error(p));
            }
        }
        Ok(None)
    }

    /// Runs every operation of `batch`, each result in `results` (planned ones have their
    /// place there already), moving `log` with each version.
    ///
    /// Round trips: per operation its reads, one for its writes with its version, and one to
    /// renew the savepoint (the lock and the first savepoint come with `BEGIN`, the head's
    /// move with `COMMIT`). On PostgreSQL, a run of creates that need no reads
    /// ([`plannable`]) is one round trip for the whole run ([`Store::apply_planned`]).
    async fn apply_all(
        &self,
        tx: &mut Txn<'_>,
        log: &mut Log,
        batch: Batch,
        results: &mut Vec<Result<Outcome, StoreError>>,
    ) -> Result<(), StoreError> {
        let ops = match batch {
            Batch::Ops(ops) => ops,
            Batch::Planned(pending) => {
                return self.apply_planned(tx, log, pending, true, results).await;
            }
        };
        let plan = matches!(self.pool(), Pool::Postgres(_));
        let registry = self.registry();
        let mut ops = ops.into_iter().peekable();
        while let Some(op) = ops.next() {
            if plan && plannable(registry, &log.ws, &op) {
                let mut run = vec![op];
                while let Some(next) = ops.next_if(|o| plannable(registry, &log.ws, o)) {
                    run.push(next);
                }
                let last = ops.peek().is_none();
                let pending = plan_all(registry, &log.ws, log.now, run, results);
                self.apply_planned(tx, log, pending, last, results).await?;
            } else {
                let last = ops.peek().is_none();
                results.push(self.apply_one(tx, log, Work::Op(op), last).await?);
            }
        }
        Ok(())
    }

    /// Applies one operation in the savepoint, with its version when it changed something, and
    /// renews the savepoint for the next (`last`: the transaction ends next). The outer error
    /// ends the transaction; the inner one is the operation's.
    async fn apply_one(
        &self,
        tx: &mut Txn<'_>,
        log: &mut Log,
        work: Work,
        last: bool,
    ) -> Result<Result<Outcome, StoreError>, StoreError> {
        let mut ctx = WriteCtx {
            tx: &mut *tx,
            registry: self.registry(),
            ws: log.ws.clone(),
            now: log.now,
            deltas: Vec::new(),
        };
        let applied = ctx.apply_work(work).await;
        let deltas = std::mem::take(&mut ctx.deltas);
        let applied = match applied {
            Ok(mut outcome) if !deltas.is_empty() => {
                let mut new_hash = log.hash;
                fold_hash(&mut new_hash, &deltas);
                let version = log.head + 1;
                let entities: Vec<Option<String>> = deltas
                    .iter()
                    .map(|d| d.entity.as_ref().map(canonical))
                    .collect();
                match tx
                    .append_version(version, &new_hash, log.now, &deltas, &entities)
                    .await
                {
                    Ok(()) => {
                        log.head = version;
                        log.hash = new_hash;
                        let kept = deltas.len() <= super::COMMITTED_MAX_DELTAS;
                        log.written.push(kept.then(|| {
                            written_version(
                                version,
                                deltas.iter().zip(&entities).map(|(d, e)| RawDelta {
                                    version,
                                    entity_type: &d.ty,
                                    id: &d.id,
                                    ws_id: &d.ws,
                                    entity: e.as_deref(),
                                }),
                            )
                        }));
                        outcome.version = Some(version);
                        Ok(outcome)
                    }
                    Err(e) => Err(StoreError::from(e)),
                }
            }
            other => other,
        };
        // The last operation's savepoint ends with the transaction.
        let ended = match &applied {
            Ok(_) if last => tx.flush().await.map_err(StoreError::from),
            Ok(_) => tx.next_op().await,
            Err(_) => tx.undo_op(last).await,
        };
        match (applied, ended) {
            (_, Err(e)) => Err(e),
            (Err(e @ StoreError::Unavailable(_)), Ok(())) => Err(e),
            (applied, Ok(())) => Ok(applied),
        }
    }

    /// PostgreSQL, inside the transaction: applies planned creates (each with its own version
    /// and result) in one call of `dp_apply_creates` when none fails. When one fails, those
    /// before it are applied and those after it are sent again in the next call (their
    /// versions and hashes assumed it would apply). A call that fails as a whole (nothing of it
    /// can be trusted) is rolled back to the savepoint and its operations applied one at a
    /// time. The savepoint is fresh at the start and at every call.
    async fn apply_planned(
        &self,
        tx: &mut Txn<'_>,
        log: &mut Log,
        mut pending: PlannedRun,
        last: bool,
        results: &mut [Result<Outcome, StoreError>],
    ) -> Result<(), StoreError> {
        while !pending.is_empty() {
            if tx.dirty {
                tx.next_op().await?;
            }
            let hashes = chain(log.hash, &pending);
            let first = log.head + 1;
            let called = tx
                .apply_creates(
                    pending.make_contiguous(),
                    &log.ws,
                    first,
                    hashes,
                    log.now,
                    None,
                )
                .await;
            let failed = match called {
                Ok(Called::Applied(failed)) => failed,
                Ok(Called::Stale(..)) => {
                    return Err(StoreError::Internal(
                        "dp_apply_creates checked the head inside a transaction".into(),
                    ));
                }
                Err(e) => {
                    let e = StoreError::from(e);
                    if matches!(e, StoreError::Unavailable(_)) {
                        return Err(e);
                    }
                    tracing::warn!(cause = %e, "dp_apply_creates failed; applying its operations one at a time");
                    tx.dirty = true;
                    tx.undo_op(false).await?;
                    while let Some((i, p)) = pending.pop_front() {
                        let last = last && pending.is_empty();
                        results[i] = self.apply_one(tx, log, Work::Planned(p), last).await?;
                    }
                    return Ok(());
                }
            };
            let applied = failed.as_ref().map_or(pending.len(), |f| f.at);
            for (i, p) in pending.drain(..applied) {
                tx.dirty = true;
                results[i] = Ok(log.push(p));
            }
            if let Some(f) = failed {
                let (i, p) = pending.pop_front().expect("the failed operation");
                let e = f.into_error(p);
                if matches!(e, StoreError::Unavailable(_)) {
                    return Err(e);
                }
                results[i] = Err(e);
            }
        }
        if !last {
            tx.next_op().await?;
        }
        Ok(())
    }
}

/// Planned creates not applied yet, each with its place among the batch's results.
type PlannedRun = std::collections::VecDeque<(usize, PlannedCreate)>;

/// What a transaction applies: operations, or planned creates left by
/// [`Store::write_planned_alone`].
enum Batch {
    Ops(Vec<Op>),
    Planned(PlannedRun),
}

/// Plans `ops` ([`plannable`] creates): a result for each in `results`, the error of one that
/// does not validate, a place for one planned.
fn plan_all(
    registry: &Registry,
    ws: &str,
    now: i64,
    ops: Vec<Op>,
    results: &mut Vec<Result<Outcome, StoreError>>,
) -> PlannedRun {
    let mut pending = PlannedRun::with_capacity(ops.len());
    for op in ops {
        match plan_create(registry, ws, now, op) {
            Ok(p) => {
                pending.push_back((results.len(), p));
                // Replaced by the call's answer.
                results.push(Err(StoreError::Internal("not applied".into())));
            }
            Err(e) => results.push(Err(e)),
        }
    }
    pending
}

/// The state hashes after each of `pending` in turn, from `hash`.
fn chain(mut hash: StateHash, pending: &PlannedRun) -> Vec<String> {
    pending
        .iter()
        .map(|(_, p)| {
            hash.add(&p.term);
            hash.to_hex()
        })
        .collect()
}

/// Where the change log stands while a transaction applies operations.
struct Log {
    head: i64,
    hash: StateHash,
    now: i64,
    /// The default workspace's id.
    ws: String,
    /// Each version's deltas as the change log holds them (see `Store::committed_after`).
    written: Vec<Option<super::VersionDeltas>>,
}

impl Log {
    /// Records the version of a planned create that applied, and returns its outcome.
    fn push(&mut self, p: PlannedCreate) -> Outcome {
        self.head += 1;
        self.hash.add(&p.term);
        // The row `dp_apply_creates` wrote: (type, pk of the id, the workspace, the body).
        self.written.push(Some(written_version(
            self.head,
            [RawDelta {
                version: self.head,
                entity_type: &p.schema.name,
                id: &p.id,
                ws_id: &self.ws,
                entity: Some(&p.body),
            }],
        )));
        Outcome {
            version: Some(self.head),
            ..Outcome::created(p.entity)
        }
    }
}

/// A version's deltas in the wire form, from the values its change-log rows were written
/// with (`pg_script`, `sqlite_script`, `dp_apply_creates`): a read of those rows gives the
/// same text.
fn written_version<'a>(
    version: i64,
    rows: impl IntoIterator<Item = RawDelta<'a>>,
) -> super::VersionDeltas {
    let mut v = super::VersionDeltas::new(version);
    for row in rows {
        v.push(&row);
    }
    v.deltas.shrink_to_fit();
    v
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

impl WriteCtx<'_, '_> {
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

    async fn apply_work(&mut self, work: Work) -> Result<Outcome, StoreError> {
        match work {
            Work::Op(op) => self.apply(op).await,
            // What `apply` does for a create after `prepare`.
            Work::Planned(p) => {
                let entity = self
                    .save(&p.schema, p.entity, None, Map::new(), true)
                    .await?;
                Ok(Outcome::created(entity))
            }
        }
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
                // The primary key is checked with the unique keys, in `save`.
                let entity = self
                    .save(&schema, prepared.entity, None, prepared.transient, true)
                    .await?;
                Ok(Outcome::created(entity))
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
                    .save(
                        &schema,
                        prepared.entity,
                        existing,
                        prepared.transient,
                        false,
                    )
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
                    .save(
                        &schema,
                        prepared.entity,
                        Some(existing),
                        prepared.transient,
                        false,
                    )
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
                let entity = self
                    .save(&schema, body, Some(stored), Map::new(), false)
                    .await?;
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

    /// Writes `entity` (new or replacing `existing`) after key and reference checks (and,
    /// with `check_pk`, that no entity has its id), then its transient children. Returns the
    /// entity as the Admin API shows it.
    async fn save(
        &mut self,
        schema: &EntitySchema,
        entity: Value,
        existing: Option<Value>,
        transient: Map<String, Value>,
        check_pk: bool,
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
            self.check(schema, &id, &entity, &index, check_pk).await?;
            self.tx
                .put(&schema.name, &id, &ws, &entity, index, existing.is_none())
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

    /// The checks before a write, in one round trip: the primary key is free (`check_pk`),
    /// no other entity holds one of its unique or cache keys, and every foreign key names an
    /// existing entity. The first failure is reported, in that order.
    async fn check(
        &mut self,
        schema: &EntitySchema,
        id: &str,
        entity: &Value,
        index: &Indexed,
        check_pk: bool,
    ) -> Result<(), StoreError> {
        let refs = refs_to_check(self.registry, schema, entity);
        let mut entities: Vec<(&str, &str)> = Vec::with_capacity(refs.len() + 1);
        if check_pk {
            entities.push((&schema.name, id));
        }
        entities.extend(
            refs.iter()
                .map(|(_, parent, _, pid)| (parent.as_str(), pid.as_str())),
        );
        let probe = self
            .tx
            .probe(&entities, &schema.name, &self.ws, &index.keys)
            .await?;
        check_verdict(schema, id, entity, index, check_pk, refs, &probe)
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
            Box::pin(self.save(&child_schema, prepared.entity, None, Map::new(), false)).await?;
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
                            .put(&fk.child, &cid, &self.ws.clone(), &updated, index, false)
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

/// The foreign keys `entity` gives, as (field, parent type, is_array, parent id), in the
/// registry's order: each must name an existing entity.
fn refs_to_check(
    registry: &Registry,
    schema: &EntitySchema,
    entity: &Value,
) -> Vec<(String, String, bool, String)> {
    let mut refs = Vec::new();
    for fk in registry.references_of(&schema.name) {
        if fk.is_array {
            let ids = entity.get(&fk.field).and_then(Value::as_array);
            for pid in ids.into_iter().flatten().filter_map(Value::as_str) {
                refs.push((fk.field.clone(), fk.parent.clone(), true, pid.to_owned()));
            }
        } else if let Some(pid) = foreign_id(entity.get(&fk.field)) {
            refs.push((fk.field.clone(), fk.parent.clone(), false, pid.to_owned()));
        }
    }
    refs
}

/// The error a write's checks report from what the probe found: the primary key taken
/// (`check_pk`), then a unique or cache key another entity holds, then a foreign key naming
/// no entity (`refs`, from [`refs_to_check`]).
fn check_verdict(
    schema: &EntitySchema,
    id: &str,
    entity: &Value,
    index: &Indexed,
    check_pk: bool,
    refs: Vec<(String, String, bool, String)>,
    probe: &Probe,
) -> Result<(), StoreError> {
    if check_pk && probe.found.contains(&(schema.name.clone(), id.to_owned())) {
        let mut fields = Map::new();
        fields.insert("id".into(), Value::String(id.to_owned()));
        return Err(StoreError::PrimaryKey {
            message: format!("primary key violation on key '{{id=\"{id}\"}}'"),
            fields,
        });
    }
    for (name, value) in &index.keys {
        match probe.owners.get(&(name.clone(), value.clone())) {
            Some(other) if other != id => {}
            _ => continue,
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
    for (field, parent, is_array, pid) in refs {
        if probe.found.contains(&(parent.clone(), pid.clone())) {
            continue;
        }
        let mut fields = Map::new();
        let key = serde_json::json!({ "id": pid });
        let shown = if is_array {
            Value::Array(vec![key.clone()])
        } else {
            key.clone()
        };
        fields.insert(field, shown);
        let pretty = super::kong_pretty(key.as_object().expect("object"));
        return Err(StoreError::ForeignKey {
            message: format!(
                "the foreign key '{pretty}' does not reference an existing '{parent}' entity."
            ),
            fields,
        });
    }
    Ok(())
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
