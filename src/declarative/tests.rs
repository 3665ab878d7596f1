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
    assert_eq!(c.entities[0].body["host"], "billing.internal");
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
    let by_name = |n: &str| plugins.iter().find(|p| p.body["name"] == n).unwrap();
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
    assert_eq!(by_name("cors").body["service"], json!({ "id": svc }));
    // targets: cache_key = { "upstream", "target" }
    let t = &of_type(&c, "targets")[0];
    assert_eq!(
        t.id,
        kong_id("targets", &format!("targets:*:{up}:10.0.0.1:80"))
    );
    assert_eq!(t.body["upstream"], json!({ "id": up }));
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
        .filter(|p| p.body["service"].is_null() && p.body["route"].is_null())
        .collect();
    assert_eq!(global.len(), 1);
    assert_eq!(global[0].body["name"], "prometheus");
    assert_eq!(
        plugins
            .iter()
            .filter(|p| p.body["name"] == "ip-restriction")
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
