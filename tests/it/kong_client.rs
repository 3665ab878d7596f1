//! A Kong client's flows end to end against the control plane, as decK, Kong's Terraform
//! provider or a client library runs them: the token in `Kong-Admin-Token`, schema discovery,
//! foreign keys by name, a gRPC route, credentials deleted twice, a certificate uploaded as
//! `curl -F` does, and a data plane that applies the result.
//!
//! Kong's behaviour is the reference: `kong/api/routes/kong.lua` (schemas, endpoints),
//! `kong/db/dao/init.lua` (`resolve_foreign`), `kong/db/schema/entities/routes_subschemas.lua`,
//! `kong/api/endpoints.lua` (`delete_entity_endpoint`), `kong/api/routes/certificates.lua`,
//! `kong/plugins/key-auth/schema.lua` (`consumer = typedefs.no_consumer`).

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::both_backends;
use crate::harness::{TestCp, TestDb, cert_and_key};

const TOKEN: &str = "deck-token";

/// A control plane guarded by a token, with a client that sends it as decK does.
async fn guarded_cp(backend: crate::harness::Backend) -> Option<TestCp> {
    let db = TestDb::new(backend).await?;
    let mut cfg = db.cp_config();
    cfg.admin_token = Some(TOKEN.into());
    let mut cp = TestCp::start_with(db, cfg).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Kong-Admin-Token", TOKEN.parse().unwrap());
    cp.client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    Some(cp)
}

both_backends!(kong_client_flows, |b| async move {
    let Some(cp) = guarded_cp(b).await else {
        return;
    };

    // Discovery: the paths, and every plugin's schema the registry knows.
    let r = cp.get("/endpoints").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let mut n_plugins = 0;
    for plugin in deltaplane::schema::Registry::builtin().plugins() {
        let r = cp.get(&format!("/schemas/plugins/{}", plugin.name)).await;
        assert_eq!(r.status, StatusCode::OK, "{}: {r:?}", plugin.name);
        let config = r.body["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|f| f.get("config"))
            .unwrap_or_else(|| panic!("{}: no config", plugin.name));
        assert_eq!(config["type"], "record", "{}", plugin.name);
        assert_eq!(
            config["fields"].as_array().unwrap().len(),
            plugin.config.fields.as_ref().map_or(0, Vec::len),
            "{}",
            plugin.name
        );
        n_plugins += 1;
    }
    assert!(n_plugins >= 6);

    // Entities that name each other by name, as a declarative tool writes them.
    cp.create(
        "/services",
        json!({"name": "billing", "url": "http://billing.internal"}),
    )
    .await;
    let alice = cp.create("/consumers", json!({"username": "alice"})).await;
    // key-auth cannot be scoped to a consumer (`no_consumer`): the username resolves, and the
    // plugin's own rule refuses it, as Kong does.
    let r = cp
        .post(
            "/plugins",
            json!({"name": "key-auth", "consumer": {"username": "alice"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(
        r.body["code"], 2,
        "resolved, then a schema violation: {r:?}"
    );
    assert_eq!(r.body["fields"]["consumer"], "value must be null");
    let r = cp
        .post(
            "/plugins",
            json!({"name": "key-auth", "consumer": {"username": "nobody"}}),
        )
        .await;
    assert_eq!(r.body["code"], 13, "{r:?}");
    let p = cp
        .create(
            "/plugins",
            json!({"name": "rate-limiting", "consumer": {"username": "alice"},
                   "service": {"name": "billing"}, "config": {"minute": 10}}),
        )
        .await;
    assert_eq!(p["consumer"]["id"], alice["id"]);
    cp.create(
        "/plugins",
        json!({"name": "key-auth", "service": {"name": "billing"}}),
    )
    .await;

    // A gRPC route: strip_path defaults to false for grpc/grpcs.
    let route = cp
        .create(
            "/routes",
            json!({"name": "grpc", "protocols": ["grpc", "grpcs"], "paths": ["/pkg.Billing/"],
                   "service": {"name": "billing"}}),
        )
        .await;
    assert_eq!(route["strip_path"], false);

    // Credentials: the second delete of the same one is 404 on the nested path.
    let key = cp
        .create("/consumers/alice/key-auth", json!({"key": "k-1"}))
        .await;
    let path = format!("/consumers/alice/key-auth/{}", key["id"].as_str().unwrap());
    assert_eq!(cp.delete(&path).await.status, StatusCode::NO_CONTENT);
    assert_eq!(cp.delete(&path).await.status, StatusCode::NOT_FOUND);

    // A certificate uploaded with `curl -F cert=@cert.pem -F key=@key.pem -F snis=...`.
    let (cert, key) = cert_and_key("billing.test");
    let r = cp
        .multipart(
            Method::POST,
            "/certificates",
            &[
                ("cert", Some("cert.pem"), &cert),
                ("key", Some("key.pem"), &key),
                ("snis[]", None, "billing.test"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = cp.get("/certificates/billing.test").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["snis"], json!(["billing.test"]));

    // Everything above is valid for a data plane too.
    let mut dp = cp.start_dp().await;
    dp.converge(&cp, 30).await;
    dp.stop().await;

    // Without the token, nothing.
    let r = reqwest::get(format!("{}/endpoints", cp.base))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    cp.shutdown().await;
});
