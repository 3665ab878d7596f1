//! A data plane that cannot sync says why, and a control plane honours what a data plane
//! announced about itself (issue 10, "The DP must say why it is not syncing").

use std::time::Duration;

use deltaplane::cp::store::Op;
use serde_json::{Value, json};

use crate::harness::{Backend, TestCp, TestDb, TestDp};
use crate::rawpeer::RawPeer;

/// Consumers with random tags: a configuration that compresses to well over 8 KiB.
async fn seed(cp: &TestCp, n: usize) {
    let ops: Vec<Op> = (0..n)
        .map(|j| Op::Create {
            entity: "consumers".into(),
            input: json!({
                "username": format!("diag-{j}"),
                "custom_id": uuid::Uuid::new_v4().to_string(),
                "tags": [uuid::Uuid::new_v4().simple().to_string()],
            }),
            scope: None,
        })
        .collect();
    for r in cp.store().write_batch(ops).await {
        r.expect("seed write");
    }
}

async fn eventually(what: &str, secs: u64, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A data plane whose `--cluster-max-payload` is far below the size of the configuration: the
/// control plane pages the full sync to the data plane's limit (it announced it in its hello)
/// instead of sending one frame the data plane closes the connection on (1009) and downloads
/// again after every reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_plane_with_a_smaller_payload_gets_pages_not_a_loop() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    seed(&cp, 1500).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.cluster.max_payload = 8192;
    let dp = TestDp::start(cfg, dir).await;
    dp.converge(&cp, 30).await;
    let st = dp.shared().status_json();
    assert!(st["paged_transfers"].as_u64().unwrap() >= 1, "{st}");
    assert_eq!(st["connects"], 1, "one connection, no reconnect loop: {st}");
    assert_eq!(st["last_error"], Value::Null, "{st}");
    cp.shutdown().await;
}

/// A Kong data plane cannot page: when the configuration does not fit the limit it announced,
/// the control plane withholds it with an error that names the limit, on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kong_data_plane_too_small_for_the_config_is_told_why() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    seed(&cp, 1500).await;
    let mut peer = RawPeer::connect(&cp).await;
    let kong_conf = json!({"role": "data_plane", "cluster_max_payload": 4096});
    let answer = peer
        .hello_with(&["kong.sync.v2"], &["x-snappy-framed"], kong_conf)
        .await;
    assert!(answer.get("result").is_some(), "{answer}");
    let v = peer
        .call(&crate::rawpeer::get_delta(
            Some(7),
            deltaplane::proto::EMPTY_VERSION,
        ))
        .await;
    let message = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(v["error"]["code"], -32000, "{v}");
    assert!(message.contains("cluster_max_payload"), "{v}");
    // The control plane's row says the same.
    eventually("the row shows the error", 20, async || {
        cp.running()
            .fleet
            .data_plane_rows()
            .await
            .unwrap()
            .iter()
            .any(|r| r.last_error.as_deref() == Some(message.as_str()))
    })
    .await;
    cp.shutdown().await;
}

/// While the control plane is down the data plane shows why it cannot connect, with what to
/// do; once it reconnects and is at the head (nothing to apply), the error is gone. The
/// restarted control plane lists the data planes of its previous run as disconnected until
/// they come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_show_while_the_cp_is_away_and_clear_after_a_sync() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    let port = crate::harness::free_port();
    cfg.cluster_listen = format!("127.0.0.1:{port}").parse().unwrap();
    let cp = TestCp::start_with(db, cfg.clone()).await;
    cp.create("/services", json!({"name": "s", "host": "example.com"}))
        .await;
    let dir = tempfile::tempdir().unwrap();
    let mut dp_cfg = cp.dp_config(dir.path());
    dp_cfg.reconnect_min = Duration::from_millis(100);
    dp_cfg.reconnect_max = Duration::from_millis(200);
    let mut dp = TestDp::start(dp_cfg, dir).await;
    dp.converge(&cp, 20).await;
    let node = dp.shared().node_id.clone();

    // The CP goes away while the DP keeps running: the DP says why it cannot sync.
    let db = cp.db;
    let running = cp.cp.unwrap();
    running.shutdown().await;
    eventually("the DP shows why it is not syncing", 20, async || {
        dp.shared()
            .link()
            .last_error
            .is_some_and(|e| e.contains("nothing listens") && e.contains("8005"))
    })
    .await;
    // Back, at the same address: the DP reconnects, is at the head (nothing to apply), and
    // the old error is gone.
    let cp = TestCp::start_with(db, cfg.clone()).await;
    eventually("in sync, the error cleared", 20, async || {
        let st = dp.shared().status_json();
        st["in_sync"] == true && st["last_error"].is_null()
    })
    .await;
    let st = dp.shared().status_json();
    assert_eq!(
        st["full_syncs"], 1,
        "nothing applied after the reconnect: {st}"
    );

    // A CP restarted while its DP is away lists it as disconnected at once, not "in sync"
    // until its row goes stale.
    dp.stop().await;
    // As a crashed CP leaves it: the row still names the CP as connected, seen just now.
    let mut row = cp
        .store()
        .data_planes()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.node_id == node)
        .expect("its row");
    row.connected_to = Some(cp.running().node_id.clone());
    row.last_seen = deltaplane::node::now_secs();
    cp.store().upsert_data_plane(&row).await.unwrap();
    let db = cp.db;
    let running = cp.cp.unwrap();
    running.shutdown().await;
    let cp = TestCp::start_with(db, cfg).await;
    let rows = cp.running().fleet.data_plane_rows().await.unwrap();
    let row = rows.iter().find(|r| r.node_id == node).expect("its row");
    assert_eq!(row.connected_to, None, "shown as gone after the restart");
    let planes = crate::sync::rpc(&cp, "deltaplane.data_planes", None).await;
    assert_eq!(planes[0]["health"], "disconnected", "{planes}");
    cp.shutdown().await;
}

// === errors that say what to do ===

async fn open_error(url: &str) -> String {
    match deltaplane::cp::store::Store::open(deltaplane::cp::store::StoreOptions::new(url)).await {
        Ok(_) => panic!("{url} opened"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn database_urls_fail_with_cause_and_fix() {
    let e = open_error("mysql://root@127.0.0.1:3306/test").await;
    assert!(
        e.starts_with("unsupported database URL scheme 'mysql'") && e.contains("postgres://"),
        "{e}"
    );
    // Nothing listens on port 1.
    let e = open_error("postgres://postgres@127.0.0.1:1/test").await;
    assert!(
        e.starts_with("connection refused at 127.0.0.1:1") && e.contains("--database-url"),
        "{e}"
    );
}

#[tokio::test]
async fn a_missing_postgres_database_is_named() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let (base, _) = db.url.rsplit_once('/').unwrap();
    let e = open_error(&format!("{base}/deltaplane_no_such_db")).await;
    assert!(
        e.starts_with("database \"deltaplane_no_such_db\" does not exist")
            && e.contains("createdb deltaplane_no_such_db"),
        "{e}"
    );
}

/// A data plane without the control plane's certificate says which flags to pass, and leaves
/// no data directory behind.
#[tokio::test]
async fn a_dp_without_certificates_says_which_flags_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dp");
    let cfg = deltaplane::dp::DpConfig::new(
        &data,
        "127.0.0.1:8005",
        "deltaplane-cp/cluster.crt",
        "deltaplane-cp/cluster.key",
    );
    let e = match deltaplane::dp::start(cfg).await {
        Ok(_) => panic!("started without certificates"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("--cluster-cert") && e.contains("./deltaplane-cp"),
        "{e}"
    );
    assert!(!data.exists(), "left {} behind", data.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_use_is_refused_by_name() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let dp = cp.start_dp().await;
    let mut cfg = dp.cfg.clone();
    cfg.status_listen = "127.0.0.1:0".parse().unwrap();
    let e = match deltaplane::dp::start(cfg).await {
        Ok(_) => panic!("two data planes on one directory"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        e.contains("is in use by another process") && e.contains("--data-dir"),
        "{e}"
    );
    cp.shutdown().await;
}

/// Control planes sharing a database in shared mode must present the same certificate: the
/// second one, with its own, says so at start; with the first one's pair it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_planes_with_different_shared_certificates_are_flagged() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let url = db.url.clone();
    let cfg_a = db.cp_config();
    let cp_a = TestCp::start_with(db, cfg_a).await;
    let other_db = || crate::harness::TestDb {
        url: url.clone(),
        dir: tempfile::tempdir().unwrap(),
        pg: None,
    };
    // Its own data dir: its own generated certificate.
    let db_b = other_db();
    let mut cfg_b = db_b.cp_config();
    cfg_b.database_url = Some(url.clone());
    let cp_b = TestCp::start_with(db_b, cfg_b).await;
    assert_eq!(
        cp_b.running().cluster_cert_conflicts,
        vec![cp_a.running().node_id.clone()]
    );
    cp_b.shutdown().await;

    let db_c = other_db();
    let mut cfg_c = db_c.cp_config();
    cfg_c.database_url = Some(url.clone());
    let (crt, key) = cp_a.running().cluster_cert_files.clone().unwrap();
    cfg_c.cluster_cert = Some((crt.display().to_string(), key.display().to_string()));
    let cp_c = TestCp::start_with(db_c, cfg_c).await;
    // B's record is still recent: C (same certificate as A) differs from B only.
    assert!(
        !cp_c
            .running()
            .cluster_cert_conflicts
            .contains(&cp_a.running().node_id),
        "{:?}",
        cp_c.running().cluster_cert_conflicts
    );
    cp_c.shutdown().await;
    cp_a.shutdown().await;
}

/// Connection failures a user can fix say how: the Admin API port instead of the cluster
/// listener, and a certificate the control plane does not accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_port_and_wrong_certificate_are_explained() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.control_planes = vec![cp.running().admin_addr.to_string()];
    let dp = TestDp::start(cfg, dir).await;
    eventually("the admin port is explained", 20, async || {
        dp.shared()
            .link()
            .last_error
            .is_some_and(|e| e.contains("does not speak TLS") && e.contains("8005"))
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    let (crt, key) = crate::harness::cert_and_key("kong_clustering");
    cfg.cluster_cert = crt;
    cfg.cluster_cert_key = key;
    let dp2 = TestDp::start(cfg, dir).await;
    eventually("the certificate mismatch is explained", 20, async || {
        dp2.shared()
            .link()
            .last_error
            .is_some_and(|e| e.contains("cluster.crt") && e.contains("pki"))
    })
    .await;
    drop((dp, dp2));
    cp.shutdown().await;
}
