//! cors (priority 2000): `kong/plugins/cors/handler.lua`.

use std::sync::LazyLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response};
use http_body_util::Full;
use regex::Regex;
use serde_json::Value;

use super::request::Ctx;
use super::util::{bool_or, header_first, lua_number, opt_num, opt_str_list};

/// An origin entry of the config, prepared as the handler's `config_cache` holds it.
enum Origin {
    /// A regex (anchored at the start, `$` appended unless present), matched against the
    /// request origin's host when the entry has no `:`, else its normalised origin.
    Regex { regex: Regex, by_host: bool },
    /// A plain origin, compared with the request's normalised origin.
    Plain(String),
}

/// cors' config.
pub(super) struct CorsConf {
    /// The configured origins, as written.
    origins: Vec<String>,
    /// The origins prepared for matching.
    prepared: Vec<Origin>,
    /// Whether the single configured origin is set as it is (no regex characters).
    single_plain: bool,
    /// `Access-Control-Allow-Headers` (null or empty: echo the request's).
    headers: Option<Vec<String>>,
    /// `Access-Control-Expose-Headers`.
    exposed_headers: Option<Vec<String>>,
    /// `Access-Control-Allow-Methods`.
    methods: Option<Vec<String>>,
    /// `Access-Control-Max-Age`.
    max_age: Option<f64>,
    /// `Access-Control-Allow-Credentials`.
    credentials: bool,
    /// `Access-Control-Allow-Private-Network`.
    private_network: bool,
    /// Proxy preflights upstream.
    preflight_continue: bool,
    /// Send cors headers on requests with no `Origin`.
    allow_origin_absent: bool,
}

/// `^[A-Za-z0-9.:/-]+$`: an origin with no regex characters.
static PLAIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9.:/-]+$").expect("static regex"));

impl CorsConf {
    /// Parses the config (Kong's shape, defaults filled); a regex origin that does not
    /// compile is an error.
    pub(super) fn parse(conf: &Value) -> Result<CorsConf, String> {
        let origins = opt_str_list(conf, "origins")?.unwrap_or_default();
        let mut prepared = Vec::new();
        for entry in &origins {
            if entry == "*" {
                continue;
            }
            let by_host = !entry.contains(':');
            if PLAIN.is_match(entry) {
                prepared.push(Origin::Plain(normalize_origin(entry).0));
            } else {
                let mut pattern = entry.clone();
                if !pattern.ends_with('$') {
                    pattern.push('$');
                }
                if let Some(stripped) = pattern.strip_prefix('^') {
                    pattern = stripped.to_owned();
                }
                let regex = Regex::new(&format!("^(?:{pattern})"))
                    .map_err(|e| format!("config.origins: '{entry}' is not a valid regex: {e}"))?;
                prepared.push(Origin::Regex { regex, by_host });
            }
        }
        Ok(CorsConf {
            single_plain: origins.len() == 1 && PLAIN.is_match(&origins[0]),
            origins,
            prepared,
            headers: opt_str_list(conf, "headers")?,
            exposed_headers: opt_str_list(conf, "exposed_headers")?,
            methods: opt_str_list(conf, "methods")?,
            max_age: opt_num(conf, "max_age"),
            credentials: bool_or(conf, "credentials", false),
            private_network: bool_or(conf, "private_network", false),
            preflight_continue: bool_or(conf, "preflight_continue", false),
            allow_origin_absent: bool_or(conf, "allow_origin_absent", true),
        })
    }
}

/// Kong's `normalize_origin` (with luasocket's `url.parse`): `(domain, host)`, the default
/// port of http/https dropped; an origin with no `scheme://host` is its own domain and host.
fn normalize_origin(origin: &str) -> (String, String) {
    let no_fragment = origin.split('#').next().unwrap_or("");
    let (scheme, rest) = match no_fragment.split_once(':') {
        Some((scheme, rest))
            if !scheme.is_empty()
                && scheme
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
        {
            (Some(scheme), rest)
        }
        _ => (None, no_fragment),
    };
    let Some(authority) = rest.strip_prefix("//") else {
        return (origin.to_owned(), origin.to_owned());
    };
    let authority = authority.split('/').next().unwrap_or("");
    let authority = authority.split('?').next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (authority, None),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return (origin.to_owned(), origin.to_owned());
    }
    let port = port.filter(|p| {
        !((scheme == Some("http") && *p == "80") || (scheme == Some("https") && *p == "443"))
    });
    let mut domain = String::new();
    if let Some(scheme) = scheme {
        domain.push_str(scheme);
        domain.push_str("://");
    }
    domain.push_str(host);
    if let Some(port) = port {
        domain.push(':');
        domain.push_str(port);
    }
    (domain, host.to_owned())
}

/// Response headers being built: `set` replaces, `add` appends, `clear` removes.
struct Out<'a>(&'a mut HeaderMap);

impl Out<'_> {
    /// Sets a header.
    fn set(&mut self, name: &'static str, value: &str) {
        if let Ok(value) = HeaderValue::from_str(value) {
            self.0.insert(HeaderName::from_static(name), value);
        }
    }
    /// Appends a header value.
    fn add(&mut self, name: &'static str, value: &'static str) {
        self.0.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    /// Removes a header.
    fn clear(&mut self, name: &'static str) {
        self.0.remove(name);
    }
    /// `Vary: Origin`, appended in header_filter, set in access.
    fn vary(&mut self, header_filter: bool) {
        if header_filter {
            self.add("vary", "Origin");
        } else {
            self.set("vary", "Origin");
        }
    }
}

/// Kong's `configure_origin`: sets `Access-Control-Allow-Origin`; true when it allows all.
fn configure_origin(
    conf: &CorsConf,
    header_filter: bool,
    req_origin: Option<&str>,
    out: &mut Out,
) -> bool {
    let n = conf.origins.len();
    if n == 0 || (n == 1 && conf.origins[0] == "*") {
        out.set("access-control-allow-origin", "*");
        return true;
    }
    out.vary(header_filter);
    if conf.single_plain {
        out.set("access-control-allow-origin", &conf.origins[0]);
        return false;
    }
    if let Some(origin) = req_origin.filter(|o| !o.is_empty()) {
        if conf.origins.iter().any(|o| o == "*") {
            out.set("access-control-allow-origin", "*");
            return true;
        }
        let (domain, host) = normalize_origin(origin);
        for entry in &conf.prepared {
            let found = match entry {
                Origin::Regex { regex, by_host } => {
                    regex.is_match(if *by_host { &host } else { &domain })
                }
                Origin::Plain(plain) => *plain == domain,
            };
            if found {
                out.set("access-control-allow-origin", &domain);
                return false;
            }
        }
    }
    out.clear("access-control-allow-origin");
    false
}

/// Kong's `configure_credentials`.
fn configure_credentials(
    conf: &CorsConf,
    allow_all: bool,
    header_filter: bool,
    req_origin: Option<&str>,
    out: &mut Out,
) {
    if !conf.credentials {
        return;
    }
    if !allow_all {
        out.set("access-control-allow-credentials", "true");
        return;
    }
    if let Some(origin) = req_origin.filter(|o| !o.is_empty()) {
        out.vary(header_filter);
        out.set("access-control-allow-origin", origin);
        out.set("access-control-allow-credentials", "true");
    }
}

/// The access phase: answers preflights (OPTIONS with `Origin` and
/// `Access-Control-Request-Method`) with 200, unless `preflight_continue`.
pub(super) fn access(conf: &CorsConf, ctx: &mut Ctx) -> Option<Response<Full<Bytes>>> {
    let origin = header_first(&ctx.headers, "origin").filter(|o| !o.is_empty());
    let request_method = header_first(&ctx.headers, "access-control-request-method");
    let origin = origin.filter(|_| ctx.method == Method::OPTIONS && request_method.is_some())?;
    ctx.cors_skip = true;
    if conf.preflight_continue {
        return None;
    }
    let mut headers = HeaderMap::new();
    let mut out = Out(&mut headers);
    let allow_all = configure_origin(conf, false, Some(&origin), &mut out);
    configure_credentials(conf, allow_all, false, Some(&origin), &mut out);
    match conf.headers.as_ref().filter(|h| !h.is_empty()) {
        Some(list) => out.set("access-control-allow-headers", &list.join(",")),
        None => match header_first(&ctx.headers, "access-control-request-headers") {
            Some(requested) => out.set("access-control-allow-headers", &requested),
            None => out.clear("access-control-allow-headers"),
        },
    }
    let methods = match &conf.methods {
        Some(methods) => methods.join(","),
        None => "GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT".to_owned(),
    };
    out.set("access-control-allow-methods", &methods);
    if let Some(max_age) = conf.max_age {
        out.set("access-control-max-age", &lua_number(max_age));
    }
    if conf.private_network
        && header_first(&ctx.headers, "access-control-request-private-network").as_deref()
            == Some("true")
    {
        out.set("access-control-allow-private-network", "true");
    }
    // `kong.response.exit(200)`: no body.
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.headers_mut() = headers;
    Some(response)
}

/// The header_filter phase: the cors headers of an actual (non-preflight) response.
pub(super) fn header_filter(conf: &CorsConf, ctx: &Ctx, headers: &mut HeaderMap) {
    if ctx.cors_skip {
        return;
    }
    let origin = header_first(&ctx.headers, "origin");
    if origin.as_deref().is_none_or(str::is_empty) && !conf.allow_origin_absent {
        return;
    }
    let mut out = Out(headers);
    let allow_all = configure_origin(conf, true, origin.as_deref(), &mut out);
    configure_credentials(conf, allow_all, true, origin.as_deref(), &mut out);
    if let Some(exposed) = conf.exposed_headers.as_ref().filter(|e| !e.is_empty()) {
        out.set("access-control-expose-headers", &exposed.join(","));
    }
}
