//! Admin API behaviour through HTTP, on both backends.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{Backend, TestCp, ca_cert, cert_and_key};

async fn cp(backend: Backend) -> Option<TestCp> {
    TestCp::start(backend).await
}

both_backends!(node_info_and_status, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let r = cp.get("/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["version"], "3.10.0");
    assert_eq!(r.body["role"], "control_plane");
    assert!(r.body["deltaplane_version"].is_string());
    assert_eq!(r.body["node_id"].as_str().unwrap().len(), 36);
    assert!(r.body["hostname"].is_string());
    let s = cp.get("/status").await;
    assert_eq!(s.status, StatusCode::OK);
    assert_eq!(s.body["database"]["reachable"], true);
    assert_eq!(
        s.body["configuration"]["version"], 1,
        "the default workspace is version 1"
    );
    cp.shutdown().await;
});

both_backends!(service_crud_with_kong_shapes, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let svc = cp
        .create(
            "/services",
            json!({"name": "billing", "url": "https://billing.internal:8443/v1", "tags": ["a"]}),
        )
        .await;
    assert_eq!(svc["protocol"], "https");
    assert_eq!(svc["host"], "billing.internal");
    assert_eq!(svc["port"], 8443);
    assert_eq!(svc["path"], "/v1");
    assert_eq!(svc["retries"], 5);
    assert_eq!(svc["connect_timeout"], 60000);
    assert_eq!(svc["enabled"], true);
    assert!(
        svc["client_certificate"].is_null(),
        "unset fields are null, as Kong shows them"
    );
    assert!(
        svc["created_at"].as_i64().unwrap() > 1_600_000_000,
        "timestamps in seconds"
    );
    let id = svc["id"].as_str().unwrap().to_owned();

    // By id and by endpoint key.
    assert_eq!(cp.get(&format!("/services/{id}")).await.body, svc);
    assert_eq!(cp.get("/services/billing").await.body["id"], id.as_str());

    let r = cp.patch("/services/billing", json!({"retries": 7})).await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["retries"], 7);
    assert_eq!(r.body["host"], "billing.internal");
    assert_eq!(r.body["created_at"], svc["created_at"]);

    // PUT replaces: fields not given go back to defaults.
    let r = cp
        .put(
            &format!("/services/{id}"),
            json!({"name": "billing", "host": "b2.internal"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["retries"], 5);
    assert_eq!(r.body["protocol"], "http");
    assert_eq!(r.body["id"], id.as_str());

    // PUT by endpoint key creates.
    let r = cp
        .put("/services/other", json!({"host": "o.internal"}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["name"], "other");

    assert_eq!(
        cp.delete("/services/other").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        cp.get("/services/other").await.status,
        StatusCode::NOT_FOUND
    );
    // Deleting what is not there is still 204, as in Kong.
    assert_eq!(
        cp.delete("/services/other").await.status,
        StatusCode::NO_CONTENT
    );
    cp.shutdown().await;
});

both_backends!(schema_violations_report_every_field, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let r = cp
        .post(
            "/services",
            json!({"port": "eighty", "protocol": "gopher", "bogus": 1}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], 2);
    assert_eq!(r.body["name"], "schema violation");
    let fields = &r.body["fields"];
    assert_eq!(fields["host"], "required field missing");
    assert_eq!(fields["port"], "expected an integer");
    assert!(
        fields["protocol"]
            .as_str()
            .unwrap()
            .starts_with("expected one of:")
    );
    assert_eq!(fields["bogus"], "unknown field");
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .starts_with("4 schema violations ("),
        "{}",
        r.body["message"]
    );

    let r = cp.post("/routes", json!({"protocols": ["http"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.body["fields"]["@entity"].is_array(), "{r:?}");

    // Nothing of a rejected write reached the change log.
    let v = cp.store().version_info().await.unwrap();
    assert_eq!(v.version, 1);
    cp.shutdown().await;
});

both_backends!(unique_and_foreign_key_violations, |b| async move {
    let Some(cp) = cp(b).await else { return };
    cp.create("/services", json!({"name": "s1", "host": "a.test"}))
        .await;
    let r = cp
        .post("/services", json!({"name": "s1", "host": "b.test"}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.body["code"], 5);
    assert_eq!(r.body["fields"]["name"], "s1");
    assert_eq!(
        r.body["message"],
        "UNIQUE violation detected on '{name=\"s1\"}'"
    );

    let missing = uuid::Uuid::new_v4().to_string();
    let r = cp
        .post(
            "/routes",
            json!({"paths": ["/x"], "service": {"id": missing}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], 4);
    assert_eq!(r.body["fields"]["service"]["id"], missing.as_str());

    // A service referenced by a route cannot be deleted.
    cp.create(
        "/services/s1/routes",
        json!({"name": "r1", "paths": ["/x"]}),
    )
    .await;
    let r = cp.delete("/services/s1").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(r.body["code"], 4);
    assert_eq!(
        r.body["message"],
        "an existing 'routes' entity references this 'services' entity"
    );
    assert_eq!(cp.get("/services/s1").await.status, StatusCode::OK);

    // A second plugin with the same name and scope is a conflict (cache key).
    cp.create("/services/s1/plugins", json!({"name": "key-auth"}))
        .await;
    let r = cp
        .post("/services/s1/plugins", json!({"name": "key-auth"}))
        .await;
    assert_eq!(r.status, StatusCode::CONFLICT, "{r:?}");
    // Same name on another scope is fine.
    cp.create("/plugins", json!({"name": "key-auth"})).await;
    cp.shutdown().await;
});

both_backends!(nested_collections, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let svc = cp
        .create("/services", json!({"name": "s", "host": "s.test"}))
        .await;
    let route = cp
        .create("/services/s/routes", json!({"name": "r", "paths": ["/r"]}))
        .await;
    assert_eq!(route["service"]["id"], svc["id"]);
    cp.create("/routes", json!({"name": "other", "paths": ["/o"]}))
        .await;

    let list = cp.get("/services/s/routes").await;
    assert_eq!(list.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(cp.get("/routes/r/service").await.body["id"], svc["id"]);
    assert_eq!(cp.get("/services/s/routes/r").await.status, StatusCode::OK);
    assert_eq!(
        cp.get("/services/s/routes/other").await.status,
        StatusCode::NOT_FOUND
    );
    let r = cp.patch("/routes/r/service", json!({"retries": 1})).await;
    assert_eq!(r.body["retries"], 1, "{r:?}");

    cp.create("/routes/r/plugins", json!({"name": "cors"}))
        .await;
    assert_eq!(
        cp.get("/routes/r/plugins").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let consumer = cp.create("/consumers", json!({"username": "alice"})).await;
    let ka = cp.create("/consumers/alice/key-auth", json!({})).await;
    assert_eq!(ka["consumer"]["id"], consumer["id"]);
    assert!(
        ka["key"].as_str().unwrap().len() >= 32,
        "a key is generated: {ka}"
    );
    let ka2 = cp
        .create("/consumers/alice/key-auth", json!({"key": "secret-1"}))
        .await;
    assert_eq!(cp.get("/key-auths/secret-1").await.body["id"], ka2["id"]);
    let ba = cp
        .create(
            "/consumers/alice/basic-auth",
            json!({"username": "al", "password": "pw"}),
        )
        .await;
    assert_ne!(
        ba["password"], "pw",
        "basic-auth passwords are stored hashed"
    );
    let jwt = cp.create("/consumers/alice/jwt", json!({})).await;
    assert_eq!(jwt["algorithm"], "HS256");
    assert!(jwt["secret"].is_string());
    cp.create("/consumers/alice/acls", json!({"group": "admins"}))
        .await;
    assert_eq!(
        cp.get("/consumers/alice/acls/admins").await.status,
        StatusCode::OK
    );
    cp.create(
        "/consumers/alice/plugins",
        json!({"name": "rate-limiting", "config": {"minute": 5}}),
    )
    .await;
    for path in [
        "/consumers/alice/key-auth",
        "/consumers/alice/basic-auth",
        "/consumers/alice/jwt",
        "/consumers/alice/acls",
        "/consumers/alice/plugins",
    ] {
        assert!(
            !cp.get(path).await.body["data"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{path}"
        );
    }
    for path in ["/key-auths", "/basic-auths", "/jwts", "/acls"] {
        assert!(
            !cp.get(path).await.body["data"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{path}"
        );
    }

    // Deleting the consumer cascades to its credentials and plugins, in one version.
    let before = cp.store().version_info().await.unwrap().version;
    assert_eq!(
        cp.delete("/consumers/alice").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(cp.store().version_info().await.unwrap().version, before + 1);
    for path in ["/key-auths", "/basic-auths", "/jwts", "/acls"] {
        assert!(
            cp.get(path).await.body["data"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{path}"
        );
    }
    assert_eq!(
        cp.get("/plugins").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "only the route's plugin is left"
    );

    let up = cp.create("/upstreams", json!({"name": "up.svc"})).await;
    assert_eq!(
        up["healthchecks"]["active"]["healthy"]["interval"], 0,
        "nested record defaults: {up}"
    );
    let t = cp
        .create("/upstreams/up.svc/targets", json!({"target": "10.0.0.1"}))
        .await;
    assert_eq!(t["target"], "10.0.0.1:8000");
    assert_eq!(t["weight"], 100);
    assert_eq!(
        cp.get("/upstreams/up.svc/targets").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    cp.shutdown().await;
});

both_backends!(certificates_snis_and_ca_certificates, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let (cert, key) = cert_and_key("a.test");
    let c = cp
        .create(
            "/certificates",
            json!({"cert": cert, "key": key, "snis": ["a.test", "b.test"]}),
        )
        .await;
    assert_eq!(c["snis"], json!(["a.test", "b.test"]));
    let id = c["id"].as_str().unwrap();
    assert_eq!(
        cp.get("/snis").await.body["data"].as_array().unwrap().len(),
        2
    );
    assert_eq!(
        cp.get(&format!("/certificates/{id}/snis")).await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        cp.get(&format!("/certificates/{id}")).await.body["snis"],
        json!(["a.test", "b.test"])
    );
    let r = cp
        .patch(
            &format!("/certificates/{id}"),
            json!({"snis": ["b.test", "c.test"]}),
        )
        .await;
    assert_eq!(r.body["snis"], json!(["b.test", "c.test"]), "{r:?}");
    assert_eq!(cp.get("/snis/a.test").await.status, StatusCode::NOT_FOUND);

    // A key that does not match its certificate is refused.
    let (_, other_key) = cert_and_key("x.test");
    let r = cp
        .post("/certificates", json!({"cert": cert, "key": other_key}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert!(
        r.body["fields"]["@entity"]
            .to_string()
            .contains("does not match"),
        "{r:?}"
    );
    let r = cp
        .post("/certificates", json!({"cert": "not a cert", "key": key}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);

    // Deleting the certificate takes its snis along.
    assert_eq!(
        cp.delete(&format!("/certificates/{id}")).await.status,
        StatusCode::NO_CONTENT
    );
    assert!(
        cp.get("/snis").await.body["data"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let ca = cp
        .create("/ca_certificates", json!({"cert": ca_cert("Test CA")}))
        .await;
    assert_eq!(ca["cert_digest"].as_str().unwrap().len(), 64);
    let r = cp
        .post(
            "/ca_certificates",
            json!({"cert": cert_and_key("leaf.test").0}),
        )
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "a leaf is not a CA: {r:?}"
    );
    let svc = cp
        .create(
            "/services",
            json!({"name": "tls", "url": "https://x.test", "ca_certificates": [ca["id"]]}),
        )
        .await;
    assert_eq!(svc["ca_certificates"], json!([ca["id"]]));
    let r = cp
        .delete(&format!("/ca_certificates/{}", ca["id"].as_str().unwrap()))
        .await;
    assert_eq!(
        r.status,
        StatusCode::BAD_REQUEST,
        "still referenced by a service: {r:?}"
    );
    cp.shutdown().await;
});

both_backends!(form_bodies_follow_kong_conventions, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let r = cp
        .post_form(
            "/services",
            "name=f&host=f.test&port=8080&retries=2&tags[]=x&tags[]=y",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["port"], 8080);
    assert_eq!(r.body["tags"], json!(["x", "y"]));
    let r = cp
        .post_form(
            "/services/f/routes",
            "paths=/a&paths=/b&strip_path=false&methods=GET",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["paths"], json!(["/a", "/b"]));
    assert_eq!(r.body["strip_path"], false);
    assert_eq!(r.body["methods"], json!(["GET"]));
    let r = cp
        .post_form(
            "/plugins",
            "name=rate-limiting&config.minute=10&config.policy=local",
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["config"]["minute"], 10);
    let r = cp
        .post_form("/services", "name=g&host=g.test&port=notanumber")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["fields"]["port"], "expected an integer");
    cp.shutdown().await;
});

/// POSTs a 5 MiB body (over the 4 MiB limit) on a raw connection and returns the status.
/// The server may answer 413 and close before it has read the body, so the body is written
/// concurrently with reading the answer and a failed write is expected (an HTTP client that
/// waits for its write to finish first sees a reset instead of the answer).
async fn oversized_post(cp: &TestCp) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr = cp.base.trim_start_matches("http://").to_owned();
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    let len = 5 * 1024 * 1024;
    let head = format!(
        "POST /services HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {len}\r\n\r\n"
    );
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&vec![b' '; len]).await
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), rd.read(&mut buf))
            .await
            .expect("an answer in time")
            .unwrap();
        assert!(
            n > 0,
            "closed without an answer: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&buf[..n]);
    }
    writer.abort();
    let line = String::from_utf8_lossy(&answer);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

both_backends!(transport_errors, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let r = cp
        .raw(Method::POST, "/services", "application/json", "{\"name\": ")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["message"], "Cannot parse JSON body");
    // JSON, but not an object.
    for body in ["[]", "\"x\"", "5", "null"] {
        let r = cp
            .raw(Method::POST, "/services", "application/json", body)
            .await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(
            r.body["message"], "Cannot parse JSON body: expected a JSON object",
            "{body}"
        );
    }
    let r = cp
        .raw(Method::POST, "/services", "text/plain", "name=x")
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(oversized_post(&cp).await, 413);
    assert_eq!(cp.get("/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(cp.get("/nope").await.body["message"], "Not found");
    assert_eq!(
        cp.get("/services/not-there").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        cp.request(Method::DELETE, "/services", None).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        cp.request(Method::POST, "/", None).await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        cp.get("/services/x/bogus").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        cp.get("/workspaces").await.status,
        StatusCode::NOT_FOUND,
        "no workspace paths in open-source Kong"
    );
    // No internal detail leaks in errors.
    let r = cp
        .post("/services", json!({"name": "é\u{0}", "host": "x.test"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    let text = r.body.to_string().to_lowercase();
    assert!(!text.contains("sql") && !text.contains("/tmp"), "{text}");
    cp.shutdown().await;
});

both_backends!(pagination_and_tags, |b| async move {
    let Some(cp) = cp(b).await else { return };
    for i in 0..25 {
        let tags = if i % 2 == 0 {
            json!(["even", "all"])
        } else {
            json!(["odd", "all"])
        };
        cp.create(
            "/consumers",
            json!({"username": format!("u{i}"), "tags": tags}),
        )
        .await;
    }
    let mut seen = Vec::new();
    let mut path = "/consumers?size=10".to_owned();
    loop {
        let r = cp.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{r:?}");
        for e in r.body["data"].as_array().unwrap() {
            seen.push(e["username"].as_str().unwrap().to_owned());
        }
        match r.body["next"].as_str() {
            Some(next) => {
                assert!(r.body["offset"].is_string());
                path = next.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 25);
    assert_eq!(
        cp.get("/consumers?tags=even").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        13
    );
    assert_eq!(
        cp.get("/consumers?tags=even,all").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        13
    );
    assert_eq!(
        cp.get("/consumers?tags=even,odd").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    assert_eq!(
        cp.get("/consumers?tags=even/odd").await.body["data"]
            .as_array()
            .unwrap()
            .len(),
        25
    );
    assert_eq!(
        cp.get("/consumers?size=0").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        cp.get("/consumers?size=1001").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        cp.get("/consumers?offset=garbage!").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        cp.get("/consumers?tags=a,b/c").await.status,
        StatusCode::BAD_REQUEST
    );
    cp.shutdown().await;
});

both_backends!(pagination_during_concurrent_writes, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let mut stable = Vec::new();
    for i in 0..60 {
        let c = cp
            .create("/consumers", json!({"username": format!("stable{i}")}))
            .await;
        stable.push(c["id"].as_str().unwrap().to_owned());
    }
    let writer = {
        let base = cp.base.clone();
        tokio::spawn(async move {
            let client = reqwest::Client::new();
            for i in 0..60 {
                let _ = client
                    .post(format!("{base}/consumers"))
                    .json(&json!({"username": format!("churn{i}")}))
                    .send()
                    .await;
                let _ = client
                    .delete(format!("{base}/consumers/churn{}", i / 2))
                    .send()
                    .await;
            }
        })
    };
    let mut seen = Vec::new();
    let mut path = "/consumers?size=7".to_owned();
    loop {
        let r = cp.get(&path).await;
        for e in r.body["data"].as_array().unwrap() {
            seen.push(e["id"].as_str().unwrap().to_owned());
        }
        tokio::task::yield_now().await;
        match r.body["next"].as_str() {
            Some(next) => path = next.to_owned(),
            None => break,
        }
    }
    writer.await.unwrap();
    for id in &stable {
        assert_eq!(
            seen.iter().filter(|s| *s == id).count(),
            1,
            "every row that existed throughout appears exactly once"
        );
    }
    let mut dedup = seen.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), seen.len(), "no row twice");
    cp.shutdown().await;
});

both_backends!(noop_patch_creates_no_version, |b| async move {
    let Some(cp) = cp(b).await else { return };
    cp.create("/services", json!({"name": "n", "host": "n.test"}))
        .await;
    let v1 = cp.store().version_info().await.unwrap().version;
    let r = cp.patch("/services/n", json!({"host": "n.test"})).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(cp.store().version_info().await.unwrap().version, v1);
    cp.patch("/services/n", json!({"host": "m.test"})).await;
    assert_eq!(cp.store().version_info().await.unwrap().version, v1 + 1);
    cp.shutdown().await;
});

both_backends!(route_rules, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let r = cp
        .post("/routes", json!({"protocols": ["tcp"], "paths": ["/x"]}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    let r = cp
        .post(
            "/routes",
            json!({"protocols": ["tcp"], "destinations": [{"port": 80}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    let r = cp.post("/routes", json!({"paths": ["no-slash"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    let r = cp
        .post(
            "/routes",
            json!({"hosts": ["example.com"], "headers": {"x-v": ["1"]}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["strip_path"], true);
    assert_eq!(r.body["path_handling"], "v0");
    assert_eq!(r.body["https_redirect_status_code"], 426);
    cp.shutdown().await;
});

#[tokio::test]
async fn admin_token_guards_every_request() {
    let db = crate::harness::TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.admin_token = Some("s3cret".into());
    let cp = TestCp::start_with(db, cfg).await;
    assert_eq!(cp.get("/").await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(cp.get("/services").await.status, StatusCode::UNAUTHORIZED);
    let r = cp
        .client
        .get(format!("{}/services", cp.base))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = cp
        .client
        .get(format!("{}/services", cp.base))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // decK and Kong's clients send the token in `Kong-Admin-Token`.
    let with_header = |value: &'static str| {
        cp.client
            .get(format!("{}/services", cp.base))
            .header("Kong-Admin-Token", value)
            .send()
    };
    assert_eq!(
        with_header("s3cret").await.unwrap().status(),
        StatusCode::OK
    );
    let r = with_header("wrong").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The refusal says how to send the token.
    let body: serde_json::Value = r.json().await.unwrap();
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains("Authorization: Bearer") && msg.contains("Kong-Admin-Token"),
        "{msg}"
    );
    // The operator JSON-RPC on the same listener is guarded too.
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "deltaplane.sync_version"});
    let rpc = format!("{}/rpc", cp.base);
    let r = cp.client.post(&rpc).json(&call).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = cp
        .client
        .post(&rpc)
        .bearer_auth("s3cret")
        .json(&call)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let answer: serde_json::Value = r.json().await.unwrap();
    assert!(
        answer["result"]["version"].as_i64().unwrap() >= 1,
        "{answer}"
    );
    // And `deltaplane-cp status` passes the token.
    assert!(
        deltaplane::net::operator::call(&rpc, Some("s3cret"), "deltaplane.sync_version", None)
            .await
            .is_ok()
    );
    assert!(
        deltaplane::net::operator::call(&rpc, None, "deltaplane.sync_version", None)
            .await
            .is_err()
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn non_loopback_admin_needs_token_or_insecure() {
    let db = crate::harness::TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.admin_listen = "0.0.0.0:0".parse().unwrap();
    let err = deltaplane::cp::start(cfg.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("--admin-token"), "{err}");
    cfg.admin_insecure = true;
    let running = deltaplane::cp::start(cfg)
        .await
        .expect("allowed with --admin-insecure");
    running.shutdown().await;
}

#[tokio::test]
async fn unreachable_database_fails_fast_with_503() {
    // A port nothing listens on: the pool cannot connect, and startup says so quickly.
    let db = crate::harness::TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.database_url = Some("postgres://postgres@127.0.0.1:1/none".into());
    cfg.database_timeout = std::time::Duration::from_millis(500);
    let started = std::time::Instant::now();
    let err = deltaplane::cp::start(cfg).await.err().expect("no database");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    assert!(err.to_string().contains("database"), "{err}");
}

/// PostgreSQL stops accepting connections under a running CP: writes fail fast with 503 and
/// write nothing; once it accepts again the CP recovers by itself and versions stay gap-free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_503_then_recovers() {
    let Some(db) = crate::harness::TestDb::postgres().await else {
        return;
    };
    let admin_url = std::env::var(crate::harness::PG_ENV).unwrap();
    let name = db.url.rsplit_once('/').unwrap().1.to_owned();
    let mut cfg = db.cp_config();
    cfg.database_timeout = std::time::Duration::from_secs(1);
    let cp = TestCp::start_with(db, cfg).await;
    cp.create("/services", json!({"name": "before", "host": "a.test"}))
        .await;

    let admin = sqlx::PgPool::connect(&admin_url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
    )))
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&admin)
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let r = cp
        .post("/services", json!({"name": "during", "host": "b.test"}))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{r:?}");
    assert!(
        r.body["message"].as_str().unwrap().contains("not applied"),
        "{r:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "fails fast: {:?}",
        started.elapsed()
    );
    let r = cp.get("/services").await;
    assert!(r.status.is_server_error(), "{r:?}");

    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await
    .unwrap();
    admin.close().await;
    let mut recovered = None;
    for _ in 0..50 {
        let r = cp
            .post("/services", json!({"name": "after", "host": "c.test"}))
            .await;
        if r.status == StatusCode::CREATED {
            recovered = Some(r);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(recovered.is_some(), "the CP recovers by itself");
    assert_eq!(
        cp.get("/services/during").await.status,
        StatusCode::NOT_FOUND,
        "nothing half-written"
    );
    let info = cp.store().version_info().await.unwrap();
    assert_eq!(info.version, 3, "workspace, before, after: no gap");
    cp.shutdown().await;
}

// A nested DELETE of a child that is gone, or that belongs to another parent, is 404; Kong's
// `delete_entity_endpoint` (`kong/api/endpoints.lua`) selects the parent, then the child, and
// compares the child's foreign key before deleting. A top-level DELETE stays 204.
both_backends!(nested_delete_of_missing_child_is_404, |b| async move {
    let Some(cp) = cp(b).await else { return };
    cp.create("/consumers", json!({"username": "alice"})).await;
    cp.create("/consumers", json!({"username": "bob"})).await;
    let ka = cp.create("/consumers/alice/key-auth", json!({})).await;
    let jwt = cp.create("/consumers/alice/jwt", json!({})).await;
    let bobs = cp.create("/consumers/bob/key-auth", json!({})).await;
    for (path, id) in [("key-auth", &ka["id"]), ("jwt", &jwt["id"])] {
        let id = id.as_str().unwrap();
        let nested = format!("/consumers/alice/{path}/{id}");
        assert_eq!(cp.delete(&nested).await.status, StatusCode::NO_CONTENT);
        let r = cp.delete(&nested).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{nested} again: {r:?}");
        assert_eq!(r.body["message"], "Not found");
    }
    // Another consumer's credential is not alice's to delete, and stays.
    let other = format!("/consumers/alice/key-auth/{}", bobs["id"].as_str().unwrap());
    assert_eq!(cp.delete(&other).await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        cp.get(&format!("/key-auths/{}", bobs["id"].as_str().unwrap()))
            .await
            .status,
        StatusCode::OK
    );
    // An absent parent is 404 too.
    let r = cp
        .delete(&format!(
            "/consumers/carol/key-auth/{}",
            bobs["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // A many-to-one path never deletes the parent (405 when set, 404 when unset).
    cp.create("/services", json!({"name": "s", "host": "s.test"}))
        .await;
    cp.create("/services/s/routes", json!({"name": "r", "paths": ["/r"]}))
        .await;
    cp.create("/routes", json!({"name": "lone", "paths": ["/l"]}))
        .await;
    assert_eq!(
        cp.delete("/routes/r/service").await.status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(cp.get("/services/s").await.status, StatusCode::OK);
    assert_eq!(
        cp.delete("/routes/lone/service").await.status,
        StatusCode::NOT_FOUND
    );
    // Top-level DELETE of something absent stays 204, as in Kong.
    let gone = format!("/key-auths/{}", ka["id"].as_str().unwrap());
    assert_eq!(cp.delete(&gone).await.status, StatusCode::NO_CONTENT);
    cp.shutdown().await;
});

// A foreign key may name its entity by any unique field of it: Kong's `resolve_foreign`
// (`kong/db/dao/init.lua`) on insert, update and upsert, and `foreign_keys_unresolved`
// (`kong/db/errors.lua`, code 13) when nothing matches.
both_backends!(foreign_keys_by_unique_field, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let billing = cp
        .create("/services", json!({"name": "billing", "host": "b.test"}))
        .await;
    let other = cp
        .create("/services", json!({"name": "other", "host": "o.test"}))
        .await;
    let alice = cp
        .create(
            "/consumers",
            json!({"username": "alice", "custom_id": "c-1"}),
        )
        .await;

    // Insert, by JSON and by form field.
    let r = cp
        .create(
            "/routes",
            json!({"name": "r", "paths": ["/r"], "service": {"name": "billing"}}),
        )
        .await;
    assert_eq!(r["service"], json!({"id": billing["id"]}));
    let r = cp
        .post_form("/routes", "name=f&paths=/f&service.name=billing")
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["service"], json!({"id": billing["id"]}));
    // Update and upsert.
    let r = cp
        .patch("/routes/r", json!({"service": {"name": "other"}}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["service"], json!({"id": other["id"]}));
    let r = cp
        .put(
            "/routes/p",
            json!({"paths": ["/p"], "service": {"name": "billing"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["service"], json!({"id": billing["id"]}));
    // A consumer by username or by custom_id.
    let p = cp
        .create(
            "/plugins",
            json!({"name": "rate-limiting", "consumer": {"username": "alice"},
                   "config": {"minute": 5}}),
        )
        .await;
    assert_eq!(p["consumer"], json!({"id": alice["id"]}));
    let p = cp
        .create(
            "/plugins",
            json!({"name": "request-termination", "consumer": {"custom_id": "c-1"}}),
        )
        .await;
    assert_eq!(p["consumer"], json!({"id": alice["id"]}));
    // A valid primary key wins; other keys beside it are ignored, as Kong does.
    let r = cp
        .create(
            "/routes",
            json!({"paths": ["/i"], "service": {"id": other["id"], "name": "billing"}}),
        )
        .await;
    assert_eq!(r["service"], json!({"id": other["id"]}));

    // Nothing matches: 400, code 13, Kong's message and field tree.
    let before = cp.store().version_info().await.unwrap().version;
    let r = cp
        .post(
            "/routes",
            json!({"paths": ["/x"], "service": {"name": "nope"}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert_eq!(r.body["code"], 13);
    assert_eq!(r.body["name"], "foreign keys unresolved");
    assert_eq!(
        r.body["message"],
        "foreign key unresolved (service.name: the foreign key cannot be resolved with \
         '{name=\"nope\"}' for an existing 'services' entity)"
    );
    assert_eq!(
        r.body["fields"]["service"]["name"],
        "the foreign key cannot be resolved with '{name=\"nope\"}' for an existing 'services' entity"
    );
    let r = cp.post_form("/routes", "paths=/x&service.name=nope").await;
    assert_eq!(r.body["code"], 13, "{r:?}");
    let r = cp
        .patch("/routes/r", json!({"service": {"name": "nope"}}))
        .await;
    assert_eq!(r.body["code"], 13, "{r:?}");
    // Kong reports every unique value that matched nothing, even when a later one matched.
    let r = cp
        .post(
            "/plugins",
            json!({"name": "cors", "consumer": {"username": "nobody", "custom_id": "c-1"}}),
        )
        .await;
    assert_eq!(r.body["code"], 13, "{r:?}");
    assert_eq!(
        r.body["fields"]["consumer"]["username"],
        "the foreign key cannot be resolved with '{username=\"nobody\"}' for an existing 'consumers' entity"
    );
    assert_eq!(
        cp.store().version_info().await.unwrap().version,
        before,
        "a refused write makes no version"
    );
    // A value that names no unique field is a schema violation, as before.
    let r = cp
        .post("/routes", json!({"paths": ["/x"], "service": {"bogus": 1}}))
        .await;
    assert_eq!(r.body["code"], 2, "{r:?}");
    cp.shutdown().await;
});

// `multipart/form-data` bodies, as `curl -F cert=@cert.pem` sends them (Kong's certificate
// examples): parsed like form bodies (`kong/api/arguments.lua`, `kong/api/api_helpers.lua`
// `before_filter` accepts the content type).
both_backends!(multipart_bodies_parse_like_forms, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let (cert, key) = cert_and_key("mp.test");
    let r = cp
        .multipart(
            Method::POST,
            "/certificates",
            &[
                ("cert", Some("cert.pem"), &cert),
                ("key", Some("key.pem"), &key),
                ("snis", None, "mp.test"),
                ("tags[]", None, "from-curl"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["cert"], cert.as_str());
    assert_eq!(r.body["snis"], json!(["mp.test"]));
    assert_eq!(r.body["tags"], json!(["from-curl"]));
    // Typed like form fields: integers, repeated names as arrays, dotted names nest.
    let r = cp
        .multipart(
            Method::POST,
            "/services",
            &[
                ("name", None, "mp"),
                ("host", None, "mp.test"),
                ("port", None, "8080"),
                ("tags", None, "a"),
                ("tags", None, "b"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["port"], 8080);
    assert_eq!(r.body["tags"], json!(["a", "b"]));
    let r = cp
        .multipart(Method::PATCH, "/services/mp", &[("retries", None, "3")])
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["retries"], 3);
    let r = cp
        .multipart(
            Method::POST,
            "/plugins",
            &[
                ("name", None, "rate-limiting"),
                ("config.minute", None, "7"),
            ],
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["config"]["minute"], 7);
    // Schema errors are reported as for any body; a broken body is a 400.
    let r = cp
        .multipart(Method::POST, "/services", &[("port", None, "x")])
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["fields"]["port"], "expected an integer");
    let r = cp
        .raw(
            Method::POST,
            "/services",
            "multipart/form-data; boundary=xyz",
            "garbage without parts",
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    let r = cp
        .raw(Method::POST, "/services", "multipart/form-data", "x")
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "no boundary: {r:?}");
    cp.shutdown().await;
});

// `GET /tags` and `GET /tags/{tag}` (`kong/api/routes/tags.lua`): one row per (entity, tag)
// across every entity type, paginated; `/tags/{tag}`'s `next` carries only the offset.
both_backends!(tags_across_entity_types, |b| async move {
    let Some(cp) = cp(b).await else { return };
    cp.create(
        "/services",
        json!({"name": "s", "host": "s.test", "tags": ["corp a", "svc"]}),
    )
    .await;
    for i in 0..3 {
        cp.create(
            "/consumers",
            json!({"username": format!("u{i}"), "tags": ["corp a", format!("c{i}")]}),
        )
        .await;
    }
    cp.create("/consumers/u0/key-auth", json!({"tags": ["corp a"]}))
        .await;
    // Every row, walked two at a time.
    let mut rows = Vec::new();
    let mut path = "/tags?size=2".to_owned();
    loop {
        let r = cp.get(&path).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {r:?}");
        assert!(r.body["data"].as_array().unwrap().len() <= 2);
        rows.extend(r.body["data"].as_array().unwrap().iter().cloned());
        match r.body["next"].as_str() {
            Some(next) => {
                assert!(next.starts_with("/tags?offset="), "{next}");
                assert!(next.ends_with("&size=2"), "{next}");
                assert!(r.body["offset"].is_string());
                path = next.to_owned();
            }
            None => break,
        }
    }
    assert_eq!(rows.len(), 9, "{rows:?}");
    let ka = rows
        .iter()
        .find(|r| r["entity_name"] == "keyauth_credentials")
        .expect("credentials are tagged too");
    assert_eq!(ka["tag"], "corp a");
    assert!(ka["entity_id"].is_string());
    // By tag (percent-encoded in the path).
    let r = cp.get("/tags/corp%20a").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["data"].as_array().unwrap().len(), 5);
    assert!(
        r.body["data"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["tag"] == "corp a")
    );
    let r = cp.get("/tags/corp%20a?size=3").await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 3);
    let next = r.body["next"].as_str().unwrap().to_owned();
    let offset = r.body["offset"].as_str().unwrap();
    assert_eq!(
        next,
        format!("/tags/corp%20a?offset={offset}"),
        "only the offset"
    );
    let r = cp.get(&format!("{next}&size=3")).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 2);
    assert!(r.body["next"].is_null());
    assert_eq!(cp.get("/tags/nothing-here").await.body["data"], json!([]));
    // An invalid tag is Kong's "invalid unique tag" (code 10).
    let r = cp.get("/tags/%FF").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], 10);
    assert_eq!(
        r.body["message"],
        "invalid utf-8 character sequence detected at position 1"
    );
    assert_eq!(cp.get("/tags?size=0").await.status, StatusCode::BAD_REQUEST);
    let r = cp.get("/tags?offset=garbage!").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], 7);
    cp.shutdown().await;
});

// Kong's schema endpoints (`kong/api/routes/kong.lua`) in `schema_to_jsonable`'s shape
// (`kong/api/api_helpers.lua`), and `/endpoints`.
both_backends!(schema_endpoints_and_endpoint_list, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let r = cp.get("/schemas/services").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let fields = r.body["fields"].as_array().unwrap();
    let field = |name: &str| {
        fields
            .iter()
            .find_map(|f| f.get(name))
            .unwrap_or_else(|| panic!("no field {name}"))
            .clone()
    };
    assert_eq!(field("id")["type"], "string");
    assert_eq!(field("id")["uuid"], true);
    assert_eq!(field("id")["auto"], true);
    assert_eq!(field("name")["unique"], true);
    assert_eq!(field("retries")["default"], 5);
    assert_eq!(field("retries")["between"], json!([0, 32767]));
    assert_eq!(field("protocol")["required"], true);
    assert!(
        field("protocol")["one_of"]
            .as_array()
            .unwrap()
            .contains(&json!("grpcs"))
    );
    assert_eq!(field("client_certificate")["type"], "foreign");
    assert_eq!(field("client_certificate")["reference"], "certificates");
    assert!(r.body["entity_checks"].is_array());
    // Each field is a one-key object, in schema order.
    assert!(fields.iter().all(|f| f.as_object().unwrap().len() == 1));
    assert!(fields[0].get("id").is_some());
    let r = cp.get("/schemas/keyauth_credentials").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = cp.get("/schemas/key-auths").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "DAO names only: {r:?}");
    assert_eq!(r.body["message"], "No entity named 'key-auths'");

    let r = cp.get("/schemas/plugins/key-auth").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    let fields = r.body["fields"].as_array().unwrap();
    let config = fields.iter().find_map(|f| f.get("config")).unwrap();
    assert_eq!(config["type"], "record");
    let key_names = config["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|f| f.get("key_names"))
        .unwrap();
    assert_eq!(key_names["default"], json!(["apikey"]));
    assert_eq!(key_names["elements"]["type"], "string");
    let consumer = fields.iter().find_map(|f| f.get("consumer")).unwrap();
    assert_eq!(consumer["eq"], Value::Null);
    assert!(
        consumer.as_object().unwrap().contains_key("eq"),
        "no_consumer"
    );
    let r = cp.get("/schemas/plugins/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.body["message"], "No plugin named 'nope'");

    let ok = json!({"message": "schema validation successful"});
    let r = cp
        .post("/schemas/services/validate", json!({"host": "x.test"}))
        .await;
    assert_eq!((r.status, &r.body), (StatusCode::OK, &ok));
    let r = cp
        .post("/schemas/services/validate", json!({"port": "x"}))
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.body["code"], 2);
    assert_eq!(r.body["fields"]["host"], "required field missing");
    let r = cp
        .post(
            "/schemas/plugins/validate",
            json!({"name": "rate-limiting", "config": {"minute": 5}}),
        )
        .await;
    assert_eq!((r.status, &r.body), (StatusCode::OK, &ok));
    let r = cp
        .post(
            "/schemas/plugins/validate",
            json!({"name": "rate-limiting", "config": {"minute": -1}}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    assert!(r.body["fields"]["config"]["minute"].is_string(), "{r:?}");
    let r = cp
        .post_form("/schemas/consumers/validate", "username=x")
        .await;
    assert_eq!((r.status, &r.body), (StatusCode::OK, &ok));
    let r = cp.post("/schemas/nope/validate", json!({})).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    // Validation writes nothing.
    assert!(
        cp.get("/services").await.body["data"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    let r = cp.get("/endpoints").await;
    assert_eq!(r.status, StatusCode::OK);
    let data: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for p in [
        "/",
        "/endpoints",
        "/schemas/plugins/{name}",
        "/tags/{tags}",
        "/services/{services}/routes/{routes}",
        "/routes/{routes}/service",
        "/consumers/{consumers}/key-auth/{keyauth_credentials}",
        "/certificates/{certificates}/snis",
    ] {
        assert!(data.contains(&p), "{p} in {data:?}");
    }
    assert!(!data.iter().any(|p| p.starts_with("/workspaces")));
    // Sorted segment by segment, as Kong sorts them.
    let a = data
        .iter()
        .position(|p| *p == "/services/{services}")
        .unwrap();
    let b = data.iter().position(|p| *p == "/snis").unwrap();
    assert!(a < b);
    cp.shutdown().await;
});

// Routes have subschemas by protocol (`kong/db/schema/entities/routes_subschemas.lua`, chosen by
// the first protocol that names one, `get_subschema` in `kong/db/schema/init.lua`): for
// grpc/grpcs `strip_path` defaults to false, and each subschema's field and entity rules hold
// with Kong's messages (`spec/01-unit/01-db/01-schema/06-routes_spec.lua`).
both_backends!(route_subschemas_by_protocol, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let created = |body: serde_json::Value| {
        let cp = &cp;
        async move {
            let r = cp.post("/routes", body.clone()).await;
            assert_eq!(r.status, StatusCode::CREATED, "{body}: {r:?}");
            r.body
        }
    };
    let refused = |body: serde_json::Value| {
        let cp = &cp;
        async move {
            let r = cp.post("/routes", body.clone()).await;
            assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {r:?}");
            assert_eq!(r.body["code"], 2);
            r.body["fields"].clone()
        }
    };
    let g = created(json!({"protocols": ["grpc", "grpcs"], "paths": ["/pkg.Svc"]})).await;
    assert_eq!(g["strip_path"], false);
    let g = created(json!({"protocols": ["grpcs"], "snis": ["g.test"]})).await;
    assert_eq!(g["strip_path"], false);
    // PUT creates with the subschema's default too; plain routes keep strip_path = true.
    let r = cp
        .put(
            "/routes/g",
            json!({"protocols": ["grpc"], "hosts": ["g.test"]}),
        )
        .await;
    assert_eq!(r.body["strip_path"], false, "{r:?}");
    assert_eq!(created(json!({"paths": ["/p"]})).await["strip_path"], true);
    let grpc = "when 'protocols' is 'grpc' or 'grpcs'";
    let f = refused(json!({"protocols": ["grpc"], "paths": ["/x"], "strip_path": true})).await;
    assert_eq!(
        f,
        json!({"strip_path": format!("cannot set 'strip_path' {grpc}")})
    );
    let f = refused(json!({"protocols": ["grpcs"], "paths": ["/x"], "methods": ["GET"]})).await;
    assert_eq!(
        f,
        json!({"methods": format!("cannot set 'methods' {grpc}")})
    );
    let f = refused(json!({"protocols": ["grpc"]})).await;
    assert_eq!(
        f,
        json!({"@entity": ["must set one of 'hosts', 'headers', 'paths' when 'protocols' is 'grpc'"]})
    );
    let f = refused(json!({"protocols": ["grpcs"]})).await;
    assert_eq!(
        f,
        json!({"@entity": ["must set one of 'hosts', 'headers', 'paths', 'snis' when 'protocols' is 'grpcs'"]})
    );
    // PATCH keeps the stored strip_path, which grpc refuses, as Kong does.
    cp.create("/routes", json!({"name": "h", "paths": ["/h"]}))
        .await;
    let r = cp.patch("/routes/h", json!({"protocols": ["grpc"]})).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST, "{r:?}");
    let r = cp
        .patch(
            "/routes/h",
            json!({"protocols": ["grpc"], "strip_path": false}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");

    // http/https: no sources or destinations (null, not even []), one matching attribute.
    let f = refused(json!({"paths": ["/x"], "sources": []})).await;
    assert_eq!(
        f,
        json!({"sources": "cannot set 'sources' when 'protocols' is 'http' or 'https'"})
    );
    let f = refused(json!({"protocols": ["http"]})).await;
    assert_eq!(
        f,
        json!({"@entity": ["must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http'"]})
    );
    let f = refused(json!({"protocols": ["http"], "paths": ["/x"], "snis": ["a.test"]})).await;
    assert_eq!(
        f,
        json!({"snis": "length must be 0", "@entity": [
            "'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or 'tls_passthrough'"]})
    );
    // tcp/tls/udp/tls_passthrough.
    let tcp = "when 'protocols' is 'tcp', 'tls', 'tls_passthrough' or 'udp'";
    let f = refused(json!({"protocols": ["tcp"], "paths": ["/x"], "sources": [{"port": 1}]})).await;
    assert_eq!(f, json!({"paths": format!("cannot set 'paths' {tcp}")}));
    let f = refused(json!({"protocols": ["udp"]})).await;
    assert_eq!(
        f,
        json!({"@entity": ["must set one of 'sources', 'destinations', 'snis' when 'protocols' is 'tcp', 'tls' or 'udp'"]})
    );
    let f = refused(json!({"protocols": ["tls_passthrough"]})).await;
    assert_eq!(
        f,
        json!({"@entity": ["must set snis when 'protocols' is 'tls_passthrough'"]})
    );
    created(json!({"protocols": ["tls_passthrough"], "snis": ["p.test"]})).await;
    // Mutually exclusive protocol sets, listed in the order the value names them.
    let f = refused(json!({"protocols": ["tls", "tls_passthrough"], "snis": ["x.test"]})).await;
    assert_eq!(
        f,
        json!({"protocols": "these sets are mutually exclusive: ('tcp', 'tls', 'udp'), ('tls_passthrough')"})
    );
    let f = refused(json!({"protocols": ["https", "tcp"], "paths": ["/x"]})).await;
    assert_eq!(
        f["protocols"],
        "these sets are mutually exclusive: ('http', 'https'), ('tcp', 'tls', 'udp')"
    );
    cp.shutdown().await;
});

// `/certificates/{sni}` and `/certificates/{sni}/snis[/{sni}]` (`kong/api/routes/certificates.lua`,
// `spec/02-integration/04-admin_api/06-certificates_routes_spec.lua`): a key that is not a UUID
// names the certificate through one of its SNIs; an unknown one is "SNI not found", except on
// PUT, which creates a certificate with that SNI.
both_backends!(certificates_by_sni, |b| async move {
    let Some(cp) = cp(b).await else { return };
    let (cert, key) = cert_and_key("a.test");
    let (cert2, key2) = cert_and_key("b.test");
    let c = cp
        .create(
            "/certificates",
            json!({"cert": cert, "key": key, "snis": ["a.test", "a2.test"]}),
        )
        .await;
    let id = c["id"].as_str().unwrap().to_owned();
    let r = cp.get("/certificates/a2.test").await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body, cp.get(&format!("/certificates/{id}")).await.body);
    assert_eq!(r.body["snis"], json!(["a.test", "a2.test"]));
    for (method, path) in [
        (Method::GET, "/certificates/nope.test"),
        (Method::PATCH, "/certificates/nope.test"),
        (Method::DELETE, "/certificates/nope.test"),
        (Method::GET, "/certificates/nope.test/snis"),
        (Method::POST, "/certificates/nope.test/snis"),
        (Method::GET, "/certificates/nope.test/snis/a.test"),
    ] {
        let body = (method != Method::GET && method != Method::DELETE).then(|| json!({}));
        let r = cp.request(method.clone(), path, body).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {path}: {r:?}");
        assert_eq!(r.body["message"], "SNI not found", "{method} {path}");
    }
    assert_eq!(
        cp.get(&format!("/certificates/{}", uuid::Uuid::new_v4()))
            .await
            .body["message"],
        "Not found"
    );
    // Nested paths under the SNI.
    let r = cp.get("/certificates/a.test/snis").await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 2, "{r:?}");
    let r = cp
        .post("/certificates/a.test/snis", json!({"name": "a3.test"}))
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{r:?}");
    assert_eq!(r.body["certificate"]["id"], id.as_str());
    assert_eq!(
        cp.get("/certificates/a.test/snis/a3.test").await.status,
        StatusCode::OK
    );
    assert_eq!(
        cp.delete("/certificates/a.test/snis/a3.test").await.status,
        StatusCode::NO_CONTENT
    );
    // PATCH by SNI; snis null empties the list (Kong's parse_name_list).
    let r = cp
        .patch("/certificates/a2.test", json!({"tags": ["t"]}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["snis"], json!(["a.test", "a2.test"]));
    // PUT of an unknown SNI creates a certificate with it and the body's snis.
    let r = cp
        .put(
            "/certificates/new.test",
            json!({"cert": cert2, "key": key2, "snis": ["b.test"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["snis"], json!(["b.test", "new.test"]));
    let new_id = r.body["id"].as_str().unwrap().to_owned();
    assert_ne!(new_id, id);
    assert_eq!(
        cp.get("/certificates/new.test").await.body["id"],
        new_id.as_str()
    );
    // Listed in the body and the path: once.
    let r = cp
        .put(
            "/certificates/new.test",
            json!({"cert": cert2, "key": key2, "snis": ["new.test"]}),
        )
        .await;
    assert_eq!(r.body["snis"], json!(["new.test"]), "{r:?}");
    assert_eq!(
        r.body["id"],
        new_id.as_str(),
        "an existing SNI upserts its certificate"
    );
    // Duplicates are Kong's message.
    let r = cp
        .patch(
            &format!("/certificates/{new_id}"),
            json!({"snis": ["d.test", "d.test"]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(
        r.body["message"],
        "schema violation (snis: d.test is duplicated)"
    );
    // A PUT without snis replaces them with none, as Kong's prepare_args does (snis = null).
    let r = cp
        .put(
            &format!("/certificates/{new_id}"),
            json!({"cert": cert2, "key": key2}),
        )
        .await;
    assert_eq!(r.body["snis"], json!([]), "{r:?}");
    let r = cp
        .patch(&format!("/certificates/{id}"), json!({"snis": null}))
        .await;
    assert_eq!(r.body["snis"], json!([]), "{r:?}");
    assert_eq!(
        cp.get("/certificates/a.test").await.body["message"],
        "SNI not found"
    );
    // DELETE by SNI deletes the certificate and its SNIs.
    cp.patch(&format!("/certificates/{id}"), json!({"snis": ["z.test"]}))
        .await;
    assert_eq!(
        cp.delete("/certificates/z.test").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        cp.get(&format!("/certificates/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(cp.get("/snis/z.test").await.status, StatusCode::NOT_FOUND);
    cp.shutdown().await;
});
