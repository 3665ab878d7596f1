//! The `admin_entity` target: Admin API bodies through the schema engine.

use serde_json::Value;

use crate::schema::{Mode, Registry, form};

/// Arbitrary bytes as an Admin API body for some entity type: parsing and validation never
/// panic, and every rejection is a schema violation with a non-empty, printable error tree.
///
/// Byte 0 picks the entity type, bit 7 of byte 0 picks form encoding over JSON.
pub fn admin_entity(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let registry = Registry::builtin();
    let schemas: Vec<_> = registry.entities().collect();
    let schema = schemas[(selector & 0x7f) as usize % schemas.len()];
    let input = if selector & 0x80 != 0 {
        match form::parse(body) {
            Ok(v) => registry.coerce_form(schema, v),
            Err(_) => return,
        }
    } else {
        match serde_json::from_slice::<Value>(body) {
            Ok(v) => v,
            Err(_) => return,
        }
    };
    for mode in [Mode::Insert, Mode::Update] {
        let existing = (mode == Mode::Update)
            .then(|| serde_json::json!({"id": "00000000-0000-4000-8000-000000000000"}));
        match registry.prepare(
            schema,
            input.clone(),
            existing.as_ref(),
            mode,
            1_700_000_000,
        ) {
            Ok(p) => {
                assert!(p.entity.is_object(), "an accepted entity is an object");
                assert!(
                    p.entity.get("id").and_then(Value::as_str).is_some(),
                    "an accepted entity has an id"
                );
            }
            Err(e) => {
                assert!(!e.is_empty(), "a rejection names at least one problem");
                assert!(e.message().contains("schema violation"));
            }
        }
    }
}
