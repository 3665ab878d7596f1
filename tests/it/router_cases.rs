//! Router cases as plain data, for an end-to-end runner through the real proxy.
//!
//! Each [`Case`] is a set of routes (Admin API bodies, each with a `name` and, when it has a
//! service, `"service": {"name": "svc"}`) and requests with the route they must reach and the
//! path the upstream must receive (query included), or 404. The runner creates the service
//! `{"name": "svc", "url": "http://127.0.0.1:<echo port><service_path>"}` for each case.
//!
//! The cases come from Kong 3.10's `spec/01-unit/08-router_spec.lua` (the
//! `traditional_compatible` branches) and `spec/fixtures/router_path_handling_tests.lua`.
//! Route ids are assigned by the Admin API, so no expectation depends on the id tie-break;
//! the router's unit tests replay these cases with shuffled ids to make sure. All requests
//! are plain HTTP (TLS, SNI and 426 cases belong to the proxy's own tests).

#![allow(dead_code)]

use serde_json::{Value, json};

/// One set of routes and the requests to send once they are in place.
pub struct Case {
    /// A short name for failure messages.
    pub name: &'static str,
    /// The path of the service's URL (`None` = no path, Kong's `/`).
    pub service_path: Option<&'static str>,
    /// Admin API bodies for `POST /routes`.
    pub routes: Vec<Value>,
    /// The requests and what each must produce.
    pub requests: Vec<Req>,
}

/// One request.
pub struct Req {
    /// The method.
    pub method: &'static str,
    /// The Host header; `None` lets the client send its default.
    pub host: Option<&'static str>,
    /// The request target: path and optional query.
    pub path: &'static str,
    /// Extra headers.
    pub headers: Vec<(&'static str, &'static str)>,
    /// The outcome.
    pub expect: Expect,
}

/// What a request must produce.
pub enum Expect {
    /// The route named `name` proxies it; the upstream receives `upstream_path` (path and
    /// query, as sent on the request line).
    Route {
        name: &'static str,
        upstream_path: &'static str,
    },
    /// 404 "no Route matched with those values".
    NotFound,
}

fn r(name: &str, fields: Value) -> Value {
    let mut v = json!({"name": name, "service": {"name": "svc"}});
    for (k, val) in fields.as_object().expect("an object") {
        v[k] = val.clone();
    }
    v
}

fn get(host: Option<&'static str>, path: &'static str, expect: Expect) -> Req {
    req("GET", host, path, vec![], expect)
}

fn req(
    method: &'static str,
    host: Option<&'static str>,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    expect: Expect,
) -> Req {
    Req {
        method,
        host,
        path,
        headers,
        expect,
    }
}

fn to(name: &'static str, upstream_path: &'static str) -> Expect {
    Expect::Route {
        name,
        upstream_path,
    }
}

const NF: Expect = Expect::NotFound;

/// Every case.
pub fn cases() -> Vec<Case> {
    let mut cases = vec![
        // 08-router_spec.lua select(): [host], [method], [uri], [host + uri], [host + method],
        // [uri + method], [host + uri + method], port-specific host, misses.
        Case {
            name: "select: hosts, methods, paths",
            service_path: None,
            routes: vec![
                r("host", json!({"hosts": ["domain-1.org", "domain-2.org"]})),
                r("method", json!({"methods": ["TRACE"]})),
                r("uri", json!({"paths": ["/my-route"]})),
                r(
                    "host-uri",
                    json!({"paths": ["/route-4"], "hosts": ["domain-1.org", "domain-2.org"]}),
                ),
                r(
                    "host-method",
                    json!({"hosts": ["domain-1.org", "domain-2.org"], "methods": ["POST", "PUT", "PATCH"]}),
                ),
                r(
                    "uri-method",
                    json!({"methods": ["POST", "PUT", "PATCH"], "paths": ["/route-6"]}),
                ),
                r(
                    "host-uri-method",
                    json!({"hosts": ["domain-with-uri-1.org", "domain-with-uri-2.org"], "methods": ["POST", "PUT", "PATCH"], "paths": ["/my-route-uri"]}),
                ),
                r("port-only", json!({"hosts": ["domain-3.org:321"]})),
            ],
            requests: vec![
                get(Some("domain-1.org"), "/", to("host", "/")),
                get(Some("domain-1.org:80"), "/foo", to("host", "/foo")),
                get(
                    Some("Domain-2.ORG"),
                    "/foo/bar?x=1",
                    to("host", "/foo/bar?x=1"),
                ),
                get(Some("domain.org"), "/my-route", to("uri", "/")),
                get(
                    Some("domain.org"),
                    "/my-route/some/path",
                    to("uri", "/some/path"),
                ),
                req("TRACE", Some("domain.org"), "/", vec![], to("method", "/")),
                get(Some("domain-1.org"), "/route-4", to("host-uri", "/")),
                req(
                    "POST",
                    Some("domain-1.org"),
                    "/",
                    vec![],
                    to("host-method", "/"),
                ),
                req(
                    "PUT",
                    Some("domain.org"),
                    "/route-6",
                    vec![],
                    to("uri-method", "/"),
                ),
                req(
                    "PUT",
                    Some("domain-with-uri-2.org"),
                    "/my-route-uri",
                    vec![],
                    to("host-uri-method", "/"),
                ),
                get(
                    Some("domain-with-uri-2.org"),
                    "/my-route-uri",
                    to("uri", "/-uri"),
                ),
                get(Some("domain-3.org:321"), "/", to("port-only", "/")),
                get(Some("domain-3.org:123"), "/", NF),
                get(Some("domain-3.org"), "/", NF),
                get(Some("domain-3.org"), "/route-4", NF),
                req("TRACE", Some("domain-2.org"), "/", vec![], to("host", "/")),
                req(
                    "TRACE",
                    Some("domain.org"),
                    "/my-route",
                    vec![],
                    to("uri", "/"),
                ),
            ],
        },
        // select(): single / multiple [headers] values, [headers + uri], regex header.
        Case {
            name: "select: headers",
            service_path: None,
            routes: vec![
                r(
                    "one-header",
                    json!({"headers": {"location": ["my-location-1", "my-location-2"]}}),
                ),
                r(
                    "two-headers",
                    json!({"headers": {"location": ["my-location-1"], "version": ["v1", "v2"]}}),
                ),
                r(
                    "header-uri",
                    json!({"headers": {"location": ["my-location-1", "my-location-2"]}, "paths": ["/headers-uri"]}),
                ),
                r(
                    "ua-regex",
                    json!({"headers": {"user-agent": ["~*windows|linux|os\\s+x\\s*[\\d\\._]+|solaris|bsd"]}}),
                ),
            ],
            requests: vec![
                req(
                    "GET",
                    None,
                    "/",
                    vec![("location", "my-location-1")],
                    to("one-header", "/"),
                ),
                req(
                    "GET",
                    None,
                    "/a",
                    vec![("Location", "MY-LOCATION-2")],
                    to("one-header", "/a"),
                ),
                req("GET", None, "/", vec![("location", "my-location-3")], NF),
                req(
                    "GET",
                    None,
                    "/",
                    vec![("location", "my-location-1"), ("version", "v2")],
                    to("two-headers", "/"),
                ),
                req(
                    "GET",
                    None,
                    "/",
                    vec![("location", "my-location-2"), ("version", "v2")],
                    to("one-header", "/"),
                ),
                req(
                    "GET",
                    None,
                    "/headers-uri/x",
                    vec![("location", "my-location-2")],
                    to("header-uri", "/x"),
                ),
                req(
                    "GET",
                    None,
                    "/headers-uri",
                    vec![("location", "nowhere")],
                    NF,
                ),
                req(
                    "GET",
                    None,
                    "/",
                    vec![("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Chrome/83.0")],
                    to("ua-regex", "/"),
                ),
                req("GET", None, "/", vec![("user-agent", "curl/8.0")], NF),
            ],
        },
        // [uri prefix]: "does not supersede another route with a longer [uri]".
        Case {
            name: "prefix: longest wins",
            service_path: None,
            routes: vec![
                r("long", json!({"paths": ["/my-route/hello"]})),
                r("short", json!({"paths": ["/my-route"]})),
                r("anchored", json!({"paths": ["/something/my-route"]})),
            ],
            requests: vec![
                get(None, "/my-route/hello", to("long", "/")),
                get(None, "/my-route/hello/world", to("long", "/world")),
                get(None, "/my-route", to("short", "/")),
                get(None, "/my-route/world", to("short", "/world")),
                get(None, "/my-routes", to("short", "/s")),
                get(None, "/something/my-route", to("anchored", "/")),
                get(None, "/other/my-route", NF),
            ],
        },
        // "... when a better [uri] match exists for another [host]".
        Case {
            name: "prefix: per host",
            service_path: None,
            routes: vec![
                r(
                    "com-short",
                    json!({"hosts": ["example.com"], "paths": ["/my-route"]}),
                ),
                r(
                    "com-long",
                    json!({"hosts": ["example.com"], "paths": ["/my-route/hello"]}),
                ),
                r(
                    "net-longest",
                    json!({"hosts": ["example.net"], "paths": ["/my-route/hello/world"]}),
                ),
            ],
            requests: vec![
                get(
                    Some("example.com"),
                    "/my-route/hello/world",
                    to("com-long", "/world"),
                ),
                get(
                    Some("example.com"),
                    "/my-route/hello/world/and/goodnight",
                    to("com-long", "/world/and/goodnight"),
                ),
                get(
                    Some("example.net"),
                    "/my-route/hello/world",
                    to("net-longest", "/"),
                ),
                get(Some("example.net"), "/my-route/hello", NF),
            ],
        },
        // [uri regex].
        Case {
            name: "regex: over prefix",
            service_path: None,
            routes: vec![
                r("prefix", json!({"paths": ["/route/persons"]})),
                r("regex", json!({"paths": ["~/route/persons/\\d+/profile"]})),
                r("regex-3", json!({"paths": ["~/route/persons/\\d{3}$"]})),
                r("anchored", json!({"paths": ["~/prefix/[0-9]+"]})),
            ],
            requests: vec![
                get(None, "/route/persons/123/profile", to("regex", "/")),
                get(None, "/route/persons/123/profile/x", to("regex", "/x")),
                get(None, "/route/persons/456", to("regex-3", "/")),
                get(None, "/route/persons/4567", to("prefix", "/4567")),
                get(None, "/route/persons", to("prefix", "/")),
                get(None, "/prefix/123", to("anchored", "/")),
                get(None, "/extra/prefix/123", NF),
            ],
        },
        Case {
            name: "regex: over exact prefix, with host",
            service_path: Some("/srv"),
            routes: vec![
                r("pat", json!({"hosts": ["route.com"], "paths": ["/pat"]})),
                r(
                    "path-post",
                    json!({"hosts": ["route.com"], "paths": ["/path"], "methods": ["POST"]}),
                ),
                r(
                    "regex",
                    json!({"hosts": ["route.com"], "paths": ["~/(path)"], "strip_path": false}),
                ),
            ],
            requests: vec![
                get(Some("route.com"), "/path", to("regex", "/srv/path")),
                req(
                    "POST",
                    Some("route.com"),
                    "/path/x",
                    vec![],
                    to("path-post", "/srv/x"),
                ),
                get(Some("route.com"), "/pat", to("pat", "/srv")),
                get(Some("route.com"), "/patx", to("pat", "/srv/x")),
                get(Some("other.com"), "/path", NF),
            ],
        },
        // [wildcard host].
        Case {
            name: "wildcard hosts",
            service_path: None,
            routes: vec![
                r("left", json!({"hosts": ["*.route.com"]})),
                r("right", json!({"hosts": ["route.*"]})),
                r("plain", json!({"hosts": ["plain.route.com"]})),
                r("port", json!({"hosts": ["*.route.net:123"]})),
            ],
            requests: vec![
                get(Some("foo.route.com"), "/", to("left", "/")),
                get(Some("foo.bar.route.com:123"), "/a", to("left", "/a")),
                get(Some("route.org"), "/", to("right", "/")),
                get(Some("route.org:8123"), "/", to("right", "/")),
                get(Some("plain.route.com"), "/", to("plain", "/")),
                get(Some("foo.route.net:123"), "/", to("port", "/")),
                get(Some("foo.route.net:456"), "/", NF),
                get(Some("nothing.org"), "/", NF),
            ],
        },
        Case {
            name: "wildcard host + path vs plain host",
            service_path: None,
            routes: vec![
                r(
                    "wild-path1",
                    json!({"hosts": ["*.route.com"], "paths": ["/path1"]}),
                ),
                r(
                    "plain-path2",
                    json!({"hosts": ["plain.route.com"], "paths": ["/path2"]}),
                ),
                r(
                    "wild-regex",
                    json!({"hosts": ["*.example.com"], "paths": ["~/users/\\d+/profile"]}),
                ),
                r(
                    "wild-users",
                    json!({"hosts": ["*.example.com"], "paths": ["/users"]}),
                ),
            ],
            requests: vec![
                get(Some("plain.route.com"), "/path1", to("wild-path1", "/")),
                get(Some("plain.route.com"), "/path2/x", to("plain-path2", "/x")),
                get(
                    Some("test.example.com"),
                    "/users/123/profile",
                    to("wild-regex", "/"),
                ),
                get(Some("test.example.com"), "/users", to("wild-users", "/")),
                get(Some("example.com"), "/users", NF),
            ],
        },
        // [headers]: more headers first; names and values case-insensitive.
        Case {
            name: "headers: count and case",
            service_path: None,
            routes: vec![
                r(
                    "two",
                    json!({"headers": {"version": ["v1", "v2"], "x-agent": ["foo", "bar"]}}),
                ),
                r(
                    "three",
                    json!({"headers": {"version": ["v1", "v2"], "x-agent": ["foo", "bar"], "location": ["east", "west"]}}),
                ),
                r(
                    "more-headers",
                    json!({"headers": {"version": ["v3"], "location": ["us-east"]}, "paths": ["/my-route"]}),
                ),
                r(
                    "longer-path",
                    json!({"headers": {"version": ["v3"]}, "paths": ["/my-route/hello"]}),
                ),
            ],
            requests: vec![
                req(
                    "GET",
                    None,
                    "/",
                    vec![("version", "v1"), ("x-agent", "foo"), ("location", "west")],
                    to("three", "/"),
                ),
                req(
                    "GET",
                    None,
                    "/",
                    vec![("version", "V2"), ("X-Agent", "BAR")],
                    to("two", "/"),
                ),
                req("GET", None, "/", vec![("version", "v1")], NF),
                req(
                    "GET",
                    None,
                    "/my-route/hello",
                    vec![("version", "v3"), ("location", "us-east")],
                    to("more-headers", "/hello"),
                ),
                req(
                    "GET",
                    None,
                    "/my-route/hello",
                    vec![("version", "v3")],
                    to("longer-path", "/"),
                ),
            ],
        },
        // edge-cases: half matches, method vs path, root catch-all.
        Case {
            name: "edge cases",
            service_path: None,
            routes: vec![
                r("h1", json!({"hosts": ["host1.com"], "paths": ["/v1/path"]})),
                r("h2", json!({"hosts": ["host2.com"], "paths": ["/"]})),
                r("get-only", json!({"methods": ["GET"]})),
                r("example", json!({"paths": ["/example"]})),
                // The spec's `hosts = { "domain.*" }` alone ties with "get-only" on priority (the
                // greater id wins there); a path breaks the tie whatever ids the Admin API gives.
                r(
                    "domain-wild",
                    json!({"hosts": ["domain.*"], "paths": ["/"]}),
                ),
                r(
                    "users-get",
                    json!({"methods": ["PUT"], "paths": ["~/users/\\d+/profile"]}),
                ),
                r(
                    "users-post",
                    json!({"methods": ["POST"], "paths": ["~/users/\\d*/profile"]}),
                ),
            ],
            requests: vec![
                get(Some("host1.com"), "/v1/path", to("h1", "/")),
                get(Some("host2.com"), "/v1/path", to("h2", "/v1/path")),
                get(
                    Some("nothing.com"),
                    "/example/status/200",
                    to("example", "/status/200"),
                ),
                get(Some("nothing.com"), "/", to("get-only", "/")),
                get(Some("domain.com"), "/", to("domain-wild", "/")),
                req(
                    "PUT",
                    Some("x.org"),
                    "/users/123/profile",
                    vec![],
                    to("users-get", "/"),
                ),
                req(
                    "POST",
                    Some("x.org"),
                    "/users/123/profile",
                    vec![],
                    to("users-post", "/"),
                ),
                req("POST", Some("x.org"), "/users//profile", vec![], NF),
                req("DELETE", Some("x.org"), "/users/1/profile", vec![], NF),
            ],
        },
        Case {
            name: "root catch-all",
            service_path: Some("/base"),
            routes: vec![
                r("root", json!({"paths": ["/"]})),
                r(
                    "my-route",
                    json!({"paths": ["/my-route"], "strip_path": false}),
                ),
            ],
            requests: vec![
                get(None, "/", to("root", "/base")),
                get(None, "/foobar/baz", to("root", "/base/foobar/baz")),
                get(
                    None,
                    "/my-route/hello",
                    to("my-route", "/base/my-route/hello"),
                ),
            ],
        },
        // Split routes: one matcher per prefix length and one for all regexes.
        Case {
            name: "split routes",
            service_path: None,
            routes: vec![
                r(
                    "mixed",
                    json!({"paths": ["~/some/thing/else", "/foo", "/foo/bar/baz"], "hosts": ["domain-1.org"]}),
                ),
                r(
                    "foo-bar",
                    json!({"paths": ["/foo/bar"], "hosts": ["domain-1.org"]}),
                ),
            ],
            requests: vec![
                get(Some("domain-1.org"), "/some/thing/else", to("mixed", "/")),
                get(Some("domain-1.org"), "/foo/bar", to("foo-bar", "/")),
                get(Some("domain-1.org"), "/foo/bar/x", to("foo-bar", "/x")),
                get(Some("domain-1.org"), "/foo/bar/baz/x", to("mixed", "/x")),
                get(Some("domain-1.org"), "/foo", to("mixed", "/")),
            ],
        },
        // regex_priority orders regexes; prefix matching ignores it.
        Case {
            name: "regex_priority",
            service_path: None,
            routes: vec![
                r(
                    "digits",
                    json!({"paths": ["~/a/\\d+"], "regex_priority": 10}),
                ),
                r("any", json!({"paths": ["~/a/.*"], "regex_priority": 1})),
                r("x", json!({"paths": ["~/a/x"]})),
                r(
                    "slash",
                    json!({"hosts": ["domain-2.org"], "paths": ["/"], "regex_priority": 5}),
                ),
                r("v1", json!({"hosts": ["domain-2.org"], "paths": ["/v1"]})),
            ],
            requests: vec![
                get(None, "/a/1", to("digits", "/")),
                get(None, "/a/x", to("any", "/")),
                get(Some("domain-2.org"), "/v1", to("v1", "/")),
                get(Some("domain-2.org"), "/v2", to("slash", "/v2")),
            ],
        },
        // Normalisation before matching (kong/tools/uri.lua), and captures' source.
        Case {
            name: "normalisation",
            service_path: Some("/s"),
            routes: vec![
                r(
                    "plain",
                    json!({"paths": ["/plain/a.b.c"], "strip_path": false}),
                ),
                r("reserved", json!({"paths": ["~/regex-reserved%2Fabc"]})),
                r(
                    "names",
                    json!({"paths": ["~/users/(?<name>[a-z ]+)/profile"]}),
                ),
            ],
            requests: vec![
                get(None, "/plain/a.b.c", to("plain", "/s/plain/a.b.c")),
                get(None, "/plain/x/../a.b.c", to("plain", "/s/plain/a.b.c")),
                get(None, "/plain//a.b.c?q=1", to("plain", "/s/plain/a.b.c?q=1")),
                get(None, "/plain/a%2Eb.c", to("plain", "/s/plain/a.b.c")),
                get(None, "/regex-reserved%2Fabc", to("reserved", "/s")),
                get(None, "/regex-reserved/abc", NF),
                get(None, "/users/john%20doe/profile/x", to("names", "/s/x")),
            ],
        },
    ];
    cases.extend(path_handling_cases());
    cases
}

/// router_path_handling_tests.lua, v0 rows, one case per service path and strip setting
/// (the route path varies within the case, so each row gets its own host).
fn path_handling_cases() -> Vec<Case> {
    vec![
        Case {
            name: "path handling: service /, strip",
            service_path: Some("/"),
            routes: vec![
                r(
                    "root",
                    json!({"hosts": ["ph-1.test"], "paths": ["/"], "strip_path": true}),
                ),
                r(
                    "route",
                    json!({"hosts": ["ph-2.test"], "paths": ["/route"], "strip_path": true}),
                ),
                r(
                    "route-slash",
                    json!({"hosts": ["ph-3.test"], "paths": ["/route/"], "strip_path": true}),
                ),
                r(
                    "host-only",
                    json!({"hosts": ["ph-4.test"], "strip_path": true}),
                ),
            ],
            requests: vec![
                get(Some("ph-1.test"), "/route/req", to("root", "/route/req")),
                get(Some("ph-2.test"), "/route", to("route", "/")),
                get(Some("ph-2.test"), "/route/", to("route", "/")),
                get(Some("ph-2.test"), "/routereq", to("route", "/req")),
                get(Some("ph-3.test"), "/route/req", to("route-slash", "/req")),
                get(Some("ph-4.test"), "/route/", to("host-only", "/route/")),
            ],
        },
        Case {
            name: "path handling: service /service, strip",
            service_path: Some("/service"),
            routes: vec![
                r(
                    "root",
                    json!({"hosts": ["ph-1.test"], "paths": ["/"], "strip_path": true}),
                ),
                r(
                    "route",
                    json!({"hosts": ["ph-2.test"], "paths": ["/route"], "strip_path": true}),
                ),
                r(
                    "route-slash",
                    json!({"hosts": ["ph-3.test"], "paths": ["/route/"], "strip_path": true}),
                ),
                r(
                    "regex",
                    json!({"hosts": ["ph-5.test"], "paths": ["~/[0]?route"], "strip_path": true}),
                ),
            ],
            requests: vec![
                get(Some("ph-1.test"), "/", to("root", "/service")),
                get(Some("ph-1.test"), "/route/", to("root", "/service/route/")),
                get(Some("ph-2.test"), "/route", to("route", "/service")),
                get(Some("ph-2.test"), "/route/", to("route", "/service/")),
                get(Some("ph-2.test"), "/routereq", to("route", "/service/req")),
                get(
                    Some("ph-2.test"),
                    "/route./req",
                    to("route", "/service/req"),
                ),
                get(
                    Some("ph-2.test"),
                    "/route%2E%2E/req",
                    to("route", "/service/req"),
                ),
                get(Some("ph-3.test"), "/route/", to("route-slash", "/service/")),
                get(
                    Some("ph-3.test"),
                    "/route/req",
                    to("route-slash", "/service/req"),
                ),
                get(Some("ph-5.test"), "/routereq", to("regex", "/service/req")),
            ],
        },
        Case {
            name: "path handling: service /service, no strip",
            service_path: Some("/service"),
            routes: vec![
                r(
                    "root",
                    json!({"hosts": ["ph-1.test"], "paths": ["/"], "strip_path": false}),
                ),
                r(
                    "route",
                    json!({"hosts": ["ph-2.test"], "paths": ["/route"], "strip_path": false}),
                ),
                r(
                    "host-only",
                    json!({"hosts": ["ph-4.test"], "strip_path": false}),
                ),
            ],
            requests: vec![
                get(Some("ph-1.test"), "/", to("root", "/service")),
                get(
                    Some("ph-1.test"),
                    "/route/req",
                    to("root", "/service/route/req"),
                ),
                get(Some("ph-2.test"), "/route/", to("route", "/service/route/")),
                get(
                    Some("ph-2.test"),
                    "/route%2e/req",
                    to("route", "/service/route./req"),
                ),
                get(
                    Some("ph-2.test"),
                    "/route../req",
                    to("route", "/service/route../req"),
                ),
                get(
                    Some("ph-4.test"),
                    "/route",
                    to("host-only", "/service/route"),
                ),
            ],
        },
        Case {
            name: "path handling: service /service/, strip",
            service_path: Some("/service/"),
            routes: vec![
                r(
                    "root",
                    json!({"hosts": ["ph-1.test"], "paths": ["/"], "strip_path": true}),
                ),
                r(
                    "route",
                    json!({"hosts": ["ph-2.test"], "paths": ["/route"], "strip_path": true}),
                ),
                r(
                    "route-slash",
                    json!({"hosts": ["ph-3.test"], "paths": ["/route/"], "strip_path": true}),
                ),
            ],
            requests: vec![
                get(Some("ph-1.test"), "/", to("root", "/service/")),
                get(
                    Some("ph-1.test"),
                    "/routereq",
                    to("root", "/service/routereq"),
                ),
                get(Some("ph-2.test"), "/route", to("route", "/service")),
                get(Some("ph-2.test"), "/route/", to("route", "/service/")),
                get(Some("ph-2.test"), "/routereq", to("route", "/service/req")),
                get(
                    Some("ph-3.test"),
                    "/route/req",
                    to("route-slash", "/service/req"),
                ),
            ],
        },
        Case {
            name: "path handling: service /srv/ and /srv",
            service_path: Some("/srv/"),
            routes: vec![
                r(
                    "rou-strip",
                    json!({"hosts": ["ph-1.test"], "paths": ["/rou"], "strip_path": true}),
                ),
                r(
                    "rou-keep",
                    json!({"hosts": ["ph-2.test"], "paths": ["/rou"], "strip_path": false}),
                ),
            ],
            requests: vec![
                get(Some("ph-1.test"), "/rou", to("rou-strip", "/srv")),
                get(Some("ph-2.test"), "/rou", to("rou-keep", "/srv/rou")),
            ],
        },
    ]
}
