//! A data plane running from a declarative file with no control plane (Kong's DB-less mode,
//! issue 13): the file applied as one full apply under its own epoch, served by `/status`,
//! `/rpc` and the proxy; one version per changed file; `POST /config` behind its token
//! (Kong's `kong/api/routes/config.lua`: 201, 304 under `check_hash`, 400 with code 14);
//! the last good configuration kept when a reload fails; plugins the proxy does not execute
//! refused by name; and a file-mode store later pointed at a control plane fully synced.
//!
//! In-process data planes here run with `reload_on_sighup = false` (a signal reaches the
//! whole test process); SIGHUP is tested on the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use deltaplane::dp::DpConfig;
use deltaplane::dp::file::FILE_EPOCH;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{Backend, TestCp, TestDp, free_port};
use crate::upstreams::Echo;

const TOKEN: &str = "s3cret-config-token";

/// A file with one service (at `upstream`) and one route per path.
fn file_text(upstream: &str, paths: &[&str]) -> String {
    let mut routes = String::new();
    for (i, p) in paths.iter().enumerate() {
        routes.push_str(&format!("  - name: r{i}\n    paths: [\"{p}\"]\n"));
    }
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: echo\n  url: {upstream}\n  routes:\n{routes}"
    )
}

/// A file-mode configuration in `dir` reading `file`, status on a port of its own.
fn file_config(dir: &Path, file: &Path, proxy: bool, token: Option<&str>) -> DpConfig {
    let mut cfg = DpConfig::declarative(dir.join("data"), file);
    cfg.status_listen = "127.0.0.1:0".parse().unwrap();
    cfg.durable = false;
    cfg.reload_on_sighup = false;
    cfg.config_token = token.map(str::to_owned);
    if proxy {
        cfg.proxy_listen = Some("127.0.0.1:0".parse().unwrap());
    }
    cfg
}

/// Writes `text` as `kong.yml` in a new temp dir and starts a file-mode DP on it.
async fn start_file_dp(text: &str, proxy: bool, token: Option<&str>) -> (TestDp, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kong.yml");
    std::fs::write(&file, text).unwrap();
    let cfg = file_config(dir.path(), &file, proxy, token);
    (TestDp::start(cfg, dir).await, file)
}

fn status_url(dp: &TestDp) -> String {
    format!("http://{}", dp.dp.as_ref().expect("running").status_addr)
}

async fn get_json(url: &str) -> (StatusCode, Value) {
    let r = reqwest::get(url).await.unwrap();
    let status = r.status();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn rpc(dp: &TestDp) -> Value {
    let r: Value = reqwest::Client::new()
        .post(format!("{}/rpc", status_url(dp)))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "deltaplane.sync_version"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["result"].clone()
}

/// `POST /config` with `token` (none: no header), a content type and a body.
async fn post_config(
    dp: &TestDp,
    query: &str,
    token: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (StatusCode, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{}/config{query}", status_url(dp)))
        .header(reqwest::header::CONTENT_TYPE, content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let bytes = r.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Waits until the proxy serves the stored version.
async fn wait_proxy(dp: &TestDp) {
    let v = dp.shared().store.state().version;
    let mut rx = dp.shared().proxy().expect("proxy on").watch_serving();
    let r = tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| *s >= v)).await;
    assert!(r.is_ok(), "proxy stuck: {}", dp.shared().status_json());
}

async fn proxy_get(dp: &TestDp, path: &str) -> (StatusCode, Value) {
    get_json(&format!("{}{path}", dp.proxy_url())).await
}

#[tokio::test]
async fn a_file_is_applied_served_and_proxied() {
    let echo = Echo::start("file").await;
    let (dp, file) = start_file_dp(&file_text(&echo.url("/up"), &["/a"]), true, None).await;
    // Ready once the proxy serves the applied file.
    wait_proxy(&dp).await;
    let (code, ready) = get_json(&format!("{}/status/ready", status_url(&dp))).await;
    assert_eq!(code, StatusCode::OK, "{ready}");
    let v = rpc(&dp).await;
    assert_eq!(v["version"], 1, "{v}");
    assert_eq!(v["epoch"], FILE_EPOCH);
    assert_eq!(v["source"], "file");
    assert_eq!(v["protocol"], "file");
    assert_eq!(v["in_sync"], true);
    assert_eq!(v["last_error"], Value::Null);
    let (_, st) = get_json(&format!("{}/status", status_url(&dp))).await;
    let d = &st["declarative"];
    assert_eq!(d["path"], file.display().to_string(), "{st}");
    assert_eq!(d["last_applied_version"], 1);
    assert_eq!(d["last_source"], "file");
    assert_eq!(d["applied"], 1);
    assert_eq!(d["post_config"], false);
    // The workspace, the service and the route.
    assert_eq!(st["entities"], 3, "{st}");
    let store = &dp.shared().store;
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.list("services").unwrap()[0]["name"], "echo");
    assert_eq!(snapshot.list("routes").unwrap()[0]["paths"], json!(["/a"]));
    wait_proxy(&dp).await;
    let (code, body) = proxy_get(&dp, "/a/x").await;
    assert_eq!(code, StatusCode::OK, "{body}");
    assert_eq!(body["path"], "/up/x");
    let (code, _) = proxy_get(&dp, "/nope").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    // /metrics reads the same store.
    let text = reqwest::get(format!("{}/metrics", status_url(&dp)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("deltaplane_declarative_last_load_failed 0")
            && text.contains("deltaplane_declarative_loads_total{result=\"applied\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("deltaplane_applied_version 1"),
        "{}",
        &text[..text.len().min(2000)]
    );
    // Without a token there is no POST /config.
    let (code, _) = post_config(&dp, "", Some(TOKEN), "application/json", "{}").await;
    assert!(
        code == StatusCode::NOT_FOUND || code == StatusCode::METHOD_NOT_ALLOWED,
        "{code}"
    );
}

#[tokio::test]
async fn one_version_per_changed_file_and_restarts_keep_it() {
    let (mut dp, file) =
        start_file_dp(&file_text("http://127.0.0.1:9/up", &["/a"]), false, None).await;
    assert_eq!(dp.shared().store.state().version, 1);
    let hash1 = dp.state().1;
    // Restarted on the same file: the stored configuration, the same version.
    dp.restart().await;
    assert_eq!(dp.state(), (1, hash1.clone()));
    let st = dp.shared().status_json();
    assert_eq!(st["declarative"]["unchanged"], 1, "{st}");
    assert_eq!(st["declarative"]["last_applied_version"], 1);
    // A changed file: one version more.
    std::fs::write(&file, file_text("http://127.0.0.1:9/up", &["/a", "/b"])).unwrap();
    dp.restart().await;
    let (v, hash2) = dp.state();
    assert_eq!(v, 2);
    assert_ne!(hash2, hash1);
    let recomputed = dp.shared().store.compute_state_hash().unwrap().to_hex();
    assert_eq!(recomputed, hash2);
    // Back to the first file: a new version (versions never go back), the first state.
    std::fs::write(&file, file_text("http://127.0.0.1:9/up", &["/a"])).unwrap();
    dp.restart().await;
    assert_eq!(dp.state(), (3, hash1));
}

#[tokio::test]
async fn an_invalid_or_missing_file_stops_startup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kong.yml");
    // Missing.
    let err = deltaplane::dp::start(file_config(dir.path(), &file, false, None))
        .await
        .err()
        .expect("a missing file is refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("kong.yml"), "{msg}");
    // Not a configuration: a route with a bad path.
    std::fs::write(
        &file,
        "_format_version: \"3.0\"\nservices:\n- name: s\n  url: http://127.0.0.1:9\n  routes:\n  - name: r\n    paths: [\"no-slash\"]\n",
    )
    .unwrap();
    let err = deltaplane::dp::start(file_config(dir.path(), &file, false, None))
        .await
        .err()
        .expect("an invalid file is refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("cannot be applied"), "{msg}");
    // Not YAML at all.
    std::fs::write(&file, "_format_version: [\n").unwrap();
    let err = deltaplane::dp::start(file_config(dir.path(), &file, false, None))
        .await
        .err()
        .expect("invalid YAML is refused");
    assert!(format!("{err:#}").contains("line"), "{err:#}");
}

#[tokio::test]
async fn a_plugin_the_proxy_does_not_execute_is_refused_by_name() {
    let text = "_format_version: \"3.0\"\nplugins:\n- name: request-transformer\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kong.yml");
    std::fs::write(&file, text).unwrap();
    let err = deltaplane::dp::start(file_config(dir.path(), &file, true, None))
        .await
        .err()
        .expect("refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("request-transformer"), "{msg}");
    // A sync-only data plane (no proxy) stores it.
    let cfg = file_config(dir.path(), &file, false, None);
    let dp = TestDp::start(cfg, dir).await;
    assert_eq!(dp.shared().store.state().version, 1);

    // Posted to a proxying one: 400 naming it, the last good configuration kept.
    let (dp, _file) = start_file_dp(
        &file_text("http://127.0.0.1:9/up", &["/a"]),
        true,
        Some(TOKEN),
    )
    .await;
    let (code, body) = post_config(&dp, "", Some(TOKEN), "application/x-yaml", text).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], 14);
    assert!(body.to_string().contains("request-transformer"), "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("--proxy-listen off")),
        "{body}"
    );
    assert_eq!(dp.shared().store.state().version, 1);
    let st = dp.shared().status_json();
    let last = st["declarative"]["last_error"].as_str().unwrap_or_default();
    assert!(last.contains("request-transformer"), "{st}");
}

#[tokio::test]
async fn post_config_is_guarded_and_answers_as_kong() {
    let echo = Echo::start("post").await;
    let first = file_text(&echo.url("/up"), &["/a"]);
    let (dp, file) = start_file_dp(&first, true, Some(TOKEN)).await;
    wait_proxy(&dp).await;
    let second = file_text(&echo.url("/up"), &["/a", "/b"]);
    // No token, a wrong one.
    let (code, _) = post_config(&dp, "", None, "application/x-yaml", second.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _) = post_config(&dp, "", Some("wrong"), "application/x-yaml", second.clone()).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(dp.shared().store.state().version, 1);
    // The right one: 201 with the entities by type and id, one new version.
    let (code, body) =
        post_config(&dp, "", Some(TOKEN), "application/x-yaml", second.clone()).await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(
        body["routes"].as_object().map(|m| m.len()),
        Some(2),
        "{body}"
    );
    assert_eq!(dp.shared().store.state().version, 2);
    wait_proxy(&dp).await;
    let (code, _) = proxy_get(&dp, "/b").await;
    assert_eq!(code, StatusCode::OK);
    // GET /config: the served configuration as Kong's {"config": "<YAML>"}, behind the
    // token; posting it back changes nothing.
    let r = reqwest::Client::new()
        .get(format!("{}/config", status_url(&dp)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let exported: Value = reqwest::Client::new()
        .get(format!("{}/config", status_url(&dp)))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let yaml = exported["config"].as_str().expect("config text").to_owned();
    assert!(yaml.contains("/b"), "{yaml}");
    let (code, _) = post_config(
        &dp,
        "?check_hash=1",
        Some(TOKEN),
        "application/x-yaml",
        yaml,
    )
    .await;
    assert_eq!(code, StatusCode::NOT_MODIFIED);
    // The file on disk is not rewritten.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
    // The same configuration under check_hash=1: 304, nothing applied.
    let (code, _) = post_config(
        &dp,
        "?check_hash=1",
        Some(TOKEN),
        "application/x-yaml",
        second.clone(),
    )
    .await;
    assert_eq!(code, StatusCode::NOT_MODIFIED);
    // Without check_hash: 201, still no new version.
    let (code, _) = post_config(&dp, "", Some(TOKEN), "application/x-yaml", second.clone()).await;
    assert_eq!(code, StatusCode::CREATED);
    assert_eq!(dp.shared().store.state().version, 2);
    // Kong's {"config": "..."} wrapper, with check_hash in the body.
    let wrapped = json!({"config": second, "check_hash": 1}).to_string();
    let (code, _) = post_config(&dp, "", Some(TOKEN), "application/json", wrapped).await;
    assert_eq!(code, StatusCode::NOT_MODIFIED);
    // curl -F config=@kong.yml
    let boundary = "------------------------dpfile1";
    let third = file_text(&echo.url("/up"), &["/c"]);
    let multipart = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"config\"; filename=\"kong.yml\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{third}\r\n--{boundary}--\r\n"
    );
    let (code, body) = post_config(
        &dp,
        "",
        Some(TOKEN),
        &format!("multipart/form-data; boundary={boundary}"),
        multipart,
    )
    .await;
    assert_eq!(code, StatusCode::CREATED, "{body}");
    assert_eq!(dp.shared().store.state().version, 3);
    wait_proxy(&dp).await;

    // Invalid: 400, Kong's code 14, and the last good configuration still served.
    let bad = "_format_version: \"3.0\"\nservices:\n- name: echo\n  url: 12\n";
    let (code, body) = post_config(&dp, "", Some(TOKEN), "application/x-yaml", bad).await;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], 14, "{body}");
    assert_eq!(body["name"], "invalid declarative configuration");
    let (code, body) = post_config(
        &dp,
        "?flatten_errors=1",
        Some(TOKEN),
        "application/x-yaml",
        bad,
    )
    .await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["flattened_errors"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{body}"
    );
    assert_eq!(body["fields"], json!({}));
    assert_eq!(dp.shared().store.state().version, 3);
    let (code, _) = proxy_get(&dp, "/c").await;
    assert_eq!(code, StatusCode::OK);
    let (_, st) = get_json(&format!("{}/status", status_url(&dp))).await;
    assert!(st["declarative"]["last_error"].is_string(), "{st}");
    assert!(st["declarative"]["last_error_at"].is_i64(), "{st}");
    assert_eq!(st["declarative"]["last_applied_version"], 3);
    let text = reqwest::get(format!("{}/metrics", status_url(&dp)))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("deltaplane_declarative_last_load_failed 1"),
        "{text}"
    );
    assert!(
        text.contains("deltaplane_declarative_loads_total{result=\"failed\"} 2"),
        "{text}"
    );
    let v = rpc(&dp).await;
    assert_eq!(v["in_sync"], false, "{v}");
    assert!(v["last_error"].is_string());
    // Ready all along: a configuration is served.
    let (code, _) = get_json(&format!("{}/status/ready", status_url(&dp))).await;
    assert_eq!(code, StatusCode::OK);
    // An empty body: Kong's 400.
    let (code, body) = post_config(&dp, "", Some(TOKEN), "application/x-yaml", "").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert_eq!(body["message"], "expected a declarative configuration");
}

#[tokio::test]
async fn post_config_refuses_bodies_past_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kong.yml");
    std::fs::write(&file, file_text("http://127.0.0.1:9/up", &["/a"])).unwrap();
    let mut cfg = file_config(dir.path(), &file, false, Some(TOKEN));
    cfg.config_max_body = 1024;
    let dp = TestDp::start(cfg, dir).await;
    let big = format!(
        "{}\n# {}\n",
        file_text("http://127.0.0.1:9/up", &["/a"]),
        "x".repeat(4096)
    );
    let (code, body) = post_config(&dp, "", Some(TOKEN), "application/x-yaml", big.clone()).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    // Without a Content-Length (chunked): also 413.
    let stream = futures::stream::iter(
        big.into_bytes()
            .chunks(512)
            .map(|c| {
                Ok::<_, std::io::Error>(hyper::body::Frame::data(bytes::Bytes::copy_from_slice(c)))
            })
            .collect::<Vec<_>>(),
    );
    let (code, _) = post_config(
        &dp,
        "",
        Some(TOKEN),
        "application/x-yaml",
        reqwest::Body::wrap(http_body_util::StreamBody::new(stream)),
    )
    .await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(dp.shared().store.state().version, 1);
}

#[tokio::test]
async fn a_file_cannot_be_combined_with_a_control_plane() {
    let args = deltaplane::dp::config::RunArgs {
        declarative_config: Some("kong.yml".into()),
        cluster_control_plane: Some(vec!["127.0.0.1:8005".into()]),
        ..Default::default()
    };
    let err = DpConfig::from_args(&args).expect_err("refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("--declarative-config") && msg.contains("--cluster-control-plane"),
        "{msg}"
    );
    // The TOML file's keys, as for every flag.
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("dp.toml");
    std::fs::write(
        &toml,
        "declarative-config = \"/etc/kong.yml\"\nconfig-token = \"t\"\nconfig-max-body = 2048\n",
    )
    .unwrap();
    let args = deltaplane::dp::config::RunArgs {
        config: Some(toml.clone()),
        ..Default::default()
    };
    let cfg = DpConfig::from_args(&args).unwrap();
    assert_eq!(cfg.declarative_config, Some(PathBuf::from("/etc/kong.yml")));
    assert!(cfg.control_planes.is_empty());
    assert_eq!(cfg.config_token.as_deref(), Some("t"));
    assert_eq!(cfg.config_max_body, 2048);
    std::fs::write(
        &toml,
        "declarative-config = \"/etc/kong.yml\"\ncluster-control-plane = \"cp:8005\"\n",
    )
    .unwrap();
    assert!(DpConfig::from_args(&args).is_err());
    // The library refuses it too.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = DpConfig::declarative(dir.path(), dir.path().join("kong.yml"));
    cfg.control_planes = vec!["127.0.0.1:8005".into()];
    assert!(deltaplane::dp::start(cfg).await.is_err());
    // A token without a file.
    let args = deltaplane::dp::config::RunArgs {
        config_token: Some(TOKEN.into()),
        ..Default::default()
    };
    let err = DpConfig::from_args(&args).expect_err("refused");
    assert!(format!("{err:#}").contains("--config-token"), "{err:#}");
}

/// A file-mode store later pointed at a control plane gets a full sync (the epochs differ),
/// and a CP-synced store restarted in file mode gets a full apply under the file epoch.
#[tokio::test]
async fn file_and_control_plane_epochs_never_mix() {
    let cp = TestCp::start(Backend::Sqlite).await.expect("sqlite");
    cp.create(
        "/services",
        json!({"name": "from-cp", "url": "http://127.0.0.1:9"}),
    )
    .await;
    let (mut dp, file) =
        start_file_dp(&file_text("http://127.0.0.1:9/up", &["/a"]), false, None).await;
    assert_eq!(dp.state().0, 1);
    dp.stop().await;
    // The same data dir, now following the control plane.
    let file_cfg = dp.cfg.clone();
    let mut cp_cfg = cp.dp_config(&file_cfg.data_dir);
    cp_cfg.data_dir = file_cfg.data_dir.clone();
    dp.cfg = cp_cfg;
    dp.restart().await;
    dp.converge(&cp, 30).await;
    let link = dp.shared().link();
    assert_eq!(link.full_syncs, 1, "{:?}", dp.shared().status_json());
    let snapshot = dp.shared().store.snapshot().unwrap();
    let services = snapshot.list("services").unwrap();
    assert_eq!(services.len(), 1);
    assert_eq!(services[0]["name"], "from-cp");
    drop(snapshot);
    let cp_version = dp.state().0;
    assert_ne!(dp.shared().store.state().epoch.as_deref(), Some(FILE_EPOCH));
    // Back to the file: a full apply under the file epoch, one version above.
    dp.stop().await;
    dp.cfg = file_cfg;
    dp.restart().await;
    let s = dp.shared().store.state();
    assert_eq!(s.version, cp_version + 1);
    assert_eq!(s.epoch.as_deref(), Some(FILE_EPOCH));
    let snapshot = dp.shared().store.snapshot().unwrap();
    assert_eq!(snapshot.list("services").unwrap()[0]["name"], "echo");
    assert!(file.exists());
    dp.stop().await;
    cp.shutdown().await;
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_until(secs: u64, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The real binary: SIGHUP re-reads the file; a broken file on SIGHUP keeps the last good
/// configuration; a broken file at startup exits non-zero with the error.
#[tokio::test]
async fn the_binary_reloads_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kong.yml");
    let echo = Echo::start("hup").await;
    std::fs::write(&file, file_text(&echo.url("/up"), &["/a"])).unwrap();
    let (status, proxy) = (free_port(), free_port());
    let cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"));
        c.args(["run", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--declarative-config")
            .arg(&file)
            .args(["--status-listen", &format!("127.0.0.1:{status}")])
            .args(["--proxy-listen", &format!("127.0.0.1:{proxy}")])
            .args(["--durable", "false"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        c
    };
    let dp = Proc(cmd().spawn().unwrap());
    let base = format!("http://127.0.0.1:{status}");
    let version = async || -> Option<Value> {
        let r = reqwest::get(format!("{base}/status")).await.ok()?;
        r.json::<Value>().await.ok()
    };
    assert!(
        wait_until(30, async || version()
            .await
            .is_some_and(|v| v["version"] == 1))
        .await,
        "the DP did not apply the file"
    );
    let routed = async |path: &str| {
        reqwest::get(format!("http://127.0.0.1:{proxy}{path}"))
            .await
            .is_ok_and(|r| r.status() == 200)
    };
    assert!(wait_until(20, async || routed("/a").await).await);
    assert!(!routed("/b").await);
    let hup = || {
        let ok = Command::new("kill")
            .args(["-HUP", &dp.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    };
    std::fs::write(&file, file_text(&echo.url("/up"), &["/a", "/b"])).unwrap();
    hup();
    assert!(
        wait_until(30, async || version()
            .await
            .is_some_and(|v| v["version"] == 2))
        .await,
        "SIGHUP did not apply the changed file: {:?}",
        version().await
    );
    assert!(wait_until(20, async || routed("/b").await).await);
    // A broken file: the last good configuration stays, the error is in /status.
    std::fs::write(&file, "_format_version: \"3.0\"\nservices: 12\n").unwrap();
    hup();
    assert!(
        wait_until(30, async || version()
            .await
            .is_some_and(|v| v["declarative"]["last_error"].is_string()))
        .await,
        "the failed reload is not reported: {:?}",
        version().await
    );
    let v = version().await.unwrap();
    assert_eq!(v["version"], 2);
    assert!(routed("/b").await);
    // `deltaplane-dp status` says where the configuration comes from.
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"))
        .args(["status", "--rpc", &format!("{base}/rpc")])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(summary.contains("source: declarative file"), "{summary}");
    assert!(summary.contains("last error:"), "{summary}");
    drop(dp);

    // Restarted on the broken file: exits non-zero, saying why.
    let out = cmd().stdout(Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kong.yml"), "{stderr}");
}

/// Kong's DB-less fixture `spec/fixtures/burst.yml` (format 1.1, no ids) runs a proxying data
/// plane: every entity stored, ip-restriction and prometheus executed, and a restart on the
/// same file keeps the version (its generated ids are stable).
#[tokio::test]
async fn kongs_burst_fixture_runs_a_proxying_data_plane() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kong/burst.yml");
    let dir = tempfile::tempdir().unwrap();
    let cfg = file_config(dir.path(), &fixture, true, None);
    let started = Instant::now();
    let mut dp = TestDp::start(cfg, dir).await;
    let took = started.elapsed();
    let snapshot = dp.shared().store.snapshot().unwrap();
    let count = |ty: &str| snapshot.list(ty).unwrap().len();
    assert_eq!(count("services"), 236);
    assert_eq!(count("routes"), 286);
    assert_eq!(count("upstreams"), 236);
    assert_eq!(count("targets"), 237);
    assert_eq!(count("plugins"), 95);
    drop(snapshot);
    wait_proxy(&dp).await;
    let st = dp.shared().status_json();
    assert_eq!(st["proxy"]["refused"], Value::Null, "{st}");
    eprintln!("burst.yml: applied in {took:?} (start included)");
    let before = dp.state();
    assert_eq!(before.0, 1);
    dp.restart().await;
    assert_eq!(dp.state(), before);
}

/// A key-auth credential whose key the file omits gets a generated key once: re-reading the
/// same file keeps it (and makes no version), as decK and Kong's importer keep stored values.
#[tokio::test]
async fn generated_values_survive_a_reload() {
    let text = "_format_version: \"3.0\"\nconsumers:\n- username: alice\n  keyauth_credentials:\n  - tags: [\"k\"]\n";
    let (mut dp, _file) = start_file_dp(text, false, None).await;
    let key = |dp: &TestDp| {
        let creds = dp.shared().store.list("keyauth_credentials").unwrap();
        assert_eq!(creds.len(), 1);
        (creds[0]["id"].clone(), creds[0]["key"].clone())
    };
    let before = (dp.state(), key(&dp));
    assert!(before.1.1.as_str().is_some_and(|k| !k.is_empty()));
    dp.restart().await;
    assert_eq!((dp.state(), key(&dp)), before);
}
