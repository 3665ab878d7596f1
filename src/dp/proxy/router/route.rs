//! One route as the router needs it, parsed from a stored `routes` entity.
//!
//! The entity is in Kong's Admin API JSON shape (`kong/db/schema/entities/routes.lua`, our
//! `schema/routes.json`): defaults filled, absent optional fields as JSON null or missing, the
//! service as `{"id": "..."}`.

use serde_json::Value;

/// One route as the router needs it, parsed from a stored `routes` entity (Kong's JSON shape).
#[derive(Debug, Clone)]
pub struct Route {
    /// The route's id (a UUID); the router breaks priority ties by it.
    pub id: String,
    /// The route's name, if it has one.
    pub name: Option<String>,
    /// The id of the route's service; `None` for a serviceless route.
    pub service_id: Option<String>,
    /// The route's protocols, as stored (default `["http", "https"]`).
    pub protocols: Vec<String>,
    /// The HTTP methods, as stored; empty when the field is unset.
    pub methods: Vec<String>,
    /// The hosts, as stored (`example.com`, `*.example.com`, `example.*`, with an optional
    /// `:port`); empty when the field is unset.
    pub hosts: Vec<String>,
    /// Whether `hosts` was a JSON array (even an empty one) rather than null or missing.
    ///
    /// Kong's `get_priority` (`kong/router/transform.lua`) sets its plain-hosts bit when
    /// `hosts` is a table with no wildcard, so an empty array counts.
    pub hosts_is_array: bool,
    /// The paths, as stored: prefixes, or regexes starting with `~`; empty when unset.
    pub paths: Vec<String>,
    /// The headers in entity order: a name and its alternative values (`~*` marks a regex).
    pub headers: Vec<(String, Vec<String>)>,
    /// The SNIs, as stored; empty when unset.
    pub snis: Vec<String>,
    /// Whether `sources` is set and non-empty (a stream-only field).
    pub has_sources: bool,
    /// Whether `destinations` is set and non-empty (a stream-only field).
    pub has_destinations: bool,
    /// Whether the matched path is stripped from the upstream path (default true).
    pub strip_path: bool,
    /// Whether the request's Host header is sent upstream (default false).
    pub preserve_host: bool,
    /// `"v0"` or `"v1"`; the `traditional_compatible` flavour always applies v0.
    pub path_handling: String,
    /// The regex priority, used only for regex paths (default 0).
    pub regex_priority: i64,
    /// The status answered when an https-only route is hit over http (default 426).
    pub https_redirect_status_code: u16,
    /// Whether the request body is buffered (default true).
    pub request_buffering: bool,
    /// Whether the response body is buffered (default true).
    pub response_buffering: bool,
    /// The whole entity, for plugins and logging.
    pub entity: Value,
}

// === impl Route ===

impl Route {
    /// Parses a stored `routes` entity; an error names the offending field.
    pub fn from_entity(v: &Value) -> Result<Route, String> {
        let obj = v.as_object().ok_or("a route must be a JSON object")?;
        let id = match obj.get("id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err("route has no 'id'".to_string()),
        };
        let name = opt_string(v, "name")?;
        let service_id = match obj.get("service") {
            None | Some(Value::Null) => None,
            Some(Value::Object(s)) => match s.get("id") {
                Some(Value::String(sid)) => Some(sid.clone()),
                _ => return Err("'service' has no 'id'".to_string()),
            },
            Some(_) => return Err("'service' must be an object".to_string()),
        };
        let protocols = match obj.get("protocols") {
            None | Some(Value::Null) => vec!["http".to_string(), "https".to_string()],
            Some(_) => string_list(v, "protocols")?,
        };
        let headers = match obj.get("headers") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => {
                let mut headers = Vec::with_capacity(map.len());
                for (name, values) in map {
                    let values = match values {
                        Value::Array(items) => items
                            .iter()
                            .map(|item| {
                                item.as_str()
                                    .map(str::to_string)
                                    .ok_or_else(|| format!("'headers.{name}' must hold strings"))
                            })
                            .collect::<Result<Vec<_>, _>>()?,
                        Value::String(s) => vec![s.clone()],
                        _ => return Err(format!("'headers.{name}' must be an array")),
                    };
                    headers.push((name.clone(), values));
                }
                headers
            }
            Some(_) => return Err("'headers' must be an object".to_string()),
        };
        let https_redirect_status_code = match obj.get("https_redirect_status_code") {
            None | Some(Value::Null) => 426,
            Some(n) => n
                .as_u64()
                .and_then(|n| u16::try_from(n).ok())
                .ok_or("'https_redirect_status_code' must be a status code")?,
        };
        let regex_priority = match obj.get("regex_priority") {
            None | Some(Value::Null) => 0,
            Some(n) => n.as_i64().ok_or("'regex_priority' must be an integer")?,
        };
        Ok(Route {
            id,
            name,
            service_id,
            protocols,
            methods: string_list(v, "methods")?,
            hosts: string_list(v, "hosts")?,
            hosts_is_array: matches!(obj.get("hosts"), Some(Value::Array(_))),
            paths: string_list(v, "paths")?,
            headers,
            snis: string_list(v, "snis")?,
            has_sources: non_empty_array(v, "sources"),
            has_destinations: non_empty_array(v, "destinations"),
            strip_path: opt_bool(v, "strip_path", true)?,
            preserve_host: opt_bool(v, "preserve_host", false)?,
            path_handling: opt_string(v, "path_handling")?.unwrap_or_else(|| "v0".to_string()),
            regex_priority,
            https_redirect_status_code,
            request_buffering: opt_bool(v, "request_buffering", true)?,
            response_buffering: opt_bool(v, "response_buffering", true)?,
            entity: v.clone(),
        })
    }

    /// Whether the route is an HTTP route: one of its protocols is http, https, grpc or grpcs.
    pub fn is_http(&self) -> bool {
        self.protocols
            .iter()
            .any(|p| matches!(p.as_str(), "http" | "https" | "grpc" | "grpcs"))
    }
}

fn opt_string(v: &Value, field: &str) -> Result<Option<String>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("'{field}' must be a string")),
    }
}

fn opt_bool(v: &Value, field: &str, default: bool) -> Result<bool, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(format!("'{field}' must be a boolean")),
    }
}

fn string_list(v: &Value, field: &str) -> Result<Vec<String>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("'{field}' must hold strings"))
            })
            .collect(),
        Some(_) => Err(format!("'{field}' must be an array")),
    }
}

fn non_empty_array(v: &Value, field: &str) -> bool {
    matches!(v.get(field), Some(Value::Array(items)) if !items.is_empty())
}
