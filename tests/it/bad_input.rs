//! Bad input on the cluster listener, each with a defined answer: JSON-RPC errors that keep
//! the connection, close codes for broken framing, refused upgrades and certificates, and
//! connections that stall. Always against a real in-process control plane, and where it
//! matters with a real data plane on the same control plane that must stay unaffected.

use std::time::{Duration, Instant};

use deltaplane::proto::{EMPTY_VERSION, version_string};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::harness::{Backend, Ca, TestCp, TestDb, TestDp, cert_and_key, short_timers};
use crate::rawpeer::{
    KONG_CAPS, KONG_ENCODINGS, RawPeer, WAIT, any_server_client, get_delta, hello_frame, tls_to,
    try_connect_with, upgrade,
};

/// Sends `json` (already serialised, in the negotiated encoding) and returns the answer.
async fn answer_to(dp: &mut RawPeer, json: &[u8]) -> (Value, String) {
    dp.send_bytes(json).await;
    let (v, bytes) = dp.next_answer().await;
    (v, String::from_utf8(bytes).unwrap())
}

/// Asserts that the connection still answers a valid call, and that this answer is the next
/// message (so nothing was sent for what came before).
async fn still_serving(dp: &mut RawPeer, id: u64, head: i64) {
    let v = dp.call(&get_delta(Some(id), &version_string(head))).await;
    assert_eq!(v["result"]["default"]["full_sync"], false, "{v}");
}

#[track_caller]
fn assert_error(v: &Value, code: i64, id: Option<u64>, message: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["message"], message, "{v}");
    match id {
        Some(id) => assert_eq!(v["id"], id, "{v}"),
        None => assert!(v.get("id").is_none(), "id must be omitted: {v}"),
    }
    assert!(v.get("result").is_none(), "{v}");
}

/// Every JSON-RPC level mistake gets its error, and the connection carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_errors_are_answered_and_the_connection_kept() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let (head, _) = cp.head().await;
    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    let v = dp.call(&get_delta(Some(0), EMPTY_VERSION)).await;
    assert_eq!(v["result"]["default"]["full_sync"], true, "{v}");

    // Bad JSON inside valid Snappy: -32700, id omitted.
    let (v, text) = answer_to(&mut dp, br#"{"jsonrpc":"2.0","method":"#).await;
    assert_eq!(
        text,
        r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"}}"#
    );
    assert_error(&v, -32700, None, "Parse error");
    still_serving(&mut dp, 1, head).await;

    // Not Snappy at all: also -32700 (Kong would drop the connection; we answer).
    dp.send_raw(&b"\xff\xff\xff\xff\xff\xff not snappy"[..])
        .await;
    let (v, _) = dp.next_answer().await;
    assert_error(&v, -32700, None, "Parse error");
    still_serving(&mut dp, 2, head).await;

    let request = |id: u64, version: &str, method: &str, params: Value| {
        serde_json::to_vec(
            &json!({"jsonrpc": version, "method": method, "id": id, "params": params}),
        )
        .unwrap()
    };
    let good_params = json!([{"default": {"version": version_string(head)}}]);

    let (v, _) = answer_to(
        &mut dp,
        &request(3, "1.0", "kong.sync.v2.get_delta", good_params.clone()),
    )
    .await;
    assert_error(&v, -32600, Some(3), r#"jsonrpc must be "2.0""#);
    still_serving(&mut dp, 4, head).await;

    let (v, _) = answer_to(&mut dp, &request(5, "2.0", "kong.nope.v1.thing", json!([]))).await;
    assert_error(&v, -32601, Some(5), "Method not found");
    still_serving(&mut dp, 6, head).await;

    // Bad params: an object (Kong's positional arrays only), a non-object element, no
    // `default` namespace (Kong's own -32000 message).
    let (v, _) = answer_to(
        &mut dp,
        &request(
            7,
            "2.0",
            "kong.sync.v2.get_delta",
            json!({"default": {"version": EMPTY_VERSION}}),
        ),
    )
    .await;
    assert_error(&v, -32602, Some(7), "params must be an array");
    let (v, _) = answer_to(
        &mut dp,
        &request(8, "2.0", "kong.sync.v2.get_delta", json!([42])),
    )
    .await;
    assert_error(&v, -32602, Some(8), "params must be [ { ... } ]");
    let (v, _) = answer_to(
        &mut dp,
        &request(9, "2.0", "kong.sync.v2.get_delta", json!([{}])),
    )
    .await;
    assert_error(
        &v,
        -32000,
        Some(9),
        "default namespace does not exist inside params",
    );
    still_serving(&mut dp, 10, head).await;

    // A response to an id we never used: dropped without an answer.
    dp.send(&json!({"jsonrpc": "2.0", "id": 4242, "result": true}))
        .await;
    dp.send(&json!({"jsonrpc": "2.0", "id": 4243, "error": {"code": -32000, "message": "x"}}))
        .await;
    still_serving(&mut dp, 11, head).await;

    // Batches: empty → -32600; 101 elements → -32600; 100 elements → 100 answers.
    let (v, text) = answer_to(&mut dp, b"[]").await;
    assert_eq!(
        text,
        r#"{"jsonrpc":"2.0","error":{"code":-32600,"message":"empty batch array"}}"#
    );
    assert_error(&v, -32600, None, "empty batch array");
    let batch = |n: u64| {
        let calls: Vec<Value> = (0..n)
            .map(|i| get_delta(Some(100 + i), &version_string(head)))
            .collect();
        serde_json::to_vec(&calls).unwrap()
    };
    let (v, _) = answer_to(&mut dp, &batch(101)).await;
    assert_error(
        &v,
        -32600,
        None,
        "batch of 101 elements exceeds the limit of 100",
    );
    let (v, _) = answer_to(&mut dp, &batch(100)).await;
    let answers = v.as_array().expect("a batch answer is an array");
    assert_eq!(answers.len(), 100);
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a["id"], 100 + i as u64, "in order: {a}");
        assert_eq!(a["result"]["default"]["full_sync"], false, "{a}");
    }
    still_serving(&mut dp, 12, head).await;
    cp.shutdown().await;
}

/// A method is only served if the caller announced its capability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_of_an_unannounced_capability_is_not_found() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let mut dp = RawPeer::after_hello(&cp, &[], KONG_ENCODINGS).await;
    let v = dp.call(&get_delta(Some(0), EMPTY_VERSION)).await;
    assert_error(&v, -32601, Some(0), "Method not found");
    cp.shutdown().await;
}

/// Before the hello, anything but a binary hello closes the connection with 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_first_frames_close_with_protocol_error() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let mut dp = RawPeer::connect(&cp).await;
    dp.send_raw(&b"\x00\x01garbage"[..]).await;
    assert_eq!(dp.expect_close().await, Some(1002));

    let mut dp = RawPeer::connect(&cp).await;
    let hello = String::from_utf8(hello_frame(KONG_CAPS, KONG_ENCODINGS)).unwrap();
    dp.send_message(Message::text(hello)).await;
    assert_eq!(dp.expect_close().await, Some(1002));

    // A hello offering no encoding we know.
    let mut dp = RawPeer::connect(&cp).await;
    dp.send_raw(hello_frame(KONG_CAPS, &["gzip"])).await;
    assert_eq!(dp.expect_close().await, Some(1002));

    // A request that is not the hello.
    let mut dp = RawPeer::connect(&cp).await;
    dp.send_raw(serde_json::to_vec(&get_delta(Some(1), EMPTY_VERSION)).unwrap())
        .await;
    assert_eq!(dp.expect_close().await, Some(1002));
    assert!(
        deltaplane::net::operator::call(
            &format!("{}/rpc", cp.base),
            None,
            "deltaplane.data_planes",
            None
        )
        .await
        .unwrap()
        .as_array()
        .unwrap()
        .is_empty()
    );
    cp.shutdown().await;
}

/// A second hello, plain or encoded like every frame after the first, is a protocol error:
/// the control plane closes with 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_hello_is_not_accepted() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    // Plain, as the first one.
    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    dp.send_raw(hello_frame(KONG_CAPS, KONG_ENCODINGS)).await;
    assert_eq!(dp.expect_close().await, Some(1002), "plain second hello");
    // Encoded like every other frame after the hello.
    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    dp.send_bytes(&hello_frame(KONG_CAPS, &["x-zstd"])).await;
    assert_eq!(dp.expect_close().await, Some(1002), "encoded second hello");
    // Nobody else is affected.
    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    still_serving(&mut dp, 0, cp.head().await.0).await;
    cp.shutdown().await;
}

/// A hello the control plane refuses (another major version) is answered with Kong's -32000
/// error naming the reason, then the connection is closed with 1002; and a `get_delta` whose
/// version is not a version string is answered with a full sync, as from no version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_hello_closes_1002_and_unparseable_versions_full_sync() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    let mut dp = RawPeer::connect(&cp).await;
    let mut hello: Value = serde_json::from_slice(&hello_frame(KONG_CAPS, KONG_ENCODINGS)).unwrap();
    hello["params"][0]["kong_version"] = json!("4.0.0");
    dp.send_raw(serde_json::to_vec(&hello).unwrap()).await;
    let answer: Value = serde_json::from_slice(&dp.next_binary().await).unwrap();
    assert_eq!(answer["error"]["code"], -32000, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("kong_version_incompatible")),
        "{answer}"
    );
    assert_eq!(dp.expect_close().await, Some(1002));

    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    for version in ["not-a-version", "v02_zz", ""] {
        let answer = dp.call(&get_delta(Some(7), version)).await;
        let result = &answer["result"]["default"];
        assert_eq!(result["full_sync"], true, "{version}: {answer}");
        assert!(
            result["deltas"]
                .as_array()
                .is_some_and(|d| d.iter().any(|d| d["type"] == "services")),
            "{version}: {answer}"
        );
    }
    cp.shutdown().await;
}

/// A frame over `max_payload`, or one whose Snappy header claims more than the decompressed
/// cap, closes that connection with 1009; another data plane keeps syncing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_1009_and_others_keep_syncing() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.max_payload = 64 << 10;
    let cp = TestCp::start_with(db, cfg).await;
    let real = cp.start_dp().await;
    real.converge(&cp, 5).await;

    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    dp.send_raw(vec![b'x'; 100 << 10]).await;
    assert_eq!(dp.expect_close().await, Some(1009));

    // A Snappy header (varint) claiming 2 MiB, over the 1 MiB decompressed cap (16 times
    // max_payload), followed by a few bytes: refused before allocating.
    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    dp.send_raw(&b"\x80\x80\x80\x01\x00\x00"[..]).await;
    assert_eq!(dp.expect_close().await, Some(1009));

    cp.create("/services", json!({"name": "after", "host": "h"}))
        .await;
    real.converge(&cp, 5).await;
    assert_eq!(real.shared().store.list("services").unwrap().len(), 1);
    cp.shutdown().await;
}

/// Text frames are not part of the protocol: 1003 after the hello.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_frame_after_hello_closes_1003() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    let call = get_delta(Some(0), EMPTY_VERSION).to_string();
    dp.send_message(Message::text(call)).await;
    assert_eq!(dp.expect_close().await, Some(1003));
    cp.shutdown().await;
}

/// Only `/v2/outlet` with subprotocol `kong.meta.v1` is upgraded (and `/v1/outlet` with its
/// query arguments: see `v1.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_refused_for_wrong_subprotocol_or_path() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let cases = [
        ("/v2/outlet", Some("kong.meta.v2"), 400),
        ("/v2/outlet", None, 400),
        // Sync v1 without its required query arguments.
        ("/v1/outlet", Some("kong.meta.v1"), 400),
        ("/", Some("kong.meta.v1"), 404),
    ];
    for (path, protocol, status) in cases {
        let tls = tls_to(&cp).await;
        match tokio::time::timeout(WAIT, upgrade(tls, path, protocol))
            .await
            .expect("answer in time")
        {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), status, "{path} {protocol:?}")
            }
            Err(e) => panic!("{path} {protocol:?}: expected HTTP {status}, got {e}"),
            Ok(_) => panic!("{path} {protocol:?}: upgraded"),
        }
    }
    // And the right one is.
    RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    cp.shutdown().await;
}

/// Resolves when the server has closed `stream` (end of stream or reset), returning whether
/// it did so within `bound`.
async fn closed_within(
    mut stream: impl tokio::io::AsyncRead + Unpin,
    bound: Duration,
) -> Result<(), String> {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return Err("still open".into()),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(()),
            // TLS close_notify, alerts: keep reading until the end.
            Ok(Ok(_)) => continue,
        }
    }
}

/// Connections that never finish their handshake (no TLS, TLS but no upgrade, upgrade but
/// no hello) are dropped after `handshake_timeout`, a wave of them at once; the control plane
/// then still serves a real data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_handshakes_are_dropped_after_the_timeout() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    let timeout = Duration::from_millis(800);
    cfg.cluster.handshake_timeout = timeout;
    let cp = TestCp::start_with(db, cfg).await;
    let addr = cp.running().cluster_addr;
    let started = Instant::now();
    let bound = timeout + Duration::from_secs(3);

    let tcp_only = (0..25).map(|_| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        closed_within(tcp, bound).await
    });
    let cp_ref = &cp;
    // On a loaded machine some TLS handshakes of the wave outlast the timeout themselves;
    // the server drops those too (at the timeout), so they count as closed, but most must
    // have completed TLS for the "no upgrade" case to be tested.
    let tls_only = (0..25).map(|_| async move {
        let (addr, crt, key) = cp_ref.cluster_target();
        let tls = crate::rawpeer::shared_tls(&crt, &key);
        let tcp = TcpStream::connect(&addr).await.unwrap();
        match tokio::time::timeout(bound, tls.connect(tcp, "127.0.0.1")).await {
            Ok(Ok(stream)) => closed_within(stream, bound).await.map(|()| true),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
            Ok(Err(e)) => Err(format!("TLS: {e}")),
            Err(_) => Err("TLS handshake neither finished nor dropped".into()),
        }
    });
    let no_hello = (0..5).map(|_| async move {
        let mut dp = RawPeer::connect(cp_ref).await;
        dp.expect_close().await
    });
    let (tcp_only, tls_only, no_hello) = tokio::join!(
        futures::future::join_all(tcp_only),
        futures::future::join_all(tls_only),
        futures::future::join_all(no_hello),
    );
    let elapsed = started.elapsed();
    for r in tcp_only {
        assert_eq!(r, Ok(()), "TCP-only connection not closed within {bound:?}");
    }
    let mut n_tls = 0;
    for r in tls_only {
        match r {
            Ok(completed) => n_tls += usize::from(completed),
            Err(e) => panic!("TLS-only connection not closed within {bound:?}: {e}"),
        }
    }
    assert!(n_tls >= 12, "only {n_tls} of 25 completed TLS");
    for code in no_hello {
        assert_eq!(
            code,
            Some(1002),
            "no hello: closed with 1002 (hello timeout)"
        );
    }
    assert!(elapsed < bound, "took {elapsed:?}");

    let real = cp.start_dp().await;
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    real.converge(&cp, 5).await;
    cp.shutdown().await;
}

async fn data_planes(cp: &TestCp) -> Vec<Value> {
    deltaplane::net::operator::call(
        &format!("{}/rpc", cp.base),
        None,
        "deltaplane.data_planes",
        None,
    )
    .await
    .unwrap()
    .as_array()
    .unwrap()
    .clone()
}

/// Whether a client with `client` completes TLS, the upgrade and the hello.
async fn hello_with(
    addr: &str,
    client: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(), String> {
    let mut dp = try_connect_with(addr, client).await?;
    dp.send_raw(hello_frame(KONG_CAPS, KONG_ENCODINGS)).await;
    match dp.next().await {
        crate::rawpeer::Next::Frame(Message::Binary(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    }
}

/// A self-signed certificate that expired in 2021.
fn expired_cert() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["kong_clustering".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "kong_clustering");
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

/// Shared mode: no certificate, another certificate, an expired one → refused, never listed.
/// The same client code with the control plane's certificate gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_mode_refuses_other_certificates() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let (addr, crt, key) = cp.cluster_target();
    let other = cert_and_key("kong_clustering");
    let expired = expired_cert();
    for (name, client) in [
        ("no certificate", any_server_client(None)),
        (
            "another self-signed certificate",
            any_server_client(Some((&other.0, &other.1))),
        ),
        (
            "an expired certificate",
            any_server_client(Some((&expired.0, &expired.1))),
        ),
    ] {
        let r = hello_with(&addr, client).await;
        assert!(r.is_err(), "{name}: accepted");
    }
    assert_eq!(data_planes(&cp).await, Vec::<Value>::new());

    let crt = std::fs::read_to_string(crt).unwrap();
    let key = std::fs::read_to_string(key).unwrap();
    hello_with(&addr, any_server_client(Some((&crt, &key))))
        .await
        .expect("the shared certificate is accepted");
    cp.shutdown().await;
}

/// A certificate authority for pki-mode tests.
/// Pki mode: a data plane certificate from another CA (or none, or one from the cluster CA
/// that expired or is not yet valid) is refused and never listed; one issued by the cluster
/// CA connects and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_mode_refuses_other_cas_and_accepts_issued_certificates() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let ca = Ca::new("deltaplane test cluster CA");
    let other_ca = Ca::new("some other CA");
    let server_name = "cp.deltaplane.test";
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster_mtls = deltaplane::net::tls::MtlsMode::Pki;
    cfg.cluster_ca_cert = Some(ca.pem.clone());
    cfg.cluster_cert = Some(ca.issue(server_name, ServerAuth));
    let cp = TestCp::start_with(db, cfg).await;
    let addr = cp.running().cluster_addr.to_string();

    let foreign = other_ca.issue("dp-foreign", ClientAuth);
    let self_signed = cert_and_key("dp-self-signed");
    let expired = ca.issue_valid("dp-expired", ClientAuth, Some(((2020, 1, 1), (2021, 1, 1))));
    let not_yet = ca.issue_valid("dp-not-yet", ClientAuth, Some(((2099, 1, 1), (2100, 1, 1))));
    for (name, client) in [
        (
            "an expired certificate from the cluster CA",
            any_server_client(Some((&expired.0, &expired.1))),
        ),
        (
            "a not-yet-valid certificate from the cluster CA",
            any_server_client(Some((&not_yet.0, &not_yet.1))),
        ),
        ("no certificate", any_server_client(None)),
        (
            "a certificate from another CA",
            any_server_client(Some((&foreign.0, &foreign.1))),
        ),
        (
            "a self-signed certificate",
            any_server_client(Some((&self_signed.0, &self_signed.1))),
        ),
    ] {
        let r = hello_with(&addr, client).await;
        assert!(r.is_err(), "{name}: accepted");
    }
    assert_eq!(data_planes(&cp).await, Vec::<Value>::new());

    let (dp_cert, dp_key) = ca.issue("dp-1", ClientAuth);
    let dir = tempfile::tempdir().unwrap();
    let mut dp_cfg = deltaplane::dp::DpConfig::new(dir.path(), addr, dp_cert, dp_key);
    dp_cfg.cluster_mtls = deltaplane::net::tls::MtlsMode::Pki;
    dp_cfg.cluster_ca_cert = Some(ca.pem.clone());
    dp_cfg.cluster_server_name = Some(server_name.into());
    dp_cfg.status_listen = "127.0.0.1:0".parse().unwrap();
    dp_cfg.durable = false;
    dp_cfg.reconnect_min = Duration::from_millis(50);
    dp_cfg.reconnect_max = Duration::from_millis(500);
    short_timers(&mut dp_cfg.cluster);
    let mut dp = TestDp::start(dp_cfg, dir).await;
    cp.create("/services", json!({"name": "s", "host": "h"}))
        .await;
    dp.converge(&cp, 5).await;
    let planes = data_planes(&cp).await;
    assert_eq!(planes.len(), 1, "{planes:?}");
    assert_eq!(planes[0]["node_id"], dp.shared().node_id.as_str());
    dp.stop().await;
    cp.shutdown().await;
}

/// A data plane that stops reading while answers pile up is disconnected (write stall), and
/// another data plane on the same control plane is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_that_stops_reading_is_disconnected() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.write_timeout = Duration::from_millis(500);
    cfg.cluster.max_payload = 1 << 20;
    let cp = TestCp::start_with(db, cfg).await;
    // ~240 KiB of configuration that Snappy cannot shrink.
    let cp_ref = &cp;
    let creates = (0..60).map(|i| async move {
        let tags: Vec<String> = (0..4)
            .map(|_| {
                (0..16)
                    .map(|_| uuid::Uuid::new_v4().simple().to_string())
                    .collect::<String>()
            })
            .collect();
        cp_ref
            .create(
                "/services",
                json!({"name": format!("s{i}"), "host": "h", "tags": tags}),
            )
            .await
    });
    futures::future::join_all(creates).await;
    let real = cp.start_dp().await;
    real.converge(&cp, 5).await;

    let mut stuck = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    let connected = |cp: &TestCp| {
        cp.running()
            .fleet
            .connected()
            .iter()
            .map(|c| c.who.node_id.clone())
            .collect::<Vec<_>>()
    };
    // The control plane answers the hello before it registers the connection.
    let deadline = tokio::time::Instant::now() + WAIT;
    while connected(&cp).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the raw peer never showed as connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Ask for the full configuration over and over (~15 MiB of answers), reading nothing.
    for id in 0..60 {
        stuck.send(&get_delta(Some(id), EMPTY_VERSION)).await;
    }
    // And keep writing meanwhile.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    while connected(&cp).len() > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled data plane is still connected"
        );
        n += 1;
        cp.create("/consumers", json!({"username": format!("u{n}")}))
            .await;
    }
    assert_eq!(connected(&cp), vec![real.shared().node_id.clone()]);

    cp.create("/services", json!({"name": "after", "host": "h"}))
        .await;
    real.converge(&cp, 5).await;
    drop(stuck);
    cp.shutdown().await;
}

/// 1,000 clients that never finish their handshake, in waves of 100 (under the open-file
/// limit): every one is closed by the server, and afterwards the control plane holds no extra
/// connection or task (no leak).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_stalled_handshakes_leak_nothing() {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    let timeout = Duration::from_millis(300);
    cfg.cluster.handshake_timeout = timeout;
    let cp = TestCp::start_with(db, cfg).await;
    let addr = cp.running().cluster_addr;
    let metrics = tokio::runtime::Handle::current().metrics();
    // Settle, then take the baseline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let baseline = metrics.num_alive_tasks();
    let bound = timeout + Duration::from_secs(5);
    let (_, crt, key) = cp.cluster_target();
    let tls = crate::rawpeer::shared_tls(&crt, &key);
    for wave in 0..10 {
        let clients = (0..100).map(|i| {
            let tls = tls.clone();
            async move {
                let tcp = TcpStream::connect(addr).await.unwrap();
                if (wave + i) % 2 == 0 {
                    // Never starts TLS.
                    closed_within(tcp, bound).await
                } else {
                    // Completes TLS (when the machine is fast enough), never upgrades.
                    match tokio::time::timeout(bound, tls.connect(tcp, "127.0.0.1")).await {
                        Ok(Ok(stream)) => closed_within(stream, bound).await,
                        Ok(Err(_)) => Ok(()),
                        Err(_) => Err("TLS handshake neither finished nor dropped".into()),
                    }
                }
            }
        });
        for r in futures::future::join_all(clients).await {
            assert_eq!(
                r,
                Ok(()),
                "wave {wave}: a connection was not closed within {bound:?}"
            );
        }
    }
    assert!(cp.running().fleet.connected().is_empty());
    // Connection tasks end with their connections.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let alive = metrics.num_alive_tasks();
        if alive <= baseline + 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{alive} tasks alive after 1,000 stalled handshakes, baseline {baseline}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it still serves.
    let dp = cp.start_dp().await;
    cp.create("/services", json!({"name": "after", "host": "h"}))
        .await;
    dp.converge(&cp, 10).await;
    cp.shutdown().await;
}

/// Admin API edge cases: unicode names, control characters, ids that are not UUIDs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_names_and_ids_edge_cases() {
    let cp = TestCp::start(crate::harness::Backend::Sqlite)
        .await
        .unwrap();
    // Unicode letters are names (Kong's utf8_name); spaces and control characters are not.
    let r = cp
        .post(
            "/services",
            json!({"name": "ñandú-服务_1.~", "host": "u.test"}),
        )
        .await;
    assert_eq!(r.status, 201, "{r:?}");
    let r = cp
        .get("/services/%C3%B1and%C3%BA-%E6%9C%8D%E5%8A%A1_1.~")
        .await;
    assert_eq!(r.status, 200, "{r:?}");
    for bad in ["a b", "tab\there", "nul\u{0}", "new\nline", ""] {
        let r = cp
            .post("/services", json!({"name": bad, "host": "u.test"}))
            .await;
        assert_eq!(r.status, 400, "{bad:?}: {r:?}");
        assert_eq!(r.body["name"], "schema violation", "{bad:?}: {r:?}");
        assert!(r.body["fields"]["name"].is_string(), "{bad:?}: {r:?}");
    }
    // An id must be a UUID.
    let r = cp
        .post("/services", json!({"id": "not-a-uuid", "host": "u.test"}))
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body["fields"]["id"].is_string(), "{r:?}");
    // Wrong types and invalid UTF-8 bodies.
    let r = cp
        .post("/services", json!({"host": 42, "retries": "many"}))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.body["fields"]["host"].is_string() && r.body["fields"]["retries"].is_string());
    let r = cp
        .raw(
            reqwest::Method::POST,
            "/services",
            "application/json",
            vec![b'{', b'"', 0xff, 0xfe, b'"', b':', b'1', b'}'],
        )
        .await;
    assert_eq!(r.status, 400, "{r:?}");
    // Nothing of these reached the change log.
    let (head, _) = cp.head().await;
    assert_eq!(head, 2, "only the workspace and the one valid service");
    cp.shutdown().await;
}
