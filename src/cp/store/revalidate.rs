//! Validating stored entities again after an upgrade changed the schema files.
//!
//! An older release may have stored what the current schemas refuse or describe more fully:
//! a plugin of a name it did not know, with `config: {}`. A data plane validates everything it
//! receives with the current schemas, so such a row would make it reject every full sync.
//! The rule: once per set of schema files (`Registry::builtin_fingerprint`, kept in
//! `dp_marks`), every stored entity goes through [`Op::Revalidate`] — a valid one is stored as
//! the current schema completes it (new defaults filled), an invalid one with `enabled: true`
//! (a plugin of a name no schema describes included) is disabled (a data plane accepts a
//! disabled entity it cannot validate: it never runs), and the rest is left as stored. The invalid ones are returned, for the log and `GET /`.

use serde_json::Value;

use super::{Op, Store, StoreError, on_backend};
use crate::schema::FieldErrors;

const MARK: &str = "revalidated_with";

/// How many entities one write transaction revalidates.
const BATCH: usize = 500;

/// A stored entity that does not validate under the current schema files.
#[derive(Debug, Clone)]
pub struct Invalid {
    pub entity_type: String,
    pub id: String,
    /// Its `name` field, when it has one (a plugin's name).
    pub name: Option<String>,
    /// It was enabled and has been disabled.
    pub disabled: bool,
    pub errors: FieldErrors,
}

impl Store {
    /// Validates every stored entity again when the schema files differ from the ones they
    /// were last validated with (`fingerprint`); returns the entities that do not validate.
    /// Safe with several control planes: each entity is decided inside a write transaction.
    pub async fn revalidate(&self, fingerprint: &str) -> Result<Vec<Invalid>, StoreError> {
        let mark: Option<String> = on_backend!(self.pool(), p => {
            sqlx::query_scalar("SELECT value FROM dp_marks WHERE name = $1")
                .bind(MARK)
                .fetch_optional(p)
                .await?
        });
        if mark.as_deref() == Some(fingerprint) {
            return Ok(Vec::new());
        }
        let mut ids: Vec<(String, String)> = on_backend!(self.pool(), p => {
            sqlx::query_as("SELECT type, id FROM dp_entities")
                .fetch_all(p)
                .await?
        });
        // Parents first, so a child is judged against its parents as now stored.
        let order = |ty: &str| {
            self.registry()
                .entities()
                .position(|s| s.name == ty)
                .unwrap_or(usize::MAX)
        };
        ids.sort_by_cached_key(|(ty, id)| (order(ty), id.clone()));
        let mut invalid = Vec::new();
        for chunk in ids.chunks(BATCH) {
            let ops = chunk
                .iter()
                .map(|(ty, id)| Op::Revalidate {
                    entity: ty.clone(),
                    id: id.clone(),
                })
                .collect();
            for ((ty, id), result) in chunk.iter().zip(self.write_batch(ops).await) {
                let outcome = match result {
                    Ok(o) => o,
                    // Deleted meanwhile (by another control plane): nothing to judge.
                    Err(StoreError::NotFound) => continue,
                    Err(e) => return Err(e),
                };
                if let Some(errors) = outcome.invalid {
                    let entity = outcome.entity.unwrap_or_default();
                    invalid.push(Invalid {
                        entity_type: ty.clone(),
                        id: id.clone(),
                        name: entity
                            .get("name")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                        disabled: outcome.version.is_some()
                            && entity.get("enabled") == Some(&Value::Bool(false)),
                        errors,
                    });
                }
            }
        }
        on_backend!(self.pool(), p => {
            sqlx::query(
                "INSERT INTO dp_marks (name, value) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value")
                .bind(MARK)
                .bind(fingerprint)
                .execute(p)
                .await?;
        });
        Ok(invalid)
    }
}
