//! Work per version, not per data plane: pushed deltas to deltaplane data planes (one shared
//! frame), at most one `notify_new_version` per version to Kong data planes, and answers from
//! the recent versions in memory.

use std::time::Duration;

use serde_json::json;

use crate::harness::{Backend, TestCp};
use crate::rawpeer::{KONG_CAPS, KONG_ENCODINGS, Next, RawPeer, get_delta};
use deltaplane::proto::version_string;
use tokio_tungstenite::tungstenite::Message;

/// A deltaplane data plane at the head receives each new version pushed and applies it
/// without asking: its `get_delta` requests do not grow with the versions written.
#[tokio::test]
async fn new_versions_are_pushed_and_applied_without_get_delta() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    cp.create(
        "/services",
        json!({"name": "s0", "url": "http://a.example"}),
    )
    .await;
    let dp = cp.start_dp().await;
    dp.converge(&cp, 10).await;
    let before = dp.shared().link();
    for i in 1..=20 {
        cp.create(
            "/services",
            json!({"name": format!("s{i}"), "url": "http://a.example"}),
        )
        .await;
        let (v, _) = cp.head().await;
        dp.wait_version(v, 10).await;
    }
    dp.converge(&cp, 10).await;
    let after = dp.shared().link();
    let pushed = after.pushes_applied - before.pushes_applied;
    let asked = after.sync_requests - before.sync_requests;
    assert!(
        pushed >= 15,
        "expected most of 20 versions pushed, got {pushed} (asked {asked} times)"
    );
    assert!(
        asked <= 5,
        "a data plane at the head asked get_delta {asked} times for 20 pushed versions"
    );
    assert_eq!(after.pushes_refused, before.pushes_refused);
    // The control plane knows where the data plane is: its status report after each push.
    let (v, hash) = cp.head().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let planes = cp.get("/clustering/data-planes").await;
        let row = planes.body["data"][0].clone();
        if row["config_hash"] == version_string(v) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "control plane never saw version {v} ({hash}): {row}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A push the data plane cannot apply (it is not at `after`) makes it fetch instead; the
/// result is the same configuration.
#[tokio::test]
async fn a_data_plane_behind_fetches_what_it_missed() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let mut dp = cp.start_dp().await;
    dp.converge(&cp, 10).await;
    dp.stop().await;
    for i in 0..5 {
        cp.create(
            "/services",
            json!({"name": format!("gone{i}"), "url": "http://a.example"}),
        )
        .await;
    }
    dp.restart().await;
    // While it catches up, more versions come (pushed from versions it may not hold yet).
    for i in 0..5 {
        cp.create(
            "/services",
            json!({"name": format!("more{i}"), "url": "http://a.example"}),
        )
        .await;
    }
    dp.converge(&cp, 10).await;
}

/// Kong's data plane over sync v2: at most one `notify_new_version` per new version, none for
/// a version it holds, and one even before its first `get_delta`.
#[tokio::test]
async fn kong_data_planes_get_one_notification_per_version() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    cp.create(
        "/services",
        json!({"name": "first", "url": "http://a.example"}),
    )
    .await;
    let mut kong = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    // No get_delta yet: a write is still announced.
    cp.create(
        "/services",
        json!({"name": "second", "url": "http://a.example"}),
    )
    .await;
    let (v2, _) = cp.head().await;
    let n = kong.next_json().await;
    assert_eq!(n["method"], "kong.sync.v2.notify_new_version", "{n}");
    assert_eq!(n["params"][0]["default"]["new_version"], version_string(v2));
    kong.send(&json!({"jsonrpc": "2.0", "id": n["id"], "result": true}))
        .await;
    // Catch up to the head: the answer holds v2, so v2 is never announced again.
    let answer = kong.call(&get_delta(Some(1), &version_string(0))).await;
    assert_eq!(
        answer["result"]["default"]["latest_version"],
        version_string(v2)
    );
    // Five writes: each announced once, in order (a write may be coalesced with the next
    // before it is announced: then its version is skipped, never repeated).
    let mut seen = Vec::new();
    for i in 0..5 {
        cp.create(
            "/services",
            json!({"name": format!("w{i}"), "url": "http://a.example"}),
        )
        .await;
        let (v, _) = cp.head().await;
        loop {
            let n = kong.next_json().await;
            assert_eq!(n["method"], "kong.sync.v2.notify_new_version", "{n}");
            kong.send(&json!({"jsonrpc": "2.0", "id": n["id"], "result": true}))
                .await;
            let announced = n["params"][0]["default"]["new_version"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(
                seen.last().is_none_or(|last: &String| announced > *last),
                "announced {announced} after {seen:?}"
            );
            assert_ne!(announced, version_string(v2), "a version it holds");
            seen.push(announced.clone());
            if announced == version_string(v) {
                break;
            }
        }
        // Report it holds v (Kong's status notification after applying).
        kong.send(&get_delta(None, &version_string(v))).await;
    }
    // Nothing else comes: no repeated notification while the data plane is at the head.
    match tokio::time::timeout(Duration::from_millis(500), kong.next()).await {
        Err(_) => {}
        Ok(Next::Frame(Message::Binary(b))) => {
            let text = deltaplane::proto::codec::decode(kong.encoding.unwrap(), &b, 1 << 20)
                .unwrap_or_default();
            panic!("unexpected frame: {}", String::from_utf8_lossy(&text));
        }
        Ok(other) => panic!("unexpected: {other:?}"),
    }
}

/// An idle data plane at the head asking again (its safety poll) costs no database read:
/// the answer comes from the recent versions. Observed through the store being unreachable:
/// with the database closed, an up-to-date data plane still gets its empty answer.
#[tokio::test]
async fn an_up_to_date_data_plane_is_answered_from_memory() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    cp.create("/services", json!({"name": "a", "url": "http://a.example"}))
        .await;
    let mut kong = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    let first = kong.call(&get_delta(Some(1), &version_string(0))).await;
    let latest = first["result"]["default"]["latest_version"]
        .as_str()
        .unwrap()
        .to_owned();
    // One more version, read into memory by its announcement.
    cp.create("/services", json!({"name": "b", "url": "http://a.example"}))
        .await;
    let (v, _) = cp.head().await;
    let n = kong.next_json().await;
    assert_eq!(n["method"], "kong.sync.v2.notify_new_version", "{n}");
    kong.send(&json!({"jsonrpc": "2.0", "id": n["id"], "result": true}))
        .await;
    // Close the pool: every database read fails from here on.
    cp.store().close().await;
    let answer = kong.call(&get_delta(Some(2), &latest)).await;
    assert_eq!(
        answer["result"]["default"]["latest_version"],
        version_string(v),
        "{answer}"
    );
    assert_eq!(
        answer["result"]["default"]["deltas"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{answer}"
    );
    let again = kong.call(&get_delta(Some(3), &version_string(v))).await;
    assert_eq!(
        again["result"]["default"]["deltas"],
        json!([]),
        "an up-to-date data plane gets an empty answer: {again}"
    );
}

/// The window of recent versions keeps what the database purged: a data plane behind the
/// database's horizon but inside the window catches up with deltas, not a full sync, and ends
/// with the control plane's state hash.
#[tokio::test]
async fn the_window_serves_versions_the_database_purged() {
    let db = crate::harness::TestDb::sqlite();
    let st = crate::sync::restart_behind_the_horizon(db, true).await;
    assert_eq!(st["full_syncs"], 0, "{st}");
    assert!(st["incremental_syncs"].as_u64().unwrap() >= 1, "{st}");
}
