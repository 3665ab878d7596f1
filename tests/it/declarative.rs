//! Declarative files on the control plane: `POST /config` and `GET /config` (Kong's
//! `kong/api/routes/config.lua`), `Store::import`'s rules (one version, the difference as
//! deltas, no-op re-imports), Kong's `spec/fixtures/burst.yml`, bad files, and the
//! `deltaplane-cp config` commands as a process.

use std::process::Command;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, TestCp, TestDb, TestDp, ca_cert, cert_and_key, free_port};

const BURST: &str = include_str!("../fixtures/kong/burst.yml");

/// Posts a file as `text/yaml` (`query` starts with `?` or is empty).
async fn post_config(cp: &TestCp, query: &str, file: &str) -> crate::harness::Resp {
    cp.raw(
        Method::POST,
        &format!("/config{query}"),
        "application/x-yaml",
        file.to_owned(),
    )
    .await
}

/// Posts a file and expects 201; returns `_deltaplane`.
async fn import(cp: &TestCp, file: &str) -> Value {
    let r = post_config(cp, "", file).await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    r.body["_deltaplane"].clone()
}

/// `GET /config` with `query`, the file's text.
async fn export(cp: &TestCp, query: &str) -> String {
    let r = cp.get(&format!("/config{query}")).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    r.body["config"].as_str().expect("config text").to_owned()
}

/// The deltas of versions after `after`, as (type, id, deleted).
async fn deltas_after(cp: &TestCp, after: i64) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    cp.store()
        .changes_after(after, 1000, |c| {
            out.push((c.entity_type.clone(), c.id.clone(), c.entity.is_none()));
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    out.sort();
    out
}

fn full_syncs(dp: &TestDp) -> u64 {
    dp.shared().status_json()["full_syncs"].as_u64().unwrap()
}

const SMALL: &str = r#"
_format_version: "3.0"
services:
- name: billing
  host: billing.test
  tags: [team-a]
  routes:
  - name: billing-route
    paths: [/billing]
- name: orders
  host: orders.test
  routes:
  - name: orders-route
    paths: [/orders]
consumers:
- username: alice
  basicauth_credentials:
  - username: alice
    password: secret
  keyauth_credentials:
  - key: alice-key
plugins:
- name: cors
"#;

both_backends!(
    import_is_one_version_and_re_import_a_no_op,
    |backend| async move {
        let Some(cp) = TestCp::start(backend).await else {
            return;
        };
        let dp = cp.start_dp().await;
        dp.converge(&cp, 20).await;
        let (head, _) = cp.head().await;
        let full_before = full_syncs(&dp);

        let r = post_config(&cp, "", SMALL).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        let outcome = &r.body["_deltaplane"];
        assert_eq!(outcome["version"], head + 1, "{outcome}");
        assert_eq!(outcome["changes"]["services"]["created"], 2);
        assert_eq!(outcome["changes"]["routes"]["created"], 2);
        assert_eq!(outcome["changes"]["basicauth_credentials"]["created"], 1);
        // Kong's body: entities by type, then id, without workspaces.
        let services = r.body["services"].as_object().expect("services by id");
        assert_eq!(services.len(), 2);
        assert!(r.body.get("workspaces").is_none());
        let cred = r.body["basicauth_credentials"]
            .as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .clone();
        assert_ne!(cred["password"], "secret", "the password is hashed");
        assert_eq!(cp.head().await.0, head + 1, "one version");
        dp.converge(&cp, 20).await;
        assert_eq!(full_syncs(&dp), full_before, "the DP got a delta");

        // The same file again: nothing changes, no version.
        let again = import(&cp, SMALL).await;
        assert_eq!(again["version"], Value::Null, "{again}");
        assert_eq!(again["changes"], json!({}));
        assert_eq!(cp.head().await.0, head + 1);
        // check_hash=1: 304 when nothing would change.
        let r = post_config(&cp, "?check_hash=1", SMALL).await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{r:?}");

        // A dry run of a change writes nothing and says what would change.
        let changed = SMALL.replace("host: orders.test", "host: orders2.test");
        let before = cp.head().await;
        let r = post_config(&cp, "?dry_run=true", &changed).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        assert_eq!(r.body["_deltaplane"]["dry_run"], true);
        assert_eq!(r.body["_deltaplane"]["version"], head + 2);
        assert_eq!(r.body["_deltaplane"]["changes"]["services"]["updated"], 1);
        assert_eq!(cp.head().await, before, "a dry run writes nothing");

        // The change itself: exactly one delta, the updated service, created_at kept.
        let orders_before = cp.get("/services/orders").await.body;
        let done = import(&cp, &changed).await;
        assert_eq!(done["version"], head + 2);
        let deltas = deltas_after(&cp, head + 1).await;
        assert_eq!(deltas.len(), 1, "{deltas:?}");
        assert_eq!(deltas[0].0, "services");
        let orders = cp.get("/services/orders").await.body;
        assert_eq!(orders["host"], "orders2.test");
        assert_eq!(orders["created_at"], orders_before["created_at"]);
        assert_eq!(orders["id"], orders_before["id"]);
        dp.converge(&cp, 20).await;
        assert_eq!(full_syncs(&dp), full_before);

        // Upsert never deletes: a file with only one service leaves the rest.
        let only = "_format_version: \"3.0\"\nservices:\n- name: extra\n  host: extra.test\n";
        let r = post_config(&cp, "?upsert=true", only).await;
        assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
        assert_eq!(
            r.body["_deltaplane"]["changes"],
            json!({"services": {"created": 1, "updated": 0, "deleted": 0}})
        );
        assert_eq!(cp.get("/services/billing").await.status, StatusCode::OK);
        // Sync deletes what the file lacks, children with their parents, in one version.
        let (v, _) = cp.head().await;
        let done = import(&cp, only).await;
        assert_eq!(done["version"], v + 1);
        assert_eq!(done["changes"]["services"]["deleted"], 2, "{done}");
        assert_eq!(done["changes"]["routes"]["deleted"], 2, "{done}");
        assert_eq!(done["changes"]["consumers"]["deleted"], 1, "{done}");
        assert_eq!(
            cp.get("/services/billing").await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(cp.get("/services/extra").await.status, StatusCode::OK);
        dp.converge(&cp, 20).await;
        assert_eq!(full_syncs(&dp), full_before);
    }
);

/// Creates one entity of every type through the Admin API.
async fn every_type(cp: &TestCp) {
    let (crt, key) = cert_and_key("a.test");
    let ca = ca_cert("ca.test");
    let ca_id = cp
        .create("/ca_certificates", json!({"cert": ca, "tags": ["t1"]}))
        .await["id"]
        .clone();
    cp.create(
        "/certificates",
        json!({"cert": crt, "key": key, "snis": ["a.test"], "tags": ["t1"]}),
    )
    .await;
    cp.create(
        "/services",
        json!({"name": "s1", "host": "s1.test", "protocol": "https", "tags": ["t1", "t2"], "ca_certificates": [ca_id]}),
    )
    .await;
    cp.create("/services", json!({"host": "unnamed.test"}))
        .await;
    cp.create(
        "/services/s1/routes",
        json!({"name": "r1", "paths": ["/r1"], "tags": ["t1"]}),
    )
    .await;
    cp.create("/services/s1/routes", json!({"paths": ["/unnamed"]}))
        .await;
    cp.create("/upstreams", json!({"name": "u1", "tags": ["t1"]}))
        .await;
    cp.create("/upstreams/u1/targets", json!({"target": "10.0.0.1:80"}))
        .await;
    cp.create("/consumers", json!({"username": "c1", "tags": ["t1"]}))
        .await;
    cp.create("/consumers", json!({"custom_id": "only-custom"}))
        .await;
    cp.create(
        "/consumers/c1/basic-auth",
        json!({"username": "c1", "password": "pw"}),
    )
    .await;
    cp.create("/consumers/c1/key-auth", json!({})).await;
    cp.create("/consumers/c1/acls", json!({"group": "g1"}))
        .await;
    cp.create("/consumers/c1/jwt", json!({"key": "k1"})).await;
    cp.create("/plugins", json!({"name": "cors"})).await;
    cp.create(
        "/services/s1/plugins",
        json!({"name": "ip-restriction", "config": {"allow": ["10.0.0.0/8"]}}),
    )
    .await;
}

both_backends!(export_then_import_is_a_no_op, |backend| async move {
    let Some(cp) = TestCp::start(backend).await else {
        return;
    };
    every_type(&cp).await;
    let head = cp.head().await;
    for query in [
        "",
        "?nested=true",
        "?format=json",
        "?format=json&nested=true",
    ] {
        let file = export(&cp, query).await;
        assert!(file.contains("_transform"), "{query}: {file}");
        let r = post_config(&cp, "", &file).await;
        assert_eq!(r.status, StatusCode::CREATED, "{query}: {r:?}\n{file}");
        assert_eq!(
            r.body["_deltaplane"]["changes"],
            json!({}),
            "{query}: export → import changed something\n{file}"
        );
        assert_eq!(cp.head().await, head, "{query}");
    }
    // Import → export → import, on a second control plane.
    let file = export(&cp, "").await;
    let Some(other) = TestCp::start(backend).await else {
        return;
    };
    let first = import(&other, &file).await;
    assert!(first["version"].is_i64(), "{first}");
    let again = export(&other, "").await;
    let second = import(&other, &again).await;
    assert_eq!(second["changes"], json!({}), "{again}");
    // Both control planes hold the same configuration (their state hashes differ: each has
    // its own default workspace id), but for `updated_at`, which the reader sets to the
    // time of the import for an entity new to the store.
    let without_updated_at = |f: &str| -> Vec<String> {
        f.lines()
            .filter(|l| !l.contains("updated_at:"))
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(without_updated_at(&again), without_updated_at(&file));
});

both_backends!(
    burst_imports_converges_and_re_imports_as_a_no_op,
    |backend| async move {
        let Some(cp) = TestCp::start(backend).await else {
            return;
        };
        let dp = cp.start_dp().await;
        let done = import(&cp, BURST).await;
        // Kong's fixture: 236 services, 286 routes, 236 upstreams, 237 targets, a global
        // prometheus plugin and 94 ip-restriction plugins.
        assert_eq!(done["changes"]["services"]["created"], 236, "{done}");
        assert_eq!(done["changes"]["routes"]["created"], 286, "{done}");
        assert_eq!(done["changes"]["upstreams"]["created"], 236, "{done}");
        assert_eq!(done["changes"]["targets"]["created"], 237, "{done}");
        assert_eq!(done["changes"]["plugins"]["created"], 95, "{done}");
        dp.converge(&cp, 60).await;
        let head = cp.head().await;
        let again = import(&cp, BURST).await;
        assert_eq!(again["version"], Value::Null, "{again}");
        assert_eq!(cp.head().await, head);
    }
);

both_backends!(
    v1_and_v2_data_planes_hold_the_imported_state,
    |backend| async move {
        let Some(db) = TestDb::new(backend).await else {
            return;
        };
        let mut cfg = db.cp_config();
        cfg.cluster.push_interval = Duration::from_millis(200);
        let cp = TestCp::start_with(db, cfg).await;
        let v2 = cp.start_dp().await;
        let dir = tempfile::tempdir().unwrap();
        let mut dcfg = cp.dp_config(dir.path());
        dcfg.sync = deltaplane::dp::SyncMode::V1;
        let v1 = TestDp::start(dcfg, dir).await;
        import(&cp, SMALL).await;
        // `converge` compares the version and the state hash with the CP's, and recomputes it.
        v2.converge(&cp, 30).await;
        v1.converge(&cp, 30).await;
        assert_eq!(v1.state(), v2.state());
    }
);

#[tokio::test]
async fn bad_files_are_refused_in_kongs_shape_and_nothing_is_written() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.config_body_limit = 64 * 1024;
    let cp = TestCp::start_with(db, cfg).await;
    import(&cp, SMALL).await;
    let head = cp.head().await;
    let cases: &[(&str, &str)] = &[
        (
            "unknown key",
            "_format_version: \"3.0\"\nservices:\n- name: a\n  host: a.test\n  colour: red\n",
        ),
        (
            "wrong type",
            "_format_version: \"3.0\"\nservices:\n- name: a\n  host: a.test\n  port: eighty\n",
        ),
        (
            "dangling reference",
            "_format_version: \"3.0\"\nroutes:\n- name: r\n  paths: [/r]\n  service: nowhere\n",
        ),
        (
            "duplicate names",
            "_format_version: \"3.0\"\nservices:\n- name: a\n  host: a.test\n- name: a\n  host: b.test\n",
        ),
        (
            "unknown format version",
            "_format_version: \"9.9\"\nservices:\n- name: a\n  host: a.test\n",
        ),
        (
            "invalid YAML",
            "_format_version: \"3.0\"\nservices: [\n  - {name: a,\n",
        ),
    ];
    for (what, file) in cases {
        for query in ["", "?flatten_errors=1"] {
            let r = post_config(&cp, query, file).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{what}{query}: {r:?}");
            assert_eq!(r.body["code"], 14, "{what}{query}: {r:?}");
            assert_eq!(
                r.body["name"], "invalid declarative configuration",
                "{what}{query}: {r:?}"
            );
            if !query.is_empty() && *what != "invalid YAML" && *what != "unknown format version" {
                assert!(
                    !r.body["flattened_errors"].as_array().unwrap().is_empty(),
                    "{what}: {r:?}"
                );
            }
            assert_eq!(cp.head().await, head, "{what}: nothing written");
        }
    }
    // A key another stored entity holds, kept by an upsert: a final-state conflict.
    let clash = "_format_version: \"3.0\"\nconsumers:\n- username: bob\n  keyauth_credentials:\n  - key: alice-key\n";
    let r = post_config(&cp, "?upsert=true&flatten_errors=1", clash).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(r.body["code"], 14);
    assert_eq!(
        r.body["flattened_errors"][0]["entity_type"], "keyauth_credential",
        "{r:?}"
    );
    assert_eq!(cp.head().await, head);
    // Past --admin-config-max-body: 413, before parsing.
    let big = format!(
        "_format_version: \"3.0\"\n_comment: \"{}\"\n",
        "x".repeat(70 * 1024)
    );
    let r = post_config(&cp, "", &big).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE, "{r:?}");
    // Empty body: Kong's message.
    let r = post_config(&cp, "", "").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["message"], "expected a declarative configuration");
    assert_eq!(cp.head().await, head);
    // The `config` field of a JSON body holds the file (Kong's `hydrate_config_from_request`).
    let r = cp
        .request(Method::POST, "/config", Some(json!({ "config": SMALL })))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["_deltaplane"]["changes"], json!({}));
}

#[tokio::test]
async fn a_file_without_ids_keeps_its_ids() {
    let Some(cp) = TestCp::start(Backend::Sqlite).await else {
        return;
    };
    let file = r#"
_format_version: "3.0"
services:
- name: billing
  host: billing.test
  routes:
  - paths: [/unnamed]
- host: unnamed.test
consumers:
- custom_id: no-username
upstreams:
- name: u1
  targets:
  - target: 10.0.0.1:80
plugins:
- name: cors
"#;
    let first = post_config(&cp, "", file).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let ids = |body: &Value| -> Vec<String> {
        let mut ids: Vec<String> = body
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .flat_map(|(_, by_id)| by_id.as_object().unwrap().keys().cloned())
            .collect();
        ids.sort();
        ids
    };
    // Kong's rule for a named service: uuid5(uuid5(NS, "services"), "billing").
    assert!(first.body["services"]["aa93ac78-2b4d-59d0-9897-62a161ae6928"].is_object());
    let head = cp.head().await;
    let second = post_config(&cp, "", file).await;
    assert_eq!(second.status, StatusCode::CREATED);
    assert_eq!(ids(&first.body), ids(&second.body));
    assert_eq!(cp.head().await, head, "the second import changes nothing");
    // Emptied, then imported again: the same ids.
    import(&cp, "_format_version: \"3.0\"\n").await;
    assert_eq!(cp.get("/services").await.body["data"], json!([]));
    let third = post_config(&cp, "", file).await;
    assert_eq!(ids(&first.body), ids(&third.body));
}

/// A 5,000-entity file imported while a DP follows: the DP catches up with a delta. The version
/// is larger than the CP's recent-versions window keeps (4,096 deltas), so it is read from the
/// change log, and the window restarts after it: the next, one-delta import reaches the DP
/// as a delta too.
#[tokio::test]
async fn a_large_import_reaches_a_following_dp_as_a_delta() {
    let Some(cp) = TestCp::start(Backend::Sqlite).await else {
        return;
    };
    let dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let full_before = full_syncs(&dp);
    let file = generated_file(1000);
    let done = import(&cp, &file).await;
    let n: u64 = done["changes"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["created"].as_u64().unwrap())
        .sum();
    assert_eq!(n, 5000, "{done}");
    dp.converge(&cp, 60).await;
    assert_eq!(full_syncs(&dp), full_before, "a delta, not a full sync");
    // One service changed: one delta.
    let (head, _) = cp.head().await;
    let changed = file.replacen("host: svc-0.test", "host: svc-0b.test", 1);
    import(&cp, &changed).await;
    assert_eq!(deltas_after(&cp, head).await.len(), 1);
    dp.converge(&cp, 20).await;
    assert_eq!(full_syncs(&dp), full_before);
}

/// `n` groups of burst.yml's shapes: a service with a route and an ip-restriction plugin, an
/// upstream with a target: five entities each.
pub fn generated_file(n: usize) -> String {
    let mut out = String::from("_format_version: \"3.0\"\nservices:\n");
    for i in 0..n {
        out.push_str(&format!(
            "- name: svc-{i}\n  host: svc-{i}.test\n  port: 80\n  routes:\n  - name: route-{i}\n    \
             hosts: [r{i}.example.test]\n    paths: [/svc/{i}]\n    strip_path: true\n  plugins:\n  \
             - name: ip-restriction\n    config:\n      allow: [10.0.0.0/8]\n"
        ));
    }
    out.push_str("upstreams:\n");
    for i in 0..n {
        out.push_str(&format!(
            "- name: svc-{i}.test\n  targets:\n  - target: 10.1.{}.{}:80\n",
            i / 250,
            i % 250
        ));
    }
    out
}

fn cp_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
}

/// Runs a command off the runtime's threads (the control plane it talks to runs on them);
/// returns (exit code, stdout, stderr).
async fn run(cmd: &mut Command) -> (i32, String, String) {
    let mut owned = std::mem::replace(cmd, Command::new("true"));
    let out = tokio::task::spawn_blocking(move || owned.output())
        .await
        .unwrap()
        .expect("run deltaplane-cp");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_commands_as_a_process() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.yml");
    std::fs::write(&good, SMALL).unwrap();
    let bad = dir.path().join("bad.yml");
    std::fs::write(
        &bad,
        "_format_version: \"3.0\"\nservices:\n- name: a\n  host: a.test\n- name: b\n  port: eighty\n",
    )
    .unwrap();

    // validate: exit 0 / exit 1 with the problem and its line.
    let (code, out, err) = run(cp_bin().args(["config", "validate"]).arg(&good)).await;
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = run(cp_bin().args(["config", "validate"]).arg(&bad)).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(err.contains("line"), "no line number: {err}");

    // import through a running CP's Admin API.
    let db = TestDb::sqlite();
    let cfg = db.cp_config();
    let data_dir = cfg.data_dir.clone();
    let mut cp = TestCp::start_with(db, cfg).await;
    let (head, _) = cp.head().await;
    let admin = ["--admin-url", cp.base.as_str()];
    let (code, out, err) = run(cp_bin().args(["config", "import"]).arg(&good).args(admin)).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("services: 2 created, 0 updated, 0 deleted"),
        "{out}"
    );
    assert!(out.contains(&format!("version {}", head + 1)), "{out}");
    let (code, out, _) = run(cp_bin()
        .args(["config", "import", "--dry-run"])
        .arg(&good)
        .args(admin))
    .await;
    assert_eq!(code, 0);
    assert!(out.contains("no changes"), "{out}");
    // A bad file is refused before sending, with its line.
    let (code, _, err) = run(cp_bin().args(["config", "import"]).arg(&bad).args(admin)).await;
    assert_eq!(code, 1);
    assert!(err.contains("line"), "{err}");
    assert_eq!(cp.head().await.0, head + 1);

    // export to a file; an existing file is kept without --force.
    let out_file = dir.path().join("export.yml");
    let (code, out, err) = run(cp_bin()
        .args(["config", "export"])
        .arg(&out_file)
        .args(admin))
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let exported = std::fs::read_to_string(&out_file).unwrap();
    assert!(exported.contains("billing"), "{exported}");
    let (code, _, err) = run(cp_bin()
        .args(["config", "export"])
        .arg(&out_file)
        .args(admin))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("--force"), "{err}");
    let (code, _, _) = run(cp_bin()
        .args([
            "config", "export", "--force", "--format", "json", "--nested",
        ])
        .arg(&out_file)
        .args(admin))
    .await;
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert!(json["services"][0]["routes"].is_array(), "{json}");

    // The running CP holds its data dir: with its Admin API out of reach, the command refuses
    // to write the database behind its back.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (code, _, err) = run(cp_bin()
        .args(["config", "import", "--admin-url", &dead, "--data-dir"])
        .arg(&data_dir)
        .arg(&good))
    .await;
    assert_eq!(code, 1);
    assert!(err.contains("holds"), "{err}");
    // Stopped: the command writes the database itself.
    cp.cp.take().expect("running").shutdown().await;
    let changed = dir.path().join("changed.yml");
    std::fs::write(&changed, SMALL.replace("orders.test", "orders3.test")).unwrap();
    let (code, out, err) = run(cp_bin()
        .args(["config", "import", "--admin-url", &dead, "--data-dir"])
        .arg(&data_dir)
        .arg(&changed))
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("services: 0 created, 1 updated, 0 deleted"),
        "{out}"
    );
    assert!(err.contains("directly"), "{err}");
}
