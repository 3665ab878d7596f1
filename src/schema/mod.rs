//! Entity descriptions loaded from `schema/*.json`, and the generic engine that validates,
//! defaults and orders entities from them.
//!
//! Nothing here knows about a particular entity type except the named validators, custom checks
//! and shorthands in `checks.rs`, which the schema files refer to by name.

mod checks;
mod compat;
pub mod form;
pub mod index;
mod lua_pattern;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::Value;

pub use checks::is_uuid;
pub use lua_pattern::LuaPattern;
pub use validate::{FieldErrors, Mode, Prepared};

/// The Kong line whose entity shapes deltaplane follows.
pub const KONG_COMPAT_VERSION: &str = "3.10.0";

/// The workspace type. Named outside `schema/` only where Kong has no generic rule: the
/// control plane's store creates the `default` workspace, the Admin API serves no workspace
/// paths (open-source Kong), and a configuration of nothing but workspaces hashes as empty.
pub const WORKSPACES: &str = "workspaces";

/// The plugin type. Named outside `schema/` only for Kong's plugin compatibility check (which
/// plugins a configuration uses).
pub const PLUGINS: &str = "plugins";

/// One entity type, as described by `schema/<name>.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySchema {
    pub name: String,
    pub admin_api_name: String,
    #[serde(default)]
    pub admin_api_nested_name: Option<String>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default = "default_pk")]
    pub primary_key: String,
    #[serde(default)]
    pub endpoint_key: Option<String>,
    #[serde(default)]
    pub cache_key: Option<Vec<String>>,
    #[serde(default = "yes")]
    pub workspaceable: bool,
    #[serde(default)]
    pub ttl: bool,
    #[serde(default)]
    pub shorthands: Vec<String>,
    #[serde(default)]
    pub transient_fields: Vec<String>,
    pub fields: Vec<Field>,
    #[serde(default)]
    pub entity_checks: Vec<Check>,
}

fn default_pk() -> String {
    "id".to_owned()
}

fn yes() -> bool {
    true
}

/// A field, or (without a name) the element description of an array, set or map.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FieldType,
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<Value>,
    #[serde(default)]
    pub auto: Option<Auto>,
    #[serde(default)]
    pub generate: Option<Generate>,
    #[serde(default)]
    pub unique: bool,
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub between: Option<[f64; 2]>,
    #[serde(default)]
    pub len_min: Option<usize>,
    #[serde(default)]
    pub len_max: Option<usize>,
    #[serde(default)]
    pub validator: Option<String>,
    #[serde(default)]
    pub elements: Option<Box<Field>>,
    #[serde(default)]
    pub keys: Option<Box<Field>>,
    #[serde(default)]
    pub values: Option<Box<Field>>,
    #[serde(default)]
    pub fields: Option<Vec<Field>>,
    #[serde(default)]
    pub reference: Option<String>,
    #[serde(default)]
    pub on_delete: Option<OnDelete>,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub transform: Option<String>,
    /// Free text kept from Kong's description; ignored by the engine.
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    String,
    Integer,
    Number,
    Boolean,
    Array,
    Set,
    Map,
    Record,
    Foreign,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auto {
    Uuid,
    /// Seconds since the epoch, an integer.
    Timestamp,
    /// Seconds since the epoch with millisecond precision (Kong's `auto_timestamp_ms`).
    #[serde(rename = "timestamp_ms")]
    TimestampMs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Generate {
    Uuid,
    RandomSecret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnDelete {
    #[default]
    Restrict,
    Cascade,
    Null,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Check {
    AtLeastOneOf(Vec<String>),
    OnlyOneOf(Vec<String>),
    MutuallyRequired(Vec<String>),
    MutuallyExclusive(Vec<String>),
    Conditional(Box<Conditional>),
    Custom(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditional {
    pub if_field: String,
    pub if_match: Match,
    pub then_field: String,
    pub then_match: Match,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    /// `Some(Value::Null)` means "must be null"; absent means "no constraint".
    #[serde(default, deserialize_with = "deserialize_some")]
    pub eq: Option<Value>,
    #[serde(default)]
    pub required: Option<bool>,
    #[serde(default)]
    pub contains: Option<Value>,
}

fn deserialize_some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A plugin's config description, from `schema/plugins/<name>.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSchema {
    pub name: String,
    #[serde(default)]
    pub since: Option<String>,
    #[serde(default)]
    pub protocols_default: Option<Vec<String>>,
    /// The protocols this plugin can run on.
    #[serde(default)]
    pub protocols_one_of: Option<Vec<String>>,
    /// Kong's `typedefs.no_consumer`: the plugin cannot be scoped to a consumer.
    #[serde(default)]
    pub no_consumer: bool,
    #[serde(default)]
    pub shorthands: Vec<String>,
    pub config: Vec<Field>,
    /// Checks over the whole plugin entity; paths such as `config.second` reach into records.
    #[serde(default)]
    pub entity_checks: Vec<Check>,
}

/// A foreign key from `child.field` to `parent`, with its delete rule.
#[derive(Debug, Clone)]
pub struct ForeignKey {
    pub child: String,
    pub field: String,
    pub parent: String,
    pub on_delete: OnDelete,
    /// True for an array of ids (`services.ca_certificates`) rather than a `{"id"}` object.
    pub is_array: bool,
}

/// Every entity type, in dependency order (parents before children).
#[derive(Debug)]
pub struct Registry {
    entities: Vec<Arc<EntitySchema>>,
    by_name: HashMap<String, usize>,
    by_admin_name: HashMap<String, usize>,
    plugins: BTreeMap<String, PluginSchema>,
    foreign_keys: Vec<ForeignKey>,
}

macro_rules! embed {
    ($($file:literal),* $(,)?) => { &[$(($file, include_str!(concat!("../../schema/", $file)))),*] };
}

const ENTITY_FILES: &[(&str, &str)] = embed!(
    "workspaces.json",
    "services.json",
    "routes.json",
    "consumers.json",
    "plugins.json",
    "upstreams.json",
    "targets.json",
    "certificates.json",
    "snis.json",
    "ca_certificates.json",
    "keyauth_credentials.json",
    "basicauth_credentials.json",
    "jwt_secrets.json",
    "acls.json",
);

const PLUGIN_FILES: &[(&str, &str)] = embed!(
    "plugins/key-auth.json",
    "plugins/basic-auth.json",
    "plugins/jwt.json",
    "plugins/acl.json",
    "plugins/rate-limiting.json",
    "plugins/cors.json",
);

impl Registry {
    /// The registry built from the schema files compiled into this binary.
    pub fn builtin() -> &'static Arc<Registry> {
        static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            Arc::new(
                Registry::from_sources(ENTITY_FILES, PLUGIN_FILES)
                    .expect("the embedded schema files are valid (checked by unit tests)"),
            )
        })
    }

    pub fn from_sources(
        entities: &[(&str, &str)],
        plugins: &[(&str, &str)],
    ) -> anyhow::Result<Registry> {
        let mut parsed = Vec::new();
        for (file, text) in entities {
            let schema: EntitySchema =
                serde_json::from_str(text).map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            parsed.push(schema);
        }
        let mut plugin_map = BTreeMap::new();
        for (file, text) in plugins {
            let schema: PluginSchema =
                serde_json::from_str(text).map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            plugin_map.insert(schema.name.clone(), schema);
        }
        let mut foreign_keys = Vec::new();
        for schema in &parsed {
            for field in &schema.fields {
                match field.ty {
                    FieldType::Foreign => foreign_keys.push(ForeignKey {
                        child: schema.name.clone(),
                        field: field.name.clone(),
                        parent: field.reference.clone().ok_or_else(|| {
                            anyhow::anyhow!(
                                "{}.{}: foreign without reference",
                                schema.name,
                                field.name
                            )
                        })?,
                        on_delete: field.on_delete.unwrap_or_default(),
                        is_array: false,
                    }),
                    FieldType::Array | FieldType::Set => {
                        if let Some(parent) =
                            field.elements.as_ref().and_then(|e| e.reference.clone())
                        {
                            foreign_keys.push(ForeignKey {
                                child: schema.name.clone(),
                                field: field.name.clone(),
                                parent,
                                on_delete: OnDelete::Restrict,
                                is_array: true,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
        for schema in &parsed {
            check_names(
                &schema.name,
                &schema.fields,
                &schema.entity_checks,
                &schema.shorthands,
            )?;
        }
        for plugin in plugin_map.values() {
            check_names(
                &plugin.name,
                &plugin.config,
                &plugin.entity_checks,
                &plugin.shorthands,
            )?;
        }
        let ordered = topological_order(parsed, &foreign_keys)?;
        let entities: Vec<Arc<EntitySchema>> = ordered.into_iter().map(Arc::new).collect();
        let by_name = entities
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let by_admin_name = entities
            .iter()
            .enumerate()
            .map(|(i, s)| (s.admin_api_name.clone(), i))
            .collect();
        for fk in &foreign_keys {
            anyhow::ensure!(
                entities.iter().any(|s| s.name == fk.parent),
                "{}.{} references unknown entity {}",
                fk.child,
                fk.field,
                fk.parent
            );
        }
        Ok(Registry {
            entities,
            by_name,
            by_admin_name,
            plugins: plugin_map,
            foreign_keys,
        })
    }

    /// Entity types in dependency order: every parent comes before its children.
    pub fn entities(&self) -> impl Iterator<Item = &Arc<EntitySchema>> {
        self.entities.iter()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<EntitySchema>> {
        self.by_name.get(name).map(|&i| &self.entities[i])
    }

    pub fn by_admin_name(&self, admin_name: &str) -> Option<&Arc<EntitySchema>> {
        self.by_admin_name
            .get(admin_name)
            .map(|&i| &self.entities[i])
    }

    /// Position in dependency order, used to sort deltas.
    pub fn rank(&self, name: &str) -> usize {
        self.by_name.get(name).copied().unwrap_or(usize::MAX)
    }

    pub fn plugin(&self, name: &str) -> Option<&PluginSchema> {
        self.plugins.get(name)
    }

    pub fn plugins(&self) -> impl Iterator<Item = &PluginSchema> {
        self.plugins.values()
    }

    pub fn foreign_keys(&self) -> &[ForeignKey] {
        &self.foreign_keys
    }

    /// Foreign keys that point at `parent`.
    pub fn referencing(&self, parent: &str) -> impl Iterator<Item = &ForeignKey> {
        self.foreign_keys
            .iter()
            .filter(move |fk| fk.parent == parent)
    }

    /// Foreign keys declared on `child`.
    pub fn references_of(&self, child: &str) -> impl Iterator<Item = &ForeignKey> {
        self.foreign_keys.iter().filter(move |fk| fk.child == child)
    }
}

impl EntitySchema {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Fields whose values must be unique within a workspace (besides the primary key).
    pub fn unique_fields(&self) -> impl Iterator<Item = &Field> {
        self.fields
            .iter()
            .filter(|f| f.unique && f.name != self.primary_key)
    }

    /// The `{"id": ..}` primary key object of a stored entity.
    pub fn pk_of(&self, entity: &Value) -> Value {
        let mut pk = serde_json::Map::new();
        pk.insert(
            self.primary_key.clone(),
            entity
                .get(&self.primary_key)
                .cloned()
                .unwrap_or(Value::Null),
        );
        Value::Object(pk)
    }

    pub fn has_tags(&self) -> bool {
        self.field("tags").is_some()
    }
}

/// Every validator, custom check, shorthand and transform a schema names must exist.
fn check_names(
    owner: &str,
    fields: &[Field],
    entity_checks: &[Check],
    shorthands: &[String],
) -> anyhow::Result<()> {
    fn walk(owner: &str, f: &Field) -> anyhow::Result<()> {
        if let Some(v) = &f.validator {
            anyhow::ensure!(
                checks::VALIDATORS.contains(&v.as_str()),
                "{owner}.{}: unknown validator '{v}'",
                f.name
            );
        }
        if let Some(t) = &f.transform {
            anyhow::ensure!(
                checks::TRANSFORMS.contains(&t.as_str()),
                "{owner}.{}: unknown transform '{t}'",
                f.name
            );
        }
        for sub in [&f.elements, &f.keys, &f.values].into_iter().flatten() {
            walk(owner, sub)?;
        }
        for sub in f.fields.iter().flatten() {
            walk(owner, sub)?;
        }
        Ok(())
    }
    for f in fields {
        walk(owner, f)?;
    }
    for c in entity_checks {
        if let Check::Custom(name) = c {
            anyhow::ensure!(
                checks::CUSTOM_CHECKS.contains(&name.as_str()),
                "{owner}: unknown custom check '{name}'"
            );
        }
    }
    for s in shorthands {
        anyhow::ensure!(
            checks::SHORTHANDS.contains(&s.as_str()),
            "{owner}: unknown shorthand '{s}'"
        );
    }
    Ok(())
}

fn topological_order(
    mut schemas: Vec<EntitySchema>,
    foreign_keys: &[ForeignKey],
) -> anyhow::Result<Vec<EntitySchema>> {
    // Kahn's algorithm, stable with respect to the file order so that the order is deterministic.
    let mut out = Vec::with_capacity(schemas.len());
    while !schemas.is_empty() {
        let ready = schemas.iter().position(|s| {
            foreign_keys
                .iter()
                .filter(|fk| fk.child == s.name && fk.parent != s.name)
                .all(|fk| !schemas.iter().any(|other| other.name == fk.parent))
        });
        match ready {
            Some(i) => out.push(schemas.remove(i)),
            None => anyhow::bail!(
                "foreign keys form a cycle among: {}",
                schemas
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    // Workspaces always come first: every other entity lives in one.
    if let Some(i) = out.iter().position(|s| s.name == "workspaces") {
        let ws = out.remove(i);
        out.insert(0, ws);
    }
    Ok(out)
}

/// Compares dotted versions numerically (`"3.10.0" > "3.9.1"`).
pub fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parse = |s: &str| -> Vec<u64> {
        s.split(['.', '-'])
            .map(|p| p.parse::<u64>().unwrap_or(0))
            .collect()
    };
    parse(a).cmp(&parse(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_schemas_load_in_dependency_order() {
        let r = Registry::builtin();
        let names: Vec<&str> = r.entities().map(|s| s.name.as_str()).collect();
        assert_eq!(names[0], "workspaces");
        for fk in r.foreign_keys() {
            assert!(
                r.rank(&fk.parent) < r.rank(&fk.child) || fk.parent == fk.child,
                "{} before {}",
                fk.parent,
                fk.child
            );
        }
        for expected in [
            "services",
            "routes",
            "consumers",
            "plugins",
            "upstreams",
            "targets",
            "certificates",
            "snis",
            "ca_certificates",
            "keyauth_credentials",
            "basicauth_credentials",
            "jwt_secrets",
            "acls",
        ] {
            assert!(r.get(expected).is_some(), "{expected}");
        }
        assert_eq!(
            r.by_admin_name("key-auths").unwrap().name,
            "keyauth_credentials"
        );
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(version_cmp("3.10.0", "3.9.1"), std::cmp::Ordering::Greater);
        assert_eq!(version_cmp("3.10.0", "3.10.0"), std::cmp::Ordering::Equal);
    }
}
