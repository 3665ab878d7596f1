//! Reading the store: entities by id, by unique key and by foreign key, all of one type, and
//! the state hash recomputed from what is stored. Each call reads one redb read transaction.

use std::sync::Arc;

use redb::{ReadableDatabase, ReadableTable};
use serde_json::Value;

use crate::dp::store::tables::{ENTITIES, KEYS, REFS, key_ws, parse_body};
use crate::dp::store::{DpStore, DpStoreError};
use crate::proto::StateHash;
use crate::schema::EntitySchema;
use crate::schema::index::canonical;

// === impl DpStore ===

impl DpStore {
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

    fn schema(&self, entity_type: &str) -> Result<Arc<EntitySchema>, DpStoreError> {
        self.inner
            .registry
            .get(entity_type)
            .cloned()
            .ok_or_else(|| DpStoreError::UnknownType(entity_type.to_owned()))
    }
}
