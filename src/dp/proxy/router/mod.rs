//! Kong 3.10's `traditional_compatible` router. (Temporary stand-in: prefix paths only.)

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

/// One route as the router needs it.
#[derive(Debug)]
pub struct Route {
    pub id: String,
    pub name: Option<String>,
    pub service_id: Option<String>,
    pub protocols: Vec<String>,
    pub paths: Vec<String>,
    pub strip_path: bool,
    pub preserve_host: bool,
    pub path_handling: String,
    pub regex_priority: i64,
    pub https_redirect_status_code: u16,
    pub request_buffering: bool,
    pub response_buffering: bool,
    pub entity: Value,
}

impl Route {
    /// Parses a stored route.
    pub fn from_entity(v: &Value) -> Result<Route, String> {
        let strs = |f: &str| -> Vec<String> {
            v[f].as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Ok(Route {
            id: v["id"].as_str().ok_or("no id")?.to_owned(),
            name: v["name"].as_str().map(str::to_owned),
            service_id: v["service"]["id"].as_str().map(str::to_owned),
            protocols: strs("protocols"),
            paths: strs("paths"),
            strip_path: v["strip_path"].as_bool().unwrap_or(true),
            preserve_host: v["preserve_host"].as_bool().unwrap_or(false),
            path_handling: v["path_handling"].as_str().unwrap_or("v0").to_owned(),
            regex_priority: v["regex_priority"].as_i64().unwrap_or(0),
            https_redirect_status_code: v["https_redirect_status_code"].as_u64().unwrap_or(426)
                as u16,
            request_buffering: v["request_buffering"].as_bool().unwrap_or(true),
            response_buffering: v["response_buffering"].as_bool().unwrap_or(true),
            entity: v.clone(),
        })
    }
}

/// What the router matches on.
pub struct Request<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub listener_port: u16,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    pub sni: Option<&'a str>,
}

/// The routes of one configuration.
#[derive(Default)]
pub struct Router {
    routes: HashMap<String, Arc<Route>>,
}

/// A matched route.
pub struct Match<'r> {
    pub route: &'r Arc<Route>,
    pub path: String,
    pub matched_path: Option<String>,
    pub matched_host: Option<String>,
}

impl Router {
    pub fn new(routes: impl IntoIterator<Item = Arc<Route>>) -> (Router, Vec<(String, String)>) {
        Router::default().update(&[], routes)
    }

    pub fn update(
        &self,
        removed: &[&str],
        upserted: impl IntoIterator<Item = Arc<Route>>,
    ) -> (Router, Vec<(String, String)>) {
        let mut routes = self.routes.clone();
        for id in removed {
            routes.remove(*id);
        }
        for r in upserted {
            routes.insert(r.id.clone(), r);
        }
        (Router { routes }, Vec::new())
    }

    pub fn find<'r>(&'r self, req: &Request<'_>) -> Option<Match<'r>> {
        let path = req.path.split('?').next().unwrap_or("/");
        let mut best: Option<(&Arc<Route>, &str)> = None;
        for r in self.routes.values() {
            for p in &r.paths {
                if path.starts_with(p.as_str()) && best.is_none_or(|(_, b)| p.len() > b.len()) {
                    best = Some((r, p));
                }
            }
        }
        best.map(|(route, p)| Match {
            route,
            path: path.to_owned(),
            matched_path: Some(p.to_owned()),
            matched_host: None,
        })
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// The upstream path (v0).
pub fn upstream_path_v0(
    service_path: Option<&str>,
    path: &str,
    matched: Option<&str>,
    strip: bool,
) -> String {
    let rest = match (strip, matched) {
        (true, Some(m)) => &path[m.len().min(path.len())..],
        _ => path,
    };
    let base = service_path.unwrap_or("/");
    if rest.is_empty() {
        return base.to_owned();
    }
    if base.ends_with('/') && rest.starts_with('/') {
        format!("{}{}", base, &rest[1..])
    } else if !base.ends_with('/') && !rest.starts_with('/') {
        format!("{base}/{rest}")
    } else {
        format!("{base}{rest}")
    }
}

/// Normalisation (stand-in: none).
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    Cow::Borrowed(raw)
}
