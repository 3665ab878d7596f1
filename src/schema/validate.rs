//! Validation and normalisation of one entity against its description.
//!
//! Every problem is collected (never the first only), in Kong's nested error shape:
//! `{"host": "required field missing", "healthchecks": {"active": {"timeout": "..."}},
//!   "paths": [null, "should start with: / ..."], "@entity": ["..."]}`.

use serde_json::{Map, Value};

use super::checks;
use super::{Auto, Check, EntitySchema, Field, FieldType, Generate, Match, Registry};

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
        fill_defaults(&defaults_schema.fields, &mut entity, mode);
        let schema = schema.specialized_for(&entity).unwrap_or(schema);
        for field in &schema.fields {
            if let Some(generate) = field.generate
                && entity.get(&field.name).is_none_or(Value::is_null)
            {
                entity.insert(field.name.clone(), generated(generate));
            }
        }

        check_fields(&schema.fields, &entity, &mut errors);
        self.check_entity(&schema.entity_checks, &mut entity, &mut errors);
        if errors.is_empty() {
            // Output every field, null when unset, as Kong does.
            for field in &schema.fields {
                entity.entry(field.name.clone()).or_insert(Value::Null);
            }
            for field in &schema.fields {
                if let Some(transform) = &field.transform {
                    let carried = input_keys.iter().any(|k| k == &field.name);
                    checks::apply_transform(
                        transform,
                        &field.name,
                        carried,
                        &mut entity,
                        &mut errors,
                    );
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

    /// The `plugin_config` check: a described plugin's config is defaulted and validated against
    /// `schema/plugins/<name>.json`; any other plugin is validated structurally (config an object).
    fn check_plugin(&self, entity: &mut Map<String, Value>, errors: &mut FieldErrors) {
        let Some(Value::String(name)) = entity.get("name").cloned() else {
            return;
        };
        if entity.get("config").is_none_or(Value::is_null) {
            entity.insert("config".into(), Value::Object(Map::new()));
        }
        let Some(plugin) = self.plugin(&name) else {
            return;
        };
        if let Some(Value::Object(config)) = entity.get_mut("config") {
            for shorthand in &plugin.shorthands {
                checks::apply_shorthand(shorthand, config, errors);
            }
        }
        if plugin.no_consumer && entity.get("consumer").is_some_and(|c| !c.is_null()) {
            errors.field("consumer", "value must be null");
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
        let config = entity
            .entry("config")
            .or_insert_with(|| Value::Object(Map::new()));
        if config.is_null() {
            *config = Value::Object(Map::new());
        }
        let Value::Object(config) = config else {
            return; // the `json` type check below reports it
        };
        let mut config_errors = FieldErrors::default();
        for key in config.keys() {
            if !plugin.config.iter().any(|f| &f.name == key) {
                config_errors.field(key, "unknown field");
            }
        }
        fill_defaults(&plugin.config, config, Mode::Insert);
        check_fields(&plugin.config, config, &mut config_errors);
        for field in &plugin.config {
            config.entry(field.name.clone()).or_insert(Value::Null);
        }
        if !config_errors.is_empty() {
            errors.field("config", Value::Object(config_errors.0));
            return;
        }
        self.check_entity(&plugin.entity_checks, entity, errors);
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
        Generate::RandomSecret => Value::String(uuid::Uuid::new_v4().simple().to_string()),
    }
}

/// Fills defaults of absent fields; records get their nested defaults recursively.
fn fill_defaults(fields: &[Field], obj: &mut Map<String, Value>, mode: Mode) {
    for field in fields {
        let current = obj.get_mut(&field.name);
        match current {
            None => {
                if mode == Mode::Update {
                    continue;
                }
                if let Some(default) = &field.default {
                    let mut v = default.clone();
                    if let (FieldType::Record, Some(sub), Value::Object(m)) =
                        (field.ty, &field.fields, &mut v)
                    {
                        fill_defaults(sub, m, mode);
                    }
                    obj.insert(field.name.clone(), v);
                } else if field.ty == FieldType::Record
                    && let Some(sub) = &field.fields
                {
                    let mut m = Map::new();
                    fill_defaults(sub, &mut m, mode);
                    if !m.is_empty() && has_any_default(sub) {
                        obj.insert(field.name.clone(), Value::Object(m));
                    }
                }
            }
            Some(Value::Object(m)) if field.ty == FieldType::Record => {
                if let Some(sub) = &field.fields {
                    fill_defaults(sub, m, Mode::Insert);
                }
            }
            Some(_) => {}
        }
    }
}

fn has_any_default(fields: &[Field]) -> bool {
    fields.iter().any(|f| {
        f.default.is_some()
            || (f.ty == FieldType::Record && f.fields.as_deref().is_some_and(has_any_default))
    })
}

fn check_fields(fields: &[Field], obj: &Map<String, Value>, errors: &mut FieldErrors) {
    for field in fields {
        match obj.get(&field.name) {
            None | Some(Value::Null) => {
                if field.required {
                    errors.field(&field.name, "required field missing");
                }
            }
            Some(v) => {
                if let Some(err) = check_value(field, v) {
                    errors.field(&field.name, err);
                }
            }
        }
    }
}

impl Field {
    /// Whether `v` passes this field's own checks (type, `one_of`, `between`, lengths,
    /// validator), as Kong's `Schema:validate_field`; used to decide whether a value can
    /// name an entity by this field.
    pub fn accepts(&self, v: &Value) -> bool {
        !v.is_null() && check_value(self, v).is_none()
    }
}

/// The error for one value, or `None` when it is valid. A field's `err` replaces the
/// message of its `eq`, `ne` and `mutually_exclusive_subsets` checks, as Kong's `field.err`.
fn check_value(field: &Field, v: &Value) -> Option<Value> {
    let own = |msg: String| Some(Value::String(field.err.clone().unwrap_or(msg)));
    if let Some(eq) = &field.eq
        && eq != v
    {
        return own(format!("value must be {}", kong_value(eq)));
    }
    if let Some(ne) = &field.ne
        && ne == v
    {
        return own(format!("value must not be {}", kong_value(ne)));
    }
    let res = check_value_inner(field, v);
    if res.is_none()
        && let (Some(subsets), Value::Array(items)) = (&field.mutually_exclusive_subsets, v)
    {
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
                    let inner: Vec<String> =
                        set.iter().map(|x| format!("'{}'", kong_value(x))).collect();
                    format!("({})", inner.join(", "))
                })
                .collect();
            return own(format!(
                "these sets are mutually exclusive: {}",
                list.join(", ")
            ));
        }
    }
    res
}

/// A value as Kong's messages print it: strings bare, `null` for null.
fn kong_value(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn check_value_inner(field: &Field, v: &Value) -> Option<Value> {
    let type_err = |what: &str| Some(Value::String(format!("expected {what}")));
    match field.ty {
        FieldType::String => {
            let Value::String(s) = v else {
                return type_err("a string");
            };
            let len = s.chars().count();
            if let Some(min) = field.len_min
                && len < min
            {
                return Some(if min == 1 && len == 0 {
                    "length must be at least 1".into()
                } else {
                    format!("length must be at least {min}").into()
                });
            }
            if let Some(max) = field.len_max
                && len > max
            {
                return Some(format!("length must be at most {max}").into());
            }
        }
        FieldType::Integer => {
            if !(v.is_i64() || v.is_u64()) {
                // 5.0 is an integer for Kong (Lua numbers); accept integral floats.
                match v.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {}
                    _ => return type_err("an integer"),
                }
            }
        }
        FieldType::Number => {
            if !v.is_number() {
                return type_err("a number");
            }
        }
        FieldType::Boolean => {
            if !v.is_boolean() {
                return type_err("a boolean");
            }
        }
        FieldType::Array | FieldType::Set => {
            let Value::Array(items) = v else {
                return type_err(if field.ty == FieldType::Set {
                    "a set"
                } else {
                    "an array"
                });
            };
            if let Some(min) = field.len_min
                && items.len() < min
            {
                return Some(format!("length must be at least {min}").into());
            }
            if let Some(max) = field.len_max
                && items.len() > max
            {
                return Some(format!("length must be at most {max}").into());
            }
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
        FieldType::Map => {
            let Value::Object(m) = v else {
                return type_err("a map");
            };
            let mut errs = Map::new();
            for (k, val) in m {
                if let Some(keys) = &field.keys
                    && let Some(e) = check_element(keys, &Value::String(k.clone()))
                {
                    errs.insert(k.clone(), e);
                    continue;
                }
                if let Some(values) = &field.values
                    && let Some(e) = check_element(values, val)
                {
                    errs.insert(k.clone(), e);
                }
            }
            if !errs.is_empty() {
                return Some(Value::Object(errs));
            }
        }
        FieldType::Record => {
            let Value::Object(m) = v else {
                return type_err("a record");
            };
            if let Some(sub) = &field.fields {
                let mut errs = FieldErrors::default();
                for key in m.keys() {
                    if !sub.iter().any(|f| &f.name == key) {
                        errs.field(key, "unknown field");
                    }
                }
                check_fields(sub, m, &mut errs);
                if !errs.is_empty() {
                    return Some(Value::Object(errs.0));
                }
            }
        }
        FieldType::Foreign => {
            let Value::Object(m) = v else {
                return type_err("a record");
            };
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
                    errs.insert("id".into(), "required field missing".into());
                }
            }
            if !errs.is_empty() {
                return Some(Value::Object(errs));
            }
        }
        FieldType::Json => {
            if !v.is_object() {
                return type_err("a record");
            }
        }
    }
    if let Some(one_of) = &field.one_of
        && !one_of.contains(v)
    {
        let list: Vec<String> = one_of
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect();
        return Some(format!("expected one of: {}", list.join(", ")).into());
    }
    if let Some([min, max]) = field.between
        && let Some(n) = v.as_f64()
        && (n < min || n > max)
    {
        return Some(
            format!(
                "value should be between {} and {}",
                fmt_num(min),
                fmt_num(max)
            )
            .into(),
        );
    }
    if let Some(name) = &field.validator
        && let Err(msg) = checks::validate_named(name, v)
    {
        return Some(msg.into());
    }
    None
}

fn check_element(field: &Field, v: &Value) -> Option<Value> {
    if v.is_null() {
        return Some("required field missing".into());
    }
    check_value(field, v)
}

fn fmt_num(n: f64) -> String {
    if n.fract() == 0.0 {
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

/// The value at a dotted path (`config.redis.host`).
fn lookup<'a>(obj: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut v = obj.get(parts.next()?)?;
    for p in parts {
        v = v.get(p)?;
    }
    Some(v)
}

impl Registry {
    fn check_entity(
        &self,
        entity_checks: &[Check],
        obj: &mut Map<String, Value>,
        errors: &mut FieldErrors,
    ) {
        for check in entity_checks {
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
                    let n = names.iter().filter(|n| is_set(lookup(obj, n))).count();
                    if n > 1 {
                        errors.entity(format!(
                            "only one of these fields can be non-empty: {}",
                            quoted(names)
                        ));
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
                            "only one of these fields can be set: {}",
                            quoted(names)
                        ));
                    }
                }
                Check::Conditional(c) => {
                    // Kong skips a conditional whose if_field is unset.
                    let if_value = lookup(obj, &c.if_field).filter(|v| !v.is_null());
                    if if_value.is_some()
                        && matches(&c.if_match, if_value)
                        && !matches(&c.then_match, lookup(obj, &c.then_field))
                    {
                        let msg = describe_failed_match(&c.then_match);
                        errors.at(&c.then_field, msg);
                        if let Some(then_err) = &c.then_err {
                            errors.entity(then_err.replace("%s", &c.if_field));
                        }
                    }
                }
                Check::ConditionalAtLeastOneOf(c) => conditional_at_least_one_of(c, obj, errors),
                Check::Custom(name) if name == "plugin_config" => self.check_plugin(obj, errors),
                Check::Custom(name) => checks::custom_check(name, obj, errors),
            }
        }
    }
}

/// Kong's `conditional_at_least_one_of` entity checker (`kong/db/schema/init.lua`).
fn conditional_at_least_one_of(
    c: &super::ConditionalAtLeastOneOf,
    obj: &Map<String, Value>,
    errors: &mut FieldErrors,
) {
    let Some(if_value) = lookup(obj, &c.if_field).filter(|v| !v.is_null()) else {
        return;
    };
    let (names, err) = if matches(&c.if_match, Some(if_value)) {
        (&c.then_at_least_one_of, &c.then_err)
    } else {
        match (&c.else_match, &c.else_then_at_least_one_of) {
            (Some(else_match), Some(names)) if matches(else_match, Some(if_value)) => {
                (names, &c.else_then_err)
            }
            _ => return,
        }
    };
    if names.iter().any(|n| is_set(lookup(obj, n))) {
        return;
    }
    let list = quoted(names);
    errors.entity(match err {
        Some(err) => err.replace("%s", &list),
        None => format!("at least one of these fields must be non-empty: {list}"),
    });
}

fn matches(m: &Match, v: Option<&Value>) -> bool {
    let v_or_null = v.unwrap_or(&Value::Null);
    if let Some(list) = &m.not_one_of
        && list.contains(v_or_null)
    {
        return false;
    }
    if let Some(n) = m.len_eq {
        let len = match v_or_null {
            Value::String(s) => Some(s.chars().count()),
            Value::Array(a) => Some(a.len()),
            _ => None,
        };
        if len.is_some_and(|len| len != n) {
            return false;
        }
    }
    if let Some(each) = &m.elements {
        match v_or_null {
            Value::Array(items) => {
                if !items.iter().all(|item| matches(each, Some(item))) {
                    return false;
                }
            }
            Value::Null => {}
            _ => return false,
        }
    }
    if let Some(list) = &m.one_of
        && !list.contains(v_or_null)
    {
        return false;
    }
    if let Some(eq) = &m.eq
        && eq != v_or_null
    {
        return false;
    }
    if let Some(required) = m.required
        && required != is_set(v)
    {
        return false;
    }
    if let Some(needle) = &m.contains
        && !v_or_null.as_array().is_some_and(|a| a.contains(needle))
    {
        return false;
    }
    true
}

fn describe_failed_match(m: &Match) -> String {
    if m.required == Some(true) {
        return "required field missing".into();
    }
    if let Some(n) = m.len_eq {
        return format!("length must be {n}");
    }
    if let Some(Value::Null) = &m.eq {
        return "value must be null".into();
    }
    if let Some(eq) = &m.eq {
        return format!("value must be {eq}");
    }
    if let Some(list) = &m.one_of {
        let list: Vec<String> = list
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect();
        return format!("expected one of: {}", list.join(", "));
    }
    "invalid value".into()
}
