//! Crash consistency with real processes: the data plane killed with SIGKILL at points chosen
//! by progress (failpoints) inside large incremental applies, full syncs and paged transfers,
//! and the control plane killed with SIGKILL under Admin API write load.
//!
//! `DELTAPLANE_CRASH_ITERATIONS` raises the DP loop's iteration count (default 200);
//! `DELTAPLANE_CRASH_TRACE=1` prints each iteration's kill point and timings.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use deltaplane::cp::store::{Op, StateHash};
use deltaplane::dp::store::{DpStore, DpStoreOptions};
use deltaplane::schema::Registry;
use serde_json::json;

use crate::both_backends;
use crate::harness::{TestCp, TestDb, free_port};

/// Services in the crash loop's configuration for most of the loop.
const BASE: usize = 3_000;
/// Services added before the loop's last eighth: the configuration then holds 10,001
/// entities, and the persistent data plane catches up 7,000 versions.
const MORE: usize = 7_000;
/// The crash loop's frame limit: small, so that a full sync is a paged transfer of several
/// pages and a long catch-up is cut into several applies.
const CRASH_MAX_PAYLOAD: usize = 64 << 10;

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
            key: format!("base-{}", (i as u64 * 7 + salt) % BASE as u64),
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

fn dp_command(cp: &TestCp, data_dir: &Path, status: u16, failpoint: Option<String>) -> Command {
    let (addr, crt, key) = cp.cluster_target();
    let status = format!("127.0.0.1:{status}");
    let mut c = Command::new(env!("CARGO_BIN_EXE_deltaplane-dp"));
    c.args(["run", "--data-dir"])
        .arg(data_dir)
        .args(["--cluster-control-plane", &addr])
        .args(["--cluster-cert", &crt, "--cluster-cert-key", &key])
        .args(["--status-listen", &status])
        .args(["--proxy-listen", "off"])
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
    let status = free_port();
    let mut child = Proc(
        dp_command(cp, data_dir, status, Some(failpoint))
            .spawn()
            .unwrap(),
    );
    let head = cp.store().version_info().await.unwrap().version;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{status}/status/ready");
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut polled = Instant::now();
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            // The failpoint raises SIGKILL.
            use std::os::unix::process::ExitStatusExt as _;
            assert_eq!(
                status.signal(),
                Some(libc::SIGKILL),
                "the DP died of something else: {status:?}"
            );
            return true;
        }
        if Instant::now() > deadline {
            // The point was past the end of the work: kill it where it stands.
            return false;
        }
        if polled.elapsed() > Duration::from_millis(100) {
            polled = Instant::now();
            let version = match http.get(&url).send().await {
                Ok(r) => r.json::<serde_json::Value>().await.ok(),
                Err(_) => None,
            };
            if version.is_some_and(|v| v["version"].as_i64() >= Some(head)) {
                // Caught up without reaching the point (it lay past the end of the work).
                return false;
            }
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
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.max_payload = CRASH_MAX_PAYLOAD;
    let cp = TestCp::start_with(db, cfg).await;
    bulk_services(&cp, "base", BASE).await;
    let root = tempfile::tempdir().unwrap();
    let persistent = root.path().join("dp");
    let mut last_version = 0i64;
    let mut fired = 0;
    let mut fired_at = std::collections::BTreeMap::new();
    let started = Instant::now();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut rand = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n.max(1)
    };
    // Entities in the configuration (services and the default workspace).
    let mut entities = BASE as u64 + 1;
    let grow_at = iterations - iterations / 8;
    let mut grown = false;
    for i in 0..iterations {
        let full = i % 4 == 0;
        let (dir, work) = if full {
            // A fresh data plane: a full sync of the whole configuration, as a paged transfer.
            (root.path().join(format!("fresh-{i}")), entities)
        } else if i >= grow_at && !grown {
            // The persistent data plane falls behind by MORE creates: a long catch-up.
            grown = true;
            bulk_services(&cp, "more", MORE).await;
            entities += MORE as u64;
            (persistent.clone(), MORE as u64)
        } else {
            // The persistent data plane falls behind by up to 300 versions.
            let k = 1 + rand(300) as usize;
            bulk_updates(&cp, k, i as u64).await;
            (persistent.clone(), k as u64)
        };
        let point = match rand(10) {
            0 => "dp.apply.commit:1".to_owned(),
            1 => "dp.apply.committed:1".to_owned(),
            // Between the pages of a full sync, before its commit.
            2 | 3 if full => format!("dp.stage.page:{}", 1 + rand(3)),
            _ => format!("dp.apply.write:{}", 1 + rand(work)),
        };
        let t0 = Instant::now();
        if run_until_death(&cp, &dir, point.clone()).await {
            fired += 1;
            let name = point.split(':').next().unwrap().to_owned();
            *fired_at.entry(name).or_insert(0usize) += 1;
        }
        let context = format!("iteration {i} ({point}, full={full})");
        if std::env::var_os("DELTAPLANE_CRASH_TRACE").is_some() {
            eprintln!("{context}: {:?}", started.elapsed());
        }
        let t1 = Instant::now();
        let v = check_dp_store(&cp, &dir, &context).await;
        if std::env::var_os("DELTAPLANE_CRASH_TRACE").is_some() {
            eprintln!("  run {:?} check {:?}", t1 - t0, t1.elapsed());
        }
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
    let log_path = root.path().join("resume.log");
    let mut resume = dp_command(&cp, &persistent, free_port(), None);
    resume
        .env("DELTAPLANE_LOG", "info")
        .stderr(std::fs::File::create(&log_path).unwrap());
    let child = Proc(resume.spawn().unwrap());
    let (head, hash) = cp.head().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // Read the state by reopening after a stop: redb allows one process at a time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let planes = crate::sync::rpc(&cp, "deltaplane.data_planes", None).await;
            panic!("the DP did not resume to {head} {hash}; planes {planes:#}\nits log:\n{log}");
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
        "crash loop: {iterations} iterations, {fired} killed at their failpoint {fired_at:?}, {:?}",
        started.elapsed()
    );
    // Full syncs were paged transfers, and some kills landed between their pages.
    assert!(
        iterations < 20 || fired_at.get("dp.stage.page").copied().unwrap_or(0) > 0,
        "no kill landed between the pages of a transfer: {fired_at:?}"
    );
    assert!(
        fired * 10 >= iterations * 8,
        "too few kills landed inside applies: {fired}/{iterations}"
    );
    cp.shutdown().await;
}

// SIGKILL the control plane under Admin API write load, restart it: every acknowledged write
// is there, nothing else is (but the writes whose answer was cut off by the kill, each whole
// or absent), versions are gap-free and the stored state hash matches the entities, and a DP
// converges. Prints the recovery times.
both_backends!(
    cp_killed_under_write_load_loses_nothing_acknowledged,
    |backend| async move {
        let Some(db) = TestDb::new(backend).await else {
            return;
        };
        cp_killed_under_write_load(db).await;
    }
);

async fn cp_killed_under_write_load(db: TestDb) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("cp");
    let database_url = db.pg.is_some().then(|| db.url.clone());
    let (admin, cluster) = (free_port(), free_port());
    let start = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_deltaplane-cp"));
        c.args(["serve", "--data-dir"])
            .arg(&data)
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(["--cluster-listen", &format!("127.0.0.1:{cluster}")])
            .env("DELTAPLANE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(url) = &database_url {
            c.args(["--database-url", url]);
        }
        Proc(c.spawn().unwrap())
    };
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let base = format!("http://127.0.0.1:{admin}");
    // Until the restarted CP acknowledges a write; returns how long that took.
    let wait_writable = |round: usize| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let started = Instant::now();
            loop {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the CP did not come up"
                );
                let probe = json!({"username": format!("probe-{round}")});
                match client
                    .post(format!("{base}/consumers"))
                    .json(&probe)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 201 || r.status() == 409 => return started.elapsed(),
                    _ => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        }
    };
    let mut acked: Vec<String> = Vec::new();
    // Writes whose answer never came: the kill cut them off, so either outcome is right.
    let mut unknown: Vec<String> = Vec::new();
    let mut up_times = Vec::new();
    let mut converge_times = Vec::new();
    let mut dp: Option<crate::harness::TestDp> = None;
    for round in 0..5 {
        let cp = start();
        up_times.push(wait_writable(round).await);
        match &dp {
            None => {
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
            Some(dp) => {
                // The DP reconnects and catches up with what the killed CP had committed.
                let head = http_head(&client, &base).await;
                let started = Instant::now();
                dp.wait_version(head, 30).await;
                converge_times.push(started.elapsed());
            }
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
                        _ => return (ok, name),
                    }
                }
                unreachable!()
            }));
        }
        tokio::time::sleep(Duration::from_millis(150 + 50 * round as u64)).await;
        drop(cp); // SIGKILL
        for w in writers {
            let (ok, cut) = w.await.unwrap();
            acked.extend(ok);
            unknown.push(cut);
        }
    }
    let _cp = start();
    up_times.push(wait_writable(99).await);
    assert!(acked.len() > 20, "too little load: {}", acked.len());
    for name in &acked {
        let r = client
            .get(format!("{base}/services/{name}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged write {name} is missing");
    }
    let options = match &database_url {
        Some(_) => db.store_options(),
        None => deltaplane::cp::store::StoreOptions::sqlite_in(&data),
    };
    let store = deltaplane::cp::store::Store::open(options).await.unwrap();
    let info = store.version_info().await.unwrap();
    // The change log is gap-free and every service in it was written whole: acknowledged, or
    // cut off by a kill, with the body that was sent.
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
    let mut services = Vec::new();
    store
        .snapshot(|c| {
            let entity = c.entity.as_ref().unwrap();
            hash.add(&StateHash::of_entity(
                &c.entity_type,
                &c.ws_id,
                &c.id,
                entity,
            ));
            if c.entity_type == "services" {
                services.push(entity.clone());
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        hash, info.state_hash,
        "stored state hash does not match the entities"
    );
    let mut present_unknown = 0;
    for s in &services {
        let name = s["name"].as_str().unwrap().to_owned();
        assert!(
            acked.contains(&name) || unknown.contains(&name),
            "service {name} is present but was never acknowledged nor in flight at a kill"
        );
        assert_eq!(s["host"], "h.test", "service {name} is not whole: {s}");
        present_unknown += usize::from(unknown.contains(&name));
    }
    assert_eq!(services.len(), acked.len() + present_unknown);
    // The DP converges on the restarted CP.
    let dp = dp.unwrap();
    let started = Instant::now();
    dp.wait_version(info.version, 30).await;
    converge_times.push(started.elapsed());
    assert_eq!(dp.state(), (info.version, info.state_hash.to_hex()));
    eprintln!(
        "[crash] CP SIGKILL ({}): {} acknowledged, {} cut off by a kill ({present_unknown} of them committed); \
         restart to first acknowledged write {:?}; DP caught up {:?} after that",
        if database_url.is_some() {
            "postgres"
        } else {
            "sqlite"
        },
        acked.len(),
        unknown.len(),
        up_times,
        converge_times,
    );
    store.close().await;
}

/// The head version, read over the CP's operator RPC.
async fn http_head(client: &reqwest::Client, base: &str) -> i64 {
    let r: serde_json::Value = client
        .post(format!("{base}/rpc"))
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "deltaplane.sync_version"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["result"]["version"].as_i64().unwrap()
}
