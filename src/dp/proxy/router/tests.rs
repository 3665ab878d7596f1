//! Table-driven tests built from Kong 3.10's `spec/01-unit/08-router_spec.lua`
//! (`traditional_compatible` branches) and `spec/fixtures/router_path_handling_tests.lua`.
//!
//! Route ids follow the spec's `e8fb37f1-102d-461e-9c51-6608a6bb8XXX` pattern; a case names
//! the route it expects by the last three digits.

use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::{Value, json};

use crate::dp::proxy::router::matcher::{literal_prefix, priority, uuid_v5};
use crate::dp::proxy::router::{Match, Request, Route, Router, normalize_path, upstream_path_v0};

const ID_PREFIX: &str = "e8fb37f1-102d-461e-9c51-6608a6bb8";

/// A route entity with the spec's id pattern and the given fields.
fn route(suffix: &str, fields: Value) -> Value {
    let mut v = json!({
        "id": format!("{ID_PREFIX}{suffix}"),
        "protocols": ["http", "https"],
        "strip_path": true,
        "preserve_host": false,
        "regex_priority": 0,
        "path_handling": "v0",
        "service": {"id": "3f2e0a53-0000-4000-8000-000000000001"},
    });
    for (k, val) in fields.as_object().expect("fields are an object") {
        v[k] = val.clone();
    }
    v
}

fn build(routes: &[Value]) -> Router {
    let parsed = routes
        .iter()
        .map(|r| Arc::new(Route::from_entity(r).expect("route parses")));
    let (router, errors) = Router::new(parsed);
    assert!(errors.is_empty(), "unexpected errors: {errors:?}");
    router
}

/// One request: method, path, Host, headers, SNI and listener port.
#[derive(Clone, Copy)]
struct Req<'a> {
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: &'a [(&'a str, &'a str)],
    sni: Option<&'a str>,
    port: u16,
}

fn req<'a>(method: &'a str, path: &'a str, host: &'a str) -> Req<'a> {
    Req {
        method,
        path,
        host,
        headers: &[],
        sni: None,
        port: 80,
    }
}

fn hreq<'a>(
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: &'a [(&'a str, &'a str)],
) -> Req<'a> {
    Req {
        headers,
        ..req(method, path, host)
    }
}

fn header_map(headers: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    map
}

fn find_with<'r, T>(router: &'r Router, r: Req<'_>, f: impl FnOnce(Option<Match<'r>>) -> T) -> T {
    let headers = header_map(r.headers);
    let request = Request {
        method: r.method,
        host: r.host,
        listener_port: r.port,
        path: r.path,
        headers: &headers,
        sni: r.sni,
    };
    f(router.find(&request))
}

/// The last three digits of the matched route's id, or `None`.
fn found(router: &Router, r: Req<'_>) -> Option<String> {
    find_with(router, r, |m| {
        m.map(|m| m.route.id[ID_PREFIX.len()..].to_string())
    })
}

#[track_caller]
fn check(routes: &[Value], cases: &[(Req<'_>, Option<&str>)]) {
    let router = build(routes);
    for (r, want) in cases {
        let got = found(&router, *r);
        assert_eq!(
            got.as_deref(),
            *want,
            "{} {} host={:?} headers={:?} sni={:?}",
            r.method,
            r.path,
            r.host,
            r.headers,
            r.sni
        );
    }
}

// --- 08-router_spec.lua, describe("select()"): the shared use case ----------------------

fn select_use_case() -> Vec<Value> {
    vec![
        route("101", json!({"hosts": ["domain-1.org", "domain-2.org"]})),
        route("102", json!({"methods": ["TRACE"]})),
        route("103", json!({"paths": ["/my-route"]})),
        route(
            "104",
            json!({"paths": ["/route-4"], "hosts": ["domain-1.org", "domain-2.org"]}),
        ),
        route(
            "105",
            json!({"hosts": ["domain-1.org", "domain-2.org"], "methods": ["POST", "PUT", "PATCH"]}),
        ),
        route(
            "106",
            json!({"methods": ["POST", "PUT", "PATCH"], "paths": ["/route-6"]}),
        ),
        route(
            "107",
            json!({"hosts": ["domain-with-uri-1.org", "domain-with-uri-2.org"], "methods": ["POST", "PUT", "PATCH"], "paths": ["/my-route-uri"]}),
        ),
        route("108", json!({"paths": ["/serviceless"], "service": null})),
        route(
            "109",
            json!({"headers": {"location": ["my-location-1", "my-location-2"]}}),
        ),
        route(
            "110",
            json!({"headers": {"location": ["my-location-1"], "version": ["v1", "v2"]}}),
        ),
        route(
            "111",
            json!({"headers": {"location": ["my-location-1", "my-location-2"]}, "paths": ["/headers-uri"]}),
        ),
        route(
            "112",
            json!({"hosts": ["domain-with-headers-1.org", "domain-with-headers-2.org"], "headers": {"location": ["my-location-1", "my-location-2"]}, "methods": ["POST", "PUT", "PATCH"], "paths": ["/headers-host-uri-method"]}),
        ),
        route(
            "113",
            json!({"hosts": ["domain-1.org:321", "domain-2.org"]}),
        ),
        route("114", json!({"hosts": ["domain-3.org:321"]})),
        route(
            "115",
            json!({"headers": {"user_agent": ["~*windows|linux|os\\s+x\\s*[\\d\\._]+|solaris|bsd"]}}),
        ),
    ]
}

#[test]
fn select_host_method_uri() {
    // select(): [host], [host] ignores default port, [host] matches specific port, port-only
    // route, [uri], [uri + empty host], [method], [host + uri], [host + method],
    // [uri + method], [host + uri + method], [serviceless], [uri prefix], misses.
    check(
        &select_use_case(),
        &[
            (req("GET", "/", "domain-1.org"), Some("101")),
            (req("GET", "/", "domain-1.org:80"), Some("101")),
            (req("GET", "/", "domain-1.org:321"), Some("113")),
            (req("GET", "/", "domain-3.org:321"), Some("114")),
            (req("GET", "/", "domain-3.org:123"), None),
            (req("GET", "/my-route", "domain.org"), Some("103")),
            (req("GET", "/my-route-uri", ""), Some("103")),
            (req("TRACE", "/", "domain.org"), Some("102")),
            (req("GET", "/route-4", "domain-1.org"), Some("104")),
            (req("POST", "/", "domain-1.org"), Some("105")),
            (req("PUT", "/route-6", "domain.org"), Some("106")),
            (
                req("PUT", "/my-route-uri", "domain-with-uri-2.org"),
                Some("107"),
            ),
            (req("GET", "/serviceless", ""), Some("108")),
            (req("GET", "/my-route/some/path", "domain.org"), Some("103")),
            (req("GET", "/", "domain-3.org"), None),
            (req("GET", "/route-4", "domain-3.org"), None),
            (
                req("GET", "/my-route-uri", "domain-with-uri-2.org"),
                Some("103"),
            ),
            (req("GET", "/", "DOMAIN-2.ORG"), Some("113")),
        ],
    );
}

#[test]
fn select_host_port_uses_listener_port() {
    // "[host] ignores default port": a route without port matches any port, and a Host
    // without port takes the listener's port (`fields.lua`, net.dst.port).
    let router = build(&select_use_case());
    let mut r = req("GET", "/", "domain-1.org");
    r.port = 321;
    assert_eq!(found(&router, r).as_deref(), Some("113"));
    r.port = 8000;
    // Route 113's domain-2.org alternative has no port, but domain-1.org needs 321: 101.
    assert_eq!(found(&router, r).as_deref(), Some("101"));
}

#[test]
fn select_headers() {
    // select(): single [headers] value, multiple [headers] values, [headers + uri],
    // [host + headers + uri + method], regex header (use case 15).
    let ua = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/83.0.4103.116 Safari/537.36";
    check(
        &select_use_case(),
        &[
            (
                hreq("GET", "/", "", &[("location", "my-location-1")]),
                Some("109"),
            ),
            (
                hreq("GET", "/", "", &[("location", "my-location-2")]),
                Some("109"),
            ),
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[("location", "my-location-3"), ("location", "my-location-2")],
                ),
                Some("109"),
            ),
            (hreq("GET", "/", "", &[("location", "my-location-3")]), None),
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[("location", "my-location-3"), ("location", "foo")],
                ),
                None,
            ),
            (hreq("GET", "/", "", &[("user-agent", ua)]), Some("115")),
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[("location", "my-location-1"), ("version", "v1")],
                ),
                Some("110"),
            ),
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[("location", "my-location-1"), ("version", "v2")],
                ),
                Some("110"),
            ),
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[
                        ("location", "my-location-3"),
                        ("location", "my-location-1"),
                        ("version", "v2"),
                    ],
                ),
                Some("110"),
            ),
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[
                        ("location", "my-location-3"),
                        ("location", "my-location-2"),
                        ("version", "v2"),
                    ],
                ),
                Some("109"),
            ),
            (
                hreq("GET", "/headers-uri", "", &[("location", "my-location-2")]),
                Some("111"),
            ),
            (
                hreq(
                    "PUT",
                    "/headers-host-uri-method",
                    "domain-with-headers-1.org",
                    &[("location", "my-location-2")],
                ),
                Some("112"),
            ),
            // misses: invalid headers in [headers + uri] and [headers + host + uri + method].
            (
                hreq("GET", "/headers-uri", "", &[("location", "foo")]),
                None,
            ),
            (
                hreq(
                    "PUT",
                    "/headers-host-uri-method",
                    "domain-with-headers-1.org",
                    &[("location", "foo")],
                ),
                None,
            ),
        ],
    );
}

// --- describe("[uri prefix]") -------------------------------------------------------------

#[test]
fn prefix_longer_uri_wins() {
    // "does not supersede another route with a longer [uri]".
    check(
        &[
            route("101", json!({"paths": ["/my-route/hello"]})),
            route("102", json!({"paths": ["/my-route"]})),
        ],
        &[
            (req("GET", "/my-route/hello", "domain.org"), Some("101")),
            (
                req("GET", "/my-route/hello/world", "domain.org"),
                Some("101"),
            ),
            (req("GET", "/my-route", "domain.org"), Some("102")),
            (req("GET", "/my-route/world", "domain.org"), Some("102")),
        ],
    );
    // "... while [methods] are also defined" and "... while [hosts] are also defined".
    for extra in [
        json!({"methods": ["POST", "PUT", "GET"]}),
        json!({"hosts": ["domain.org"]}),
    ] {
        let mut a = route("101", json!({"paths": ["/my-route"]}));
        let mut b = route("102", json!({"paths": ["/my-route/hello"]}));
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
            b[k] = v.clone();
        }
        check(
            &[a, b],
            &[
                (req("GET", "/my-route/hello", "domain.org"), Some("102")),
                (
                    req("GET", "/my-route/hello/world", "domain.org"),
                    Some("102"),
                ),
                (req("GET", "/my-route", "domain.org"), Some("101")),
                (req("GET", "/my-route/world", "domain.org"), Some("101")),
            ],
        );
    }
}

#[test]
fn prefix_other_host_and_anchoring() {
    // "does not supersede another route with a longer [uri] when a better [uri] match
    // exists for another [host]" and "only matches [uri prefix] as a prefix (anchored mode)".
    check(
        &[
            route(
                "101",
                json!({"hosts": ["example.com"], "paths": ["/my-route"]}),
            ),
            route(
                "102",
                json!({"hosts": ["example.com"], "paths": ["/my-route/hello"]}),
            ),
            route(
                "103",
                json!({"hosts": ["example.net"], "paths": ["/my-route/hello/world"]}),
            ),
        ],
        &[
            (
                req("GET", "/my-route/hello/world", "example.com"),
                Some("102"),
            ),
            (
                req("GET", "/my-route/hello/world/and/goodnight", "example.com"),
                Some("102"),
            ),
            (
                req("GET", "/my-route/hello/world", "example.net"),
                Some("103"),
            ),
        ],
    );
    check(
        &[
            route("101", json!({"paths": ["/something/my-route"]})),
            route(
                "102",
                json!({"hosts": ["example.com"], "paths": ["/my-route"]}),
            ),
        ],
        &[(
            req("GET", "/something/my-route", "example.com"),
            Some("101"),
        )],
    );
}

// --- describe("[uri regex]") --------------------------------------------------------------

#[test]
fn uri_regex() {
    check(
        &[route("101", json!({"paths": ["~/users/\\d+/profile"]}))],
        &[
            (req("GET", "/users/123/profile", "domain.org"), Some("101")),
            (req("GET", "/users/abc/profile", "domain.org"), None),
        ],
    );
    // "matches the right route when several ones have a [uri regex]".
    check(
        &[
            route("101", json!({"paths": ["~/route/persons/\\d{3}"]})),
            route(
                "102",
                json!({"paths": ["~/route/persons/\\d{3}/following"]}),
            ),
            route("103", json!({"paths": ["~/route/persons/\\d{3}/[a-z]+"]})),
        ],
        &[(req("GET", "/route/persons/456", "domain.org"), Some("101"))],
    );
    // "matches a [uri regex] even if a [prefix uri] got a match" / "... an exact match".
    check(
        &[
            route("101", json!({"paths": ["/route/persons"]})),
            route("102", json!({"paths": ["~/route/persons/\\d+/profile"]})),
        ],
        &[
            (
                req("GET", "/route/persons/123/profile", "domain.org"),
                Some("102"),
            ),
            (req("GET", "/route/persons/123", "domain.org"), Some("101")),
        ],
    );
    check(
        &[
            route("101", json!({"paths": ["/route/fixture"]})),
            route("102", json!({"paths": ["~/route/(fixture)"]})),
        ],
        &[(req("GET", "/route/fixture", "domain.org"), Some("102"))],
    );
    // "matches a [uri regex + host] even if a [prefix uri] got a match".
    check(
        &[
            route("101", json!({"hosts": ["route.com"], "paths": ["/pat"]})),
            route(
                "102",
                json!({"hosts": ["route.com"], "paths": ["/path"], "methods": ["POST"]}),
            ),
            route(
                "103",
                json!({"hosts": ["route.com"], "paths": ["~/(path)"]}),
            ),
        ],
        &[
            (req("GET", "/path", "route.com"), Some("103")),
            (req("POST", "/path", "route.com"), Some("102")),
        ],
    );
    // "matches from the beginning of the request URI [uri regex]".
    check(
        &[route("101", json!({"paths": ["~/prefix/[0-9]+"]}))],
        &[
            (req("GET", "/prefix/123", "domain.org"), Some("101")),
            (req("GET", "/extra/prefix/123", "domain.org"), None),
        ],
    );
}

// --- describe("[wildcard host]") ----------------------------------------------------------

fn wildcard_use_case() -> Vec<Value> {
    vec![
        route("101", json!({"hosts": ["*.route.com"]})),
        route("102", json!({"hosts": ["route.*"]})),
    ]
}

#[test]
fn wildcard_hosts() {
    check(
        &wildcard_use_case(),
        &[
            (req("GET", "/", "foo.route.com"), Some("101")),
            (req("GET", "/", "route.org"), Some("102")),
            (req("GET", "/", "route.org:123"), Some("102")),
            (req("GET", "/", "foo.route.com:123"), Some("101")),
            (req("GET", "/", "route.com"), Some("102")),
            (req("GET", "/", "nothing.org"), None),
        ],
    );
    // "matches port-specific routes".
    let mut routes = wildcard_use_case();
    routes.push(route("103", json!({"hosts": ["*.route.net:123"]})));
    routes.push(route("104", json!({"hosts": ["route.*:123"]})));
    check(
        &routes,
        &[
            (req("GET", "/", "foo.route.net:123"), Some("103")),
            (req("GET", "/", "foo.route.net:456"), None),
            (req("GET", "/", "route.org:123"), Some("104")),
        ],
    );
    // "prefers port-specific even for http default port" (implicit port is the listener's).
    let mut routes = wildcard_use_case();
    routes.push(route("103", json!({"hosts": ["route.*:80"]})));
    check(
        &routes,
        &[
            (req("GET", "/", "route.org:123"), Some("102")),
            (req("GET", "/", "route.org:80"), Some("103")),
            (req("GET", "/", "route.org"), Some("103")),
        ],
    );
    // "prefers port-specific even for https default port".
    let mut routes = wildcard_use_case();
    routes.push(route("103", json!({"hosts": ["route.*:443"]})));
    let router = build(&routes);
    let mut r = req("GET", "/", "route.org");
    r.port = 443;
    assert_eq!(found(&router, r).as_deref(), Some("103"));
    assert_eq!(
        found(&router, req("GET", "/", "route.org:123")).as_deref(),
        Some("102")
    );
}

#[test]
fn wildcard_vs_plain_hosts() {
    // "does not take precedence over a plain host".
    let mut routes = wildcard_use_case();
    routes.insert(0, route("103", json!({"hosts": ["plain.route.com"]})));
    routes.push(route("104", json!({"hosts": ["route.com"]})));
    let router = build(&routes);
    for (host, want, matched) in [
        ("route.com", "104", "route.com"),
        ("route.org", "102", "route.*"),
        ("plain.route.com", "103", "plain.route.com"),
        ("foo.route.com", "101", "*.route.com"),
    ] {
        find_with(&router, req("GET", "/", host), |m| {
            let m = m.expect("a match");
            assert_eq!(&m.route.id[ID_PREFIX.len()..], want, "{host}");
            assert_eq!(m.matched_host, Some(matched), "{host}");
        });
    }
    // "matches [wildcard host + path] even if a similar [plain host] exists" and
    // "matches [plain host + path] even if a matching [wildcard host] exists".
    check(
        &[
            route(
                "101",
                json!({"hosts": ["*.route.com"], "paths": ["/path1"]}),
            ),
            route(
                "102",
                json!({"hosts": ["plain.route.com"], "paths": ["/path2"]}),
            ),
        ],
        &[
            (req("GET", "/path1", "plain.route.com"), Some("101")),
            (req("GET", "/path2", "plain.route.com"), Some("102")),
        ],
    );
}

#[test]
fn wildcard_ports_and_ties() {
    // "submatch_weight [wildcard host port] > [wildcard host]": equal priority, the greater
    // id wins, and the matched host is the first alternative that matched.
    let router = build(&[
        route("101", json!({"hosts": ["route.*"]})),
        route("102", json!({"hosts": ["route.*:80", "route.com.*"]})),
    ]);
    find_with(&router, req("GET", "/", "route.org:80"), |m| {
        let m = m.expect("a match");
        assert!(m.route.id.ends_with("102"));
        assert_eq!(m.matched_host, Some("route.*:80"));
    });
    // "matches a [wildcard host + port] even if a [wildcard host] matched".
    check(
        &[
            route("101", json!({"hosts": ["route.*"]})),
            route("102", json!({"hosts": ["route.*:123"]})),
            route("103", json!({"hosts": ["route.*:80"]})),
        ],
        &[
            (req("GET", "/", "route.org:123"), Some("102")),
            (req("GET", "/", "route.org"), Some("103")),
            (req("GET", "/", "route.org:8000"), Some("101")),
        ],
    );
    // "matches [wildcard/plain + uri + method]".
    check(
        &[route(
            "101",
            json!({"hosts": ["*.domain.com", "example.com"], "paths": ["/path"], "methods": ["GET", "TRACE"]}),
        )],
        &[
            (req("POST", "/path", "foo.domain.com"), None),
            (req("GET", "/path", "foo.domain.com"), Some("101")),
            (req("TRACE", "/path", "example.com"), Some("101")),
        ],
    );
    // "[wildcard host] + [uri regex]".
    check(
        &[
            route(
                "101",
                json!({"hosts": ["*.example.com"], "paths": ["~/users/\\d+/profile"]}),
            ),
            route(
                "102",
                json!({"hosts": ["*.example.com"], "paths": ["/users"]}),
            ),
        ],
        &[
            (
                req("GET", "/users/123/profile", "test.example.com"),
                Some("101"),
            ),
            (req("GET", "/users", "test.example.com"), Some("102")),
        ],
    );
}

// --- describe("[headers]") ----------------------------------------------------------------

#[test]
fn headers() {
    // "evaluates Routes with more [headers] first".
    check(
        &[
            route(
                "101",
                json!({"headers": {"version": ["v1", "v2"], "user_agent": ["foo", "bar"]}}),
            ),
            route(
                "102",
                json!({"headers": {"version": ["v1", "v2"], "user_agent": ["foo", "bar"], "location": ["east", "west"]}}),
            ),
        ],
        &[
            (
                hreq(
                    "GET",
                    "/",
                    "",
                    &[
                        ("version", "v1"),
                        ("user-agent", "foo"),
                        ("location", "north"),
                        ("location", "west"),
                    ],
                ),
                Some("102"),
            ),
            (
                hreq("GET", "/", "", &[("version", "v1"), ("user-agent", "foo")]),
                Some("101"),
            ),
        ],
    );
    // "names are case-insensitive" and "matches values in a case-insensitive way".
    check(
        &[
            route("101", json!({"headers": {"USER_AGENT": ["foo", "bar"]}})),
            route("102", json!({"headers": {"user_agent": ["BAZ"]}})),
        ],
        &[
            (hreq("GET", "/", "", &[("user-agent", "foo")]), Some("101")),
            (hreq("GET", "/", "", &[("User-Agent", "FOO")]), Some("101")),
            (hreq("GET", "/", "", &[("user-agent", "baz")]), Some("102")),
            (hreq("GET", "/", "", &[("user-agent", "qux")]), None),
        ],
    );
    // "more [headers] has priority over longer [paths]".
    check(
        &[
            route(
                "101",
                json!({"headers": {"version": ["v1"]}, "paths": ["/my-route/hello"]}),
            ),
            route(
                "102",
                json!({"headers": {"version": ["v1"], "location": ["us-east"]}, "paths": ["/my-route"]}),
            ),
        ],
        &[
            (
                hreq(
                    "GET",
                    "/my-route/hello",
                    "domain.org",
                    &[("version", "v1"), ("location", "us-east")],
                ),
                Some("102"),
            ),
            (
                hreq(
                    "GET",
                    "/my-route/hello/world",
                    "domain.org",
                    &[("version", "v1"), ("location", "us-east")],
                ),
                Some("102"),
            ),
            (
                hreq("GET", "/my-route/hello", "domain.org", &[("version", "v1")]),
                Some("101"),
            ),
        ],
    );
}

// --- describe("[wildcard sni]") -----------------------------------------------------------

#[test]
fn snis() {
    let routes = [
        route("101", json!({"snis": ["*.sni.test"]})),
        route("102", json!({"snis": ["sni.*"]})),
    ];
    let router = build(&routes);
    for (sni, want) in [
        ("foo.sni.test", Some("101")),
        ("foo.bar.sni.test", Some("101")),
        ("sni.foo", Some("102")),
        ("sni.foo.bar", Some("102")),
        ("bar.sni.foo", None),
        ("foo.sni.test.bar", None),
    ] {
        let mut r = req("GET", "/", "any.test");
        r.sni = Some(sni);
        assert_eq!(found(&router, r).as_deref(), want, "sni {sni}");
    }
    // On plain HTTP, SNIs are not considered (`net.protocol != "https" || ...`).
    assert_eq!(
        found(&router, req("GET", "/", "any.test")).as_deref(),
        Some("102")
    );
    // The trailing dot of an FQDN SNI is not used for routing.
    let router = build(&[route("101", json!({"snis": ["example.test."]}))]);
    let mut r = req("GET", "/", "any.test");
    r.sni = Some("example.test");
    assert_eq!(found(&router, r).as_deref(), Some("101"));
}

// --- describe("edge-cases") ---------------------------------------------------------------

#[test]
fn edge_cases() {
    // "[host] and [uri] have higher priority than [method]".
    let routes: Vec<Value> = select_use_case().into_iter().take(7).collect();
    check(
        &routes,
        &[
            (req("TRACE", "/", "domain-2.org"), Some("101")),
            (req("TRACE", "/my-route", "domain.org"), Some("103")),
        ],
    );
    // "half [uri] and [host] match does not supersede another route".
    check(
        &[
            route(
                "101",
                json!({"hosts": ["host1.com"], "paths": ["/v1/path"]}),
            ),
            route("102", json!({"hosts": ["host2.com"], "paths": ["/"]})),
        ],
        &[
            (req("GET", "/v1/path", "host1.com"), Some("101")),
            (req("GET", "/v1/path", "host2.com"), Some("102")),
        ],
    );
    // "half [wildcard host] and [method] match does not supersede another route".
    check(
        &[
            route("101", json!({"hosts": ["host.*"], "methods": ["GET"]})),
            route("102", json!({"hosts": ["host.*"], "methods": ["POST"]})),
        ],
        &[
            (req("GET", "/", "host.com"), Some("101")),
            (req("POST", "/", "host.com"), Some("102")),
        ],
    );
    // "half [uri regex] and [method] match does not supersede another route".
    check(
        &[
            route(
                "101",
                json!({"methods": ["GET"], "paths": ["~/users/\\d+/profile"]}),
            ),
            route(
                "102",
                json!({"methods": ["POST"], "paths": ["~/users/\\d*/profile"]}),
            ),
        ],
        &[
            (req("GET", "/users/123/profile", "domain.org"), Some("101")),
            (req("POST", "/users/123/profile", "domain.org"), Some("102")),
        ],
    );
    // "[method] does not supersede [uri prefix]" and "... [wildcard host]".
    check(
        &[
            route("101", json!({"methods": ["GET"]})),
            route("102", json!({"paths": ["/example"]})),
        ],
        &[
            (req("GET", "/example", "domain.org"), Some("102")),
            (req("GET", "/example/status/200", "domain.org"), Some("102")),
        ],
    );
    check(
        &[
            route("101", json!({"methods": ["GET"]})),
            route("102", json!({"hosts": ["domain.*"]})),
        ],
        &[
            (req("GET", "/", "nothing.com"), Some("101")),
            (req("GET", "/", "domain.com"), Some("102")),
        ],
    );
}

#[test]
fn root_uri_and_same_category() {
    // describe("root / [uri]"): "request with [method]", "does not supersede another
    // route", "acts as a catch-all route".
    let mut routes = select_use_case();
    routes.insert(0, route("10f", json!({"paths": ["/"]})));
    check(
        &routes,
        &[
            (req("GET", "/", "domain.org"), Some("10f")),
            (req("GET", "/my-route", "domain.org"), Some("103")),
            (
                req("GET", "/my-route/hello/world", "domain.org"),
                Some("103"),
            ),
            (req("GET", "/foobar/baz", "domain.org"), Some("10f")),
        ],
    );
    // "multiple routes of same category with conflicting values".
    let mut routes = select_use_case();
    for i in 1..=5 {
        routes.push(route(
            &format!("11{i}"),
            json!({"hosts": ["domain.org"], "paths": ["/my-uri"]}),
        ));
    }
    routes.retain(|r| {
        !["111", "112", "113", "114", "115"]
            .contains(&&r["id"].as_str().unwrap()[ID_PREFIX.len()..])
            || r["hosts"] == json!(["domain.org"])
    });
    routes.push(route(
        "121",
        json!({"hosts": ["domain.org"], "paths": ["/my-target-uri"]}),
    ));
    check(
        &routes,
        &[
            (req("GET", "/my-target-uri", "domain.org"), Some("121")),
            // Equal priority: the greatest id wins.
            (req("GET", "/my-uri", "domain.org"), Some("115")),
        ],
    );
}

// --- "normalization stopgap measurements" -------------------------------------------------

#[test]
fn normalization_stopgap() {
    check(
        &[
            route("100", json!({"paths": ["/plain/a.b.c"]})),
            route("101", json!({"paths": ["/plain/a.b%58c"]})),
            route("102", json!({"paths": ["~/reg%65x/\\d+"]})),
            route("103", json!({"paths": ["~/regex-meta/%5Cd\\+%2E"]})),
            route("104", json!({"paths": ["~/regex-reserved%2Fabc"]})),
        ],
        &[
            (req("GET", "/plain/a.b.c", "example.com"), Some("100")),
            (req("GET", "/plain/a.bXc", "example.com"), None),
            // The spec calls select(), which skips normalisation; the proxy goes through exec(),
            // which normalises first: `%58` decodes to `X` and the route is not normalised.
            (req("GET", "/plain/a.b%58c", "example.com"), None),
            (req("GET", "/plain/aab.c", "example.com"), None),
            (req("GET", "/regex/123", "example.com"), None),
            (req("GET", "/reg%65x/123", "example.com"), None),
            (req("GET", "/regex/\\d+", "example.com"), None),
            (req("GET", "/regex-meta/123a", "example.com"), None),
            (req("GET", "/regex-meta/\\d+.", "example.com"), None),
            (req("GET", "/regex-meta/%5Cd+%2E", "example.com"), None),
            (req("GET", "/regex-reserved/abc", "example.com"), None),
            (
                req("GET", "/regex-reserved%2Fabc", "example.com"),
                Some("104"),
            ),
        ],
    );
}

#[test]
fn invalid_utf8_is_no_match() {
    // "gracefully handles invalid utf-8 sequences": Kong logs and answers 404.
    let router = build(&[route("101", json!({"paths": ["/"]}))]);
    assert_eq!(
        found(&router, req("GET", "/%FC%80%80%80%80%AF", "example.org")),
        None
    );
    assert_eq!(
        found(&router, req("GET", "/hello", "example.org")).as_deref(),
        Some("101")
    );
}

#[test]
fn normalize_path_table() {
    // `kong/tools/uri.lua` normalize(uri, true) after `strip_uri_args`.
    for (raw, want) in [
        ("/", "/"),
        ("", ""),
        ("/a/b?x=1", "/a/b"),
        ("/a/b/?x=1&y=?", "/a/b/"),
        ("/a//b///c", "/a/b/c"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/../../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/route./req", "/route./req"),
        ("/route%2E/req", "/route./req"),
        ("/route%2e%2E/req", "/route../req"),
        ("/%2e%2e/x", "/x"),
        ("/%6aohn%20doe", "/john doe"),
        ("/endel%2fst", "/endel%2Fst"),
        ("/a%3fb", "/a%3Fb"),
        ("/%41%42", "/AB"),
        ("/100%", "/100%"),
        ("/%zz", "/%zz"),
    ] {
        assert_eq!(normalize_path(raw), want, "{raw:?}");
    }
}

// --- exec(): uri_captures -----------------------------------------------------------------

#[test]
fn uri_captures() {
    // "returns uri_captures from a [uri regex]".
    let router = build(&[route(
        "101",
        json!({"paths": ["~/users/(?P<user_id>\\d+)/profile/?(?P<scope>[a-z]*)"]}),
    )]);
    find_with(
        &router,
        req("GET", "/users/1984/profile", "domain.org"),
        |m| {
            let c = m.expect("a match").captures.expect("captures");
            assert_eq!(
                c.unnamed.get(&0).map(String::as_str),
                Some("/users/1984/profile")
            );
            assert_eq!(c.unnamed.get(&1).map(String::as_str), Some("1984"));
            assert_eq!(c.unnamed.get(&2).map(String::as_str), Some(""));
            assert_eq!(c.named.get("user_id").map(String::as_str), Some("1984"));
            assert_eq!(c.named.get("scope").map(String::as_str), Some(""));
            assert_eq!(c.unnamed.len(), 3);
        },
    );
    find_with(
        &router,
        req("GET", "/users/1984/profile/email", "domain.org"),
        |m| {
            let c = m.expect("a match").captures.expect("captures");
            assert_eq!(c.named.get("scope").map(String::as_str), Some("email"));
        },
    );
    // "uri_captures works well with the optional capture group. Fix #13014", with Kong's
    // `(?<name>` syntax.
    let router = build(&[route(
        "101",
        json!({"paths": ["~/(users/)?1984/(?<subpath>profile)$"]}),
    )]);
    find_with(&router, req("GET", "/1984/profile", "domain.org"), |m| {
        let c = m.expect("a match").captures.expect("captures");
        assert_eq!(c.unnamed.get(&1), None);
        assert_eq!(c.named.get("subpath").map(String::as_str), Some("profile"));
        assert_eq!(c.named.get("scope"), None);
    });
    // "returns uri_captures normalized, fix #7913".
    let router = build(&[route(
        "101",
        json!({"paths": ["~/users/(?P<fullname>[a-zA-Z\\s\\d%]+)/profile/?(?P<scope>[a-z]*)"]}),
    )]);
    find_with(
        &router,
        req("GET", "/users/%6aohn%20doe/profile", "domain.org"),
        |m| {
            let c = m.expect("a match").captures.expect("captures");
            assert_eq!(
                c.named.get("fullname").map(String::as_str),
                Some("john doe")
            );
            assert_eq!(
                c.unnamed.get(&0).map(String::as_str),
                Some("/users/john doe/profile")
            );
        },
    );
    // "returns no uri_captures from a [uri prefix] match" and "... [uri regex] match
    // without groups".
    let router = build(&[
        route("101", json!({"paths": ["/hello"]})),
        route("102", json!({"paths": ["~/users/\\d+/profile"]})),
    ]);
    find_with(&router, req("GET", "/hello/world", "domain.org"), |m| {
        let m = m.expect("a match");
        assert!(m.captures.is_none());
        assert_eq!(m.matched_path.as_deref(), Some("/hello"));
        assert_eq!(
            upstream_path_v0(None, &m.path, m.matched_path.as_deref(), true),
            "/world"
        );
    });
    find_with(
        &router,
        req("GET", "/users/1984/profile", "domain.org"),
        |m| {
            let m = m.expect("a match");
            assert!(m.captures.is_none());
            assert_eq!(m.matched_path.as_deref(), Some("/users/1984/profile"));
        },
    );
}

// --- describe("stripped paths #strip") ----------------------------------------------------

/// Finds a route and computes Kong's upstream path for it.
fn upstream(router: &Router, r: Req<'_>, service_path: Option<&str>) -> Option<(String, String)> {
    find_with(router, r, |m| {
        m.map(|m| {
            let path = upstream_path_v0(
                service_path,
                &m.path,
                m.matched_path.as_deref(),
                m.route.strip_path,
            );
            (m.route.id[ID_PREFIX.len()..].to_string(), path)
        })
    })
}

#[test]
fn stripped_paths() {
    let router = build(&[
        route(
            "101",
            json!({"paths": ["/my-route", "/xx-route"], "strip_path": true}),
        ),
        route(
            "102",
            json!({"methods": ["POST"], "paths": ["/my-route", "/xx-route"], "strip_path": false}),
        ),
    ]);
    for (r, want_id, want_path) in [
        (
            req("GET", "/my-route/hello/world", "domain.org"),
            "101",
            "/hello/world",
        ),
        (req("GET", "/my-route", "domain.org"), "101", "/"),
        (req("GET", "/xx-route", "domain.org"), "101", "/"),
        (
            req("POST", "/my-route/hello/world", "domain.org"),
            "102",
            "/my-route/hello/world",
        ),
    ] {
        let (id, path) = upstream(&router, r, None).expect("a match");
        assert_eq!(
            (id.as_str(), path.as_str()),
            (want_id, want_path),
            "{}",
            r.path
        );
    }
    // "does not strips root / URI", "strips url encoded paths", "strips a [uri regex]",
    // "strips a [uri regex] with a capture group".
    for (paths, path, want) in [
        (
            json!(["/"]),
            "/my-route/hello/world",
            "/my-route/hello/world",
        ),
        (json!(["/endel%2Fst"]), "/endel%2Fst", "/"),
        (
            json!(["~/users/\\d+/profile"]),
            "/users/123/profile/hello/world",
            "/hello/world",
        ),
        (
            json!(["~/users/(\\d+)/profile"]),
            "/users/123/profile/hello/world",
            "/hello/world",
        ),
    ] {
        let router = build(&[route("101", json!({"paths": paths, "strip_path": true}))]);
        let (_, got) = upstream(&router, req("GET", path, "domain.org"), None).expect("a match");
        assert_eq!(got, want, "{path}");
    }
}

// --- describe("#slash handling"), spec/fixtures/router_path_handling_tests.lua -------------

/// The fixture's v0 rows, expanded over strip_path:
/// (service_path, route_path, strip_path, request_path, expected_path).
const PATH_HANDLING_V0: &[(&str, Option<&str>, bool, &str, &str)] = &[
    ("/", Some("/"), false, "/", "/"),
    ("/", Some("/"), true, "/", "/"),
    ("/", Some("/"), false, "/route", "/route"),
    ("/", Some("/"), true, "/route", "/route"),
    ("/", Some("/"), false, "/route/", "/route/"),
    ("/", Some("/"), true, "/route/", "/route/"),
    ("/", Some("/"), false, "/routereq", "/routereq"),
    ("/", Some("/"), true, "/routereq", "/routereq"),
    ("/", Some("/"), false, "/route/req", "/route/req"),
    ("/", Some("/"), true, "/route/req", "/route/req"),
    ("/", Some("/route"), false, "/route", "/route"),
    ("/", Some("/route"), false, "/route/", "/route/"),
    ("/", Some("/route"), false, "/routereq", "/routereq"),
    ("/", Some("/route"), true, "/route", "/"),
    ("/", Some("/route"), true, "/route/", "/"),
    ("/", Some("/route"), true, "/routereq", "/req"),
    ("/", Some("/route/"), false, "/route/", "/route/"),
    ("/", Some("/route/"), false, "/route/req", "/route/req"),
    ("/", Some("/route/"), true, "/route/", "/"),
    ("/", Some("/route/"), true, "/route/req", "/req"),
    ("/srv", Some("/rou"), false, "/roureq", "/srv/roureq"),
    ("/srv", Some("/rou"), true, "/roureq", "/srv/req"),
    ("/srv/", Some("/rou"), false, "/rou", "/srv/rou"),
    ("/srv/", Some("/rou"), true, "/rou", "/srv"),
    ("/service", Some("/"), false, "/", "/service"),
    ("/service", Some("/"), true, "/", "/service"),
    ("/service", Some("/"), false, "/route", "/service/route"),
    ("/service", Some("/"), true, "/route", "/service/route"),
    ("/service", Some("/"), false, "/route/", "/service/route/"),
    ("/service", Some("/"), true, "/route/", "/service/route/"),
    (
        "/service",
        Some("/"),
        false,
        "/routereq",
        "/service/routereq",
    ),
    (
        "/service",
        Some("/"),
        true,
        "/routereq",
        "/service/routereq",
    ),
    (
        "/service",
        Some("/"),
        false,
        "/route/req",
        "/service/route/req",
    ),
    (
        "/service",
        Some("/"),
        true,
        "/route/req",
        "/service/route/req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route",
        "/service/route",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route/",
        "/service/route/",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/routereq",
        "/service/routereq",
    ),
    ("/service", Some("/route"), true, "/route", "/service"),
    ("/service", Some("/route"), true, "/route/", "/service/"),
    (
        "/service",
        Some("/route"),
        true,
        "/routereq",
        "/service/req",
    ),
    (
        "/service",
        Some("/route/"),
        false,
        "/route/",
        "/service/route/",
    ),
    (
        "/service",
        Some("/route/"),
        false,
        "/route/req",
        "/service/route/req",
    ),
    ("/service", Some("/route/"), true, "/route/", "/service/"),
    (
        "/service",
        Some("/route/"),
        true,
        "/route/req",
        "/service/req",
    ),
    ("/service/", Some("/"), false, "/route/", "/service/route/"),
    ("/service/", Some("/"), true, "/route/", "/service/route/"),
    ("/service/", Some("/"), false, "/", "/service/"),
    ("/service/", Some("/"), true, "/", "/service/"),
    ("/service/", Some("/"), false, "/route", "/service/route"),
    ("/service/", Some("/"), true, "/route", "/service/route"),
    (
        "/service/",
        Some("/"),
        false,
        "/routereq",
        "/service/routereq",
    ),
    (
        "/service/",
        Some("/"),
        true,
        "/routereq",
        "/service/routereq",
    ),
    (
        "/service/",
        Some("/"),
        false,
        "/route/req",
        "/service/route/req",
    ),
    (
        "/service/",
        Some("/"),
        true,
        "/route/req",
        "/service/route/req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route",
        "/service/route",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route/",
        "/service/route/",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/routereq",
        "/service/routereq",
    ),
    ("/service/", Some("/route"), true, "/route", "/service"),
    ("/service/", Some("/route"), true, "/route/", "/service/"),
    (
        "/service/",
        Some("/route"),
        true,
        "/routereq",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route/"),
        false,
        "/route/",
        "/service/route/",
    ),
    (
        "/service/",
        Some("/route/"),
        false,
        "/route/req",
        "/service/route/req",
    ),
    ("/service/", Some("/route/"), true, "/route/", "/service/"),
    (
        "/service/",
        Some("/route/"),
        true,
        "/route/req",
        "/service/req",
    ),
    ("/", None, false, "/", "/"),
    ("/", None, true, "/", "/"),
    ("/", None, false, "/route", "/route"),
    ("/", None, true, "/route", "/route"),
    ("/", None, false, "/route/", "/route/"),
    ("/", None, true, "/route/", "/route/"),
    ("/service", None, false, "/", "/service"),
    ("/service", None, true, "/", "/service"),
    ("/service", None, false, "/route", "/service/route"),
    ("/service", None, true, "/route", "/service/route"),
    ("/service", None, false, "/route/", "/service/route/"),
    ("/service", None, true, "/route/", "/service/route/"),
    ("/service/", None, false, "/", "/service/"),
    ("/service/", None, true, "/", "/service/"),
    ("/service/", None, false, "/route", "/service/route"),
    ("/service/", None, true, "/route", "/service/route"),
    ("/service/", None, false, "/route/", "/service/route/"),
    ("/service/", None, true, "/route/", "/service/route/"),
    (
        "/service",
        Some("/route"),
        true,
        "/route./req",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route"),
        true,
        "/route./req",
        "/service/req",
    ),
    (
        "/service",
        Some("/route"),
        true,
        "/route%2E/req",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route"),
        true,
        "/route%2E/req",
        "/service/req",
    ),
    (
        "/service",
        Some("/route"),
        true,
        "/route%2e/req",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route"),
        true,
        "/route%2e/req",
        "/service/req",
    ),
    (
        "/service",
        Some("/route"),
        true,
        "/route../req",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route"),
        true,
        "/route../req",
        "/service/req",
    ),
    (
        "/service",
        Some("/route"),
        true,
        "/route%2E%2E/req",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route"),
        true,
        "/route%2E%2E/req",
        "/service/req",
    ),
    (
        "/service",
        Some("/route"),
        true,
        "/route%2e%2E/req",
        "/service/req",
    ),
    (
        "/service/",
        Some("/route"),
        true,
        "/route%2e%2E/req",
        "/service/req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route./req",
        "/service/route./req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route./req",
        "/service/route./req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route%2E/req",
        "/service/route./req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route%2E/req",
        "/service/route./req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route%2e/req",
        "/service/route./req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route%2e/req",
        "/service/route./req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route../req",
        "/service/route../req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route../req",
        "/service/route../req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route%2E%2E/req",
        "/service/route../req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route%2E%2E/req",
        "/service/route../req",
    ),
    (
        "/service",
        Some("/route"),
        false,
        "/route%2e%2E/req",
        "/service/route../req",
    ),
    (
        "/service/",
        Some("/route"),
        false,
        "/route%2e%2E/req",
        "/service/route../req",
    ),
];

#[test]
fn slash_handling_plain() {
    // "(i-j) plain, ...": a prefix route (or a host route when the row has no path).
    assert_eq!(PATH_HANDLING_V0.len(), 106);
    for (idx, &(service_path, route_path, strip, request_path, expected)) in
        PATH_HANDLING_V0.iter().enumerate()
    {
        let host = format!("localbin-{idx}.com");
        let fields = match route_path {
            Some(p) => json!({"paths": [p], "strip_path": strip}),
            None => json!({"hosts": [host], "strip_path": strip}),
        };
        let router = build(&[route("101", fields)]);
        let (_, got) = upstream(&router, req("GET", request_path, &host), Some(service_path))
            .unwrap_or_else(|| panic!("row {idx}: no match"));
        assert_eq!(
            got, expected,
            "row {idx}: {service_path} {route_path:?} strip={strip} {request_path}"
        );
    }
}

#[test]
fn slash_handling_regex() {
    // "(i-j) regex, ...": the same rows with the path turned into `~/[0]?<path>`.
    let mut n = 0;
    for (idx, &(service_path, route_path, strip, request_path, expected)) in
        PATH_HANDLING_V0.iter().enumerate()
    {
        let Some(route_path) = route_path else {
            continue;
        };
        n += 1;
        let regex = format!("~/[0]?{}", &route_path[1..]);
        let host = format!("localbin-{idx}.com");
        let router = build(&[route(
            "101",
            json!({"hosts": [host], "paths": [regex], "strip_path": strip}),
        )]);
        let (_, got) = upstream(&router, req("GET", request_path, &host), Some(service_path))
            .unwrap_or_else(|| panic!("row {idx}: no match"));
        assert_eq!(
            got, expected,
            "row {idx}: {service_path} {regex} strip={strip} {request_path}"
        );
    }
    assert_eq!(n, 88);
}

// --- split routes and regex_priority ------------------------------------------------------

#[test]
fn split_routes() {
    // "[prefix matching ignore regex_priority]".
    check(
        &[
            route("101", json!({"paths": ["/.*"], "hosts": ["domain-1.org"]})),
            route(
                "102",
                json!({"paths": ["/"], "hosts": ["domain-2.org"], "regex_priority": 5}),
            ),
            route("103", json!({"paths": ["/v1"], "hosts": ["domain-2.org"]})),
        ],
        &[(req("GET", "/v1", "domain-2.org"), Some("103"))],
    );
    // "[assigns different priorities to regex and non-regex path]".
    check(
        &[
            route(
                "101",
                json!({"paths": ["~/some/thing/else", "/foo"], "hosts": ["domain-1.org"]}),
            ),
            route(
                "102",
                json!({"paths": ["/foo/bar"], "hosts": ["domain-1.org"]}),
            ),
        ],
        &[
            (req("GET", "/some/thing/else", "domain-1.org"), Some("101")),
            (req("GET", "/foo/bar", "domain-1.org"), Some("102")),
            (req("GET", "/foo/baz", "domain-1.org"), Some("101")),
        ],
    );
    // "[assigns different priorities to each path]" (overlapping prefixes).
    check(
        &[
            route(
                "101",
                json!({"paths": ["/foo", "/foo/bar/baz"], "hosts": ["domain-1.org"]}),
            ),
            route(
                "102",
                json!({"paths": ["/foo/bar"], "hosts": ["domain-1.org"]}),
            ),
        ],
        &[
            (req("GET", "/foo", "domain-1.org"), Some("101")),
            (req("GET", "/foo/bar", "domain-1.org"), Some("102")),
            (req("GET", "/foo/bar/baz/x", "domain-1.org"), Some("101")),
        ],
    );
    // "[can create route with multiple paths and no service]".
    check(
        &[route(
            "101",
            json!({"paths": ["/foo", "/foo/bar/baz"], "service": null}),
        )],
        &[(req("GET", "/foo/bar/baz", ""), Some("101"))],
    );
}

#[test]
fn regex_priority_orders_regexes() {
    // regex_priority (bits 19-50) orders regex routes; it is ignored for prefixes.
    check(
        &[
            route("101", json!({"paths": ["~/a/\\d+"], "regex_priority": 10})),
            route("102", json!({"paths": ["~/a/.*"], "regex_priority": 1})),
            route("103", json!({"paths": ["~/a/x"]})),
        ],
        &[
            (req("GET", "/a/1", ""), Some("101")),
            (req("GET", "/a/x", ""), Some("102")),
        ],
    );
}

#[test]
fn priority_bits() {
    // `get_priority` in `kong/router/transform.lua`.
    let r = |fields: Value| Route::from_entity(&route("101", fields)).unwrap();
    let plain = r(json!({"hosts": ["a.com"], "paths": ["/abc"]}));
    assert_eq!(
        priority(&plain, Some((false, 4))),
        (2 << 61) | (1 << 60) | 4
    );
    let wild =
        r(json!({"hosts": ["*.a.com"], "methods": ["GET"], "paths": ["~/x"], "regex_priority": 3}));
    assert_eq!(
        priority(&wild, Some((true, 0))),
        (3 << 61) | (1 << 51) | (3 << 19)
    );
    let headers = r(json!({"headers": {"a": ["1"], "b": ["2"]}, "snis": ["x"]}));
    assert_eq!(priority(&headers, None), (2 << 61) | (2 << 52));
    // An empty hosts array is still a table: the plain-hosts bit is set.
    let empty = r(json!({"hosts": [], "paths": ["/"]}));
    assert_eq!(
        priority(&empty, Some((false, 1))),
        (1 << 61) | (1 << 60) | 1
    );
    // regex_priority does not count for prefix groups.
    let prefix = r(json!({"paths": ["/ab"], "regex_priority": 9}));
    assert_eq!(priority(&prefix, Some((false, 3))), (1 << 61) | 3);
}

#[test]
fn split_ids_are_uuid_v5() {
    // `uuid.factory_v5('7f145bf9-...')(id .. "#" .. n)`: a v5 UUID, stable across builds.
    let id = uuid_v5(
        0x7f14_5bf9_0dce_4f91_98eb_debb_ce4b_9f6b,
        "e8fb37f1-102d-461e-9c51-6608a6bb8101#1",
    );
    let text = uuid::Uuid::from_u128(id).to_string();
    assert_eq!(&text[14..15], "5", "{text}");
    assert!(matches!(&text[19..20], "8" | "9" | "a" | "b"), "{text}");
    // RFC 4122 appendix B's example: v5 of "python.org" in the DNS namespace.
    let dns = 0x6ba7_b810_9dad_11d1_80b4_00c0_4fd4_30c8;
    assert_eq!(
        uuid::Uuid::from_u128(uuid_v5(dns, "python.org")).to_string(),
        "886313e1-3b8a-5372-9b90-0c9aee199e5d"
    );
}

#[test]
fn literal_prefixes() {
    for (body, want) in [
        ("/users/\\d+/profile", "/users/"),
        ("/route/(fixture)", "/route/"),
        ("/prefix/[0-9]+", "/prefix/"),
        ("/a.b", "/a"),
        ("/ab?c", "/a"),
        ("/ab*", "/a"),
        ("/ab+", "/ab"),
        ("/ab{2}", "/a"),
        ("/a\\.b/c", "/a.b/c"),
        ("/a|/b", ""),
        ("/(a|b)/c", "/"),
        ("/[a|b]x", "/"),
        ("(?i)/abc", ""),
        ("/abc$", "/abc"),
    ] {
        assert_eq!(literal_prefix(body), want, "{body}");
    }
}

#[test]
fn top_level_alternation_is_unanchored() {
    // Kong prepends `^` without a group: in `^/a|/b` only `/a` is anchored.
    check(
        &[route("101", json!({"paths": ["~/a|/b"]}))],
        &[
            (req("GET", "/a/x", ""), Some("101")),
            (req("GET", "/x/b", ""), Some("101")),
            (req("GET", "/x/c", ""), None),
        ],
    );
}

// --- building, errors and incremental updates ----------------------------------------------

#[test]
fn non_http_and_bad_routes() {
    let stream = route(
        "101",
        json!({"protocols": ["tcp"], "destinations": [{"ip": "10.0.0.1", "port": 80}]}),
    );
    let bad_regex = route("102", json!({"paths": ["~/(unclosed"]}));
    let good = route("103", json!({"paths": ["/ok"]}));
    let grpc = route(
        "104",
        json!({"protocols": ["grpc"], "paths": ["/svc.Greeter/"], "strip_path": false}),
    );
    let routes = [stream, bad_regex, good, grpc]
        .iter()
        .map(|r| Arc::new(Route::from_entity(r).unwrap()))
        .collect::<Vec<_>>();
    let (router, errors) = Router::new(routes);
    assert_eq!(router.len(), 2);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].0.ends_with("102"), "{errors:?}");
    assert_eq!(
        found(&router, req("GET", "/ok", "")).as_deref(),
        Some("103")
    );
    assert_eq!(
        found(&router, req("POST", "/svc.Greeter/SayHello", "")).as_deref(),
        Some("104")
    );
    assert!(Route::from_entity(&json!({"paths": ["/x"]})).is_err());
    assert!(Route::from_entity(&json!({"id": "x", "paths": "/x"})).is_err());
}

#[test]
fn route_defaults() {
    let r = Route::from_entity(&json!({"id": format!("{ID_PREFIX}101"), "service": {"id": "s"}}))
        .unwrap();
    assert_eq!(r.protocols, ["http", "https"]);
    assert!(r.strip_path && !r.preserve_host && r.request_buffering && r.response_buffering);
    assert_eq!(r.https_redirect_status_code, 426);
    assert_eq!(r.path_handling, "v0");
    assert_eq!(r.service_id.as_deref(), Some("s"));
}

#[test]
fn incremental_update() {
    // describe("incremental rebuild"): "update/remove works".
    let a = Arc::new(Route::from_entity(&route("101", json!({"paths": ["/foo"]}))).unwrap());
    let b = Arc::new(Route::from_entity(&route("102", json!({"paths": ["/bar"]}))).unwrap());
    let (router, _) = Router::new([a.clone(), b.clone()]);
    assert_eq!(
        found(&router, req("GET", "/foo", "")).as_deref(),
        Some("101")
    );
    assert_eq!(
        found(&router, req("GET", "/bar", "")).as_deref(),
        Some("102")
    );
    let a1 = Arc::new(Route::from_entity(&route("101", json!({"paths": ["/foo1"]}))).unwrap());
    let (next, errors) = router.update(&[&b.id], [a1]);
    assert!(errors.is_empty());
    assert_eq!(next.len(), 1);
    assert_eq!(
        found(&next, req("GET", "/foo1", "")).as_deref(),
        Some("101")
    );
    assert_eq!(found(&next, req("GET", "/foo", "")), None);
    assert_eq!(found(&next, req("GET", "/bar", "")), None);
    // The old router is untouched.
    assert_eq!(router.len(), 2);
    assert_eq!(
        found(&router, req("GET", "/bar", "")).as_deref(),
        Some("102")
    );
    // A bad update leaves the route out and reports it.
    let bad = Arc::new(Route::from_entity(&route("101", json!({"paths": ["~("]}))).unwrap());
    let (next2, errors) = next.update(&[], [bad]);
    assert_eq!(errors.len(), 1);
    assert!(next2.is_empty());
}

#[test]
fn incremental_equals_scratch() {
    // Many routes over shared hosts and prefixes, updated in steps: every step must answer
    // as a router built from scratch over the same routes.
    let mut entities: Vec<Value> = Vec::new();
    for i in 0..300u32 {
        let fields = match i % 5 {
            0 => json!({"hosts": [format!("h{}.test", i % 7)], "paths": [format!("/p{}", i % 11)]}),
            1 => json!({"paths": [format!("/p{}/q{}", i % 11, i % 3)]}),
            2 => json!({"paths": [format!("~/p{}/\\d+", i % 11)], "regex_priority": i % 4}),
            3 => json!({"hosts": [format!("*.h{}.test", i % 7)], "methods": ["GET"]}),
            _ => {
                json!({"hosts": [format!("h{}.*", i % 7)], "paths": [format!("/p{}", i % 11), "/z"]})
            }
        };
        entities.push(route(&format!("{i:03x}"), fields));
    }
    let requests: Vec<(String, String)> = (0..120u32)
        .map(|i| {
            let host = match i % 4 {
                0 => format!("h{}.test", i % 7),
                1 => format!("a.h{}.test", i % 7),
                2 => format!("h{}.org", i % 7),
                _ => "none.test".to_string(),
            };
            (
                host,
                format!(
                    "/p{}/{}",
                    i % 11,
                    if i % 2 == 0 {
                        "q1".to_string()
                    } else {
                        i.to_string()
                    }
                ),
            )
        })
        .collect();
    let parse = |v: &Value| Arc::new(Route::from_entity(v).unwrap());
    let mut live: Vec<Value> = entities[..200].to_vec();
    let (mut router, _) = Router::new(live.iter().map(parse));
    for step in 0..10usize {
        // Remove 5, add 10 new, change 5.
        let removed: Vec<String> = live
            .drain(..5)
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect();
        let added: Vec<Value> = entities[200 + step * 10..210 + step * 10].to_vec();
        let mut changed: Vec<Value> = live[..5].to_vec();
        for c in &mut changed {
            c["paths"] = json!([format!("/p{}", step)]);
        }
        live.drain(..5);
        live.extend(changed.iter().cloned());
        live.extend(added.iter().cloned());
        let removed_refs: Vec<&str> = removed.iter().map(String::as_str).collect();
        let (next, errors) =
            router.update(&removed_refs, changed.iter().chain(added.iter()).map(parse));
        assert!(errors.is_empty());
        let (scratch, _) = Router::new(live.iter().map(parse));
        assert_eq!(next.len(), scratch.len());
        for (host, path) in &requests {
            let r = req("GET", path, host);
            assert_eq!(
                found(&next, r),
                found(&scratch, r),
                "step {step}: {host} {path}"
            );
        }
        router = next;
    }
}

#[test]
fn header_regex_captures_merge() {
    // atc-router keeps one capture map per match: a header regex's groups land in it too.
    let router = build(&[route(
        "101",
        json!({"paths": ["/h"], "headers": {"x-v": ["~*v(\\d)"]}}),
    )]);
    find_with(&router, hreq("GET", "/h", "", &[("x-v", "V7")]), |m| {
        let c = m.expect("a match").captures.expect("captures");
        assert_eq!(c.unnamed.get(&1).map(String::as_str), Some("7"));
    });
}

// --- tests/it/router_cases.rs, replayed without the proxy ----------------------------------

#[path = "../../../../tests/it/router_cases.rs"]
mod router_cases;

#[test]
fn end_to_end_cases_agree() {
    // The proxy's end-to-end table must hold for the router alone, whatever ids the Admin
    // API assigns: replay it with four id assignments (ascending, descending, two shuffles).
    let cases = router_cases::cases();
    let n_requests: usize = cases.iter().map(|c| c.requests.len()).sum();
    assert!(n_requests >= 80, "{n_requests} requests");
    for case in &cases {
        let n = case.routes.len();
        for seed in 0..4usize {
            let routes: Vec<Arc<Route>> = case
                .routes
                .iter()
                .enumerate()
                .map(|(idx, body)| {
                    let rank = match seed {
                        0 => idx,
                        1 => n - 1 - idx,
                        s => (idx * 7 + s * 3) % n.max(1),
                    };
                    let mut entity = body.clone();
                    entity["id"] = json!(format!(
                        "00000000-0000-4000-8000-{:012x}",
                        rank * 1000 + idx
                    ));
                    if body.get("service").is_some() {
                        entity["service"] = json!({"id": "3f2e0a53-0000-4000-8000-000000000001"});
                    }
                    Arc::new(Route::from_entity(&entity).expect("route parses"))
                })
                .collect();
            let (router, errors) = Router::new(routes);
            assert!(errors.is_empty(), "{}: {errors:?}", case.name);
            for r in &case.requests {
                let headers = header_map(&r.headers);
                let request = Request {
                    method: r.method,
                    host: r.host.unwrap_or("127.0.0.1:8000"),
                    listener_port: 8000,
                    path: r.path,
                    headers: &headers,
                    sni: None,
                };
                let got = router.find(&request).map(|m| {
                    let mut upstream = upstream_path_v0(
                        case.service_path,
                        &m.path,
                        m.matched_path.as_deref(),
                        m.route.strip_path,
                    );
                    if let Some(q) = r.path.find('?') {
                        upstream.push_str(&r.path[q..]);
                    }
                    (m.route.name.clone().unwrap_or_default(), upstream)
                });
                let want = match &r.expect {
                    router_cases::Expect::Route {
                        name,
                        upstream_path,
                    } => Some((name.to_string(), upstream_path.to_string())),
                    router_cases::Expect::NotFound => None,
                };
                assert_eq!(
                    got, want,
                    "{} (ids {seed}): {} {:?} {}",
                    case.name, r.method, r.host, r.path
                );
            }
        }
    }
}

#[test]
fn prefilter_and_brute_force_agree() {
    // Many regexes under one literal (`/api/v`) use a bucket's RegexSet prefilter; the
    // winner must be the brute-force one (every matcher, greatest key first), before and
    // after updates that drop the prefilter.
    let mut entities = Vec::new();
    for i in 0..60u32 {
        let fields = match i % 4 {
            0 => {
                json!({"paths": [format!("~/api/v\\d+/svc{}/(?<id>\\d+)$", i % 15)], "regex_priority": i % 3})
            }
            1 => {
                json!({"paths": [format!("~/api/v{}/items", i % 5), "~/api/v\\d+/other"], "methods": ["GET"]})
            }
            2 => json!({"paths": ["/api/v1", format!("~/api/v[12]/svc{}", i % 15)]}),
            _ => json!({"hosts": ["a.test"], "paths": [format!("~/api/v\\d/svc{}$", i % 15)]}),
        };
        entities.push(route(&format!("{i:03x}"), fields));
    }
    let parse = |v: &Value| Arc::new(Route::from_entity(v).unwrap());
    let (mut router, errors) = Router::new(entities.iter().map(parse));
    assert!(errors.is_empty(), "{errors:?}");
    let paths: Vec<String> = (0..40u32)
        .map(|i| match i % 5 {
            0 => format!("/api/v{}/svc{}/{}", i % 3, i % 15, i),
            1 => format!("/api/v{}/items", i % 6),
            2 => format!("/api/v{}/svc{}", i % 3, i % 15),
            3 => "/api/v2/other".to_string(),
            _ => format!("/api/v1x/{i}"),
        })
        .collect();
    for step in 0..4 {
        for path in &paths {
            for (method, host) in [("GET", "a.test"), ("POST", "b.test")] {
                let headers = HeaderMap::new();
                let request = Request {
                    method,
                    host,
                    listener_port: 80,
                    path,
                    headers: &headers,
                    sni: None,
                };
                let fast = router.find(&request).map(|m| m.route.id.clone());
                assert_eq!(
                    fast,
                    router.find_linear(&request),
                    "step {step}: {method} {host} {path}"
                );
            }
        }
        let changed = route(
            &format!("{:03x}", step * 4),
            json!({"paths": ["~/api/v\\d+/svc1/(\\d+)$"], "regex_priority": 9}),
        );
        let removed = format!("{ID_PREFIX}{:03x}", step * 4 + 1);
        router = router.update(&[&removed], [parse(&changed)]).0;
    }
}
