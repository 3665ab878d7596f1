//! Kong's schema endpoints (`kong/api/routes/kong.lua`): `GET /schemas/{name}`,
//! `POST /schemas/{name}/validate`, `GET /schemas/plugins/{name}` and
//! `POST /schemas/plugins/validate`, and the JSON form of a schema they show, Kong's
//! `schema_to_jsonable` (`kong/api/api_helpers.lua`): `{"fields": [{"<name>": {..}}],
//! "entity_checks": [..]}`.
//!
//! The JSON form is built from the registry's types alone, so it covers every entity and plugin
//! description, including ones added later. Keys are Kong's: a field shows `type`, `required`,
//! `default`, `unique`, `one_of`, `between`, `len_min`, `len_max`, `elements`, `keys`, `values`,
//! `fields`, `reference`, `on_delete`, `description` as Kong's definition would; generated
//! fields show `auto` (with `uuid` or `timestamp`), as Kong's typedefs do. deltaplane's own
//! keys (`since`, `validator` names, `transform`) are not shown: Kong's JSON form drops its
//! functions the same way.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::{AdminState, error_response, message, parse_input, read_payload};
use crate::cp::store::StoreError;
use crate::schema::{
    Auto, Check, Conditional, EntitySchema, Field, FieldType, Match, Mode, PluginSchema, Registry,
};

/// `GET /schemas/{name}`: an entity type by its DAO name (`keyauth_credentials`).
pub(super) async fn entity(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Response {
    match state.store.registry().get(&name) {
        Some(schema) => Json(entity_jsonable(schema)).into_response(),
        None => no_entity(&name),
    }
}

/// `GET /schemas/plugins/{name}`: the plugin's whole description (Kong's plugin subschema).
pub(super) async fn plugin(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
) -> Response {
    match state.store.registry().plugin(&name) {
        Some(plugin) => Json(plugin_jsonable(state.store.registry(), plugin)).into_response(),
        None => message(StatusCode::NOT_FOUND, &format!("No plugin named '{name}'")),
    }
}

/// `POST /schemas/{name}/validate`: the body validated as an insert of that entity, with no
/// database check (uniqueness and references are the write's), as Kong's `validate_schema`.
pub(super) async fn validate_entity(
    State(state): State<Arc<AdminState>>,
    Path(name): Path<String>,
    req: Request,
) -> Response {
    validate(&state, &name, req).await
}

/// `POST /schemas/plugins/validate`: a plugin, config included.
pub(super) async fn validate_plugin(
    State(state): State<Arc<AdminState>>,
    req: Request,
) -> Response {
    validate(&state, crate::schema::PLUGINS, req).await
}

async fn validate(state: &AdminState, name: &str, req: Request) -> Response {
    let registry = state.store.registry().clone();
    let Some(schema) = registry.get(name).cloned() else {
        return no_entity(name);
    };
    let headers = req.headers().clone();
    let payload = match read_payload(&headers, req.into_body(), state.body_limit).await {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let input = match parse_input(&registry, &schema, &headers, &payload) {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    match registry.prepare(&schema, input, None, Mode::Insert, crate::node::now_secs()) {
        Ok(_) => Json(json!({ "message": "schema validation successful" })).into_response(),
        Err(errors) => error_response(StoreError::Schema(errors)),
    }
}

fn no_entity(name: &str) -> Response {
    message(StatusCode::NOT_FOUND, &format!("No entity named '{name}'"))
}

/// Kong's `schema_to_jsonable` of an entity type.
pub fn entity_jsonable(schema: &EntitySchema) -> Value {
    json!({
        "fields": fields_jsonable(&schema.fields),
        "entity_checks": checks_jsonable(&schema.entity_checks),
    })
}

/// Kong's `schema_to_jsonable` of a plugin's subschema: `consumer` when the plugin cannot be
/// scoped to a consumer (`typedefs.no_consumer`), `protocols`, and `config` as a record.
pub fn plugin_jsonable(registry: &Registry, plugin: &PluginSchema) -> Value {
    let mut fields = Vec::new();
    // `no_consumer` is about the plugin entity's `consumer` foreign field; its reference comes
    // from the registry.
    let consumer = registry
        .get(crate::schema::PLUGINS)
        .and_then(|p| p.field("consumer"))
        .filter(|f| f.ty == FieldType::Foreign);
    if plugin.no_consumer
        && let Some(field) = consumer
    {
        let mut one = json!({"type": "foreign", "eq": null});
        if let Some(reference) = &field.reference {
            one["reference"] = json!(reference);
        }
        fields.push(json!({ field.name.clone(): one }));
    }
    if plugin.protocols_default.is_some() || plugin.protocols_one_of.is_some() {
        let mut elements = json!({"type": "string"});
        if let Some(one_of) = &plugin.protocols_one_of {
            elements["one_of"] = json!(one_of);
        }
        let mut protocols = json!({"type": "set", "required": true, "elements": elements});
        if let Some(default) = &plugin.protocols_default {
            protocols["default"] = json!(default);
        }
        fields.push(json!({ "protocols": protocols }));
    }
    fields.push(json!({ "config": field_jsonable(&plugin.config) }));
    json!({
        "fields": fields,
        "entity_checks": checks_jsonable(&plugin.entity_checks),
    })
}

fn fields_jsonable(fields: &[Field]) -> Value {
    fields
        .iter()
        .map(|f| {
            let mut one = Map::new();
            one.insert(f.name.clone(), field_jsonable(f));
            Value::Object(one)
        })
        .collect()
}

fn field_jsonable(f: &Field) -> Value {
    let mut out = Map::new();
    let ty = match f.ty {
        FieldType::String => "string",
        FieldType::Integer => "integer",
        FieldType::Number => "number",
        FieldType::Boolean => "boolean",
        FieldType::Array => "array",
        FieldType::Set => "set",
        FieldType::Map => "map",
        // Kong's entities make records required so that they show their whole structure
        // (`make_records_required` in `kong/db/schema/entity.lua`).
        FieldType::Record => {
            out.insert("required".into(), Value::Bool(true));
            "record"
        }
        FieldType::Foreign => "foreign",
        // Free-form objects (`plugins.config`, whose shape is the plugin's): Kong declares
        // them as records.
        FieldType::Json => "record",
    };
    out.insert("type".into(), ty.into());
    if f.required {
        out.insert("required".into(), Value::Bool(true));
    }
    if let Some(default) = &f.default {
        out.insert("default".into(), default.clone());
    }
    match f.auto {
        Some(Auto::Uuid) => {
            out.insert("uuid".into(), Value::Bool(true));
            out.insert("auto".into(), Value::Bool(true));
        }
        Some(Auto::Timestamp | Auto::TimestampMs) => {
            out.insert("timestamp".into(), Value::Bool(true));
            out.insert("auto".into(), Value::Bool(true));
        }
        None => {}
    }
    if f.generate.is_some() {
        out.insert("auto".into(), Value::Bool(true));
    }
    if f.validator.as_deref() == Some("uuid") {
        out.insert("uuid".into(), Value::Bool(true));
    }
    if f.unique {
        out.insert("unique".into(), Value::Bool(true));
    }
    if let Some(one_of) = &f.one_of {
        out.insert("one_of".into(), Value::Array(one_of.clone()));
    }
    if let Some([min, max]) = f.between {
        out.insert("between".into(), json!([number(min), number(max)]));
    }
    if let Some(n) = f.len_min {
        out.insert("len_min".into(), n.into());
    }
    if let Some(n) = f.len_max {
        out.insert("len_max".into(), n.into());
    }
    for (key, sub) in [
        ("elements", &f.elements),
        ("keys", &f.keys),
        ("values", &f.values),
    ] {
        if let Some(sub) = sub {
            out.insert(key.into(), field_jsonable(sub));
        }
    }
    if let Some(fields) = &f.fields {
        out.insert("fields".into(), fields_jsonable(fields));
    }
    if let Some(reference) = &f.reference {
        out.insert("reference".into(), reference.clone().into());
    }
    if let Some(on_delete) = f.on_delete {
        let rule = match on_delete {
            crate::schema::OnDelete::Restrict => "restrict",
            crate::schema::OnDelete::Cascade => "cascade",
            crate::schema::OnDelete::Null => "null",
        };
        out.insert("on_delete".into(), rule.into());
    }
    for (key, v) in [("eq", &f.eq), ("ne", &f.ne)] {
        if let Some(v) = v {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(err) = &f.err {
        out.insert("err".into(), err.clone().into());
    }
    if let Some(subsets) = &f.mutually_exclusive_subsets {
        out.insert("mutually_exclusive_subsets".into(), json!(subsets));
    }
    if let Some(list) = &f.not_one_of {
        out.insert("not_one_of".into(), Value::Array(list.clone()));
    }
    if let Some(n) = f.gt {
        out.insert("gt".into(), number(n));
    }
    if let Some(n) = f.len_eq {
        out.insert("len_eq".into(), n.into());
    }
    if let Some(prefix) = &f.starts_with {
        out.insert("starts_with".into(), prefix.clone().into());
    }
    for (key, p) in [("match", &f.match_pattern), ("not_match", &f.not_match)] {
        if let Some(p) = p {
            out.insert(key.into(), p.as_str().into());
        }
    }
    for (key, rules) in [("match_all", &f.match_all), ("match_none", &f.match_none)] {
        if let Some(rules) = rules {
            let list: Vec<Value> = rules
                .iter()
                .map(|r| json!({"pattern": r.pattern.as_str(), "err": r.err}))
                .collect();
            out.insert(key.into(), list.into());
        }
    }
    if let Some(any) = &f.match_any {
        let patterns: Vec<&str> = any.patterns.iter().map(|p| p.as_str()).collect();
        out.insert(
            "match_any".into(),
            json!({"patterns": patterns, "err": any.err}),
        );
    }
    if f.is_regex {
        out.insert("is_regex".into(), Value::Bool(true));
    }
    if let Some(v) = &f.contains {
        out.insert("contains".into(), v.clone());
    }
    if f.referenceable {
        out.insert("referenceable".into(), Value::Bool(true));
    }
    if f.encrypted {
        out.insert("encrypted".into(), Value::Bool(true));
    }
    if !f.entity_checks.is_empty() {
        out.insert("entity_checks".into(), checks_jsonable(&f.entity_checks));
    }
    if !f.shorthand_fields.is_empty() {
        out.insert(
            "shorthand_fields".into(),
            fields_jsonable(&f.shorthand_fields),
        );
    }
    if let Some(d) = &f.deprecation {
        out.insert(
            "deprecation".into(),
            json!({"message": d.message, "removal_in_version": d.removal_in_version}),
        );
    }
    if let Some(description) = &f.description {
        out.insert("description".into(), description.clone().into());
    }
    Value::Object(out)
}

/// An integral bound as an integer (`[0, 65535]`), as Kong's JSON shows it.
fn number(n: f64) -> Value {
    if n.fract() == 0.0 && n.abs() < 9.0e15 {
        Value::from(n as i64)
    } else {
        json!(n)
    }
}

fn checks_jsonable(checks: &[Check]) -> Value {
    checks
        .iter()
        .map(|c| match c {
            Check::AtLeastOneOf(names) => json!({ "at_least_one_of": names }),
            Check::OnlyOneOf(names) => json!({ "only_one_of": names }),
            Check::MutuallyRequired(names) => json!({ "mutually_required": names }),
            Check::MutuallyExclusive(names) => json!({ "mutually_exclusive": names }),
            Check::Distinct(names) => json!({ "distinct": names }),
            Check::MutuallyExclusiveSets(sets) => {
                json!({ "mutually_exclusive_sets": { "set1": sets.set1, "set2": sets.set2 } })
            }
            Check::CustomEntityCheck(c) => json!({
                "custom_entity_check": { "field_sources": c.field_sources, "name": c.name }
            }),
            Check::Conditional(c) => json!({ "conditional": conditional_jsonable(c) }),
            Check::ConditionalAtLeastOneOf(c) => {
                let mut out = json!({
                    "if_field": c.if_field,
                    "if_match": match_jsonable(&c.if_match),
                    "then_at_least_one_of": c.then_at_least_one_of,
                });
                if let Some(e) = &c.then_err {
                    out["then_err"] = json!(e);
                }
                if let Some(m) = &c.else_match {
                    out["else_match"] = match_jsonable(m);
                }
                if !c.else_then_at_least_one_of.is_empty() {
                    out["else_then_at_least_one_of"] = json!(c.else_then_at_least_one_of);
                }
                if let Some(e) = &c.else_then_err {
                    out["else_then_err"] = json!(e);
                }
                json!({ "conditional_at_least_one_of": out })
            }
            // A named rule implemented in code: Kong shows its `custom_entity_check` without
            // the function; the name says which rule it is.
            Check::Custom(name) => json!({ "custom_entity_check": { "name": name } }),
        })
        .collect()
}

fn conditional_jsonable(c: &Conditional) -> Value {
    let mut out = json!({
        "if_field": c.if_field,
        "if_match": match_jsonable(&c.if_match),
        "then_field": c.then_field,
        "then_match": match_jsonable(&c.then_match),
    });
    if let Some(e) = &c.then_err {
        out["then_err"] = json!(e);
    }
    out
}

fn match_jsonable(m: &Match) -> Value {
    let mut out = Map::new();
    if let Some(one_of) = &m.one_of {
        out.insert("one_of".into(), Value::Array(one_of.clone()));
    }
    if let Some(eq) = &m.eq {
        out.insert("eq".into(), eq.clone());
    }
    if let Some(required) = m.required {
        out.insert("required".into(), Value::Bool(required));
    }
    if let Some(contains) = &m.contains {
        out.insert("contains".into(), contains.clone());
    }
    if let Some(list) = &m.not_one_of {
        out.insert("not_one_of".into(), Value::Array(list.clone()));
    }
    if let Some(n) = m.len_eq {
        out.insert("len_eq".into(), n.into());
    }
    if let Some(each) = &m.elements {
        out.insert("elements".into(), match_jsonable(each));
    }
    Value::Object(out)
}
