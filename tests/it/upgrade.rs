//! A control plane of this release opening a database written by the previous one
//! (`tests/fixtures/previous-release/`), which stored any plugin name with an unvalidated
//! config. The rule (`cp::store::revalidate`): a stored entity that validates is completed by
//! the current schema (new defaults filled); one that does not is disabled when it was enabled,
//! and named in `GET /` and the log; a plugin this node does not accept is served as stored and
//! named too. Data planes take the whole configuration.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestCp, TestDb};

/// A SQLite test database whose control plane's data dir holds the fixture.
fn old_database() -> TestDb {
    let db = TestDb::sqlite();
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/previous-release/deltaplane.db");
    let data_dir = db.cp_config().data_dir;
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::copy(fixture, data_dir.join("deltaplane.db")).expect("copy the fixture");
    db
}

async fn plugin(cp: &TestCp, name: &str) -> Value {
    let all = cp.get("/plugins").await;
    all.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no {name}: {all:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_of_the_previous_release_keeps_syncing() {
    let db = old_database();
    let cfg = db.cp_config();
    let cp = TestCp::start_with(db, cfg.clone()).await;

    // prometheus was stored with config {}: now completed with Kong's defaults.
    let prometheus = plugin(&cp, "prometheus").await;
    assert_eq!(prometheus["config"]["per_consumer"], false, "{prometheus}");
    assert_eq!(prometheus["enabled"], true);
    // http-log with config {} lacks its required endpoint: disabled, and named.
    let http_log = plugin(&cp, "http-log").await;
    assert_eq!(http_log["enabled"], false, "{http_log}");
    let root = cp.get("/").await.body;
    let invalid = root["deltaplane_invalid_in_store"].as_array().unwrap();
    assert_eq!(invalid.len(), 2, "{root}");
    let named = |n: &str| invalid.iter().find(|i| i["name"] == n).unwrap().clone();
    assert_eq!(named("http-log")["disabled"], true);
    assert!(
        named("http-log")["errors"]["config"]["http_endpoint"].is_string(),
        "{root}"
    );
    // The unknown plugin is kept as stored but disabled (no data plane can run it), and named.
    assert_eq!(named("no-such-plugin")["disabled"], true);
    assert_eq!(
        root["plugins"]["deltaplane_not_enabled_in_cluster"],
        json!(["no-such-plugin"])
    );
    let unknown = plugin(&cp, "no-such-plugin").await;
    assert_eq!(unknown["config"], json!({"x": 1}));
    assert_eq!(unknown["enabled"], false);

    // A data plane takes all of it, at the CP's version and state hash.
    let dp = cp.start_dp().await;
    dp.converge(&cp, 30).await;
    assert_eq!(dp.shared().link().last_error, None);

    // Fixing the plugin is an ordinary update.
    let id = http_log["id"].as_str().unwrap();
    let r = cp
        .patch(
            &format!("/plugins/{id}"),
            json!({"enabled": true, "config": {"http_endpoint": "http://logs.internal/x"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    dp.converge(&cp, 30).await;

    // The next start with the same schemas validates nothing again: no new version.
    let head = cp.head().await;
    let db = cp.db;
    cp.cp.unwrap().shutdown().await;
    let cp = TestCp::start_with(db, cfg).await;
    assert_eq!(cp.head().await, head);
    assert_eq!(
        cp.get("/").await.body["deltaplane_invalid_in_store"],
        json!([])
    );
    cp.shutdown().await;
}
