//! Which plugins a control plane accepts (`--plugins`, Kong's `plugins` setting) and how it
//! refuses the others (`subschema_error` in `kong/db/schema/entities/plugins.lua`).

use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{Backend, TestCp, TestDb};

const NOT_ENABLED: &str =
    "plugin 'no-such-plugin' not enabled; add it to the 'plugins' configuration property";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_plugins_are_refused_as_kong_refuses_them() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let r = cp.post("/plugins", json!({"name": "no-such-plugin"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(r.body["code"], 2, "{r:?}");
    assert_eq!(r.body["name"], "schema violation");
    assert_eq!(r.body["fields"]["name"], NOT_ENABLED, "{r:?}");
    assert_eq!(
        r.body["message"],
        format!("schema violation (name: {NOT_ENABLED})")
    );
    // A form body too, and nested under a service.
    let r = cp.post_form("/plugins", "name=no-such-plugin").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    cp.create("/services", json!({"name": "s", "host": "example.com"}))
        .await;
    let r = cp
        .post("/services/s/plugins", json!({"name": "no-such-plugin"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    // Bundled plugins are enabled by default.
    cp.create("/plugins", json!({"name": "cors"})).await;
    let enabled = cp.get("/plugins/enabled").await;
    let list = enabled.body["enabled_plugins"].as_array().unwrap();
    assert!(list.iter().any(|p| p == "cors") && list.iter().any(|p| p == "key-auth"));
    assert!(!list.iter().any(|p| p == "no-such-plugin"));
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plugins_setting_limits_what_is_accepted() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.plugins = vec!["key-auth".into()];
    let cp = TestCp::start_with(db, cfg).await;
    cp.create("/plugins", json!({"name": "key-auth"})).await;
    let r = cp.post("/plugins", json!({"name": "cors"})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(
        r.body["fields"]["name"],
        "plugin 'cors' not enabled; add it to the 'plugins' configuration property"
    );
    let enabled = cp.get("/plugins/enabled").await;
    assert_eq!(enabled.body, json!({"enabled_plugins": ["key-auth"]}));
    cp.shutdown().await;

    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.plugins = vec!["bundled".into(), "nope".into()];
    let e = match deltaplane::cp::start(cfg).await {
        Ok(_) => panic!("started with an unknown plugin"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("'nope' is not a plugin"), "{e}");
}

/// `GET /` as Kong's (`kong/api/routes/kong.lua`): every loaded plugin with its handler's
/// version and priority, and the plugins the configuration uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_lists_plugins_as_kong_does() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    cp.create("/plugins", json!({"name": "cors"})).await;
    let root = cp.get("/").await;
    let plugins = &root.body["plugins"];
    assert_eq!(
        plugins["available_on_server"]["key-auth"],
        json!({"version": "3.10.0", "priority": 1250}),
        "{root:?}"
    );
    assert_eq!(
        plugins["available_on_server"]["cors"],
        json!({"version": "3.10.0", "priority": 2000})
    );
    assert_eq!(
        plugins["available_on_server"].as_object().unwrap().len(),
        45
    );
    assert_eq!(plugins["enabled_in_cluster"], json!(["cors"]));
    assert_eq!(plugins["deltaplane_not_enabled_in_cluster"], json!([]));
    cp.shutdown().await;
}
