//! Declarative configuration: Kong's `_format_version` files (Kong DB-less `kong.yml`,
//! `kong config db_export`, decK) read into the entities the stores keep, and written back
//! from them. No I/O: text in, entities out, and the reverse; the control plane (`/config`,
//! `deltaplane-cp config …`) and the data plane (`--declarative-config`) share it.
//!
//! Kong's source is the specification: `kong/db/schema/others/declarative_config.lua`,
//! `kong/db/declarative/*.lua`, `kong/db/errors.lua`.
//!
//! Modules: `syntax` (YAML/JSON text to values and back), `read` (the reader's passes),
//! `ids` (Kong's generated ids), `migrate` (1.1/2.1 route paths), `errors` (Kong's error
//! shapes), `write` (db_export and decK shapes).

mod errors;
pub mod ids;
mod migrate;
mod read;
mod syntax;
#[cfg(test)]
mod tests;
mod write;

use serde_json::Value;

use crate::schema::Registry;

/// The `_format_version`s Kong accepts (`declarative_config.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FormatVersion {
    /// `"1.1"`: regex paths migrated (`declarative/migrations/route_path.lua`).
    V1_1,
    /// `"2.1"`: regex paths migrated.
    V2_1,
    /// `"3.0"`.
    V3_0,
}

/// How [`parse`] reads a file.
#[derive(Debug, Clone)]
pub struct ParseOptions {
    /// Unix seconds for `created_at` / `updated_at` the file does not give.
    pub now: i64,
}

/// A parsed, validated declarative configuration: the whole configuration the file describes.
#[derive(Debug, Clone)]
pub struct Config {
    pub format_version: FormatVersion,
    /// `_transform` (default true): false skips transforms such as basic-auth password hashing.
    pub transform: bool,
    /// decK's `_info.select_tags`: the file manages only the entities carrying all of these
    /// tags (every entity of the file carries them: the reader adds them). Empty: the file
    /// manages the whole configuration.
    pub select_tags: Vec<String>,
    /// Every entity, parents before children (registry order), as the control plane stores
    /// it: validated and completed by the registry (defaults, generated fields, timestamps at
    /// `now` where the file gives none), foreign keys as `{"id": …}`, no `ws_id` (all in the
    /// default workspace).
    pub entities: Vec<Entity>,
}

/// One entity of a [`Config`].
///
/// The body is kept as the canonical JSON text the control plane stores
/// (`schema::index::canonical`), not as a `serde_json::Value` tree: a prepared entity's tree
/// is about six times its text, and a large file's entities are all held at once. Callers
/// parse a body back ([`Entity::value`]) one entity at a time, where they need its fields.
#[derive(Debug, Clone)]
pub struct Entity {
    /// The registry's type name (`services`).
    pub entity_type: String,
    /// Its primary key (`body["id"]`).
    pub id: String,
    /// The complete entity, as canonical JSON text; the control plane's import stores and
    /// answers with this very text (shared, never copied: a large file's texts are most of
    /// its import's memory).
    pub body: std::sync::Arc<str>,
    /// Top-level fields the file did not give that the registry generated at random (a
    /// key-auth `key`): an importer keeps the stored entity's value for these, so importing
    /// the same file again changes nothing.
    pub generated: Vec<String>,
}

impl Entity {
    /// The body as a JSON value. The text was written by the reader from a value, so it
    /// always parses.
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.body).expect("an entity body is JSON written by the reader")
    }
}

/// Why a file was not accepted. Nothing is written for any of them.
#[derive(Debug, Clone)]
pub enum Error {
    /// Not YAML or JSON, or not a mapping at the top.
    Syntax {
        message: String,
        /// 1-based, where the parser gives it.
        line: Option<usize>,
        column: Option<usize>,
    },
    /// The file parsed but does not describe a valid configuration: every problem at once.
    Invalid(Invalid),
}

/// Every problem of a file, in Kong's two shapes (`kong/db/errors.lua`).
#[derive(Debug, Clone)]
pub struct Invalid {
    /// Kong's nested `fields` tree (`{"services": [{"routes": [{"paths": …}]}]}`).
    pub fields: Value,
    /// Kong's `flattened_errors` entries.
    pub flattened: Vec<Value>,
    /// Per flattened entry, the 1-based line of the entity in the source file, when the
    /// parser gave it.
    pub lines: Vec<Option<usize>>,
    /// What stays in `fields` when the errors are flattened: problems that are not an
    /// entity's (top-level keys, a type's value that is not an array, an entry that is not a
    /// record).
    pub unflattened: Value,
}

impl Error {
    /// The Admin API body: Kong's code 14 `invalid declarative configuration`, with
    /// `flattened_errors` (and `fields: {}`) when `flatten` is asked for.
    pub fn kong_body(&self, flatten: bool) -> Value {
        errors::kong_body(self, flatten)
    }
}

impl std::fmt::Display for Error {
    /// For the command line: one problem per line, with the file's line numbers.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Syntax { message, line, .. } => match line {
                Some(l) => write!(f, "line {l}: {message}"),
                None => f.write_str(message),
            },
            Error::Invalid(inv) => errors::display(inv, f),
        }
    }
}

impl std::error::Error for Error {}

/// Reads a file (YAML or JSON; JSON is YAML too) into a [`Config`], or every problem.
pub fn parse(registry: &Registry, text: &[u8], options: &ParseOptions) -> Result<Config, Error> {
    read::parse(registry, text, options)
}

/// Settles a file's entity against the stored entity of the same type and id, as both planes
/// import a file: the timestamps and the fields the reader generated at random (`generated`)
/// are the stored ones, so they never count as changes. When anything else differs,
/// `updated_at` (where the type has one) becomes `now`. Returns whether the entity changed;
/// when it did not, `body` equals `stored`.
pub fn settle(body: &mut Value, stored: &Value, generated: &[String], now: i64) -> bool {
    let Value::Object(m) = body else {
        return *body != *stored;
    };
    for name in generated
        .iter()
        .map(String::as_str)
        .chain(["created_at", "updated_at"])
    {
        if let Some(v) = stored.get(name)
            && m.contains_key(name)
        {
            m.insert(name.to_owned(), v.clone());
        }
    }
    if *body == *stored {
        return false;
    }
    if let Some(updated) = body.get_mut("updated_at")
        && updated.is_number()
    {
        *updated = Value::from(now);
    }
    true
}

/// Kong's generated id for an entity of `entity_type` the file gives without one, when it
/// has a natural key (`get_key_for_uuid_gen`): `uuid5(uuid5(NS, type), key)`.
pub const UUID_NAMESPACE: &str = "fd02801f-0957-4a15-a55a-c8d9606f30b5";

/// Output encodings of [`write`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Yaml,
    Json,
}

/// How [`write`] shapes a file.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    pub format: OutputFormat,
    /// decK's nesting (children under their parents) instead of Kong's flat `db_export`.
    pub nested: bool,
}

/// Writes stored entities as a file. `entities` yields `(entity_type, entity)` as the control
/// plane stores them (foreign keys as `{"id": …}`, no `ws_id`), in any order; the flat shape
/// is Kong's `db_export` (`_format_version: "3.0"`, `_transform: false`, dependency order,
/// foreign keys as bare ids). Reading the output with [`parse`] gives the same entities.
pub fn write<'a>(
    registry: &Registry,
    entities: impl IntoIterator<Item = (&'a str, &'a Value)>,
    options: WriteOptions,
) -> String {
    write::write(registry, entities, options)
}
