//! Every problem of a file, gathered while reading, in Kong's two shapes
//! (`kong/db/errors.lua`: `declarative_config`, `flatten_errors`).
//!
//! The nested tree (`fields`) follows the file: `{"services": [null, {"host": "…",
//! "routes": [{"paths": […]}]}]}` (arrays by position, `null` where an entity has no error,
//! children inside their parent's entry). An entity's own errors are the registry's field
//! tree; a duplicate is a plain string at its position and unresolved references a list of
//! strings, as Kong's `populate_references` / `validate_references` put them (Kong keys
//! reference errors by the entity's endpoint key or id; deltaplane keeps them at the entity's
//! position so that one tree describes the file); when an entity has several kinds they are
//! merged into its `@entity` list.
//!
//! The flattened list has one entry per entity with errors, nested children's entries
//! lifted out (before their parent's, as Kong's recursion emits them), sections in type-name
//! order as Kong's `drain` sorts them.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value, json};

use super::read::{Item, Types};
use super::syntax::LINE_KEY;
use super::{Error, Invalid};

/// Kong's error code and name for a declarative configuration (`ERRORS.DECLARATIVE_CONFIG`).
pub const CODE: i64 = 14;
pub const NAME: &str = "invalid declarative configuration";

/// One step down the file: the entity type's array and the position in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct PathSeg {
    pub ty: usize,
    pub index: usize,
}

#[derive(Default)]
struct EntityErrs {
    schema: Option<Map<String, Value>>,
    /// Entity-level messages (duplicates).
    messages: Vec<String>,
    references: Vec<String>,
    /// The entity position holds something else than a record.
    replaced: Option<Value>,
}

impl EntityErrs {
    /// The value at the entity's position in the nested tree.
    fn value(&self) -> Value {
        if let Some(v) = &self.replaced {
            return v.clone();
        }
        match (
            &self.schema,
            self.messages.len(),
            self.references.is_empty(),
        ) {
            (None, 1, true) => Value::String(self.messages[0].clone()),
            (None, 0, false) => Value::Array(
                self.references
                    .iter()
                    .map(|r| Value::String(r.clone()))
                    .collect(),
            ),
            _ => {
                let mut m = self.schema.clone().unwrap_or_default();
                let extra: Vec<Value> = self
                    .messages
                    .iter()
                    .chain(&self.references)
                    .map(|s| Value::String(s.clone()))
                    .collect();
                if !extra.is_empty() {
                    let slot = m
                        .entry("@entity")
                        .or_insert_with(|| Value::Array(Vec::new()));
                    match slot {
                        Value::Array(a) => a.extend(extra),
                        other => {
                            let first = other.take();
                            let mut a = vec![first];
                            a.extend(extra);
                            *other = Value::Array(a);
                        }
                    }
                }
                Value::Object(m)
            }
        }
    }
}

/// The problems found so far.
#[derive(Default)]
pub(crate) struct ErrorSet {
    top: Map<String, Value>,
    entities: BTreeMap<Vec<PathSeg>, EntityErrs>,
    /// `(entity path, child type, message)`: a type's array is not an array.
    lists: Vec<(Vec<PathSeg>, usize, Value)>,
    /// Errors on an entity's extra keys (`_comment`), merged into its schema errors.
    count: usize,
}

impl ErrorSet {
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub(crate) fn top(&mut self, key: &str, v: Value) {
        self.count += 1;
        self.top.insert(key.to_owned(), v);
    }

    pub(crate) fn field(&mut self, path: &[PathSeg], key: &str, v: Value) {
        self.count += 1;
        self.entities
            .entry(path.to_vec())
            .or_default()
            .schema
            .get_or_insert_with(Map::new)
            .insert(key.to_owned(), v);
    }

    pub(crate) fn at(&mut self, path: &[PathSeg], v: Value) {
        self.count += 1;
        self.entities.entry(path.to_vec()).or_default().replaced = Some(v);
    }

    pub(crate) fn list_error(&mut self, prefix: &[PathSeg], ty: usize, v: Value) {
        self.count += 1;
        self.lists.push((prefix.to_vec(), ty, v));
    }

    pub(crate) fn entity(&mut self, path: &[PathSeg], msg: String) {
        self.count += 1;
        self.entities
            .entry(path.to_vec())
            .or_default()
            .messages
            .push(msg);
    }

    pub(crate) fn reference(&mut self, path: &[PathSeg], msg: String) {
        self.count += 1;
        self.entities
            .entry(path.to_vec())
            .or_default()
            .references
            .push(msg);
    }

    pub(crate) fn schema(&mut self, path: &[PathSeg], errs: Map<String, Value>) {
        self.count += 1;
        let slot = self.entities.entry(path.to_vec()).or_default();
        match &mut slot.schema {
            Some(m) => m.extend(errs),
            None => slot.schema = Some(errs),
        }
    }

    /// Both shapes. `root` is the file read again (the entities as given, for the flattened
    /// entries' `entity`); the reader consumed the first copy.
    pub(crate) fn finish(
        self,
        types: &Types<'_>,
        items: &[Item<'_>],
        root: Option<Map<String, Value>>,
    ) -> Invalid {
        let mut fields = Value::Object(self.top.clone());
        let mut unflattened = Value::Object(self.top);
        for (prefix, ty, v) in &self.lists {
            insert_list(&mut fields, types, prefix, *ty, v.clone());
            insert_list(&mut unflattened, types, prefix, *ty, v.clone());
        }
        for (path, errs) in &self.entities {
            insert_entity(&mut fields, types, path, errs.value());
            if errs.replaced.is_some() {
                insert_entity(&mut unflattened, types, path, errs.value());
            }
        }

        let lines: HashMap<&[PathSeg], Option<usize>> =
            items.iter().map(|i| (i.path.as_slice(), i.line)).collect();
        let mut order: Vec<&Vec<PathSeg>> = self
            .entities
            .iter()
            .filter(|(_, e)| e.replaced.is_none())
            .map(|(p, _)| p)
            .collect();
        order.sort_by(|a, b| flatten_order(types, a, b));
        let mut flattened = Vec::with_capacity(order.len());
        let mut out_lines = Vec::with_capacity(order.len());
        for path in order {
            let errs = &self.entities[path];
            let ty = path.last().expect("an entity path is not empty").ty;
            let schema = types.list[ty];
            let given = root
                .as_ref()
                .and_then(|r| given_entity(r, types, path))
                .unwrap_or_else(|| Value::Object(Map::new()));
            let mut entry = Map::new();
            if let Some(Value::String(name)) = given.get("name")
                && !name.is_empty()
            {
                entry.insert("entity_name".into(), Value::String(name.clone()));
            }
            if let Some(Value::String(id)) = given.get("id")
                && crate::schema::is_uuid(id)
            {
                entry.insert("entity_id".into(), Value::String(id.clone()));
            }
            if let Some(Value::Array(tags)) = given.get("tags")
                && tags.iter().all(Value::is_string)
            {
                entry.insert("entity_tags".into(), Value::Array(tags.clone()));
            }
            entry.insert("entity_type".into(), singular(&schema.name).into());
            let mut list = Vec::new();
            categorize(&errs.value(), None, &mut list, types);
            entry.insert("entity".into(), given);
            entry.insert("errors".into(), Value::Array(list));
            flattened.push(Value::Object(entry));
            out_lines.push(lines.get(path.as_slice()).copied().flatten());
        }
        Invalid {
            fields,
            flattened,
            lines: out_lines,
            unflattened,
        }
    }
}

/// Kong's `singular`: one trailing `s` off.
pub(crate) fn singular(noun: &str) -> &str {
    noun.strip_suffix('s').unwrap_or(noun)
}

/// Sections by type name, entities by position, a parent after its children.
fn flatten_order(types: &Types<'_>, a: &[PathSeg], b: &[PathSeg]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        let o = types.list[x.ty]
            .name
            .cmp(&types.list[y.ty].name)
            .then(x.index.cmp(&y.index));
        if o != Ordering::Equal {
            return o;
        }
    }
    b.len().cmp(&a.len())
}

/// The entity at `path` in the file as given, without its nested children, with the parent's
/// id as its back-reference when the file gives the parent one (Kong's `add_entity_errors`).
fn given_entity(root: &Map<String, Value>, types: &Types<'_>, path: &[PathSeg]) -> Option<Value> {
    let mut node = root;
    let mut parent_id: Option<&str> = None;
    let mut parent_field: Option<&str> = None;
    let mut found: Option<&Map<String, Value>> = None;
    for (depth, seg) in path.iter().enumerate() {
        let list = node.get(types.list[seg.ty].name.as_str())?.as_array()?;
        let entity = list.get(seg.index)?.as_object()?;
        if depth + 1 < path.len() {
            parent_id = entity
                .get("id")
                .and_then(Value::as_str)
                .filter(|id| crate::schema::is_uuid(id));
            let child = path[depth + 1].ty;
            parent_field = types.children[seg.ty]
                .iter()
                .find(|(c, _)| *c == child)
                .map(|(_, f)| *f);
        }
        node = entity;
        found = Some(entity);
    }
    let entity = found?;
    let ty = path.last()?.ty;
    let mut out = Map::new();
    for (k, v) in entity {
        if k == LINE_KEY
            || types.children[ty]
                .iter()
                .any(|(c, _)| types.list[*c].name == *k)
        {
            continue;
        }
        out.insert(k.clone(), v.clone());
    }
    if let (Some(id), Some(field)) = (parent_id, parent_field)
        && !out.contains_key(field)
    {
        out.insert(field.to_owned(), json!({ "id": id }));
    }
    Some(Value::Object(out))
}

/// Kong's `categorize_errors` over an entity's error value (children excluded: they have
/// their own entries).
fn categorize(err: &Value, ns: Option<&str>, out: &mut Vec<Value>, types: &Types<'_>) {
    let join = |k: &str| match ns {
        Some(ns) if !ns.is_empty() => format!("{ns}.{k}"),
        _ => k.to_owned(),
    };
    match err {
        Value::String(s) if ns.is_none() => out.push(json!({"type": "entity", "message": s})),
        Value::Array(a) if ns.is_none() && a.iter().all(Value::is_string) => {
            for s in a {
                out.push(json!({"type": "entity", "message": s}));
            }
        }
        Value::Object(m) => {
            for (k, v) in m {
                if k == "@entity" {
                    entity_messages(v, out);
                } else {
                    field_errors(&join(k), v, out, types);
                }
            }
        }
        other => out.push(json!({"type": "entity", "message": other.to_string()})),
    }
}

fn entity_messages(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(a) => {
            for m in a {
                entity_messages(m, out);
            }
        }
        Value::String(s) => out.push(json!({"type": "entity", "message": s})),
        Value::Null => {}
        other => out.push(json!({"type": "entity", "message": other.to_string()})),
    }
}

fn field_errors(field: &str, v: &Value, out: &mut Vec<Value>, types: &Types<'_>) {
    match v {
        Value::String(s) => out.push(json!({"type": "field", "field": field, "message": s})),
        Value::Object(_) => categorize(v, Some(field), out, types),
        Value::Array(a) => {
            // A Lua array: its positions are 1-based keys.
            for (i, e) in a.iter().enumerate() {
                if e.is_null() {
                    continue;
                }
                field_errors(&format!("{field}.{}", i + 1), e, out, types);
            }
        }
        Value::Null => {}
        other => out.push(json!({"type": "field", "field": field, "message": other.to_string()})),
    }
}

/// The object at `path` in the tree, created as needed.
fn node_at<'v>(
    tree: &'v mut Value,
    types: &Types<'_>,
    path: &[PathSeg],
) -> &'v mut Map<String, Value> {
    let mut node = tree;
    for seg in path {
        let obj = as_object(node);
        let list = obj
            .entry(types.list[seg.ty].name.clone())
            .or_insert_with(|| Value::Array(Vec::new()));
        if !list.is_array() {
            *list = Value::Array(Vec::new());
        }
        let arr = list.as_array_mut().expect("made an array");
        while arr.len() <= seg.index {
            arr.push(Value::Null);
        }
        node = &mut arr[seg.index];
    }
    as_object(node)
}

/// `v` as an object: null becomes `{}`, a message becomes `{"@entity": [...]}`.
fn as_object(v: &mut Value) -> &mut Map<String, Value> {
    match v {
        Value::Object(_) => {}
        Value::Null => *v = Value::Object(Map::new()),
        Value::String(_) => {
            let s = v.take();
            *v = json!({ "@entity": [s] });
        }
        Value::Array(_) => {
            let a = v.take();
            *v = json!({ "@entity": a });
        }
        _ => *v = Value::Object(Map::new()),
    }
    v.as_object_mut().expect("made an object")
}

fn insert_entity(tree: &mut Value, types: &Types<'_>, path: &[PathSeg], v: Value) {
    let (last, parent) = path.split_last().expect("an entity path is not empty");
    let node = node_at(tree, types, parent);
    let list = node
        .entry(types.list[last.ty].name.clone())
        .or_insert_with(|| Value::Array(Vec::new()));
    if !list.is_array() {
        return; // the list itself is in error
    }
    let arr = list.as_array_mut().expect("checked");
    while arr.len() <= last.index {
        arr.push(Value::Null);
    }
    match (&mut arr[last.index], v) {
        (Value::Object(existing), Value::Object(new)) => {
            for (k, v) in new {
                existing.insert(k, v);
            }
        }
        (Value::Object(existing), mut other) => {
            // Children were recorded first; keep them, the entity's own problem beside.
            for (k, v) in std::mem::take(as_object(&mut other)) {
                existing.insert(k, v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn insert_list(tree: &mut Value, types: &Types<'_>, prefix: &[PathSeg], ty: usize, v: Value) {
    let node = node_at(tree, types, prefix);
    node.insert(types.list[ty].name.clone(), v);
}

/// The body of Kong's error for a file, as `/config` answers it.
pub(crate) fn kong_body(err: &Error, flatten: bool) -> Value {
    match err {
        Error::Syntax {
            message,
            line,
            column,
        } => {
            let text = match (line, column) {
                (Some(l), Some(c)) => format!("{message} (line {l}, column {c})"),
                (Some(l), None) => format!("{message} (line {l})"),
                _ => message.clone(),
            };
            let fields = json!({ "error": text });
            json!({
                "code": CODE,
                "name": NAME,
                "message": format!("declarative config is invalid: {}", lua_pretty(&fields)),
                "fields": fields,
            })
        }
        Error::Invalid(inv) => {
            if flatten {
                json!({
                    "code": CODE,
                    "name": NAME,
                    "message": format!(
                        "declarative config is invalid: {}",
                        lua_pretty(&inv.unflattened)
                    ),
                    "fields": inv.unflattened,
                    "flattened_errors": inv.flattened,
                })
            } else {
                json!({
                    "code": CODE,
                    "name": NAME,
                    "message": format!(
                        "declarative config is invalid: {}",
                        lua_pretty(&inv.fields)
                    ),
                    "fields": inv.fields,
                })
            }
        }
    }
}

/// A compact rendering in the style of Penlight's `pretty.write(t, "")`, as Kong's message
/// embeds the error table: `{services={{host="required field missing"}}}`.
pub(crate) fn lua_pretty(v: &Value) -> String {
    let mut out = String::new();
    pretty(v, &mut out);
    out
}

fn pretty(v: &Value, out: &mut String) {
    match v {
        Value::Null => out.push_str("nil"),
        Value::Bool(b) => out.push_str(&b.to_string()),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => out.push_str(&serde_json::to_string(s).expect("a string serialises")),
        Value::Array(a) => {
            out.push('{');
            let dense = a.iter().all(|e| !e.is_null());
            let mut first = true;
            for (i, e) in a.iter().enumerate() {
                if e.is_null() {
                    continue;
                }
                if !first {
                    out.push(',');
                }
                first = false;
                if !dense {
                    out.push_str(&format!("[{}]=", i + 1));
                }
                pretty(e, out);
            }
            out.push('}');
        }
        Value::Object(m) => {
            out.push('{');
            let mut first = true;
            for (k, e) in m {
                if !first {
                    out.push(',');
                }
                first = false;
                let ident = k
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if ident {
                    out.push_str(k);
                } else {
                    out.push_str(&format!(
                        "[{}]",
                        serde_json::to_string(k).expect("a string serialises")
                    ));
                }
                out.push('=');
                pretty(e, out);
            }
            out.push('}');
        }
    }
}

/// One line per problem, for the command line.
pub(crate) fn display(inv: &Invalid, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
    writeln!(f, "declarative config is invalid:")?;
    let mut rest = Vec::new();
    leaf_messages(&inv.unflattened, String::new(), &mut rest);
    for (path, msg) in rest {
        writeln!(f, "  {path}: {msg}")?;
    }
    for (entry, line) in inv.flattened.iter().zip(&inv.lines) {
        let ty = entry["entity_type"].as_str().unwrap_or("entity");
        let who = entry
            .get("entity_name")
            .or_else(|| entry.get("entity_id"))
            .and_then(Value::as_str)
            .map(|n| format!(" '{n}'"))
            .unwrap_or_default();
        let at = line.map(|l| format!("line {l}: ")).unwrap_or_default();
        for e in entry["errors"].as_array().into_iter().flatten() {
            let msg = e["message"].as_str().unwrap_or_default();
            match e.get("field").and_then(Value::as_str) {
                Some(field) => writeln!(f, "  {at}{ty}{who}: {field}: {msg}")?,
                None => writeln!(f, "  {at}{ty}{who}: {msg}")?,
            }
        }
    }
    Ok(())
}

fn leaf_messages(v: &Value, path: String, out: &mut Vec<(String, String)>) {
    let join = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, e) in m {
                leaf_messages(e, join(k), out);
            }
        }
        Value::Array(a) => {
            for (i, e) in a.iter().enumerate() {
                leaf_messages(e, join(&(i + 1).to_string()), out);
            }
        }
        Value::Null => {}
        Value::String(s) => out.push((path, s.clone())),
        other => out.push((path, other.to_string())),
    }
}
