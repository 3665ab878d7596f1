//! Kong 3.10's `traditional_compatible` router, with no I/O.
//!
//! The specification is Kong's `kong/router/compat.lua`, `atc.lua`, `transform.lua`,
//! `utils.lua` and `fields.lua`, with atc-router's evaluation and tie-break: each route (or
//! each path group of a split route) is one matcher with a 64-bit priority, and the request
//! goes to the matching matcher with the greatest `(priority, uuid)`.
//!
//! Instead of evaluating every matcher in order, [`Router`] looks up candidates: by host
//! (exact map, `*.x` suffix map, `x.*` prefix map, other wildcards, hostless), then by the
//! literal the route's paths start with (prefixes, and the literal prefix of each regex), and
//! evaluates only those whose key beats the best match so far. The indexes are copy-on-write
//! ([`index::ShardedMap`]), so [`Router::update`] copies only what one route touches.
//!
//! - `route.rs`: [`Route`], parsed from a `routes` entity.
//! - `matcher.rs`: compiling a route into matchers (priority, split, predicates).
//! - `index.rs`: the copy-on-write indexes.
//! - `path.rs`: [`normalize_path`] and [`upstream_path_v0`].

mod index;
/// The hasher of the request path's maps (see [`index::FxHasher`]).
pub use index::FxHasher;
mod matcher;
mod path;
mod route;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::dp::proxy::router::index::{PathIndex, ShardedMap};
use crate::dp::proxy::router::matcher::{CaptureKey, Matcher, Prepared, WildOp};

pub use crate::dp::proxy::router::path::{normalize_path, upstream_path_v0};
pub use crate::dp::proxy::router::route::Route;

/// What the router matches on, borrowed from one request.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The request method, e.g. `GET`.
    pub method: &'a str,
    /// The Host header (or :authority) as received, possibly with a port; the router
    /// lowercases it and splits the port.
    pub host: &'a str,
    /// The listener's port, used when the Host header has none.
    pub listener_port: u16,
    /// The request target's path, possibly with a query; the router strips the query and
    /// normalises it as Kong does before matching.
    pub path: &'a str,
    /// The request headers; names are matched case-insensitively.
    pub headers: &'a http::HeaderMap,
    /// The TLS SNI, `None` on plain HTTP.
    pub sni: Option<&'a str>,
}

/// The route a request matched, and what Kong records about the match.
#[derive(Debug, Clone)]
pub struct Match<'r> {
    /// The matched route (for a split route, the original route).
    pub route: &'r Arc<Route>,
    /// The normalised path the route matched against (query stripped).
    pub path: String,
    /// The matched part of the path: the prefix, or the whole regex match; `None` when the
    /// route has no paths.
    pub matched_path: Option<String>,
    /// Regex captures as Kong's `uri_captures`; `None` when the match recorded fewer than
    /// two captures (Kong's `has_capture`: a regex without groups, or a prefix).
    pub captures: Option<Captures>,
    /// The route host that matched, as configured (e.g. `*.example.com:8000`), if the route
    /// has hosts.
    pub matched_host: Option<&'r str>,
}

/// Regex captures as Kong's `uri_captures`.
///
/// atc-router records the captures of every regex predicate that matched, path first, then
/// header regexes, in one map (later ones overwrite equal keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Captures {
    /// Groups by index, 0 being the whole match; a group that did not participate is absent.
    /// Named groups appear here by index too.
    pub unnamed: BTreeMap<usize, String>,
    /// Named groups (`(?<name>...)` or `(?P<name>...)`) that participated.
    pub named: BTreeMap<String, String>,
}

/// An immutable router over a set of routes; cheap to share in an `Arc`.
#[derive(Clone, Default)]
pub struct Router {
    /// Every HTTP route that compiled, by id, with its matchers.
    routes: ShardedMap<Arc<[Arc<Matcher>]>>,
    /// Matchers with a plain host alternative, by host (without port).
    exact: ShardedMap<Arc<PathIndex>>,
    /// Matchers with a `*.x` alternative, by `.x`.
    suffix: ShardedMap<Arc<PathIndex>>,
    /// Matchers with an `x.*` alternative, by `x.`.
    prefix: ShardedMap<Arc<PathIndex>>,
    /// Matchers with a wildcard alternative of another shape (scanned for every request).
    odd_hosts: Arc<PathIndex>,
    /// Matchers without hosts.
    hostless: Arc<PathIndex>,
}

/// Where a matcher is indexed for one of its host alternatives.
#[derive(PartialEq, Eq, PartialOrd, Ord)]
enum HostSlot<'a> {
    Exact(&'a str),
    Suffix(&'a str),
    Prefix(&'a str),
    Odd,
    Hostless,
}

// === impl Router ===

impl Router {
    /// Builds from scratch. Routes whose protocols include none of http/https/grpc/grpcs
    /// are not HTTP routes and are skipped silently; a route that cannot be compiled (a bad
    /// regex) is left out and reported in the returned list as (route id, message).
    pub fn new(routes: impl IntoIterator<Item = Arc<Route>>) -> (Router, Vec<(String, String)>) {
        Router::default().update(&[], routes)
    }

    /// A new router equal to `Router::new` of this router's routes minus `removed` ids, with
    /// `upserted` added or replacing the same id. Unchanged routes' compiled matchers are
    /// shared, and only the index shards a changed route touches are copied; `self` is
    /// untouched.
    pub fn update(
        &self,
        removed: &[&str],
        upserted: impl IntoIterator<Item = Arc<Route>>,
    ) -> (Router, Vec<(String, String)>) {
        let mut next = self.clone();
        let mut errors = Vec::new();
        for id in removed {
            next.remove_route(id);
        }
        for route in upserted {
            next.remove_route(&route.id);
            if !route.is_http() {
                continue;
            }
            match matcher::compile(&route) {
                Ok(matchers) => next.add_route(&route.id, matchers.into()),
                Err(message) => errors.push((route.id.clone(), message)),
            }
        }
        (next, errors)
    }

    /// Finds the route for a request: the matching matcher with the greatest
    /// `(priority, uuid)`.
    pub fn find<'r>(&'r self, req: &Request<'_>) -> Option<Match<'r>> {
        let path = path::normalize_for_match(req.path)?;
        let host_lower = matcher::lower(req.host);
        let (host, port) = matcher::split_host_port(&host_lower);
        let prepared = Prepared {
            method: req.method,
            host,
            port: port.unwrap_or(u32::from(req.listener_port)),
            path: &path,
            headers: req.headers,
            sni: req.sni,
        };

        let mut best: Option<&'r Arc<Matcher>> = None;
        if let Some(group) = self.exact.get(host) {
            group.scan(&prepared, &mut best);
        }
        if self.suffix.len() > 0 || self.prefix.len() > 0 {
            for (idx, _) in host.match_indices('.') {
                if self.suffix.len() > 0
                    && let Some(group) = self.suffix.get(&host[idx..])
                {
                    group.scan(&prepared, &mut best);
                }
                if self.prefix.len() > 0
                    && let Some(group) = self.prefix.get(&host[..=idx])
                {
                    group.scan(&prepared, &mut best);
                }
            }
        }
        self.odd_hosts.scan(&prepared, &mut best);
        self.hostless.scan(&prepared, &mut best);

        let winner = best?;
        let detail = winner.detail(&prepared);
        let captures = if detail.captures.len() >= 2 {
            let mut captures = Captures::default();
            for (key, value) in detail.captures {
                match key {
                    CaptureKey::Index(idx) => {
                        captures.unnamed.insert(idx, value);
                    }
                    CaptureKey::Name(name) => {
                        captures.named.insert(name, value);
                    }
                }
            }
            Some(captures)
        } else {
            None
        };
        Some(Match {
            route: &winner.route,
            path: path.into_owned(),
            matched_path: detail.matched_path,
            captures,
            matched_host: detail.matched_host,
        })
    }

    /// The number of routes in the router.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the router has no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.len() == 0
    }

    /// The route with this id, if the router holds it.
    pub fn route(&self, id: &str) -> Option<&Arc<Route>> {
        self.routes
            .get(id)
            .and_then(|m| m.first())
            .map(|m| &m.route)
    }

    /// The winner by brute force: every matcher, greatest key first (tests only).
    #[cfg(test)]
    fn find_linear(&self, req: &Request<'_>) -> Option<String> {
        let path = path::normalize_for_match(req.path)?;
        let host_lower = matcher::lower(req.host);
        let (host, port) = matcher::split_host_port(&host_lower);
        let prepared = Prepared {
            method: req.method,
            host,
            port: port.unwrap_or(u32::from(req.listener_port)),
            path: &path,
            headers: req.headers,
            sni: req.sni,
        };
        let mut all: Vec<Arc<Matcher>> = Vec::new();
        for shard in self.routes.values() {
            all.extend(shard.iter().cloned());
        }
        all.sort_by_key(|m| std::cmp::Reverse(m.key));
        all.iter()
            .find(|m| m.is_match(&prepared))
            .map(|m| m.route.id.clone())
    }

    fn add_route(&mut self, id: &str, matchers: Arc<[Arc<Matcher>]>) {
        for m in matchers.iter() {
            for slot in host_slots(m) {
                self.with_group(slot, |group| group.insert(m));
            }
        }
        self.routes.update(id, |_| Some(matchers));
    }

    fn remove_route(&mut self, id: &str) {
        let Some(matchers) = self.routes.get(id).cloned() else {
            return;
        };
        for m in matchers.iter() {
            for slot in host_slots(m) {
                self.with_group(slot, |group| group.remove(m));
            }
        }
        self.routes.update(id, |_| None);
    }

    fn with_group(&mut self, slot: HostSlot<'_>, f: impl FnOnce(&mut PathIndex)) {
        let map = match slot {
            HostSlot::Exact(key) => (&mut self.exact, key),
            HostSlot::Suffix(key) => (&mut self.suffix, key),
            HostSlot::Prefix(key) => (&mut self.prefix, key),
            HostSlot::Odd => return f(Arc::make_mut(&mut self.odd_hosts)),
            HostSlot::Hostless => return f(Arc::make_mut(&mut self.hostless)),
        };
        let (map, key) = map;
        map.update(key, |old| {
            let mut group = old.unwrap_or_default();
            f(Arc::make_mut(&mut group));
            if group.is_empty() { None } else { Some(group) }
        });
    }
}

/// The host groups a matcher is indexed in, each once.
fn host_slots(m: &Matcher) -> Vec<HostSlot<'_>> {
    if m.hosts.is_empty() {
        return vec![HostSlot::Hostless];
    }
    let mut slots: Vec<HostSlot<'_>> = m
        .hosts
        .iter()
        .map(|h| {
            let value = &*h.pat.value;
            match h.pat.op {
                WildOp::Exact => HostSlot::Exact(value),
                WildOp::Suffix if value.starts_with('.') => HostSlot::Suffix(value),
                WildOp::Prefix if value.ends_with('.') => HostSlot::Prefix(value),
                _ => HostSlot::Odd,
            }
        })
        .collect();
    slots.sort();
    slots.dedup();
    slots
}
