//! Shared field definitions (`schema/typedefs.json`) and their use in the schema files:
//! an object with `"typedef": "<name>"` stands for that definition with the object's own keys
//! laid over it, as Kong's `typedefs.port { default = 6379 }` copies the typedef and sets
//! `default`. `"append_fields"` adds fields to a record typedef instead of replacing them
//! (Kong's ai-proxy appends its own fields to `kong/llm/schemas/init.lua`'s record).

use serde_json::{Map, Value};

/// Resolves every `typedef` in `value`, recursively, against `defs`.
pub fn resolve(value: &mut Value, defs: &Map<String, Value>) -> Result<(), String> {
    resolve_depth(value, defs, 0)
}

const MAX_DEPTH: usize = 32;

fn resolve_depth(value: &mut Value, defs: &Map<String, Value>, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err("typedefs nest too deeply (a cycle?)".into());
    }
    match value {
        Value::Object(obj) => {
            if let Some(name) = obj.remove("typedef") {
                let Value::String(name) = name else {
                    return Err(format!("typedef must be a name, not {name}"));
                };
                let mut base = defs
                    .get(&name)
                    .cloned()
                    .ok_or_else(|| format!("unknown typedef '{name}'"))?;
                resolve_depth(&mut base, defs, depth + 1)?;
                let Value::Object(mut merged) = base else {
                    return Err(format!("typedef '{name}' is not an object"));
                };
                let overrides = std::mem::take(obj);
                for (k, v) in overrides {
                    if k == "append_fields" {
                        let Value::Array(extra) = v else {
                            return Err("append_fields must be an array".into());
                        };
                        match merged.get_mut("fields") {
                            Some(Value::Array(fields)) => fields.extend(extra),
                            _ => {
                                return Err(format!("typedef '{name}' has no fields to append to"));
                            }
                        }
                    } else {
                        merged.insert(k, v);
                    }
                }
                *obj = merged;
            }
            for v in obj.values_mut() {
                resolve_depth(v, defs, depth + 1)?;
            }
        }
        Value::Array(items) => {
            for v in items {
                resolve_depth(v, defs, depth + 1)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overrides_and_appends() {
        let defs = json!({
            "port": {"type": "integer", "between": [0, 65535]},
            "rec": {"type": "record", "fields": [{"name": "a", "typedef": "port"}]},
        });
        let defs = defs.as_object().unwrap();
        let mut v = json!({"name": "p", "typedef": "port", "default": 6379});
        resolve(&mut v, defs).unwrap();
        assert_eq!(
            v,
            json!({"name": "p", "type": "integer", "between": [0, 65535], "default": 6379})
        );
        let mut v = json!({"typedef": "rec", "append_fields": [{"name": "b", "type": "string"}]});
        resolve(&mut v, defs).unwrap();
        assert_eq!(
            v,
            json!({"type": "record", "fields": [
                {"name": "a", "type": "integer", "between": [0, 65535]},
                {"name": "b", "type": "string"}
            ]})
        );
        assert!(resolve(&mut json!({"typedef": "nope"}), defs).is_err());
    }
}
