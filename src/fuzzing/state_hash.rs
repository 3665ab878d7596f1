//! The `state_hash` target: the state hash's order independence.

use serde_json::Value;

use crate::proto::StateHash;

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
