//! Sync v2 end to end: a control plane and data planes in-process, over mTLS WebSockets.

use std::time::Duration;

use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::{TestCp, TestDp};

/// Writes a service with `n` routes and a plugin, returns the service id.
async fn service_with_routes(cp: &TestCp, name: &str, n: usize) -> String {
    let svc = cp
        .create(
            "/services",
            json!({"name": name, "url": "http://example.com:8080/api"}),
        )
        .await;
    let id = svc["id"].as_str().unwrap().to_owned();
    for i in 0..n {
        cp.create(
            &format!("/services/{id}/routes"),
            json!({"name": format!("{name}-r{i}"), "paths": [format!("/{name}/{i}")]}),
        )
        .await;
    }
    cp.create(
        &format!("/services/{id}/plugins"),
        json!({"name": "key-auth"}),
    )
    .await;
    id
}

both_backends!(
    create_update_delete_and_cascade_propagate,
    |backend| async move {
        let Some(cp) = TestCp::start(backend).await else {
            return;
        };
        let dp = cp.start_dp().await;
        dp.converge(&cp, 20).await;

        let svc = service_with_routes(&cp, "orders", 3).await;
        dp.converge(&cp, 20).await;
        assert_eq!(dp.shared().store.list("routes").unwrap().len(), 3);

        let r = cp
            .patch(&format!("/services/{svc}"), json!({"retries": 9}))
            .await;
        assert_eq!(r.status, 200, "{r:?}");
        dp.converge(&cp, 20).await;
        let stored = dp
            .shared()
            .store
            .list("services")
            .unwrap()
            .into_iter()
            .find(|s| s["id"] == svc.as_str())
            .unwrap();
        assert_eq!(stored["retries"], 9);

        // A consumer with a credential: deleting it cascades.
        let c = cp.create("/consumers", json!({"username": "alice"})).await;
        cp.create(
            &format!("/consumers/{}/key-auth", c["id"].as_str().unwrap()),
            json!({"key": "secret-1"}),
        )
        .await;
        dp.converge(&cp, 20).await;
        assert_eq!(
            dp.shared().store.list("keyauth_credentials").unwrap().len(),
            1
        );
        let r = cp.delete("/consumers/alice").await;
        assert_eq!(r.status, 204, "{r:?}");
        dp.converge(&cp, 20).await;
        assert!(
            dp.shared()
                .store
                .list("keyauth_credentials")
                .unwrap()
                .is_empty()
        );

        // Routes first (services refuse deletion while referenced), then the service, which
        // cascades to its plugins.
        for route in dp.shared().store.list("routes").unwrap() {
            let r = cp
                .delete(&format!("/routes/{}", route["id"].as_str().unwrap()))
                .await;
            assert_eq!(r.status, 204, "{r:?}");
        }
        let r = cp.delete(&format!("/services/{svc}")).await;
        assert_eq!(r.status, 204, "{r:?}");
        dp.converge(&cp, 20).await;
        assert!(dp.shared().store.list("routes").unwrap().is_empty());
        assert!(dp.shared().store.list("plugins").unwrap().is_empty());
        assert!(dp.shared().store.list("services").unwrap().is_empty());
        cp.shutdown().await;
    }
);

both_backends!(offline_dp_catches_up_incrementally, |backend| async move {
    let Some(cp) = TestCp::start(backend).await else {
        return;
    };
    let mut dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    dp.stop().await;
    let before = dp.state().0;

    // 1,000 changes while the data plane is away.
    let svc = cp
        .create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let sid = svc["id"].as_str().unwrap().to_owned();
    for i in 0..999 {
        let r = cp
            .patch(&format!("/services/{sid}"), json!({"retries": i % 30}))
            .await;
        assert_eq!(r.status, 200);
    }
    let (head, _) = cp.head().await;
    assert_eq!(head, before + 1000);

    dp.restart().await;
    // It resumes from its stored version (never below it).
    assert!(dp.state().0 >= before);
    dp.converge(&cp, 30).await;
    // Incremental catch-up, not a full sync.
    let st = dp.shared().status_json();
    assert_eq!(st["version"], head);
    assert_eq!(st["full_syncs"], 0, "{st}");
    assert!(st["incremental_syncs"].as_u64().unwrap() >= 1, "{st}");
    cp.shutdown().await;
});

both_backends!(
    restarted_dp_resumes_and_cp_restart_reconnects,
    |backend| async move {
        let Some(mut cp) = TestCp::start(backend).await else {
            return;
        };
        let mut dp = cp.start_dp().await;
        service_with_routes(&cp, "a", 2).await;
        dp.converge(&cp, 20).await;
        dp.restart().await;
        service_with_routes(&cp, "b", 2).await;
        dp.converge(&cp, 20).await;

        // Restart the control plane on the same database, same addresses.
        let running = cp.cp.take().unwrap();
        let cluster_addr = running.cluster_addr;
        let admin_addr = running.admin_addr;
        running.shutdown().await;
        let mut cfg = cp.db.cp_config();
        cfg.cluster_listen = cluster_addr;
        cfg.admin_listen = admin_addr;
        cp.cp = Some(deltaplane::cp::start(cfg).await.expect("restart cp"));
        service_with_routes(&cp, "c", 2).await;
        dp.converge(&cp, 30).await;
        let link = dp.shared().link();
        assert!(link.connected_to.is_some());

        // A data plane that comes back already up to date is listed with its state hash too
        // (it has nothing to apply, so only its get_delta request says where it is).
        dp.restart().await;
        let (head, hash) = cp.head().await;
        let listed = || async {
            let planes = rpc(&cp, "deltaplane.data_planes", None).await;
            let p = planes[0].clone();
            p["connected_to"].is_string()
                && p["version"] == head
                && p["state_hash"] == hash.as_str()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while dp.shared().link().connected_to.is_none() || !listed().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the restarted data plane is not listed at {head} with {hash}: {:#}",
                rpc(&cp, "deltaplane.data_planes", None).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // And it stays so once the control plane has written its status (every second).
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(
            listed().await,
            "{:#}",
            rpc(&cp, "deltaplane.data_planes", None).await
        );
        cp.shutdown().await;
    }
);

both_backends!(several_dps_converge_and_are_listed, |backend| async move {
    let Some(cp) = TestCp::start(backend).await else {
        return;
    };
    let mut dps = Vec::new();
    for _ in 0..3 {
        dps.push(cp.start_dp().await);
    }
    for i in 0..5 {
        service_with_routes(&cp, &format!("svc{i}"), 2).await;
    }
    for dp in &dps {
        dp.converge(&cp, 30).await;
    }
    // The operator RPC lists them, with the version and state hash each one reported.
    let (head, hash) = cp.head().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let planes = rpc(&cp, "deltaplane.data_planes", None).await;
        let planes = planes.as_array().unwrap().clone();
        assert_eq!(planes.len(), 3, "{planes:?}");
        if planes
            .iter()
            .all(|p| p["version"] == head && p["state_hash"] == hash.as_str())
        {
            for p in &planes {
                assert_eq!(p["protocol"], "v2");
                assert!(p["connected_to"].is_string());
                assert_eq!(p["kong_version"], "3.10.0");
            }
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{planes:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = rpc(&cp, "deltaplane.sync_version", None).await;
    assert_eq!(v["version"], head);
    assert_eq!(v["state_hash"], hash);
    for dp in &dps {
        let dv: Value = deltaplane::net::operator::call(
            &format!("http://{}/rpc", dp.dp.as_ref().unwrap().status_addr),
            None,
            "deltaplane.sync_version",
            None,
        )
        .await
        .unwrap();
        assert_eq!(dv["version"], head);
        assert_eq!(dv["state_hash"], hash);
        assert_eq!(dv["connected"], true);
        assert_eq!(dv["in_sync"], true);
    }
    cp.shutdown().await;
});

both_backends!(new_epoch_forces_full_sync, |backend| async move {
    let Some(cp) = TestCp::start(backend).await else {
        return;
    };
    let mut dp = cp.start_dp().await;
    for i in 0..3 {
        service_with_routes(&cp, &format!("old{i}"), 1).await;
    }
    dp.converge(&cp, 20).await;
    let old_epoch = dp.shared().store.state().epoch.clone();
    dp.stop().await;
    cp.shutdown().await;

    // A new database: a new change log with a new epoch and lower versions.
    let Some(cp2) = TestCp::start(backend).await else {
        return;
    };
    service_with_routes(&cp2, "fresh", 1).await;
    let (addr, crt, key) = cp2.cluster_target();
    dp.cfg.control_planes = vec![addr];
    dp.cfg.cluster_cert = crt;
    dp.cfg.cluster_cert_key = key;
    dp.restart().await;
    let (v2, hash2) = cp2.head().await;
    // Lower version than before: wait on the hash, not on the version number.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while dp.state() != (v2, hash2.clone()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no full sync to the new epoch: {:?} vs {:?}",
            dp.state(),
            (v2, &hash2)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(dp.shared().store.state().epoch, old_epoch);
    assert_eq!(dp.shared().store.list("services").unwrap().len(), 1);
    cp2.shutdown().await;
});

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_serves_status_and_readiness() {
    let cp = TestCp::start(crate::harness::Backend::Sqlite)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    // Point at nothing first: not ready, not connected.
    cfg.control_planes = vec!["127.0.0.1:1".into()];
    let mut dp = TestDp::start(cfg.clone(), dir).await;
    let base = format!("http://{}", dp.dp.as_ref().unwrap().status_addr);
    let r = reqwest::get(format!("{base}/status/ready")).await.unwrap();
    assert_eq!(r.status(), 503);
    let st: Value = reqwest::get(format!("{base}/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["connected"], false);
    assert_eq!(st["version"], 0);
    assert_eq!(st["version_string"], "00000000000000000000000000000000");

    // Now the real control plane.
    dp.stop().await;
    dp.cfg = cp.dp_config(dp.dir.path());
    dp.restart().await;
    dp.converge(&cp, 20).await;
    let base = format!("http://{}", dp.dp.as_ref().unwrap().status_addr);
    let r = reqwest::get(format!("{base}/status/ready")).await.unwrap();
    assert_eq!(r.status(), 200);

    // The control plane goes away: still ready (serving the stored config), not connected.
    cp.shutdown().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let st: Value = reqwest::get(format!("{base}/status"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if st["connected"] == false {
            assert_eq!(st["in_sync"], false);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "still connected: {st}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = reqwest::get(format!("{base}/status/ready")).await.unwrap();
    assert_eq!(r.status(), 200);
    dp.stop().await;
}

pub async fn rpc(cp: &TestCp, method: &str, params: Option<Value>) -> Value {
    deltaplane::net::operator::call(&format!("{}/rpc", cp.base), None, method, params)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_larger_than_a_frame_are_paged() {
    let db = crate::harness::TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.max_payload = 4096;
    let cp = TestCp::start_with(db, cfg).await;
    // 40 services with incompressible tags: the snapshot is several frames even compressed.
    for i in 0..40 {
        let tags: Vec<String> = (0..4)
            .map(|_| uuid::Uuid::new_v4().simple().to_string())
            .collect();
        cp.create(
            "/services",
            json!({"name": format!("paged-{i}"), "host": format!("h{i}.example.com"), "tags": tags}),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut dcfg = cp.dp_config(dir.path());
    dcfg.cluster.max_payload = 4096;
    let mut dp = TestDp::start(dcfg, dir).await;
    dp.converge(&cp, 30).await;
    let st = dp.shared().status_json();
    assert_eq!(st["full_syncs"], 1, "{st}");
    assert_eq!(st["paged_transfers"], 1, "{st}");
    assert_eq!(dp.shared().store.list("services").unwrap().len(), 40);

    // One version larger than a frame: a consumer with many credentials, deleted (cascade).
    dp.stop().await;
    let c = cp.create("/consumers", json!({"username": "many"})).await;
    let cid = c["id"].as_str().unwrap().to_owned();
    for _ in 0..200 {
        cp.create(
            &format!("/consumers/{cid}/key-auth"),
            json!({"key": uuid::Uuid::new_v4().to_string()}),
        )
        .await;
    }
    dp.restart().await;
    dp.converge(&cp, 30).await;
    let r = cp.delete(&format!("/consumers/{cid}")).await;
    assert_eq!(r.status, 204);
    dp.converge(&cp, 30).await;
    assert!(
        dp.shared()
            .store
            .list("keyauth_credentials")
            .unwrap()
            .is_empty()
    );
    let st = dp.shared().status_json();
    assert_eq!(st["full_syncs"], 0, "incremental, paged: {st}");
    assert_eq!(st["paged_transfers"], 1, "{st}");
    cp.shutdown().await;
}

both_backends!(dp_below_the_horizon_full_syncs, |backend| async move {
    let Some(db) = crate::harness::TestDb::new(backend).await else {
        return;
    };
    // The window of recent versions in memory would still cover the data plane (it serves
    // versions the database purged, which is correct): this test is about the horizon.
    let st = restart_behind_the_horizon(db, false).await;
    assert_eq!(st["full_syncs"], 1, "{st}");
});

/// A data plane stops; the control plane writes 31 versions and purges its change log past
/// the data plane's version; the data plane restarts and converges. Returns its status. With
/// `window` off the control plane answers from its database only.
pub(crate) async fn restart_behind_the_horizon(db: crate::harness::TestDb, window: bool) -> Value {
    let mut cfg = db.cp_config();
    cfg.changelog_retention_age = Duration::ZERO;
    cfg.changelog_retention_versions = 5;
    cfg.purge_interval = Duration::from_millis(100);
    if !window {
        cfg.cluster.delta_cache_bytes = 0;
    }
    let cp = TestCp::start_with(db, cfg).await;
    let mut dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    dp.stop().await;
    let (before, _) = dp.state();
    let svc = cp
        .create("/services", json!({"name": "h", "host": "h"}))
        .await;
    for i in 0..30 {
        cp.patch(
            &format!("/services/{}", svc["id"].as_str().unwrap()),
            json!({"retries": i}),
        )
        .await;
    }
    // Wait for the purge to pass the data plane's version.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let info = cp.store().version_info().await.unwrap();
        if info.oldest_version > before + 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "purge did not run");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dp.restart().await;
    dp.converge(&cp, 20).await;
    let st = dp.shared().status_json();
    cp.shutdown().await;
    st
}

both_backends!(
    invalid_deltas_are_rejected_reported_and_retried,
    |backend| async move {
        // Without the window of recent versions in memory: this test is about what the
        // control plane reads from its database.
        let Some(db) = crate::harness::TestDb::new(backend).await else {
            return;
        };
        let mut cp_cfg = db.cp_config();
        cp_cfg.cluster.delta_cache_bytes = 0;
        let cp = TestCp::start_with(db, cp_cfg).await;
        let mut dp = cp.start_dp().await;
        dp.converge(&cp, 20).await;
        dp.stop().await;
        let (good, good_hash) = dp.state();
        let svc = cp
            .create("/services", json!({"name": "t", "host": "t"}))
            .await;
        let (bad_version, _) = cp.head().await;
        // Corrupt the change log behind the CP's back: a port that is not a number.
        let mut broken = svc.clone();
        broken["port"] = json!("not-a-port");
        let pool = cp.store().pool().clone();
        let set = |body: String| {
            let pool = pool.clone();
            async move {
                let sql = "UPDATE dp_changes SET entity = $1 WHERE version = $2";
                match &pool {
                    deltaplane::cp::store::Pool::Sqlite(p) => {
                        sqlx::query(sql)
                            .bind(body)
                            .bind(bad_version)
                            .execute(p)
                            .await
                            .unwrap();
                    }
                    deltaplane::cp::store::Pool::Postgres(p) => {
                        sqlx::query(sql)
                            .bind(body)
                            .bind(bad_version)
                            .execute(p)
                            .await
                            .unwrap();
                    }
                }
            }
        };
        set(broken.to_string()).await;
        dp.restart().await;
        // The DP stays on its last good version and says why.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let st = loop {
            let st = dp.shared().status_json();
            if st["last_error"].is_string() {
                break st;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no error shown: {st}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(st["last_error"].as_str().unwrap().contains("port"), "{st}");
        assert_eq!(dp.state(), (good, good_hash));
        // The CP recorded the DP's error.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let planes = rpc(&cp, "deltaplane.data_planes", None).await;
            if planes[0]["last_error"].is_string() {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{planes}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Repair the log: after its back-off the DP applies it.
        set(svc.to_string()).await;
        dp.converge(&cp, 20).await;
        assert_eq!(dp.shared().status_json()["last_error"], Value::Null);
        cp.shutdown().await;
    }
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_version_pushes_new_versions() {
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let cp = TestCp::start(crate::harness::Backend::Sqlite)
        .await
        .unwrap();
    let dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let dp_rpc = dp.dp.as_ref().unwrap().status_addr;
    let cp_rpc = cp.running().admin_addr;
    let mut subs = Vec::new();
    for addr in [cp_rpc, dp_rpc] {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/rpc"), tcp)
            .await
            .unwrap();
        ws.send(Message::text(
            json!({"jsonrpc": "2.0", "id": 1, "method": "deltaplane.watch_version", "params": []})
                .to_string(),
        ))
        .await
        .unwrap();
        subs.push(ws);
    }
    cp.create("/services", json!({"name": "watched", "host": "w"}))
        .await;
    let (head, hash) = cp.head().await;
    for ws in &mut subs {
        // The subscription answer, then notifications until the head shows up.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let msg = tokio::time::timeout_at(deadline, ws.next())
                .await
                .expect("a notification in time")
                .unwrap()
                .unwrap();
            let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
            if v["method"] == "deltaplane.version" {
                let r = &v["params"]["result"];
                if r["version"] == head {
                    assert_eq!(r["state_hash"], hash);
                    assert_eq!(r["version_string"], deltaplane::proto::version_string(head));
                    break;
                }
            }
        }
    }
    cp.shutdown().await;
}

/// Two control planes share one PostgreSQL database; writers on both; DPs on both converge to
/// the same version and state hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cps_on_postgres_every_dp_converges() {
    let Some(db) = crate::harness::TestDb::postgres().await else {
        return;
    };
    let cfg_a = db.cp_config();
    let mut cfg_b = db.cp_config();
    cfg_b.data_dir = db.dir.path().join("cp-b");
    let url = db.url.clone();
    let cp_a = TestCp::start_with(db, cfg_a).await;
    let db_b = crate::harness::TestDb {
        url,
        dir: tempfile::tempdir().unwrap(),
        pg: None,
    };
    let cp_b = TestCp::start_with(db_b, cfg_b).await;
    let dps_a = [cp_a.start_dp().await, cp_a.start_dp().await];
    let dps_b = [cp_b.start_dp().await, cp_b.start_dp().await];

    let write = |cp: &TestCp, prefix: &'static str| {
        let base = cp.base.clone();
        let client = cp.client.clone();
        async move {
            for i in 0..40 {
                let r = client
                    .post(format!("{base}/services"))
                    .json(&json!({"name": format!("{prefix}-{i}"), "host": "x.test"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }
    };
    tokio::join!(
        write(&cp_a, "a"),
        write(&cp_b, "b"),
        write(&cp_a, "a2"),
        write(&cp_b, "b2")
    );
    let (head, hash) = cp_a.head().await;
    assert_eq!(cp_b.head().await, (head, hash.clone()));
    for dp in dps_a.iter().chain(dps_b.iter()) {
        dp.converge(&cp_a, 30).await;
        assert_eq!(dp.state(), (head, hash.clone()));
        assert_eq!(dp.shared().store.list("services").unwrap().len(), 160);
    }
    // Every CP lists all four data planes (the table is shared).
    for cp in [&cp_a, &cp_b] {
        let planes = rpc(cp, "deltaplane.data_planes", None).await;
        assert_eq!(planes.as_array().unwrap().len(), 4, "{planes}");
    }
    cp_b.shutdown().await;
    cp_a.shutdown().await;
}

/// A data plane killed in the middle of a catch-up that takes many answers resumes where its
/// last committed answer left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_restarted_mid_catch_up_resumes() {
    let db = crate::harness::TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.max_payload = 4096; // a few versions per answer
    let cp = TestCp::start_with(db, cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let mut dcfg = cp.dp_config(dir.path());
    dcfg.cluster.max_payload = 4096;
    let mut dp = TestDp::start(dcfg, dir).await;
    dp.converge(&cp, 20).await;
    dp.stop().await;
    let (start, _) = dp.state();
    for i in 0..300 {
        cp.create(
            "/consumers",
            json!({"username": format!("user-{i}-{}", uuid::Uuid::new_v4())}),
        )
        .await;
    }
    dp.restart().await;
    // Stop it once it is partway.
    dp.wait_version(start + 1, 20).await;
    dp.stop().await;
    let (mid, _) = dp.state();
    let (head, _) = cp.head().await;
    assert!(
        mid > start && mid < head,
        "not mid-stream: {start} < {mid} < {head}"
    );
    dp.restart().await;
    assert!(dp.state().0 >= mid, "went backwards");
    dp.converge(&cp, 30).await;
    assert_eq!(dp.shared().status_json()["full_syncs"], 0);
    cp.shutdown().await;
}

/// With several control planes configured, a dead first one does not stop the data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_fails_over_to_the_next_control_plane() {
    let cp = TestCp::start(crate::harness::Backend::Sqlite)
        .await
        .unwrap();
    service_with_routes(&cp, "fo", 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    let real = cfg.control_planes[0].clone();
    // Nothing listens on the first address.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    cfg.control_planes = vec![dead_addr, real.clone()];
    let dp = TestDp::start(cfg, dir).await;
    dp.converge(&cp, 20).await;
    assert_eq!(dp.shared().link().connected_to, Some(real));
    cp.shutdown().await;
}

/// Runs `sql` on the control plane's database.
async fn cp_sql(cp: &TestCp, sql: &'static str) {
    match cp.store().pool() {
        deltaplane::cp::store::Pool::Sqlite(p) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
        deltaplane::cp::store::Pool::Postgres(p) => {
            sqlx::query(sql).execute(p).await.unwrap();
        }
    }
}

// A control plane that answers get_delta with an error (its change log is unreadable): the
// data plane keeps the link, shows the error, asks again with a doubling back-off (not in a
// tight loop), and recovers at once when a commit is announced.
both_backends!(
    control_plane_errors_are_shown_and_backed_off,
    |backend| async move {
        // Without the window of recent versions in memory: this test is about what the
        // control plane reads from its database.
        let Some(db) = crate::harness::TestDb::new(backend).await else {
            return;
        };
        let mut cp_cfg = db.cp_config();
        cp_cfg.cluster.delta_cache_bytes = 0;
        let cp = TestCp::start_with(db, cp_cfg).await;
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = cp.dp_config(dir.path());
        cfg.sync_poll_interval = Duration::from_millis(100);
        cfg.reconnect_min = Duration::from_millis(100);
        cfg.reconnect_max = Duration::from_secs(10);
        let dp = TestDp::start(cfg, dir).await;
        cp.create("/services", json!({"name": "before", "host": "h"}))
            .await;
        dp.converge(&cp, 20).await;

        // Break the reads get_delta needs (the tables are renamed back below).
        cp_sql(&cp, "ALTER TABLE dp_versions RENAME TO dp_versions_away").await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let st = dp.shared().status_json();
            if st["last_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("control plane error"))
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no error shown: {st}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let link = dp.shared().link();
        let (connects, requests) = (link.connects, link.sync_requests);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let link = dp.shared().link();
        assert!(link.connected_to.is_some(), "the link was dropped");
        assert_eq!(link.connects, connects, "the data plane reconnected");
        // 100, 200, 400, 800 ms apart: at most 5 in 2 s (polling every 100 ms would ask 20
        // times). The next attempt is 1.6 s after the fourth, about 3.1 s in.
        let asked = link.sync_requests - requests;
        assert!(
            asked <= 5,
            "asked {asked} times in 2 s while the control plane failed"
        );
        assert!(link.last_error.is_some());

        // Repaired; a commit is announced and the data plane asks at once, not when its
        // back-off ends (about a second from now).
        cp_sql(&cp, "ALTER TABLE dp_versions_away RENAME TO dp_versions").await;
        let started = tokio::time::Instant::now();
        cp.create("/services", json!({"name": "after", "host": "h"}))
            .await;
        dp.converge(&cp, 20).await;
        assert!(
            started.elapsed() < Duration::from_millis(800),
            "converged only after {:?} (the back-off, not the announcement)",
            started.elapsed()
        );
        assert_eq!(dp.shared().status_json()["last_error"], Value::Null);
        cp.shutdown().await;
    }
);

// `--status-report-interval`: after pushed versions the data plane reports to the control
// plane at most once per interval, and always ends up reporting the latest version (issue 11:
// one report read per DP per version is half of the CP's fan-out CPU).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_versions_are_reported_at_most_once_per_interval() {
    let cp = TestCp::start(crate::harness::Backend::Sqlite)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    let interval = Duration::from_secs(5);
    cfg.status_report_interval = interval;
    let dp = TestDp::start(cfg, dir).await;
    let svc = service_with_routes(&cp, "reported", 1).await;
    dp.converge(&cp, 20).await;
    let listed = || async {
        let planes = rpc(&cp, "deltaplane.data_planes", None).await;
        (
            planes[0]["version"].as_i64().unwrap_or(-1),
            planes[0]["state_hash"].clone(),
        )
    };
    // The setup's versions may have been pushed within an interval of the first report: wait
    // for their (late) report, then one interval past it, so that the next push is reported
    // at once.
    let (setup_head, _) = cp.head().await;
    let deadline = tokio::time::Instant::now() + interval + Duration::from_secs(5);
    while listed().await.0 < setup_head {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the setup's versions were never reported"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(interval + Duration::from_millis(200)).await;
    let patch = |n: u64| {
        let cp = &cp;
        let svc = svc.clone();
        async move {
            let r = cp
                .patch(&format!("/services/{svc}"), json!({"retries": n}))
                .await;
            assert_eq!(r.status, 200, "{r:?}");
        }
    };
    patch(1).await;
    let (first, _) = cp.head().await;
    dp.wait_version(first, 10).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while listed().await.0 < first {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first push was not reported at once"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reported_at = tokio::time::Instant::now();
    // Two more pushes within the interval: applied at once, reported later, together.
    patch(2).await;
    patch(3).await;
    let (head, hash) = cp.head().await;
    dp.wait_version(head, 10).await;
    if reported_at.elapsed() < interval - Duration::from_millis(1500) {
        assert_eq!(
            listed().await.0,
            first,
            "reported before the interval passed"
        );
    }
    let deadline = reported_at + interval + Duration::from_secs(5);
    loop {
        let (v, h) = listed().await;
        if v == head {
            assert_eq!(h, hash.as_str(), "the late report carries the state hash");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the latest version was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reported_at.elapsed() >= interval - Duration::from_millis(100),
        "the waiting report went out before its interval"
    );
    cp.shutdown().await;
}
