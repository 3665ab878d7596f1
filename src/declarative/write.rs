//! The writer: stored entities as a file.
//!
//! Flat is Kong's `kong config db_export` (`kong/db/declarative/export.lua`,
//! `export_from_db_impl`): `_format_version: "3.0"`, `_transform: false`, workspaces left out
//! (`skip_ws`), entity types in dependency order, each entity with every field (nulls too:
//! Kong exports with `nulls = true`) and its foreign keys as bare ids; entities of a type by
//! id (Kong pages by primary key). No `ws_id`: everything is in the default workspace.
//!
//! Nested is decK's shape: an entity whose only foreign key names an entity of the output
//! that may nest it is written under its parent, in an array named after its type, without
//! the back-reference; anything else stays at the top level (a plugin on a service and a
//! consumer, say). The reader takes children nested through any foreign key (as Kong); the
//! writer nests only through a "belongs to" key, one named after its parent type
//! (`routes.service`, `snis.certificate`, `targets.upstream`), not through a key that names
//! a role (`services.client_certificate`), which is decK's choice expressed generically.

use std::collections::HashMap;

use serde_json::Value;

use super::read::Types;
use super::syntax;
use super::{OutputFormat, WriteOptions};
use crate::proto::v1::export::flatten;
use crate::schema::Registry;

pub(crate) fn write<'a>(
    registry: &Registry,
    entities: impl IntoIterator<Item = (&'a str, &'a Value)>,
    options: WriteOptions,
) -> String {
    let types = Types::new(registry);
    let mut per_type: Vec<Vec<&'a Value>> = vec![Vec::new(); types.list.len()];
    for (ty, entity) in entities {
        if let Some(&i) = types.by_name.get(ty) {
            per_type[i].push(entity);
        }
    }
    for list in &mut per_type {
        list.sort_by(|a, b| id_of(a).cmp(id_of(b)));
    }
    let sections: Vec<(usize, Vec<Value>)> = if options.nested {
        nested(registry, &types, &per_type)
    } else {
        per_type
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.is_empty())
            .map(|(ty, list)| {
                let name = types.list[ty].name.as_str();
                let out = list
                    .iter()
                    .map(|e| export_entity(registry, name, e))
                    .collect();
                (ty, out)
            })
            .collect()
    };
    match options.format {
        OutputFormat::Yaml => {
            let mut out = String::from("_format_version: \"3.0\"\n_transform: false\n");
            for (ty, list) in &sections {
                syntax::emit_string(&mut out, &types.list[*ty].name);
                out.push_str(":\n");
                syntax::emit_seq(&mut out, list, 0);
            }
            out
        }
        OutputFormat::Json => {
            let mut out =
                String::from("{\n  \"_format_version\": \"3.0\",\n  \"_transform\": false");
            for (ty, list) in &sections {
                out.push_str(",\n  ");
                out.push_str(
                    &serde_json::to_string(&types.list[*ty].name).expect("a string serialises"),
                );
                out.push_str(": ");
                let text = serde_json::to_string_pretty(list).expect("a JSON value serialises");
                // JSON text has no raw newline inside strings: lines can be re-indented.
                out.push_str(&text.replace('\n', "\n  "));
            }
            out.push_str("\n}\n");
            out
        }
    }
}

fn id_of(v: &Value) -> &str {
    v.get("id").and_then(Value::as_str).unwrap_or("")
}

/// The entity as a file gives it: foreign keys as bare ids, no `ws_id`.
fn export_entity(registry: &Registry, entity_type: &str, entity: &Value) -> Value {
    let Value::Object(m) = entity else {
        return entity.clone();
    };
    let mut m = m.clone();
    m.remove("ws_id");
    flatten(registry, entity_type, &mut m);
    Value::Object(m)
}

fn nested(
    registry: &Registry,
    types: &Types<'_>,
    per_type: &[Vec<&Value>],
) -> Vec<(usize, Vec<Value>)> {
    // Which entities exist, by (type, id).
    let present: HashMap<(usize, &str), ()> = per_type
        .iter()
        .enumerate()
        .flat_map(|(ty, l)| l.iter().map(move |e| ((ty, id_of(e)), ())))
        .collect();
    // (parent type, parent id) -> [(child type, position in per_type[child type])]
    let mut kids: HashMap<(usize, &str), Vec<(usize, usize)>> = HashMap::new();
    let mut nested_field: HashMap<(usize, usize), &str> = HashMap::new();
    for (ty, list) in per_type.iter().enumerate() {
        let name = types.list[ty].name.as_str();
        for (pos, e) in list.iter().enumerate() {
            let set: Vec<_> = registry
                .references_of(name)
                .filter(|fk| !fk.is_array)
                .filter_map(|fk| {
                    let id = e.get(&fk.field)?.get("id")?.as_str()?;
                    Some((fk, id))
                })
                .collect();
            let [(fk, parent_id)] = set.as_slice() else {
                continue;
            };
            let Some(&pty) = types.by_name.get(fk.parent.as_str()) else {
                continue;
            };
            let nestable = fk.field == super::errors::singular(&fk.parent)
                && types.children[pty]
                    .iter()
                    .any(|(c, f)| *c == ty && *f == fk.field);
            if nestable && present.contains_key(&(pty, *parent_id)) {
                kids.entry((pty, parent_id)).or_default().push((ty, pos));
                nested_field.insert((ty, pos), fk.field.as_str());
            }
        }
    }
    let build = Builder {
        registry,
        types,
        per_type,
        kids: &kids,
        nested_field: &nested_field,
    };
    per_type
        .iter()
        .enumerate()
        .filter_map(|(ty, list)| {
            let top: Vec<Value> = (0..list.len())
                .filter(|pos| !nested_field.contains_key(&(ty, *pos)))
                .map(|pos| build.entity(ty, pos))
                .collect();
            (!top.is_empty()).then_some((ty, top))
        })
        .collect()
}

struct Builder<'b, 'r> {
    registry: &'b Registry,
    types: &'b Types<'r>,
    per_type: &'b [Vec<&'b Value>],
    kids: &'b HashMap<(usize, &'b str), Vec<(usize, usize)>>,
    nested_field: &'b HashMap<(usize, usize), &'b str>,
}

impl Builder<'_, '_> {
    fn entity(&self, ty: usize, pos: usize) -> Value {
        let e = self.per_type[ty][pos];
        let name = self.types.list[ty].name.as_str();
        let mut v = export_entity(self.registry, name, e);
        let Value::Object(m) = &mut v else {
            return v;
        };
        if let Some(field) = self.nested_field.get(&(ty, pos)) {
            m.remove(*field);
        }
        if let Some(children) = self.kids.get(&(ty, id_of(e))) {
            let mut by_type: Vec<(usize, Vec<Value>)> = Vec::new();
            for &(cty, cpos) in children {
                let child = self.entity(cty, cpos);
                match by_type.iter_mut().find(|(t, _)| *t == cty) {
                    Some((_, l)) => l.push(child),
                    None => by_type.push((cty, vec![child])),
                }
            }
            by_type.sort_by_key(|(t, _)| *t);
            for (cty, list) in by_type {
                m.insert(self.types.list[cty].name.clone(), Value::Array(list));
            }
        }
        v
    }
}
