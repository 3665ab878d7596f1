//! Sync v1 (`/v1/outlet`, Kong's full-config push) end to end, and the choice between v1 and
//! v2.

use std::time::Duration;

use deltaplane::cp::store::DataPlaneRow;
use deltaplane::dp::SyncMode;
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::both_backends;
use crate::harness::{Backend, TestCp, TestDb, TestDp};
use crate::rawpeer::{self, RawPeer};

/// A control plane with a short push interval (and `tweak` applied).
async fn cp_with(
    backend: Backend,
    tweak: impl FnOnce(&mut deltaplane::cp::CpConfig),
) -> Option<TestCp> {
    let db = TestDb::new(backend).await?;
    let mut cfg = db.cp_config();
    cfg.cluster.push_interval = Duration::from_millis(200);
    tweak(&mut cfg);
    Some(TestCp::start_with(db, cfg).await)
}

async fn dp_with(
    cp: &TestCp,
    sync: SyncMode,
    tweak: impl FnOnce(&mut deltaplane::dp::DpConfig),
) -> TestDp {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.sync = sync;
    tweak(&mut cfg);
    TestDp::start(cfg, dir).await
}

/// `deltaplane.sync_version` of a data plane.
fn sync_version(dp: &TestDp) -> Value {
    dp.shared().sync_version()
}

/// Waits until the data plane's link says `protocol`.
async fn wait_protocol(dp: &TestDp, protocol: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dp.shared().link().protocol.map(|p| p.as_str()) != Some(protocol)
        || dp.shared().link().connected_to.is_none()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never on {protocol}: {}",
            dp.shared().status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The control plane's status row of `node_id`, once `f` accepts it.
async fn row_until(
    cp: &TestCp,
    node_id: &str,
    what: &str,
    f: impl Fn(&DataPlaneRow) -> bool,
) -> DataPlaneRow {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let rows = cp.running().fleet.data_plane_rows().await.unwrap();
        if let Some(r) = rows.iter().find(|r| r.node_id == node_id && f(r)) {
            return r.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: {:?}",
            rows.iter().find(|r| r.node_id == node_id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Both data planes equal the control plane's head (version and state hash, recomputed over
/// what they store) and report the same `state_hash`.
async fn both_converge(cp: &TestCp, v2: &TestDp, v1: &TestDp) {
    v2.converge(cp, 30).await;
    v1.converge(cp, 30).await;
    let (a, b) = (sync_version(v2), sync_version(v1));
    assert_eq!(a["state_hash"], b["state_hash"]);
    assert_eq!(a["version"], b["version"]);
    assert_eq!(a["protocol"], "v2");
    assert_eq!(b["protocol"], "v1");
}

both_backends!(v1_and_v2_data_planes_converge_alike, |backend| async move {
    let Some(cp) = cp_with(backend, |_| {}).await else {
        return;
    };
    let v2 = dp_with(&cp, SyncMode::V2, |_| {}).await;
    let v1 = dp_with(&cp, SyncMode::V1, |_| {}).await;
    both_converge(&cp, &v2, &v1).await;

    // Creates, including a disabled service with a route and a plugin (Kong's v1 export
    // would omit all three; ours keeps them so both data planes store the same).
    let svc = cp
        .create(
            "/services",
            json!({"name": "orders", "url": "http://example.com:8080/api"}),
        )
        .await;
    let sid = svc["id"].as_str().unwrap().to_owned();
    for i in 0..7 {
        cp.create(
            &format!("/services/{sid}/routes"),
            json!({"name": format!("r{i}"), "paths": [format!("/o/{i}")]}),
        )
        .await;
    }
    cp.create(
        &format!("/services/{sid}/plugins"),
        json!({"name": "key-auth"}),
    )
    .await;
    let off = cp
        .create(
            "/services",
            json!({"name": "off", "host": "off.example", "enabled": false}),
        )
        .await;
    let off_id = off["id"].as_str().unwrap().to_owned();
    cp.create(
        &format!("/services/{off_id}/routes"),
        json!({"paths": ["/off"]}),
    )
    .await;
    cp.create(
        &format!("/services/{off_id}/plugins"),
        json!({"name": "cors", "enabled": false}),
    )
    .await;
    let c = cp.create("/consumers", json!({"username": "alice"})).await;
    cp.create(
        &format!("/consumers/{}/key-auth", c["id"].as_str().unwrap()),
        json!({"key": "secret-1"}),
    )
    .await;
    both_converge(&cp, &v2, &v1).await;
    let services = v1.shared().store.list("services").unwrap();
    assert!(
        services.iter().any(|s| s["enabled"] == false),
        "the disabled service is stored"
    );
    let routes = v1.shared().store.list("routes").unwrap();
    assert_eq!(routes.len(), 8);
    assert!(
        routes[0]["service"]["id"].is_string(),
        "foreign keys unflattened: {}",
        routes[0]
    );

    // Updates.
    let r = cp
        .patch(&format!("/services/{sid}"), json!({"retries": 9}))
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    let r = cp.patch("/routes/r3", json!({"paths": ["/changed"]})).await;
    assert_eq!(r.status, 200, "{r:?}");
    both_converge(&cp, &v2, &v1).await;

    // Deletes and cascades (a consumer and its credential; a service's routes go first).
    assert_eq!(cp.delete("/consumers/alice").await.status, 204);
    assert_eq!(cp.delete("/routes/r0").await.status, 204);
    both_converge(&cp, &v2, &v1).await;
    assert!(
        v1.shared()
            .store
            .list("keyauth_credentials")
            .unwrap()
            .is_empty()
    );

    // The v1 data plane's status row: protocol v1, the md5 it pinged, at the head.
    let head = cp.head().await.0;
    let payload = cp.running().v1.latest().expect("a payload");
    let id = v1.shared().node_id.clone();
    let row = row_until(&cp, &id, "v1 row at the head", |r| r.version == head).await;
    assert_eq!(row.protocol, "v1");
    assert_eq!(
        row.config_hash.as_deref(),
        Some(payload.config_hash.as_str())
    );
    assert_eq!(row.sync_status, "normal");
    cp.shutdown().await;
});

/// A push whose hash equals the stored one applies nothing: on reconnect the control plane
/// sends the same version again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_hash_pushes_are_skipped() {
    let cp = cp_with(Backend::Sqlite, |_| {}).await.unwrap();
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let mut dp = dp_with(&cp, SyncMode::V1, |_| {}).await;
    dp.converge(&cp, 20).await;
    assert_eq!(dp.shared().link().full_syncs, 1);
    dp.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dp.shared().link().v1_skipped == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            dp.shared().status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        dp.shared().link().full_syncs,
        0,
        "nothing applied after the restart"
    );
    dp.converge(&cp, 20).await;
    // A Kong-shaped message (no deltaplane fields) with the stored hash is skipped too; one
    // with another hash is applied.
    let payload = cp.running().v1.latest().unwrap();
    let raw = deltaplane::proto::v1::gunzip(&payload.bytes, 1 << 30).unwrap();
    let mut msg: Value = serde_json::from_slice(&raw).unwrap();
    let m = msg.as_object_mut().unwrap();
    m.remove("deltaplane_version");
    m.remove("deltaplane_epoch");
    let gz = deltaplane::proto::v1::gzip(&serde_json::to_vec(&msg).unwrap()).unwrap();
    let store = dp.shared().store.clone();
    let dir = dp.cfg.data_dir.clone();
    let same = deltaplane::dp::v1::apply_message(&store, &dir, &gz, 1 << 30).unwrap();
    assert!(
        matches!(same, deltaplane::dp::v1::Outcome::Same),
        "{same:?}"
    );
    msg["config_hash"] = json!("0123456789abcdef0123456789abcdef");
    let gz = deltaplane::proto::v1::gzip(&serde_json::to_vec(&msg).unwrap()).unwrap();
    let before = store.state().version;
    let applied = deltaplane::dp::v1::apply_message(&store, &dir, &gz, 1 << 30).unwrap();
    assert!(
        matches!(applied, deltaplane::dp::v1::Outcome::Applied { .. }),
        "{applied:?}"
    );
    assert_eq!(
        store.state().version,
        before + 1,
        "a Kong CP's push takes the next local version"
    );
    dp.stop().await;
    cp.shutdown().await;
}

/// 1,000 writes while a v1 data plane follows: far fewer exports and pushes than writes, one
/// export per pushed version, and the data plane ends on the last state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_coalesces_into_few_pushes() {
    let cp = cp_with(Backend::Sqlite, |c| {
        c.cluster.push_interval = Duration::from_millis(300);
    })
    .await
    .unwrap();
    let dp = dp_with(&cp, SyncMode::V1, |_| {}).await;
    let dp2 = dp_with(&cp, SyncMode::V1, |_| {}).await;
    dp.converge(&cp, 20).await;
    dp2.converge(&cp, 20).await;
    let hub = &cp.running().v1;
    let (exports0, pushes0) = (hub.exports(), hub.pushes());
    let writes = 1000;
    let cp_ref = &cp;
    futures::stream::iter(0..writes)
        .for_each_concurrent(8, |i| async move {
            cp_ref
                .create("/consumers", json!({"username": format!("u{i}")}))
                .await;
        })
        .await;
    dp.converge(&cp, 60).await;
    dp2.converge(&cp, 60).await;
    assert_eq!(dp.shared().store.list("consumers").unwrap().len(), writes);
    let (exports, pushes) = (hub.exports() - exports0, hub.pushes() - pushes0);
    eprintln!("{writes} writes: {pushes} pushes, {exports} exports");
    assert!(
        pushes >= 1 && pushes < writes as u64 / 10,
        "{pushes} pushes"
    );
    // Shared: one export per version pushed, whatever the number of data planes.
    assert!(
        exports <= pushes + 1,
        "{exports} exports for {pushes} pushes"
    );
    cp.shutdown().await;
}

/// `--cluster-sync-v2=false`: the hello offers no `kong.sync.v2` (Kong's cluster_rpc_sync =
/// off); an `auto` data plane falls back to v1 and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_when_the_hello_lacks_sync_v2() {
    let cp = cp_with(Backend::Sqlite, |c| c.cluster.sync_v2 = false)
        .await
        .unwrap();
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let dp = dp_with(&cp, SyncMode::Auto, |_| {}).await;
    wait_protocol(&dp, "v1").await;
    dp.converge(&cp, 20).await;
    assert_eq!(sync_version(&dp)["protocol"], "v1");
    cp.create("/services", json!({"name": "t", "host": "h"}))
        .await;
    dp.converge(&cp, 20).await;
    cp.shutdown().await;
}

/// `--cluster-rpc=false`: no `/v2/outlet` at all (404, as a Kong CP with cluster_rpc = off).
/// Kong's data plane would retry v2 forever; an `auto` data plane falls back to v1, a `v2`
/// one keeps trying and gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_when_v2_outlet_refuses_the_upgrade() {
    let cp = cp_with(Backend::Sqlite, |c| c.cluster.rpc = false)
        .await
        .unwrap();
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let tls = rawpeer::tls_to(&cp).await;
    let refused = rawpeer::upgrade(tls, "/v2/outlet", Some("kong.meta.v1")).await;
    assert!(refused.is_err(), "/v2/outlet must be refused");
    let v2_only = dp_with(&cp, SyncMode::V2, |_| {}).await;
    let dp = dp_with(&cp, SyncMode::Auto, |_| {}).await;
    wait_protocol(&dp, "v1").await;
    dp.converge(&cp, 20).await;
    assert_eq!(v2_only.state().0, 0, "a v2-only data plane gets nothing");
    assert!(
        v2_only
            .shared()
            .link()
            .last_error
            .is_some_and(|e| e.contains("refused")),
        "{}",
        v2_only.shared().status_json()
    );
    cp.shutdown().await;
}

/// A data plane on v1 re-checks v2 on every reconnect and moves up once it is offered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_up_to_v2_when_the_control_plane_offers_it() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster_listen = format!("127.0.0.1:{port}").parse().unwrap();
    cfg.cluster.push_interval = Duration::from_millis(200);
    let mut off = cfg.clone();
    off.cluster.sync_v2 = false;
    let cp = TestCp::start_with(db, off).await;
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let dp = dp_with(&cp, SyncMode::Auto, |_| {}).await;
    wait_protocol(&dp, "v1").await;
    dp.converge(&cp, 20).await;

    // The same database and address, now with sync v2.
    let TestCp {
        cp: running, db, ..
    } = cp;
    running.unwrap().shutdown().await;
    let cp = TestCp::start_with(db, cfg).await;
    cp.create("/services", json!({"name": "t", "host": "h"}))
        .await;
    wait_protocol(&dp, "v2").await;
    dp.converge(&cp, 20).await;
    assert_eq!(sync_version(&dp)["protocol"], "v2");
    cp.shutdown().await;
}

/// An older minor on v1 is accepted with the fields it does not know removed, and stores the
/// control plane's hash from before that transform; another major is refused and recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_version_compatibility_on_v1() {
    let cp = cp_with(Backend::Sqlite, |_| {}).await.unwrap();
    let svc = cp
        .create("/services", json!({"name": "v", "host": "v"}))
        .await;
    cp.create(
        &format!("/services/{}/plugins", svc["id"].as_str().unwrap()),
        json!({"name": "key-auth", "instance_name": "ka-1"}),
    )
    .await;

    let old = dp_with(&cp, SyncMode::V1, |c| {
        c.kong_compat_version = "3.1.0".into()
    })
    .await;
    let (head, _) = cp.head().await;
    old.wait_version(head, 20).await;
    let plugins = old.shared().store.list("plugins").unwrap();
    assert_eq!(plugins.len(), 1);
    assert!(plugins[0].get("instance_name").is_none(), "{}", plugins[0]);
    let payload = cp.running().v1.latest().unwrap();
    let stored = deltaplane::dp::v1::load_hash(&old.cfg.data_dir, &old.shared().store).unwrap();
    assert_eq!(
        stored.cp_hash, payload.config_hash,
        "the hash before the transform"
    );
    let id = old.shared().node_id.clone();
    let row = row_until(&cp, &id, "older DP row", |r| r.version == head).await;
    assert_eq!(
        row.config_hash.as_deref(),
        Some(payload.config_hash.as_str())
    );
    assert_eq!(row.kong_version, "3.1.0");

    let major = dp_with(&cp, SyncMode::V1, |c| {
        c.kong_compat_version = "4.0.0".into()
    })
    .await;
    let id = major.shared().node_id.clone();
    let row = row_until(&cp, &id, "refused", |r| {
        r.sync_status == "kong_version_incompatible"
    })
    .await;
    assert_eq!(row.protocol, "v1");
    assert!(row.connected_to.is_none());
    assert_eq!(major.state().0, 0, "nothing sent");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !major
        .shared()
        .link()
        .last_error
        .is_some_and(|e| e.contains("kong_version_incompatible"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            major.shared().status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cp.shutdown().await;
}

/// Plugin compatibility from `basic_info.plugins`: the configuration is withheld (and the
/// status recorded) while it uses a plugin the data plane lacks, and sent once it does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_set_compatibility_on_v1() {
    let cp = cp_with(Backend::Sqlite, |_| {}).await.unwrap();
    let svc = cp
        .create("/services", json!({"name": "p", "host": "p"}))
        .await;
    let rl = cp
        .create(
            &format!("/services/{}/plugins", svc["id"].as_str().unwrap()),
            json!({"name": "rate-limiting", "config": {"minute": 10}}),
        )
        .await;
    let dp = dp_with(&cp, SyncMode::V1, |c| {
        c.plugins = Some(vec!["key-auth".into(), "cors".into()]);
    })
    .await;
    let id = dp.shared().node_id.clone();
    row_until(&cp, &id, "withheld", |r| {
        r.sync_status == "plugin_set_incompatible"
    })
    .await;
    assert_eq!(dp.state().0, 0);
    // Our data plane asked to be told why (Kong's is not): it shows the reason.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !dp
        .shared()
        .link()
        .last_error
        .is_some_and(|e| e.starts_with("plugin_set_incompatible:") && e.contains("rate-limiting"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            dp.shared().status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dp2 = dp_with(&cp, SyncMode::V1, |c| {
        c.plugins = Some(vec!["rate-limiting:3.11.0".into()]);
    })
    .await;
    let id2 = dp2.shared().node_id.clone();
    row_until(&cp, &id2, "newer plugin", |r| {
        r.sync_status == "plugin_version_incompatible"
    })
    .await;
    assert_eq!(
        cp.delete(&format!("/plugins/{}", rl["id"].as_str().unwrap()))
            .await
            .status,
        204
    );
    dp.converge(&cp, 20).await;
    row_until(&cp, &id, "normal again", |r| r.sync_status == "normal").await;
    assert_eq!(dp.shared().link().last_error, None);
    cp.shutdown().await;
}

/// A configuration of nothing but the default workspace: the data plane reports the 32-zero
/// hash, as a Kong data plane stores (and, unlike Kong's, does not apply it again on every
/// push).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workspace_only_config_reports_the_empty_hash() {
    let cp = cp_with(Backend::Sqlite, |_| {}).await.unwrap();
    let mut dp = dp_with(&cp, SyncMode::V1, |_| {}).await;
    dp.converge(&cp, 20).await;
    let id = dp.shared().node_id.clone();
    let head = cp.head().await.0;
    let row = row_until(&cp, &id, "zero hash", |r| r.version == head).await;
    assert_eq!(
        row.config_hash.as_deref(),
        Some("00000000000000000000000000000000")
    );
    let payload = cp.running().v1.latest().unwrap();
    assert_ne!(payload.config_hash, "00000000000000000000000000000000");
    dp.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while dp.shared().link().v1_skipped == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{}",
            dp.shared().status_json()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(dp.shared().link().full_syncs, 0);
    cp.shutdown().await;
}

/// The endpoint's rules: 400 without the required query arguments; after `basic_info` only
/// 32-byte pings (answered with a pong) and close frames are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_v1_endpoint_accepts_only_what_kong_does() {
    let cp = cp_with(Backend::Sqlite, |_| {}).await.unwrap();
    for path in [
        "/v1/outlet?node_id=x",
        "/v1/outlet?node_version=3.10.0",
        "/v1/outlet",
    ] {
        let tls = rawpeer::tls_to(&cp).await;
        match rawpeer::upgrade(tls, path, None).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert_eq!(r.status(), 400, "{path}")
            }
            other => panic!("{path}: {:?}", other.map(|_| ())),
        }
    }
    let node = uuid::Uuid::new_v4().to_string();
    let connect = || async {
        let tls = rawpeer::tls_to(&cp).await;
        let path = format!("/v1/outlet?node_id={node}&node_hostname=raw&node_version=3.10.0");
        let mut peer = RawPeer::new(rawpeer::upgrade(tls, &path, None).await.unwrap());
        let info = json!({"type": "basic_info", "plugins": [], "labels": {}});
        peer.send_message(Message::Binary(Bytes::from(
            serde_json::to_vec(&info).unwrap(),
        )))
        .await;
        peer
    };
    let mut peer = connect().await;
    // The initial push: gzip JSON.
    let gz = peer.next_binary().await;
    let msg: Value =
        serde_json::from_slice(&deltaplane::proto::v1::gunzip(&gz, 1 << 30).unwrap()).unwrap();
    assert_eq!(msg["type"], "reconfigure");
    assert_eq!(msg["config_table"]["_format_version"], "3.0");
    let hash = msg["config_hash"].as_str().unwrap().to_owned();
    assert_eq!(msg["hashes"]["config"], hash.as_str());
    // A ping with the hash: a pong comes back, the status is recorded.
    peer.ws
        .send(Message::Ping(Bytes::from(hash.clone())))
        .await
        .unwrap();
    let pong = tokio::time::timeout(rawpeer::WAIT, async {
        loop {
            match peer.ws.next().await {
                Some(Ok(Message::Pong(p))) => return p,
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .expect("a pong");
    assert_eq!(pong.as_ref(), hash.as_bytes());
    row_until(&cp, &node, "pinged hash recorded", |r| {
        r.config_hash.as_deref() == Some(hash.as_str()) && r.protocol == "v1"
    })
    .await;
    // A text frame ends the connection (1003, unsupported data).
    peer.send_message(Message::Text("hello".into())).await;
    assert_eq!(close_code(&mut peer).await, Some(1003), "a text frame");
    // So does a ping that is not 32 bytes.
    let mut peer = connect().await;
    let _ = peer.next_binary().await;
    peer.ws
        .send(Message::Ping(Bytes::from_static(b"short")))
        .await
        .unwrap();
    assert_eq!(close_code(&mut peer).await, Some(1008), "an invalid hash");
    // A first frame that is not a basic_info ends it too, before any push (1008).
    for first in [&b"not json"[..], br#"{"type": "ping"}"#, br#"[1, 2]"#] {
        let tls = rawpeer::tls_to(&cp).await;
        let path = format!("/v1/outlet?node_id={node}&node_hostname=raw&node_version=3.10.0");
        let mut peer = RawPeer::new(rawpeer::upgrade(tls, &path, None).await.unwrap());
        peer.send_message(Message::Binary(Bytes::copy_from_slice(first)))
            .await;
        assert_eq!(
            close_code(&mut peer).await,
            Some(1008),
            "first frame {:?}",
            String::from_utf8_lossy(first)
        );
    }
    cp.shutdown().await;
}

/// True when the connection closes (close frame or end) within the wait.
/// Waits for the control plane to end the connection; its close code (`None`: no code).
async fn close_code(peer: &mut RawPeer) -> Option<u16> {
    tokio::time::timeout(rawpeer::WAIT, async {
        loop {
            match peer.ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .expect("the control plane must end the connection")
}
