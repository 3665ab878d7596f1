//! The reader: a parsed file's tree into validated entities, or every problem at once.
//!
//! Kong's `DeclarativeConfig.flatten` (`kong/db/schema/others/declarative_config.lua`) in
//! passes over one tree that is consumed as it goes (entities are moved out of it, never
//! copied):
//! 1. the top-level keys (`_format_version`, `_transform`, `_comment`, `_ignore`, decK's
//!    keys, one array per entity type);
//! 2. a walk that lifts nested children out of their parents (the nesting comes from the
//!    registry's foreign keys, as Kong's `foreign_children`), gives every entity its id
//!    (`ids.rs`) parents first, and migrates 1.1/2.1 regex paths;
//! 3. uniqueness of endpoint keys and ids within the file (`populate_references`);
//! 4. foreign keys by id or endpoint key, resolved within the file (`validate_references`);
//! 5. each entity through the registry (`Registry::prepare_with`), then the other unique
//!    fields across the file.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::{Map, Value};

use super::errors::{ErrorSet, PathSeg};
use super::ids::{self, ContentIds, ParentRef};
use super::syntax::{self, LINE_KEY};
use super::{Config, Entity, Error, FormatVersion, ParseOptions};
use crate::schema::{EntitySchema, Mode, Registry, WORKSPACES};

/// Where a foreign key that did not resolve points meanwhile (its error is reported).
const UNRESOLVED: &str = "00000000-0000-0000-0000-000000000000";

pub(crate) struct Item<'r> {
    pub ty: usize,
    /// `(type, index)` pairs from the top of the file down to this entity.
    pub path: Vec<PathSeg>,
    pub line: Option<usize>,
    /// The entity's fields as the file gives them (children lifted out, id given), as JSON
    /// text: a large file's items are all held until every reference is resolved, and a tree
    /// per item would be several times the file.
    pub input: Box<str>,
    /// The value of its unique endpoint key, when the file gives one as a string.
    pub key: Option<String>,
    /// The parent item and this child's back-reference field, for a nested child.
    pub parent: Option<(usize, &'r str)>,
    pub id: String,
}

impl Item<'_> {
    /// The fields as the file gives them.
    fn input(&self) -> Map<String, Value> {
        serde_json::from_str(&self.input).expect("an item's input is JSON written by the reader")
    }
}

/// The entity types a file may declare, in registry order, and how they nest.
pub(crate) struct Types<'r> {
    pub list: Vec<&'r Arc<EntitySchema>>,
    pub by_name: HashMap<&'r str, usize>,
    /// Per type: `(child type, back-reference field)` of the children that may nest in it.
    pub children: Vec<Vec<(usize, &'r str)>>,
}

impl<'r> Types<'r> {
    pub(crate) fn new(registry: &'r Registry) -> Types<'r> {
        let list: Vec<_> = registry
            .entities()
            .filter(|s| s.name != WORKSPACES)
            .collect();
        let by_name: HashMap<&str, usize> = list
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let children = list
            .iter()
            .map(|parent| {
                let mut kids: Vec<(usize, &str)> = Vec::new();
                for fk in registry.referencing(&parent.name) {
                    if fk.is_array {
                        continue;
                    }
                    // Kong: a parent's own (non-transient) field of that name wins.
                    if parent.field(&fk.child).is_some()
                        && !parent.transient_fields.iter().any(|t| t == &fk.child)
                    {
                        continue;
                    }
                    let Some(&child) = by_name.get(fk.child.as_str()) else {
                        continue;
                    };
                    if !kids.iter().any(|(c, _)| *c == child) {
                        kids.push((child, fk.field.as_str()));
                    }
                }
                kids.sort_by_key(|(c, _)| *c);
                kids
            })
            .collect();
        Types {
            list,
            by_name,
            children,
        }
    }

    pub(crate) fn names(&self) -> HashSet<&'r str> {
        self.by_name.keys().copied().collect()
    }
}

pub(crate) fn parse(
    registry: &Registry,
    text: &[u8],
    options: &ParseOptions,
) -> Result<Config, Error> {
    let types = Types::new(registry);
    let mut reader = Reader {
        registry,
        types: &types,
        errors: ErrorSet::default(),
        items: Vec::new(),
        content_ids: ContentIds::default(),
        format_version: FormatVersion::V3_0,
        select_tags: Vec::new(),
        by_id: HashMap::new(),
        by_key: HashMap::new(),
        listed: vec![0; types.list.len()],
    };
    // The entities are walked as the file is read; what is left of the tree is its
    // top-level keys.
    let root = root_object(syntax::load_streaming(
        utf8(text)?,
        &types.names(),
        &mut reader,
    )?)?;
    let (transform, select_tags) = reader.top_level(root);
    reader.order_items();
    reader.index();
    reader.references();
    // The indexes of the file's keys are done with: freed before the entities are written.
    reader.by_id = HashMap::new();
    reader.by_key = HashMap::new();
    let entities = reader.prepare(options.now, transform);
    if !reader.errors.is_empty() {
        let root = load_root(text, &types).ok();
        return Err(Error::Invalid(reader.errors.finish(
            &types,
            &reader.items,
            root,
        )));
    }
    Ok(Config {
        format_version: reader.format_version,
        transform,
        select_tags,
        entities,
    })
}

pub(crate) fn load_root(text: &[u8], types: &Types<'_>) -> Result<Map<String, Value>, Error> {
    root_object(syntax::load(utf8(text)?, &types.names())?)
}

fn utf8(text: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(text).map_err(|e| Error::Syntax {
        message: format!("failed parsing declarative configuration: invalid UTF-8 ({e})"),
        line: None,
        column: None,
    })
}

fn root_object(root: Value) -> Result<Map<String, Value>, Error> {
    match root {
        Value::Object(m) => Ok(m),
        _ => Err(Error::Syntax {
            message: "failed parsing declarative configuration: expected an object".into(),
            line: None,
            column: None,
        }),
    }
}

struct Reader<'r, 't> {
    registry: &'r Registry,
    types: &'t Types<'r>,
    errors: ErrorSet,
    items: Vec<Item<'r>>,
    content_ids: ContentIds,
    format_version: FormatVersion,
    select_tags: Vec<String>,
    /// `(type, id)` and `(type, endpoint key value)` to the item.
    by_id: HashMap<(usize, String), usize>,
    by_key: HashMap<(usize, String), usize>,
    /// Per type, how many elements its top-level list has had so far.
    listed: Vec<usize>,
}

/// The file's entities arrive here while it is read (`syntax::load_streaming`).
impl syntax::Sink for Reader<'_, '_> {
    fn format_version(&mut self, v: Option<&Value>) {
        // Only what the walk needs (the route path migration); `top_level` checks the value.
        self.format_version = match v.and_then(Value::as_str) {
            Some("1.1") => FormatVersion::V1_1,
            Some("2.1") => FormatVersion::V2_1,
            _ => FormatVersion::V3_0,
        };
    }

    fn entity(&mut self, key: &str, v: Value) {
        let Some(&ty) = self.types.by_name.get(key) else {
            return;
        };
        let index = self.listed[ty];
        self.listed[ty] += 1;
        self.walk_item(ty, v, vec![PathSeg { ty, index }], None);
    }

    fn reset(&mut self) {
        self.errors = ErrorSet::default();
        self.items.clear();
        self.content_ids = ContentIds::default();
        self.format_version = FormatVersion::V3_0;
        self.listed.iter_mut().for_each(|n| *n = 0);
    }
}

impl<'r> Reader<'r, '_> {
    /// The top-level keys; walks every entity array. Returns `_transform` and decK's
    /// select tags.
    fn top_level(&mut self, mut root: Map<String, Value>) -> (bool, Vec<String>) {
        match root.remove("_format_version") {
            None | Some(Value::Null) => self
                .errors
                .top("_format_version", "required field missing".into()),
            Some(Value::String(v)) => match v.as_str() {
                "1.1" => self.format_version = FormatVersion::V1_1,
                "2.1" => self.format_version = FormatVersion::V2_1,
                "3.0" => self.format_version = FormatVersion::V3_0,
                _ => self
                    .errors
                    .top("_format_version", "expected one of: 1.1, 2.1, 3.0".into()),
            },
            Some(_) => self
                .errors
                .top("_format_version", "expected a string".into()),
        }
        let transform = match root.remove("_transform") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => b,
            Some(_) => {
                self.errors.top("_transform", "expected a boolean".into());
                true
            }
        };
        self.extras(&mut root, None);

        // decK's keys.
        match root.remove("_workspace") {
            None | Some(Value::Null) => {}
            Some(Value::String(ws)) if ws == "default" => {}
            Some(Value::String(ws)) => self.errors.top(
                "_workspace",
                format!(
                    "workspace '{ws}' cannot be configured: deltaplane serves the default \
                     workspace only"
                )
                .into(),
            ),
            Some(_) => self.errors.top("_workspace", "expected a string".into()),
        }
        let mut select_tags = Vec::new();
        match root.remove("_info") {
            None | Some(Value::Null) => {}
            Some(Value::Object(info)) => {
                let mut errs = Map::new();
                for (k, v) in info {
                    match k.as_str() {
                        "select_tags" => match v {
                            Value::Null => {}
                            Value::Array(tags) if tags.iter().all(Value::is_string) => {
                                for t in tags {
                                    if let Value::String(t) = t
                                        && !select_tags.contains(&t)
                                    {
                                        select_tags.push(t);
                                    }
                                }
                            }
                            _ => {
                                errs.insert(k, "expected an array of strings".into());
                            }
                        },
                        "defaults" => {
                            errs.insert(
                                k,
                                "decK's defaults are not supported: give every field in the \
                                 entities themselves"
                                    .into(),
                            );
                        }
                        "default_lookup_tags" => {
                            errs.insert(
                                k,
                                "decK's default_lookup_tags are not supported: a file must \
                                 declare every entity it references"
                                    .into(),
                            );
                        }
                        _ => {
                            errs.insert(k, "unknown field".into());
                        }
                    }
                }
                if !errs.is_empty() {
                    self.errors.top("_info", Value::Object(errs));
                }
            }
            Some(_) => self.errors.top("_info", "expected a record".into()),
        }
        if root.remove("_plugin_configs").is_some() {
            self.errors.top(
                "_plugin_configs",
                "decK's _plugin_configs are not supported: give each plugin its config".into(),
            );
        }
        if root.remove("_konnect").is_some() {
            self.errors.top(
                "_konnect",
                "decK's _konnect is not supported: this is not a Konnect control plane".into(),
            );
        }
        if root.remove(WORKSPACES).is_some() {
            self.errors.top(
                WORKSPACES,
                "workspaces cannot be declared: deltaplane serves the default workspace only"
                    .into(),
            );
        }

        self.select_tags = select_tags.clone();
        for ty in 0..self.types.list.len() {
            if let Some(list) = root.remove(self.types.list[ty].name.as_str()) {
                self.walk_list(ty, list, &[], None);
            }
        }
        for key in root.keys() {
            self.errors.top(key, "unknown field".into());
        }
        (transform, select_tags)
    }

    /// `_comment` (a string) and `_ignore` (an array) are dropped wherever they are.
    fn extras(&mut self, m: &mut Map<String, Value>, at: Option<&[PathSeg]>) {
        let mut bad = Vec::new();
        match m.remove("_comment") {
            None | Some(Value::Null) | Some(Value::String(_)) => {}
            Some(_) => bad.push(("_comment", "expected a string")),
        }
        match m.remove("_ignore") {
            None | Some(Value::Null) | Some(Value::Array(_)) => {}
            Some(_) => bad.push(("_ignore", "expected an array")),
        }
        for (k, msg) in bad {
            match at {
                None => self.errors.top(k, msg.into()),
                Some(path) => self.errors.field(path, k, msg.into()),
            }
        }
    }

    fn walk_list(
        &mut self,
        ty: usize,
        list: Value,
        prefix: &[PathSeg],
        parent: Option<(usize, &'r str)>,
    ) {
        match list {
            Value::Null => {}
            Value::Array(items) => {
                for (i, v) in items.into_iter().enumerate() {
                    let mut path = prefix.to_vec();
                    path.push(PathSeg { ty, index: i });
                    self.walk_item(ty, v, path, parent);
                }
            }
            _ => self
                .errors
                .list_error(prefix, ty, "expected an array".into()),
        }
    }

    fn walk_item(
        &mut self,
        ty: usize,
        v: Value,
        path: Vec<PathSeg>,
        parent: Option<(usize, &'r str)>,
    ) {
        let Value::Object(mut m) = v else {
            self.errors.at(&path, "expected a record".into());
            return;
        };
        let line = m
            .remove(LINE_KEY)
            .and_then(|l| l.as_u64())
            .map(|l| l as usize);
        self.extras(&mut m, Some(&path));
        let schema = self.types.list[ty];

        // Nested children come out first: the entity's own content is what its id comes from.
        let mut kids = Vec::new();
        for &(child, field) in &self.types.children[ty] {
            if let Some(list) = m.remove(self.types.list[child].name.as_str()) {
                kids.push((child, field, list));
            }
        }

        // Kong's route_path migration (`kong/db/declarative/migrations/route_path.lua`):
        // paths of top-level routes and of routes nested in top-level services, for files
        // of format 1.1 and 2.1. The migration names these two types itself.
        if self.format_version != FormatVersion::V3_0
            && schema.name == "routes"
            && (path.len() == 1
                || (path.len() == 2 && self.types.list[path[0].ty].name == "services"))
            && let Some(Value::Array(paths)) = m.get_mut("paths")
        {
            for p in paths.iter_mut() {
                if let Value::String(s) = p {
                    *s = super::migrate::migrate_path(s);
                }
            }
        }

        let parent_ref = parent.map(|(pi, field)| (self.items[pi].id.clone(), field));
        let id = match m.get("id") {
            Some(Value::String(id)) => id.clone(),
            Some(v) if !v.is_null() => String::new(), // prepare reports the type
            _ => {
                let pr = parent_ref
                    .as_ref()
                    .map(|(id, field)| ParentRef { field, id });
                let uuid = match ids::kong_key(schema, &m, pr) {
                    Some(key) => ids::kong_uuid(&schema.name, &key),
                    None => self.content_ids.id(
                        &schema.name,
                        &m,
                        parent_ref.as_ref().map(|(id, _)| id.as_str()),
                    ),
                };
                let id = uuid.to_string();
                m.insert(schema.primary_key.clone(), Value::String(id.clone()));
                id
            }
        };
        let key = schema
            .endpoint_key
            .as_deref()
            .filter(|ek| schema.field(ek).is_some_and(|f| f.unique))
            .and_then(|ek| m.get(ek))
            .and_then(Value::as_str)
            .map(str::to_owned);
        let input = serde_json::to_string(&m)
            .expect("a JSON value serialises")
            .into_boxed_str();
        drop(m);
        let idx = self.items.len();
        self.items.push(Item {
            ty,
            path,
            line,
            input,
            key,
            parent,
            id,
        });
        for (child, field, list) in kids {
            let path = self.items[idx].path.clone();
            self.walk_list(child, list, &path, Some((idx, field)));
        }
    }

    /// Puts the items in registry order of their top-level lists (file order within one),
    /// as if the lists had been walked in that order: the file's own order of its top-level
    /// keys changes neither the entities' order nor which duplicate is reported.
    fn order_items(&mut self) {
        let top = |item: &Item<'_>| item.path.first().map_or(0, |p| p.ty);
        if self.items.windows(2).all(|w| top(&w[0]) <= top(&w[1])) {
            return;
        }
        let mut order: Vec<usize> = (0..self.items.len()).collect();
        order.sort_by_key(|&i| top(&self.items[i]));
        let mut new_index = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new;
        }
        let mut slots: Vec<Option<Item<'r>>> = std::mem::take(&mut self.items)
            .into_iter()
            .map(Some)
            .collect();
        self.items = order
            .iter()
            .map(|&old| {
                let mut item = slots[old].take().expect("each item is moved once");
                if let Some((parent, _)) = &mut item.parent {
                    *parent = new_index[*parent];
                }
                item
            })
            .collect();
    }

    /// Duplicate endpoint keys and primary keys within the file (`populate_references`).
    fn index(&mut self) {
        use std::collections::hash_map::Entry;
        let mut by_id = std::mem::take(&mut self.by_id);
        let mut by_key = std::mem::take(&mut self.by_key);
        for idx in 0..self.items.len() {
            let item = &self.items[idx];
            let schema = self.types.list[item.ty];
            let mut failed = false;
            if let Some(ek) = schema.endpoint_key.as_deref()
                && let Some(key) = &item.key
            {
                match by_key.entry((item.ty, key.clone())) {
                    Entry::Occupied(_) => {
                        let msg = uniqueness_msg(&schema.name, ek, key);
                        let path = item.path.clone();
                        self.errors.entity(&path, msg);
                        failed = true;
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(idx);
                    }
                }
            }
            let item = &self.items[idx];
            if !item.id.is_empty() {
                match by_id.entry((item.ty, item.id.clone())) {
                    Entry::Occupied(_) => {
                        if !failed {
                            let msg = uniqueness_msg(&schema.name, "primary key", &item.id);
                            let path = item.path.clone();
                            self.errors.entity(&path, msg);
                        }
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(idx);
                    }
                }
            }
        }
        self.by_id = by_id;
        self.by_key = by_key;
    }

    /// Finds the entity of type `ty` a reference names: by endpoint key, then by id
    /// (Kong's `find_entity`); `{"id": …}` or `{"<endpoint key>": …}` objects too.
    fn find(&self, ty: usize, v: &Value) -> Option<usize> {
        let schema = self.types.list[ty];
        match v {
            Value::String(s) => self
                .by_key
                .get(&(ty, s.clone()))
                .or_else(|| self.by_id.get(&(ty, s.clone())))
                .copied(),
            Value::Object(o) => {
                if let Some(Value::String(id)) = o.get(&schema.primary_key) {
                    return self.by_id.get(&(ty, id.clone())).copied();
                }
                match schema.endpoint_key.as_deref().and_then(|ek| o.get(ek)) {
                    Some(Value::String(k)) if o.len() == 1 => {
                        self.by_key.get(&(ty, k.clone())).copied()
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Foreign keys resolved within the file (`validate_references`); a nested child's
    /// back-reference is its parent.
    fn references(&mut self) {
        for idx in 0..self.items.len() {
            let ty = self.items[idx].ty;
            let schema_name = self.types.list[ty].name.as_str();
            let input = self.items[idx].input();
            let mut problems: Vec<String> = Vec::new();
            let mut field_errors: Vec<(String, &str)> = Vec::new();
            let mut resolved: Vec<(String, Value)> = Vec::new();
            for fk in self.registry.references_of(schema_name) {
                let Some(&pty) = self.types.by_name.get(fk.parent.as_str()) else {
                    continue;
                };
                let item = &self.items[idx];
                let given = input.get(&fk.field);
                let from_parent = item
                    .parent
                    .filter(|(_, field)| *field == fk.field)
                    .map(|(pi, _)| self.items[pi].id.clone());
                if fk.is_array {
                    let Some(Value::Array(list)) = given else {
                        continue;
                    };
                    let mut ids = Vec::with_capacity(list.len());
                    for v in list {
                        match self.find(pty, v) {
                            Some(found) => ids.push(Value::String(self.items[found].id.clone())),
                            None => {
                                problems.push(reference_msg(&fk.field, v, &fk.parent));
                                ids.push(v.clone());
                            }
                        }
                    }
                    resolved.push((fk.field.clone(), Value::Array(ids)));
                    continue;
                }
                let pk = self.types.list[pty].primary_key.clone();
                match given {
                    None | Some(Value::Null) => {}
                    // Kong's nested records carry their foreign keys with `eq = null`
                    // (`copy_record`): a nested child names no other entity, not even its
                    // parent (01-validate_spec.lua, "does not accept additional foreign
                    // keys").
                    Some(_) if item.parent.is_some() => {
                        field_errors.push((fk.field.clone(), "value must be null"));
                        resolved.push((fk.field.clone(), Value::Null));
                    }
                    // The file schema types a top-level foreign key as a string.
                    Some(Value::Bool(_) | Value::Number(_) | Value::Array(_)) => {
                        field_errors.push((fk.field.clone(), "expected a string"));
                        resolved.push((
                            fk.field.clone(),
                            serde_json::json!({ pk.clone(): UNRESOLVED }),
                        ));
                    }
                    Some(v) => match self.find(pty, v) {
                        Some(found) => {
                            let id = self.items[found].id.clone();
                            resolved
                                .push((fk.field.clone(), serde_json::json!({ pk.clone(): id })));
                        }
                        None => {
                            problems.push(reference_msg(&fk.field, v, &fk.parent));
                            resolved.push((
                                fk.field.clone(),
                                serde_json::json!({ pk.clone(): UNRESOLVED }),
                            ));
                        }
                    },
                }
                if let Some(parent_id) = from_parent {
                    resolved.push((fk.field.clone(), serde_json::json!({ pk: parent_id })));
                }
            }
            if !field_errors.is_empty() {
                let path = self.items[idx].path.clone();
                for (field, msg) in field_errors {
                    self.errors.field(&path, &field, msg.into());
                }
            }
            let item = &mut self.items[idx];
            if !resolved.is_empty() {
                // The resolved references replace the file's values in the item's text (a
                // tree per reference would be held for every entity until `prepare`).
                let mut input = input;
                for (k, v) in resolved {
                    input.insert(k, v);
                }
                item.input = serde_json::to_string(&input)
                    .expect("a JSON value serialises")
                    .into_boxed_str();
            }
            if !problems.is_empty() {
                // Kong lists them in `pairs` order; sorted here so the output is stable.
                problems.sort();
                let path = item.path.clone();
                for p in problems {
                    self.errors.reference(&path, p);
                }
            }
        }
    }

    /// Every entity through the registry, then the unique fields across the file.
    fn prepare(&mut self, now: i64, transform: bool) -> Vec<Entity> {
        // (type, entity), sorted by type at the end (stable: file order within a type).
        let mut out: Vec<(usize, Entity)> = Vec::with_capacity(self.items.len());
        let mut uniques: HashSet<(usize, String, String)> = HashSet::new();
        for idx in 0..self.items.len() {
            let ty = self.items[idx].ty;
            let schema = self.types.list[ty];
            let mut input = self.items[idx].input();
            self.items[idx].input = Box::default();
            if !self.select_tags.is_empty() && schema.has_tags() {
                add_tags(&mut input, &self.select_tags);
            }
            let generated: Vec<String> = schema
                .fields
                .iter()
                .filter(|f| f.generate.is_some() && input.get(&f.name).is_none_or(Value::is_null))
                .map(|f| f.name.clone())
                .collect();
            match self.registry.prepare_with(
                schema,
                Value::Object(input),
                None,
                Mode::Insert,
                now,
                transform,
            ) {
                Ok(prepared) => {
                    let entity = prepared.entity;
                    for field in schema.unique_fields() {
                        if Some(field.name.as_str()) == schema.endpoint_key.as_deref()
                            && matches!(entity.get(&field.name), Some(Value::String(_)))
                        {
                            continue; // checked on the file's values by `index`
                        }
                        let Some(v) = entity.get(&field.name).filter(|v| !v.is_null()) else {
                            continue;
                        };
                        let text = match v {
                            Value::String(s) => s.clone(),
                            Value::Object(o) => o
                                .get("id")
                                .and_then(Value::as_str)
                                .map(str::to_owned)
                                .unwrap_or_else(|| v.to_string()),
                            other => other.to_string(),
                        };
                        if !uniques.insert((ty, field.name.clone(), text.clone())) {
                            let path = self.items[idx].path.clone();
                            self.errors
                                .entity(&path, uniqueness_msg(&schema.name, &field.name, &text));
                        }
                    }
                    if self.errors.is_empty() {
                        // With no problem so far, nothing reads this item again (a later
                        // problem is another item's): what it still holds is freed.
                        let item = &mut self.items[idx];
                        let id = std::mem::take(&mut item.id);
                        item.path = Vec::new();
                        item.key = None;
                        out.push((
                            ty,
                            Entity {
                                entity_type: schema.name.clone(),
                                id,
                                body: crate::schema::index::canonical(&entity).into(),
                                generated,
                            },
                        ));
                    }
                }
                Err(errors) => {
                    let path = self.items[idx].path.clone();
                    self.errors.schema(&path, errors.0);
                }
            }
        }
        if !self.errors.is_empty() {
            return Vec::new();
        }
        out.sort_by_key(|(ty, _)| *ty);
        out.into_iter().map(|(_, e)| e).collect()
    }
}

/// Kong's `validate_references` message.
fn reference_msg(field: &str, v: &Value, parent: &str) -> String {
    let shown = match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!("invalid reference '{field}: {shown}' (no such entry in '{parent}')")
}

fn add_tags(m: &mut Map<String, Value>, tags: &[String]) {
    let slot = m.entry("tags").or_insert_with(|| Value::Array(Vec::new()));
    if slot.is_null() {
        *slot = Value::Array(Vec::new());
    }
    if let Value::Array(list) = slot {
        for t in tags {
            if !list.iter().any(|x| x.as_str() == Some(t)) {
                list.push(Value::String(t.clone()));
            }
        }
    }
}

/// Kong's `uniqueness_error_msg`.
pub(crate) fn uniqueness_msg(entity: &str, key: &str, value: &str) -> String {
    format!("uniqueness violation: '{entity}' entity with {key} set to '{value}' already declared")
}
