//! The declarative reader and writer through `parse` / `write` / `Error::kong_body`.
//!
//! Cases marked with a Kong spec file are that spec's inline configuration and expected
//! outcome, as our own table.

use serde_json::{Value, json};

use super::*;
use crate::schema::Registry;

const NOW: i64 = 1_700_000_000;

fn reg() -> &'static Registry {
    Registry::builtin()
}

fn opts() -> ParseOptions {
    ParseOptions { now: NOW }
}

fn ok(text: &str) -> Config {
    match parse(reg(), text.as_bytes(), &opts()) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{:#}", e.kong_body(false)),
    }
}

fn invalid(text: &str) -> Invalid {
    match parse(reg(), text.as_bytes(), &opts()) {
        Ok(c) => panic!("accepted: {:?}", c.entities),
        Err(Error::Invalid(inv)) => inv,
        Err(e) => panic!("not a validation error: {e}"),
    }
}

fn of_type<'c>(c: &'c Config, ty: &str) -> Vec<&'c Entity> {
    c.entities.iter().filter(|e| e.entity_type == ty).collect()
}

fn kong_id(ty: &str, key: &str) -> String {
    ids::kong_uuid(ty, key).to_string()
}

/// The issue's worked example.
#[test]
fn service_id_from_its_name() {
    assert_eq!(
        kong_id("services", "billing"),
        "aa93ac78-2b4d-59d0-9897-62a161ae6928"
    );
    let c = ok(
        "_format_version: \"3.0\"\nservices:\n- name: billing\n  url: http://billing.internal\n",
    );
    assert_eq!(c.entities[0].id, "aa93ac78-2b4d-59d0-9897-62a161ae6928");
    assert_eq!(c.entities[0].value()["host"], "billing.internal");
}

/// Cache-key types: `build_cache_key` is `<type>:<ws or *>:<cache-key values>`, an absent
/// optional value `""`, the nested child's back-reference the parent's id.
#[test]
fn cache_key_ids() {
    let c = ok(r#"
_format_version: "3.0"
services:
- name: billing
  host: billing.internal
  plugins:
  - name: key-auth
upstreams:
- name: up
  targets:
  - target: 10.0.0.1:80
plugins:
- name: prometheus
- name: cors
  service: billing
"#);
    let svc = "aa93ac78-2b4d-59d0-9897-62a161ae6928";
    let up = kong_id("upstreams", "up");
    let plugins = of_type(&c, "plugins");
    let by_name = |n: &str| plugins.iter().find(|p| p.value()["name"] == n).unwrap();
    // plugins: cache_key = { "name", "route", "service", "consumer" }
    assert_eq!(
        by_name("key-auth").id,
        kong_id("plugins", &format!("plugins:*:key-auth::{svc}:"))
    );
    assert_eq!(
        by_name("prometheus").id,
        kong_id("plugins", "plugins:*:prometheus:::")
    );
    // A top-level foreign key by name stays the name in the key (Kong's file schema types it
    // as a string).
    assert_eq!(
        by_name("cors").id,
        kong_id("plugins", "plugins:*:cors::billing:")
    );
    assert_eq!(by_name("cors").value()["service"], json!({ "id": svc }));
    // targets: cache_key = { "upstream", "target" }
    let t = &of_type(&c, "targets")[0];
    assert_eq!(
        t.id,
        kong_id("targets", &format!("targets:*:{up}:10.0.0.1:80"))
    );
    assert_eq!(t.value()["upstream"], json!({ "id": up }));
}

#[test]
fn content_ids_are_stable_and_distinct() {
    let text = r#"
_format_version: "3.0"
services:
- host: a.internal
  routes:
  - paths: ["/a"]
  - paths: ["/a"]
- host: a.internal
consumers:
- custom_id: c1
  keyauth_credentials:
  - key: k1
  - {}
"#;
    let a = ok(text);
    let b = ok(text);
    let ids_a: Vec<_> = a.entities.iter().map(|e| e.id.clone()).collect();
    let ids_b: Vec<_> = b.entities.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids_a, ids_b);
    let mut dedup = ids_a.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), ids_a.len(), "{ids_a:?}");
    let creds = of_type(&a, "keyauth_credentials");
    assert_eq!(creds.len(), 2);
    assert!(creds[0].generated.is_empty());
    assert_eq!(creds[1].generated, vec!["key".to_owned()]);
}

fn burst() -> Vec<u8> {
    std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/kong/burst.yml"
    ))
    .unwrap()
}

#[test]
fn burst_fixture() {
    let started = std::time::Instant::now();
    let c = parse(reg(), &burst(), &opts()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "burst.yml: {} entities in {:?}",
        c.entities.len(),
        started.elapsed()
    );
    assert_eq!(c.format_version, FormatVersion::V1_1);
    assert_eq!(of_type(&c, "services").len(), 236);
    assert_eq!(of_type(&c, "routes").len(), 286);
    assert_eq!(of_type(&c, "upstreams").len(), 236);
    assert_eq!(of_type(&c, "targets").len(), 237);
    let plugins = of_type(&c, "plugins");
    let global: Vec<_> = plugins
        .iter()
        .filter(|p| p.value()["service"].is_null() && p.value()["route"].is_null())
        .collect();
    assert_eq!(global.len(), 1);
    assert_eq!(global[0].value()["name"], "prometheus");
    assert_eq!(
        plugins
            .iter()
            .filter(|p| p.value()["name"] == "ip-restriction")
            .count(),
        94
    );
    assert_eq!(plugins.len(), 95);
    // Parents first.
    let ranks: Vec<usize> = c
        .entities
        .iter()
        .map(|e| reg().rank(&e.entity_type))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] <= w[1]));
}

fn pem_pair(ca: bool) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["example.test".to_owned()]).unwrap();
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Every entity type, nested and flat, with tags, credentials and plugins of every scope.
fn every_type_file() -> String {
    let (cert, key) = pem_pair(false);
    let (ca, _) = pem_pair(true);
    let q = |s: &str| serde_json::to_string(s).unwrap();
    format!(
        r#"_format_version: "3.0"
_comment: every entity type
ca_certificates:
- cert: {ca}
  tags: [ca]
certificates:
- id: 4e3ad2e4-0bc4-4638-8e34-c84a417ba39b
  cert: {cert}
  key: {key}
  snis:
  - name: example.test
  - name: "*.example.test"
services:
- name: billing
  url: https://billing.internal:8443/v1
  client_certificate: 4e3ad2e4-0bc4-4638-8e34-c84a417ba39b
  tags: [team-a, billing]
  _comment: the billing service
  routes:
  - name: billing-route
    paths: [/billing]
    plugins:
    - name: cors
  plugins:
  - name: rate-limiting
    config:
      minute: 10
      policy: local
- host: anonymous.internal
  routes:
  - paths: [/anon]
    hosts: [anon.test]
upstreams:
- name: billing-up
  targets:
  - target: 10.0.0.1:8080
    weight: 50
  - target: 10.0.0.2
consumers:
- username: alice
  custom_id: alice-1
  tags: [people]
  keyauth_credentials:
  - key: alice-key
  basicauth_credentials:
  - username: alice
    password: secret
  jwt_secrets:
  - key: alice-iss
    secret: alice-secret
  acls:
  - group: admins
  plugins:
  - name: request-termination
    config:
      status_code: 403
- custom_id: bob-without-username
plugins:
- name: prometheus
- name: rate-limiting
  service: billing
  consumer: alice
  config:
    hour: 100
    policy: local
  _ignore: [anything]
"#,
        ca = q(&ca),
        cert = q(&cert),
        key = q(&key),
    )
}

/// The entities as `(type, value)`, as `write` takes them.
fn values(c: &Config) -> Vec<(&str, Value)> {
    c.entities
        .iter()
        .map(|e| (e.entity_type.as_str(), e.value()))
        .collect()
}

fn comparable(c: &Config) -> Vec<(String, String, Value)> {
    let mut out: Vec<_> = c
        .entities
        .iter()
        .map(|e| {
            let mut body = e.value();
            // Kong's process_auto_fields sets updated_at on every insert.
            body.as_object_mut().unwrap().remove("updated_at");
            (e.entity_type.clone(), e.id.clone(), body)
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

#[test]
fn every_type_parses_with_nesting() {
    let c = ok(&every_type_file());
    let count = |t: &str| of_type(&c, t).len();
    assert_eq!(count("ca_certificates"), 1);
    assert_eq!(count("certificates"), 1);
    assert_eq!(count("snis"), 2);
    assert_eq!(count("services"), 2);
    assert_eq!(count("routes"), 2);
    assert_eq!(count("upstreams"), 1);
    assert_eq!(count("targets"), 2);
    assert_eq!(count("consumers"), 2);
    assert_eq!(count("keyauth_credentials"), 1);
    assert_eq!(count("basicauth_credentials"), 1);
    assert_eq!(count("jwt_secrets"), 1);
    assert_eq!(count("acls"), 1);
    assert_eq!(count("plugins"), 5);
    let alice = kong_id("consumers", "alice");
    let basic = &of_type(&c, "basicauth_credentials")[0];
    assert_eq!(basic.value()["consumer"], json!({ "id": alice }));
    // _transform defaults to true: the password is hashed with the consumer id.
    let mut h = <sha1::Sha1 as sha1::Digest>::new();
    sha1::Digest::update(&mut h, format!("secret{alice}").as_bytes());
    assert_eq!(
        basic.value()["password"],
        hex::encode(sha1::Digest::finalize(h))
    );
    let sni = &of_type(&c, "snis")[0];
    assert_eq!(
        sni.value()["certificate"],
        json!({ "id": "4e3ad2e4-0bc4-4638-8e34-c84a417ba39b" })
    );
    let route = of_type(&c, "routes")
        .into_iter()
        .find(|r| r.value()["name"] == "billing-route")
        .unwrap();
    let cors = of_type(&c, "plugins")
        .into_iter()
        .find(|p| p.value()["name"] == "cors")
        .unwrap();
    assert_eq!(cors.value()["route"], json!({ "id": route.id }));
    let target = &of_type(&c, "targets")[1];
    assert_eq!(target.value()["target"], "10.0.0.2:8000");
}

#[test]
fn write_then_parse_gives_the_same_entities() {
    let first = ok(&every_type_file());
    let expected = comparable(&first);
    for format in [OutputFormat::Yaml, OutputFormat::Json] {
        for nested in [false, true] {
            let text = write(
                reg(),
                values(&first).iter().map(|(t, v)| (*t, v)),
                WriteOptions { format, nested },
            );
            let again = parse(reg(), text.as_bytes(), &opts())
                .unwrap_or_else(|e| panic!("{format:?} nested={nested}: {e}\n{text}"));
            assert!(!again.transform);
            assert_eq!(
                comparable(&again),
                expected,
                "{format:?} nested={nested}\n{text}"
            );
            // And once more: the output is a fixed point.
            let text2 = write(
                reg(),
                values(&again).iter().map(|(t, v)| (*t, v)),
                WriteOptions { format, nested },
            );
            let strip = |t: &str| {
                t.lines()
                    .filter(|l| !l.contains("updated_at"))
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(strip(&text2), strip(&text));
        }
    }
}

#[test]
fn flat_write_is_kong_db_export() {
    let c = ok(&every_type_file());
    let text = write(
        reg(),
        values(&c).iter().map(|(t, v)| (*t, v)),
        WriteOptions {
            format: OutputFormat::Yaml,
            nested: false,
        },
    );
    assert!(
        text.starts_with("_format_version: \"3.0\"\n_transform: false\n"),
        "{text}"
    );
    // Dependency order, foreign keys as bare ids.
    let pos = |k: &str| {
        text.find(&format!("\n{k}:\n"))
            .unwrap_or_else(|| panic!("{k}"))
    };
    assert!(pos("certificates") < pos("services"));
    assert!(pos("services") < pos("routes"));
    assert!(pos("consumers") < pos("plugins"));
    let alice = kong_id("consumers", "alice");
    assert!(text.contains(&format!("consumer: {alice}\n")), "{text}");
    assert!(!text.contains("ws_id"));
}

#[test]
fn nested_write_is_decks_shape() {
    let c = ok(&every_type_file());
    let text = write(
        reg(),
        values(&c).iter().map(|(t, v)| (*t, v)),
        WriteOptions {
            format: OutputFormat::Json,
            nested: true,
        },
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    let billing = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "billing")
        .unwrap();
    let route = &billing["routes"][0];
    assert!(route.get("service").is_none(), "back-reference removed");
    assert_eq!(route["plugins"][0]["name"], "cors");
    assert_eq!(billing["plugins"][0]["name"], "rate-limiting");
    // A plugin on a service and a consumer stays at the top level, with both references.
    let mut top: Vec<_> = v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].clone())
        .collect();
    top.sort_by_key(|n| n.to_string());
    assert_eq!(top, vec![json!("prometheus"), json!("rate-limiting")]);
    let alice = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["username"] == "alice")
        .unwrap();
    assert_eq!(alice["keyauth_credentials"][0]["key"], "alice-key");
    assert!(alice["keyauth_credentials"][0].get("consumer").is_none());
    assert_eq!(v["certificates"][0]["snis"].as_array().unwrap().len(), 2);
    assert!(v.get("snis").is_none() && v.get("routes").is_none() && v.get("targets").is_none());
}

fn body(text: &str, flatten: bool) -> Value {
    match parse(reg(), text.as_bytes(), &opts()) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e.kong_body(flatten),
    }
}

#[test]
fn format_version_missing_unknown_and_wrong_type() {
    let b = body("services: []\n", false);
    assert_eq!(b["code"], 14);
    assert_eq!(b["name"], "invalid declarative configuration");
    assert_eq!(
        b["fields"],
        json!({"_format_version": "required field missing"})
    );
    assert!(
        b["message"]
            .as_str()
            .unwrap()
            .starts_with("declarative config is invalid: ")
    );
    let b = body("_format_version: \"2.0\"\n", false);
    assert_eq!(
        b["fields"],
        json!({"_format_version": "expected one of: 1.1, 2.1, 3.0"})
    );
    let b = body("_format_version: 3\n_transform: maybe\n", false);
    assert_eq!(
        b["fields"],
        json!({"_format_version": "expected a string", "_transform": "expected a boolean"})
    );
}

#[test]
fn unknown_keys_at_every_level() {
    let text = r#"_format_version: "3.0"
foo: bar
services:
- name: s1
  host: example.test
  colour: blue
  routes:
  - name: r1
    paths: [/]
    bogus: 1
"#;
    let b = body(text, false);
    assert_eq!(
        b["fields"],
        json!({
            "foo": "unknown field",
            "services": [{"colour": "unknown field", "routes": [{"bogus": "unknown field"}]}],
        })
    );
    let f = body(text, true);
    assert_eq!(f["fields"], json!({"foo": "unknown field"}));
    let flat = f["flattened_errors"].as_array().unwrap();
    assert_eq!(flat.len(), 2);
    // The child's entry first (Kong's recursion), then its parent's.
    assert_eq!(flat[0]["entity_type"], "route");
    assert_eq!(flat[0]["entity_name"], "r1");
    assert_eq!(
        flat[0]["errors"],
        json!([{"type": "field", "field": "bogus", "message": "unknown field"}])
    );
    assert_eq!(
        flat[0]["entity"],
        json!({"name": "r1", "paths": ["/"], "bogus": 1})
    );
    assert_eq!(flat[1]["entity_type"], "service");
    assert!(flat[1]["entity"].get("routes").is_none());
    let Err(e) = parse(reg(), text.as_bytes(), &opts()) else {
        unreachable!()
    };
    let shown = e.to_string();
    assert!(
        shown.contains("line 8: route 'r1': bogus: unknown field"),
        "{shown}"
    );
    assert!(
        shown.contains("line 4: service 's1': colour: unknown field"),
        "{shown}"
    );
    assert!(shown.contains("foo: unknown field"), "{shown}");
}

#[test]
fn wrong_types() {
    let b = body(
        "_format_version: \"3.0\"\nservices: nope\nconsumers:\n- 12\n- username: ok\n",
        true,
    );
    assert_eq!(
        b["fields"],
        json!({"services": "expected an array", "consumers": ["expected a record"]})
    );
    assert_eq!(b["flattened_errors"], json!([]));
    let b = body(
        "_format_version: \"3.0\"\nservices:\n- host: example.test\n  port: eighty\n  retries: -1\n",
        false,
    );
    let errs = &b["fields"]["services"][0];
    assert!(errs["port"].is_string(), "{b}");
    assert!(errs["retries"].is_string(), "{b}");
}

/// `spec/01-unit/01-db/01-schema/11-declarative_config/03-flatten_spec.lua`: "fails with
/// missing foreign relationships".
#[test]
fn dangling_references() {
    let b = body(
        r#"_format_version: "1.1"
plugins:
  - name: http-log
    service: svc1
    consumer: my-consumer
    config:
      http_endpoint: https://example.com
"#,
        false,
    );
    assert_eq!(
        b["fields"],
        json!({"plugins": [[
            "invalid reference 'consumer: my-consumer' (no such entry in 'consumers')",
            "invalid reference 'service: svc1' (no such entry in 'services')",
        ]]})
    );
    let f = body(
        "_format_version: \"3.0\"\nroutes:\n- name: r\n  paths: [/]\n  service:\n    id: 769bdf51-16df-5476-9830-ef26800b5448\n",
        true,
    );
    assert_eq!(
        f["flattened_errors"][0]["errors"],
        json!([{"type": "entity", "message": "invalid reference 'service: {\"id\":\"769bdf51-16df-5476-9830-ef26800b5448\"}' (no such entry in 'services')"}])
    );
}

#[test]
fn duplicates() {
    let b = body(
        r#"_format_version: "3.0"
services:
- name: s
  host: a.test
- name: s
  host: b.test
consumers:
- username: u
  custom_id: c
- username: v
  custom_id: c
- id: 5b1b4e3a-2b2a-4a8b-9a59-4d1d2f8e2b10
  username: w
- id: 5b1b4e3a-2b2a-4a8b-9a59-4d1d2f8e2b10
  username: x
"#,
        false,
    );
    assert_eq!(
        b["fields"],
        json!({
            "services": [null, "uniqueness violation: 'services' entity with name set to 's' already declared"],
            "consumers": [
                null,
                "uniqueness violation: 'consumers' entity with custom_id set to 'c' already declared",
                null,
                "uniqueness violation: 'consumers' entity with primary key set to '5b1b4e3a-2b2a-4a8b-9a59-4d1d2f8e2b10' already declared",
            ],
        })
    );
}

#[test]
fn invalid_yaml_has_its_line() {
    let text = "_format_version: \"3.0\"\nservices:\n- name: a\n  host: [unclosed\n";
    let Err(Error::Syntax { line, message, .. }) = parse(reg(), text.as_bytes(), &opts()) else {
        panic!("not a syntax error")
    };
    assert!(
        message.starts_with("failed parsing declarative configuration: "),
        "{message}"
    );
    assert!(line.is_some_and(|l| (4..=5).contains(&l)), "{line:?}");
    let Err(e) = parse(
        reg(),
        b"{\"_format_version\": \"3.0\",\n \"services\": [}",
        &opts(),
    ) else {
        panic!()
    };
    let b = e.kong_body(false);
    assert_eq!(b["code"], 14);
    assert!(
        b["fields"]["error"].as_str().unwrap().contains("line 2"),
        "{b}"
    );
    assert!(e.to_string().starts_with("line 2: "), "{e}");
    let Err(e) = parse(reg(), b"- just\n- a list\n", &opts()) else {
        panic!()
    };
    assert_eq!(
        e.kong_body(false)["fields"]["error"],
        "failed parsing declarative configuration: expected an object"
    );
}

#[test]
fn deck_keys() {
    let c = ok(r#"_format_version: "3.0"
_workspace: default
_info:
  select_tags: [managed, team-a]
services:
- name: s
  host: a.test
  tags: [team-a, own]
  routes:
  - paths: [/]
"#);
    assert_eq!(
        c.select_tags,
        vec!["managed".to_owned(), "team-a".to_owned()]
    );
    for e in &c.entities {
        let body = e.value();
        let tags: Vec<&str> = body["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert!(
            tags.contains(&"managed") && tags.contains(&"team-a"),
            "{tags:?}"
        );
    }
    assert_eq!(
        c.entities[0].value()["tags"],
        json!(["team-a", "own", "managed"])
    );
    let b = body(
        r#"_format_version: "3.0"
_workspace: other
_info:
  defaults: {}
  default_lookup_tags: {}
_plugin_configs: {}
_konnect: {}
workspaces: []
"#,
        false,
    );
    let f = b["fields"].as_object().unwrap();
    for key in ["_workspace", "_plugin_configs", "_konnect", "workspaces"] {
        assert!(f[key].is_string(), "{key}: {b}");
    }
    assert!(f["_info"]["defaults"].is_string() && f["_info"]["default_lookup_tags"].is_string());
}

#[test]
fn comments_and_ignore_are_dropped() {
    let c = ok(r#"_format_version: "3.0"
_comment: top
_ignore: [1, 2]
services:
- name: s
  host: a.test
  _comment: on an entity
  _ignore:
  - whatever: true
"#);
    assert!(c.entities[0].value().get("_comment").is_none());
    assert!(c.entities[0].value().get("_ignore").is_none());
}

#[test]
fn transform_false_keeps_passwords() {
    let c = ok(r#"_format_version: "3.0"
_transform: false
consumers:
- username: u
  basicauth_credentials:
  - username: u
    password: already-hashed
"#);
    assert!(!c.transform);
    assert_eq!(
        of_type(&c, "basicauth_credentials")[0].value()["password"],
        "already-hashed"
    );
}

/// A file of `n` groups shaped as burst.yml's (a service with a route and an ip-restriction
/// plugin, an upstream with a target): `5 * n` entities.
pub(crate) fn big_file(n: usize) -> String {
    let mut out = String::from("_format_version: \"1.1\"\nservices:\n");
    for i in 0..n {
        out.push_str(&format!(
            r#"- connect_timeout: 60000
  host: svc-{i}.4test-any.svc
  name: 4test-any.svc-{i}.80
  path: /
  port: 80
  protocol: http
  read_timeout: 60000
  retries: 5
  write_timeout: 60000
  routes:
  - hosts:
    - svc-{i}.example.test
    name: 4test-any.svc-{i}-ingress.00
    paths:
    - /something/{i}
    preserve_host: true
    protocols:
    - http
    - https
    regex_priority: 0
    strip_path: true
    https_redirect_status_code: 426
    plugins:
    - name: ip-restriction
      config:
        deny: null
        allow:
        - 0.0.0.0/0
      enabled: true
      protocols:
      - grpc
      - grpcs
      - http
      - https
"#
        ));
    }
    out.push_str("upstreams:\n");
    for i in 0..n {
        out.push_str(&format!(
            r#"- name: svc-{i}.4test-any.svc
  algorithm: round-robin
  slots: 10000
  healthchecks:
    active:
      concurrency: 10
      healthy:
        http_statuses: [200, 302]
        interval: 0
        successes: 0
      http_path: /
      https_verify_certificate: true
      type: http
      timeout: 1
    threshold: 0
  hash_on: none
  hash_fallback: none
  targets:
  - target: 10.{}.{}.{}:80
    weight: 100
"#,
            i / 65536,
            (i / 256) % 256,
            i % 256
        ));
    }
    out
}

/// 30,000 entities (no timing assertion: the release timing goes in the report).
#[test]
fn thirty_thousand_entities() {
    let text = big_file(6000);
    let started = std::time::Instant::now();
    let c = parse(reg(), text.as_bytes(), &opts()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "30k entities: {} bytes parsed in {:?}",
        text.len(),
        started.elapsed()
    );
    assert_eq!(c.entities.len(), 30_000);
    let started = std::time::Instant::now();
    let out = write(
        reg(),
        values(&c).iter().map(|(t, v)| (*t, v)),
        WriteOptions {
            format: OutputFormat::Yaml,
            nested: false,
        },
    );
    eprintln!(
        "30k entities: {} bytes written in {:?}",
        out.len(),
        started.elapsed()
    );
}

/// `spec/01-unit/01-db/01-schema/11-declarative_config/04-on-the-fly-migration_spec.lua`:
/// "routes handling for format version …", both configurations, all three versions.
#[test]
fn regex_paths_migrate_for_old_formats() {
    for version in ["1.1", "2.1", "3.0"] {
        let configs = [
            format!(
                r#"_format_version: "{version}"
services:
- name: foo
  host: example.com
  protocol: https
  enabled: false
  _comment: my comment
  _ignore:
  - foo: bar
- name: bar
  host: example.test
  port: 3000
  _comment: my comment
  _ignore:
  - foo: bar
  tags: [hello, world]
routes:
- name: foo
  path_handling: v0
  protocols: ["https"]
  paths: ["/regex.+", "/prefix" ]
  snis:
  - "example.com"
  service: foo
"#
            ),
            format!(
                r#"_format_version: "{version}"
services:
- name: foo
  host: example.com
  protocol: https
  enabled: false
  _comment: my comment
  _ignore:
  - foo: bar
  routes:
  - name: foo
    path_handling: v0
    protocols: ["https"]
    paths: ["/regex.+", "/prefix" ]
    snis:
    - "example.com"
- name: bar
  host: example.test
  port: 3000
  _comment: my comment
  _ignore:
  - foo: bar
  tags: [hello, world]
"#
            ),
        ];
        for text in &configs {
            let c = ok(text);
            let services = of_type(&c, "services");
            let bar = services
                .iter()
                .find(|s| s.value()["name"] == "bar")
                .unwrap();
            assert_eq!(bar.value()["host"], "example.test");
            assert_eq!(bar.value()["protocol"], "http");
            assert_eq!(bar.value()["port"], 3000);
            let foo = services
                .iter()
                .find(|s| s.value()["name"] == "foo")
                .unwrap();
            assert_eq!(foo.value()["protocol"], "https");
            assert_eq!(foo.value()["enabled"], false);
            let route = &of_type(&c, "routes")[0];
            assert_eq!(route.value()["protocols"], json!(["https"]));
            assert_eq!(route.value()["service"], json!({ "id": foo.id }));
            let expected = if version == "3.0" {
                json!(["/regex.+", "/prefix"])
            } else {
                json!(["~/regex.+", "/prefix"])
            };
            assert_eq!(route.value()["paths"], expected, "{version}");
        }
    }
}

/// Same spec: "validation should happens after migration".
#[test]
fn validation_happens_after_migration() {
    let text = r#"_format_version: "2.1"
services:
- name: foo
  host: example.com
  protocol: https
  enabled: false
  _comment: my comment
- name: bar
  host: example.test
  port: 3000
  _comment: my comment
  routes:
  - name: foo
    path_handling: v0
    protocols: ["https"]
    paths: ["/regex.+(", "/prefix" ]
    snis:
    - "example.com"
"#;
    let inv = invalid(text);
    // Our router validation reports it on the entity (Kong: on `paths`).
    let msg = inv.fields["services"][1]["routes"][0].to_string();
    assert!(msg.contains("invalid regex"), "{msg}");
    assert!(msg.contains("/regex.+("), "{msg}");
}

/// `migrate_path_280_300.lua` on single paths.
#[test]
fn migrate_path_cases() {
    use super::migrate::migrate_path;
    let cases = [
        ("/prefix", "/prefix"),
        ("/", "/"),
        ("/a//b/./c/../d", "/a/b/d"),
        ("/caf%C3%A9", "/café"),
        ("/a%2Fb", "/a%2Fb"),
        ("/a%2fb", "/a%2Fb"),
        ("/users/\\d+", "~/users/\\d+"),
        ("/regex.+", "~/regex.+"),
        ("/x(%41|%2e|%2f)$", "~/x(A|\\.|%2F)$"),
        ("/v1/*", "~/v1/*"),
    ];
    for (given, expected) in cases {
        assert_eq!(migrate_path(given), expected, "{given}");
    }
}

#[test]
fn yaml_scalars_follow_lyaml() {
    use super::syntax::plain_scalar;
    let s = |t: &str| plain_scalar(t.to_owned());
    for t in ["~", "null", "Null", "NULL", ""] {
        assert_eq!(s(t), Value::Null, "{t}");
    }
    for t in ["true", "True", "TRUE", "yes", "Yes", "on", "ON"] {
        assert_eq!(s(t), json!(true), "{t}");
    }
    for t in ["false", "no", "NO", "off", "Off"] {
        assert_eq!(s(t), json!(false), "{t}");
    }
    assert_eq!(s("80"), json!(80));
    assert_eq!(s("-3"), json!(-3));
    assert_eq!(s("0x1F"), json!(31));
    assert_eq!(s("010"), json!(8));
    assert_eq!(s("1_000"), json!(1000));
    assert_eq!(s("1.5"), json!(1.5));
    assert_eq!(s("1e3"), json!(1000.0));
    for t in [
        "y",
        "n",
        "1.2.3",
        "10.0.0.1:80",
        "/path",
        "abc",
        "0x",
        "1:30",
    ] {
        assert_eq!(s(t), json!(t), "{t}");
    }
    // Quoted scalars are strings.
    let c = ok("_format_version: \"3.0\"\nservices:\n- name: \"yes\"\n  host: 'on'\n");
    assert_eq!(c.entities[0].value()["name"], "yes");
    assert_eq!(c.entities[0].value()["host"], "on");
}

/// Strings that would read back as something else are quoted by the writer.
#[test]
fn written_strings_read_back_as_strings() {
    let tricky = [
        "yes",
        "no",
        "on",
        "null",
        "~",
        "",
        "80",
        "0x10",
        "1e3",
        "1:30",
        "- x",
        "a: b",
        "#c",
        "x #y",
        " lead",
        "trail ",
        "multi\nline",
        "quote\"d",
        "tab\tx",
        "*star",
        "&amp",
        "!bang",
        "%pct",
        "@at",
        "`tick",
        "{brace",
        "[bracket",
        "café",
        ".inf",
        "-.5",
        "+1",
    ];
    let mut out = String::new();
    for (i, t) in tricky.iter().enumerate() {
        super::syntax::emit_entry(&mut out, &format!("k{i}"), &json!(t), 0);
    }
    let v = super::syntax::load(&out, &Default::default()).unwrap();
    for (i, t) in tricky.iter().enumerate() {
        assert_eq!(v[format!("k{i}")], json!(t), "{out}");
    }
}

/// Kong's inline declarative-config cases: `(spec, case, file, expected fields or null for a
/// valid file)`. `V` is `spec/01-unit/01-db/01-schema/11-declarative_config/01-validate_spec.lua`.
/// Kong's `validate` checks the schema only; its valid cases that reference entities absent
/// from the file are left out (`parse` resolves references too).
#[test]
fn kong_validate_spec_table() {
    const V: &str = "01-validate_spec.lua";
    let cases: Vec<(&str, &str, &str, Value)> = vec![
        (
            V,
            "version is a string",
            "_format_version: 1.1\n",
            json!({"_format_version": "expected a string"}),
        ),
        (
            V,
            "version is known",
            "_format_version: \"foobar\"\n",
            json!({"_format_version": "expected one of: 1.1, 2.1, 3.0"}),
        ),
        (V, "1.1", "_format_version: \"1.1\"\n", Value::Null),
        (V, "2.1", "_format_version: \"2.1\"\n", Value::Null),
        (
            V,
            "_comment",
            "_format_version: \"1.1\"\n_comment: foo\n",
            Value::Null,
        ),
        (
            V,
            "_ignore",
            "_format_version: \"1.1\"\n_ignore:\n- foo: bar\n- 1\n",
            Value::Null,
        ),
        (
            V,
            "services: required",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n",
            json!({"services": [{"host": "required field missing"}]}),
        ),
        (
            V,
            "services: regular validations",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  retries: -1\n  protocol: foo\n  host: 1234\n  port: 99999\n  path: /foo//bar/\n",
            json!({"services": [{
                "host": "expected a string",
                "path": "must not have empty segments",
                "port": "value should be between 0 and 65535",
                "protocol": "expected one of: grpc, grpcs, http, https, tcp, tls, tls_passthrough, udp",
                "retries": "value should be between 0 and 32767",
            }]}),
        ),
        (
            V,
            "services: url shorthand",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  # url shorthand also works\n  url: https://example.com:8000/hello/world\n",
            Value::Null,
        ),
        (
            V,
            "plugins: empty list",
            "_format_version: \"1.1\"\nplugins:\n",
            Value::Null,
        ),
        (
            V,
            "plugins: entities",
            "_format_version: \"1.1\"\nplugins:\n  - name: key-auth\n    _comment: my comment\n    _ignore:\n    - foo: bar\n  - name: http-log\n    config:\n      http_endpoint: https://example.com\n    _comment: my comment\n    _ignore:\n    - foo: bar\n",
            Value::Null,
        ),
        (
            V,
            "plugins in services: empty list",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  plugins: []\n  host: example.com\n",
            Value::Null,
        ),
        (
            V,
            "plugins in services: entities",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  host: example.com\n  protocol: https\n  _comment: my comment\n  _ignore:\n  - foo: bar\n  plugins:\n    - name: key-auth\n      _comment: my comment\n      _ignore:\n      - foo: bar\n    - name: http-log\n      config:\n        http_endpoint: https://example.com\n- name: bar\n  host: example.test\n  port: 3000\n  plugins:\n  - name: basic-auth\n  - name: tcp-log\n    config:\n      host: 127.0.0.1\n      port: 10000\n",
            Value::Null,
        ),
        (
            V,
            "plugins in services: required",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  plugins:\n  - enabled: true\n",
            json!({"services": [{"plugins": [{"name": "required field missing"}]}]}),
        ),
        (
            V,
            "plugins in services: unknown plugin",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  plugins:\n  - name: foo\n",
            json!({"services": [{"plugins": [{"name": "plugin 'foo' not enabled; add it to the 'plugins' configuration property"}]}]}),
        ),
        (
            V,
            "plugins in services: no other foreign keys",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  plugins:\n  - name: key-auth\n    consumer: foo\n",
            json!({"services": [{"plugins": [{"consumer": "value must be null"}]}]}),
        ),
        (
            V,
            "routes in services: empty list",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  routes: []\n  host: example.com\n",
            Value::Null,
        ),
        (
            V,
            "routes in services: entities",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  host: example.com\n  protocol: https\n  routes:\n    - paths:\n      - /path\n    - hosts:\n      - example.com\n    - methods: [\"GET\", \"POST\"]\n- name: bar\n  host: example.test\n  port: 3000\n  routes:\n    - paths:\n      - /path\n      hosts:\n      - example.com\n      methods: [\"GET\", \"POST\"]\n",
            Value::Null,
        ),
        (
            V,
            "routes in services: required",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  routes:\n  - preserve_host: true\n",
            json!({"services": [{"routes": [{"@entity": ["must set one of 'methods', 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'https'"]}]}]}),
        ),
        (
            V,
            "routes in services: regular validations",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  routes:\n  - name: foo\n    paths:\n    - bla\n",
            json!({"services": [{"routes": [{"paths": ["should start with: / (fixed path) or ~/ (regex path)"]}]}]}),
        ),
        (
            V,
            "plugins in routes in services: empty list",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  host: example.com\n  routes:\n  - name: foo\n    methods: [\"GET\"]\n    plugins: []\n",
            Value::Null,
        ),
        (
            V,
            "plugins in routes in services: entities",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  host: example.com\n  protocol: https\n  routes:\n  - name: foo\n    methods: [\"GET\"]\n    plugins:\n      - name: key-auth\n      - name: http-log\n        config:\n          http_endpoint: https://example.com\n- name: bar\n  host: example.test\n  port: 3000\n  routes:\n  - name: bar\n    paths:\n    - /\n    plugins:\n    - name: basic-auth\n    - name: tcp-log\n      config:\n        host: 127.0.0.1\n        port: 10000\n",
            Value::Null,
        ),
        (
            V,
            "plugins in routes in services: required",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  routes:\n  - paths:\n    - /\n    plugins:\n    - enabled: true\n",
            json!({"services": [{"routes": [{"plugins": [{"name": "required field missing"}]}]}]}),
        ),
        (
            V,
            "plugins in routes in services: unknown plugin",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  routes:\n  - paths:\n    - /\n    plugins:\n    - name: foo\n",
            json!({"services": [{"routes": [{"plugins": [{"name": "plugin 'foo' not enabled; add it to the 'plugins' configuration property"}]}]}]}),
        ),
        (
            V,
            "plugins in routes in services: no other foreign keys",
            "_format_version: \"1.1\"\nservices:\n- name: foo\n  url: https://example.com\n  routes:\n  - paths:\n    - /\n    plugins:\n    - name: key-auth\n      route: foo\n",
            json!({"services": [{"routes": [{"plugins": [{"route": "value must be null"}]}]}]}),
        ),
    ];
    let mut failures = Vec::new();
    for (spec, case, text, expected) in cases {
        let got = match parse(reg(), text.as_bytes(), &opts()) {
            Ok(_) => Value::Null,
            Err(e) => e.kong_body(false)["fields"].clone(),
        };
        if got != expected {
            failures.push(format!(
                "{spec} {case}:\n  expected {expected}\n  got      {got}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `spec/01-unit/01-db/01-schema/11-declarative_config/05-error-flattening_spec.lua`, the
/// first case's input (less vaults, which deltaplane has not, and its certificates and
/// inline client certificate), read by `parse`: the flattened entries' structure (type,
/// name, tags, id, fields with errors) as the spec expects, in any order as the spec
/// compares them.
#[test]
fn kong_error_flattening_spec() {
    let text = r#"_format_version: "3.0"
_transform: true
consumers:
- tags: [consumer-01]
  username: valid_user
- not_allowed: true
  tags: [consumer-02]
  username: bobby_in_json_body
- tags: [consumer-03]
  username: super_valid_user
- basicauth_credentials:
  - password: hard2guess
    tags: [basicauth_credentials-01, consumer-04]
    username: superduper
  - extra_field: NO!
    password: "12354"
    tags: [basicauth_credentials-02, consumer-04]
    username: dont-add-extra-fields-yo
  tags: [consumer-04]
  username: credentials
plugins:
- config:
    http_endpoint: invalid::#//url
  name: http-log
  tags: [global_plugin-01]
services:
- host: localhost
  name: nope
  port: 1234
  protocol: nope
  routes:
  - hosts: [test]
    methods: [GET]
    name: valid.route
    protocols: [http, https]
    tags: [route_service-01, service-01]
  - name: nope.route
    protocols: [tcp]
    tags: [route_service-02, service-01]
  tags: [service-01]
- host: localhost
  name: mis-matched
  path: /path
  protocol: tcp
  routes:
  - hosts: [test]
    methods: [GET]
    name: invalid
    protocols: [http, https]
    tags: [route_service-03, service-02]
  tags: [service-02]
- name: okay
  routes:
  - hosts: [test]
    methods: [GET]
    name: probably-valid
    plugins:
    - config:
        not_endpoint: anything
      name: http-log
      tags: [route_service_plugin-01, route_service-04, service-03]
    protocols: [http, https]
    tags: [route_service-04, service-03]
  tags: [service-03]
  url: http://localhost:1234
- name: bad-service-plugins
  plugins:
  - config: {}
    name: i-dont-exist
    tags: [service_plugin-01, service-04]
  - config:
      deeply:
        nested:
          undefined: true
      port: 1234
    name: tcp-log
    tags: [service_plugin-02, service-04]
  tags: [service-04]
  url: http://localhost:1234
- id: 123456
  name: invalid-id
  tags: [service-06, invalid-id]
  url: https://localhost:1234
- name: invalid-tags
  tags: [service-07, invalid-tags, [1, 2, 3], true]
  url: https://localhost:1234
- name: ""
  tags: [service-08, invalid_service_name-01]
  url: https://localhost:1234
- name: 1234
  tags: [service-09, invalid_service_name-02]
  url: https://localhost:1234
upstreams:
- hash_on: ip
  name: ok
  tags: [upstream-01]
- hash_on: ip
  healthchecks:
    active:
      concurrency: -1
      healthy:
        interval: 0
        successes: 0
      http_path: /
      https_sni: example.com
      https_verify_certificate: true
      timeout: 1
      type: http
      unhealthy:
        http_failures: 0
        interval: 0
  host_header: 123
  name: bad
  tags: [upstream-02]
- name: ok-bad-targets
  tags: [upstream-03]
  targets:
  - tags: [upstream_target-01, upstream-03]
    target: 127.0.0.1:99
  - tags: [upstream_target-02, upstream-03]
    target: hostname:1.0
"#;
    // (entity_type, entity_name, first tag, ["field" or "@entity"] sorted) per the spec's
    // expected `flattened_errors`.
    let expected = vec![
        (
            "basicauth_credential",
            None,
            "basicauth_credentials-02",
            vec!["extra_field"],
        ),
        ("consumer", None, "consumer-02", vec!["not_allowed"]),
        (
            "plugin",
            Some("http-log"),
            "global_plugin-01",
            vec!["config.http_endpoint"],
        ),
        (
            "plugin",
            Some("http-log"),
            "route_service_plugin-01",
            vec!["config.http_endpoint", "config.not_endpoint"],
        ),
        (
            "plugin",
            Some("i-dont-exist"),
            "service_plugin-01",
            vec!["name"],
        ),
        (
            "plugin",
            Some("tcp-log"),
            "service_plugin-02",
            vec!["config.deeply", "config.host"],
        ),
        (
            "route",
            Some("nope.route"),
            "route_service-02",
            vec!["@entity"],
        ),
        ("service", None, "service-08", vec!["name"]),
        ("service", None, "service-09", vec!["name"]),
        ("service", Some("invalid-id"), "service-06", vec!["id"]),
        (
            "service",
            Some("invalid-tags"),
            "-",
            vec!["tags.3", "tags.4"],
        ), // no entity_tags: invalid
        (
            "service",
            Some("mis-matched"),
            "service-02",
            vec!["@entity", "path"],
        ),
        ("service", Some("nope"), "service-01", vec!["protocol"]),
        ("target", None, "upstream_target-02", vec!["target"]),
        (
            "upstream",
            Some("bad"),
            "upstream-02",
            vec!["healthchecks.active.concurrency", "host_header"],
        ),
    ];
    let b = body(text, true);
    assert_eq!(b["fields"], json!({}), "{b:#}");
    let mut got: Vec<(String, Option<String>, String, Vec<String>)> = b["flattened_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let mut fields: Vec<String> = e["errors"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| {
                    x.get("field")
                        .and_then(Value::as_str)
                        .unwrap_or("@entity")
                        .to_owned()
                })
                .collect();
            fields.sort();
            let tag = e["entity_tags"][0].as_str().unwrap_or("-").to_owned();
            (
                e["entity_type"].as_str().unwrap().to_owned(),
                e.get("entity_name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                tag,
                fields,
            )
        })
        .collect();
    got.sort();
    let mut expected: Vec<(String, Option<String>, String, Vec<String>)> = expected
        .into_iter()
        .map(|(t, n, tag, f)| {
            (
                t.to_owned(),
                n.map(str::to_owned),
                tag.to_owned(),
                f.into_iter().map(str::to_owned).collect(),
            )
        })
        .collect();
    expected.sort();
    assert_eq!(got, expected);
    // Entities as given: the nested target without its siblings, no parent id (the parent
    // gave none), invalid tags left out of entity_tags.
    let flat = b["flattened_errors"].as_array().unwrap();
    let target = flat.iter().find(|e| e["entity_type"] == "target").unwrap();
    assert_eq!(
        target["entity"],
        json!({"tags": ["upstream_target-02", "upstream-03"], "target": "hostname:1.0"})
    );
    let tags = flat
        .iter()
        .find(|e| e["entity_name"] == "invalid-tags")
        .unwrap();
    assert!(tags.get("entity_tags").is_none());
    assert!(tags["entity"]["tags"].as_array().unwrap().len() == 4);
    let mis = flat
        .iter()
        .find(|e| e["entity_name"] == "mis-matched")
        .unwrap();
    assert!(mis["entity"].get("routes").is_none());
}

#[test]
fn settle_keeps_stored_timestamps_and_generated_values() {
    let stored =
        json!({"id": "a", "key": "k-stored", "tags": null, "created_at": 1, "updated_at": 2});
    // Only timestamps and generated values differ: the stored entity, as it was.
    let mut read =
        json!({"id": "a", "key": "k-random", "tags": null, "created_at": 9, "updated_at": 9});
    assert!(!super::settle(&mut read, &stored, &["key".into()], 50));
    assert_eq!(read, stored);
    // Something else changed: the stored key and created_at, updated_at now.
    let mut read =
        json!({"id": "a", "key": "k-random", "tags": ["x"], "created_at": 9, "updated_at": 9});
    assert!(super::settle(&mut read, &stored, &["key".into()], 50));
    assert_eq!(
        read,
        json!({"id": "a", "key": "k-stored", "tags": ["x"], "created_at": 1, "updated_at": 50})
    );
    // A key the file gives is not generated: a different one is a change.
    let mut read =
        json!({"id": "a", "key": "k-file", "tags": null, "created_at": 9, "updated_at": 9});
    assert!(super::settle(&mut read, &stored, &[], 50));
    assert_eq!(read["key"], json!("k-file"));
}

/// The reader streams top-level entities (`syntax::Sink`): the file's key order changes
/// nothing, entities before `_format_version` still get its migration, JSON reads as YAML.
#[test]
fn streamed_reading_is_order_independent() {
    let format_first = r#"_format_version: "1.1"
services:
- name: a
  host: a.test
  routes:
  - name: ra
    paths: ["/x.+"]
routes:
- name: rb
  service: a
  paths: ["/y.+"]
"#;
    let format_last = r#"routes:
- name: rb
  service: a
  paths: ["/y.+"]
services:
- name: a
  host: a.test
  routes:
  - name: ra
    paths: ["/x.+"]
_format_version: "1.1"
"#;
    let a = ok(format_first);
    let b = ok(format_last);
    let bodies = |c: &Config| -> Vec<(String, String)> {
        c.entities
            .iter()
            .map(|e| (e.entity_type.clone(), e.body.to_string()))
            .collect()
    };
    assert_eq!(bodies(&a), bodies(&b));
    // Registry order: the nested route (walked with its service) before the top-level one.
    let routes = of_type(&b, "routes");
    assert_eq!(routes[0].value()["name"], "ra");
    assert_eq!(routes[0].value()["paths"][0], "~/x.+");
    assert_eq!(routes[1].value()["paths"][0], "~/y.+");

    let json = serde_json::json!({
        "_format_version": "1.1",
        "services": [{"name": "a", "host": "a.test", "routes": [{"name": "ra", "paths": ["/x.+"]}]}],
        "routes": [{"name": "rb", "service": "a", "paths": ["/y.+"]}],
    })
    .to_string();
    assert_eq!(bodies(&ok(&json)), bodies(&a));
}

/// A top-level key given twice is refused (its first list was already read), in YAML and
/// JSON alike.
#[test]
fn duplicate_top_level_keys_are_refused() {
    let yaml = "_format_version: \"3.0\"\nservices:\n- name: a\n  host: a.test\nservices:\n- name: b\n  host: b.test\n";
    let json = r#"{"_format_version": "3.0", "services": [{"name": "a", "host": "a.test"}], "services": []}"#;
    for text in [yaml, json] {
        match parse(reg(), text.as_bytes(), &opts()) {
            Err(Error::Syntax { message, .. }) => {
                assert!(
                    message.contains("duplicate top-level key 'services'"),
                    "{message}"
                )
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }
}

/// A top-level list with an anchor is read whole, not streamed: an alias may repeat it (here
/// the global plugins, again under a service).
#[test]
fn anchored_top_level_lists_are_read_whole() {
    let c = ok(r#"_format_version: "3.0"
plugins: &shared
- name: ip-restriction
  config:
    allow: [10.0.0.0/8]
services:
- name: a
  host: a.test
  plugins: *shared
"#);
    let plugins = of_type(&c, "plugins");
    assert_eq!(plugins.len(), 2, "{plugins:?}");
    assert_eq!(
        plugins
            .iter()
            .filter(|p| p.value()["service"].is_object())
            .count(),
        1
    );
}
