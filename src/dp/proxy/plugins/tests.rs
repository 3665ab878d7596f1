//! Unit tests of the plugins. Expectations come from Kong 3.10's handlers and the specs under
//! `spec/03-plugins/` cited per test.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::*;

const WS: &str = "ws-1";
const ROUTE: &str = "11111111-1111-1111-1111-111111111111";
const SERVICE: &str = "22222222-2222-2222-2222-222222222222";
const ALICE: &str = "aaaaaaaa-0000-0000-0000-000000000001";
const BOB: &str = "bbbbbbbb-0000-0000-0000-000000000002";
const ANON: &str = "cccccccc-0000-0000-0000-000000000003";

/// The schema file of a plugin (our `schema/plugins/<name>.json`).
fn schema(name: &str) -> Value {
    let text = match name {
        "cors" => include_str!("../../../../schema/plugins/cors.json"),
        "jwt" => include_str!("../../../../schema/plugins/jwt.json"),
        "key-auth" => include_str!("../../../../schema/plugins/key-auth.json"),
        "basic-auth" => include_str!("../../../../schema/plugins/basic-auth.json"),
        "ip-restriction" => include_str!("../../../../schema/plugins/ip-restriction.json"),
        "acl" => include_str!("../../../../schema/plugins/acl.json"),
        "rate-limiting" => include_str!("../../../../schema/plugins/rate-limiting.json"),
        "prometheus" => include_str!("../../../../schema/plugins/prometheus.json"),
        other => panic!("no schema for {other}"),
    };
    serde_json::from_str(text).unwrap()
}

/// A plugin entity as the DP store holds it: every config default filled from the schema
/// (absent optional fields as null), global scope.
fn plugin(name: &str, config: Value) -> Value {
    let mut full = serde_json::Map::new();
    for field in schema(name)["config"]["fields"].as_array().unwrap() {
        let field_name = field["name"].as_str().unwrap();
        let default = field.get("default").cloned().unwrap_or(Value::Null);
        full.insert(field_name.to_owned(), default);
    }
    for (k, v) in config.as_object().unwrap() {
        assert!(full.contains_key(k), "{name} has no config field {k}");
        full.insert(k.clone(), v.clone());
    }
    json!({
        "id": uuid::Uuid::new_v4().to_string(), "name": name, "enabled": true, "ws_id": WS,
        "protocols": ["grpc", "grpcs", "http", "https"], "route": null, "service": null,
        "consumer": null, "instance_name": null, "config": Value::Object(full),
    })
}

/// Scopes a plugin entity.
fn scoped(
    mut p: Value,
    route: Option<&str>,
    service: Option<&str>,
    consumer: Option<&str>,
) -> Value {
    p["route"] = route.map_or(Value::Null, |id| json!({ "id": id }));
    p["service"] = service.map_or(Value::Null, |id| json!({ "id": id }));
    p["consumer"] = consumer.map_or(Value::Null, |id| json!({ "id": id }));
    p
}

/// The consumers of every test.
fn consumers() -> Vec<Value> {
    vec![
        json!({"id": ALICE, "username": "alice", "custom_id": "cust-a", "ws_id": WS}),
        json!({"id": BOB, "username": "bob", "custom_id": null, "ws_id": WS}),
        json!({"id": ANON, "username": "anonymous", "custom_id": null, "ws_id": WS}),
    ]
}

/// The credentials and groups of every test.
fn credentials() -> HashMap<&'static str, Vec<Value>> {
    let mut m = HashMap::new();
    m.insert(
        "keyauth_credentials",
        vec![
            json!({"id": "ka-1", "key": "alice-key", "consumer": {"id": ALICE}, "ws_id": WS, "ttl": null}),
            json!({"id": "ka-2", "key": "bob-key", "consumer": {"id": BOB}, "ws_id": WS, "ttl": null}),
            json!({"id": "ka-3", "key": "temp-key", "consumer": {"id": BOB}, "ws_id": WS, "ttl": 10}),
            json!({"id": "ka-4", "key": "gone-key", "consumer": {"id": BOB}, "ws_id": WS, "ttl": 0}),
        ],
    );
    m.insert(
        "basicauth_credentials",
        vec![
            json!({"id": "ba-1", "username": "bob-user", "consumer": {"id": BOB}, "ws_id": WS,
            "password": basicauth::hash_password(BOB, "s3cret")}),
        ],
    );
    m.insert(
        "acls",
        vec![
            json!({"id": "acl-1", "group": "admin", "consumer": {"id": ALICE}, "ws_id": WS}),
            json!({"id": "acl-2", "group": "dev", "consumer": {"id": ALICE}, "ws_id": WS}),
            json!({"id": "acl-3", "group": "guest", "consumer": {"id": ANON}, "ws_id": WS}),
        ],
    );
    m
}

/// A table from plugin entities and extra jwt secrets, with the shared consumers.
fn table_with(
    plugins: Vec<Value>,
    jwt_secrets: Vec<Value>,
    previous: Option<&Plugins>,
) -> (Plugins, Vec<(String, String)>) {
    let creds = credentials();
    let exporter = previous.map_or_else(Exporter::new, |p| p.exporter.clone());
    let entities = move |kind: &str| -> Vec<Value> {
        match kind {
            "plugins" => plugins.clone(),
            "consumers" => consumers(),
            "jwt_secrets" => jwt_secrets.clone(),
            other => creds.get(other).cloned().unwrap_or_default(),
        }
    };
    Plugins::new(&entities, previous, &exporter)
}

/// A table that must build without errors.
fn table(plugins: Vec<Value>) -> Plugins {
    let (t, errors) = table_with(plugins, vec![], None);
    assert!(errors.is_empty(), "{errors:?}");
    t
}

/// A request on ROUTE / SERVICE from 127.0.0.1.
fn ctx(method: Method, headers: &[(&str, &str)]) -> Ctx {
    let mut c = Ctx::new(WS, "127.0.0.1".parse().unwrap(), method, "/");
    c.route_id = Some(ROUTE.to_owned());
    c.service_id = Some(SERVICE.to_owned());
    for (k, v) in headers {
        c.headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    c
}

/// A GET request.
fn get(headers: &[(&str, &str)]) -> Ctx {
    ctx(Method::GET, headers)
}

/// The JSON body of a response.
async fn body(r: Response<Full<Bytes>>) -> (StatusCode, HeaderMap, Value) {
    let (parts, b) = r.into_parts();
    let bytes = b.collect().await.unwrap().to_bytes();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    (parts.status, parts.headers, v)
}

/// A request header's value as a string.
fn h<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|v| v.to_str().unwrap())
}

// === table ===

/// EXECUTED lists our plugin schemas' versions, in priority order.
#[test]
fn executed_matches_schemas() {
    let mut last = u64::MAX;
    for (name, version) in EXECUTED {
        let s = schema(name);
        assert_eq!(s["version"], *version, "{name}");
        let priority = s["priority"].as_u64().unwrap();
        assert!(priority < last, "{name} out of priority order");
        last = priority;
    }
}

/// Unknown plugins and configs this DP cannot run are errors; disabled plugins are skipped
/// (plugins_iterator.lua: "plugin is in use but not enabled"; rate-limiting schema policies).
#[test]
fn refuses_unknown_plugins_and_redis() {
    let mut unknown = plugin("acl", json!({"allow": ["x"]}));
    unknown["name"] = json!("request-transformer");
    let redis = plugin("rate-limiting", json!({"minute": 5, "policy": "redis"}));
    let mut disabled_redis = plugin("rate-limiting", json!({"minute": 5, "policy": "redis"}));
    disabled_redis["enabled"] = json!(false);
    let (_, errors) = table_with(
        vec![unknown.clone(), redis.clone(), disabled_redis],
        vec![],
        None,
    );
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0].0, unknown["id"].as_str().unwrap());
    assert!(errors[0].1.contains("'request-transformer' not enabled"));
    assert_eq!(errors[1].0, redis["id"].as_str().unwrap());
    assert!(errors[1].1.contains("policy 'redis'"), "{}", errors[1].1);
}

/// A disabled plugin does nothing; a stream-only plugin neither.
#[tokio::test]
async fn disabled_and_stream_only_plugins_do_not_run() {
    let mut p = plugin("ip-restriction", json!({"deny": ["0.0.0.0/0"]}));
    p["enabled"] = json!(false);
    let mut q = plugin("ip-restriction", json!({"deny": ["0.0.0.0/0"]}));
    q["protocols"] = json!(["tcp"]);
    assert!(table(vec![p]).access(&mut get(&[])).await.is_none());
    assert!(table(vec![q]).access(&mut get(&[])).await.is_none());
}

/// `lookup_cfg` precedence: route+service+consumer, route+consumer, service+consumer,
/// route+service, consumer, route, service, global (plugins_iterator.lua; spec
/// 02-integration/03-db/... and 01-unit/... plugins_iterator lookup tests).
#[tokio::test]
async fn config_precedence() {
    let deny = |msg: &str| {
        plugin(
            "ip-restriction",
            json!({"deny": ["0.0.0.0/0"], "message": msg}),
        )
    };
    let key_auth = plugin("key-auth", json!({}));
    let all = [
        ("global", None, None, None),
        ("service", None, Some(SERVICE), None),
        ("route", Some(ROUTE), None, None),
        ("consumer", None, None, Some(ALICE)),
        ("route+service", Some(ROUTE), Some(SERVICE), None),
        ("service+consumer", None, Some(SERVICE), Some(ALICE)),
        ("route+consumer", Some(ROUTE), None, Some(ALICE)),
        (
            "route+service+consumer",
            Some(ROUTE),
            Some(SERVICE),
            Some(ALICE),
        ),
    ];
    // Adding the scopes one by one, most specific last: each one wins over the previous.
    for n in 1..=all.len() {
        let mut plugins = vec![key_auth.clone()];
        for (msg, r, s, c) in &all[..n] {
            plugins.push(scoped(deny(msg), *r, *s, *c));
        }
        let t = table(plugins);
        let (status, _, b) = body(
            t.access(&mut get(&[("apikey", "alice-key")]))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 403);
        assert_eq!(b["message"], all[n - 1].0);
        // Bob is not the consumer of the consumer-scoped ones.
        let (_, _, b) = body(t.access(&mut get(&[("apikey", "bob-key")])).await.unwrap()).await;
        let expected = all[..n].iter().rev().find(|a| a.3.is_none()).unwrap().0;
        assert_eq!(b["message"], expected);
    }
    // Scopes of another route or service do not apply.
    let t = table(vec![
        scoped(deny("other"), Some("r-x"), None, None),
        scoped(deny("svc"), None, Some("s-x"), None),
    ]);
    assert!(t.access(&mut get(&[])).await.is_none());
    // A request in another workspace sees none of these plugins.
    let t = table(vec![deny("global")]);
    let mut c = get(&[]);
    c.ws_id = "other-ws".into();
    assert!(t.access(&mut c).await.is_none());
}

// === key-auth ===

/// spec/03-plugins/09-key-auth/02-access_spec.lua: missing key, bad key, realm.
#[tokio::test]
async fn key_auth_failures() {
    let t = table(vec![plugin("key-auth", json!({}))]);
    let r = t.access(&mut get(&[])).await.unwrap();
    assert_eq!(
        r.extensions().get::<PluginMessage>().unwrap().0,
        "No API key found in request"
    );
    let (status, headers, b) = body(r).await;
    assert_eq!(status, 401);
    assert_eq!(b, json!({"message": "No API key found in request"}));
    assert_eq!(h(&headers, "www-authenticate"), Some("Key"));
    let (status, _, b) = body(t.access(&mut get(&[("apikey", "nope")])).await.unwrap()).await;
    assert_eq!(
        (status, b),
        (StatusCode::UNAUTHORIZED, json!({"message": "Unauthorized"}))
    );
    let (_, _, b) = body(t.access(&mut get(&[("apikey", "")])).await.unwrap()).await;
    assert_eq!(b["message"], "No API key found in request");
    let (_, _, b) = body(
        t.access(&mut get(&[("apikey", "a"), ("apikey", "b")]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(b["message"], "Duplicate API key found");

    let t = table(vec![plugin("key-auth", json!({"realm": "test-realm"}))]);
    let (_, headers, _) = body(t.access(&mut get(&[])).await.unwrap()).await;
    assert_eq!(
        h(&headers, "www-authenticate"),
        Some("Key realm=\"test-realm\"")
    );
}

/// A key in a header, the query string or the body, with the consumer headers set upstream.
#[tokio::test]
async fn key_auth_locations_and_headers() {
    let t = table(vec![plugin(
        "key-auth",
        json!({"key_names": ["apikey", "x_key"]}),
    )]);
    let mut c = get(&[("apikey", "alice-key"), ("x-anonymous-consumer", "true")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(ALICE));
    assert_eq!(h(&c.headers, "x-consumer-username"), Some("alice"));
    assert_eq!(h(&c.headers, "x-consumer-custom-id"), Some("cust-a"));
    assert_eq!(h(&c.headers, "x-credential-identifier"), Some("ka-1"));
    assert_eq!(h(&c.headers, "x-anonymous-consumer"), None);
    assert_eq!(h(&c.headers, "apikey"), Some("alice-key"));
    assert_eq!(c.consumer.as_ref().unwrap().id, ALICE);
    // Underscores in key names read as dashes in header names.
    let mut c = get(&[("x-key", "bob-key"), ("x-consumer-custom-id", "forged")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(BOB));
    assert_eq!(h(&c.headers, "x-consumer-custom-id"), None);
    // Query string.
    let mut c = get(&[]);
    c.query = Some("a=1&apikey=bob-key".into());
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(c.query.as_deref(), Some("a=1&apikey=bob-key"));
    // key_in_header / key_in_query off.
    let t = table(vec![plugin(
        "key-auth",
        json!({"key_in_header": false, "key_in_query": false}),
    )]);
    let mut c = get(&[("apikey", "alice-key")]);
    c.query = Some("apikey=alice-key".into());
    assert_eq!(t.access(&mut c).await.unwrap().status(), 401);
}

/// key_in_body reads form and JSON bodies; hide_credentials strips the key everywhere
/// (spec/03-plugins/09-key-auth/02-access_spec.lua "key in body", "hide_credentials").
#[tokio::test]
async fn key_auth_body_and_hide_credentials() {
    let t = table(vec![plugin(
        "key-auth",
        json!({"key_in_body": true, "hide_credentials": true}),
    )]);
    let mut c = ctx(
        Method::POST,
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    c.set_body_source(Box::pin(async {
        Some(Bytes::from_static(b"a=1&apikey=alice-key&b=2"))
    }));
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(c.consumer.as_ref().unwrap().id, ALICE);
    assert_eq!(c.new_body.as_deref(), Some(&b"a=1&b=2"[..]));
    assert_eq!(
        c.read_body(),
        Some(Some(Bytes::from_static(b"a=1&apikey=alice-key&b=2")))
    );

    let mut c = ctx(Method::POST, &[("content-type", "application/json")]);
    c.set_body_source(Box::pin(async {
        Some(Bytes::from_static(br#"{"apikey":"bob-key","x":1}"#))
    }));
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(c.consumer.as_ref().unwrap().id, BOB);
    assert_eq!(
        serde_json::from_slice::<Value>(c.new_body.as_ref().unwrap()).unwrap(),
        json!({"x": 1})
    );

    let mut c = get(&[("apikey", "alice-key")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "apikey"), None);
    let mut c = get(&[]);
    c.query = Some("apikey=alice-key&z=%20".into());
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(c.query.as_deref(), Some("z=%20"));
    // Without key_in_body, the body is never read.
    let t = table(vec![plugin("key-auth", json!({}))]);
    let mut c = ctx(Method::POST, &[("content-type", "application/json")]);
    c.set_body_source(Box::pin(async { panic!("body read") }));
    assert_eq!(t.access(&mut c).await.unwrap().status(), 401);
}

/// Credentials with a ttl expire (key-auth handler.lua `load_credential`: ttl 0 is expired).
#[tokio::test]
async fn key_auth_ttl() {
    let clock = Clock::manual(1_000_000);
    let seed = {
        let mut t = table(vec![]);
        t.set_clock(clock.clone());
        t
    };
    let (t, errors) = table_with(vec![plugin("key-auth", json!({}))], vec![], Some(&seed));
    assert!(errors.is_empty());
    assert!(
        t.access(&mut get(&[("apikey", "temp-key")]))
            .await
            .is_none()
    );
    assert_eq!(
        t.access(&mut get(&[("apikey", "gone-key")]))
            .await
            .unwrap()
            .status(),
        401
    );
    clock.set_ms(1_010_000);
    assert_eq!(
        t.access(&mut get(&[("apikey", "temp-key")]))
            .await
            .unwrap()
            .status(),
        401
    );
    assert!(t.access(&mut get(&[("apikey", "bob-key")])).await.is_none());
}

/// run_on_preflight = false lets OPTIONS through unauthenticated.
#[tokio::test]
async fn key_auth_preflight() {
    let t = table(vec![plugin("key-auth", json!({"run_on_preflight": false}))]);
    assert!(t.access(&mut ctx(Method::OPTIONS, &[])).await.is_none());
    assert_eq!(t.access(&mut get(&[])).await.unwrap().status(), 401);
    let t = table(vec![plugin("key-auth", json!({}))]);
    assert_eq!(
        t.access(&mut ctx(Method::OPTIONS, &[]))
            .await
            .unwrap()
            .status(),
        401
    );
}

/// Anonymous consumers by id or username; a missing one is a 500 with Kong's message
/// (spec/03-plugins/09-key-auth/02-access_spec.lua "config.anonymous").
#[tokio::test]
async fn key_auth_anonymous() {
    for anonymous in [ANON, "anonymous"] {
        let t = table(vec![plugin("key-auth", json!({"anonymous": anonymous}))]);
        let mut c = get(&[("x-credential-identifier", "forged")]);
        assert!(t.access(&mut c).await.is_none());
        assert_eq!(h(&c.headers, "x-consumer-id"), Some(ANON));
        assert_eq!(h(&c.headers, "x-consumer-username"), Some("anonymous"));
        assert_eq!(h(&c.headers, "x-anonymous-consumer"), Some("true"));
        assert_eq!(h(&c.headers, "x-credential-identifier"), None);
        assert!(c.credential.is_none());
        let mut c = get(&[("apikey", "alice-key")]);
        assert!(t.access(&mut c).await.is_none());
        assert_eq!(h(&c.headers, "x-consumer-id"), Some(ALICE));
    }
    let t = table(vec![plugin("key-auth", json!({"anonymous": "ghost"}))]);
    let (status, _, b) = body(t.access(&mut get(&[])).await.unwrap()).await;
    assert_eq!(status, 500);
    assert_eq!(
        b["message"],
        "anonymous consumer ghost is configured but doesn't exist"
    );
}

// === basic-auth ===

/// Basic credentials hashed as crypto.lua does (spec/03-plugins/10-basic-auth/03-access_spec.lua).
#[tokio::test]
async fn basic_auth() {
    let enc = |s: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    let t = table(vec![plugin("basic-auth", json!({}))]);
    let (status, headers, b) = body(t.access(&mut get(&[])).await.unwrap()).await;
    assert_eq!(
        (status, b),
        (StatusCode::UNAUTHORIZED, json!({"message": "Unauthorized"}))
    );
    assert_eq!(
        h(&headers, "www-authenticate"),
        Some("Basic realm=\"service\"")
    );
    assert_eq!(
        t.access(&mut get(&[("authorization", &enc("bob-user:wrong"))]))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        t.access(&mut get(&[("authorization", &enc("nobody:s3cret"))]))
            .await
            .unwrap()
            .status(),
        401
    );
    let mut c = get(&[("authorization", &enc("bob-user:s3cret"))]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(BOB));
    assert_eq!(h(&c.headers, "x-credential-identifier"), Some("bob-user"));
    assert_eq!(
        h(&c.headers, "authorization"),
        Some(enc("bob-user:s3cret").as_str())
    );
    // Proxy-Authorization first, then Authorization.
    let mut c = get(&[
        ("proxy-authorization", &enc("bob-user:s3cret")),
        ("authorization", "Bearer x"),
    ]);
    assert!(t.access(&mut c).await.is_none());

    let t = table(vec![plugin(
        "basic-auth",
        json!({"hide_credentials": true, "realm": "r"}),
    )]);
    let mut c = get(&[("authorization", &enc("bob-user:s3cret"))]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "authorization"), None);
    let (_, headers, _) = body(t.access(&mut get(&[])).await.unwrap()).await;
    assert_eq!(h(&headers, "www-authenticate"), Some("Basic realm=\"r\""));
}

/// Several auth plugins with anonymous: a logical OR; the first success wins and later
/// ones skip (spec/03-plugins/10-basic-auth/03-access_spec.lua "logical OR").
#[tokio::test]
async fn auth_logical_or() {
    let enc = |s: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(s)
        )
    };
    let t = table(vec![
        plugin("key-auth", json!({"anonymous": ANON})),
        plugin("basic-auth", json!({"anonymous": ANON})),
    ]);
    let mut c = get(&[("apikey", "alice-key")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(ALICE));
    let mut c = get(&[("authorization", &enc("bob-user:s3cret"))]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(BOB));
    assert_eq!(h(&c.headers, "x-anonymous-consumer"), None);
    let mut c = get(&[]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(ANON));
    assert_eq!(h(&c.headers, "x-anonymous-consumer"), Some("true"));
    // Logical AND: both required.
    let t = table(vec![
        plugin("key-auth", json!({})),
        plugin("basic-auth", json!({})),
    ]);
    assert_eq!(
        t.access(&mut get(&[("apikey", "alice-key")]))
            .await
            .unwrap()
            .status(),
        401
    );
    let mut c = get(&[
        ("apikey", "alice-key"),
        ("authorization", &enc("bob-user:s3cret")),
    ]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(BOB));
}

// === jwt ===

/// A boxed signing function.
type Signer<'a> = Box<dyn Fn(&[u8]) -> Vec<u8> + 'a>;

/// Base64url without padding.
fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A token with `alg` signed by `sign`.
fn token(alg: &str, claims: Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let signed = format!(
        "{}.{}",
        b64(json!({"typ": "JWT", "alg": alg}).to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = sign(signed.as_bytes());
    format!("{signed}.{}", b64(&sig))
}

/// An HMAC signer.
fn hmac(alg: ring::hmac::Algorithm, secret: &'static [u8]) -> impl Fn(&[u8]) -> Vec<u8> {
    move |data| {
        ring::hmac::sign(&ring::hmac::Key::new(alg, secret), data)
            .as_ref()
            .to_vec()
    }
}

/// A jwt secret entity.
fn secret(key: &str, alg: &str, secret: Option<&str>, pem: Option<&str>) -> Value {
    json!({"id": format!("jwt-{key}"), "key": key, "algorithm": alg, "secret": secret,
        "rsa_public_key": pem, "consumer": {"id": ALICE}, "ws_id": WS})
}

/// A jwt table with the given secrets and config, clock at `now` seconds.
fn jwt_table(config: Value, secrets: Vec<Value>, now: u64) -> Plugins {
    let (mut t, errors) = table_with(vec![plugin("jwt", config)], secrets, None);
    assert!(errors.is_empty());
    t.set_clock(Clock::manual(now * 1000));
    t
}

/// The bearer header of a token.
fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// HS256/384/512, secret_is_base64, and every place a token can be
/// (spec/03-plugins/16-jwt/03-access_spec.lua).
#[tokio::test]
async fn jwt_hmac_and_locations() {
    let secrets = vec![
        secret("k256", "HS256", Some("secret256"), None),
        secret("k384", "HS384", Some("secret384"), None),
        secret("k512", "HS512", Some("secret512"), None),
    ];
    let t = jwt_table(json!({"cookie_names": ["jwtc"]}), secrets, 1000);
    let cases = [
        ("HS256", "k256", hmac(ring::hmac::HMAC_SHA256, b"secret256")),
        ("HS384", "k384", hmac(ring::hmac::HMAC_SHA384, b"secret384")),
        ("HS512", "k512", hmac(ring::hmac::HMAC_SHA512, b"secret512")),
    ];
    for (alg, key, sign) in &cases {
        let tok = token(alg, json!({"iss": key}), sign);
        let mut c = get(&[("authorization", &bearer(&tok))]);
        assert!(t.access(&mut c).await.is_none(), "{alg}");
        assert_eq!(h(&c.headers, "x-consumer-id"), Some(ALICE));
        assert_eq!(h(&c.headers, "x-credential-identifier"), Some(*key));
        let mut c = get(&[]);
        c.query = Some(format!("jwt={tok}"));
        assert!(t.access(&mut c).await.is_none());
        let mut c = get(&[("cookie", &format!("a=b; jwtc={tok}"))]);
        assert!(t.access(&mut c).await.is_none());
        // A wrong secret.
        let bad = token(
            alg,
            json!({"iss": key}),
            hmac(ring::hmac::HMAC_SHA256, b"nope"),
        );
        let (status, headers, b) = body(
            t.access(&mut get(&[("authorization", &bearer(&bad))]))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(
            (status, b),
            (
                StatusCode::UNAUTHORIZED,
                json!({"message": "Invalid signature"})
            )
        );
        assert_eq!(
            h(&headers, "www-authenticate"),
            Some("Bearer error=\"invalid_token\"")
        );
    }
    // secret_is_base64: the stored secret is the base64url of the signing secret.
    let stored = b64(b"raw-secret");
    let t = jwt_table(
        json!({"secret_is_base64": true}),
        vec![secret("kb", "HS256", Some(&stored), None)],
        1000,
    );
    let tok = token(
        "HS256",
        json!({"iss": "kb"}),
        hmac(ring::hmac::HMAC_SHA256, b"raw-secret"),
    );
    assert!(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .is_none()
    );
}

/// The failures of handler.lua: no token, several, bad token, unknown key, wrong alg.
#[tokio::test]
async fn jwt_failures() {
    let sign = hmac(ring::hmac::HMAC_SHA256, b"s");
    let t = jwt_table(
        json!({"realm": "api"}),
        vec![
            secret("k", "HS256", Some("s"), None),
            secret("r", "RS256", None, Some("x")),
        ],
        1000,
    );
    let check = |c: Ctx, message: &'static str, www: &'static str| {
        let t = &t;
        async move {
            let mut c = c;
            let (status, headers, b) = body(t.access(&mut c).await.unwrap()).await;
            assert_eq!(status, 401, "{message}");
            assert_eq!(b, json!({"message": message}));
            assert_eq!(h(&headers, "www-authenticate"), Some(www));
        }
    };
    let err = "Bearer realm=\"api\", error=\"invalid_token\"";
    check(get(&[]), "Unauthorized", "Bearer realm=\"api\"").await;
    let a = token("HS256", json!({"iss": "k"}), &sign);
    let b = token("HS256", json!({"iss": "k", "x": 1}), &sign);
    let mut c = get(&[("authorization", &bearer(&a))]);
    c.query = Some(format!("jwt={b}"));
    check(c, "Multiple tokens provided", err).await;
    let mut c = get(&[]);
    c.query = Some("jwt".into());
    check(c, "Unrecognizable token", err).await;
    check(
        get(&[("authorization", "Bearer abc")]),
        "Bad token; invalid JSON",
        err,
    )
    .await;
    let none = format!("{}.{}.sig", b64(br#"{"alg":"none"}"#), b64(b"{}"));
    check(
        get(&[("authorization", &bearer(&none))]),
        "Bad token; invalid alg",
        err,
    )
    .await;
    check(
        get(&[("authorization", &bearer(&token("HS256", json!({}), &sign)))]),
        "No mandatory 'iss' in claims",
        err,
    )
    .await;
    check(
        get(&[(
            "authorization",
            &bearer(&token("HS256", json!({"iss": ""}), &sign)),
        )]),
        "Invalid 'iss' in claims",
        err,
    )
    .await;
    check(
        get(&[(
            "authorization",
            &bearer(&token("HS256", json!({"iss": "zz"}), &sign)),
        )]),
        "No credentials found for given 'iss'",
        err,
    )
    .await;
    check(
        get(&[(
            "authorization",
            &bearer(&token("HS256", json!({"iss": "r"}), &sign)),
        )]),
        "Invalid algorithm",
        err,
    )
    .await;
    // A secret whose consumer is missing: 401 without WWW-Authenticate.
    let mut orphan = secret("o", "HS256", Some("s"), None);
    orphan["consumer"] = json!({"id": "99999999-0000-0000-0000-000000000000"});
    let t = jwt_table(json!({}), vec![orphan], 1000);
    let tok = token("HS256", json!({"iss": "o"}), &sign);
    let (status, headers, b) = body(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, b),
        (
            StatusCode::UNAUTHORIZED,
            json!({"message": "Could not find consumer for 'iss=o'"})
        )
    );
    assert_eq!(h(&headers, "www-authenticate"), None);
    // The key claim may be in the header, and another claim name can be configured.
    let t = jwt_table(
        json!({"key_claim_name": "kid"}),
        vec![secret("k", "HS256", Some("s"), None)],
        1000,
    );
    let signed = format!("{}.{}", b64(br#"{"alg":"HS256","kid":"k"}"#), b64(b"{}"));
    let tok = format!("{signed}.{}", b64(&sign(signed.as_bytes())));
    assert!(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .is_none()
    );
}

/// exp, nbf and maximum_expiration (spec/03-plugins/16-jwt/01-jwt_parser_spec.lua and
/// 03-access_spec.lua): the body is the claim errors.
#[tokio::test]
async fn jwt_claims() {
    let sign = hmac(ring::hmac::HMAC_SHA256, b"s");
    let now = 1_700_000_000u64;
    let t = jwt_table(
        json!({"claims_to_verify": ["exp", "nbf"]}),
        vec![secret("k", "HS256", Some("s"), None)],
        now,
    );
    let run = |claims: Value| {
        let tok = token("HS256", claims, &sign);
        let t = &t;
        async move {
            t.access(&mut get(&[("authorization", &bearer(&tok))]))
                .await
        }
    };
    assert!(
        run(json!({"iss": "k", "exp": now + 10, "nbf": now}))
            .await
            .is_none()
    );
    let (status, headers, b) = body(
        run(json!({"iss": "k", "exp": now, "nbf": now}))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, b),
        (StatusCode::UNAUTHORIZED, json!({"exp": "token expired"}))
    );
    assert_eq!(
        h(&headers, "www-authenticate"),
        Some("Bearer error=\"invalid_token\"")
    );
    let r = run(json!({"iss": "k", "exp": now + 10, "nbf": now + 1}))
        .await
        .unwrap();
    assert!(r.extensions().get::<PluginMessage>().is_none());
    assert_eq!(body(r).await.2, json!({"nbf": "token not valid yet"}));
    let (_, _, b) = body(run(json!({"iss": "k", "exp": "soon"})).await.unwrap()).await;
    assert_eq!(
        b,
        json!({"exp": "must be a number", "nbf": "must be a number"})
    );

    let t = jwt_table(
        json!({"claims_to_verify": ["exp"], "maximum_expiration": 60}),
        vec![secret("k", "HS256", Some("s"), None)],
        now,
    );
    let tok = token("HS256", json!({"iss": "k", "exp": now + 60}), &sign);
    assert!(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .is_none()
    );
    let tok = token("HS256", json!({"iss": "k", "exp": now + 61}), &sign);
    let (_, _, b) = body(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(b, json!({"exp": "exceeds maximum allowed expiration"}));
    // The clock moves: the same token expires.
    let tok = token("HS256", json!({"iss": "k", "exp": now + 30}), &sign);
    assert!(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .is_none()
    );
    t.clock.set_ms((now + 30) * 1000);
    assert_eq!(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .unwrap()
            .status(),
        401
    );
}

/// RS*, PS* with a 2048-bit key (SPKI and PKCS#1 PEM), ES256/ES384 (raw r||s), EdDSA;
/// ES512 refused visibly.
#[tokio::test]
async fn jwt_asymmetric() {
    use ring::signature as sig;
    let rng = ring::rand::SystemRandom::new();
    let rsa_der = base64::engine::general_purpose::STANDARD
        .decode(include_str!("testdata/rsa2048.pk8.b64").trim())
        .unwrap();
    let rsa = sig::RsaKeyPair::from_pkcs8(&rsa_der).unwrap();
    let rsa_pem = include_str!("testdata/rsa2048.pub.pem");
    let rsa_pkcs1_pem = include_str!("testdata/rsa2048.pkcs1.pem");
    let rsa_sign = |enc: &'static dyn sig::RsaEncoding| {
        let rsa = &rsa;
        let rng = &rng;
        move |data: &[u8]| {
            let mut out = vec![0; rsa.public().modulus_len()];
            rsa.sign(enc, rng, data, &mut out).unwrap();
            out
        }
    };
    let p256 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p384 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let es256 = sig::EcdsaKeyPair::from_pkcs8(
        &sig::ECDSA_P256_SHA256_FIXED_SIGNING,
        &p256.serialize_der(),
        &rng,
    )
    .unwrap();
    let es384 = sig::EcdsaKeyPair::from_pkcs8(
        &sig::ECDSA_P384_SHA384_FIXED_SIGNING,
        &p384.serialize_der(),
        &rng,
    )
    .unwrap();
    let eddsa = sig::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&ed.serialize_der()).unwrap();

    let cases: Vec<(&str, String, Signer<'_>)> = vec![
        (
            "RS256",
            rsa_pem.to_owned(),
            Box::new(rsa_sign(&sig::RSA_PKCS1_SHA256)),
        ),
        (
            "RS384",
            rsa_pem.to_owned(),
            Box::new(rsa_sign(&sig::RSA_PKCS1_SHA384)),
        ),
        (
            "RS512",
            rsa_pkcs1_pem.to_owned(),
            Box::new(rsa_sign(&sig::RSA_PKCS1_SHA512)),
        ),
        (
            "PS256",
            rsa_pem.to_owned(),
            Box::new(rsa_sign(&sig::RSA_PSS_SHA256)),
        ),
        (
            "PS384",
            rsa_pem.to_owned(),
            Box::new(rsa_sign(&sig::RSA_PSS_SHA384)),
        ),
        (
            "PS512",
            rsa_pem.to_owned(),
            Box::new(rsa_sign(&sig::RSA_PSS_SHA512)),
        ),
        (
            "ES256",
            p256.public_key_pem(),
            Box::new(|d: &[u8]| es256.sign(&rng, d).unwrap().as_ref().to_vec()),
        ),
        (
            "ES384",
            p384.public_key_pem(),
            Box::new(|d: &[u8]| es384.sign(&rng, d).unwrap().as_ref().to_vec()),
        ),
        (
            "EdDSA",
            ed.public_key_pem(),
            Box::new(|d: &[u8]| eddsa.sign(d).as_ref().to_vec()),
        ),
    ];
    for (alg, pem, sign) in &cases {
        let t = jwt_table(json!({}), vec![secret("k", alg, None, Some(pem))], 1000);
        let tok = token(alg, json!({"iss": "k"}), sign);
        let mut c = get(&[("authorization", &bearer(&tok))]);
        assert!(t.access(&mut c).await.is_none(), "{alg} should verify");
        assert_eq!(h(&c.headers, "x-consumer-id"), Some(ALICE));
        // Tampered claims fail.
        let mut parts: Vec<&str> = tok.split('.').collect();
        let other = b64(json!({"iss": "k", "admin": true}).to_string().as_bytes());
        parts[1] = &other;
        let r = t
            .access(&mut get(&[("authorization", &bearer(&parts.join(".")))]))
            .await
            .unwrap();
        assert_eq!(
            body(r).await.2,
            json!({"message": "Invalid signature"}),
            "{alg}"
        );
    }
    // ES256 with a signature of the wrong length: jwt_parser.lua asserts (a 500).
    let t = jwt_table(
        json!({}),
        vec![secret("k", "ES256", None, Some(&p256.public_key_pem()))],
        1000,
    );
    let tok = token("ES256", json!({"iss": "k"}), |_| vec![0; 10]);
    let (status, _, b) = body(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, b),
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"message": "An unexpected error occurred"})
        )
    );
    // ES512 cannot be verified with ring: refused visibly.
    let t = jwt_table(
        json!({}),
        vec![secret("k", "ES512", None, Some(&p256.public_key_pem()))],
        1000,
    );
    let tok = token("ES512", json!({"iss": "k"}), |_| vec![0; 132]);
    let (status, _, b) = body(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 500);
    assert_eq!(
        b["message"],
        "JWT algorithm ES512 is not supported by this data plane"
    );
}

/// jwt with anonymous, then an ACL on the anonymous consumer's groups.
#[tokio::test]
async fn jwt_anonymous_and_acl() {
    let (t, errors) = table_with(
        vec![
            plugin("jwt", json!({"anonymous": "anonymous"})),
            plugin("acl", json!({"allow": ["guest"]})),
        ],
        vec![secret("k", "HS256", Some("s"), None)],
        None,
    );
    assert!(errors.is_empty());
    let mut c = get(&[("authorization", "Bearer garbage")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-id"), Some(ANON));
    assert_eq!(h(&c.headers, "x-consumer-groups"), Some("guest"));
    // Alice authenticates; her groups do not include guest.
    let tok = token(
        "HS256",
        json!({"iss": "k"}),
        hmac(ring::hmac::HMAC_SHA256, b"s"),
    );
    let (status, _, b) = body(
        t.access(&mut get(&[("authorization", &bearer(&tok))]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, b),
        (
            StatusCode::FORBIDDEN,
            json!({"message": "You cannot consume this service"})
        )
    );
}

// === acl ===

/// spec/03-plugins/18-acl/02-access_spec.lua: allow, deny, the groups header, no consumer.
#[tokio::test]
async fn acl() {
    let auth = plugin("key-auth", json!({}));
    let t = table(vec![
        auth.clone(),
        plugin("acl", json!({"allow": ["admin"]})),
    ]);
    let mut c = get(&[("apikey", "alice-key")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-groups"), Some("admin, dev"));
    // Bob has no groups: 403 (he has a credential).
    let r = t.access(&mut get(&[("apikey", "bob-key")])).await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        r.extensions().get::<PluginMessage>().unwrap().0,
        "You cannot consume this service"
    );

    let t = table(vec![
        auth.clone(),
        plugin("acl", json!({"deny": ["dev"], "hide_groups_header": true})),
    ]);
    assert_eq!(
        t.access(&mut get(&[("apikey", "alice-key")]))
            .await
            .unwrap()
            .status(),
        403
    );
    let mut c = get(&[("apikey", "bob-key")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-groups"), None);
    let t = table(vec![auth, plugin("acl", json!({"deny": ["dev"]}))]);
    let mut c = get(&[("apikey", "bob-key")]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-consumer-groups"), Some(""));

    // No consumer at all: 401 Unauthorized.
    let t = table(vec![plugin("acl", json!({"allow": ["admin"]}))]);
    let (status, _, b) = body(t.access(&mut get(&[])).await.unwrap()).await;
    assert_eq!(
        (status, b),
        (StatusCode::UNAUTHORIZED, json!({"message": "Unauthorized"}))
    );
    // Authenticated groups from another component.
    let mut c = get(&[]);
    c.authenticated_groups = Some(vec!["admin".into()]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-authenticated-groups"), Some("admin"));
}

/// always_use_authenticated_groups: authenticated groups win over the consumer's.
#[tokio::test]
async fn acl_authenticated_groups() {
    let auth = plugin("key-auth", json!({}));
    let t = table(vec![
        auth.clone(),
        plugin(
            "acl",
            json!({"allow": ["ops"], "always_use_authenticated_groups": true}),
        ),
    ]);
    let mut c = get(&[("apikey", "alice-key")]);
    c.authenticated_groups = Some(vec!["ops".into()]);
    assert!(t.access(&mut c).await.is_none());
    assert_eq!(h(&c.headers, "x-authenticated-groups"), Some("ops"));
    let t = table(vec![auth, plugin("acl", json!({"allow": ["ops"]}))]);
    let mut c = get(&[("apikey", "alice-key")]);
    c.authenticated_groups = Some(vec!["ops".into()]);
    assert_eq!(t.access(&mut c).await.unwrap().status(), 403);
}

// === cors ===

/// Runs a request through access and response; returns the final status and headers.
async fn through(t: &Plugins, mut c: Ctx) -> (StatusCode, HeaderMap) {
    let (status, mut headers) = match t.access(&mut c).await {
        Some(r) => (r.status(), r.headers().clone()),
        None => (StatusCode::OK, HeaderMap::new()),
    };
    t.response(&c, status, &mut headers);
    (status, headers)
}

/// spec/03-plugins/13-cors/01-access_spec.lua: preflights and actual requests.
#[tokio::test]
async fn cors_preflight() {
    let t = table(vec![plugin("cors", json!({}))]);
    let pre = |origin: &'static str| {
        ctx(
            Method::OPTIONS,
            &[("origin", origin), ("access-control-request-method", "GET")],
        )
    };
    let (status, headers) = through(&t, pre("http://a.com")).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "access-control-allow-origin"), Some("*"));
    assert_eq!(
        h(&headers, "access-control-allow-methods"),
        Some("GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT")
    );
    assert_eq!(h(&headers, "access-control-allow-headers"), None);
    assert_eq!(h(&headers, "access-control-max-age"), None);
    assert_eq!(h(&headers, "access-control-allow-credentials"), None);
    assert_eq!(h(&headers, "vary"), None);

    let t = table(vec![plugin(
        "cors",
        json!({"origins": ["http://example.com"], "methods": ["GET", "POST"], "headers": ["x-a", "x-b"],
               "max_age": 23, "credentials": true, "private_network": true}),
    )]);
    let mut c = pre("http://x.com");
    c.headers.insert(
        "access-control-request-private-network",
        HeaderValue::from_static("true"),
    );
    let (_, headers) = through(&t, c).await;
    assert_eq!(
        h(&headers, "access-control-allow-origin"),
        Some("http://example.com")
    );
    assert_eq!(
        h(&headers, "access-control-allow-methods"),
        Some("GET,POST")
    );
    assert_eq!(h(&headers, "access-control-allow-headers"), Some("x-a,x-b"));
    assert_eq!(h(&headers, "access-control-max-age"), Some("23"));
    assert_eq!(
        h(&headers, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        h(&headers, "access-control-allow-private-network"),
        Some("true")
    );
    assert_eq!(h(&headers, "vary"), Some("Origin"));

    // Requested headers are echoed when none are configured; preflight_continue proxies.
    let t = table(vec![plugin("cors", json!({"preflight_continue": true}))]);
    let (status, headers) = through(&t, pre("http://a.com")).await;
    assert_eq!(status, 200);
    assert!(headers.is_empty(), "{headers:?}");
    let t = table(vec![plugin("cors", json!({}))]);
    let mut c = pre("http://a.com");
    c.headers.insert(
        "access-control-request-headers",
        HeaderValue::from_static("x-foo"),
    );
    assert_eq!(
        h(&through(&t, c).await.1, "access-control-allow-headers"),
        Some("x-foo")
    );
    // OPTIONS without Access-Control-Request-Method is not a preflight.
    let (_, headers) = through(&t, ctx(Method::OPTIONS, &[("origin", "http://a.com")])).await;
    assert_eq!(h(&headers, "access-control-allow-origin"), Some("*"));
}

/// Actual requests: regex origins, credentials with `*`, exposed headers, absent origins.
#[tokio::test]
async fn cors_actual_requests() {
    let t = table(vec![plugin(
        "cors",
        json!({"origins": ["http://example.com", "(.*[.])?example\\.org", "https://.+\\.ex\\.net:8443"],
               "exposed_headers": ["x-e1", "x-e2"]}),
    )]);
    let check = |origin: &'static str, expected: Option<&'static str>| {
        let t = &t;
        async move {
            let (_, headers) = through(t, get(&[("origin", origin)])).await;
            assert_eq!(
                h(&headers, "access-control-allow-origin"),
                expected,
                "{origin}"
            );
            assert_eq!(h(&headers, "vary"), Some("Origin"));
            assert_eq!(
                h(&headers, "access-control-expose-headers"),
                Some("x-e1,x-e2")
            );
        }
    };
    check("http://example.com", Some("http://example.com")).await;
    check("http://example.com:80", Some("http://example.com")).await;
    check("https://api.example.org", Some("https://api.example.org")).await;
    check("http://example.org", Some("http://example.org")).await;
    check("http://example.org.evil.com", None).await;
    check("https://a.ex.net:8443", Some("https://a.ex.net:8443")).await;
    check("https://a.ex.net", None).await;
    check("http://other.com", None).await;

    // credentials with `*`: the request origin is echoed.
    let t = table(vec![plugin("cors", json!({"credentials": true}))]);
    let (_, headers) = through(&t, get(&[("origin", "http://a.com")])).await;
    assert_eq!(
        h(&headers, "access-control-allow-origin"),
        Some("http://a.com")
    );
    assert_eq!(
        h(&headers, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(h(&headers, "vary"), Some("Origin"));
    // No Origin: allow_origin_absent (default true) still sends ACAO.
    let (_, headers) = through(&t, get(&[])).await;
    assert_eq!(h(&headers, "access-control-allow-origin"), Some("*"));
    let t = table(vec![plugin("cors", json!({"allow_origin_absent": false}))]);
    assert!(through(&t, get(&[])).await.1.is_empty());
    // CORS headers are added to a plugin's error response too.
    let t = table(vec![
        plugin("cors", json!({})),
        plugin("key-auth", json!({})),
    ]);
    let (status, headers) = through(&t, get(&[("origin", "http://a.com")])).await;
    assert_eq!(status, 401);
    assert_eq!(h(&headers, "access-control-allow-origin"), Some("*"));
}

// === ip-restriction ===

/// spec/03-plugins/17-ip-restriction/02-access_spec.lua: deny wins, allow lists, v6, status
/// and message.
#[tokio::test]
async fn ip_restriction() {
    let from = |ip: &str| {
        let mut c = get(&[]);
        c.client_ip = ip.parse::<IpAddr>().unwrap();
        c
    };
    let t = table(vec![plugin(
        "ip-restriction",
        json!({"allow": ["10.0.0.0/8", "2001:db8::/32"], "deny": ["10.1.0.0/16"]}),
    )]);
    assert!(t.access(&mut from("10.2.3.4")).await.is_none());
    assert!(t.access(&mut from("2001:db8::1")).await.is_none());
    let (status, _, b) = body(t.access(&mut from("10.1.2.3")).await.unwrap()).await;
    assert_eq!(
        (status, b),
        (
            StatusCode::FORBIDDEN,
            json!({"message": "IP address not allowed: 10.1.2.3"})
        )
    );
    assert_eq!(t.access(&mut from("11.0.0.1")).await.unwrap().status(), 403);
    assert_eq!(
        t.access(&mut from("2001:db9::1")).await.unwrap().status(),
        403
    );
    let t = table(vec![plugin(
        "ip-restriction",
        json!({"deny": ["127.0.0.1"], "status": 401, "message": "Forbidden here"}),
    )]);
    let (status, _, b) = body(t.access(&mut from("127.0.0.1")).await.unwrap()).await;
    assert_eq!(
        (status, b),
        (
            StatusCode::UNAUTHORIZED,
            json!({"message": "Forbidden here"})
        )
    );
    assert!(t.access(&mut from("127.0.0.2")).await.is_none());
    let (_, errors) = table_with(
        vec![plugin("ip-restriction", json!({"deny": ["300.0.0.1"]}))],
        vec![],
        None,
    );
    assert_eq!(errors.len(), 1);
}

// === rate-limiting ===

/// spec/03-plugins/23-rate-limiting/04-access_spec.lua: headers, the 429, window reset.
#[tokio::test]
async fn rate_limiting_windows_and_headers() {
    let mut t = table(vec![plugin(
        "rate-limiting",
        json!({"second": 2, "minute": 3}),
    )]);
    // 2024-02-29T13:45:30Z.
    let clock = Clock::manual(1_709_214_330_000);
    t.set_clock(clock.clone());
    let (status, headers) = through(&t, get(&[])).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "x-ratelimit-limit-second"), Some("2"));
    assert_eq!(h(&headers, "x-ratelimit-remaining-second"), Some("1"));
    assert_eq!(h(&headers, "x-ratelimit-limit-minute"), Some("3"));
    assert_eq!(h(&headers, "x-ratelimit-remaining-minute"), Some("2"));
    assert_eq!(h(&headers, "ratelimit-limit"), Some("2"));
    assert_eq!(h(&headers, "ratelimit-remaining"), Some("1"));
    assert_eq!(h(&headers, "ratelimit-reset"), Some("1"));
    assert_eq!(h(&headers, "retry-after"), None);
    let (_, headers) = through(&t, get(&[])).await;
    // The period closest to its limit is reported.
    assert_eq!(h(&headers, "ratelimit-limit"), Some("2"));
    assert_eq!(h(&headers, "ratelimit-remaining"), Some("0"));
    assert_eq!(h(&headers, "x-ratelimit-remaining-minute"), Some("1"));
    assert_eq!(h(&headers, "x-ratelimit-remaining-second"), Some("0"));
    let r = t.access(&mut get(&[])).await.unwrap();
    assert_eq!(
        r.extensions().get::<PluginMessage>().unwrap().0,
        "API rate limit exceeded"
    );
    let (status, headers, b) = body(r).await;
    assert_eq!(
        (status, b),
        (
            StatusCode::TOO_MANY_REQUESTS,
            json!({"message": "API rate limit exceeded"})
        )
    );
    assert_eq!(h(&headers, "retry-after"), Some("1"));
    assert_eq!(h(&headers, "x-ratelimit-remaining-second"), Some("0"));
    // Next second: the second window resets, the minute has one left.
    clock.set_ms(1_709_214_331_000);
    let (status, headers) = through(&t, get(&[])).await;
    assert_eq!(status, 200);
    assert_eq!(h(&headers, "x-ratelimit-remaining-minute"), Some("0"));
    assert_eq!(h(&headers, "ratelimit-remaining"), Some("0"));
    assert_eq!(h(&headers, "ratelimit-reset"), Some("29"));
    let (status, headers) = through(&t, get(&[])).await;
    assert_eq!(status, 429);
    assert_eq!(h(&headers, "retry-after"), Some("29"));
    assert_eq!(h(&headers, "ratelimit-remaining"), Some("0"));
    // Next minute: open again.
    clock.set_ms(1_709_214_360_000);
    assert_eq!(through(&t, get(&[])).await.0, 200);
}

/// Counters survive a rebuild that keeps the plugin; hide_client_headers, error_code and
/// error_message.
#[tokio::test]
async fn rate_limiting_rebuild_and_options() {
    let p = scoped(
        plugin(
            "rate-limiting",
            json!({"hour": 2, "hide_client_headers": true, "error_code": 503, "error_message": "slow down"}),
        ),
        Some(ROUTE),
        None,
        None,
    );
    let mut t = table(vec![p.clone()]);
    t.set_clock(Clock::manual(1_709_214_330_000));
    let (status, headers) = through(&t, get(&[])).await;
    assert_eq!(status, 200);
    assert!(headers.is_empty());
    let (t2, errors) = table_with(vec![p.clone()], vec![], Some(&t));
    assert!(errors.is_empty());
    assert_eq!(through(&t2, get(&[])).await.0, 200);
    let r = t2.access(&mut get(&[])).await.unwrap();
    let (status, headers, b) = body(r).await;
    assert_eq!(
        (status, b),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"message": "slow down"})
        )
    );
    assert_eq!(h(&headers, "retry-after"), None);
    assert!(t2.counters.len() > 0);
}

/// limit_by and Kong's fallbacks to the client IP (`get_identifier`).
#[tokio::test]
async fn rate_limiting_limit_by() {
    let one = |config: Value| {
        let mut t = table(vec![
            plugin("key-auth", json!({"anonymous": ANON})),
            plugin("rate-limiting", config),
        ]);
        t.set_clock(Clock::manual(1_709_214_330_000));
        t
    };
    let from = |ip: &str, headers: &[(&str, &str)]| {
        let mut c = get(headers);
        c.client_ip = ip.parse().unwrap();
        c
    };
    // consumer: alice is limited separately from the anonymous consumer.
    let t = one(json!({"minute": 1}));
    assert!(
        t.access(&mut from("1.1.1.1", &[("apikey", "alice-key")]))
            .await
            .is_none()
    );
    assert_eq!(
        t.access(&mut from("1.1.1.1", &[("apikey", "alice-key")]))
            .await
            .unwrap()
            .status(),
        429
    );
    assert!(t.access(&mut from("1.1.1.1", &[])).await.is_none());
    // ip.
    let t = one(json!({"minute": 1, "limit_by": "ip"}));
    assert!(
        t.access(&mut from("1.1.1.1", &[("apikey", "alice-key")]))
            .await
            .is_none()
    );
    assert_eq!(
        t.access(&mut from("1.1.1.1", &[("apikey", "bob-key")]))
            .await
            .unwrap()
            .status(),
        429
    );
    assert!(t.access(&mut from("1.1.1.2", &[])).await.is_none());
    // header, falling back to the IP.
    let t = one(json!({"minute": 1, "limit_by": "header", "header_name": "x-tenant"}));
    assert!(
        t.access(&mut from("1.1.1.1", &[("x-tenant", "a")]))
            .await
            .is_none()
    );
    assert!(
        t.access(&mut from("1.1.1.1", &[("x-tenant", "b")]))
            .await
            .is_none()
    );
    assert_eq!(
        t.access(&mut from("1.1.1.9", &[("x-tenant", "a")]))
            .await
            .unwrap()
            .status(),
        429
    );
    assert!(t.access(&mut from("1.1.1.1", &[])).await.is_none());
    assert_eq!(
        t.access(&mut from("1.1.1.1", &[])).await.unwrap().status(),
        429
    );
    // path: only the configured path is shared; others count by IP.
    let t = one(json!({"minute": 1, "limit_by": "path", "path": "/"}));
    assert!(t.access(&mut from("1.1.1.1", &[])).await.is_none());
    assert_eq!(
        t.access(&mut from("1.1.1.2", &[])).await.unwrap().status(),
        429
    );
    let mut c = from("1.1.1.1", &[]);
    c.path = "/other".into();
    assert!(t.access(&mut c).await.is_none());
    // service and credential.
    let t = one(json!({"minute": 1, "limit_by": "service"}));
    assert!(t.access(&mut from("1.1.1.1", &[])).await.is_none());
    assert_eq!(
        t.access(&mut from("1.1.1.2", &[])).await.unwrap().status(),
        429
    );
    let t = one(json!({"minute": 1, "limit_by": "credential"}));
    assert!(
        t.access(&mut from("1.1.1.1", &[("apikey", "alice-key")]))
            .await
            .is_none()
    );
    assert!(
        t.access(&mut from("1.1.1.1", &[("apikey", "bob-key")]))
            .await
            .is_none()
    );
    // The anonymous consumer has no credential: the IP.
    assert!(t.access(&mut from("1.1.1.1", &[])).await.is_none());
    assert_eq!(
        t.access(&mut from("1.1.1.1", &[])).await.unwrap().status(),
        429
    );
}

// === prometheus ===

/// exporter.lua's series and labels, honouring the config flags.
#[tokio::test]
async fn prometheus_metrics() {
    let exporter = Exporter::new();
    let mut registry = prometheus_client::registry::Registry::default();
    exporter.register(&mut registry);
    let p = plugin(
        "prometheus",
        json!({"per_consumer": true, "status_code_metrics": true, "latency_metrics": true, "bandwidth_metrics": true}),
    );
    let entities = |kind: &str| {
        if kind == "plugins" {
            vec![p.clone()]
        } else {
            consumers()
        }
    };
    let (t, errors) = Plugins::new(&entities, None, &exporter);
    assert!(errors.is_empty());
    let mut c = get(&[]);
    c.route_name = Some("r1".into());
    c.service_host = Some("upstream.test".into());
    c.consumer = Some(Arc::new(Consumer {
        id: ALICE.into(),
        username: Some("alice".into()),
        custom_id: None,
    }));
    assert!(t.access(&mut c).await.is_none());
    let entry = LogEntry {
        status: 200,
        source: ResponseSource::Service,
        request_bytes: 100,
        response_bytes: 2000,
        latency_total: Duration::from_millis(30),
        latency_upstream: Some(Duration::from_millis(20)),
        latency_kong: Duration::from_millis(3),
        upstream_target: Some("10.0.0.1:80".into()),
    };
    t.log(&c, &entry);
    t.log(
        &c,
        &LogEntry {
            status: 401,
            source: ResponseSource::Kong,
            latency_upstream: None,
            ..entry.clone()
        },
    );
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for line in [
        r#"kong_http_requests_total{service="upstream.test",route="r1",code="200",source="service",workspace="default",consumer="alice"} 1"#,
        r#"kong_http_requests_total{service="upstream.test",route="r1",code="401",source="kong",workspace="default",consumer="alice"} 1"#,
        r#"kong_bandwidth_bytes{service="upstream.test",route="r1",direction="egress",workspace="default",consumer="alice"} 4000"#,
        r#"kong_bandwidth_bytes{service="upstream.test",route="r1",direction="ingress",workspace="default",consumer="alice"} 200"#,
        r#"kong_request_latency_ms_count{service="upstream.test",route="r1",workspace="default"} 2"#,
        r#"kong_upstream_latency_ms_count{service="upstream.test",route="r1",workspace="default"} 1"#,
        r#"kong_kong_latency_ms_bucket{le="5.0",service="upstream.test",route="r1",workspace="default"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line}\n{text}");
    }
    // Without a route nothing is measured; with the flags off, nothing either.
    let mut c2 = get(&[]);
    c2.route_id = None;
    assert!(t.access(&mut c2).await.is_none());
    t.log(&c2, &entry);
    let q = plugin("prometheus", json!({"upstream_health_metrics": true}));
    let entities = |kind: &str| {
        if kind == "plugins" {
            vec![q.clone()]
        } else {
            vec![]
        }
    };
    let (t, _) = Plugins::new(&entities, Some(&t), &exporter);
    assert!(exporter.upstream_health_enabled());
    let mut c3 = get(&[]);
    assert!(t.access(&mut c3).await.is_none());
    t.log(&c3, &entry);
    exporter.set_target_health("up", "t:80", "10.0.0.1:80", "healthy");
    let mut after = String::new();
    prometheus_client::encoding::text::encode(&mut after, &registry).unwrap();
    assert!(after.contains(r#"kong_http_requests_total{service="upstream.test",route="r1",code="200",source="service",workspace="default",consumer="alice"} 1"#));
    assert_eq!(
        after.matches("kong_http_requests_total{").count(),
        2,
        "{after}"
    );
    assert!(after.contains(r#"kong_upstream_target_health{upstream="up",target="t:80",address="10.0.0.1:80",state="healthy",subsystem="http"} 1"#));
    assert!(after.contains(r#"kong_upstream_target_health{upstream="up",target="t:80",address="10.0.0.1:80",state="unhealthy",subsystem="http"} 0"#));
}

/// On equal remaining counts the longer window is reported (handler.lua: `current_window >
/// window`), with its reset.
#[tokio::test]
async fn rate_limiting_tie_reports_longer_window() {
    let mut t = table(vec![plugin(
        "rate-limiting",
        json!({"second": 1, "hour": 1}),
    )]);
    // 13:45:30: 870 s left in the hour.
    t.set_clock(Clock::manual(1_709_214_330_000));
    let (_, headers) = through(&t, get(&[])).await;
    assert_eq!(h(&headers, "ratelimit-limit"), Some("1"));
    assert_eq!(h(&headers, "ratelimit-remaining"), Some("0"));
    assert_eq!(h(&headers, "ratelimit-reset"), Some("870"));
}

/// The table is shared across connections, and the access future runs on tokio's
/// multi-threaded runtime: all of it must be Send (and the table Sync).
#[test]
fn table_and_futures_are_send() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let t = table(vec![plugin("key-auth", json!({"key_in_body": true}))]);
    send_sync(&t);
    let mut c = get(&[]);
    c.set_body_source(Box::pin(async { None }));
    send_sync(&c);
    let fut = t.access(&mut c);
    send(&fut);
}

/// A rough per-request cost of the access, response and log phases with a typical set of
/// plugins (run with `--ignored --nocapture`; debug builds are much slower than release).
#[tokio::test]
#[ignore]
async fn measure_phases() {
    let mut t = table(vec![
        plugin(
            "cors",
            json!({"origins": ["http://a.com", "(.*[.])?b\\.com"]}),
        ),
        plugin("key-auth", json!({})),
        plugin("acl", json!({"allow": ["admin"]})),
        plugin(
            "rate-limiting",
            json!({"second": 1_000_000_000u64, "hour": 1_000_000_000u64}),
        ),
        plugin(
            "prometheus",
            json!({"status_code_metrics": true, "latency_metrics": true, "bandwidth_metrics": true}),
        ),
    ]);
    t.set_clock(Clock::manual(1_709_214_330_000));
    let entry = LogEntry {
        status: 200,
        source: ResponseSource::Service,
        request_bytes: 100,
        response_bytes: 2000,
        latency_total: Duration::from_millis(30),
        latency_upstream: Some(Duration::from_millis(20)),
        latency_kong: Duration::from_millis(3),
        upstream_target: None,
    };
    let n = 20_000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let mut c = get(&[("apikey", "alice-key"), ("origin", "http://x.b.com")]);
        c.route_name = Some("r".into());
        assert!(t.access(&mut c).await.is_none());
        let mut headers = HeaderMap::new();
        t.response(&c, StatusCode::OK, &mut headers);
        t.log(&c, &entry);
    }
    let per = start.elapsed() / n;
    println!("access+response+log: {per:?} per request ({n} requests)");
}
