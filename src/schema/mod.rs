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
mod typedefs;
mod validate;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use serde::Deserialize;
use serde_json::Value;

pub use checks::{is_uuid, validate_named};
pub use lua_pattern::LuaPattern;
pub use validate::{FieldErrors, Mode, Prepared};

/// The Kong line whose entity shapes deltaplane follows.
pub const KONG_COMPAT_VERSION: &str = "3.10.0";

/// The workspace type. Named outside `schema/` only where Kong has no generic rule: the
/// control plane's store creates the `default` workspace, the Admin API serves no workspace
/// paths (open-source Kong), and a configuration of nothing but workspaces hashes as empty.
pub const WORKSPACES: &str = "workspaces";

/// The plugins bundled with open-source Kong 3.10, in the order of Kong's
/// `kong/constants.lua` (`plugins`): what a Kong node's `plugins = bundled` loads.
pub const BUNDLED_PLUGINS: [&str; 45] = [
    "jwt",
    "acl",
    "correlation-id",
    "cors",
    "oauth2",
    "tcp-log",
    "udp-log",
    "file-log",
    "http-log",
    "key-auth",
    "hmac-auth",
    "basic-auth",
    "ip-restriction",
    "request-transformer",
    "response-transformer",
    "request-size-limiting",
    "rate-limiting",
    "response-ratelimiting",
    "syslog",
    "loggly",
    "datadog",
    "ldap-auth",
    "statsd",
    "bot-detection",
    "aws-lambda",
    "request-termination",
    "prometheus",
    "proxy-cache",
    "session",
    "acme",
    "grpc-gateway",
    "grpc-web",
    "pre-function",
    "post-function",
    "azure-functions",
    "zipkin",
    "opentelemetry",
    "ai-proxy",
    "ai-prompt-decorator",
    "ai-prompt-template",
    "ai-prompt-guard",
    "ai-request-transformer",
    "ai-response-transformer",
    "standard-webhooks",
    "redirect",
];

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
    /// The field whose value picks a subschema (Kong's `subschema_key`; routes: `protocols`).
    #[serde(default)]
    pub subschema_key: Option<String>,
    /// Specialisations by the value of `subschema_key` (Kong's subschemas).
    #[serde(default)]
    pub subschemas: Vec<Subschema>,
    /// A path key that is not a UUID names a child entity by its endpoint key, and means the
    /// entity that child references (`/certificates/{sni}`).
    #[serde(default)]
    pub alias_key: Option<AliasKey>,
    /// This schema with each subschema applied, built by the registry at load.
    #[serde(skip)]
    specialized: Vec<(Vec<String>, Arc<EntitySchema>)>,
}

/// How a path key names an entity through one of its children (Kong's `prepare_params` in
/// `kong/api/routes/certificates.lua`: a certificate by one of its SNIs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AliasKey {
    /// The child type, found by its endpoint key; it has a foreign key to this type.
    pub entity: String,
    /// The 404 message when no child has that key (`SNI not found`).
    pub not_found: String,
}

/// A specialisation of an entity type, chosen by the value of its `subschema_key`: for a
/// string, the subschema listing it; for an array or set, the one listing its first element
/// that any subschema lists (Kong's `get_subschema`). Its fields replace the base fields of the
/// same name (same type), defaults included; its entity checks run after the base ones.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subschema {
    pub keys: Vec<String>,
    #[serde(default)]
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
///
/// The validation keys mirror Kong's schema validators (`kong/db/schema/init.lua`
/// `Schema.validators`) and run in Kong's order; see `schema/README.md`.
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
    /// `Some(Value::Null)`: the value must be null (Kong's `eq = null`, e.g. `no_consumer`).
    #[serde(default, deserialize_with = "deserialize_some")]
    pub eq: Option<Value>,
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub not_one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub between: Option<[f64; 2]>,
    #[serde(default)]
    pub len_eq: Option<usize>,
    #[serde(default)]
    pub len_min: Option<usize>,
    #[serde(default)]
    pub len_max: Option<usize>,
    #[serde(default)]
    pub starts_with: Option<String>,
    #[serde(default, rename = "match")]
    pub match_pattern: Option<LuaPattern>,
    #[serde(default)]
    pub not_match: Option<LuaPattern>,
    #[serde(default)]
    pub match_all: Option<Vec<PatternRule>>,
    #[serde(default)]
    pub match_none: Option<Vec<PatternRule>>,
    #[serde(default)]
    pub match_any: Option<MatchAny>,
    #[serde(default)]
    pub is_regex: bool,
    #[serde(default)]
    pub contains: Option<Value>,
    #[serde(default)]
    pub validator: Option<String>,
    /// Replaces the message of a failed validator (Kong's `err`), not of a type error.
    #[serde(default)]
    pub err: Option<String>,
    /// A `{vault://...}` reference is accepted in place of the value (validators are skipped).
    #[serde(default)]
    pub referenceable: bool,
    /// Kong Enterprise encrypts the value at rest; recorded, no effect in open-source Kong.
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub elements: Option<Box<Field>>,
    #[serde(default)]
    pub keys: Option<Box<Field>>,
    #[serde(default)]
    pub values: Option<Box<Field>>,
    #[serde(default)]
    pub fields: Option<Vec<Field>>,
    /// Checks over a record's fields, paths relative to the record.
    #[serde(default)]
    pub entity_checks: Vec<Check>,
    /// Input-only fields of a record, rewritten into its real fields before defaults apply.
    #[serde(default)]
    pub shorthand_fields: Vec<Field>,
    /// For a shorthand field: where its value goes (dotted, relative to the record); absent
    /// means the value is accepted and dropped.
    #[serde(default)]
    pub path: Option<String>,
    /// For a shorthand field: string values replaced before the value is moved.
    #[serde(default)]
    pub map_values: Option<BTreeMap<String, Value>>,
    /// For a shorthand field: the value moved when the input is null.
    #[serde(default, deserialize_with = "deserialize_some")]
    pub null_value: Option<Value>,
    /// Kong's `deprecation`. On a shorthand field it also means the real field wins when both
    /// are given.
    #[serde(default)]
    pub deprecation: Option<Deprecation>,
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
    /// The value must not equal this, Kong's `ne`.
    #[serde(default, deserialize_with = "deserialize_some")]
    pub ne: Option<Value>,
    /// For arrays and sets: elements must all come from one of these subsets (Kong's
    /// `mutually_exclusive_subsets`).
    #[serde(default)]
    pub mutually_exclusive_subsets: Option<Vec<Vec<Value>>>,
}

/// One entry of `match_all` / `match_none`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatternRule {
    pub pattern: LuaPattern,
    pub err: String,
}

/// `match_any`: at least one pattern must match, else `err`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchAny {
    pub patterns: Vec<LuaPattern>,
    pub err: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deprecation {
    pub message: String,
    pub removal_in_version: String,
    /// The default Kong no longer warns about.
    #[serde(default, deserialize_with = "deserialize_some")]
    pub old_default: Option<Value>,
}

impl<'de> Deserialize<'de> for LuaPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let source = String::deserialize(d)?;
        LuaPattern::new(&source)
            .map_err(|e| serde::de::Error::custom(format!("Lua pattern {source:?}: {e}")))
    }
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
    /// 32 alphanumeric characters (Kong's `kong.tools.rand.random_string`, which `auto = true`
    /// strings get: jwt secrets, oauth2's `provision_key`).
    RandomSecret,
    /// 44 characters: base64 of 32 random bytes with `/`, `+`, `=` replaced by a digit, an
    /// upper-case and a lower-case letter (the session plugin's `random_string`).
    RandomBase64Secret,
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
    Distinct(Vec<String>),
    MutuallyExclusiveSets(Box<ExclusiveSets>),
    Conditional(Box<Conditional>),
    ConditionalAtLeastOneOf(Box<ConditionalAtLeastOneOf>),
    /// A check implemented in `checks.rs`, run on the whole entity (or record).
    Custom(String),
    /// Kong's `custom_entity_check`: a named check that runs only when its `field_sources`
    /// are present and valid.
    CustomEntityCheck(Box<CustomEntityCheck>),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conditional {
    pub if_field: String,
    pub if_match: Match,
    pub then_field: String,
    pub then_match: Match,
    /// An entity-level message added when `then_match` fails (Kong's `then_err`).
    #[serde(default)]
    pub then_err: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConditionalAtLeastOneOf {
    pub if_field: String,
    pub if_match: Match,
    pub then_at_least_one_of: Vec<String>,
    /// `%s` is replaced by the quoted field list.
    #[serde(default)]
    pub then_err: Option<String>,
    #[serde(default)]
    pub else_match: Option<Match>,
    #[serde(default)]
    pub else_then_at_least_one_of: Vec<String>,
    #[serde(default)]
    pub else_then_err: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExclusiveSets {
    pub set1: Vec<String>,
    pub set2: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomEntityCheck {
    pub name: String,
    pub field_sources: Vec<String>,
}

/// The validators a conditional check applies to one value (Kong's `if_match` / `then_match`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Match {
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    #[serde(default)]
    pub not_one_of: Option<Vec<Value>>,
    /// `Some(Value::Null)` means "must be null"; absent means "no constraint".
    #[serde(default, deserialize_with = "deserialize_some")]
    pub eq: Option<Value>,
    #[serde(default)]
    pub gt: Option<f64>,
    #[serde(default)]
    pub required: Option<bool>,
    #[serde(default)]
    pub contains: Option<Value>,
    #[serde(default, rename = "match")]
    pub match_pattern: Option<LuaPattern>,
    /// Length of a string or an array; a null value passes.
    #[serde(default)]
    pub len_eq: Option<usize>,
    /// Every element of an array or set matches (an empty one does).
    #[serde(default)]
    pub elements: Option<Box<Match>>,
    /// These validators as a field of the type they were first applied to, built once
    /// (`validate::match_error`): building it per value cloned every list and pattern of
    /// the match (issue 11: a fifth of a data plane's validation of a full sync).
    #[serde(skip)]
    pub(crate) as_field: std::sync::OnceLock<(FieldType, Box<Field>)>,
}

fn deserialize_some<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// A plugin's description, from `schema/plugins/<name>.json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSchema {
    pub name: String,
    /// The handler's `VERSION` (`kong/plugins/<name>/handler.lua`).
    pub version: String,
    /// The handler's `PRIORITY`: plugins run from the highest to the lowest.
    pub priority: i64,
    /// The first Kong release that bundled the plugin.
    pub since: String,
    /// Fields added after the plugin (dotted paths under `config`), from Kong's
    /// `kong/clustering/compat/removed_fields.lua`: every other field gets `since`.
    #[serde(default)]
    pub since_fields: BTreeMap<String, String>,
    #[serde(default)]
    pub protocols_default: Option<Vec<String>>,
    /// The protocols this plugin can run on.
    #[serde(default)]
    pub protocols_one_of: Option<Vec<String>>,
    /// Kong's `typedefs.no_consumer`: the plugin cannot be scoped to a consumer.
    #[serde(default)]
    pub no_consumer: bool,
    /// Kong's `typedefs.no_service`: the plugin cannot be scoped to a service.
    #[serde(default)]
    pub no_service: bool,
    /// Kong's `typedefs.no_route`: the plugin cannot be scoped to a route.
    #[serde(default)]
    pub no_route: bool,
    /// Named input conveniences over `config` implemented in `checks.rs`.
    #[serde(default)]
    pub shorthands: Vec<String>,
    /// The `config` record: its fields, checks, validator and shorthand fields.
    pub config: Field,
    /// Checks over the whole plugin entity; paths such as `config.second` reach into records.
    #[serde(default)]
    pub entity_checks: Vec<Check>,
}

impl PluginSchema {
    /// The fields of `config`.
    pub fn config_fields(&self) -> &[Field] {
        self.config.fields.as_deref().unwrap_or(&[])
    }
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
    "plugins/acl.json",
    "plugins/acme.json",
    "plugins/ai-prompt-decorator.json",
    "plugins/ai-prompt-guard.json",
    "plugins/ai-prompt-template.json",
    "plugins/ai-proxy.json",
    "plugins/ai-request-transformer.json",
    "plugins/ai-response-transformer.json",
    "plugins/aws-lambda.json",
    "plugins/azure-functions.json",
    "plugins/basic-auth.json",
    "plugins/bot-detection.json",
    "plugins/correlation-id.json",
    "plugins/cors.json",
    "plugins/datadog.json",
    "plugins/file-log.json",
    "plugins/grpc-gateway.json",
    "plugins/grpc-web.json",
    "plugins/hmac-auth.json",
    "plugins/http-log.json",
    "plugins/ip-restriction.json",
    "plugins/jwt.json",
    "plugins/key-auth.json",
    "plugins/ldap-auth.json",
    "plugins/loggly.json",
    "plugins/oauth2.json",
    "plugins/opentelemetry.json",
    "plugins/post-function.json",
    "plugins/pre-function.json",
    "plugins/prometheus.json",
    "plugins/proxy-cache.json",
    "plugins/rate-limiting.json",
    "plugins/redirect.json",
    "plugins/request-size-limiting.json",
    "plugins/request-termination.json",
    "plugins/request-transformer.json",
    "plugins/response-ratelimiting.json",
    "plugins/response-transformer.json",
    "plugins/session.json",
    "plugins/standard-webhooks.json",
    "plugins/statsd.json",
    "plugins/syslog.json",
    "plugins/tcp-log.json",
    "plugins/udp-log.json",
    "plugins/zipkin.json",
);

const TYPEDEFS_FILE: &str = include_str!("../../schema/typedefs.json");

impl Registry {
    /// The registry built from the schema files compiled into this binary.
    pub fn builtin() -> &'static Arc<Registry> {
        static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
        REGISTRY.get_or_init(|| {
            Arc::new(
                Registry::from_sources(TYPEDEFS_FILE, ENTITY_FILES, PLUGIN_FILES)
                    .expect("the embedded schema files are valid (checked by unit tests)"),
            )
        })
    }

    /// A digest of the embedded schema files (SHA-256, hex): it changes exactly when a
    /// release changes an entity or plugin description, which is when stored entities must
    /// be validated again.
    pub fn builtin_fingerprint() -> &'static str {
        static FINGERPRINT: OnceLock<String> = OnceLock::new();
        FINGERPRINT.get_or_init(|| {
            use sha2::Digest as _;
            let mut h = sha2::Sha256::new();
            for (file, text) in std::iter::once(&("typedefs.json", TYPEDEFS_FILE))
                .chain(ENTITY_FILES)
                .chain(PLUGIN_FILES)
            {
                h.update(file.as_bytes());
                h.update([0]);
                h.update(text.as_bytes());
                h.update([0]);
            }
            hex::encode(h.finalize())
        })
    }

    /// Builds a registry from `schema/typedefs.json`, entity files and plugin files.
    pub fn from_sources(
        typedefs: &str,
        entities: &[(&str, &str)],
        plugins: &[(&str, &str)],
    ) -> anyhow::Result<Registry> {
        let defs: serde_json::Map<String, Value> = serde_json::from_str(typedefs)
            .map_err(|e| anyhow::anyhow!("schema/typedefs.json: {e}"))?;
        let load = |file: &str, text: &str| -> anyhow::Result<Value> {
            let mut v: Value =
                serde_json::from_str(text).map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            typedefs::resolve(&mut v, &defs).map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            Ok(v)
        };
        let mut parsed = Vec::new();
        for (file, text) in entities {
            let schema: EntitySchema = serde_json::from_value(load(file, text)?)
                .map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            parsed.push(schema);
        }
        let mut plugin_map = BTreeMap::new();
        for (file, text) in plugins {
            let mut value = load(file, text)?;
            if let Some(config) = value.get_mut("config") {
                make_records_required(config);
            }
            let mut schema: PluginSchema =
                serde_json::from_value(value).map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            anyhow::ensure!(
                schema.config.ty == FieldType::Record && schema.config.fields.is_some(),
                "schema/{file}: config must be a record with fields"
            );
            // Plugin-level checks name config fields as `config.<path>`.
            schema.config.name = "config".to_owned();
            assign_since(&mut schema).map_err(|e| anyhow::anyhow!("schema/{file}: {e}"))?;
            anyhow::ensure!(
                plugin_map.insert(schema.name.clone(), schema).is_none(),
                "schema/{file}: a second description of the same plugin"
            );
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
            for sub in &schema.subschemas {
                check_names(&schema.name, &sub.fields, &sub.entity_checks, &[])?;
            }
        }
        for plugin in plugin_map.values() {
            check_names(
                &plugin.name,
                std::slice::from_ref(&plugin.config),
                &plugin.entity_checks,
                &plugin.shorthands,
            )?;
        }
        for schema in &mut parsed {
            specialize(schema)?;
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
        for schema in &entities {
            if let Some(alias) = &schema.alias_key {
                anyhow::ensure!(
                    entities.iter().any(|c| c.name == alias.entity
                        && c.endpoint_key.is_some()
                        && foreign_keys.iter().any(|fk| fk.child == c.name
                            && fk.parent == schema.name
                            && !fk.is_array)),
                    "{}: alias_key entity {} needs an endpoint key and a foreign key to it",
                    schema.name,
                    alias.entity
                );
            }
        }
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

    /// This schema as specialised for `entity` by its subschema key, when one applies.
    pub fn specialized_for(&self, entity: &serde_json::Map<String, Value>) -> Option<&Self> {
        let key = entity.get(self.subschema_key.as_deref()?)?;
        let names: Vec<&str> = match key {
            Value::String(s) => vec![s.as_str()],
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            _ => return None,
        };
        names.into_iter().find_map(|name| {
            self.specialized
                .iter()
                .find(|(keys, _)| keys.iter().any(|k| k == name))
                .map(|(_, s)| &**s)
        })
    }
}

/// Builds `schema`'s specialisations: each subschema's fields replace the base field of the
/// same name, which must exist with the same type (Kong's `new_subschema` rules).
fn specialize(schema: &mut EntitySchema) -> anyhow::Result<()> {
    if schema.subschemas.is_empty() {
        return Ok(());
    }
    let key = schema
        .subschema_key
        .as_deref()
        .ok_or_else(|| anyhow::anyhow!("{}: subschemas without a subschema_key", schema.name))?;
    anyhow::ensure!(
        schema.field(key).is_some(),
        "{}: subschema_key '{key}' is not a field",
        schema.name
    );
    let mut base = schema.clone();
    base.subschemas.clear();
    let mut specialized = Vec::new();
    for sub in &schema.subschemas {
        let mut one = base.clone();
        for field in &sub.fields {
            let Some(slot) = one.fields.iter_mut().find(|f| f.name == field.name) else {
                anyhow::bail!(
                    "{}: subschema field '{}' is not a field",
                    schema.name,
                    field.name
                );
            };
            anyhow::ensure!(
                slot.ty == field.ty,
                "{}: subschema field '{}' changes its type",
                schema.name,
                field.name
            );
            *slot = field.clone();
        }
        one.entity_checks.extend(sub.entity_checks.iter().cloned());
        specialized.push((sub.keys.clone(), Arc::new(one)));
    }
    schema.specialized = specialized;
    Ok(())
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
        anyhow::ensure!(
            f.fields.is_some() == (f.ty == FieldType::Record),
            "{owner}.{}: a record has fields, nothing else has",
            f.name
        );
        anyhow::ensure!(
            (f.entity_checks.is_empty() && f.shorthand_fields.is_empty())
                || f.ty == FieldType::Record,
            "{owner}.{}: entity_checks and shorthand_fields need a record",
            f.name
        );
        checks_exist(owner, &f.entity_checks)?;
        for sub in [&f.elements, &f.keys, &f.values].into_iter().flatten() {
            walk(owner, sub)?;
        }
        for sub in f.fields.iter().flatten().chain(&f.shorthand_fields) {
            walk(owner, sub)?;
        }
        Ok(())
    }
    fn checks_exist(owner: &str, entity_checks: &[Check]) -> anyhow::Result<()> {
        for c in entity_checks {
            let name = match c {
                Check::Custom(name) => name,
                Check::CustomEntityCheck(c) => &c.name,
                _ => continue,
            };
            anyhow::ensure!(
                checks::CUSTOM_CHECKS.contains(&name.as_str()),
                "{owner}: unknown custom check '{name}'"
            );
        }
        Ok(())
    }
    for f in fields {
        walk(owner, f)?;
    }
    checks_exist(owner, entity_checks)?;
    for s in shorthands {
        anyhow::ensure!(
            checks::SHORTHANDS.contains(&s.as_str()),
            "{owner}: unknown shorthand '{s}'"
        );
    }
    Ok(())
}

/// Kong's `make_records_required` (`kong/db/schema/entity.lua`): in a plugin's config, a record
/// that does not say `"required": false` is required, so an absent one is filled with its own
/// structure. Records inside array elements and map values are left as they are, as in Kong.
fn make_records_required(field: &mut Value) {
    let Value::Object(obj) = field else {
        return;
    };
    if obj.get("type").and_then(Value::as_str) != Some("record") {
        return;
    }
    obj.entry("required").or_insert(Value::Bool(true));
    if let Some(Value::Array(fields)) = obj.get_mut("fields") {
        for f in fields {
            make_records_required(f);
        }
    }
}

/// Gives every `config` field its `since`: the plugin's own, or the version
/// `since_fields` records for its dotted path (which must name a field).
fn assign_since(plugin: &mut PluginSchema) -> anyhow::Result<()> {
    fn walk(
        fields: &mut [Field],
        prefix: &str,
        plugin_since: &str,
        since_fields: &BTreeMap<String, String>,
        used: &mut usize,
    ) {
        for f in fields {
            let path = format!("{prefix}{}", f.name);
            let own = since_fields.get(&path);
            if own.is_some() {
                *used += 1;
            }
            if f.since.is_none() {
                f.since = Some(own.cloned().unwrap_or_else(|| plugin_since.to_owned()));
            }
            if let Some(sub) = &mut f.fields {
                walk(sub, &format!("{path}."), plugin_since, since_fields, used);
            }
        }
    }
    let mut used = 0;
    let since = plugin.since.clone();
    let fields = plugin.config.fields.get_or_insert_with(Vec::new);
    walk(fields, "", &since, &plugin.since_fields, &mut used);
    anyhow::ensure!(
        used == plugin.since_fields.len(),
        "since_fields names a path that is not a config field: {:?}",
        plugin.since_fields.keys().collect::<Vec<_>>()
    );
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
