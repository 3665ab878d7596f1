//! Small helpers the plugins share: query strings as nginx parses them, header lookup as
//! Kong's `kong.request.get_headers()` does it, Lua number formatting, config reading.

use http::HeaderMap;
use percent_encoding::percent_decode_str;
use serde_json::Value;

/// One query argument's value(s), as `ngx.req.get_uri_args()` gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ArgValue {
    /// `?name` with no `=`: Lua's boolean `true`.
    Flag,
    /// One value.
    One(String),
    /// The name appeared more than once: a Lua table.
    Many(Vec<ArgValue>),
}

/// Decodes one query component: `+` is a space, then percent-decoding.
fn decode_component(raw: &str) -> String {
    let spaced = raw.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// Looks up the argument `name` in a raw query string, as Kong's `kong.request.get_query()[name]`.
pub(super) fn query_arg(query: Option<&str>, name: &str) -> Option<ArgValue> {
    let query = query?;
    let mut found: Vec<ArgValue> = Vec::new();
    for pair in query.split('&') {
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (pair, None),
        };
        if decode_component(key) != name {
            continue;
        }
        found.push(match value {
            Some(value) => ArgValue::One(decode_component(value)),
            None => ArgValue::Flag,
        });
    }
    match found.len() {
        0 => None,
        1 => found.pop(),
        _ => Some(ArgValue::Many(found)),
    }
}

/// Removes every argument named `name` from a raw query string (Kong's
/// `kong.service.request.clear_query_arg`); the other arguments keep their raw form and order.
pub(super) fn clear_query_arg(query: &mut Option<String>, name: &str) {
    let Some(raw) = query.as_deref() else { return };
    let kept: Vec<&str> = raw
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
            !pair.is_empty() && decode_component(key) != name
        })
        .collect();
    *query = if kept.is_empty() {
        None
    } else {
        Some(kept.join("&"))
    };
}

/// The header name `kong.request.get_headers()[name]` looks up: lowercased, `_` read as `-`.
pub(super) fn header_key(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// The values of a request header, as strings (invalid UTF-8 is read lossily).
pub(super) fn header_values(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(header_key(name).as_str())
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect()
}

/// The first value of a request header (Kong's `kong.request.get_header`).
pub(super) fn header_first(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(header_key(name).as_str())
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Formats a number as Lua's `tostring` does for the values plugins put in headers.
pub(super) fn lua_number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    }
}

/// Reads an optional string field (JSON null or missing are `None`).
pub(super) fn opt_str(conf: &Value, field: &str) -> Option<String> {
    conf.get(field).and_then(Value::as_str).map(str::to_owned)
}

/// Reads a boolean field, with the schema default when absent.
pub(super) fn bool_or(conf: &Value, field: &str, default: bool) -> bool {
    conf.get(field).and_then(Value::as_bool).unwrap_or(default)
}

/// Reads an optional number field.
pub(super) fn opt_num(conf: &Value, field: &str) -> Option<f64> {
    conf.get(field).and_then(Value::as_f64)
}

/// Reads an array of strings (null or missing is `None`); non-string elements are an error.
pub(super) fn opt_str_list(conf: &Value, field: &str) -> Result<Option<Vec<String>>, String> {
    match conf.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("config.{field}: expected an array of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!("config.{field}: expected an array of strings")),
    }
}

/// The id inside a foreign key (`{"id": "..."}`), if set.
pub(super) fn foreign_id(entity: &Value, field: &str) -> Option<String> {
    entity
        .get(field)
        .and_then(|f| f.get("id"))
        .and_then(Value::as_str)
        .map(str::to_owned)
}
