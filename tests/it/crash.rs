//! Crash consistency with real processes: the data plane killed (abort, no unwinding) at points
//! chosen by progress inside large incremental applies and full syncs, and the control plane
//! killed with SIGKILL under Admin API write load.
//!
//! `DELTAPLANE_CRASH_ITERATIONS` raises the DP loop's iteration count (default 200).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deltaplane::dp::store::{DpStore, DpStoreOptions};
use deltaplane::schema::Registry;
use deltaplane::store::{Op, StateHash};
use serde_json::json;

use crate::harness::{Backend, TestCp};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `n` services through the store (fast: one transaction per 500).
async fn bulk_services(cp: &TestCp, prefix: &str, n: usize) {
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(Op::Create {
            entity: "services".into(),
            input: json!({
                "name": format!("{prefix}-{i}"),
                "host": format!("{prefix}-{i}.internal"),
                "path": "/some/longer/path/to/make/the/entity/bigger",
                "tags": ["crash", "consistency", prefix],
            }),
            scope: None,
        });
        if ops.len() == 500 {
            for r in cp.store().write_batch(std::mem::take(&mut ops)).await {
                r.unwrap();
            }
        }
    }
    for r in cp.store().write_batch(ops).await {
        r.unwrap();
    }
    let head = cp.store().version_info().await.unwrap().version;
    cp.store().observe(head);
}

/// `n` updates of existing services (versions without growing the configuration).
async fn bulk_updates(cp: &TestCp, n: usize, salt: u64) {
    let mut ops = Vec::new();
    for i in 0..n {
        ops.push(Op::Patch {
            entity: "services".into(),
            key: format!("base-{}", (i as u64 * 7 + salt) % 3000),
            input: json!({ "retries": (i as u64 + salt) % 30 }),
            scope: None,
        });
    }
    for r in cp.store().write_batch(ops).await {
        r.unwrap();
    }
    let head = cp.store().version_info().await.unwrap().version;
    cp.store().observe(head);
}

/// Opens the DP's redb file as the DP would after a restart and checks it against the CP:
/// (version, state hash) equal the CP's recorded hash at that version, and the stored
/// entities hash to it. Returns the version.
async fn check_dp_store(cp: &TestCp, data_dir: &Path, context: &str) -> i64 {
    let store = DpStore::open(
        &data_dir.join("config.redb"),
        Registry::builtin().clone(),
        DpStoreOptions::recommended(),
    )
    .unwrap_or_else(|e| panic!("{context}: redb did not open cleanly: {e}"));
    let state = store.state();
    let recomputed = store.compute_state_hash().unwrap();
    assert_eq!(
        recomputed, state.state_hash,
        "{context}: stored entities do not hash to the stored state hash"
    );
    if state.version == 0 {
        assert_eq!(
            state.state_hash,
            StateHash::ZERO,
            "{context}: version 0 holds data"
        );
    } else {
        let at = cp.store().state_hash_at(state.version).await.unwrap();
        assert_eq!(
            at,
            Some(state.state_hash),
            "{context}: DP at version {} holds another configuration than the CP had",
            state.version
        );
    }
    state.version
}

fn dp_command(cp: &TestCp, data_dir: &Path, failpoint: Option<String>) -> Command {
    let (addr, crt, key) = cp.cluster_target();
    let mut c = Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"));
    c.args(["run", "--data-dir"])
        .arg(data_dir)
        .args(["--cluster-control-plane", &addr])
        .args(["--cluster-cert", &crt, "--cluster-cert-key", &key])
        .args(["--status-listen", "127.0.0.1:0"])
        .args([
            "--cluster-ping-interval",
            "2s",
            "--cluster-idle-timeout",
            "6s",
        ])
        .env("DELTAPLANE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    match failpoint {
        Some(f) => c.env("DELTAPLANE_FAILPOINT", f),
        None => c.env_remove("DELTAPLANE_FAILPOINT"),
    };
    c
}

/// Runs a DP process until it dies at its failpoint, or, when the point is never reached,
/// until it caught up (then kills it with SIGKILL). Returns whether the failpoint fired.
async fn run_until_death(cp: &TestCp, data_dir: &Path, failpoint: String) -> bool {
    let mut child = Proc(dp_command(cp, data_dir, Some(failpoint)).spawn().unwrap());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            // abort() → SIGABRT.
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(
                status.signal(),
                Some(6),
                "the DP died of something else: {status:?}"
            );
            return true;
        }
        if Instant::now() > deadline {
            // The point was past the end of the work: kill it where it stands.
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_killed_inside_applies_recovers() {
    let iterations: usize = std::env::var("DELTAPLANE_CRASH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    bulk_services(&cp, "base", 3000).await;
    let root = tempfile::tempdir().unwrap();
    let persistent = root.path().join("dp");
    let mut last_version = 0i64;
    let mut fired = 0;
    let started = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n.max(1)
    };
    for i in 0..iterations {
        let full = i % 4 == 0;
        let (dir, work) = if full {
            // A fresh data plane: a full sync of the whole configuration (3,001 entities).
            (root.path().join(format!("fresh-{i}")), 3001)
        } else {
            // The persistent data plane falls behind by up to 300 versions.
            let k = 1 + rand(300) as usize;
            bulk_updates(&cp, k, i as u64).await;
            (persistent.clone(), k as u64)
        };
        let point = match rand(10) {
            0 => "dp.apply.commit:1".to_owned(),
            1 => "dp.apply.committed:1".to_owned(),
            _ => format!("dp.apply.write:{}", 1 + rand(work)),
        };
        if run_until_death(&cp, &dir, point.clone()).await {
            fired += 1;
        }
        let context = format!("iteration {i} ({point}, full={full})");
        let v = check_dp_store(&cp, &dir, &context).await;
        if !full {
            assert!(
                v >= last_version,
                "{context}: version went back {last_version} → {v}"
            );
            last_version = v;
        }
        if full && point.starts_with("dp.apply.committed") {
            assert!(v > 0, "{context}: a committed full sync was lost");
        }
        if i > 0 && i % 4 != 0 {
            let _ = std::fs::remove_dir_all(root.path().join(format!("fresh-{}", i - i % 4)));
        }
    }
    // It resumes: without a failpoint the persistent DP converges.
    let child = Proc(dp_command(&cp, &persistent, None).spawn().unwrap());
    let (head, hash) = cp.head().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Read the state by reopening after a stop: redb allows one process at a time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() > deadline {
            panic!("the DP did not resume to {head}");
        }
        let planes = crate::sync::rpc(&cp, "deltaplane.data_planes", None).await;
        if planes
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["version"] == head && p["state_hash"] == hash.as_str())
        {
            break;
        }
    }
    drop(child);
    assert_eq!(check_dp_store(&cp, &persistent, "resumed").await, head);
    eprintln!(
        "crash loop: {iterations} iterations, {fired} killed at their failpoint, {:?}",
        started.elapsed()
    );
    assert!(
        fired * 10 >= iterations * 8,
        "too few kills landed inside applies: {fired}/{iterations}"
    );
    cp.shutdown().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// SIGKILL the control plane under Admin API write load, restart it: every acknowledged write
/// is there, versions are gap-free and the stored state hash matches the entities, and a DP
/// converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_killed_under_write_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let (admin, cluster) = (free_port(), free_port());
    let start = || {
        Proc(
            Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"))
                .args(["serve", "--data-dir"])
                .arg(&data)
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(["--cluster-listen", &format!("127.0.0.1:{cluster}")])
                .env("DELTAPLANE_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{admin}");
    let wait_up = || async {
        let deadline = Instant::now() + Duration::from_secs(20);
        while client.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "the CP did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let mut acked: Vec<String> = Vec::new();
    let mut dp: Option<crate::harness::TestDp> = None;
    for round in 0..5 {
        let cp = start();
        wait_up().await;
        if dp.is_none() {
            let ddir = tempfile::tempdir().unwrap();
            let mut cfg = deltaplane::dp::DpConfig::new(
                ddir.path(),
                format!("127.0.0.1:{cluster}"),
                data.join("cluster.crt").display().to_string(),
                data.join("cluster.key").display().to_string(),
            );
            cfg.status_listen = "127.0.0.1:0".parse().unwrap();
            cfg.reconnect_min = Duration::from_millis(50);
            cfg.reconnect_max = Duration::from_millis(300);
            crate::harness::short_timers(&mut cfg.cluster);
            dp = Some(crate::harness::TestDp::start(cfg, ddir).await);
        }
        // Four concurrent writers; kill the CP while they run.
        let mut writers = Vec::new();
        for w in 0..4 {
            let client = client.clone();
            let base = base.clone();
            writers.push(tokio::spawn(async move {
                let mut ok = Vec::new();
                for i in 0.. {
                    let name = format!("r{round}-w{w}-{i}");
                    match client
                        .post(format!("{base}/services"))
                        .json(&json!({"name": name, "host": "h.test"}))
                        .send()
                        .await
                    {
                        Ok(r) if r.status() == 201 => ok.push(name),
                        _ => break,
                    }
                }
                ok
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + 50 * round)).await;
        drop(cp); // SIGKILL
        for w in writers {
            acked.extend(w.await.unwrap());
        }
    }
    let _cp = start();
    wait_up().await;
    assert!(acked.len() > 20, "too little load: {}", acked.len());
    for name in &acked {
        let r = client
            .get(format!("{base}/services/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged write {name} is missing");
    }
    // The change log is gap-free and its hash matches the entities.
    let store = deltaplane::store::Store::open(deltaplane::store::StoreOptions::sqlite_in(&data))
        .await
        .unwrap();
    let info = store.version_info().await.unwrap();
    let mut seen = Vec::new();
    let head = store
        .changes_after(0, i64::MAX, |c| {
            seen.push(c.version);
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    seen.dedup();
    assert_eq!(
        seen,
        (1..=head.version).collect::<Vec<_>>(),
        "versions have gaps"
    );
    let mut hash = StateHash::ZERO;
    store
        .snapshot(|c| {
            hash.add(&StateHash::of_entity(
                &c.entity_type,
                &c.ws_id,
                &c.id,
                c.entity.as_ref().unwrap(),
            ));
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        hash, info.state_hash,
        "stored state hash does not match the entities"
    );
    // The DP converges on the restarted CP.
    let dp = dp.unwrap();
    dp.wait_version(info.version, 30).await;
    assert_eq!(dp.state(), (info.version, info.state_hash.to_hex()));
    store.close().await;
}
