//! `application/x-www-form-urlencoded` bodies, with Kong's conventions
//! (`kong/api/arguments.lua`): `a.b=1` and `a[b]=1` nest, `a[]=x`, `a[1]=x` and repeated `a=x`
//! build arrays, an empty value means null; then values are coerced to the schema's types
//! (`"5"` → 5 for integers, `"true"` → true, a single value → a one-element array).

use serde_json::{Map, Value};

use super::{EntitySchema, Field, FieldType, Registry};

/// Parses a form body into a JSON object of strings, arrays and objects (no coercion yet).
pub fn parse(body: &[u8]) -> Result<Value, String> {
    parse_pairs(form_urlencoded::parse(body))
}

/// Builds the same object from `(name, value)` pairs in request order: the parts of a
/// `multipart/form-data` body follow the form conventions too (`kong/api/arguments.lua`).
pub fn parse_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Value, String>
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    let mut root = Value::Object(Map::new());
    for (key, value) in pairs {
        let (key, value) = (key.as_ref(), value.as_ref());
        let path = split_key(key).ok_or_else(|| format!("invalid form key '{key}'"))?;
        let value = if value.is_empty() {
            Value::Null
        } else {
            Value::String(value.to_owned())
        };
        insert(&mut root, &path, value)?;
    }
    Ok(root)
}

#[derive(Debug)]
enum Seg {
    Key(String),
    Index(usize),
    Append,
}

fn split_key(key: &str) -> Option<Vec<Seg>> {
    let mut segs = Vec::new();
    let mut rest = key;
    loop {
        let end = rest.find(['.', '[']).unwrap_or(rest.len());
        let head = &rest[..end];
        if !head.is_empty() {
            segs.push(Seg::Key(head.to_owned()));
        } else if segs.is_empty() {
            return None;
        }
        rest = &rest[end..];
        if rest.is_empty() {
            return Some(segs);
        }
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
            continue;
        }
        // `[...]`
        let close = rest.find(']')?;
        let inner = &rest[1..close];
        rest = &rest[close + 1..];
        if inner.is_empty() {
            segs.push(Seg::Append);
        } else if let Ok(i) = inner.parse::<usize>() {
            // Kong's indexes are 1-based (Lua); 0 is accepted as the first too.
            segs.push(Seg::Index(i.saturating_sub(1)));
        } else {
            segs.push(Seg::Key(inner.to_owned()));
        }
        if let Some(r) = rest.strip_prefix('.') {
            rest = r;
        }
        if rest.is_empty() {
            return Some(segs);
        }
    }
}

fn insert(node: &mut Value, path: &[Seg], value: Value) -> Result<(), String> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(());
    };
    match first {
        Seg::Key(k) => {
            if node.is_null() {
                *node = Value::Object(Map::new());
            }
            let Value::Object(m) = node else {
                return Err(format!("conflicting form keys at '{k}'"));
            };
            if rest.is_empty() {
                match m.get_mut(k) {
                    // A repeated plain key builds an array.
                    Some(Value::Array(a)) => a.push(value),
                    Some(existing) => {
                        let prev = existing.take();
                        *existing = Value::Array(vec![prev, value]);
                    }
                    None => {
                        m.insert(k.clone(), value);
                    }
                }
                Ok(())
            } else {
                let child = m.entry(k.clone()).or_insert(Value::Null);
                insert(child, rest, value)
            }
        }
        Seg::Index(_) | Seg::Append => {
            if node.is_null() {
                *node = Value::Array(Vec::new());
            }
            if let Value::String(_) = node {
                let prev = node.take();
                *node = Value::Array(vec![prev]);
            }
            let Value::Array(a) = node else {
                return Err("conflicting form keys (array and object)".into());
            };
            let idx = match first {
                Seg::Index(i) if *i < 10_000 => *i,
                Seg::Index(_) => return Err("form array index too large".into()),
                _ => a.len(),
            };
            if a.len() <= idx {
                a.resize(idx + 1, Value::Null);
            }
            if rest.is_empty() {
                a[idx] = value;
                Ok(())
            } else {
                insert(&mut a[idx], rest, value)
            }
        }
    }
}

impl Registry {
    /// Coerces the strings of a parsed form body to the types `schema` expects.
    pub fn coerce_form(&self, schema: &EntitySchema, value: Value) -> Value {
        let Value::Object(m) = value else {
            return value;
        };
        let plugin_config = (schema.name == "plugins")
            .then(|| {
                m.get("name")
                    .and_then(Value::as_str)
                    .and_then(|n| self.plugin(n))
            })
            .flatten()
            .map(|p| &p.config);
        let mut out = Map::new();
        for (k, v) in m {
            let v = if k == "url" {
                v
            } else if let Some(field) = schema.field(&k) {
                if k == "config" && field.ty == FieldType::Json {
                    match plugin_config {
                        Some(config) => coerce(config, v),
                        None => coerce_untyped(v),
                    }
                } else {
                    coerce(field, v)
                }
            } else {
                v
            };
            out.insert(k, v);
        }
        Value::Object(out)
    }
}

/// A record's fields, shorthand fields included (a form may carry those too).
fn coerce_record(fields: &[Field], shorthand_fields: &[Field], v: Value) -> Value {
    let Value::Object(m) = v else { return v };
    Value::Object(
        m.into_iter()
            .map(|(k, v)| {
                let v = match fields.iter().chain(shorthand_fields).find(|f| f.name == k) {
                    Some(f) => coerce(f, v),
                    None => v,
                };
                (k, v)
            })
            .collect(),
    )
}

/// Without a schema, only the unambiguous conversions: numbers and booleans.
fn coerce_untyped(v: Value) -> Value {
    match v {
        Value::String(s) => {
            if let Ok(i) = s.parse::<i64>() {
                Value::from(i)
            } else if let Ok(f) = s
                .parse::<f64>()
                .map_err(|_| ())
                .and_then(|f| serde_json::Number::from_f64(f).ok_or(()))
            {
                Value::Number(f)
            } else if s == "true" || s == "false" {
                Value::Bool(s == "true")
            } else {
                Value::String(s)
            }
        }
        Value::Array(a) => Value::Array(a.into_iter().map(coerce_untyped).collect()),
        Value::Object(m) => {
            Value::Object(m.into_iter().map(|(k, v)| (k, coerce_untyped(v))).collect())
        }
        other => other,
    }
}

fn coerce(field: &Field, v: Value) -> Value {
    match (field.ty, v) {
        (_, Value::Null) => Value::Null,
        (FieldType::Integer, Value::String(s)) => s
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or(Value::String(s)),
        (FieldType::Number, Value::String(s)) if s.parse::<i64>().is_ok() => {
            Value::from(s.parse::<i64>().expect("checked"))
        }
        (FieldType::Number, Value::String(s)) => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or(Value::String(s)),
        (FieldType::Boolean, Value::String(s)) => match s.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(s),
        },
        (FieldType::Array | FieldType::Set, v) => {
            let items = match v {
                Value::Array(a) => a,
                Value::Object(m) => m.into_iter().map(|(_, v)| v).collect(),
                single => vec![single],
            };
            let items = items.into_iter().filter(|x| !x.is_null());
            match &field.elements {
                Some(el) => Value::Array(items.map(|x| coerce(el, x)).collect()),
                None => Value::Array(items.collect()),
            }
        }
        (FieldType::Map, Value::Object(m)) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = match &field.values {
                        Some(vals) => coerce(vals, v),
                        None => v,
                    };
                    (k, v)
                })
                .collect(),
        ),
        (FieldType::Record, v) => match &field.fields {
            Some(fields) => coerce_record(fields, &field.shorthand_fields, v),
            None => v,
        },
        (FieldType::Json, v) => coerce_untyped(v),
        (_, v) => v,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn kong_form_conventions() {
        let v = parse(b"name=s&hosts[]=a&hosts[]=b&paths=/x&paths=/y&config.minute=5&snis[1]=x.test&headers.x-a=1&tags=").unwrap();
        assert_eq!(
            v,
            json!({"name": "s", "hosts": ["a", "b"], "paths": ["/x", "/y"], "config": {"minute": "5"},
                   "snis": ["x.test"], "headers": {"x-a": "1"}, "tags": null})
        );
    }

    #[test]
    fn rejects_empty_key() {
        assert!(parse(b"[]=x").is_err());
    }
}
