//! Kong interop without a Kong binary: the §4.5 golden exchange played by hand against a real
//! control plane (as a Kong 3.10 data plane), and against a real data plane (by a fake
//! control plane that answers like open-source Kong, quirks included).

use std::collections::HashSet;
use std::time::Duration;

use deltaplane::net::tls::{ClusterTls, TlsSettings};
use deltaplane::proto::codec::Encoding;
use deltaplane::proto::{EMPTY_VERSION, version_string};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::harness::{Backend, TestCp, TestDp, test_dp_config};
use crate::rawpeer::{KONG_CAPS, KONG_ENCODINGS, RawPeer, ServerTls, WAIT, get_delta};

/// A small but real configuration: a workspace, a service with a route and a plugin, a
/// consumer with a credential. Returns (service id, route id).
async fn small_config(cp: &TestCp) -> (String, String) {
    let svc = cp
        .create(
            "/services",
            json!({"name": "orders", "url": "http://example.com:8080/api"}),
        )
        .await;
    let sid = svc["id"].as_str().unwrap().to_owned();
    let route = cp
        .create(
            &format!("/services/{sid}/routes"),
            json!({"name": "orders-r0", "paths": ["/orders"]}),
        )
        .await;
    cp.create(
        &format!("/services/{sid}/plugins"),
        json!({"name": "key-auth"}),
    )
    .await;
    cp.create("/consumers", json!({"username": "alice"})).await;
    cp.create("/consumers/alice/key-auth", json!({"key": "secret-1"}))
        .await;
    (sid, route["id"].as_str().unwrap().to_owned())
}

/// Asserts the deltas of a full sync: Kong's shape, every version `latest`, and dependency
/// order (workspaces first, each type in one run, every referenced entity before its referrer).
#[track_caller]
fn assert_full_sync_shape(deltas: &[Value], latest: &str) {
    assert_eq!(deltas[0]["type"], "workspaces", "workspaces come first");
    let mut seen_ids = HashSet::new();
    let mut finished_types: Vec<&str> = Vec::new();
    let mut current = "";
    for d in deltas {
        let keys: HashSet<&str> = d.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            HashSet::from(["type", "entity", "pk", "ws_id", "version"]),
            "{d}"
        );
        assert_eq!(d["version"], latest, "{d}");
        assert_eq!(d["pk"], json!({"id": d["entity"]["id"]}), "{d}");
        assert!(d["ws_id"].is_string(), "{d}");
        let ty = d["type"].as_str().unwrap();
        if ty != current {
            assert!(
                !finished_types.contains(&ty),
                "type {ty} appears in two runs"
            );
            finished_types.push(current);
            current = ty;
        }
        // Foreign keys are `{"id": …}` objects; the parent must already have been sent.
        for (field, value) in d["entity"].as_object().unwrap() {
            if let Some(parent) = value.as_object().filter(|o| o.len() == 1)
                && let Some(pid) = parent.get("id").and_then(Value::as_str)
            {
                assert!(
                    seen_ids.contains(pid),
                    "{ty}.{field} refers to {pid}, which was not sent before it"
                );
            }
        }
        seen_ids.insert(d["entity"]["id"].as_str().unwrap().to_owned());
    }
}

/// §4.5 against our control plane, played by a Kong 3.10 data plane: hello (plain JSON), then
/// raw Snappy; a full sync in dependency order; `notify_new_version` on a write; an
/// incremental answer with only the change (open-source Kong would send a full snapshot); a
/// status notification that gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_exchange_kong_dp_against_our_cp() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let (sid, _) = small_config(&cp).await;
    let (head, _) = cp.head().await;
    let latest = version_string(head);
    let epoch = cp.store().version_info().await.unwrap().epoch;

    // Frames 1–2: the hello and its answer, both plain JSON in one binary frame.
    let mut dp = RawPeer::connect(&cp).await;
    dp.send_raw(crate::rawpeer::hello_frame(KONG_CAPS, KONG_ENCODINGS))
        .await;
    let answer = dp.next_binary().await;
    let expected = format!(
        r#"{{"jsonrpc":"2.0","id":1,"result":{{"rpc_capabilities":["kong.sync.v2","deltaplane.sync.v1","deltaplane.push.v1"],"rpc_frame_encoding":"x-snappy-framed","epoch":{},"node_id":{}}}}}"#,
        json!(epoch),
        json!(cp.running().node_id),
    );
    assert_eq!(String::from_utf8(answer).unwrap(), expected);
    dp.encoding = Some(Encoding::SnappyFramed);

    // Frames 3–4: get_delta from nothing → the full configuration.
    dp.send(&get_delta(Some(0), EMPTY_VERSION)).await;
    let (full, bytes) = dp.next_answer().await;
    assert!(
        bytes.starts_with(br#"{"jsonrpc":"2.0","id":0,"result":{"default":{"deltas":["#),
        "{}",
        String::from_utf8_lossy(&bytes[..80])
    );
    let ns = &full["result"]["default"];
    assert_eq!(ns["full_sync"], true, "{ns}");
    assert_eq!(ns["latest_version"], latest.as_str());
    let deltas = ns["deltas"].as_array().unwrap();
    assert_full_sync_shape(deltas, &latest);
    let types: HashSet<&str> = deltas.iter().map(|d| d["type"].as_str().unwrap()).collect();
    for ty in [
        "workspaces",
        "services",
        "routes",
        "plugins",
        "consumers",
        "keyauth_credentials",
    ] {
        assert!(types.contains(ty), "no {ty} in the full sync: {types:?}");
    }
    // Kong's status notification after applying it: no answer (checked below).
    dp.send(&get_delta(None, &latest)).await;

    // Frame 5: a write → the control plane calls notify_new_version.
    let route = cp
        .create(
            &format!("/services/{sid}/routes"),
            json!({"name": "orders-r1", "paths": ["/orders/1"]}),
        )
        .await;
    let new_latest = version_string(head + 1);
    assert_eq!(cp.head().await.0, head + 1);
    let notify = loop {
        let bytes = dp.next_decoded().await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["method"], "kong.sync.v2.notify_new_version", "{v}");
        let id = v["id"]
            .as_u64()
            .expect("notify_new_version is a call with an integer id");
        // Frame 6: the data plane's truthy answer.
        dp.send_bytes(format!(r#"{{"jsonrpc":"2.0","id":{id},"result":true}}"#).as_bytes())
            .await;
        // A notify for the version we already hold may come first (the control plane saw
        // our get_delta at version 0); the one we wait for names the new version.
        if v["params"][0]["default"]["new_version"] == new_latest.as_str() {
            break (id, bytes);
        }
        assert_eq!(v["params"][0]["default"]["new_version"], latest.as_str());
    };
    assert_eq!(
        String::from_utf8(notify.1).unwrap(),
        format!(
            r#"{{"jsonrpc":"2.0","method":"kong.sync.v2.notify_new_version","id":{},"params":[{{"default":{{"new_version":"{new_latest}"}}}}]}}"#,
            notify.0
        )
    );

    // get_delta from the old version → only the new route, not a snapshot.
    let inc = dp.call(&get_delta(Some(1), &latest)).await;
    let ns = &inc["result"]["default"];
    assert_eq!(ns["full_sync"], false, "{ns}");
    assert_eq!(ns["latest_version"], new_latest.as_str());
    let deltas = ns["deltas"].as_array().unwrap();
    assert_eq!(deltas.len(), 1, "only the changed entity: {ns}");
    assert_eq!(deltas[0]["type"], "routes");
    assert_eq!(deltas[0]["entity"]["id"], route["id"]);
    assert_eq!(deltas[0]["pk"], json!({"id": route["id"]}));
    assert_eq!(deltas[0]["version"], new_latest.as_str());

    // Frame 7: the status notification gets no response: the next answer is the next call's.
    dp.send(&get_delta(None, &new_latest)).await;
    dp.send(&get_delta(Some(2), &new_latest)).await;
    let (up_to_date, bytes) = dp.next_answer().await;
    assert_eq!(
        String::from_utf8(bytes).unwrap(),
        format!(
            r#"{{"jsonrpc":"2.0","id":2,"result":{{"default":{{"deltas":[],"full_sync":false,"latest_version":"{new_latest}"}}}}}}"#
        ),
        "{up_to_date}"
    );
    // Nothing we could not read was ever sent to a Kong data plane.
    for m in &dp.received {
        let text = m.to_string();
        assert!(!text.contains("deltaplane_transfer"), "{text}");
        assert!(
            m["method"].is_null() || m["method"] == "kong.sync.v2.notify_new_version",
            "{m}"
        );
    }
    cp.shutdown().await;
}

/// The control plane's whole configuration as snapshot changes, real entities for a fake
/// control plane to send; the control plane is then shut down.
async fn snapshot_and_stop(cp: TestCp) -> Vec<deltaplane::cp::store::Change> {
    let mut changes = Vec::new();
    cp.store()
        .snapshot(|c| {
            changes.push(c);
            Ok(())
        })
        .await
        .unwrap();
    cp.shutdown().await;
    changes
}

/// A fake control plane that speaks like open-source Kong: TLS with a shared certificate,
/// the `kong.meta.v1` upgrade; each upgraded connection is handed to the test, which plays
/// the control plane's side frame by frame.
struct FakeKongCp {
    addr: std::net::SocketAddr,
    crt: String,
    key: String,
    conns: mpsc::Receiver<RawPeer<ServerTls>>,
    accept: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl FakeKongCp {
    async fn start() -> FakeKongCp {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = deltaplane::net::tls::generate_shared_cert(dir.path()).unwrap();
        let (crt, key) = (crt.display().to_string(), key.display().to_string());
        let tls = ClusterTls::load(&TlsSettings::shared(&crt, &key)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, conns) = mpsc::channel(4);
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok((tls, _identity)) = tls.accept(tcp).await else {
                    continue;
                };
                #[allow(clippy::result_large_err)] // tungstenite's callback type
                let callback = |req: &Request, mut resp: Response| {
                    assert_eq!(req.uri().path(), "/v2/outlet");
                    let protocol = req.headers().get("Sec-WebSocket-Protocol");
                    assert_eq!(protocol, Some(&HeaderValue::from_static("kong.meta.v1")));
                    resp.headers_mut().insert(
                        "Sec-WebSocket-Protocol",
                        HeaderValue::from_static("kong.meta.v1"),
                    );
                    Ok(resp)
                };
                let Ok(ws) = tokio_tungstenite::accept_hdr_async(tls, callback).await else {
                    continue;
                };
                if tx.send(RawPeer::new(ws)).await.is_err() {
                    return;
                }
            }
        });
        FakeKongCp {
            addr,
            crt,
            key,
            conns,
            accept,
            _dir: dir,
        }
    }

    /// A test data plane's settings for this control plane, with no safety poll to
    /// interleave with the exchange the test plays.
    fn dp_config(&self, dir: &std::path::Path) -> deltaplane::dp::DpConfig {
        let mut cfg = test_dp_config(
            dir,
            self.addr.to_string(),
            self.crt.clone(),
            self.key.clone(),
        );
        cfg.sync_poll_interval = Duration::from_secs(600);
        cfg
    }

    /// The next data plane connection.
    async fn next_conn(&mut self) -> RawPeer<ServerTls> {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("a data plane connects in time")
            .expect("accept loop running")
    }
}

impl Drop for FakeKongCp {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Reads the data plane's messages until its get_delta call, checking that everything before
/// it is a status notification (get_delta without id) at `status` or an answer to one of our
/// calls. Returns the call's id and version, and the answers seen.
async fn until_get_delta(
    cp_side: &mut RawPeer<ServerTls>,
    status: Option<&str>,
) -> (Value, String, Vec<Value>) {
    let mut answers = Vec::new();
    let mut saw_status = false;
    loop {
        let m = cp_side.next_json().await;
        if m["method"] == "kong.sync.v2.get_delta" {
            let version = m["params"][0]["default"]["version"]
                .as_str()
                .unwrap()
                .to_owned();
            match m.get("id") {
                None => {
                    assert_eq!(Some(version.as_str()), status, "status notification {m}");
                    saw_status = true;
                }
                Some(id) => {
                    assert!(id.is_u64(), "{m}");
                    assert_eq!(saw_status, status.is_some(), "status notification first");
                    return (id.clone(), version, answers);
                }
            }
        } else {
            assert!(m.get("method").is_none(), "unexpected call {m}");
            answers.push(m);
        }
    }
}

/// The DP side of the golden exchange: a real data plane against a control plane that
/// answers like open-source Kong (only `kong.sync.v2` and Snappy, no epoch; `wipe` instead
/// of `full_sync`, no `latest_version`, `{}` for no deltas, deletes without `entity`,
/// entities without `ws_id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_exchange_our_dp_against_a_kong_cp() {
    // Real-looking entities: a real control plane's snapshot.
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let (sid, route1) = small_config(&cp).await;
    let route2 = cp
        .create(
            &format!("/services/{sid}/routes"),
            json!({"name": "orders-r1", "paths": ["/orders/1"]}),
        )
        .await;
    let route2_id = route2["id"].as_str().unwrap().to_owned();
    let changes = snapshot_and_stop(cp).await;
    let kong_delta = |c: &deltaplane::cp::store::Change, version: &str| {
        let mut entity = c.entity.clone().unwrap();
        entity.as_object_mut().unwrap().remove("ws_id");
        json!({"type": c.entity_type, "entity": entity, "version": version, "ws_id": c.ws_id})
    };
    let v9 = version_string(9);
    let v10 = version_string(10);
    let full: Vec<Value> = changes
        .iter()
        .filter(|c| c.id != route2_id)
        .map(|c| kong_delta(c, &v9))
        .collect();
    let route2_change = changes.iter().find(|c| c.id == route2_id).unwrap();
    let ws_id = route2_change.ws_id.clone();

    let mut fake = FakeKongCp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = fake.dp_config(dir.path());
    let mut dp = TestDp::start(cfg, dir).await;
    let mut kong = fake.next_conn().await;

    // The hello: the data plane offers Snappy and announces kong.sync.v2; Kong answers with
    // only what it knows.
    let hello = kong.next_json().await;
    assert_eq!(hello["method"], "kong.meta.v1.hello");
    assert_eq!(hello["id"], 1);
    let info = &hello["params"][0];
    assert!(
        info["rpc_capabilities"]
            .as_array()
            .unwrap()
            .contains(&json!("kong.sync.v2")),
        "{info}"
    );
    assert!(
        info["rpc_frame_encodings"]
            .as_array()
            .unwrap()
            .contains(&json!("x-snappy-framed")),
        "{info}"
    );
    for field in ["kong_version", "kong_hostname", "kong_node_id"] {
        assert!(info[field].is_string(), "{field}: {info}");
    }
    assert!(info["kong_conf"].is_object(), "{info}");
    // Without --plugins it announces every plugin it knows, as its v1 basic_info does.
    let plugins = info["kong_conf"]["plugins"].as_array().expect("plugins");
    assert!(
        plugins.contains(&json!({"name": "key-auth", "version": "3.10.0"})),
        "{info}"
    );
    kong.send_raw(
        &br#"{"jsonrpc":"2.0","id":1,"result":{"rpc_capabilities":["kong.sync.v2"],"rpc_frame_encoding":"x-snappy-framed"}}"#[..],
    )
    .await;
    kong.encoding = Some(Encoding::SnappyFramed);

    // A new data plane asks from nothing; Kong wipes.
    let (id, version, _) = until_get_delta(&mut kong, None).await;
    assert_eq!(version, EMPTY_VERSION);
    kong.send(
        &json!({"jsonrpc": "2.0", "id": id, "result": {"default": {"deltas": full, "wipe": true}}}),
    )
    .await;
    // It applies, reports its version, and asks again; Kong has nothing new: `{}`.
    let (id, version, _) = until_get_delta(&mut kong, Some(&v9)).await;
    assert_eq!(version, v9);
    kong.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"default": {"deltas": {}, "full_sync": false}}}))
        .await;
    dp.wait_version(9, 5).await;
    let store = &dp.shared().store;
    let ids = |ty: &str| -> Vec<String> {
        let mut ids: Vec<String> = store
            .list(ty)
            .unwrap()
            .iter()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        ids
    };
    assert_eq!(ids("routes"), vec![route1.clone()]);
    assert_eq!(ids("services"), vec![sid.clone()]);
    assert_eq!(ids("consumers").len(), 1);
    assert_eq!(ids("plugins").len(), 1);
    assert_eq!(ids("keyauth_credentials").len(), 1);

    // Kong notifies (a call) and expects a truthy answer; the data plane then pulls.
    kong.send_bytes(
        format!(r#"{{"jsonrpc":"2.0","method":"kong.sync.v2.notify_new_version","id":0,"params":[{{"default":{{"new_version":"{v10}"}}}}]}}"#)
            .as_bytes(),
    )
    .await;
    let (id, version, answers) = until_get_delta(&mut kong, None).await;
    assert_eq!(version, v9);
    // The answer to our call may come before or after the get_delta; read it if not yet.
    let answer = match answers.as_slice() {
        [a] => a.clone(),
        [] => kong.next_json().await,
        more => panic!("unexpected messages {more:?}"),
    };
    assert_eq!(answer, json!({"jsonrpc": "2.0", "id": 0, "result": true}));

    // An incremental answer as Kong's DP code expects it: an upsert and a delete whose
    // `entity` is missing, no latest_version.
    let upsert = kong_delta(route2_change, &v10);
    let delete = json!({"type": "routes", "pk": {"id": route1}, "version": v10, "ws_id": ws_id});
    kong.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"default": {"deltas": [upsert, delete], "wipe": false}}}))
        .await;
    let (id, version, _) = until_get_delta(&mut kong, Some(&v10)).await;
    assert_eq!(version, v10);
    kong.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"default": {"deltas": {}, "full_sync": false}}}))
        .await;
    dp.wait_version(10, 5).await;
    assert_eq!(ids("routes"), vec![route2_id.clone()]);
    assert_eq!(ids("services"), vec![sid.clone()]);
    let stored = store.get("routes", &ws_id, &route2_id).unwrap().unwrap();
    assert_eq!(stored["name"], "orders-r1");
    assert_eq!(stored["service"], json!({"id": sid}));

    let st = dp.shared().status_json();
    assert_eq!(st["version"], 10, "{st}");
    assert_eq!(st["version_string"], v10.as_str(), "{st}");
    assert_eq!(st["full_syncs"], 1, "{st}");
    assert_eq!(st["incremental_syncs"], 1, "{st}");
    assert_eq!(st["connected"], true, "{st}");
    assert_eq!(st["in_sync"], true, "{st}");
    let rpc = format!("http://{}/rpc", dp.dp.as_ref().unwrap().status_addr);
    let sv = deltaplane::net::operator::call(&rpc, None, "deltaplane.sync_version", None)
        .await
        .unwrap();
    assert_eq!(sv["version"], 10, "{sv}");
    assert_eq!(sv["version_string"], v10.as_str(), "{sv}");
    assert_eq!(sv["state_hash"], st["state_hash"]);

    // Never a call Kong does not serve.
    for m in &kong.received {
        if let Some(method) = m["method"].as_str() {
            assert!(
                method == "kong.meta.v1.hello" || method == "kong.sync.v2.get_delta",
                "{m}"
            );
        }
    }
    // A clean goodbye: 1001; the fake control plane answers it and drops the connection,
    // as the server side of a WebSocket does.
    let goodbye = async move {
        let code = kong.expect_close().await;
        drop(kong);
        code
    };
    let (_, code) = tokio::join!(dp.stop(), goodbye);
    assert_eq!(code, Some(1001));
}

/// A Kong-only data plane (kong.sync.v2, Snappy) cannot fetch pages: when the configuration
/// does not fit one frame, the control plane refuses the full sync with a JSON-RPC error
/// rather than sending a `deltaplane_transfer`, and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kong_dp_never_gets_paged_transfers() {
    let db = crate::harness::TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.max_payload = 4096;
    let cp = TestCp::start_with(db, cfg).await;
    // Names that do not compress: well over 4 KiB of Snappy.
    let cp_ref = &cp;
    let creates = (0..60).map(|_| {
        let name = uuid::Uuid::new_v4().simple().to_string();
        let body = json!({"name": name, "host": format!("{name}.example.com")});
        async move { cp_ref.create("/services", body).await }
    });
    futures::future::join_all(creates).await;
    let (head, _) = cp.head().await;

    let mut dp = RawPeer::after_hello(&cp, KONG_CAPS, KONG_ENCODINGS).await;
    let refused = dp.call(&get_delta(Some(0), EMPTY_VERSION)).await;
    assert_eq!(refused["error"]["code"], -32000, "{refused}");
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("more than one frame"), "{message}");
    assert!(refused.get("result").is_none(), "{refused}");

    // Still connected: an up-to-date answer fits.
    let fine = dp.call(&get_delta(Some(1), &version_string(head))).await;
    assert_eq!(fine["result"]["default"]["deltas"], json!([]), "{fine}");
    assert_eq!(fine["result"]["default"]["full_sync"], false, "{fine}");
    for m in &dp.received {
        let text = m.to_string();
        assert!(!text.contains("deltaplane_transfer"), "{text}");
        assert!(!text.contains("deltaplane.sync"), "{text}");
    }
    cp.shutdown().await;
}

/// A real Kong 3.10 data plane sends its raw configuration as `kong_conf` (secrets masked by
/// `kong.configuration.remove_sensitive()`, `kong/clustering/rpc/manager.lua`), where
/// `plugins` is the raw `plugins` setting: `["bundled"]` by default. Read as a plugin named
/// "bundled", it would withhold every configuration that uses a plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kong_dp_with_bundled_plugins_gets_the_configuration() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    small_config(&cp).await; // uses key-auth, a bundled plugin
    let kong_conf = json!({
        "role": "data_plane",
        "database": "off",
        "plugins": ["bundled"],
        "loaded_plugins": "******",
        "cluster_control_plane": "cp.example.com:8005",
        "cluster_mtls": "shared",
        "cluster_cert": "/etc/kong/cluster.crt",
        "cluster_cert_key": "******",
        "cluster_max_payload": 16777216,
        "cluster_rpc": true,
        "cluster_rpc_sync": true,
        "cluster_incremental_sync": false,
        "router_flavor": "traditional_compatible",
        "proxy_listen": ["0.0.0.0:8000", "0.0.0.0:8443 ssl"],
        "admin_listen": ["off"],
        "lua_ssl_trusted_certificate": ["system"],
        "prefix": "/usr/local/kong",
    });
    let mut dp = RawPeer::connect(&cp).await;
    let answer = dp.hello_with(KONG_CAPS, KONG_ENCODINGS, kong_conf).await;
    assert!(answer.get("result").is_some(), "{answer}");
    let v = dp.call(&get_delta(Some(1), EMPTY_VERSION)).await;
    assert!(v.get("error").is_none(), "withheld: {v}");
    let deltas = v["result"]["default"]["deltas"].as_array().unwrap();
    assert!(deltas.iter().any(|d| d["type"] == "plugins"), "{v}");
    let rows = cp.running().fleet.data_plane_rows().await.unwrap();
    assert_eq!(rows[0].sync_status, "normal", "{rows:?}");

    // `plugins = off`: the same configuration is withheld, with Kong's status.
    let mut off = RawPeer::connect(&cp).await;
    let conf = json!({"role": "data_plane", "plugins": ["off"]});
    off.hello_with(KONG_CAPS, KONG_ENCODINGS, conf).await;
    let v = off.call(&get_delta(Some(1), EMPTY_VERSION)).await;
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("plugin_set_incompatible:")),
        "{v}"
    );
    cp.shutdown().await;
}

/// A Kong control plane over sync v2 does not check a data plane's plugins. A data plane
/// running the proxy then rejects, itself, a configuration enabling a plugin its proxy does
/// not execute: `kong.sync.v2.notify_validation_error` with Kong's message, nothing stored,
/// the proxy serving nothing of it; the next configuration without that plugin applies and
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxying_dp_rejects_plugins_it_cannot_run_from_a_kong_cp() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let (_sid, _route) = small_config(&cp).await;
    let unrunnable = cp
        .create("/plugins", json!({"name": "correlation-id"}))
        .await;
    let unrunnable_id = unrunnable["id"].as_str().unwrap().to_owned();
    let changes = snapshot_and_stop(cp).await;
    let kong_delta = |c: &deltaplane::cp::store::Change, version: &str| {
        let mut entity = c.entity.clone().unwrap();
        entity.as_object_mut().unwrap().remove("ws_id");
        json!({"type": c.entity_type, "entity": entity, "version": version, "ws_id": c.ws_id})
    };
    let v5 = version_string(5);
    let v6 = version_string(6);
    let with_it: Vec<Value> = changes.iter().map(|c| kong_delta(c, &v5)).collect();
    let without_it: Vec<Value> = changes
        .iter()
        .filter(|c| c.id != unrunnable_id)
        .map(|c| kong_delta(c, &v6))
        .collect();

    let mut fake = FakeKongCp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = fake.dp_config(dir.path());
    cfg.proxy_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.invalid_backoff = Duration::from_millis(200);
    let dp = TestDp::start(cfg, dir).await;
    let mut kong = fake.next_conn().await;
    let hello = kong.next_json().await;
    let plugins = hello["params"][0]["kong_conf"]["plugins"].clone();
    assert!(
        !plugins
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "correlation-id"),
        "the proxy announces only what it executes: {plugins}"
    );
    kong.send_raw(
        &br#"{"jsonrpc":"2.0","id":1,"result":{"rpc_capabilities":["kong.sync.v2"],"rpc_frame_encoding":"x-snappy-framed"}}"#[..],
    )
    .await;
    kong.encoding = Some(Encoding::SnappyFramed);

    let (id, _, _) = until_get_delta(&mut kong, None).await;
    kong.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"default": {"deltas": with_it, "wipe": true}}}))
        .await;
    // The data plane reports the rejection and asks again after its back-off.
    let report = loop {
        let m = kong.next_json().await;
        if m["method"] == "kong.sync.v2.notify_validation_error" {
            break m;
        }
    };
    let text = report.to_string();
    assert!(
        text.contains(
            "plugin 'correlation-id' not enabled; add it to the 'plugins' configuration property"
        ),
        "{text}"
    );
    assert_eq!(
        dp.state().0,
        0,
        "nothing of the rejected configuration is stored"
    );
    let proxy = dp.shared().proxy().unwrap().status();
    assert_eq!(proxy.serving_version, 0);

    // Kong's operator removes the plugin; the next answer applies and is served.
    let (id, version, _) = loop {
        let m = kong.next_json().await;
        if m["method"] == "kong.sync.v2.get_delta" && m.get("id").is_some() {
            let v = m["params"][0]["default"]["version"]
                .as_str()
                .unwrap()
                .to_owned();
            break (m["id"].clone(), v, ());
        }
        // An answer to the notify (Kong answers notifications it got as calls).
        if let Some(mid) = m.get("id")
            && m["method"] == "kong.sync.v2.notify_validation_error"
        {
            kong.send(&json!({"jsonrpc": "2.0", "id": mid, "result": true}))
                .await;
        }
    };
    assert_eq!(version, EMPTY_VERSION);
    kong.send(&json!({"jsonrpc": "2.0", "id": id, "result": {"default": {"deltas": without_it, "wipe": true}}}))
        .await;
    dp.wait_version(6, 5).await;
    let mut serving = dp.shared().proxy().unwrap().watch_serving();
    tokio::time::timeout(Duration::from_secs(5), serving.wait_for(|v| *v == 6))
        .await
        .expect("the proxy serves the configuration without the plugin")
        .unwrap();
}

/// The push contract against a control plane played by hand: a push built from a status
/// report the data plane had already overtaken (`after` below its version) applies from the
/// data plane's version, skipping the deltas it holds, with no `get_delta` round trip; a push
/// that leaves a gap is still fetched instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_from_below_the_version_held_applies_without_a_fetch() {
    // Real entities: a real control plane's snapshot, plus three services for three versions.
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    small_config(&cp).await;
    let mut extra = Vec::new();
    for n in 2..=4 {
        let s = cp
            .create(
                "/services",
                json!({"name": format!("s{n}"), "url": "http://example.com"}),
            )
            .await;
        extra.push(s["id"].as_str().unwrap().to_owned());
    }
    let changes = snapshot_and_stop(cp).await;
    let delta = |c: &deltaplane::cp::store::Change, v: i64| json!({"type": c.entity_type, "pk": {"id": c.id}, "entity": c.entity, "version": version_string(v), "ws_id": c.ws_id});
    let of = |id: &str, v: i64| delta(changes.iter().find(|c| c.id == id).unwrap(), v);
    let base: Vec<Value> = changes
        .iter()
        .filter(|c| !extra.contains(&c.id))
        .map(|c| delta(c, 1))
        .collect();
    let answer = |deltas: Vec<Value>, full: bool, latest: i64| json!({"default": {"deltas": deltas, "full_sync": full, "latest_version": version_string(latest)}});
    let push = |after: i64, answer: Value| {
        json!({"jsonrpc": "2.0", "method": "deltaplane.push.v1.deltas",
               "params": [{"after": version_string(after), "epoch": "e1", "answer": answer}]})
    };

    let mut fake = FakeKongCp::start().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = fake.dp_config(dir.path());
    let dp = TestDp::start(cfg, dir).await;
    let mut cp_side = fake.next_conn().await;
    let hello = cp_side.next_json().await;
    assert_eq!(hello["method"], "kong.meta.v1.hello");
    let caps = hello["params"][0]["rpc_capabilities"].as_array().unwrap();
    assert!(caps.contains(&json!("deltaplane.push.v1")), "{hello}");
    cp_side
        .send_raw(
            &br#"{"jsonrpc":"2.0","id":1,"result":{"rpc_capabilities":["kong.sync.v2","deltaplane.sync.v1","deltaplane.push.v1"],"rpc_frame_encoding":"x-snappy-framed","epoch":"e1","node_id":"fake-cp"}}"#[..],
        )
        .await;
    cp_side.encoding = Some(Encoding::SnappyFramed);

    // Version 1 by a full sync.
    let (id, version, _) = until_get_delta(&mut cp_side, None).await;
    assert_eq!(version, EMPTY_VERSION);
    cp_side
        .send(&json!({"jsonrpc": "2.0", "id": id, "result": answer(base, true, 1)}))
        .await;
    dp.wait_version(1, 5).await;
    let before = dp.shared().link();

    // Version 2 pushed after 1; then 2 and 3 pushed after 1 again, as a control plane does
    // whose record of the data plane a late status report of version 1 has lowered.
    cp_side
        .send(&push(1, answer(vec![of(&extra[0], 2)], false, 2)))
        .await;
    dp.wait_version(2, 5).await;
    cp_side
        .send(&push(
            1,
            answer(vec![of(&extra[0], 2), of(&extra[1], 3)], false, 3),
        ))
        .await;
    dp.wait_version(3, 5).await;
    let link = dp.shared().link();
    assert_eq!(link.pushes_applied - before.pushes_applied, 2, "{link:?}");
    assert_eq!(link.pushes_refused, before.pushes_refused, "{link:?}");
    assert_eq!(
        link.sync_requests, before.sync_requests,
        "no get_delta: {link:?}"
    );
    let names: HashSet<String> = dp
        .shared()
        .store
        .list("services")
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        names.contains("s2") && names.contains("s3") && !names.contains("s4"),
        "{names:?}"
    );

    // A gap (after 4, the data plane holds 3) is fetched instead.
    cp_side
        .send(&push(4, answer(vec![of(&extra[2], 5)], false, 5)))
        .await;
    // Status notifications may come first.
    let call = loop {
        let m = cp_side.next_json().await;
        if m["method"] == "kong.sync.v2.get_delta" && m.get("id").is_some() {
            break m;
        }
    };
    assert_eq!(
        call["params"][0]["default"]["version"],
        version_string(3),
        "{call}"
    );
    let answered = answer(vec![of(&extra[2], 4)], false, 4);
    cp_side
        .send(&json!({"jsonrpc": "2.0", "id": call["id"], "result": answered}))
        .await;
    dp.wait_version(4, 5).await;
    assert_eq!(dp.shared().link().pushes_refused, before.pushes_refused + 1);
}
