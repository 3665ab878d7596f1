//! Validation and normalisation of one entity against its description.
//!
//! Every problem is collected (never the first only), in Kong's nested error shape:
//! `{"host": "required field missing", "healthchecks": {"active": {"timeout": "..."}},
//!   "paths": [null, "should start with: / ..."], "@entity": ["..."]}`.

use serde_json::{Map, Value};

use super::checks;
use super::{
    Auto, Check, Conditional, ConditionalAtLeastOneOf, EntitySchema, Field, FieldType, Generate,
    Match, Registry,
};

/// Kong's per-field error tree, ready to be returned as `fields` of a schema violation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldErrors(pub Map<String, Value>);

impl FieldErrors {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn field(&mut self, name: &str, err: impl Into<Value>) {
        self.0.entry(name.to_owned()).or_insert_with(|| err.into());
    }

    pub fn entity(&mut self, msg: impl Into<String>) {
        let list = self
            .0
            .entry("@entity")
            .or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = list {
            a.push(Value::String(msg.into()));
        }
    }

    /// Records `err` at a dotted path (`config.second` nests under `config`).
    pub fn at(&mut self, path: &str, err: impl Into<Value>) {
        let mut parts = path.split('.').peekable();
        let mut node = &mut self.0;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                node.entry(part.to_owned()).or_insert_with(|| err.into());
                return;
            }
            let child = node
                .entry(part.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !child.is_object() {
                return; // a message is already recorded for the parent
            }
            node = child.as_object_mut().expect("checked above");
        }
    }

    /// Records `err` at a dotted path, replacing what is there (Kong's `set_field`, as the
    /// conditional check uses it).
    pub fn set_at(&mut self, path: &str, err: Value) {
        let mut parts = path.split('.').peekable();
        let mut node = &mut self.0;
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                node.insert(part.to_owned(), err);
                return;
            }
            let child = node
                .entry(part.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            let Value::Object(next) = child else {
                return; // a message is already recorded for the parent
            };
            node = next;
        }
    }

    pub fn single(name: &str, err: impl Into<Value>) -> FieldErrors {
        let mut e = FieldErrors::default();
        e.field(name, err);
        e
    }

    /// Kong's message: `schema violation (a: x)` or `2 schema violations (a: x; b.c: y)`.
    pub fn message(&self) -> String {
        let mut parts = Vec::new();
        if let Some(Value::Array(list)) = self.0.get("@entity") {
            for e in list {
                parts.push(
                    e.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| e.to_string()),
                );
            }
        }
        for (name, err) in &self.0 {
            if name == "@entity" {
                continue;
            }
            flatten(name, err, &mut parts);
        }
        if parts.len() == 1 {
            format!("schema violation ({})", parts[0])
        } else {
            format!("{} schema violations ({})", parts.len(), parts.join("; "))
        }
    }
}

fn flatten(prefix: &str, err: &Value, out: &mut Vec<String>) {
    match err {
        Value::String(s) => out.push(format!("{prefix}: {s}")),
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                if !v.is_null() {
                    flatten(&format!("{prefix}.{}", i + 1), v, out);
                }
            }
        }
        other => out.push(format!("{prefix}: {other}")),
    }
}

/// How the input relates to what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// POST, or PUT of an absent entity: defaults and generated values fill the gaps.
    Insert,
    /// PUT of an existing entity: the input replaces it; id and `created_at` are kept.
    Replace,
    /// PATCH: the input is merged into the stored entity (records recursively).
    Update,
}

/// What `prepare` produced: the full entity to store, plus transient fields the store
/// keeps elsewhere (`certificates.snis`).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub entity: Value,
    pub transient: Map<String, Value>,
}

impl Registry {
    /// Validates `input` for `schema` and returns the complete entity to store.
    ///
    /// `existing` is the stored entity for `Replace` and `Update`. `now` is the time in seconds
    /// used for auto timestamps.
    pub fn prepare(
        &self,
        schema: &EntitySchema,
        input: Value,
        existing: Option<&Value>,
        mode: Mode,
        now: i64,
    ) -> Result<Prepared, FieldErrors> {
        self.prepare_with(schema, input, existing, mode, now, true)
    }

    /// [`Registry::prepare`], with Kong's schema `transformations` (basic-auth password
    /// hashing, the CA certificate digest) skipped when `transform` is false: a declarative
    /// file's `_transform: false` (`kong/db/schema/others/declarative_config.lua`) says its
    /// values are already transformed, as `db_export` writes them. Normalisations that Kong
    /// does outside schema transformations (a target's `host:port`) still apply.
    pub fn prepare_with(
        &self,
        schema: &EntitySchema,
        input: Value,
        existing: Option<&Value>,
        mode: Mode,
        now: i64,
        transform: bool,
    ) -> Result<Prepared, FieldErrors> {
        let Value::Object(mut input) = input else {
            return Err(FieldErrors::single(
                "@entity",
                vec![Value::from("expected an object")],
            ));
        };
        let mut errors = FieldErrors::default();

        for shorthand in &schema.shorthands {
            checks::apply_shorthand(shorthand, &mut input, &mut errors);
        }
        let mut transient = Map::new();
        for name in &schema.transient_fields {
            if let Some(v) = input.remove(name) {
                transient.insert(name.clone(), v);
            }
        }
        // Kong echoes workspace ids back in some outputs; accept and ignore them.
        input.remove("ws_id");
        for key in input.keys() {
            if schema.field(key).is_none() {
                errors.field(key, "unknown field");
            }
        }
        let input_keys: Vec<String> = input.keys().cloned().collect();

        // Kong rewrites shorthand fields in the input before merging it into the stored entity,
        // so on an update a shorthand sets its target even when the stored one is set.
        if mode == Mode::Update
            && let Some(plugin) = input
                .get("name")
                .or_else(|| existing.and_then(|e| e.get("name")))
                .and_then(Value::as_str)
                .and_then(|n| self.plugin(n))
            && let Some(config) = input.get_mut("config")
        {
            let mut abort = FieldErrors::default();
            apply_shorthands_deep(&plugin.config, config, &mut abort);
            if !abort.is_empty() {
                return Err(abort);
            }
        }

        let mut entity = match (mode, existing) {
            (Mode::Update, Some(Value::Object(old))) => {
                let mut merged = old.clone();
                for (k, v) in input {
                    let is_record = schema
                        .field(&k)
                        .is_some_and(|f| matches!(f.ty, FieldType::Record | FieldType::Json));
                    match (merged.get_mut(&k), v) {
                        (Some(Value::Object(dst)), Value::Object(src)) if is_record => {
                            merge_objects(dst, src)
                        }
                        (_, v) => {
                            merged.insert(k, v);
                        }
                    }
                }
                merged
            }
            _ => input,
        };

        // Identity and timestamps: kept from the stored entity, generated otherwise.
        for field in &schema.fields {
            match field.auto {
                Some(Auto::Uuid) => {
                    let keep = existing.and_then(|e| e.get(&field.name)).cloned();
                    match keep {
                        Some(v) if mode != Mode::Insert => {
                            if let Some(given) = entity.get(&field.name)
                                && given != &v
                                && !given.is_null()
                            {
                                errors.field(&field.name, "cannot change the primary key");
                            }
                            entity.insert(field.name.clone(), v);
                        }
                        _ => {
                            if entity.get(&field.name).is_none_or(Value::is_null) {
                                entity.insert(
                                    field.name.clone(),
                                    Value::String(uuid::Uuid::new_v4().to_string()),
                                );
                            }
                        }
                    }
                }
                Some(auto @ (Auto::Timestamp | Auto::TimestampMs)) => {
                    let now_value = if auto == Auto::Timestamp {
                        Value::from(now)
                    } else {
                        let ms = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as f64 / 1000.0)
                            .unwrap_or(now as f64);
                        serde_json::Number::from_f64(ms)
                            .map(Value::Number)
                            .unwrap_or(Value::from(now))
                    };
                    let stored = existing
                        .and_then(|e| e.get(&field.name))
                        .filter(|v| !v.is_null());
                    let value = if field.name == "updated_at" {
                        now_value
                    } else if let (Some(v), true) = (stored, mode != Mode::Insert) {
                        v.clone()
                    } else {
                        entity
                            .get(&field.name)
                            .filter(|v| v.is_number())
                            .cloned()
                            .unwrap_or(now_value)
                    };
                    entity.insert(field.name.clone(), value);
                }
                None => {}
            }
        }

        if mode != Mode::Update
            && schema
                .entity_checks
                .iter()
                .any(|c| matches!(c, Check::Custom(n) if n == "plugin_config"))
        {
            let plugin_default = entity
                .get("name")
                .and_then(Value::as_str)
                .and_then(|n| self.plugin(n))
                .and_then(|p| p.protocols_default.clone());
            if let Some(protocols) = plugin_default
                && entity.get("protocols").is_none()
            {
                entity.insert(
                    "protocols".into(),
                    protocols.into_iter().map(Value::String).collect(),
                );
            }
        }
        // A subschema's defaults apply when the input picks it (Kong's `process_auto_fields`
        // resolves fields by the subschema of the data it is given); its checks apply to
        // the entity as completed.
        let defaults_schema = schema.specialized_for(&entity).unwrap_or(schema);
        let mut abort = FieldErrors::default();
        fill_record(&defaults_schema.fields, &[], &mut entity, mode, &mut abort);
        if !abort.is_empty() {
            return Err(abort);
        }
        let schema = schema.specialized_for(&entity).unwrap_or(schema);
        for field in &schema.fields {
            if let Some(generate) = field.generate
                && entity.get(&field.name).is_none_or(Value::is_null)
            {
                entity.insert(field.name.clone(), generated(generate));
            }
        }

        check_fields(&schema.fields, &entity, &mut errors);
        self.check_entity(
            &schema.entity_checks,
            &schema.fields,
            &mut entity,
            &mut errors,
        );
        if errors.is_empty() {
            // Output every field, null when unset, as Kong does.
            for field in &schema.fields {
                entity.entry(field.name.clone()).or_insert(Value::Null);
            }
            for field in &schema.fields {
                if let Some(name) = &field.transform
                    && (transform || !checks::is_schema_transformation(name))
                {
                    let carried = input_keys.iter().any(|k| k == &field.name);
                    checks::apply_transform(name, &field.name, carried, &mut entity, &mut errors);
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Prepared {
            entity: Value::Object(entity),
            transient,
        })
    }

    /// Fills and validates a configuration for plugin `name` alone, as the `plugin_config` check
    /// does for a plugin entity that has no route, service or consumer: the complete `config`,
    /// or Kong's errors (rooted at the plugin entity: `{"config": {...}}`, `{"@entity": [...]}`).
    /// `None` when no schema describes `name`.
    pub fn prepare_plugin_config(
        &self,
        name: &str,
        config: Value,
    ) -> Option<Result<Value, FieldErrors>> {
        self.plugin(name)?;
        let mut entity = Map::new();
        entity.insert("name".into(), Value::from(name));
        entity.insert("config".into(), config);
        let mut errors = FieldErrors::default();
        self.check_plugin(&mut entity, &mut errors);
        Some(if errors.is_empty() {
            Ok(entity.remove("config").unwrap_or(Value::Null))
        } else {
            Err(errors)
        })
    }

    /// The `plugin_config` check: a described plugin's config is filled and validated against
    /// `schema/plugins/<name>.json`; any other plugin name is refused.
    fn check_plugin(&self, entity: &mut Map<String, Value>, errors: &mut FieldErrors) {
        let Some(Value::String(name)) = entity.get("name").cloned() else {
            return;
        };
        if entity.get("config").is_none_or(Value::is_null) {
            entity.insert("config".into(), Value::Object(Map::new()));
        }
        // Kong's `subschema_error` (`kong/db/schema/entities/plugins.lua`): a plugin no schema
        // describes is refused; a stored one (an older release stored any name) is served
        // only disabled (`Registry::accepts_stored`, `cp::store::revalidate`).
        let Some(plugin) = self.plugin(&name) else {
            errors.field(
                "name",
                format!(
                    "plugin '{name}' not enabled; add it to the 'plugins' configuration property"
                ),
            );
            return;
        };
        for (flag, field) in [
            (plugin.no_consumer, "consumer"),
            (plugin.no_service, "service"),
            (plugin.no_route, "route"),
        ] {
            if flag && entity.get(field).is_some_and(|c| !c.is_null()) {
                errors.field(field, "value must be null");
            }
        }
        if let (Some(allowed), Some(Value::Array(given))) =
            (&plugin.protocols_one_of, entity.get("protocols"))
        {
            let errs: Vec<Value> = given
                .iter()
                .map(|p| match p.as_str() {
                    Some(p) if allowed.iter().any(|a| a == p) => Value::Null,
                    _ => Value::String(format!("expected one of: {}", allowed.join(", "))),
                })
                .collect();
            if errs.iter().any(|e| !e.is_null()) {
                errors.field("protocols", Value::Array(errs));
            }
        }
        let Some(Value::Object(config)) = entity.get_mut("config") else {
            return; // the `json` type check reports it
        };
        for shorthand in &plugin.shorthands {
            checks::apply_shorthand(shorthand, config, errors);
        }
        // Kong processes shorthand fields before anything else and gives up on an error
        // there, reporting it alone (at the top of the error tree).
        let mut abort = FieldErrors::default();
        fill_record(
            plugin.config_fields(),
            &plugin.config.shorthand_fields,
            config,
            Mode::Insert,
            &mut abort,
        );
        if !abort.is_empty() {
            for (k, v) in abort.0 {
                errors.set_at(&k, v);
            }
            return;
        }
        if let Some(err) = check_value(&plugin.config, &Value::Object(config.clone())) {
            errors.field("config", err);
        }
        run_entity_checks(
            &plugin.entity_checks,
            std::slice::from_ref(&plugin.config),
            entity,
            errors,
        );
    }
}

fn merge_objects(dst: &mut Map<String, Value>, src: Map<String, Value>) {
    for (k, v) in src {
        match (dst.get_mut(&k), v) {
            (Some(Value::Object(d)), Value::Object(s)) => merge_objects(d, s),
            (_, v) => {
                dst.insert(k, v);
            }
        }
    }
}

fn generated(generate: Generate) -> Value {
    match generate {
        Generate::Uuid => Value::String(uuid::Uuid::new_v4().to_string()),
        Generate::RandomSecret => Value::String(checks::random_string()),
        Generate::RandomBase64Secret => Value::String(checks::random_base64_secret()),
    }
}

// === filling: Kong's `process_auto_fields` for an insert ===

/// Fills a record the way Kong's `process_auto_fields(data, "insert")` does: shorthand fields
/// first, then for every absent field its default, else `null` when it is not required, else
/// (a required record) its own filled structure; present records, array elements and map
/// values are filled recursively, and sets lose duplicate scalars. `Mode::Update` leaves
/// absent top-level fields absent. Shorthand errors go to `abort`.
fn fill_record(
    fields: &[Field],
    shorthand_fields: &[Field],
    obj: &mut Map<String, Value>,
    mode: Mode,
    abort: &mut FieldErrors,
) {
    apply_shorthand_fields(shorthand_fields, obj, abort);
    for field in fields {
        match obj.get_mut(&field.name) {
            Some(v) => adjust(field, v, abort),
            None => {
                if mode == Mode::Update {
                    continue;
                }
                let missing = match (field.generate, &field.default) {
                    (Some(generate), _) => Some(generated(generate)),
                    (None, Some(default)) => Some(default.clone()),
                    (None, None) if !field.required => Some(Value::Null),
                    (None, None) if field.ty == FieldType::Record => {
                        Some(Value::Object(Map::new()))
                    }
                    (None, None) => None, // reported as missing by the validation
                };
                if let Some(mut v) = missing {
                    adjust(field, &mut v, abort);
                    obj.insert(field.name.clone(), v);
                }
            }
        }
    }
}

fn adjust(field: &Field, v: &mut Value, abort: &mut FieldErrors) {
    match (field.ty, v) {
        (FieldType::Record, Value::Object(m)) => {
            if let Some(sub) = &field.fields {
                fill_record(sub, &field.shorthand_fields, m, Mode::Insert, abort);
            }
        }
        (FieldType::Array | FieldType::Set, Value::Array(items)) => {
            if field.ty == FieldType::Set {
                let mut seen: Vec<Value> = Vec::new();
                items.retain(|item| {
                    if item.is_object() || item.is_array() {
                        return true; // Lua compares tables by identity
                    }
                    if seen.iter().any(|s| lua_eq(s, item)) {
                        return false;
                    }
                    seen.push(item.clone());
                    true
                });
            }
            if let Some(elements) = &field.elements {
                for item in items.iter_mut().filter(|i| !i.is_null()) {
                    adjust(elements, item, abort);
                }
            }
        }
        (FieldType::Map, Value::Object(m)) => {
            if let Some(values) = &field.values {
                for item in m.values_mut().filter(|i| !i.is_null()) {
                    adjust(values, item, abort);
                }
            }
        }
        _ => {}
    }
}

/// Kong's `shorthand_fields`: each given shorthand is validated against its own description,
/// removed, and its value written at `path` (a deprecated shorthand yields to the real field
/// when that is set, as Kong's `null_aware_table_merge` does).
fn apply_shorthand_fields(
    shorthand_fields: &[Field],
    obj: &mut Map<String, Value>,
    abort: &mut FieldErrors,
) {
    for sf in shorthand_fields {
        let Some(value) = obj.get(&sf.name) else {
            continue;
        };
        let err = if value.is_null() {
            sf.required.then(|| Value::from(REQUIRED))
        } else {
            check_value(sf, value)
        };
        if let Some(err) = err {
            abort.field(&sf.name, err);
            continue;
        }
        let Some(mut value) = obj.remove(&sf.name) else {
            continue;
        };
        if value.is_null()
            && let Some(v) = &sf.null_value
        {
            value = v.clone();
        }
        if let (Some(map), Value::String(s)) = (&sf.map_values, &value)
            && let Some(v) = map.get(s)
        {
            value = v.clone();
        }
        let Some(path) = &sf.path else {
            continue; // accepted and dropped
        };
        let deprecated = sf.deprecation.is_some();
        let mut parts: Vec<&str> = path.split('.').collect();
        let head = parts.remove(0);
        if parts.is_empty() {
            if !deprecated || obj.get(head).is_none_or(Value::is_null) {
                obj.insert(head.to_owned(), value);
            }
            continue;
        }
        // `{head = {rest = value}}` merged one level deep into `obj[head]`.
        let mut nested = value;
        for part in parts[1..].iter().rev() {
            let mut m = Map::new();
            m.insert((*part).to_owned(), nested);
            nested = Value::Object(m);
        }
        let key = parts[0].to_owned();
        let mut target = match obj.remove(head) {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let keep_existing = deprecated && target.get(&key).is_some_and(|v| !v.is_null());
        if !keep_existing {
            target.insert(key, nested);
        }
        obj.insert(head.to_owned(), Value::Object(target));
    }
}

/// The shorthand fields of `field` and of the records inside it that `value` carries, with no
/// defaults filled (Kong's `process_auto_fields(.., "update")` on the input).
fn apply_shorthands_deep(field: &Field, value: &mut Value, abort: &mut FieldErrors) {
    let (FieldType::Record, Value::Object(m)) = (field.ty, value) else {
        return;
    };
    apply_shorthand_fields(&field.shorthand_fields, m, abort);
    for sub in field.fields.iter().flatten() {
        if let Some(v) = m.get_mut(&sub.name) {
            apply_shorthands_deep(sub, v, abort);
        }
    }
}

// === validation: Kong's `validate_field` ===

const REQUIRED: &str = "required field missing";

fn check_fields(fields: &[Field], obj: &Map<String, Value>, errors: &mut FieldErrors) {
    for field in fields {
        // A null runs through `check_value` too: `eq` and `required` judge it.
        let err = match obj.get(&field.name) {
            None => field.required.then(|| Value::from(REQUIRED)),
            Some(v) => check_value(field, v),
        };
        if let Some(err) = err {
            errors.field(&field.name, err);
        }
    }
}

/// A record's errors: unknown keys, its fields, its entity checks and, when all of those
/// pass, its validator.
fn record_error(field: &Field, m: &Map<String, Value>) -> Option<Value> {
    let fields = field.fields.as_deref().unwrap_or(&[]);
    let mut errs = FieldErrors::default();
    for key in m.keys() {
        if !fields.iter().any(|f| &f.name == key) {
            errs.field(key, "unknown field");
        }
    }
    check_fields(fields, m, &mut errs);
    if !field.entity_checks.is_empty() {
        let mut copy = m.clone();
        run_entity_checks(&field.entity_checks, fields, &mut copy, &mut errs);
    }
    if !errs.is_empty() {
        return Some(Value::Object(errs.0));
    }
    None
}

fn type_error(field: &Field, v: &Value) -> Option<&'static str> {
    let ok = match field.ty {
        FieldType::String => v.is_string(),
        // 5.0 is an integer for Kong (Lua numbers); integral floats are accepted.
        FieldType::Integer => {
            v.is_i64()
                || v.is_u64()
                || v.as_f64()
                    .is_some_and(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
        }
        FieldType::Number => v.is_number(),
        FieldType::Boolean => v.is_boolean(),
        FieldType::Array | FieldType::Set => v.is_array(),
        FieldType::Map | FieldType::Record | FieldType::Foreign | FieldType::Json => v.is_object(),
    };
    if ok {
        return None;
    }
    Some(match field.ty {
        FieldType::String => "expected a string",
        FieldType::Integer => "expected an integer",
        FieldType::Number => "expected a number",
        FieldType::Boolean => "expected a boolean",
        FieldType::Array => "expected an array",
        FieldType::Set => "expected a set",
        FieldType::Map => "expected a map",
        FieldType::Record | FieldType::Foreign | FieldType::Json => "expected a record",
    })
}

/// The error for one value, or `None` when it is valid.
fn check_value(field: &Field, v: &Value) -> Option<Value> {
    if v.is_null() {
        return match &field.eq {
            Some(eq) if !eq.is_null() => Some(format!("value must be {}", lua_tostring(eq)).into()),
            _ => field.required.then(|| REQUIRED.into()),
        };
    }
    if field.eq.as_ref().is_some_and(Value::is_null) {
        return Some(field.err.as_deref().unwrap_or("value must be null").into());
    }
    if let Some(msg) = type_error(field, v) {
        return Some(msg.into());
    }
    match (field.ty, v) {
        (FieldType::Array | FieldType::Set, Value::Array(items)) => {
            if let Some(elements) = &field.elements {
                let errs: Vec<Option<Value>> =
                    items.iter().map(|i| check_element(elements, i)).collect();
                if errs.iter().any(Option::is_some) {
                    return Some(Value::Array(
                        errs.into_iter().map(|e| e.unwrap_or(Value::Null)).collect(),
                    ));
                }
            }
        }
        // Kong stops at the first bad key or value and reports its error alone.
        (FieldType::Map, Value::Object(m)) => {
            for (k, val) in m {
                if let Some(keys) = &field.keys
                    && let Some(e) = check_element(keys, &Value::String(k.clone()))
                {
                    return Some(e);
                }
                if let Some(values) = &field.values
                    && let Some(e) = check_element(values, val)
                {
                    return Some(e);
                }
            }
        }
        (FieldType::Record, Value::Object(m)) => {
            if let Some(err) = record_error(field, m) {
                return Some(err);
            }
        }
        (FieldType::Foreign, Value::Object(m)) => return foreign_error(m),
        (FieldType::String, Value::String(s)) if field.referenceable && is_reference(s) => {
            return None;
        }
        _ => {}
    }
    validators_error(field, v).map(|e| Value::String(field.err.clone().unwrap_or(e)))
}

fn foreign_error(m: &Map<String, Value>) -> Option<Value> {
    let mut errs = Map::new();
    for key in m.keys() {
        if key != "id" {
            errs.insert(key.clone(), "unknown field".into());
        }
    }
    match m.get("id") {
        Some(Value::String(id)) if checks::is_uuid(id) => {}
        Some(Value::String(_)) => {
            errs.insert("id".into(), "expected a valid UUID".into());
        }
        Some(_) => {
            errs.insert("id".into(), "expected a string".into());
        }
        None => {
            errs.insert("id".into(), REQUIRED.into());
        }
    }
    (!errs.is_empty()).then_some(Value::Object(errs))
}

/// Kong's validators, in Kong's order (`Schema.validators_order`).
fn validators_error(field: &Field, v: &Value) -> Option<String> {
    if let Some(eq) = &field.eq
        && !lua_eq(eq, v)
    {
        return Some(format!("value must be {}", lua_tostring(eq)));
    }
    if let Some(ne) = &field.ne
        && lua_eq(ne, v)
    {
        return Some(format!("value must not be {}", lua_tostring(ne)));
    }
    if let Some(list) = &field.not_one_of
        && list.iter().any(|x| lua_eq(x, v))
    {
        return Some(format!("must not be one of: {}", joined(list)));
    }
    if let Some(list) = &field.one_of
        && !list.iter().any(|x| lua_eq(x, v))
    {
        return Some(format!("expected one of: {}", joined(list)));
    }
    if let (Some(limit), Some(n)) = (field.gt, v.as_f64())
        && n <= limit
    {
        return Some(format!("value must be greater than {}", fmt_num(limit)));
    }
    if field.is_regex
        && let Some(s) = v.as_str()
        && regex::Regex::new(s).is_err()
    {
        return Some(format!("not a valid regex: {s}"));
    }
    if let (Some([min, max]), Some(n)) = (field.between, v.as_f64())
        && (n < min || n > max)
    {
        // Lua's `%d`: the limits print as integers.
        return Some(format!(
            "value should be between {} and {}",
            min.trunc() as i64,
            max.trunc() as i64
        ));
    }
    let len = match v {
        Value::String(s) => Some(s.len()),
        Value::Array(a) => Some(a.len()),
        Value::Object(m) if field.ty == FieldType::Map => Some(m.len()),
        _ => None,
    };
    if let Some(len) = len {
        if let Some(n) = field.len_eq
            && len != n
        {
            return Some(format!("length must be {n}"));
        }
        // Kong refuses empty strings unless a field says otherwise.
        let min = field
            .len_min
            .or((field.ty == FieldType::String).then_some(1));
        if let Some(n) = min
            && len < n
        {
            return Some(format!("length must be at least {n}"));
        }
        if let Some(n) = field.len_max
            && len > n
        {
            return Some(format!("length must be at most {n}"));
        }
    }
    if let Some(s) = v.as_str() {
        if let Some(prefix) = &field.starts_with
            && !s.starts_with(prefix.as_str())
        {
            return Some(format!("should start with: {prefix}"));
        }
        if let Some(p) = &field.not_match
            && p.is_match(s)
        {
            return Some(format!("invalid value: {s}"));
        }
        if let Some(rules) = &field.match_none
            && let Some(rule) = rules.iter().find(|r| r.pattern.is_match(s))
        {
            return Some(rule.err.clone());
        }
        if let Some(p) = &field.match_pattern
            && !p.is_match(s)
        {
            return Some(format!("invalid value: {s}"));
        }
        if let Some(rules) = &field.match_all
            && let Some(rule) = rules.iter().find(|r| !r.pattern.is_match(s))
        {
            return Some(rule.err.clone());
        }
        if let Some(any) = &field.match_any
            && !any.patterns.iter().any(|p| p.is_match(s))
        {
            return Some(any.err.clone());
        }
    }
    if let (Some(subsets), Value::Array(items)) = (&field.mutually_exclusive_subsets, v) {
        // The subsets the value draws from, in the order its elements first name them.
        let mut used: Vec<&Vec<Value>> = Vec::new();
        for item in items {
            if let Some(set) = subsets.iter().find(|set| set.contains(item))
                && !used.contains(&set)
            {
                used.push(set);
            }
        }
        if used.len() > 1 {
            let list: Vec<String> = used
                .iter()
                .map(|set| {
                    let inner: Vec<String> = set
                        .iter()
                        .map(|x| format!("'{}'", lua_tostring(x)))
                        .collect();
                    format!("({})", inner.join(", "))
                })
                .collect();
            return Some(format!(
                "these sets are mutually exclusive: {}",
                list.join(", ")
            ));
        }
    }
    if let Some(wanted) = &field.contains
        && !v
            .as_array()
            .is_some_and(|a| a.iter().any(|x| lua_eq(x, wanted)))
    {
        return Some(format!("expected to contain: {}", lua_tostring(wanted)));
    }
    if let Some(name) = &field.validator
        && let Err(msg) = checks::validate_named(name, v)
    {
        return Some(msg);
    }
    None
}

impl Registry {
    /// The data plane's verdict on an entity it receives, in stored form: what `prepare`
    /// accepts, and also a disabled entity (`enabled: false`) that does not validate, which
    /// never runs. (An older control plane release stored entities the current schemas refuse;
    /// this one disables them, see `cp::store::revalidate`, and a data plane must still take
    /// the whole configuration.)
    pub fn accepts_stored(&self, schema: &EntitySchema, entity: &Value) -> Result<(), FieldErrors> {
        match self.prepare(schema, entity.clone(), None, Mode::Insert, 0) {
            Ok(_) => Ok(()),
            Err(_) if entity.get("enabled") == Some(&Value::Bool(false)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Field {
    /// Whether `v` passes this field's own checks (type and validators), as Kong's
    /// `Schema:validate_field`; used to decide whether a value can name an entity by this
    /// field.
    pub fn accepts(&self, v: &Value) -> bool {
        !v.is_null() && check_value(self, v).is_none()
    }
}

fn check_element(field: &Field, v: &Value) -> Option<Value> {
    if v.is_null() {
        return Some(REQUIRED.into());
    }
    check_value(field, v)
}

/// Kong's `kong.vault.is_reference`: `{vault://...}`.
pub(super) fn is_reference(s: &str) -> bool {
    s.starts_with("{vault://") && s.ends_with('}')
}

/// Lua's `==` on JSON values: numbers compare by value (`2048 == 2048.0`).
fn lua_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Lua's `tostring` of a scalar, as Kong's messages print them.
fn lua_tostring(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.as_f64().map(fmt_num).unwrap_or_else(|| n.to_string()),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn joined(list: &[Value]) -> String {
    list.iter().map(lua_tostring).collect::<Vec<_>>().join(", ")
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

fn is_set(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    }
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The value at a dotted path (`config.redis.host`); `None` when absent or below a null.
fn lookup<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = obj.get(parts.next()?)?;
    for p in parts {
        v = v.as_object()?.get(p)?;
    }
    Some(v)
}

/// The field description at a dotted path through records.
fn field_at<'a>(fields: &'a [Field], path: &str) -> Option<&'a Field> {
    let mut parts = path.split('.');
    let mut field = fields
        .iter()
        .find(|f| f.name == parts.next().unwrap_or(""))?;
    for p in parts {
        field = field.fields.as_deref()?.iter().find(|f| f.name == p)?;
    }
    Some(field)
}

/// Kong's `validate_field` of a conditional's `if_match` / `then_match`: the match's own
/// validators, over the described field's type and `required`.
fn match_error(m: &Match, field: Option<&Field>, v: Option<&Value>) -> Option<String> {
    let v = v.unwrap_or(&Value::Null);
    if v.is_null() {
        if let Some(eq) = &m.eq
            && !eq.is_null()
        {
            return Some(format!("value must be {}", lua_tostring(eq)));
        }
        if m.required == Some(true) || field.is_some_and(|f| f.required) {
            return Some(REQUIRED.into());
        }
        return None;
    }
    if m.eq.as_ref().is_some_and(Value::is_null) {
        return Some("value must be null".into());
    }
    if let Some(msg) = field.and_then(|f| type_error(f, v)) {
        return Some(msg.into());
    }
    if let Some(each) = &m.elements {
        match v {
            Value::Array(items) => {
                if let Some(e) = items.iter().find_map(|i| match_error(each, None, Some(i))) {
                    return Some(e);
                }
            }
            _ => return Some("expected an array".into()),
        }
    }
    let ty = field.map_or(FieldType::Json, |f| f.ty);
    let as_field = |ty| Field {
        eq: m.eq.clone(),
        len_eq: m.len_eq,
        one_of: m.one_of.clone(),
        not_one_of: m.not_one_of.clone(),
        gt: m.gt,
        contains: m.contains.clone(),
        match_pattern: m.match_pattern.clone(),
        ..Field::bare(ty)
    };
    // A match belongs to one check of one field, so its type is always the same one.
    match m.as_field.get_or_init(|| (ty, Box::new(as_field(ty)))) {
        (cached, f) if *cached == ty => validators_error(f, v),
        _ => validators_error(&as_field(ty), v),
    }
}

/// Entity checks over `obj` (an entity, a plugin entity or a record), with Kong's rules for
/// missing fields (`kong/db/schema/init.lua` `run_entity_check`). `fields` describes `obj`.
fn run_entity_checks(
    entity_checks: &[Check],
    fields: &[Field],
    obj: &mut Map<String, Value>,
    errors: &mut FieldErrors,
) {
    for check in entity_checks {
        // Kong skips a check when one of its fields holds a Vault reference.
        let names = check_fields_of(check);
        if names.iter().any(|n| {
            field_at(fields, n).is_some_and(|f| f.referenceable)
                && lookup(obj, n)
                    .and_then(Value::as_str)
                    .is_some_and(is_reference)
        }) {
            continue;
        }
        // Checks without `run_with_invalid_fields` skip when one of their fields has an error;
        // Kong looks errors up by the field's name as written, so a dotted path never matches.
        let skips_invalid = matches!(
            check,
            Check::MutuallyRequired(_)
                | Check::MutuallyExclusive(_)
                | Check::MutuallyExclusiveSets(_)
                | Check::CustomEntityCheck(_)
        );
        if skips_invalid && names.iter().any(|n| errors.0.contains_key(n.as_str())) {
            continue;
        }
        match check {
            Check::AtLeastOneOf(names) => {
                if !names.iter().any(|n| is_set(lookup(obj, n))) {
                    errors.entity(format!(
                        "at least one of these fields must be non-empty: {}",
                        quoted(names)
                    ));
                }
            }
            Check::OnlyOneOf(names) => {
                if all_present(obj, names, errors) {
                    let n = names.iter().filter(|n| is_set(lookup(obj, n))).count();
                    if n != 1 {
                        errors.entity(format!(
                            "exactly one of these fields must be non-empty: {}",
                            quoted(names)
                        ));
                    }
                }
            }
            Check::Distinct(names) => {
                if all_present(obj, names, errors) {
                    let set: Vec<&Value> = names
                        .iter()
                        .filter_map(|n| lookup(obj, n))
                        .filter(|v| is_set(Some(v)))
                        .collect();
                    let repeated = set
                        .iter()
                        .enumerate()
                        .any(|(i, a)| set[..i].iter().any(|b| lua_eq(a, b)));
                    if repeated {
                        errors.entity(format!(
                            "values of these fields must be distinct: {}",
                            quoted(names)
                        ));
                    }
                }
            }
            Check::MutuallyRequired(names) => {
                let n = names.iter().filter(|n| is_set(lookup(obj, n))).count();
                if n != 0 && n != names.len() {
                    errors.entity(format!(
                        "all or none of these fields must be set: {}",
                        quoted(names)
                    ));
                }
            }
            Check::MutuallyExclusive(names) => {
                let n = names.iter().filter(|n| is_set(lookup(obj, n))).count();
                if n > 1 {
                    errors.entity(format!(
                        "only one or none of these fields must be set: {}",
                        quoted(names)
                    ));
                }
            }
            Check::MutuallyExclusiveSets(sets) => {
                let set1: Vec<String> = sets
                    .set1
                    .iter()
                    .filter(|n| is_set(lookup(obj, n)))
                    .cloned()
                    .collect();
                let set2: Vec<String> = sets
                    .set2
                    .iter()
                    .filter(|n| is_set(lookup(obj, n)))
                    .cloned()
                    .collect();
                if !set1.is_empty() && !set2.is_empty() {
                    errors.entity(format!(
                        "these sets are mutually exclusive: ({}), ({})",
                        quoted(&set1),
                        quoted(&set2)
                    ));
                }
            }
            Check::Conditional(c) => conditional(c, fields, obj, errors),
            Check::ConditionalAtLeastOneOf(c) => {
                conditional_at_least_one_of(c, fields, obj, errors)
            }
            Check::Custom(name) => checks::custom_check(name, obj, errors),
            Check::CustomEntityCheck(c) => {
                if all_present(obj, &c.field_sources, errors) {
                    checks::custom_check(&c.name, obj, errors);
                }
            }
        }
    }
}

/// The fields a check reads (Kong's `field_sources`, or its argument list).
fn check_fields_of(check: &Check) -> Vec<&String> {
    match check {
        Check::AtLeastOneOf(names)
        | Check::OnlyOneOf(names)
        | Check::MutuallyRequired(names)
        | Check::MutuallyExclusive(names)
        | Check::Distinct(names) => names.iter().collect(),
        Check::MutuallyExclusiveSets(sets) => sets.set1.iter().chain(&sets.set2).collect(),
        Check::Conditional(c) => vec![&c.if_field, &c.then_field],
        Check::ConditionalAtLeastOneOf(c) => std::iter::once(&c.if_field)
            .chain(&c.then_at_least_one_of)
            .chain(&c.else_then_at_least_one_of)
            .collect(),
        Check::CustomEntityCheck(c) => c.field_sources.iter().collect(),
        Check::Custom(_) => Vec::new(),
    }
}

/// Kong's rule for checks that need all their fields: when every field is absent the check
/// is skipped; when only some are, each absent one gets "field required for entity check".
fn all_present(obj: &Map<String, Value>, names: &[String], errors: &mut FieldErrors) -> bool {
    let absent: Vec<&String> = names.iter().filter(|n| lookup(obj, n).is_none()).collect();
    if absent.len() == names.len() {
        return false;
    }
    for n in &absent {
        errors.set_at(n, Value::from("field required for entity check"));
    }
    absent.is_empty()
}

fn conditional(
    c: &Conditional,
    fields: &[Field],
    obj: &Map<String, Value>,
    errors: &mut FieldErrors,
) {
    let if_value = lookup(obj, &c.if_field);
    let then_value = lookup(obj, &c.then_field);
    if if_value.is_none() {
        if then_value.is_some() {
            errors.set_at(&c.if_field, Value::from("field required for entity check"));
        }
        return;
    }
    if match_error(&c.if_match, field_at(fields, &c.if_field), if_value).is_some() {
        return;
    }
    let generic = format!(
        "failed conditional validation given value of field '{}'",
        c.if_field
    );
    if c.then_match.required == Some(true) && then_value.is_none_or(Value::is_null) {
        errors.set_at(&c.then_field, Value::from(REQUIRED));
        errors.entity(generic);
        return;
    }
    if let Some(err) = match_error(&c.then_match, field_at(fields, &c.then_field), then_value) {
        errors.set_at(&c.then_field, Value::from(err));
        errors.entity(c.then_err.clone().unwrap_or(generic));
    }
}

fn conditional_at_least_one_of(
    c: &ConditionalAtLeastOneOf,
    fields: &[Field],
    obj: &Map<String, Value>,
    errors: &mut FieldErrors,
) {
    let Some(if_value) = lookup(obj, &c.if_field) else {
        return;
    };
    let if_field = field_at(fields, &c.if_field);
    let (names, err) = if match_error(&c.if_match, if_field, Some(if_value)).is_none() {
        (&c.then_at_least_one_of, &c.then_err)
    } else {
        match &c.else_match {
            Some(m) if match_error(m, if_field, Some(if_value)).is_none() => {
                (&c.else_then_at_least_one_of, &c.else_then_err)
            }
            _ => return,
        }
    };
    if names.iter().any(|n| is_set(lookup(obj, n))) {
        return;
    }
    let list = quoted(names);
    errors.entity(match err {
        Some(fmt) => fmt.replacen("%s", &list, 1),
        None => format!("at least one of these fields must be non-empty: {list}"),
    });
}

impl Registry {
    fn check_entity(
        &self,
        entity_checks: &[Check],
        fields: &[Field],
        obj: &mut Map<String, Value>,
        errors: &mut FieldErrors,
    ) {
        for check in entity_checks {
            match check {
                Check::Custom(name) if name == "plugin_config" => self.check_plugin(obj, errors),
                other => run_entity_checks(std::slice::from_ref(other), fields, obj, errors),
            }
        }
    }
}

impl Field {
    /// A field of type `ty` with no constraint.
    pub fn bare(ty: FieldType) -> Field {
        Field {
            name: String::new(),
            ty,
            required: false,
            default: None,
            auto: None,
            generate: None,
            unique: false,
            eq: None,
            ne: None,
            mutually_exclusive_subsets: None,
            one_of: None,
            not_one_of: None,
            gt: None,
            between: None,
            len_eq: None,
            len_min: None,
            len_max: None,
            starts_with: None,
            match_pattern: None,
            not_match: None,
            match_all: None,
            match_none: None,
            match_any: None,
            is_regex: false,
            contains: None,
            validator: None,
            err: None,
            referenceable: false,
            encrypted: false,
            elements: None,
            keys: None,
            values: None,
            fields: None,
            entity_checks: Vec::new(),
            shorthand_fields: Vec::new(),
            path: None,
            map_values: None,
            null_value: None,
            deprecation: None,
            reference: None,
            on_delete: None,
            since: None,
            transform: None,
            description: None,
        }
    }
}
