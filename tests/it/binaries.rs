//! The real `deltaplane-cp` binary as a process: quickstart defaults, migrate, graceful stop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::free_port;

#[tokio::test]
async fn cp_binary_serves_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .env("DELTAPLANE_ADMIN_LISTEN", format!("127.0.0.1:{port}"))
        .env("DELTAPLANE_CLUSTER_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        if let Ok(r) = client.get(format!("http://127.0.0.1:{port}/")).send().await {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        assert!(Instant::now() < deadline, "the CP did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(body["role"], "control_plane");
    let r = client
        .post(format!("http://127.0.0.1:{port}/services"))
        .json(&serde_json::json!({"name": "s", "host": "s.test"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(dir.path().join("deltaplane.db").exists());
    // SIGTERM: graceful exit with status 0.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no graceful exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn cp_migrate_and_config_file_precedence() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cp.toml");
    std::fs::write(
        &cfg,
        format!(
            "data-dir = {:?}\nadmin-listen = \"127.0.0.1:0\"\n",
            dir.path().join("fromfile").display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["migrate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("change-log version 1"));
    assert!(
        dir.path().join("fromfile/deltaplane.db").exists(),
        "data-dir taken from the file"
    );
    // A flag beats the environment beats the file.
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["migrate", "--config"])
        .arg(&cfg)
        .env("DELTAPLANE_DATA_DIR", dir.path().join("fromenv"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("fromenv/deltaplane.db").exists());
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["migrate", "--config"])
        .arg(&cfg)
        .env("DELTAPLANE_DATA_DIR", dir.path().join("fromenv2"))
        .arg("--data-dir")
        .arg(dir.path().join("fromflag"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir.path().join("fromflag/deltaplane.db").exists());
    assert!(!dir.path().join("fromenv2").exists());
    // Unknown keys in the file are an error, not silently ignored.
    std::fs::write(&cfg, "admin-lisen = \"x\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["migrate", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown key"));
}

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn json_of(out: std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

async fn wait_until(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// The README quickstart as processes: a CP and a DP on embedded defaults (the DP uses the
/// certificate the CP generated), a write, the DP's version moving, `status` on both; then
/// the DP restarted without a CP serves its stored configuration.
#[tokio::test]
async fn cp_and_dp_binaries_sync() {
    let dir = tempfile::tempdir().unwrap();
    let cp_dir = dir.path().join("cp");
    let dp_dir = dir.path().join("dp");
    let (admin, cluster, status) = (free_port(), free_port(), free_port());
    let proxy = free_port();
    let echo = crate::upstreams::Echo::start("quick").await;
    let _cp = Proc(
        Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
            .args(["serve", "--data-dir"])
            .arg(&cp_dir)
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--cluster-listen", &format!("127.0.0.1:{cluster}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let crt = cp_dir.join("cluster.crt");
    assert!(
        wait_until(20, || crt.exists() && cp_dir.join("cluster.key").exists()).await,
        "the CP did not generate its cluster certificate"
    );
    let dp_cmd = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"));
        c.args(["run", "--data-dir"])
            .arg(&dp_dir)
            .args(["--cluster-control-plane", &format!("127.0.0.1:{cluster}")])
            .arg("--cluster-cert")
            .arg(&crt)
            .arg("--cluster-cert-key")
            .arg(cp_dir.join("cluster.key"))
            .args(["--status-listen", &format!("127.0.0.1:{status}")])
            .args(["--proxy-listen", &format!("127.0.0.1:{proxy}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    };
    let mut dp = Proc(dp_cmd().spawn().unwrap());
    let client = reqwest::Client::new();
    let admin_url = format!("http://127.0.0.1:{admin}");
    let mut created = false;
    for _ in 0..200 {
        if let Ok(r) = client
            .post(format!("{admin_url}/services"))
            .json(&serde_json::json!({"name": "quick", "url": echo.url("/up")}))
            .send()
            .await
        {
            assert_eq!(r.status(), 201);
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(created);
    let r = client
        .post(format!("{admin_url}/services/quick/routes"))
        .json(&serde_json::json!({"paths": ["/quick"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let cp_status = || {
        json_of(
            Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
                .args(["status", "--json", "--rpc", &format!("{admin_url}/rpc")])
                .output()
                .unwrap(),
        )
    };
    let dp_status = || {
        Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"))
            .args([
                "status",
                "--json",
                "--rpc",
                &format!("http://127.0.0.1:{status}/rpc"),
            ])
            .output()
            .unwrap()
    };
    let head = cp_status()["sync_version"].clone();
    let synced = wait_until(30, || {
        let out = dp_status();
        out.status.success() && {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["version"] == head["version"] && v["in_sync"] == true
        }
    })
    .await;
    assert!(synced, "the DP did not reach {head}");
    let v = json_of(dp_status());
    assert_eq!(v["state_hash"], head["state_hash"]);
    let planes = cp_status()["data_planes"].clone();
    assert_eq!(planes.as_array().unwrap().len(), 1, "{planes}");
    // The human summary works too.
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"))
        .args(["status", "--rpc", &format!("http://127.0.0.1:{status}/rpc")])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(summary.contains("in sync"), "{summary}");
    assert!(summary.contains("proxy: serving version"), "{summary}");

    // Without a CP, a restarted DP serves what it stored.
    drop(_cp);
    let _ = Command::new("kill")
        .args(["-TERM", &dp.0.id().to_string()])
        .status();
    assert!(wait_until(10, || dp.0.try_wait().unwrap().is_some()).await);
    dp = Proc(dp_cmd().spawn().unwrap());
    let ready = wait_until(20, || {
        let out = dp_status();
        out.status.success()
    })
    .await;
    assert!(ready);
    let mut ready = false;
    for _ in 0..100 {
        let r = client
            .get(format!("http://127.0.0.1:{status}/status/ready"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ready, "the restarted DP never became ready");
    let v = json_of(dp_status());
    assert_eq!(v["version"], head["version"]);
    assert_eq!(v["state_hash"], head["state_hash"]);
    assert_eq!(v["connected"], false);
    let r = client
        .get(format!("http://127.0.0.1:{status}/status/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // ... and proxies traffic by it.
    let r = client
        .get(format!("http://127.0.0.1:{proxy}/quick/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["path"], "/up/x");
    drop(dp);
}

#[test]
fn certs_generate_writes_a_loadable_pair() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["certs", "generate", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tls = deltaplane::net::tls::ClusterTls::load(&deltaplane::net::tls::TlsSettings {
        mode: deltaplane::net::tls::MtlsMode::Shared,
        cert: dir.path().join("cluster.crt").display().to_string(),
        key: dir.path().join("cluster.key").display().to_string(),
        ca_cert: None,
        server_name: None,
        allowed_common_names: Vec::new(),
    })
    .unwrap();
    assert_eq!(
        tls.identity().common_name.as_deref(),
        Some("kong_clustering")
    );
    // A second run refuses to overwrite.
    let out = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
        .args(["certs", "generate", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
}
