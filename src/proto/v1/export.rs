//! The v1 `config_table`: Kong's declarative form of the whole configuration, as Kong's v1
//! export builds it (`kong/db/declarative/export.lua`, `export_config`): `_format_version`
//! `"3.0"`, `_transform` false, one array per entity type that has entities, each entity with
//! its `ws_id` and its foreign keys flattened to the bare id.
//!
//! Deviation from Kong: disabled services, their routes and plugins, and disabled plugins are
//! exported too (Kong omits them). A data plane must store exactly what the control plane
//! stores for its state hash to equal the control plane's (and a v2 data plane's); Kong data
//! planes honour `enabled = false` themselves.
//!
//! [`unflatten`] and [`deltas`] turn a config table back into the entities the control plane
//! stores: foreign keys as `{"id": …}` (from the schema's foreign keys), `ws_id` moved out of
//! the entity.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::hash::{Canon, EMPTY_HASH, GROUPS, Hashes, combine};
use crate::proto::Delta;
use crate::schema::Registry;

/// Replaces each single foreign key `{"id": x}` of an entity of `entity_type` by `x`.
pub fn flatten(registry: &Registry, entity_type: &str, entity: &mut Map<String, Value>) {
    for fk in registry.references_of(entity_type) {
        if fk.is_array {
            continue;
        }
        if let Some(slot) = entity.get_mut(&fk.field)
            && let Some(id) = slot.get("id").and_then(Value::as_str)
        {
            *slot = Value::String(id.to_owned());
        }
    }
}

/// The inverse of [`flatten`]: a bare id becomes `{"id": x}`.
pub fn unflatten(registry: &Registry, entity_type: &str, entity: &mut Map<String, Value>) {
    for fk in registry.references_of(entity_type) {
        if fk.is_array {
            continue;
        }
        if let Some(slot) = entity.get_mut(&fk.field)
            && let Value::String(id) = slot
        {
            let id = std::mem::take(id);
            *slot = serde_json::json!({ "id": id });
        }
    }
}

/// An exported configuration: the `config_table` JSON text and its Kong hashes.
#[derive(Debug)]
pub struct Export {
    pub config_hash: String,
    pub hashes: Hashes,
    /// `config_table` as JSON text.
    pub table: Vec<u8>,
    pub n_entities: usize,
    /// Nothing but workspaces: a Kong data plane stores the 32-zero hash for it.
    pub only_workspaces: bool,
}

/// The entities of one type, serialised back to back.
#[derive(Default)]
struct TypeBuf {
    /// `e1,e2,…`
    text: Vec<u8>,
    /// Where each entity ends in `text`.
    ends: Vec<usize>,
    /// Group types are hashed as they arrive (each group has its own buffer in Kong).
    canon: Option<Canon>,
}

/// Builds an [`Export`] from entities pushed type by type (any type order; entities of a type
/// in the order they are to appear).
#[derive(Default)]
pub struct ExportBuilder {
    types: BTreeMap<String, TypeBuf>,
    n_entities: usize,
    n_workspaces: usize,
}

impl ExportBuilder {
    pub fn new() -> ExportBuilder {
        ExportBuilder::default()
    }

    /// Adds one stored entity (as the control plane stores it: no `ws_id`, foreign keys as
    /// objects).
    pub fn push(&mut self, registry: &Registry, entity_type: &str, ws_id: &str, entity: Value) {
        let Value::Object(mut map) = entity else {
            return;
        };
        flatten(registry, entity_type, &mut map);
        let workspaceable = registry
            .get(entity_type)
            .is_none_or(|schema| schema.workspaceable);
        if workspaceable {
            map.insert("ws_id".into(), Value::String(ws_id.to_owned()));
        }
        let entity = Value::Object(map);
        let buf = self.types.entry(entity_type.to_owned()).or_default();
        let i = buf.ends.len();
        if GROUPS.contains(&entity_type) {
            let canon = buf.canon.get_or_insert_with(|| {
                let mut c = Canon::new();
                c.begin_value();
                c
            });
            canon.element(i, &entity);
        }
        if i > 0 {
            buf.text.push(b',');
        }
        serde_json::to_writer(&mut buf.text, &entity).expect("a JSON value serialises");
        buf.ends.push(buf.text.len());
        self.n_entities += 1;
        if entity_type == "workspaces" {
            self.n_workspaces += 1;
        }
    }

    pub fn finish(mut self) -> Export {
        let groups = GROUPS.map(|g| match self.types.get_mut(g) {
            Some(buf) => {
                let mut canon = buf.canon.take().expect("group types are hashed");
                canon.end_array(buf.ends.len());
                canon.finish()
            }
            None => EMPTY_HASH.to_owned(),
        });
        // The rest: `_format_version`, `_transform` and the other types, keys in byte order
        // (the BTreeMap's order, `_` sorting before lowercase letters).
        let mut rest = Canon::new();
        rest.begin_value();
        rest.key("_format_version");
        rest.value(&Value::String("3.0".into()));
        rest.put(b";");
        rest.key("_transform");
        rest.value(&Value::Bool(false));
        rest.put(b";");
        for (ty, buf) in &self.types {
            if GROUPS.contains(&ty.as_str()) {
                continue;
            }
            rest.key(ty);
            rest.begin_value();
            let mut start = 0;
            for (i, &end) in buf.ends.iter().enumerate() {
                let entity: Value =
                    serde_json::from_slice(&buf.text[start..end]).expect("serialised above");
                rest.element(i, &entity);
                start = end + 1;
            }
            rest.end_array(buf.ends.len());
            rest.put(b";");
        }
        let rest = rest.finish();
        let config_hash = combine(&groups, &rest);

        let size: usize = self.types.values().map(|b| b.text.len() + 64).sum();
        let mut table = Vec::with_capacity(size + 64);
        table.extend_from_slice(br#"{"_format_version":"3.0","_transform":false"#);
        for (ty, buf) in &self.types {
            table.push(b',');
            serde_json::to_writer(&mut table, ty).expect("a string serialises");
            table.extend_from_slice(b":[");
            table.extend_from_slice(&buf.text);
            table.push(b']');
        }
        table.push(b'}');
        Export {
            hashes: Hashes::new(config_hash.clone(), groups),
            config_hash,
            table,
            n_entities: self.n_entities,
            only_workspaces: self.n_entities == self.n_workspaces,
        }
    }
}

/// The entities of a config table as full-sync deltas at `version`, parents first (registry
/// order): foreign keys unflattened, `ws_id` taken out of the entity (a workspace is its own;
/// an entity without one is in the workspace named `default`). Keys starting with `_` are
/// metadata; any other key must be a known entity type.
pub fn deltas(
    registry: &Registry,
    mut table: Map<String, Value>,
    version: i64,
) -> Result<Vec<Delta>, String> {
    for key in table.keys() {
        if !key.starts_with('_') && registry.get(key).is_none() {
            let empty = table[key].as_array().is_some_and(Vec::is_empty)
                || table[key].as_object().is_some_and(Map::is_empty);
            if !empty {
                return Err(format!("unknown entity type '{key}' in config_table"));
            }
        }
    }
    let default_ws = table
        .get("workspaces")
        .and_then(Value::as_array)
        .and_then(|ws| {
            ws.iter()
                .find(|w| w.get("name").and_then(Value::as_str) == Some("default"))
        })
        .and_then(|w| w.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let mut out = Vec::new();
    for schema in registry.entities() {
        let Some(items) = table.remove(&schema.name) else {
            continue;
        };
        let items = match items {
            Value::Array(items) => items,
            // Lua's cjson writes an empty table as {}.
            Value::Object(m) if m.is_empty() => continue,
            _ => return Err(format!("config_table.{} must be an array", schema.name)),
        };
        for item in items {
            let Value::Object(mut entity) = item else {
                return Err(format!(
                    "config_table.{}: an entity must be an object",
                    schema.name
                ));
            };
            let id = match entity.get(&schema.primary_key) {
                Some(Value::String(id)) => id.clone(),
                _ => {
                    return Err(format!(
                        "config_table.{}: an entity has no '{}'",
                        schema.name, schema.primary_key
                    ));
                }
            };
            let ws = entity.remove("ws_id");
            let ws_id = if !schema.workspaceable {
                id.clone()
            } else {
                match ws {
                    Some(Value::String(ws)) => ws,
                    _ => default_ws.clone().ok_or_else(|| {
                        format!("{} {id}: no ws_id and no default workspace", schema.name)
                    })?,
                }
            };
            unflatten(registry, &schema.name, &mut entity);
            out.push(Delta {
                entity_type: schema.name.clone(),
                id,
                ws_id,
                version,
                entity: Some(Value::Object(entity)),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::hash::config_hash;
    use serde_json::json;

    fn sample() -> Vec<(&'static str, &'static str, Value)> {
        let ws = "11111111-1111-4111-8111-111111111111";
        vec![
            (
                "workspaces",
                ws,
                json!({"id": ws, "name": "default", "comment": null}),
            ),
            (
                "services",
                ws,
                json!({"id": "s1", "name": "svc", "host": "example.com", "enabled": false,
                                    "client_certificate": null, "ca_certificates": ["c1", "c2"]}),
            ),
            (
                "routes",
                ws,
                json!({"id": "r1", "paths": ["/a", "/b", "/c", "/d", "/e", "/f"],
                                  "service": {"id": "s1"}}),
            ),
            (
                "routes",
                ws,
                json!({"id": "r2", "paths": ["/x"], "service": null}),
            ),
            (
                "plugins",
                ws,
                json!({"id": "p1", "name": "key-auth", "enabled": false,
                                   "route": {"id": "r1"}, "service": null, "consumer": null,
                                   "config": {"key_names": ["apikey"]}}),
            ),
            ("consumers", ws, json!({"id": "c1", "username": "alice"})),
        ]
    }

    #[test]
    fn the_streamed_hash_equals_kongs_over_the_whole_table() {
        let r = Registry::builtin();
        let mut b = ExportBuilder::new();
        for (ty, ws, e) in sample() {
            b.push(r, ty, ws, e);
        }
        let export = b.finish();
        let table: Value = serde_json::from_slice(&export.table).unwrap();
        let (h, hashes) = config_hash(&table);
        assert_eq!(export.config_hash, h);
        assert_eq!(export.hashes, hashes.unwrap());
        assert_eq!(table["_format_version"], "3.0");
        assert_eq!(table["_transform"], false);
        // Flattened as Kong's v1 export, ws_id on workspaceable entities only; arrays of ids
        // (services.ca_certificates) stay as they are.
        assert_eq!(table["routes"][0]["service"], "s1");
        assert_eq!(table["routes"][1]["service"], Value::Null);
        assert_eq!(table["plugins"][0]["route"], "r1");
        assert_eq!(table["services"][0]["ca_certificates"], json!(["c1", "c2"]));
        assert!(table["workspaces"][0].get("ws_id").is_none());
        assert!(table["routes"][0]["ws_id"].is_string());
        // Disabled entities are exported (a deliberate deviation from Kong).
        assert_eq!(table["services"][0]["enabled"], false);
        assert_eq!(table["plugins"].as_array().unwrap().len(), 1);
        assert!(!export.only_workspaces);
        assert_eq!(export.n_entities, 6);
    }

    #[test]
    fn a_large_table_hashes_the_same_streamed_or_whole() {
        // Past 1 MB, where Kong's buffer collapses, in a group and in the rest.
        let r = Registry::builtin();
        let ws = "11111111-1111-4111-8111-111111111111";
        let pad = "x".repeat(200);
        let mut b = ExportBuilder::new();
        for i in 0..6000 {
            let id = format!("{i:08}-0000-4000-8000-000000000000");
            b.push(r, "consumers", ws, json!({"id": id, "username": format!("user-{i}-{pad}"), "custom_id": null, "tags": ["a", "b"]}));
            b.push(r, "services", ws, json!({"id": id, "name": format!("svc-{i}"), "host": pad, "port": 80, "retries": 5, "enabled": true}));
        }
        let export = b.finish();
        assert!(export.table.len() > 3_000_000);
        let table: Value = serde_json::from_slice(&export.table).unwrap();
        assert_eq!(export.config_hash, config_hash(&table).0);
    }

    #[test]
    fn deltas_give_back_the_stored_entities() {
        let r = Registry::builtin();
        let mut b = ExportBuilder::new();
        let stored = sample();
        for (ty, ws, e) in stored.clone() {
            b.push(r, ty, ws, e);
        }
        let table: Value = serde_json::from_slice(&b.finish().table).unwrap();
        let Value::Object(table) = table else {
            panic!()
        };
        let deltas = deltas(r, table, 7).unwrap();
        assert_eq!(deltas.len(), stored.len());
        // Parents first.
        assert_eq!(deltas[0].entity_type, "workspaces");
        for (ty, ws, e) in stored {
            let id = e["id"].as_str().unwrap();
            let d = deltas
                .iter()
                .find(|d| d.entity_type == ty && d.id == id)
                .unwrap();
            assert_eq!(d.entity.as_ref(), Some(&e), "{ty} {id}");
            let expect_ws = if ty == "workspaces" { id } else { ws };
            assert_eq!(d.ws_id, expect_ws);
            assert_eq!(d.version, 7);
        }
    }

    #[test]
    fn deltas_fall_back_to_the_default_workspace_and_refuse_unknown_types() {
        let r = Registry::builtin();
        let table = json!({
            "_format_version": "3.0",
            "workspaces": [{"id": "w1", "name": "default"}],
            "services": [{"id": "s1", "host": "h"}],
            "routes": {},
        });
        let Value::Object(t) = table else { panic!() };
        let d = deltas(r, t, 1).unwrap();
        assert_eq!(d[1].ws_id, "w1");
        let Value::Object(t) = json!({"frobs": [{"id": "x"}]}) else {
            panic!()
        };
        assert!(deltas(r, t, 1).unwrap_err().contains("frobs"));
    }

    #[test]
    fn only_workspaces_is_noticed() {
        let r = Registry::builtin();
        let mut b = ExportBuilder::new();
        b.push(r, "workspaces", "w", json!({"id": "w", "name": "default"}));
        assert!(b.finish().only_workspaces);
    }
}
