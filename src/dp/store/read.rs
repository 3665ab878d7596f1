//! Reading the store: a [`Snapshot`] is one redb read transaction together with the state
//! (version, epoch, state hash, entity count) it shows, so every read through it sees one
//! committed version, whatever commits meanwhile. The read methods of [`DpStore`] each take a
//! snapshot of their own.

use std::sync::Arc;

use redb::{ReadOnlyTable, ReadableDatabase, ReadableTable};
use serde_json::Value;

use crate::dp::store::tables::{ENTITIES, KEYS, META, REFS, key_ws, parse_body, read_meta};
use crate::dp::store::{DpState, DpStore, DpStoreError};
use crate::proto::StateHash;
use crate::schema::index::canonical;
use crate::schema::{EntitySchema, Registry};

/// One consistent, committed version of the store, for as long as it is held.
///
/// Commits that follow do not change what it shows. Hold it for a request or a rebuild, not
/// for ever: redb cannot reuse the pages it sees until it is dropped, so the file grows with
/// every apply while an old snapshot lives. `Send + Sync`.
pub struct Snapshot {
    state: DpState,
    registry: Arc<Registry>,
    /// The tables of one read transaction, opened once (each keeps the transaction alive).
    entities: ReadOnlyTable<(&'static str, &'static str), (&'static str, &'static [u8])>,
    keys: ReadOnlyTable<(&'static str, &'static str, &'static str, &'static str), &'static str>,
    refs: ReadOnlyTable<
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

// === impl DpStore ===

impl DpStore {
    /// The store as of the last commit: a read transaction and the state it shows (read from
    /// the transaction itself, so the two always agree). Applies go on meanwhile.
    pub fn snapshot(&self) -> Result<Snapshot, DpStoreError> {
        let txn = self.inner.db.begin_read()?;
        Ok(Snapshot {
            state: read_meta(&txn.open_table(META)?)?,
            registry: Arc::clone(&self.inner.registry),
            entities: txn.open_table(ENTITIES)?,
            keys: txn.open_table(KEYS)?,
            refs: txn.open_table(REFS)?,
        })
    }

    /// The entity `id` of `entity_type` in workspace `ws_id` ([`Snapshot::get`]).
    pub fn get(
        &self,
        entity_type: &str,
        ws_id: &str,
        id: &str,
    ) -> Result<Option<Value>, DpStoreError> {
        self.snapshot()?.get(entity_type, ws_id, id)
    }

    /// The entity whose unique field `field` is `value` in workspace `ws_id`
    /// ([`Snapshot::find_by_key`]).
    pub fn find_by_key(
        &self,
        entity_type: &str,
        ws_id: &str,
        field: &str,
        value: &Value,
    ) -> Result<Option<Value>, DpStoreError> {
        self.snapshot()?
            .find_by_key(entity_type, ws_id, field, value)
    }

    /// The `child_type` entities whose foreign key `fk_field` is `parent_id`, by child id
    /// ([`Snapshot::children`]).
    pub fn children(
        &self,
        child_type: &str,
        fk_field: &str,
        parent_id: &str,
    ) -> Result<Vec<Value>, DpStoreError> {
        self.snapshot()?.children(child_type, fk_field, parent_id)
    }

    /// Every entity of `entity_type`, by id ([`Snapshot::list`]).
    pub fn list(&self, entity_type: &str) -> Result<Vec<Value>, DpStoreError> {
        self.snapshot()?.list(entity_type)
    }

    /// Calls `f(ws_id, id, entity)` for every entity of `entity_type`, by id, until it returns
    /// false ([`Snapshot::for_each`]).
    pub fn for_each(
        &self,
        entity_type: &str,
        f: &mut dyn FnMut(&str, &str, Value) -> bool,
    ) -> Result<(), DpStoreError> {
        self.snapshot()?.for_each(entity_type, f)
    }

    /// The state hash recomputed over every stored entity (for tests and verification).
    pub fn compute_state_hash(&self) -> Result<StateHash, DpStoreError> {
        self.snapshot()?.compute_state_hash()
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// Version, epoch, state hash and entity count of the version this snapshot shows.
    pub fn state(&self) -> &DpState {
        &self.state
    }

    /// The entity `id` of `entity_type` in workspace `ws_id`.
    pub fn get(
        &self,
        entity_type: &str,
        ws_id: &str,
        id: &str,
    ) -> Result<Option<Value>, DpStoreError> {
        let Some(row) = self.entities.get((entity_type, id))? else {
            return Ok(None);
        };
        let (ws, body) = row.value();
        if ws != ws_id {
            return Ok(None);
        }
        parse_body(body).map(Some)
    }

    /// The entity `id` of `entity_type` in whichever workspace holds it, with that
    /// workspace (ids are unique per type across workspaces); for consumers of the change
    /// feed, which names `(type, id)`.
    pub fn get_by_id(
        &self,
        entity_type: &str,
        id: &str,
    ) -> Result<Option<(String, Value)>, DpStoreError> {
        let Some(row) = self.entities.get((entity_type, id))? else {
            return Ok(None);
        };
        let (ws, body) = row.value();
        Ok(Some((ws.to_owned(), parse_body(body)?)))
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
        let ws = key_ws(schema, ws_id);
        let value = canonical(value);
        let Some(id) = self.keys.get((entity_type, ws, field, value.as_str()))? else {
            return Ok(None);
        };
        match self.entities.get((entity_type, id.value()))? {
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
            .registry
            .references_of(child_type)
            .find(|fk| fk.field == fk_field)
        else {
            return Err(DpStoreError::UnknownType(format!(
                "{child_type}.{fk_field}"
            )));
        };
        let parent = fk.parent.as_str();
        let mut res = Vec::new();
        for row in self
            .refs
            .range((parent, parent_id, child_type, fk_field, "")..)?
        {
            let (key, _) = row?;
            let (p, pid, c, f, cid) = key.value();
            if (p, pid, c, f) != (parent, parent_id, child_type, fk_field) {
                break;
            }
            if let Some(e) = self.entities.get((child_type, cid))? {
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
    /// false. Nothing is collected.
    pub fn for_each(
        &self,
        entity_type: &str,
        f: &mut dyn FnMut(&str, &str, Value) -> bool,
    ) -> Result<(), DpStoreError> {
        for row in self.entities.range((entity_type, "")..)? {
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

    /// The state hash recomputed over every entity of this snapshot.
    pub fn compute_state_hash(&self) -> Result<StateHash, DpStoreError> {
        let mut hash = StateHash::ZERO;
        for row in self.entities.iter()? {
            let (key, value) = row?;
            let (ty, id) = key.value();
            let (ws, body) = value.value();
            // From the parsed value, not the stored bytes: this verifies that what the apply
            // stored (and hashed from its bytes) is canonical.
            hash.add(&StateHash::of_entity(ty, ws, id, &parse_body(body)?));
        }
        Ok(hash)
    }

    /// Every row of the entity, unique-key and foreign-key tables, in key order, each field
    /// length-prefixed, as one byte string. Two snapshots whose rows and states are equal
    /// answer every read alike: the fuzzer checks an operation that must change nothing with
    /// it, and a full comparison with the model only when it did change something.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn rows(&self) -> Result<Vec<u8>, DpStoreError> {
        fn field(out: &mut Vec<u8>, bytes: &[u8]) {
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
        let mut res = Vec::new();
        for row in self.entities.iter()? {
            let (key, value) = row?;
            let ((ty, id), (ws, body)) = (key.value(), value.value());
            res.push(b'e');
            for f in [ty.as_bytes(), id.as_bytes(), ws.as_bytes(), body] {
                field(&mut res, f);
            }
        }
        for row in self.keys.iter()? {
            let (key, value) = row?;
            let ((ty, ws, name, v), id) = (key.value(), value.value());
            res.push(b'k');
            for f in [ty, ws, name, v, id] {
                field(&mut res, f.as_bytes());
            }
        }
        for row in self.refs.iter()? {
            let (key, _) = row?;
            let (parent_ty, parent_id, child_ty, name, child_id) = key.value();
            res.push(b'r');
            for f in [parent_ty, parent_id, child_ty, name, child_id] {
                field(&mut res, f.as_bytes());
            }
        }
        Ok(res)
    }

    fn schema(&self, entity_type: &str) -> Result<&EntitySchema, DpStoreError> {
        self.registry
            .get(entity_type)
            .map(|s| &**s)
            .ok_or_else(|| DpStoreError::UnknownType(entity_type.to_owned()))
    }
}
