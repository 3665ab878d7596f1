//! The data plane's redb store: the configuration a DP serves, the version it is the state of,
//! and the state hash that proves it equals the control plane's.
//!
//! A `kong.sync.v2.get_delta` result is applied as one [`Apply`]: one redb write transaction that
//! receives the deltas one at a time ([`Apply::delta`]), validates each against its schema,
//! writes it with its index rows, and at [`Apply::commit`] checks what only the final state can
//! tell (foreign references, unique keys), then writes version, epoch and state hash in the same
//! transaction. Dropping an `Apply` (or any error) aborts: store, version and hash stay as they
//! were. Because redb is copy-on-write, a crash leaves the last committed (version, hash).
//!
//! Deltas are buffered in small chunks and written with the tables opened once per chunk (a redb
//! `Table` borrows its transaction, so it cannot live across `delta` calls), which keeps a
//! 100k-entity full sync streaming: only one chunk and the index bookkeeping are held in memory.
//!
//! Tables (composite keys are redb tuples; an entity is keyed by `(type, id)` because ids are
//! unique per type across workspaces on the CP, and foreign keys carry only the id):
//!
//! - `entities`: `(type, id)` → `(ws_id, canonical JSON)`, exactly the entity the CP sent;
//! - `keys`: `(type, ws, field, canonical JSON value)` → id, for unique fields and the cache key
//!   (`@cache_key`, a JSON array); `ws` is empty for types that are not workspaceable;
//! - `refs`: `(parent_type, parent_id, child_type, field, child_id)`, the foreign-key index;
//! - `meta`: version, epoch, state hash, entity count;
//! - `staged`, `transfers`: paged transfers in progress (see [`DpStore::stage_begin`]).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, WriteTransaction,
};
use serde_json::{Map, Value, json};

use crate::proto::Delta;
use crate::proto::StateHash;
use crate::schema::index::{CACHE_KEY, EntityIndex, canonical};
use crate::schema::{EntitySchema, FieldErrors, Registry};

/// How a [`DpStore`] opens its file.
#[derive(Debug, Clone)]
pub struct DpStoreOptions {
    /// redb's page cache, in bytes. It caps the store's own memory beyond one write transaction.
    pub cache_size: usize,
    /// Commit with `Durability::Immediate` (fsync). Without it a crash may lose recent applies,
    /// never half of one.
    pub durable: bool,
}

impl DpStoreOptions {
    /// 64 MiB of cache, durable commits.
    pub fn recommended() -> DpStoreOptions {
        DpStoreOptions {
            cache_size: 64 << 20,
            durable: true,
        }
    }
}

/// What the store holds, cached in memory and replaced after each commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpState {
    /// The CP version this is the state of; 0 when nothing was ever applied.
    pub version: i64,
    /// The CP's epoch (its database identity) as of the last full sync.
    pub epoch: Option<String>,
    pub state_hash: StateHash,
    pub n_entities: u64,
}

/// What one apply replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyKind {
    /// A full sync: the deltas are the whole configuration at `version`; everything stored is
    /// replaced. A lower version than the stored one is allowed (the CP's database may have been
    /// replaced); every delta must carry `version`.
    Full { version: i64, epoch: Option<String> },
    /// Deltas after `expect_from`, which must be the stored version. The first delta's version
    /// is `expect_from + 1`, each next one equal to or one above the previous, and the result is
    /// the last delta's version, which must equal `latest` when given.
    Incremental {
        expect_from: i64,
        latest: Option<i64>,
    },
}

/// A committed apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i64,
    pub state_hash: StateHash,
    pub n_entities: u64,
    pub n_deltas: u64,
}

/// Why the store could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpStoreError {
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("unknown transfer '{0}'")]
    UnknownTransfer(String),
    #[error("unknown entity type '{0}'")]
    UnknownType(String),
}

/// Why an apply was rejected. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// Some deltas are invalid: Kong's `err_t` for `notify_validation_error`. `fields` maps
    /// entity type → entity id → Kong's field error tree; `flattened` has one item per entity.
    #[error("{message}")]
    Invalid {
        message: String,
        fields: Value,
        flattened: Vec<Value>,
    },
    /// The versions of the batch do not fit the stored version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// A paged transfer is incomplete.
    #[error("transfer '{transfer_id}': {reason}")]
    Staging { transfer_id: String, reason: String },
    #[error(transparent)]
    Storage(#[from] DpStoreError),
}

/// How a batch's versions fail the version rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionError {
    /// The caller believed the store was at `expected`; it is at `stored`.
    #[error("expected to apply after version {expected}, but the store is at {stored}")]
    Conflict { expected: i64, stored: i64 },
    /// A delta's version does not follow the previous one (or the stored version).
    #[error("delta version {got} does not follow version {after}")]
    Gap { after: i64, got: i64 },
    /// A full-sync delta carries another version than the sync.
    #[error("full sync to version {expected} got a delta of version {got}")]
    FullSyncMismatch { expected: i64, got: i64 },
    /// The batch ends at `last`, not at the CP's latest version.
    #[error("deltas end at version {last}, the latest version is {latest}")]
    NotLatest { last: i64, latest: i64 },
}

/// The data plane's store. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct DpStore {
    inner: Arc<Inner>,
}

/// One apply in progress: an open redb write transaction. Dropping it aborts.
pub struct Apply<'a> {
    store: &'a DpStore,
    txn: WriteTransaction,
    epoch: Option<String>,
    /// Version rules, validation and error collection: everything that needs no table.
    check: Checker,
    /// Validated deltas not yet written; written with the tables opened once per chunk.
    pending: Vec<Pending>,
    pending_bytes: usize,
    work: Work,
    /// A staged transfer whose rows go in the same transaction.
    clear_transfer: Option<String>,
}

/// The part of an apply that reads no table: it turns deltas into [`Pending`] writes (or
/// collected errors), so it can run on another thread than the one writing.
struct Checker {
    registry: Arc<Registry>,
    kind: ApplyKind,
    /// The version stored when the transaction began.
    stored_version: i64,
    last_version: Option<i64>,
    errors: Errors,
    version_error: Option<VersionError>,
    n_deltas: u64,
}

/// What a caller's page decoder feeds deltas into (see [`DpStore::stage_commit`]).
pub type DeltaSink<'s> = dyn FnMut(Delta) -> Result<(), ApplyError> + 's;

// === tables and encodings ===

const ENTITIES: TableDefinition<(&str, &str), (&str, &[u8])> = TableDefinition::new("entities");
const KEYS: TableDefinition<(&str, &str, &str, &str), &str> = TableDefinition::new("keys");
const REFS: TableDefinition<(&str, &str, &str, &str, &str), ()> = TableDefinition::new("refs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const STAGED: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("staged");
const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");

const META_VERSION: &str = "version";
const META_EPOCH: &str = "epoch";
const META_HASH: &str = "state_hash";
const META_COUNT: &str = "n_entities";

/// The name of the cache-key index row, as on the CP.
/// Deltas buffered before the tables are opened and they are written.
const CHUNK_DELTAS: usize = 512;
const CHUNK_BYTES: usize = 4 << 20;
/// Chunks validated ahead of the writer by [`Apply::feed`].
const CHUNKS_AHEAD: usize = 2;
/// Staged page bytes are stored in rows of at most this size (a little under a power of two,
/// so redb's page for one row is not twice the row).
const STAGE_ROW_BYTES: usize = (1 << 20) - (16 << 10);
/// At most this many entities are reported in one validation error.
const MAX_REPORTED: usize = 100;

struct Inner {
    db: Database,
    registry: Arc<Registry>,
    durable: bool,
    state: RwLock<DpState>,
}

/// One validated delta.
struct Pending {
    schema: Arc<EntitySchema>,
    id: String,
    ws: String,
    /// `None` for a delete.
    upsert: Option<Upsert>,
}

/// A validated entity, ready to write: everything derived from its value is computed before
/// the writer sees it.
struct Upsert {
    /// Canonical JSON, as stored and hashed.
    body: Vec<u8>,
    hash: StateHash,
    index: EntityIndex,
}

/// Bookkeeping of an apply, checked at commit.
#[derive(Default)]
struct Work {
    hash: StateHash,
    n_entities: u64,
    /// Foreign references written: `(parent_type, parent_id, child_type, field, child_id)`.
    refs_written: Vec<[String; 5]>,
    /// Entities deleted: `(type, id)`.
    deleted: Vec<(String, String)>,
    /// Keys contested in this batch — taken over from another entity at some point — with
    /// every entity that held or took them since: `(type, ws, field, value)` → ids. At commit
    /// exactly one of them may still hold the value (a hand-over through a transient holder
    /// is rechecked too).
    /// In order of appearance: the holder from before the batch comes first and keeps the
    /// value when several still hold it.
    contested: std::collections::BTreeMap<[String; 4], Vec<String>>,
}

/// Validation errors collected Kong-style.
#[derive(Default)]
struct Errors {
    fields: Map<String, Value>,
    flattened: Vec<Value>,
    n: usize,
}

impl From<redb::TransactionError> for DpStoreError {
    fn from(e: redb::TransactionError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::TableError> for DpStoreError {
    fn from(e: redb::TableError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::StorageError> for DpStoreError {
    fn from(e: redb::StorageError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::CommitError> for DpStoreError {
    fn from(e: redb::CommitError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::DatabaseError> for DpStoreError {
    fn from(e: redb::DatabaseError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::SetDurabilityError> for DpStoreError {
    fn from(e: redb::SetDurabilityError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::StorageError> for ApplyError {
    fn from(e: redb::StorageError) -> ApplyError {
        ApplyError::Storage(e.into())
    }
}
impl From<redb::TableError> for ApplyError {
    fn from(e: redb::TableError) -> ApplyError {
        ApplyError::Storage(e.into())
    }
}

// === impl DpStore ===

impl DpStore {
    /// Opens (or creates) the store at `path`. Staging left by an interrupted paged transfer is
    /// discarded: transfers are not resumable, the caller starts a new one.
    pub fn open(
        path: &Path,
        registry: Arc<Registry>,
        opts: DpStoreOptions,
    ) -> Result<DpStore, DpStoreError> {
        let db = redb::Builder::new()
            .set_cache_size(opts.cache_size)
            .create(path)?;
        let txn = db.begin_write()?;
        txn.delete_table(STAGED)?;
        txn.delete_table(TRANSFERS)?;
        let state = {
            txn.open_table(ENTITIES)?;
            txn.open_table(KEYS)?;
            txn.open_table(REFS)?;
            txn.open_table(STAGED)?;
            txn.open_table(TRANSFERS)?;
            read_meta(&txn.open_table(META)?)?
        };
        txn.commit()?;
        Ok(DpStore {
            inner: Arc::new(Inner {
                db,
                registry,
                durable: opts.durable,
                state: RwLock::new(state),
            }),
        })
    }

    /// Version, epoch, state hash and entity count as of the last commit. No I/O.
    pub fn state(&self) -> DpState {
        self.inner
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Starts an apply. Waits for any other apply to finish (redb has one writer at a time), then
    /// checks `expect_from` of an incremental apply against the stored version.
    pub fn begin(&self, kind: ApplyKind) -> Result<Apply<'_>, ApplyError> {
        let mut txn = self.inner.db.begin_write().map_err(DpStoreError::from)?;
        let durability = if self.inner.durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        txn.set_durability(durability).map_err(DpStoreError::from)?;
        // Commits record the allocator state, so reopening after a crash needs no full repair.
        txn.set_quick_repair(true);
        let stored = read_meta(&txn.open_table(META)?)?;
        let mut work = Work::default();
        let epoch = match &kind {
            ApplyKind::Incremental { expect_from, .. } => {
                if *expect_from != stored.version {
                    return Err(VersionError::Conflict {
                        expected: *expect_from,
                        stored: stored.version,
                    }
                    .into());
                }
                work.hash = stored.state_hash;
                work.n_entities = stored.n_entities;
                stored.epoch.clone()
            }
            ApplyKind::Full { epoch, .. } => {
                txn.delete_table(ENTITIES)?;
                txn.delete_table(KEYS)?;
                txn.delete_table(REFS)?;
                epoch.clone()
            }
        };
        Ok(Apply {
            store: self,
            txn,
            epoch,
            check: Checker {
                registry: Arc::clone(&self.inner.registry),
                kind,
                stored_version: stored.version,
                last_version: None,
                errors: Errors::default(),
                version_error: None,
                n_deltas: 0,
            },
            pending: Vec::with_capacity(CHUNK_DELTAS),
            pending_bytes: 0,
            work,
            clear_transfer: None,
        })
    }

    /// Applies a whole batch: `begin`, every delta, `commit`.
    pub fn apply(
        &self,
        kind: ApplyKind,
        deltas: impl IntoIterator<Item = Delta>,
    ) -> Result<Applied, ApplyError> {
        let mut apply = self.begin(kind)?;
        for d in deltas {
            apply.delta(d)?;
        }
        apply.commit()
    }

    /// The entity `id` of `entity_type` in workspace `ws_id`.
    pub fn get(
        &self,
        entity_type: &str,
        ws_id: &str,
        id: &str,
    ) -> Result<Option<Value>, DpStoreError> {
        let rtx = self.inner.db.begin_read()?;
        let entities = rtx.open_table(ENTITIES)?;
        let Some(row) = entities.get((entity_type, id))? else {
            return Ok(None);
        };
        let (ws, body) = row.value();
        if ws != ws_id {
            return Ok(None);
        }
        parse_body(body).map(Some)
    }

    /// The entity whose unique field (or endpoint key) `field` is `value` in workspace `ws_id`:
    /// `services.name`, `consumers.username`, `keyauth_credentials.key`. `field` may also be
    /// `@cache_key` with `value` the array of the cache-key fields (foreign keys as ids).
    /// Types that are not workspaceable (workspaces) ignore `ws_id`.
    pub fn find_by_key(
        &self,
        entity_type: &str,
        ws_id: &str,
        field: &str,
        value: &Value,
    ) -> Result<Option<Value>, DpStoreError> {
        let schema = self.schema(entity_type)?;
        let ws = key_ws(&schema, ws_id);
        let value = canonical(value);
        let rtx = self.inner.db.begin_read()?;
        let keys = rtx.open_table(KEYS)?;
        let Some(id) = keys.get((entity_type, ws, field, value.as_str()))? else {
            return Ok(None);
        };
        let entities = rtx.open_table(ENTITIES)?;
        match entities.get((entity_type, id.value()))? {
            Some(row) => parse_body(row.value().1).map(Some),
            None => Err(DpStoreError::Corrupt(format!(
                "key {entity_type}.{field} points at a missing entity"
            ))),
        }
    }

    /// The `child_type` entities whose foreign key `fk_field` is `parent_id`, by child id.
    pub fn children(
        &self,
        child_type: &str,
        fk_field: &str,
        parent_id: &str,
    ) -> Result<Vec<Value>, DpStoreError> {
        let Some(fk) = self
            .inner
            .registry
            .references_of(child_type)
            .find(|fk| fk.field == fk_field)
        else {
            return Err(DpStoreError::UnknownType(format!(
                "{child_type}.{fk_field}"
            )));
        };
        let rtx = self.inner.db.begin_read()?;
        let refs = rtx.open_table(REFS)?;
        let entities = rtx.open_table(ENTITIES)?;
        let parent = fk.parent.as_str();
        let mut res = Vec::new();
        for row in refs.range((parent, parent_id, child_type, fk_field, "")..)? {
            let (key, _) = row?;
            let (p, pid, c, f, cid) = key.value();
            if (p, pid, c, f) != (parent, parent_id, child_type, fk_field) {
                break;
            }
            if let Some(e) = entities.get((child_type, cid))? {
                res.push(parse_body(e.value().1)?);
            }
        }
        Ok(res)
    }

    /// Every entity of `entity_type`, by id.
    pub fn list(&self, entity_type: &str) -> Result<Vec<Value>, DpStoreError> {
        let mut res = Vec::new();
        self.for_each(entity_type, &mut |_, _, e| {
            res.push(e);
            true
        })?;
        Ok(res)
    }

    /// Calls `f(ws_id, id, entity)` for every entity of `entity_type`, by id, until it returns
    /// false. One read snapshot; nothing is collected.
    pub fn for_each(
        &self,
        entity_type: &str,
        f: &mut dyn FnMut(&str, &str, Value) -> bool,
    ) -> Result<(), DpStoreError> {
        let rtx = self.inner.db.begin_read()?;
        let entities = rtx.open_table(ENTITIES)?;
        for row in entities.range((entity_type, "")..)? {
            let (key, value) = row?;
            let (ty, id) = key.value();
            if ty != entity_type {
                break;
            }
            let (ws, body) = value.value();
            if !f(ws, id, parse_body(body)?) {
                break;
            }
        }
        Ok(())
    }

    /// The state hash recomputed over every stored entity (for tests and verification).
    pub fn compute_state_hash(&self) -> Result<StateHash, DpStoreError> {
        let rtx = self.inner.db.begin_read()?;
        let entities = rtx.open_table(ENTITIES)?;
        let mut hash = StateHash::ZERO;
        for row in entities.iter()? {
            let (key, value) = row?;
            let (ty, id) = key.value();
            let (ws, body) = value.value();
            // From the parsed value, not the stored bytes: this verifies that what the apply
            // stored (and hashed from its bytes) is canonical.
            hash.add(&StateHash::of_entity(ty, ws, id, &parse_body(body)?));
        }
        Ok(hash)
    }

    // --- paged transfers ---

    /// Starts (or restarts) a paged transfer: a snapshot or a version too large for one frame.
    /// Pages are staged as opaque bytes, each in its own transaction, while the current
    /// configuration stays readable and [`DpStore::state`] unchanged. Staging does not survive
    /// a reopen, so its transactions skip the fsync; only [`DpStore::stage_commit`]'s is durable.
    pub fn stage_begin(&self, transfer_id: &str, kind: ApplyKind) -> Result<(), DpStoreError> {
        let txn = self.staging_txn()?;
        {
            let mut staged = txn.open_table(STAGED)?;
            clear_staged(&mut staged, transfer_id)?;
            let mut transfers = txn.open_table(TRANSFERS)?;
            transfers.insert(transfer_id, encode_kind(&kind).as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Stages page `page_no` (pages count from 0) of deltas, for [`DpStore::stage_commit`].
    /// Staging a page again replaces it; a page of no deltas is not staged (it is missing).
    pub fn stage_page(
        &self,
        transfer_id: &str,
        page_no: u64,
        deltas: &[Delta],
    ) -> Result<(), DpStoreError> {
        if deltas.is_empty() {
            return self.stage_rows(transfer_id, page_no, None);
        }
        // JSON lines of wire deltas, read back one at a time by `decode_delta_lines`.
        let mut bytes = Vec::new();
        for d in deltas {
            serde_json::to_writer(&mut bytes, &d.to_wire()).expect("a JSON value serialises");
            bytes.push(b'\n');
        }
        self.stage_rows(transfer_id, page_no, Some(&bytes))
    }

    /// Stages page `page_no` (pages count from 0): `bytes` as the caller got them, not looked
    /// at here; [`DpStore::stage_commit_with`] hands them back to the caller's decoder. Staging
    /// a page again replaces it.
    pub fn stage_page_bytes(
        &self,
        transfer_id: &str,
        page_no: u64,
        bytes: &[u8],
    ) -> Result<(), DpStoreError> {
        self.stage_rows(transfer_id, page_no, Some(bytes))
    }

    /// Replaces the rows of one staged page; `None` leaves it unstaged.
    fn stage_rows(
        &self,
        transfer_id: &str,
        page_no: u64,
        bytes: Option<&[u8]>,
    ) -> Result<(), DpStoreError> {
        let txn = self.staging_txn()?;
        {
            if txn.open_table(TRANSFERS)?.get(transfer_id)?.is_none() {
                return Err(DpStoreError::UnknownTransfer(transfer_id.to_owned()));
            }
            let mut staged = txn.open_table(STAGED)?;
            staged.retain_in(
                (transfer_id, page_no, 0)..=(transfer_id, page_no, u64::MAX),
                |_, _| false,
            )?;
            if let Some(bytes) = bytes {
                // An empty page still gets a row, so it counts as staged.
                let mut rows = bytes.chunks(STAGE_ROW_BYTES);
                let first = rows.next().unwrap_or_default();
                staged.insert((transfer_id, page_no, 0), first)?;
                for (idx, row) in rows.enumerate() {
                    staged.insert((transfer_id, page_no, idx as u64 + 1), row)?;
                }
            }
        }
        txn.commit()?;
        crate::failpoint::hit("dp.stage.page");
        Ok(())
    }

    /// Commits a transfer staged with [`DpStore::stage_page`]: [`DpStore::stage_commit_with`]
    /// with the matching decoder.
    pub fn stage_commit(&self, transfer_id: &str) -> Result<Applied, ApplyError> {
        self.stage_commit_with(transfer_id, |page_no, bytes, sink| {
            decode_delta_lines(transfer_id, page_no, bytes, sink)
        })
    }

    /// Applies every staged page, in page order, as one apply (one write transaction), and
    /// removes the staging in that same transaction. Pages must be contiguous from 0. A rejected
    /// transfer is discarded.
    ///
    /// `decode(page_no, bytes, sink)` turns one staged page back into deltas and feeds them to
    /// `sink` one at a time; its errors (and the sink's, which it must pass on) reject the
    /// transfer. It runs on a second thread, with validation, while this one writes.
    pub fn stage_commit_with<D>(&self, transfer_id: &str, decode: D) -> Result<Applied, ApplyError>
    where
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let res = self.stage_commit_inner(transfer_id, decode);
        if matches!(
            res,
            Err(ApplyError::Invalid { .. } | ApplyError::Version(_) | ApplyError::Staging { .. })
        ) {
            self.stage_discard(transfer_id)?;
        }
        res
    }

    /// Forgets a transfer and its staged pages.
    pub fn stage_discard(&self, transfer_id: &str) -> Result<(), DpStoreError> {
        let txn = self.staging_txn()?;
        {
            clear_staged(&mut txn.open_table(STAGED)?, transfer_id)?;
            txn.open_table(TRANSFERS)?.remove(transfer_id)?;
        }
        txn.commit()?;
        Ok(())
    }

    fn stage_commit_inner<D>(&self, transfer_id: &str, mut decode: D) -> Result<Applied, ApplyError>
    where
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let staging_err = |reason: String| ApplyError::Staging {
            transfer_id: transfer_id.to_owned(),
            reason,
        };
        // Staged pages are committed, so a read snapshot streams them while the apply writes.
        let rtx = self.inner.db.begin_read().map_err(DpStoreError::from)?;
        let kind = {
            let transfers = rtx.open_table(TRANSFERS)?;
            let Some(raw) = transfers.get(transfer_id)? else {
                return Err(DpStoreError::UnknownTransfer(transfer_id.to_owned()).into());
            };
            decode_kind(raw.value()).ok_or_else(|| staging_err("corrupt transfer kind".into()))?
        };
        let staged = rtx.open_table(STAGED)?;
        let mut apply = self.begin(kind)?;
        apply.clear_transfer = Some(transfer_id.to_owned());
        apply.feed(|sink| {
            // One page at a time: its rows are joined, decoded, and dropped.
            let mut page: Vec<u8> = Vec::new();
            let mut current: Option<u64> = None;
            for row in staged.range((transfer_id, 0, 0)..=(transfer_id, u64::MAX, u64::MAX))? {
                let (key, value) = row?;
                let (_, page_no, _) = key.value();
                if Some(page_no) != current {
                    if let Some(done) = current {
                        decode(done, &page, sink)?;
                        page.clear();
                    }
                    let next = current.map_or(0, |p| p + 1);
                    if page_no != next {
                        return Err(staging_err(format!(
                            "page {page_no} staged but page {next} missing"
                        )));
                    }
                    current = Some(page_no);
                }
                page.extend_from_slice(value.value());
            }
            if let Some(done) = current {
                decode(done, &page, sink)?;
            }
            Ok(())
        })?;
        apply.commit()
    }

    /// A write transaction for staging: durable only when the store is, and even then without
    /// an fsync of its own (staging is discarded on open; the durable commit that ends a
    /// transfer persists what it needs).
    fn staging_txn(&self) -> Result<WriteTransaction, DpStoreError> {
        let mut txn = self.inner.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(txn)
    }

    fn schema(&self, entity_type: &str) -> Result<Arc<EntitySchema>, DpStoreError> {
        self.inner
            .registry
            .get(entity_type)
            .cloned()
            .ok_or_else(|| DpStoreError::UnknownType(entity_type.to_owned()))
    }
}

// === impl Apply ===

impl Apply<'_> {
    /// Checks the delta's version, validates it, and queues it for writing into this
    /// transaction. Version errors end the apply at once; validation errors are collected (all
    /// of them, Kong-style) and reported by [`Apply::commit`].
    pub fn delta(&mut self, d: Delta) -> Result<(), ApplyError> {
        if let Some(p) = self.check.check(d)? {
            self.pending_bytes += p.size();
            self.pending.push(p);
            if self.pending.len() >= CHUNK_DELTAS || self.pending_bytes >= CHUNK_BYTES {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// [`Apply::delta`] for every delta `produce` feeds to its sink, with decoding and
    /// validation on a second thread while this one writes what is already validated (at most
    /// [`CHUNKS_AHEAD`] chunks ahead). `produce` must pass on the sink's errors. The first
    /// error (the writer's before the producer's) is returned; the apply is then to be dropped.
    pub fn feed<P>(&mut self, produce: P) -> Result<(), ApplyError>
    where
        P: FnOnce(&mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        self.flush()?;
        let check = &mut self.check;
        let (txn, work) = (&self.txn, &mut self.work);
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Pending>>(CHUNKS_AHEAD);
        std::thread::scope(|scope| {
            let producer = scope.spawn(move || {
                let mut chunk = Vec::with_capacity(CHUNK_DELTAS);
                let mut bytes = 0;
                let res = produce(&mut |d| {
                    let Some(p) = check.check(d)? else {
                        return Ok(());
                    };
                    bytes += p.size();
                    chunk.push(p);
                    if chunk.len() >= CHUNK_DELTAS || bytes >= CHUNK_BYTES {
                        bytes = 0;
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_DELTAS));
                        // The writer failed and said why; this only stops the producer.
                        tx.send(full).map_err(|_| {
                            ApplyError::Storage(DpStoreError::Corrupt("writer stopped".into()))
                        })?;
                    }
                    Ok(())
                });
                if res.is_ok() && !chunk.is_empty() {
                    let _ = tx.send(chunk);
                }
                res
            });
            let mut written = Ok(());
            for chunk in rx.iter() {
                written = write_pending(txn, work, chunk);
                if written.is_err() {
                    break;
                }
            }
            drop(rx);
            let produced = producer
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            written.and(produced)
        })
    }

    /// Checks foreign references and unique keys against the final state, writes version, epoch
    /// and state hash, and commits. On any error nothing is written.
    pub fn commit(mut self) -> Result<Applied, ApplyError> {
        if let Some(e) = self.check.version_error.take() {
            return Err(e.into());
        }
        let version = match (&self.check.kind, self.check.last_version) {
            (ApplyKind::Full { version, .. }, _) => *version,
            (ApplyKind::Incremental { .. }, Some(last)) => last,
            (ApplyKind::Incremental { .. }, None) => self.check.stored_version,
        };
        if let ApplyKind::Incremental {
            latest: Some(latest),
            ..
        } = self.check.kind
            && latest != version
        {
            return Err(VersionError::NotLatest {
                last: version,
                latest,
            }
            .into());
        }
        if self.check.errors.is_empty() {
            self.flush()?;
        }
        if self.check.errors.is_empty() {
            self.check_final_state()?;
        }
        if !self.check.errors.is_empty() {
            return Err(std::mem::take(&mut self.check.errors).into_error());
        }
        if self.check.n_deltas == 0
            && matches!(self.check.kind, ApplyKind::Incremental { .. })
            && self.clear_transfer.is_none()
        {
            // Nothing to write (an empty transfer still has to be cleared, below).
            return Ok(Applied {
                version,
                state_hash: self.work.hash,
                n_entities: self.work.n_entities,
                n_deltas: 0,
            });
        }
        let state = DpState {
            version,
            epoch: self.epoch.clone(),
            state_hash: self.work.hash,
            n_entities: self.work.n_entities,
        };
        {
            write_meta(&mut self.txn.open_table(META)?, &state)?;
            if let Some(transfer_id) = &self.clear_transfer {
                clear_staged(&mut self.txn.open_table(STAGED)?, transfer_id)?;
                self.txn
                    .open_table(TRANSFERS)?
                    .remove(transfer_id.as_str())?;
            }
        }
        let store = self.store;
        let n_deltas = self.check.n_deltas;
        crate::failpoint::hit("dp.apply.commit");
        self.txn.commit().map_err(DpStoreError::from)?;
        crate::failpoint::hit("dp.apply.committed");
        let applied = Applied {
            version,
            state_hash: state.state_hash,
            n_entities: state.n_entities,
            n_deltas,
        };
        *store.inner.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        Ok(applied)
    }

    /// Writes the queued deltas, with the tables opened once.
    fn flush(&mut self) -> Result<(), ApplyError> {
        self.pending_bytes = 0;
        write_pending(&self.txn, &mut self.work, std::mem::take(&mut self.pending))
    }

    /// The checks that need the final state of the batch.
    fn check_final_state(&mut self) -> Result<(), ApplyError> {
        let registry = Arc::clone(&self.store.inner.registry);
        let entities = self.txn.open_table(ENTITIES)?;
        let mut keys = self.txn.open_table(KEYS)?;
        let refs = self.txn.open_table(REFS)?;
        let mut reported = HashSet::new();
        for [parent_ty, parent_id, child_ty, field, child_id] in &self.work.refs_written {
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
            if reported.insert((child_ty.clone(), child_id.clone(), field.clone())) {
                let shown = json!({ "id": parent_id });
                self.check.errors.push(
                    child_ty,
                    child_id,
                    None,
                    json!({
                        "@entity": [format!("could not find {child_ty}'s foreign references {parent_ty} ({shown})")],
                        field.as_str(): format!("does not reference an existing '{parent_ty}' entity"),
                    }),
                );
            }
        }
        for (ty, id) in &self.work.deleted {
            if entities.get((ty.as_str(), id.as_str()))?.is_some() {
                continue; // deleted, then written again
            }
            let mut range = refs.range((ty.as_str(), id.as_str(), "", "", "")..)?;
            if let Some(row) = range.next() {
                let (key, _) = row?;
                let (p, pid, child_ty, field, child_id) = key.value();
                if (p, pid) == (ty.as_str(), id.as_str()) {
                    self.check.errors.push(
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
        for ([ty, ws, field, value], candidates) in &self.work.contested {
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
                        self.check.errors.push(
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
}

// === impl Checker ===

impl Checker {
    /// The delta as a write, `None` when it is not to be written (it is invalid, or the
    /// batch is rejected anyway). Version errors end the apply.
    fn check(&mut self, d: Delta) -> Result<Option<Pending>, ApplyError> {
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
        let upsert = match d.entity {
            None => None,
            Some(entity) => {
                if let Err(tree) = check_entity(&self.registry, &schema, &d.id, &entity) {
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
                let body = serde_json::to_vec(&entity).unwrap_or_default();
                let hash = StateHash::of_entity_bytes(&schema.name, &d.ws_id, &d.id, &body);
                let index = schema.index_of(&entity);
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

impl Pending {
    /// Bytes it holds, roughly.
    fn size(&self) -> usize {
        self.upsert.as_ref().map_or(64, |u| u.body.len() + 64)
    }
}

/// Writes validated deltas, with the tables opened once.
fn write_pending(
    txn: &WriteTransaction,
    work: &mut Work,
    pending: Vec<Pending>,
) -> Result<(), ApplyError> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut tables = Tables {
        entities: txn.open_table(ENTITIES)?,
        keys: txn.open_table(KEYS)?,
        refs: txn.open_table(REFS)?,
    };
    for p in pending {
        tables.write(work, p)?;
        crate::failpoint::hit("dp.apply.write");
    }
    Ok(())
}

/// The write-side tables of one chunk.
struct Tables<'txn> {
    entities: Table<'txn, (&'static str, &'static str), (&'static str, &'static [u8])>,
    keys: Table<'txn, (&'static str, &'static str, &'static str, &'static str), &'static str>,
    refs: Table<
        'txn,
        (
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
        ),
        (),
    >,
}

impl Tables<'_> {
    fn write(&mut self, work: &mut Work, p: Pending) -> Result<(), ApplyError> {
        let ty = p.schema.name.as_str();
        let id = p.id.as_str();
        let old = match p.upsert {
            // A delete of an entity stored in another workspace finds nothing, as in Kong.
            None => {
                let in_ws = match self.entities.get((ty, id))? {
                    Some(row) => row.value().0 == p.ws,
                    None => false,
                };
                if in_ws {
                    self.entities.remove((ty, id))?.map(|row| {
                        let (ws, body) = row.value();
                        (ws.to_owned(), body.to_vec())
                    })
                } else {
                    None
                }
            }
            Some(ref u) => self
                .entities
                .insert((ty, id), (p.ws.as_str(), u.body.as_slice()))?
                .map(|row| {
                    let (ws, body) = row.value();
                    (ws.to_owned(), body.to_vec())
                }),
        };
        if let Some((old_ws, old_body)) = old {
            // Stored bodies are canonical: written below from `Upsert::body`.
            work.hash
                .sub(&StateHash::of_entity_bytes(ty, &old_ws, id, &old_body));
            let old_entity = parse_body(&old_body)?;
            work.n_entities = work.n_entities.saturating_sub(1);
            let old_index = p.schema.index_of(&old_entity);
            let kws = key_ws(&p.schema, &old_ws);
            for (field, value) in &old_index.keys {
                let key = (ty, kws, field.as_str(), value.as_str());
                let owned = self.keys.get(key)?.is_some_and(|row| row.value() == id);
                if owned {
                    self.keys.remove(key)?;
                }
            }
            for (field, parent_ty, parent_id) in &old_index.refs {
                self.refs.remove((
                    parent_ty.as_str(),
                    parent_id.as_str(),
                    ty,
                    field.as_str(),
                    id,
                ))?;
            }
            if p.upsert.is_none() {
                work.deleted.push((ty.to_owned(), id.to_owned()));
            }
        }
        let Some(Upsert { hash, index, .. }) = &p.upsert else {
            return Ok(());
        };
        work.hash.add(hash);
        work.n_entities += 1;
        let kws = key_ws(&p.schema, &p.ws);
        for (field, value) in &index.keys {
            let key = (ty, kws, field.as_str(), value.as_str());
            let displaced = self
                .keys
                .insert(key, id)?
                .map(|other| other.value().to_owned())
                .filter(|other| other != id);
            let k = [ty.to_owned(), kws.to_owned(), field.clone(), value.clone()];
            if displaced.is_some() || work.contested.contains_key(&k) {
                let holders = work.contested.entry(k).or_default();
                for h in displaced.into_iter().chain(std::iter::once(id.to_owned())) {
                    if !holders.contains(&h) {
                        holders.push(h);
                    }
                }
            }
        }
        for (field, parent_ty, parent_id) in &index.refs {
            self.refs.insert(
                (
                    parent_ty.as_str(),
                    parent_id.as_str(),
                    ty,
                    field.as_str(),
                    id,
                ),
                (),
            )?;
            work.refs_written.push([
                parent_ty.clone(),
                parent_id.clone(),
                ty.to_owned(),
                field.clone(),
                id.to_owned(),
            ]);
        }
        Ok(())
    }
}

// === impl Errors ===

impl Errors {
    fn is_empty(&self) -> bool {
        self.n == 0
    }

    fn push(&mut self, ty: &str, id: &str, name: Option<&str>, tree: Value) {
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

    fn into_error(self) -> ApplyError {
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

// === helpers ===

/// Validates one upsert: an object whose primary key is the delta's id, valid for its schema.
/// Returns Kong's field error tree.
fn check_entity(
    registry: &Registry,
    schema: &EntitySchema,
    id: &str,
    entity: &Value,
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

/// Schema validation of a stored-form entity. `prepare` also applies defaults and transforms;
/// only its verdict is used, never its output.
fn validate_entity(
    registry: &Registry,
    schema: &EntitySchema,
    entity: &Value,
) -> Result<(), FieldErrors> {
    registry.accepts_stored(schema, entity)
}

/// The workspace part of a key row: unique keys of non-workspaceable types are global.
fn key_ws<'a>(schema: &EntitySchema, ws: &'a str) -> &'a str {
    if schema.workspaceable { ws } else { "" }
}

fn parse_body(body: &[u8]) -> Result<Value, DpStoreError> {
    serde_json::from_slice(body).map_err(|e| DpStoreError::Corrupt(format!("entity body: {e}")))
}

fn read_meta(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<DpState, DpStoreError> {
    let get = |k: &str| -> Result<Option<Vec<u8>>, DpStoreError> {
        Ok(meta.get(k)?.map(|v| v.value().to_vec()))
    };
    let version = match get(META_VERSION)? {
        Some(b) => i64::from_le_bytes(
            b.try_into()
                .map_err(|_| DpStoreError::Corrupt("version".into()))?,
        ),
        None => 0,
    };
    let n_entities = match get(META_COUNT)? {
        Some(b) => u64::from_le_bytes(
            b.try_into()
                .map_err(|_| DpStoreError::Corrupt("entity count".into()))?,
        ),
        None => 0,
    };
    let state_hash = match get(META_HASH)? {
        Some(b) => std::str::from_utf8(&b)
            .ok()
            .and_then(StateHash::from_hex)
            .ok_or_else(|| DpStoreError::Corrupt("state hash".into()))?,
        None => StateHash::ZERO,
    };
    let epoch = get(META_EPOCH)?
        .map(String::from_utf8)
        .transpose()
        .map_err(|_| DpStoreError::Corrupt("epoch".into()))?;
    Ok(DpState {
        version,
        epoch,
        state_hash,
        n_entities,
    })
}

fn write_meta(
    meta: &mut Table<'_, &'static str, &'static [u8]>,
    state: &DpState,
) -> Result<(), DpStoreError> {
    meta.insert(META_VERSION, state.version.to_le_bytes().as_slice())?;
    meta.insert(META_COUNT, state.n_entities.to_le_bytes().as_slice())?;
    meta.insert(META_HASH, state.state_hash.to_hex().as_bytes())?;
    match &state.epoch {
        Some(epoch) => {
            meta.insert(META_EPOCH, epoch.as_bytes())?;
        }
        None => {
            meta.remove(META_EPOCH)?;
        }
    }
    Ok(())
}

/// Feeds the deltas of a [`DpStore::stage_page`] page to `sink`, one at a time. Bytes that
/// are not such a page are a staging error; the sink's errors are passed on as they are.
fn decode_delta_lines(
    transfer_id: &str,
    page_no: u64,
    bytes: &[u8],
    sink: &mut DeltaSink<'_>,
) -> Result<(), ApplyError> {
    for v in serde_json::Deserializer::from_slice(bytes).into_iter::<Value>() {
        let d = v
            .map_err(|e| e.to_string())
            .and_then(|v| Delta::from_wire(v).map_err(|e| e.to_string()))
            .map_err(|e| ApplyError::Staging {
                transfer_id: transfer_id.to_owned(),
                reason: format!("corrupt staged delta on page {page_no}: {e}"),
            })?;
        sink(d)?;
    }
    Ok(())
}

fn clear_staged(
    staged: &mut Table<'_, (&'static str, u64, u64), &'static [u8]>,
    transfer_id: &str,
) -> Result<(), DpStoreError> {
    staged.retain_in(
        (transfer_id, 0, 0)..=(transfer_id, u64::MAX, u64::MAX),
        |_, _| false,
    )?;
    Ok(())
}

fn encode_kind(kind: &ApplyKind) -> Vec<u8> {
    let v = match kind {
        ApplyKind::Full { version, epoch } => {
            json!({"full": {"version": version, "epoch": epoch}})
        }
        ApplyKind::Incremental {
            expect_from,
            latest,
        } => json!({"incremental": {"expect_from": expect_from, "latest": latest}}),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn decode_kind(raw: &[u8]) -> Option<ApplyKind> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    if let Some(full) = v.get("full") {
        return Some(ApplyKind::Full {
            version: full.get("version")?.as_i64()?,
            epoch: full.get("epoch").and_then(Value::as_str).map(str::to_owned),
        });
    }
    let inc = v.get("incremental")?;
    Some(ApplyKind::Incremental {
        expect_from: inc.get("expect_from")?.as_i64()?,
        latest: inc.get("latest").and_then(Value::as_i64),
    })
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde_json::json;

    use super::*;
    use crate::cp::store::{Change, Op, Store, StoreOptions, VersionInfo};

    /// A CP store on a temporary SQLite file and a DP store beside it.
    struct Env {
        dir: tempfile::TempDir,
        cp: Store,
        dp: DpStore,
    }

    impl Env {
        async fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            let cp = Store::open(StoreOptions::sqlite_in(dir.path()))
                .await
                .unwrap();
            let dp = open_dp(&dir.path().join("dp.redb"));
            Env { dir, cp, dp }
        }

        fn dp_path(&self) -> PathBuf {
            self.dir.path().join("dp.redb")
        }

        fn reopen(&mut self) {
            // The old handle must close first: redb refuses a second open of the same file.
            let scratch = tempfile::tempdir().unwrap();
            self.dp = open_dp(&scratch.path().join("scratch.redb"));
            self.dp = open_dp(&self.dp_path());
        }

        async fn create(&self, entity: &str, input: Value) -> String {
            let out = self
                .cp
                .write(Op::Create {
                    entity: entity.into(),
                    input,
                    scope: None,
                })
                .await
                .unwrap();
            out.entity.unwrap()["id"].as_str().unwrap().to_owned()
        }

        async fn patch(&self, entity: &str, key: &str, input: Value) {
            self.cp
                .write(Op::Patch {
                    entity: entity.into(),
                    key: key.into(),
                    input,
                    scope: None,
                })
                .await
                .unwrap();
        }

        async fn delete(&self, entity: &str, key: &str) {
            self.cp
                .write(Op::Delete {
                    entity: entity.into(),
                    key: key.into(),
                    scope: None,
                })
                .await
                .unwrap();
        }

        async fn snapshot(&self) -> (Vec<Delta>, VersionInfo) {
            let mut deltas = Vec::new();
            let info = self
                .cp
                .snapshot(|c| {
                    deltas.push(to_delta(c));
                    Ok(())
                })
                .await
                .unwrap();
            (deltas, info)
        }

        async fn changes_after(&self, after: i64) -> (Vec<Delta>, i64) {
            let mut deltas = Vec::new();
            let info = self
                .cp
                .changes_after(after, i64::MAX, |c| {
                    deltas.push(to_delta(c));
                    Ok(())
                })
                .await
                .unwrap()
                .unwrap();
            (deltas, info.version)
        }

        async fn full_sync(&self) -> Applied {
            let (deltas, info) = self.snapshot().await;
            self.dp
                .apply(
                    ApplyKind::Full {
                        version: info.version,
                        epoch: Some(info.epoch),
                    },
                    deltas,
                )
                .unwrap()
        }

        async fn incremental_sync(&self) -> Applied {
            let from = self.dp.state().version;
            let (deltas, latest) = self.changes_after(from).await;
            self.dp
                .apply(
                    ApplyKind::Incremental {
                        expect_from: from,
                        latest: Some(latest),
                    },
                    deltas,
                )
                .unwrap()
        }

        /// The DP holds exactly the CP's configuration at the CP's head.
        #[track_caller]
        fn assert_synced_to(&self, info: &VersionInfo) {
            let state = self.dp.state();
            assert_eq!(state.version, info.version);
            assert_eq!(state.state_hash, info.state_hash, "cached state hash");
            assert_eq!(
                self.dp.compute_state_hash().unwrap(),
                info.state_hash,
                "recomputed state hash"
            );
        }

        async fn assert_synced(&self) {
            let info = self.cp.version_info().await.unwrap();
            self.assert_synced_to(&info);
        }

        fn ws(&self) -> String {
            self.dp.list("workspaces").unwrap()[0]["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    }

    fn open_dp(path: &Path) -> DpStore {
        DpStore::open(
            path,
            Arc::clone(Registry::builtin()),
            DpStoreOptions::recommended(),
        )
        .unwrap()
    }

    fn to_delta(c: Change) -> Delta {
        Delta {
            entity_type: c.entity_type,
            id: c.id,
            ws_id: c.ws_id,
            version: c.version,
            entity: c.entity,
        }
    }

    fn upsert(version: i64, ty: &str, ws: &str, entity: Value) -> Delta {
        Delta {
            entity_type: ty.into(),
            id: entity["id"].as_str().unwrap().to_owned(),
            ws_id: ws.into(),
            version,
            entity: Some(entity),
        }
    }

    fn delete(version: i64, ty: &str, ws: &str, id: &str) -> Delta {
        Delta {
            entity_type: ty.into(),
            id: id.into(),
            ws_id: ws.into(),
            version,
            entity: None,
        }
    }

    /// Services, routes, a consumer with a key-auth credential, and a plugin.
    async fn populate(env: &Env) -> (String, String, String) {
        let s1 = env
            .create("services", json!({"name": "s1", "host": "one.example"}))
            .await;
        let s2 = env
            .create(
                "services",
                json!({"name": "s2", "url": "http://two.example:8080/p"}),
            )
            .await;
        for (name, svc) in [("r1", &s1), ("r2", &s1), ("r3", &s2)] {
            env.create(
                "routes",
                json!({"name": name, "paths": [format!("/{name}")], "service": {"id": svc}}),
            )
            .await;
        }
        let alice = env.create("consumers", json!({"username": "alice"})).await;
        env.create(
            "keyauth_credentials",
            json!({"key": "alice-key", "consumer": {"id": alice}}),
        )
        .await;
        env.create(
            "plugins",
            json!({"name": "key-auth", "service": {"id": s1}}),
        )
        .await;
        (s1, s2, alice)
    }

    #[tokio::test]
    async fn full_then_incremental_match_the_cp() {
        let env = Env::new().await;
        let (s1, s2, alice) = populate(&env).await;
        let applied = env.full_sync().await;
        env.assert_synced().await;
        assert_eq!(applied.n_entities, 1 + 2 + 3 + 1 + 1 + 1);
        assert_eq!(env.dp.state().n_entities, applied.n_entities);
        let epoch = env.cp.version_info().await.unwrap().epoch;
        assert_eq!(env.dp.state().epoch, Some(epoch.clone()));
        let ws = env.ws();
        assert_eq!(env.dp.children("routes", "service", &s1).unwrap().len(), 2);
        assert_eq!(
            env.dp
                .find_by_key("keyauth_credentials", &ws, "key", &json!("alice-key"))
                .unwrap()
                .unwrap()["consumer"]["id"],
            json!(alice)
        );

        // A unique field changes, a route moves, a consumer goes with its credential (cascade).
        env.patch("services", &s1, json!({"name": "s1-renamed"}))
            .await;
        let r2 = env
            .dp
            .find_by_key("routes", &ws, "name", &json!("r2"))
            .unwrap()
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();
        env.patch("routes", &r2, json!({"service": {"id": s2}}))
            .await;
        env.delete("consumers", &alice).await;
        let bob = env.create("consumers", json!({"username": "bob"})).await;
        env.create(
            "keyauth_credentials",
            json!({"key": "alice-key", "consumer": {"id": bob}}),
        )
        .await;
        let before = env.dp.state().version;
        let applied = env.incremental_sync().await;
        assert!(applied.version > before + 4);
        env.assert_synced().await;
        assert_eq!(
            env.dp.state().epoch,
            Some(epoch),
            "incremental keeps the epoch"
        );

        let find = |ty: &str, field: &str, v: &str| {
            env.dp
                .find_by_key(ty, &ws, field, &json!(v))
                .unwrap()
                .map(|e| e["id"].as_str().unwrap().to_owned())
        };
        assert_eq!(find("services", "name", "s1"), None);
        assert_eq!(find("services", "name", "s1-renamed"), Some(s1.clone()));
        assert_eq!(find("consumers", "username", "alice"), None);
        assert_eq!(find("consumers", "username", "bob"), Some(bob.clone()));
        let cred = env
            .dp
            .find_by_key("keyauth_credentials", &ws, "key", &json!("alice-key"))
            .unwrap()
            .unwrap();
        assert_eq!(cred["consumer"]["id"], json!(bob));
        // The cache key (`keyauth_credentials.cache_key = [key]`) follows too.
        assert_eq!(
            env.dp
                .find_by_key("keyauth_credentials", &ws, CACHE_KEY, &json!(["alice-key"]))
                .unwrap()
                .unwrap()["id"],
            cred["id"]
        );
        assert_eq!(env.dp.children("routes", "service", &s1).unwrap().len(), 1);
        assert_eq!(env.dp.children("routes", "service", &s2).unwrap().len(), 2);
        assert!(
            env.dp
                .children("keyauth_credentials", "consumer", &alice)
                .unwrap()
                .is_empty()
        );
        assert_eq!(env.dp.get("consumers", &ws, &alice).unwrap(), None);
        assert_eq!(
            env.dp.get("services", &ws, &s1).unwrap().unwrap()["name"],
            json!("s1-renamed")
        );
        assert_eq!(env.dp.get("services", "other-ws", &s1).unwrap(), None);
        assert_eq!(env.dp.list("routes").unwrap().len(), 3);

        // Nothing new: an empty incremental batch is a no-op at the same version.
        let same = env.incremental_sync().await;
        assert_eq!(same.version, applied.version);
        assert_eq!(same.n_deltas, 0);
        env.assert_synced().await;
    }

    #[tokio::test]
    async fn many_small_versions_keep_the_hash() {
        let env = Env::new().await;
        env.full_sync().await;
        let mut ids = Vec::new();
        for i in 0..30 {
            match i % 3 {
                0 | 1 => ids.push(
                    env.create(
                        "consumers",
                        json!({"username": format!("u{i}"), "tags": ["t"]}),
                    )
                    .await,
                ),
                _ => {
                    let id = ids.remove(0);
                    env.patch("consumers", &id, json!({"custom_id": format!("c{i}")}))
                        .await;
                    if i % 2 == 0 {
                        env.delete("consumers", &id).await;
                    }
                }
            }
            // Every few writes, one incremental apply of everything new.
            if i % 4 == 3 {
                env.incremental_sync().await;
                env.assert_synced().await;
            }
        }
        env.incremental_sync().await;
        env.assert_synced().await;
    }

    /// Every rejected batch leaves entities, version, state hash and indexes as they were.
    #[tokio::test]
    async fn rejected_batches_change_nothing() {
        let env = Env::new().await;
        let (s1, _, _) = populate(&env).await;
        env.full_sync().await;
        let ws = env.ws();
        let state = env.dp.state();
        let v = state.version;
        let svc = env.dp.get("services", &ws, &s1).unwrap().unwrap();
        let new_id = "5f1c5a1a-0000-4000-8000-000000000001";
        let mut new_svc = svc.clone();
        new_svc["id"] = json!(new_id);
        new_svc["name"] = json!("fresh");
        let route = env
            .dp
            .find_by_key("routes", &ws, "name", &json!("r1"))
            .unwrap()
            .unwrap();

        let inc = |expect_from| ApplyKind::Incremental {
            expect_from,
            latest: None,
        };
        let check_unchanged = |what: &str| {
            assert_eq!(env.dp.state(), state, "{what}: state");
            assert_eq!(
                env.dp.compute_state_hash().unwrap(),
                state.state_hash,
                "{what}: stored entities"
            );
            assert_eq!(env.dp.get("services", &ws, new_id).unwrap(), None, "{what}");
            assert_eq!(
                env.dp.get("services", &ws, &s1).unwrap().as_ref(),
                Some(&svc),
                "{what}"
            );
            assert!(
                env.dp
                    .find_by_key("services", &ws, "name", &json!("fresh"))
                    .unwrap()
                    .is_none(),
                "{what}: index"
            );
        };
        let invalid = |res: Result<Applied, ApplyError>, ty: &str, id: &str| match res {
            Err(ApplyError::Invalid {
                message,
                fields,
                flattened,
            }) => {
                assert!(message.starts_with("sync deltas is invalid: "), "{message}");
                assert!(fields[ty][id].is_object(), "{fields}");
                assert_eq!(flattened[0]["entity_type"], json!(ty));
                assert_eq!(flattened[0]["entity_id"], json!(id));
                assert!(!flattened[0]["errors"].as_array().unwrap().is_empty());
            }
            other => panic!("expected Invalid for {ty} {id}, got {other:?}"),
        };

        // Bad schema: the valid new service in the same batch is not written either.
        let mut bad = svc.clone();
        bad["port"] = json!("eighty");
        let res = env.dp.apply(
            inc(v),
            [
                upsert(v + 1, "services", &ws, new_svc.clone()),
                upsert(v + 1, "services", &ws, bad),
            ],
        );
        match &res {
            Err(ApplyError::Invalid { fields, .. }) => {
                assert_eq!(
                    fields["services"][&s1]["port"],
                    json!("expected an integer")
                )
            }
            other => panic!("{other:?}"),
        }
        check_unchanged("bad schema");

        // Unknown type, id mismatch, missing workspace.
        let mut thing = new_svc.clone();
        thing["id"] = json!("x");
        invalid(
            env.dp.apply(inc(v), [upsert(v + 1, "gizmos", &ws, thing)]),
            "gizmos",
            "x",
        );
        let mut mismatch = upsert(v + 1, "services", &ws, new_svc.clone());
        mismatch.id = s1.clone();
        invalid(env.dp.apply(inc(v), [mismatch]), "services", &s1);
        invalid(
            env.dp
                .apply(inc(v), [upsert(v + 1, "services", "", new_svc.clone())]),
            "services",
            new_id,
        );
        check_unchanged("shape");

        // A dangling foreign key.
        let mut orphan = route.clone();
        orphan["id"] = json!("5f1c5a1a-0000-4000-8000-000000000002");
        orphan["name"] = json!("orphan");
        orphan["paths"] = json!(["/orphan"]);
        orphan["service"] = json!({"id": new_id});
        invalid(
            env.dp
                .apply(inc(v), [upsert(v + 1, "routes", &ws, orphan.clone())]),
            "routes",
            "5f1c5a1a-0000-4000-8000-000000000002",
        );
        // The same route is fine when its service comes in the same batch.
        // (Checked below, after all rejections.)

        // Deleting a service that stored routes still reference.
        invalid(
            env.dp.apply(inc(v), [delete(v + 1, "services", &ws, &s1)]),
            "services",
            &s1,
        );
        // A unique key taken by another entity.
        let mut dup = new_svc.clone();
        dup["name"] = json!("s1");
        invalid(
            env.dp.apply(inc(v), [upsert(v + 1, "services", &ws, dup)]),
            "services",
            new_id,
        );
        check_unchanged("references and keys");

        // Versions: a gap, an old version again, a stale expect_from, a wrong latest, a version
        // going backwards inside the batch.
        for (kind, deltas, expected) in [
            (
                inc(v),
                vec![upsert(v + 2, "services", &ws, new_svc.clone())],
                VersionError::Gap {
                    after: v,
                    got: v + 2,
                },
            ),
            (
                inc(v),
                vec![upsert(v, "services", &ws, new_svc.clone())],
                VersionError::Gap { after: v, got: v },
            ),
            (
                inc(v),
                vec![
                    upsert(v + 1, "services", &ws, new_svc.clone()),
                    upsert(v + 2, "services", &ws, new_svc.clone()),
                    upsert(v + 1, "services", &ws, new_svc.clone()),
                ],
                VersionError::Gap {
                    after: v + 2,
                    got: v + 1,
                },
            ),
            (
                ApplyKind::Incremental {
                    expect_from: v,
                    latest: Some(v + 3),
                },
                vec![upsert(v + 1, "services", &ws, new_svc.clone())],
                VersionError::NotLatest {
                    last: v + 1,
                    latest: v + 3,
                },
            ),
        ] {
            match env.dp.apply(kind, deltas) {
                Err(ApplyError::Version(e)) => assert_eq!(e, expected),
                other => panic!("expected {expected:?}, got {other:?}"),
            }
        }
        match env.dp.begin(inc(v - 1)) {
            Err(ApplyError::Version(VersionError::Conflict { expected, stored })) => {
                assert_eq!((expected, stored), (v - 1, v))
            }
            Err(e) => panic!("{e:?}"),
            Ok(_) => panic!("a stale expect_from was accepted"),
        }
        // A full sync whose deltas carry another version.
        assert!(matches!(
            env.dp.apply(
                ApplyKind::Full {
                    version: v + 5,
                    epoch: None
                },
                [upsert(v + 4, "services", &ws, new_svc.clone())]
            ),
            Err(ApplyError::Version(VersionError::FullSyncMismatch { .. }))
        ));
        // Dropping an Apply after writing a whole chunk aborts it.
        {
            let mut apply = env.dp.begin(inc(v)).unwrap();
            apply
                .delta(upsert(v + 1, "services", &ws, new_svc.clone()))
                .unwrap();
            apply.flush().unwrap();
        }
        check_unchanged("versions");

        // The store is not wedged: the orphan route with its service in one batch applies.
        let applied = env
            .dp
            .apply(
                inc(v),
                [
                    upsert(v + 1, "services", &ws, new_svc.clone()),
                    upsert(v + 2, "routes", &ws, orphan),
                ],
            )
            .unwrap();
        assert_eq!(applied.version, v + 2);
        assert_eq!(
            env.dp.children("routes", "service", new_id).unwrap().len(),
            1
        );
        assert_eq!(env.dp.compute_state_hash().unwrap(), applied.state_hash);
    }

    /// Within one batch a unique value may pass from one entity to another; only the final
    /// state counts.
    #[tokio::test]
    async fn unique_values_may_swap_within_a_batch() {
        let env = Env::new().await;
        let (s1, s2, _) = populate(&env).await;
        env.full_sync().await;
        let ws = env.ws();
        let v = env.dp.state().version;
        let mut a = env.dp.get("services", &ws, &s1).unwrap().unwrap();
        let mut b = env.dp.get("services", &ws, &s2).unwrap().unwrap();
        a["name"] = json!("s2");
        b["name"] = json!("s1");
        let applied = env
            .dp
            .apply(
                ApplyKind::Incremental {
                    expect_from: v,
                    latest: Some(v + 1),
                },
                [
                    upsert(v + 1, "services", &ws, a),
                    upsert(v + 1, "services", &ws, b),
                ],
            )
            .unwrap();
        assert_eq!(applied.version, v + 1);
        let find = |name: &str| {
            env.dp
                .find_by_key("services", &ws, "name", &json!(name))
                .unwrap()
                .unwrap()["id"]
                .clone()
        };
        assert_eq!(find("s1"), json!(s2));
        assert_eq!(find("s2"), json!(s1));
        assert_eq!(env.dp.compute_state_hash().unwrap(), applied.state_hash);
    }

    #[tokio::test]
    async fn restart_keeps_version_hash_and_entities() {
        let mut env = Env::new().await;
        let (s1, _, _) = populate(&env).await;
        env.full_sync().await;
        env.patch("services", &s1, json!({"name": "after"})).await;
        env.incremental_sync().await;
        let state = env.dp.state();
        env.reopen();
        assert_eq!(env.dp.state(), state);
        env.assert_synced().await;
        let ws = env.ws();
        assert_eq!(
            env.dp
                .find_by_key("services", &ws, "name", &json!("after"))
                .unwrap()
                .unwrap()["id"],
            json!(s1)
        );
        env.create("consumers", json!({"username": "late"})).await;
        env.incremental_sync().await;
        env.assert_synced().await;
    }

    /// A staged page as these tests encode it: a JSON array of wire deltas.
    fn page_bytes(deltas: &[Delta]) -> Vec<u8> {
        serde_json::to_vec(&deltas.iter().map(Delta::to_wire).collect::<Vec<_>>()).unwrap()
    }

    /// Decodes [`page_bytes`] pages; the store hands back exactly what was staged.
    fn decode_page(page_no: u64, bytes: &[u8], sink: &mut DeltaSink<'_>) -> Result<(), ApplyError> {
        let deltas: Vec<Value> =
            serde_json::from_slice(bytes).map_err(|e| ApplyError::Staging {
                transfer_id: String::new(),
                reason: format!("page {page_no}: {e}"),
            })?;
        for d in deltas {
            sink(Delta::from_wire(d).unwrap())?;
        }
        Ok(())
    }

    #[tokio::test]
    async fn staged_pages_commit_as_one_apply() {
        let mut env = Env::new().await;
        populate(&env).await;
        let (deltas, info) = env.snapshot().await;
        let kind = ApplyKind::Full {
            version: info.version,
            epoch: Some(info.epoch.clone()),
        };
        env.dp.stage_begin("t1", kind.clone()).unwrap();
        for (page_no, page) in deltas.chunks(3).enumerate() {
            env.dp.stage_page("t1", page_no as u64, page).unwrap();
            assert_eq!(env.dp.state().version, 0, "staging changes nothing");
        }
        // Staging a page again replaces it.
        env.dp.stage_page("t1", 0, &deltas[..3]).unwrap();
        let applied = env.dp.stage_commit("t1").unwrap();
        assert_eq!(applied.n_deltas, deltas.len() as u64);
        env.assert_synced_to(&info);
        // The staging went with the commit.
        assert!(matches!(
            env.dp.stage_commit("t1"),
            Err(ApplyError::Storage(DpStoreError::UnknownTransfer(_)))
        ));

        // While a transfer is staged, the old config stays readable; a reopen discards it.
        let s = env
            .create("services", json!({"name": "s9", "host": "nine.example"}))
            .await;
        let (deltas, info2) = env.snapshot().await;
        env.dp
            .stage_begin(
                "t2",
                ApplyKind::Full {
                    version: info2.version,
                    epoch: Some(info2.epoch.clone()),
                },
            )
            .unwrap();
        env.dp.stage_page("t2", 0, &deltas).unwrap();
        let ws = env.ws();
        assert_eq!(env.dp.get("services", &ws, &s).unwrap(), None);
        assert_eq!(env.dp.list("routes").unwrap().len(), 3);
        env.reopen();
        assert!(matches!(
            env.dp.stage_page("t2", 1, &deltas),
            Err(DpStoreError::UnknownTransfer(_))
        ));
        env.assert_synced_to(&info);

        // A missing page rejects the transfer and discards it.
        env.dp
            .stage_begin(
                "t3",
                ApplyKind::Full {
                    version: info2.version,
                    epoch: None,
                },
            )
            .unwrap();
        env.dp.stage_page("t3", 0, &deltas[..2]).unwrap();
        env.dp.stage_page("t3", 2, &deltas[2..]).unwrap();
        assert!(matches!(
            env.dp.stage_commit("t3"),
            Err(ApplyError::Staging { .. })
        ));
        env.assert_synced_to(&info);
        assert!(matches!(
            env.dp.stage_page("t3", 1, &deltas),
            Err(DpStoreError::UnknownTransfer(_))
        ));

        // An incremental transfer.
        env.dp
            .stage_begin(
                "t4",
                ApplyKind::Incremental {
                    expect_from: info.version,
                    latest: Some(info2.version),
                },
            )
            .unwrap();
        let (changes, _) = env.changes_after(info.version).await;
        env.dp.stage_page("t4", 0, &changes).unwrap();
        env.dp.stage_commit("t4").unwrap();
        env.assert_synced_to(&info2);
    }

    /// Staged bytes are opaque: pages of any size (several rows each) come back to the decoder
    /// byte for byte and in page order; a decoder error after deltas were written rejects the
    /// whole transfer, discards it, and changes nothing.
    #[tokio::test]
    async fn staged_bytes_come_back_whole_and_errors_change_nothing() {
        let env = Env::new().await;
        populate(&env).await;
        let info = {
            env.full_sync().await;
            env.cp.version_info().await.unwrap()
        };
        env.create("services", json!({"name": "s9", "host": "nine.example"}))
            .await;
        let (deltas, info2) = env.snapshot().await;
        let opaque = |n: usize, seed: u8| -> Vec<u8> {
            (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
        };
        let pages: Vec<Vec<u8>> = vec![
            page_bytes(&deltas),
            opaque(STAGE_ROW_BYTES, 1),
            Vec::new(),
            opaque(2 * STAGE_ROW_BYTES + 12_345, 2),
            opaque(1, 3),
        ];
        env.dp
            .stage_begin(
                "big",
                ApplyKind::Full {
                    version: info2.version,
                    epoch: Some(info2.epoch.clone()),
                },
            )
            .unwrap();
        // Staged out of order; a page staged again is replaced, rows of the longer one too.
        for (no, page) in pages.iter().enumerate().rev() {
            env.dp
                .stage_page_bytes("big", no as u64, &opaque(3 * STAGE_ROW_BYTES, 9))
                .unwrap();
            env.dp.stage_page_bytes("big", no as u64, page).unwrap();
        }
        let mut seen = Vec::new();
        let res = env.dp.stage_commit_with("big", |page_no, bytes, sink| {
            seen.push(page_no);
            if page_no == 0 {
                return decode_page(page_no, bytes, sink);
            }
            assert_eq!(bytes, pages[page_no as usize].as_slice(), "page {page_no}");
            if page_no as usize + 1 == pages.len() {
                return Err(ApplyError::Invalid {
                    message: "the last page is bad".into(),
                    fields: json!({}),
                    flattened: Vec::new(),
                });
            }
            Ok(())
        });
        assert!(matches!(res, Err(ApplyError::Invalid { .. })), "{res:?}");
        assert_eq!(seen, [0, 1, 2, 3, 4]);
        env.assert_synced_to(&info);
        assert_eq!(env.dp.list("services").unwrap().len(), 2);
        assert!(matches!(
            env.dp.stage_page_bytes("big", 0, b"[]"),
            Err(DpStoreError::UnknownTransfer(_))
        ));
    }

    /// The CP's database was replaced: a full sync to a lower version with another epoch.
    #[tokio::test]
    async fn full_sync_to_a_lower_version() {
        let env = Env::new().await;
        populate(&env).await;
        for i in 0..5 {
            env.create("consumers", json!({"username": format!("extra{i}")}))
                .await;
        }
        env.full_sync().await;
        let high = env.dp.state();
        let other = Env::new().await;
        other
            .create("services", json!({"name": "only", "host": "only.example"}))
            .await;
        let (deltas, info) = other.snapshot().await;
        assert!(info.version < high.version);
        let applied = env
            .dp
            .apply(
                ApplyKind::Full {
                    version: info.version,
                    epoch: Some(info.epoch.clone()),
                },
                deltas,
            )
            .unwrap();
        assert_eq!(applied.version, info.version);
        assert_eq!(applied.n_entities, 2);
        env.assert_synced_to(&info);
        assert_eq!(env.dp.state().epoch, Some(info.epoch));
        assert_eq!(env.dp.list("routes").unwrap().len(), 0);
        assert_eq!(env.dp.list("consumers").unwrap().len(), 0);
        let ws = env.ws();
        assert!(
            env.dp
                .find_by_key("consumers", &ws, "username", &json!("alice"))
                .unwrap()
                .is_none()
        );
    }
}
