//! One compiled matcher: a route, or one path group of a split route, with its priority.
//!
//! This is Kong's `kong/router/transform.lua` (`get_expression`, `get_priority`,
//! `split_routes_and_services_by_path`) evaluated directly instead of through an ATC
//! expression; the predicate semantics are atc-router's (`src/interpreter.rs`): prefix is
//! `starts_with` and records the prefix, regex is unanchored `is_match` (the path regex gets a
//! leading `^`) and records the whole match and its captures, headers use `any(lower(..))`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use http::HeaderName;
use regex::Regex;
use sha1::{Digest, Sha1};

use crate::dp::proxy::router::route::Route;

/// A matcher's place in the global order: `(priority, uuid)`, greater wins.
///
/// atc-router keeps matchers in a `BTreeMap<(priority, Uuid), _>` and scans it in reverse,
/// so on equal priority the greater UUID wins (`src/router.rs`, `try_match`).
pub(crate) type Key = (u64, u128);

/// The namespace of the split routes' v5 UUIDs (`uuid_generator` in `transform.lua`).
const SPLIT_NAMESPACE: u128 = 0x7f14_5bf9_0dce_4f91_98eb_debb_ce4b_9f6b;

/// Headers counted in the priority are capped at this (`MAX_HEADER_COUNT`).
const MAX_HEADER_COUNT: u64 = 255;

/// One compiled matcher.
pub(crate) struct Matcher {
    /// The order key: priority, then UUID.
    pub key: Key,
    /// The original route (for a split route, the route it came from).
    pub route: Arc<Route>,
    methods: Box<[Box<str>]>,
    /// Host alternatives; empty matches any host.
    pub hosts: Box<[HostPat]>,
    /// Path alternatives of this group, in the route's order; empty matches any path.
    pub paths: Box<[PathPat]>,
    headers: Box<[HeaderPat]>,
    snis: Box<[WildPat]>,
}

/// How a host or SNI pattern compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WildOp {
    /// `==`.
    Exact,
    /// `=^` (the value ends with the pattern): `*.x` becomes `.x`.
    Suffix,
    /// `^=` (the value starts with the pattern): `x.*` becomes `x.`.
    Prefix,
}

/// A host or SNI pattern.
pub(crate) struct WildPat {
    pub op: WildOp,
    pub value: Box<str>,
}

/// One host alternative of a route: a pattern and an optional port.
pub(crate) struct HostPat {
    pub pat: WildPat,
    port: Option<u32>,
    /// The route's host string as configured, reported as the matched host.
    pub original: Box<str>,
}

/// One path alternative of a route.
pub(crate) enum PathPat {
    /// A prefix path.
    Prefix(Box<str>),
    /// A `~` regex path, compiled with a leading `^`.
    Regex {
        regex: Regex,
        /// The literal text every match starts with; empty when unknown or when the regex
        /// can match anywhere (a top-level `|`).
        literal: Box<str>,
    },
}

struct HeaderPat {
    name: HeaderName,
    values: Box<[HeaderVal]>,
}

enum HeaderVal {
    Exact(Box<str>),
    Regex(Regex),
}

/// The request as the matchers see it: host lower-cased without port, path normalised.
pub(crate) struct Prepared<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub port: u32,
    pub path: &'a str,
    pub headers: &'a http::HeaderMap,
    pub sni: Option<&'a str>,
}

/// What the winning matcher reports besides the route.
pub(crate) struct Detail<'r> {
    pub matched_path: Option<String>,
    pub captures: BTreeMap<CaptureKey, String>,
    pub matched_host: Option<&'r str>,
}

/// A capture's key as atc-router keeps it: a group index or a group name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum CaptureKey {
    Index(usize),
    Name(String),
}

// === impl PathPat ===

impl PathPat {
    /// The literal the path must start with for this pattern to match.
    pub fn index_key(&self) -> &str {
        match self {
            PathPat::Prefix(p) => p,
            PathPat::Regex { literal, .. } => literal,
        }
    }

    fn is_match(&self, path: &str) -> bool {
        match self {
            PathPat::Prefix(p) => path.starts_with(&**p),
            PathPat::Regex { regex, .. } => regex.is_match(path),
        }
    }
}

// === impl WildPat ===

impl WildPat {
    fn is_match(&self, value: &str) -> bool {
        match self.op {
            WildOp::Exact => value == &*self.value,
            WildOp::Suffix => value.ends_with(&*self.value),
            WildOp::Prefix => value.starts_with(&*self.value),
        }
    }
}

// === impl HostPat ===

impl HostPat {
    fn is_match(&self, req: &Prepared<'_>) -> bool {
        self.pat.is_match(req.host) && self.port.is_none_or(|port| port == req.port)
    }
}

// === impl Matcher ===

impl Matcher {
    /// Whether the request satisfies every predicate (the fast check used while scanning).
    pub fn is_match(&self, req: &Prepared<'_>) -> bool {
        // `(net.protocol != "https" || tls.sni ...)`: SNIs count only on TLS requests.
        if !self.snis.is_empty()
            && let Some(sni) = req.sni
            && !self.snis.iter().any(|p| p.is_match(sni))
        {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.iter().any(|m| &**m == req.method) {
            return false;
        }
        if !self.hosts.is_empty() && !self.hosts.iter().any(|h| h.is_match(req)) {
            return false;
        }
        if !self.paths.is_empty() && !self.paths.iter().any(|p| p.is_match(req.path)) {
            return false;
        }
        self.headers
            .iter()
            .all(|h| header_match(h, req, None).is_some())
    }

    /// The winner's details: the first matching host and path in the route's order, and the
    /// captures of the regexes that matched (path, then headers: atc-router records the
    /// captures of every regex predicate in one map, later ones overwriting).
    pub fn detail<'r>(&'r self, req: &Prepared<'_>) -> Detail<'r> {
        let mut captures = BTreeMap::new();
        let matched_host = self
            .hosts
            .iter()
            .find(|h| h.is_match(req))
            .map(|h| &*h.original);
        let mut matched_path = None;
        for p in self.paths.iter() {
            match p {
                PathPat::Prefix(prefix) => {
                    if req.path.starts_with(&**prefix) {
                        matched_path = Some(prefix.to_string());
                        break;
                    }
                }
                PathPat::Regex { regex, .. } => {
                    if let Some(caps) = regex.captures(req.path) {
                        matched_path = caps.get(0).map(|m| m.as_str().to_string());
                        record_captures(regex, &caps, &mut captures);
                        break;
                    }
                }
            }
        }
        for h in self.headers.iter() {
            header_match(h, req, Some(&mut captures));
        }
        Detail {
            matched_path,
            captures,
            matched_host,
        }
    }
}

fn record_captures(
    regex: &Regex,
    caps: &regex::Captures<'_>,
    out: &mut BTreeMap<CaptureKey, String>,
) {
    for (idx, group) in caps.iter().enumerate() {
        if let Some(group) = group {
            out.insert(CaptureKey::Index(idx), group.as_str().to_string());
        }
    }
    for name in regex.capture_names().flatten() {
        if let Some(group) = caps.name(name) {
            out.insert(
                CaptureKey::Name(name.to_string()),
                group.as_str().to_string(),
            );
        }
    }
}

/// `(any(lower(http.headers.x)) == "a" || any(lower(http.headers.x)) ~ "b" ...)`: the first
/// alternative that any of the request's values satisfies; `None` when none does.
fn header_match(
    h: &HeaderPat,
    req: &Prepared<'_>,
    mut captures: Option<&mut BTreeMap<CaptureKey, String>>,
) -> Option<()> {
    let mut values = req.headers.get_all(&h.name).iter().peekable();
    values.peek()?;
    let lowered: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_lowercase())
        .collect();
    for alt in h.values.iter() {
        for value in &lowered {
            match alt {
                HeaderVal::Exact(want) => {
                    if value == &**want {
                        return Some(());
                    }
                }
                HeaderVal::Regex(regex) => {
                    if let Some(out) = captures.as_deref_mut() {
                        if let Some(caps) = regex.captures(value) {
                            record_captures(regex, &caps, out);
                            return Some(());
                        }
                    } else if regex.is_match(value) {
                        return Some(());
                    }
                }
            }
        }
    }
    None
}

/// Kong's `split_host_port` (`transform.lua`): the part after the first `:` is a port only
/// when it is a number; otherwise the whole string is the host.
pub(crate) fn split_host_port(s: &str) -> (&str, Option<u32>) {
    match s.find(':') {
        Some(idx) => {
            let port = &s[idx + 1..];
            if !port.is_empty() && port.len() <= 9 && port.bytes().all(|b| b.is_ascii_digit()) {
                (&s[..idx], port.parse().ok())
            } else {
                (s, None)
            }
        }
        None => (s, None),
    }
}

fn host_pat(original: &str) -> HostPat {
    let lowered = original.to_ascii_lowercase();
    let (host, port) = split_host_port(&lowered);
    let pat = if let Some(rest) = host.strip_prefix('*') {
        WildPat {
            op: WildOp::Suffix,
            value: rest.into(),
        }
    } else if let Some(rest) = host.strip_suffix('*') {
        WildPat {
            op: WildOp::Prefix,
            value: rest.into(),
        }
    } else {
        WildPat {
            op: WildOp::Exact,
            value: host.into(),
        }
    };
    HostPat {
        pat,
        port,
        original: original.into(),
    }
}

/// `sni_op_transform` and `sni_val_transform` (`transform.lua`).
fn sni_pat(sni: &str) -> WildPat {
    if let Some(rest) = sni.strip_suffix('*')
        && !sni.starts_with('*')
    {
        return WildPat {
            op: WildOp::Prefix,
            value: rest.into(),
        };
    }
    let mut value = sni;
    // The last dot of an FQDN is not used for routing.
    if value.len() > 1
        && let Some(rest) = value.strip_suffix('.')
    {
        value = rest;
    }
    if let Some(rest) = value.strip_prefix('*') {
        return WildPat {
            op: WildOp::Suffix,
            value: rest.into(),
        };
    }
    WildPat {
        op: WildOp::Exact,
        value: value.into(),
    }
}

/// `path_val_transform`: strip `~`, anchor with `^`, accept `(?<name>` as `(?P<name>`.
fn compile_path_regex(path: &str) -> Result<PathPat, String> {
    let body = &path[1..];
    let pattern = format!("^{}", body.replace("?<", "?P<"));
    let regex = Regex::new(&pattern).map_err(|e| format!("invalid regex path '{path}': {e}"))?;
    Ok(PathPat::Regex {
        regex,
        literal: literal_prefix(body).into(),
    })
}

/// The literal text that every match of `^<body>` starts with, conservatively.
///
/// Empty when the body has a top-level `|` (Kong prepends `^` without a group, so the other
/// alternatives are unanchored) or starts with a metacharacter.
pub(crate) fn literal_prefix(body: &str) -> String {
    if has_top_level_alternation(body) {
        return String::new();
    }
    let chars: Vec<char> = body.chars().collect();
    let mut out = String::new();
    let mut idx = 0;
    while idx < chars.len() {
        let c = chars[idx];
        let (lit, next) = match c {
            '.' | '^' | '$' | '*' | '+' | '?' | '(' | ')' | '[' | ']' | '{' | '}' | '|' => break,
            '\\' => match chars.get(idx + 1) {
                Some(&n) if n.is_ascii_punctuation() => (n, idx + 2),
                _ => break,
            },
            c if c.is_whitespace() => break,
            c => (c, idx + 1),
        };
        // A quantifier that allows zero repetitions makes the last literal optional.
        match chars.get(next) {
            Some('*' | '?' | '{') => break,
            Some('+') => {
                out.push(lit);
                break;
            }
            _ => {}
        }
        out.push(lit);
        idx = next;
    }
    out
}

fn has_top_level_alternation(body: &str) -> bool {
    let mut depth = 0usize;
    let mut in_class = false;
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '[' if !in_class => in_class = true,
            ']' if in_class => in_class = false,
            '(' if !in_class => depth += 1,
            ')' if !in_class => depth = depth.saturating_sub(1),
            '|' if !in_class && depth == 0 => return true,
            _ => {}
        }
    }
    false
}

/// A v5 UUID (RFC 4122, SHA-1) as a number, for split routes' ids.
pub(crate) fn uuid_v5(namespace: u128, name: &str) -> u128 {
    let mut hasher = Sha1::new();
    hasher.update(namespace.to_be_bytes());
    hasher.update(name.as_bytes());
    let digest = hasher.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    u128::from_be_bytes(bytes)
}

/// A route id as a number, ordered as atc-router orders `Uuid`s (by bytes).
pub(crate) fn parse_uuid(id: &str) -> Result<u128, String> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.as_u128())
        .map_err(|_| format!("route id '{id}' is not a UUID"))
}

/// The priority of one path group (`get_priority` in `transform.lua`), as a 64-bit number:
/// bits 61-63 the count of set fields, 60 plain hosts only, 52-59 the header count, 51 a
/// regex group, 19-50 the regex priority (regex groups only), 0-18 the prefix length.
pub(crate) fn priority(route: &Route, group: Option<(bool, usize)>) -> u64 {
    let mut weight: u64 = 0;
    for set in [
        route.has_sources,
        route.has_destinations,
        !route.methods.is_empty(),
        !route.hosts.is_empty(),
        !route.headers.is_empty(),
        !route.snis.is_empty(),
        group.is_some(),
    ] {
        weight += u64::from(set);
    }
    let plain_hosts = route.hosts_is_array && !route.hosts.iter().any(|h| h.contains('*'));
    let headers = (route.headers.len() as u64).min(MAX_HEADER_COUNT);
    let (regex, length) = group.unwrap_or((false, 0));
    let regex_priority = if regex {
        (route.regex_priority as u64).wrapping_shl(19)
    } else {
        0
    };
    (weight << 61)
        | (u64::from(plain_hosts) << 60)
        | (headers << 52)
        | (u64::from(regex) << 51)
        | regex_priority
        | (length as u64 & 0x7FFFF)
}

/// Compiles a route into its matchers: one, or one per distinct prefix length plus one for
/// all regexes when its paths mix them (`split_routes_and_services_by_path`).
pub(crate) fn compile(route: &Arc<Route>) -> Result<Vec<Arc<Matcher>>, String> {
    let route_uuid = parse_uuid(&route.id)?;
    if route.has_sources || route.has_destinations {
        return Err("'sources' and 'destinations' are not supported on HTTP routes".to_string());
    }
    let methods: Box<[Box<str>]> = route.methods.iter().map(|m| m.as_str().into()).collect();
    let hosts: Vec<HostPat> = route.hosts.iter().map(|h| host_pat(h)).collect();
    let snis: Vec<WildPat> = route.snis.iter().map(|s| sni_pat(s)).collect();
    let mut headers = Vec::with_capacity(route.headers.len());
    for (name, values) in &route.headers {
        let wire_name = name.to_ascii_lowercase().replace('_', "-");
        let name = HeaderName::from_bytes(wire_name.as_bytes())
            .map_err(|_| format!("invalid header name '{name}'"))?;
        let mut alts = Vec::with_capacity(values.len());
        for value in values {
            if let Some(pattern) = value.strip_prefix("~*") {
                let pattern = pattern.to_ascii_lowercase();
                let regex = Regex::new(&pattern)
                    .map_err(|e| format!("invalid header regex '{value}': {e}"))?;
                alts.push(HeaderVal::Regex(regex));
            } else {
                alts.push(HeaderVal::Exact(value.to_ascii_lowercase().into()));
            }
        }
        headers.push(HeaderPat {
            name,
            values: alts.into(),
        });
    }
    let headers: Box<[HeaderPat]> = headers.into();

    // Group the paths by kind and length, in order of first appearance.
    let mut groups: Vec<(Option<usize>, Vec<&str>)> = Vec::new();
    for p in &route.paths {
        let kind = if p.starts_with('~') {
            None
        } else {
            Some(p.len())
        };
        match groups.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, members)) => members.push(p),
            None => groups.push((kind, vec![p])),
        }
    }
    let split = groups.len() > 1;
    let mut out = Vec::with_capacity(groups.len().max(1));
    if groups.is_empty() {
        out.push(Arc::new(Matcher {
            key: (priority(route, None), route_uuid),
            route: route.clone(),
            methods,
            hosts: hosts.into(),
            paths: Box::new([]),
            headers,
            snis: snis.into(),
        }));
        return Ok(out);
    }
    // Each group gets its own copy of the other predicates; they are small.
    let hosts: Arc<[HostPat]> = hosts.into();
    let snis: Arc<[WildPat]> = snis.into();
    let headers: Arc<[HeaderPat]> = Arc::from(headers);
    for (group_idx, (kind, members)) in groups.iter().enumerate() {
        let mut paths = Vec::with_capacity(members.len());
        for p in members {
            paths.push(match kind {
                None => compile_path_regex(p)?,
                Some(_) => PathPat::Prefix((*p).into()),
            });
        }
        let uuid = if split {
            uuid_v5(SPLIT_NAMESPACE, &format!("{}#{}", route.id, group_idx + 1))
        } else {
            route_uuid
        };
        let group = Some((kind.is_none(), kind.unwrap_or(0)));
        out.push(Arc::new(Matcher {
            key: (priority(route, group), uuid),
            route: route.clone(),
            methods: methods.clone(),
            hosts: hosts.iter().map(clone_host).collect(),
            paths: paths.into(),
            headers: headers.iter().map(clone_header).collect(),
            snis: snis.iter().map(clone_wild).collect(),
        }));
    }
    Ok(out)
}

fn clone_wild(p: &WildPat) -> WildPat {
    WildPat {
        op: p.op,
        value: p.value.clone(),
    }
}

fn clone_host(h: &HostPat) -> HostPat {
    HostPat {
        pat: clone_wild(&h.pat),
        port: h.port,
        original: h.original.clone(),
    }
}

fn clone_header(h: &HeaderPat) -> HeaderPat {
    HeaderPat {
        name: h.name.clone(),
        values: h
            .values
            .iter()
            .map(|v| match v {
                HeaderVal::Exact(s) => HeaderVal::Exact(s.clone()),
                // Cloning a `Regex` shares its compiled program.
                HeaderVal::Regex(r) => HeaderVal::Regex(r.clone()),
            })
            .collect(),
    }
}

/// Lower-cases a host only when needed.
pub(crate) fn lower(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}
