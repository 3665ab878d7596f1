//! Fuzz target bodies, shared by `fuzz/` (cargo-fuzz) and the test suite, which replays the
//! checked-in corpus on stable Rust. Each function panics only when an invariant breaks.

use serde_json::Value;

use crate::schema::{Mode, Registry, form};
use crate::store::StateHash;

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

/// Arbitrary bytes as a JSON array of `[type, id, entity]` triples: the state hash does not
/// depend on insertion order or on the order of keys in the JSON text, and removing everything
/// returns to zero.
pub fn state_hash(data: &[u8]) {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let entries: Vec<(String, String, Value)> = items
        .into_iter()
        .filter_map(|item| {
            let a = item.as_array()?;
            Some((
                a.first()?.as_str()?.to_owned(),
                a.get(1)?.as_str()?.to_owned(),
                a.get(2)?.clone(),
            ))
        })
        .collect();
    let hash_of = |order: &mut dyn Iterator<Item = &(String, String, Value)>| {
        let mut h = StateHash::ZERO;
        for (ty, id, e) in order {
            h.add(&StateHash::of_entity(ty, "ws", id, e));
        }
        h
    };
    let forward = hash_of(&mut entries.iter());
    let backward = hash_of(&mut entries.iter().rev());
    assert_eq!(forward, backward, "insertion order does not matter");
    let reparsed: Vec<(String, String, Value)> = entries
        .iter()
        .map(|(t, i, e)| {
            (
                t.clone(),
                i.clone(),
                serde_json::from_str(&reversed_keys(e)).expect("valid JSON"),
            )
        })
        .collect();
    assert_eq!(
        hash_of(&mut reparsed.iter()),
        forward,
        "key order does not matter"
    );
    let mut h = forward;
    for (ty, id, e) in &entries {
        h.sub(&StateHash::of_entity(ty, "ws", id, e));
    }
    assert_eq!(h, StateHash::ZERO);
}

/// JSON text of `v` with every object's keys written in reverse order.
fn reversed_keys(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let parts: Vec<String> = m
                .iter()
                .rev()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), reversed_keys(v)))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(reversed_keys).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}
