//! The real `deltaplane-cp` binary as a process: quickstart defaults, migrate, graceful stop.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

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
