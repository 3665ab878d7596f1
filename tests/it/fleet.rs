//! The fleet view (Kong's `clustering_data_planes`) and version / plugin compatibility.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Backend, TestCp, TestDp};

/// Polls `GET /clustering/data-planes` until `f` accepts the rows.
async fn rows_until(cp: &TestCp, what: &str, f: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = cp.get("/clustering/data-planes").await;
        assert_eq!(r.status, 200, "{r:?}");
        let rows = r.body["data"].as_array().cloned().unwrap_or_default();
        if f(&rows) {
            return rows;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_planes_are_listed_in_kongs_shape() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.labels = vec!["region:eu-west-1".into(), "tier:gold".into()];
    let dp = TestDp::start(cfg, dir).await;
    let _dp2 = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let (head, _) = cp.head().await;
    let rows = rows_until(&cp, "two in-sync rows", |rows| {
        rows.len() == 2 && rows.iter().all(|r| r["health"] == "in_sync")
    })
    .await;
    let me = rows
        .iter()
        .find(|r| r["id"] == dp.shared().node_id.as_str())
        .expect("the data plane is listed");
    assert_eq!(me["ip"], "127.0.0.1");
    assert_eq!(me["version"], "3.10.0");
    assert_eq!(me["sync_status"], "normal");
    assert_eq!(me["sync_protocol"], "v2");
    assert_eq!(
        me["config_hash"],
        deltaplane::proto::version_string(head).as_str()
    );
    assert_eq!(me["labels"], json!({"region": "eu-west-1", "tier": "gold"}));
    assert!(
        me["rpc_capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("kong.sync.v2"))
    );
    assert!(
        me["cert_details"]["expiry_timestamp"].as_i64().unwrap()
            > me["last_seen"].as_i64().unwrap()
    );
    // Kong computes ttl from the purge delay: about 14 days.
    let ttl = me["ttl"].as_i64().unwrap();
    assert!((14 * 86400 - 120..=14 * 86400).contains(&ttl), "{ttl}");

    // Pagination, Kong style.
    let r = cp.get("/clustering/data-planes?size=1").await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    let next = r.body["next"].as_str().unwrap().to_owned();
    let r2 = cp.get(&next).await;
    assert_eq!(r2.body["data"].as_array().unwrap().len(), 1);
    assert_ne!(r.body["data"][0]["id"], r2.body["data"][0]["id"]);
    assert!(r2.body["next"].is_null());
    assert_eq!(cp.get("/clustering/data-planes?size=0").await.status, 400);

    // The deprecated map form.
    let r = cp.get("/clustering/status").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers.get("Deprecation").unwrap(), "true");
    assert_eq!(r.body.as_object().unwrap().len(), 2);
    assert_eq!(r.body[&dp.shared().node_id]["ip"], "127.0.0.1");

    // Not writable.
    let id = dp.shared().node_id.clone();
    assert_eq!(
        cp.delete(&format!("/clustering/data-planes/{id}"))
            .await
            .status,
        404
    );
    assert_eq!(
        cp.patch(
            &format!("/clustering/data-planes/{id}"),
            json!({"hostname": "x"})
        )
        .await
        .status,
        404
    );
    cp.shutdown().await;
}

crate::both_backends!(rows_expire_after_the_purge_delay, |backend| async move {
    let Some(db) = crate::harness::TestDb::new(backend).await else {
        return;
    };
    let mut cfg = db.cp_config();
    cfg.data_plane_purge_delay = Duration::from_secs(60);
    cfg.purge_interval = Duration::from_millis(100);
    let cp = TestCp::start_with(db, cfg).await;
    let mut dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    rows_until(&cp, "one row", |rows| rows.len() == 1).await;
    dp.stop().await;
    rows_until(&cp, "disconnected", |rows| {
        rows.len() == 1 && rows[0]["health"] == "disconnected"
    })
    .await;
    // Age the row past the purge delay.
    let sql = "UPDATE dp_data_planes SET last_seen = last_seen - 3600";
    match cp.store().pool() {
        deltaplane::cp::store::Pool::Sqlite(p) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        deltaplane::cp::store::Pool::Postgres(p) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
    }
    rows_until(&cp, "purged", |rows| rows.is_empty()).await;
    cp.shutdown().await;
});

/// Another major, or a newer minor, is refused and recorded; an older minor is accepted and
/// gets configurations without the fields it does not know.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_version_compatibility() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let svc = cp
        .create("/services", json!({"name": "v", "host": "v"}))
        .await;
    cp.create(
        &format!("/services/{}/plugins", svc["id"].as_str().unwrap()),
        json!({"name": "key-auth", "instance_name": "ka-1"}),
    )
    .await;

    for (version, why) in [("4.0.0", "different major"), ("3.11.0", "newer minor")] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cp.dp_config(dir.path());
        cfg.kong_compat_version = version.into();
        let dp = TestDp::start(cfg, dir).await;
        let id = dp.shared().node_id.clone();
        rows_until(&cp, why, |rows| {
            rows.iter().any(|r| {
                r["id"] == id.as_str()
                    && r["sync_status"] == "kong_version_incompatible"
                    && r["health"] == "disconnected"
            })
        })
        .await;
        assert_eq!(dp.state().0, 0, "{why}: nothing was sent");
        let st = dp.shared().status_json();
        assert!(
            st["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("kong_version_incompatible")),
            "{st}"
        );
    }

    // An older minor: accepted; plugins.instance_name (since 3.2) is removed.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.kong_compat_version = "3.1.0".into();
    let dp = TestDp::start(cfg, dir).await;
    let (head, _) = cp.head().await;
    dp.wait_version(head, 20).await;
    let plugins = dp.shared().store.list("plugins").unwrap();
    assert_eq!(plugins.len(), 1);
    assert!(plugins[0].get("instance_name").is_none(), "{}", plugins[0]);
    assert_eq!(plugins[0]["name"], "key-auth");
    cp.shutdown().await;
}

/// The data plane's own `GET /status`.
async fn dp_status(dp: &TestDp) -> Value {
    let addr = dp.dp.as_ref().expect("running").status_addr;
    reqwest::get(format!("http://{addr}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Polls the data plane's `GET /status` until `f` accepts it.
async fn dp_status_until(dp: &TestDp, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st = dp_status(dp).await;
        if f(&st) {
            return st;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A DP that announces its plugins gets no configuration using others; it gets it once the
/// configuration no longer does. While withheld, the DP shows the CP's reason as its
/// `last_error`, keeps its one connection and asks again only after a doubling back-off; the
/// CP's notification of the fixed configuration makes it ask at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_set_compatibility_withholds_the_config() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let svc = cp
        .create("/services", json!({"name": "p", "host": "p"}))
        .await;
    let sid = svc["id"].as_str().unwrap().to_owned();
    let rl = cp
        .create(
            &format!("/services/{sid}/plugins"),
            json!({"name": "rate-limiting", "config": {"minute": 10}}),
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.plugins = Some(vec!["key-auth".into(), "cors".into()]);
    let backoff = cfg.invalid_backoff;
    let dp = TestDp::start(cfg, dir).await;
    let id = dp.shared().node_id.clone();
    rows_until(&cp, "plugin_set_incompatible", |rows| {
        rows.iter().any(|r| {
            r["id"] == id.as_str()
                && r["sync_status"] == "plugin_set_incompatible"
                && r["health"] == "incompatible"
        })
    })
    .await;
    assert_eq!(dp.state().0, 0, "withheld");

    // The DP says why it has no configuration.
    let st = dp_status_until(&dp, "the withheld error on the DP", |st| {
        st["last_error"].as_str().is_some_and(|e| {
            e.starts_with("plugin_set_incompatible:") && e.contains("rate-limiting")
        })
    })
    .await;
    assert_eq!(st["connected"], true, "{st}");
    assert_eq!(st["in_sync"], false, "{st}");

    // It keeps the connection and does not ask in a loop: over 2 s, at most 4 more get_delta
    // requests with a 300 ms back-off doubling from the first (one may be a notification's).
    let before = dp.shared().link();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = dp.shared().link();
    assert_eq!(
        (before.connects, after.connects),
        (1, 1),
        "reconnected while withheld"
    );
    assert!(
        after.sync_requests - before.sync_requests <= 4,
        "{} get_delta requests in 2 s while withheld",
        after.sync_requests - before.sync_requests
    );
    assert_eq!(dp_status(&dp).await["connects"], 1);

    // A newer plugin version on the DP is refused too.
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg2 = cp.dp_config(dir2.path());
    cfg2.plugins = Some(vec!["rate-limiting:3.11.0".into(), "key-auth".into()]);
    let dp2 = TestDp::start(cfg2, dir2).await;
    let id2 = dp2.shared().node_id.clone();
    rows_until(&cp, "plugin_version_incompatible", |rows| {
        rows.iter()
            .any(|r| r["id"] == id2.as_str() && r["sync_status"] == "plugin_version_incompatible")
    })
    .await;
    dp_status_until(&dp2, "the version error on the DP", |st| {
        st["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("plugin_version_incompatible:"))
    })
    .await;

    // Let the first DP's back-off grow past what convergence may take: after the 5th request
    // the next one is 16 back-offs (4.8 s) away.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dp.shared().link().sync_requests < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the DP stopped asking"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Remove the plugin: the CP announces the new version, the first DP asks at once, gets
    // the configuration, clears its error and is normal again.
    let asked = dp.shared().link().sync_requests;
    let waited = tokio::time::Instant::now();
    let r = cp
        .delete(&format!("/plugins/{}", rl["id"].as_str().unwrap()))
        .await;
    assert_eq!(r.status, 204);
    dp.converge(&cp, 20).await;
    // Asking only when the back-off ran out would take at least 16 back-offs.
    assert!(
        waited.elapsed() < backoff * 12,
        "converged only after {:?}: the new version did not cut the back-off short",
        waited.elapsed()
    );
    assert!(dp.shared().link().sync_requests > asked);
    let st = dp_status(&dp).await;
    assert_eq!(st["last_error"], Value::Null, "{st}");
    assert_eq!(st["in_sync"], true, "{st}");
    assert_eq!(st["connects"], 1, "{st}");
    rows_until(&cp, "normal again", |rows| {
        rows.iter().any(|r| {
            r["id"] == id.as_str() && r["sync_status"] == "normal" && r["health"] == "in_sync"
        })
    })
    .await;
    cp.shutdown().await;
}
