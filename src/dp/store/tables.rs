//! The store's redb tables and how rows are encoded: the table definitions, the write-side
//! [`Tables`] of one chunk, the `meta` rows (version, epoch, state hash, entity count) and the
//! stored entity bodies.
//!
//! Composite keys are redb tuples. An entity is keyed by `(type, id)` because ids are unique per
//! type across workspaces on the CP, and foreign keys carry only the id.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};
use serde_json::Value;

use crate::dp::store::{DpState, DpStoreError};
use crate::proto::StateHash;
use crate::schema::EntitySchema;

/// `(type, id)` → `(ws_id, canonical JSON)`, exactly the entity the CP sent.
pub(super) const ENTITIES: TableDefinition<(&str, &str), (&str, &[u8])> =
    TableDefinition::new("entities");
/// `(type, ws, field, canonical JSON value)` → id, for unique fields and the cache key
/// (`@cache_key`, a JSON array); `ws` is empty for types that are not workspaceable.
pub(super) const KEYS: TableDefinition<(&str, &str, &str, &str), &str> =
    TableDefinition::new("keys");
/// `(parent_type, parent_id, child_type, field, child_id)`, the foreign-key index.
pub(super) const REFS: TableDefinition<(&str, &str, &str, &str, &str), ()> =
    TableDefinition::new("refs");
/// Version, epoch, state hash, entity count; see [`read_meta`].
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Staged pages of earlier releases (`(transfer, page, row)` → bytes), dropped on open.
pub(super) const STAGED: TableDefinition<(&str, u64, u64), &[u8]> = TableDefinition::new("staged");
/// Transfers of earlier releases (transfer id → kind), dropped on open.
pub(super) const TRANSFERS: TableDefinition<&str, &[u8]> = TableDefinition::new("transfers");

const META_VERSION: &str = "version";
const META_EPOCH: &str = "epoch";
const META_HASH: &str = "state_hash";
const META_COUNT: &str = "n_entities";

/// The write-side tables of one chunk. A redb `Table` borrows its transaction, so the tables
/// are opened once per chunk of deltas rather than once per apply.
pub(super) struct Tables<'txn> {
    pub(super) entities: Table<'txn, (&'static str, &'static str), (&'static str, &'static [u8])>,
    pub(super) keys:
        Table<'txn, (&'static str, &'static str, &'static str, &'static str), &'static str>,
    pub(super) refs: Table<
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

// === impl Tables ===

impl<'txn> Tables<'txn> {
    pub(super) fn open(txn: &'txn WriteTransaction) -> Result<Tables<'txn>, redb::TableError> {
        Ok(Tables {
            entities: txn.open_table(ENTITIES)?,
            keys: txn.open_table(KEYS)?,
            refs: txn.open_table(REFS)?,
        })
    }
}

// === encodings ===

/// The workspace part of a key row: unique keys of non-workspaceable types are global.
pub(super) fn key_ws<'a>(schema: &EntitySchema, ws: &'a str) -> &'a str {
    if schema.workspaceable { ws } else { "" }
}

/// A stored entity body (canonical JSON) as a value.
pub(super) fn parse_body(body: &[u8]) -> Result<Value, DpStoreError> {
    serde_json::from_slice(body).map_err(|e| DpStoreError::Corrupt(format!("entity body: {e}")))
}

/// The state the `meta` rows record; an empty table is the state of a new store.
pub(super) fn read_meta(
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

pub(super) fn write_meta(
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
