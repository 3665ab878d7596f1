//! The index rows an entity implies — unique fields, the cache key, foreign references,
//! tags — derived from its schema. Both planes' stores index entities the same way, so a key
//! looked up on a data plane means what it means on the control plane.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{EntitySchema, FieldType};

/// The key name under which the cache key is indexed.
pub const CACHE_KEY: &str = "@cache_key";

/// Index rows of one entity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntityIndex {
    /// `(field or CACHE_KEY, canonical JSON value)`.
    pub keys: Vec<(String, String)>,
    /// `(field, parent type, parent id)`.
    pub refs: Vec<(String, String, String)>,
}

/// Canonical JSON text (sorted keys): how key values are compared.
pub fn canonical(v: &Value) -> String {
    serde_json::to_string(v).expect("a JSON value serialises")
}

/// The id of a foreign-key value (`{"id": ...}`).
pub fn foreign_id(v: Option<&Value>) -> Option<&str> {
    v.and_then(|f| f.get("id")).and_then(Value::as_str)
}

/// The entity's tags, sorted and without duplicates.
pub fn tags_of(entity: &Value) -> Vec<String> {
    let mut tags: Vec<String> = entity
        .get("tags")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    tags.sort();
    tags.dedup();
    tags
}

impl EntitySchema {
    /// The unique and cache keys and the foreign references of `entity`.
    pub fn index_of(&self, entity: &Value) -> EntityIndex {
        let mut keys = Vec::new();
        for field in self.unique_fields() {
            if let Some(v) = entity.get(&field.name).filter(|v| !v.is_null()) {
                keys.push((field.name.clone(), canonical(v)));
            }
        }
        if let Some(cache_key) = &self.cache_key {
            keys.push((CACHE_KEY.into(), self.cache_key_value(cache_key, entity)));
        }
        let mut refs = Vec::new();
        for field in &self.fields {
            match field.ty {
                FieldType::Foreign => {
                    if let (Some(id), Some(parent)) =
                        (foreign_id(entity.get(&field.name)), &field.reference)
                    {
                        refs.push((field.name.clone(), parent.clone(), id.to_owned()));
                    }
                }
                FieldType::Array | FieldType::Set => {
                    if let (Some(parent), Some(Value::Array(items))) = (
                        field.elements.as_ref().and_then(|e| e.reference.as_ref()),
                        entity.get(&field.name),
                    ) {
                        let mut seen = BTreeSet::new();
                        for id in items.iter().filter_map(Value::as_str) {
                            if seen.insert(id) {
                                refs.push((field.name.clone(), parent.clone(), id.to_owned()));
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        EntityIndex { keys, refs }
    }

    /// The cache key's value: a JSON array of the `cache_key` fields, foreign keys as ids.
    pub fn cache_key_value(&self, cache_key: &[String], entity: &Value) -> String {
        let parts: Vec<Value> = cache_key
            .iter()
            .map(|f| {
                let v = entity.get(f).cloned().unwrap_or(Value::Null);
                match self.field(f).map(|x| x.ty) {
                    Some(FieldType::Foreign) => {
                        foreign_id(Some(&v)).map(Value::from).unwrap_or(Value::Null)
                    }
                    _ => v,
                }
            })
            .collect();
        canonical(&Value::Array(parts))
    }
}
