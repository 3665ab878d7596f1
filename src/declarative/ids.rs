//! Ids for entities a file gives without one.
//!
//! Kong's rule (`kong/db/schema/others/declarative_config.lua`, `get_key_for_uuid_gen`,
//! `build_cache_key`, `generate_uuid`): `uuid5(uuid5(NS, <type>), <key>)` with
//! `NS = fd02801f-0957-4a15-a55a-c8d9606f30b5` and
//! - for a type with a cache key: `"<type>:<ws_id or *>:<v1>:<v2>…"`, each `v` the item's
//!   string value as written in the file (a foreign key by name stays the name); an absent
//!   value is the parent's id when it is the nested child's back-reference, `""` when the
//!   field is optional; no key at all (random id in Kong) when a cache-key field is
//!   auto-generated (key-auth `key`) or required and absent;
//! - else the endpoint key's value when given; when that field is not unique, composed with
//!   `:<parent id>` (or the item's own foreign value) per cascading foreign key, then with
//!   `:<ws_id or *>`;
//! - else no key (Kong: a random v4 id).
//!
//! Where Kong falls back to a random id (certificates, unnamed services and routes, consumers
//! without a username, credentials whose key is auto-generated), deltaplane derives the id
//! from the entity's content instead, so that importing the same file again keeps its ids:
//! `uuid5(uuid5(NS, <type>), "content:" + canonical JSON of the entity as the file gives it
//! (without `id`, `created_at`, `updated_at`, `_comment`, `_ignore`, nested children) + ":" +
//! <parent id or ""> + ":" + <n>)`, `n` counting earlier entities of the type with the same
//! content and parent (0 for the first), so identical entries still get distinct ids.

use std::collections::HashMap;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::UUID_NAMESPACE;
use crate::schema::{EntitySchema, FieldType, OnDelete};

fn namespace() -> Uuid {
    Uuid::parse_str(UUID_NAMESPACE).expect("a valid uuid")
}

/// Kong's `generate_uuid(type, key)`.
pub fn kong_uuid(entity_type: &str, key: &str) -> Uuid {
    let type_ns = Uuid::new_v5(&namespace(), entity_type.as_bytes());
    Uuid::new_v5(&type_ns, key.as_bytes())
}

/// The nested child's parent: its back-reference field and the parent's id.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ParentRef<'a> {
    pub field: &'a str,
    pub id: &'a str,
}

fn ws_of(item: &Map<String, Value>) -> &str {
    item.get("ws_id").and_then(Value::as_str).unwrap_or("*")
}

/// Lua's `tostring` of a scalar used in a key (`..` concatenation); `None` where Kong would
/// fail to concatenate.
fn lua_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        }),
        _ => None,
    }
}

/// `build_cache_key`: `None` where Kong gives up (and generates a random id).
pub(crate) fn cache_key(
    schema: &EntitySchema,
    cache_key: &[String],
    item: &Map<String, Value>,
    parent: Option<ParentRef<'_>>,
) -> Option<String> {
    let mut ck = vec![schema.name.clone(), ws_of(item).to_owned()];
    for k in cache_key {
        let field = schema.field(k)?;
        if field.auto.is_some() || field.generate.is_some() {
            return None;
        }
        match item.get(k) {
            Some(Value::String(s)) => ck.push(s.clone()),
            // Kong's file schema types foreign keys as strings; deltaplane also takes
            // `{"id": …}`, which stands for the id string.
            Some(Value::Object(o)) if field.ty == FieldType::Foreign => {
                if let Some(Value::String(id)) = o.get("id") {
                    ck.push(id.clone());
                }
            }
            Some(_) => {} // Lua: neither a string nor nil, nothing is added
            None => match parent {
                Some(p) if p.field == k => ck.push(p.id.to_owned()),
                _ if field.required => return None,
                _ => ck.push(String::new()),
            },
        }
    }
    Some(ck.join(":"))
}

/// `get_key_for_uuid_gen`'s key, `None` where Kong would generate a random id.
pub(crate) fn kong_key(
    schema: &EntitySchema,
    item: &Map<String, Value>,
    parent: Option<ParentRef<'_>>,
) -> Option<String> {
    let pk = schema.field(&schema.primary_key)?;
    if !matches!(pk.auto, Some(crate::schema::Auto::Uuid)) {
        return None;
    }
    if let Some(ck) = &schema.cache_key {
        return cache_key(schema, ck, item, parent);
    }
    let ek = schema.endpoint_key.as_deref()?;
    let mut key = lua_text(item.get(ek)?)?;
    let ek_field = schema.field(ek)?;
    if !ek_field.unique {
        for field in &schema.fields {
            if field.ty != FieldType::Foreign || field.on_delete != Some(OnDelete::Cascade) {
                continue;
            }
            match parent {
                Some(p) => {
                    // Kong composes with the parent's primary key, whatever the field's
                    // reference (every primary key here is a single `id`).
                    key.push(':');
                    key.push_str(p.id);
                }
                None => {
                    let v = match item.get(&field.name)? {
                        Value::Object(o) => o.get("id")?,
                        v => v,
                    };
                    key.push(':');
                    key.push_str(&lua_text(v)?);
                }
            }
        }
        // No field here is `unique_across_ws` (deltaplane's schemas do not carry the flag;
        // Kong sets it only on unique fields, which never reach this branch).
        key.push(':');
        key.push_str(ws_of(item));
    }
    Some(key)
}

/// Counts identical contents for the content-derived ids.
#[derive(Default)]
pub(crate) struct ContentIds {
    /// Keyed by the id of the content's first occurrence (not the content itself, which
    /// would hold a second copy of such entities).
    seen: HashMap<Uuid, u32>,
}

impl ContentIds {
    /// The content-derived id of `item` (see the module documentation).
    pub(crate) fn id(
        &mut self,
        entity_type: &str,
        item: &Map<String, Value>,
        parent_id: Option<&str>,
    ) -> Uuid {
        let mut content = Map::new();
        for (k, v) in item {
            if matches!(
                k.as_str(),
                "id" | "created_at" | "updated_at" | "_comment" | "_ignore"
            ) || k.starts_with('\u{0}')
            {
                continue;
            }
            content.insert(k.clone(), v.clone());
        }
        let text = format!(
            "content:{}:{}",
            serde_json::to_string(&content).expect("a JSON value serialises"),
            parent_id.unwrap_or("")
        );
        let n = self.seen.entry(kong_uuid(entity_type, &text)).or_insert(0);
        let key = format!("{text}:{n}");
        *n += 1;
        kong_uuid(entity_type, &key)
    }
}
