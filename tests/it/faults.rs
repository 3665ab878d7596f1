//! Faults (issue 5): a loopback fault proxy between data plane and control plane (latency,
//! bandwidth caps, stalls, resets mid-frame, refused connections), stuck data planes that never
//! read, a PostgreSQL crash and restart under write load, and skewed clocks.
//!
//! Every data plane here is watched by a [`Monitor`] that records each (version, state hash) it
//! commits: versions must strictly increase, and each recorded hash must equal the control
//! plane's hash at that version (nothing half-applied is ever visible).
//!
//! The tests in this file run one at a time (`SERIAL`): they measure memory and timings and
//! share two cores with everything else.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deltaplane::cp::store::Op;
use deltaplane::dp::DpConfig;
use deltaplane::settings::ClusterSettings;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::harness::{Backend, PG_ENV, TestCp, TestDb, TestDp};
use crate::pgcluster::PgCluster;
use crate::proxy::FaultProxy;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Prints past libtest's capture, so figures show in `cargo test` output.
macro_rules! report {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "[faults] {}", format!($($t)*));
    }};
}

/// Timers for a link that must notice faults within a second or two.
fn fast_timers(c: &mut ClusterSettings) {
    c.ping_interval = Duration::from_millis(500);
    c.idle_timeout = Duration::from_secs(2);
    c.write_timeout = Duration::from_secs(1);
    c.call_timeout = Duration::from_secs(5);
    c.handshake_timeout = Duration::from_secs(2);
}

/// Records every (version, state hash) a data plane commits, as seen through its watch.
struct Monitor {
    points: Arc<Mutex<Vec<(i64, String)>>>,
    violations: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Monitor {
    fn start(dp: &TestDp) -> Monitor {
        // Weak: the monitor must not keep a stopped data plane's store open.
        let shared = Arc::downgrade(dp.shared());
        let mut rx = dp.shared().subscribe();
        let points = Arc::new(Mutex::new(Vec::new()));
        let violations = Arc::new(Mutex::new(Vec::new()));
        let (p, viol) = (points.clone(), violations.clone());
        let task = tokio::spawn(async move {
            loop {
                let _ = rx.borrow_and_update();
                let Some(s) = shared.upgrade().map(|d| d.store.state()) else {
                    return;
                };
                {
                    let mut p = p.lock().unwrap();
                    let last = p.last().map(|x: &(i64, String)| x.0);
                    if last != Some(s.version) {
                        if let Some(last) = last
                            && s.version < last
                        {
                            viol.lock()
                                .unwrap()
                                .push(format!("version went back from {last} to {}", s.version));
                        }
                        p.push((s.version, s.state_hash.to_hex()));
                    }
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Monitor {
            points,
            violations,
            task,
        }
    }

    /// Stops watching; asserts strictly increasing versions, each with the CP's hash at that
    /// version. Returns the versions seen.
    async fn check(self, cp: &TestCp) -> Vec<i64> {
        self.task.abort();
        let points = self.points.lock().unwrap().clone();
        let violations = self.violations.lock().unwrap().clone();
        assert!(violations.is_empty(), "{violations:?}");
        for w in points.windows(2) {
            assert!(w[0].0 < w[1].0, "not strictly increasing: {points:?}");
        }
        for (v, hash) in &points {
            if *v == 0 {
                continue;
            }
            // Purged versions (the clock-skew test purges) cannot be checked.
            let Some(cp_hash) = cp.store().state_hash_at(*v).await.unwrap() else {
                continue;
            };
            assert_eq!(
                &cp_hash.to_hex(),
                hash,
                "the data plane's state at version {v} is not the control plane's"
            );
        }
        points.into_iter().map(|p| p.0).collect()
    }
}

/// A data plane connected through `proxy`.
async fn dp_via(cp: &TestCp, proxy: &FaultProxy, tweak: impl FnOnce(&mut DpConfig)) -> TestDp {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.control_planes = vec![proxy.addr.to_string()];
    tweak(&mut cfg);
    TestDp::start(cfg, dir).await
}

/// Writes `n` consumers through the Admin API (201 each), `pace` apart; returns the count.
fn spawn_writer(cp: &TestCp, prefix: &str, n: usize, pace: Duration) -> JoinHandle<usize> {
    let client = cp.client.clone();
    let base = cp.base.clone();
    let prefix = prefix.to_owned();
    tokio::spawn(async move {
        for i in 0..n {
            let r = client
                .post(format!("{base}/consumers"))
                .json(&json!({"username": format!("{prefix}-{i}"), "tags": ["w"]}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201, "write {i}");
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        n
    })
}

async fn join_writer(w: JoinHandle<usize>, secs: u64) -> usize {
    tokio::time::timeout(Duration::from_secs(secs), w)
        .await
        .expect("writer finished in time")
        .expect("writer")
}

/// `n` consumers with an incompressible tag each, written straight to the store (setup only).
async fn seed(cp: &TestCp, prefix: &str, n: usize) {
    seed_tagged(cp, prefix, n, 1).await
}

/// Like [`seed`], with `tags` random 32-hex-digit tags per consumer (~33 bytes each that no
/// codec compresses much below half).
async fn seed_tagged(cp: &TestCp, prefix: &str, n: usize, tags: usize) {
    let mut i = 0;
    while i < n {
        let ops: Vec<Op> = (i..(i + 500).min(n))
            .map(|j| Op::Create {
                entity: "consumers".into(),
                input: json!({
                    "username": format!("{prefix}-{j}"),
                    "custom_id": uuid::Uuid::new_v4().to_string(),
                    "tags": (0..tags).map(|_| uuid::Uuid::new_v4().simple().to_string()).collect::<Vec<_>>(),
                }),
                scope: None,
            })
            .collect();
        for r in cp.store().write_batch(ops).await {
            r.expect("seed write");
        }
        i += 500;
    }
}

/// Polls `f` every 10 ms until it holds; panics with `what` after `secs`.
async fn eventually(what: &str, secs: u64, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !f() {
        assert!(
            started.elapsed() < Duration::from_secs(secs),
            "timed out after {secs} s waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

fn connected_node(cp: &TestCp, node_id: &str) -> bool {
    cp.running()
        .fleet
        .connected()
        .iter()
        .any(|c| c.who.node_id == node_id)
}

/// Converges and returns how long it took.
async fn converge_timed(dp: &TestDp, cp: &TestCp, secs: u64) -> Duration {
    let started = Instant::now();
    dp.converge(cp, secs).await;
    started.elapsed()
}

// ---------------------------------------------------------------------------------------------
// The fault proxy
// ---------------------------------------------------------------------------------------------

/// Added latency and a bandwidth cap slow the link but change nothing else; the proxy really is
/// in the path (one write takes at least one delayed hop to show on the data plane: pushed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_and_bandwidth_cap() {
    let _serial = SERIAL.lock().await;
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let proxy = FaultProxy::start(cp.running().cluster_addr).await;
    let dp = dp_via(&cp, &proxy, |_| {}).await;
    dp.converge(&cp, 20).await;
    let mon = Monitor::start(&dp);

    let latency = Duration::from_millis(40);
    proxy.set(|f| {
        f.latency = latency;
        f.bandwidth = Some(32 * 1024);
    });
    // One write: pushed with its deltas (down), delayed once at least.
    let t = Instant::now();
    cp.create("/consumers", json!({"username": "slow-1"})).await;
    dp.converge(&cp, 10).await;
    let one = t.elapsed();
    assert!(
        one >= latency,
        "the proxy is not in the path: propagated in {one:?}"
    );

    // Under load, still under the fault.
    let w = spawn_writer(&cp, "lat", 150, Duration::ZERO);
    join_writer(w, 25).await;
    let under = converge_timed(&dp, &cp, 25).await;

    proxy.clear();
    let w = spawn_writer(&cp, "clear", 50, Duration::ZERO);
    join_writer(w, 20).await;
    let after = converge_timed(&dp, &cp, 20).await;
    let seen = mon.check(&cp).await;
    report!(
        "latency 40 ms + 32 KiB/s: one write propagated in {one:?}; converged {under:?} after 150 writes; after clearing: {after:?}; {} versions observed, up to {:?}",
        seen.len(),
        seen.last()
    );
    cp.shutdown().await;
}

/// Stalled reads (one direction, then both): the data plane drops the dead link (idle timeout,
/// or its writes time out); with the downlink stalled it cannot advance, with only the uplink
/// stalled pushed versions may still arrive. Once the stall clears it reconnects and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalls_then_recovery() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    fast_timers(&mut cfg.cluster);
    let cp = TestCp::start_with(db, cfg).await;
    let proxy = FaultProxy::start(cp.running().cluster_addr).await;
    let dp = dp_via(&cp, &proxy, |c| fast_timers(&mut c.cluster)).await;
    dp.converge(&cp, 20).await;
    let mon = Monitor::start(&dp);

    for (name, up, down) in [
        ("down", false, true),
        ("up", true, false),
        ("both", true, true),
    ] {
        // Each stall starts on an established link (the last phase's reconnect may still be
        // in its handshake, which the stall would freeze and the clearing resume).
        eventually(&format!("{name}: connected before the stall"), 20, || {
            dp.shared().link().connected_to.is_some()
        })
        .await;
        let (before, _) = dp.state();
        let accepted = proxy.accepted();
        proxy.set(|f| {
            f.stall_up = up;
            f.stall_down = down;
        });
        let w = spawn_writer(&cp, &format!("stall-{name}"), 20, Duration::ZERO);
        join_writer(w, 20).await;
        // The link is dead: the data plane notices and drops it.
        eventually(
            &format!("{name}: the data plane drops the link"),
            10,
            || dp.shared().link().connected_to.is_none(),
        )
        .await;
        if down {
            // Nothing reaches the data plane: it cannot advance.
            assert_eq!(dp.state().0, before, "{name}: applied through a stall");
        } else {
            // Only its own frames are stuck: pushed versions still arrive and are applied
            // (each checked and committed as usual; the monitor below checks the order).
            report!(
                "stall {name}: applied up to {} while the uplink was stalled",
                dp.state().0
            );
        }
        assert!(
            proxy.stats.stalled_chunks.load(Ordering::Relaxed) > 0,
            "the stall never bit"
        );
        proxy.clear();
        // It dropped the link, so it comes back through the proxy (with the uplink alone
        // stalled it may already hold every version: converging proves nothing then).
        eventually(&format!("{name}: the data plane reconnects"), 20, || {
            proxy.accepted() > accepted
        })
        .await;
        let took = converge_timed(&dp, &cp, 20).await;
        report!("stall {name}: converged {took:?} after the stall cleared");
    }
    mon.check(&cp).await;
    cp.shutdown().await;
}

/// Every connection is reset (RST) every 250 ms while two writers run: versions stay strictly
/// increasing, resets never force a full resync, and the data plane converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_resets_under_writes() {
    let _serial = SERIAL.lock().await;
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let proxy = Arc::new(FaultProxy::start(cp.running().cluster_addr).await);
    let dp = dp_via(&cp, &proxy, |_| {}).await;
    dp.converge(&cp, 20).await;
    let full_before = dp.shared().status_json()["full_syncs"].as_u64().unwrap();
    let mon = Monitor::start(&dp);

    let stop = Arc::new(AtomicBool::new(false));
    let resetter = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                proxy.reset_all();
            }
        })
    };
    let a = spawn_writer(&cp, "ra", 150, Duration::from_millis(5));
    let b = spawn_writer(&cp, "rb", 150, Duration::from_millis(5));
    join_writer(a, 25).await;
    join_writer(b, 25).await;
    stop.store(true, Ordering::Relaxed);
    resetter.await.unwrap();
    let took = converge_timed(&dp, &cp, 20).await;
    let resets = proxy.resets();
    assert!(resets >= 4, "only {resets} resets happened");
    let st = dp.shared().status_json();
    assert_eq!(
        st["full_syncs"].as_u64().unwrap(),
        full_before,
        "a reset forced a full resync: {st}"
    );
    let seen = mon.check(&cp).await;
    report!(
        "resets every 250 ms: {resets} resets, {} connections, {} distinct versions applied, converged {took:?} after the last",
        proxy.accepted(),
        seen.len()
    );
    cp.shutdown().await;
}

/// Refused connections: the data plane keeps serving its last version, retries, and converges
/// once connections are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_keep_the_last_config() {
    let _serial = SERIAL.lock().await;
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let proxy = FaultProxy::start(cp.running().cluster_addr).await;
    let dp = dp_via(&cp, &proxy, |_| {}).await;
    dp.converge(&cp, 20).await;
    let mon = Monitor::start(&dp);
    let held = dp.state();

    proxy.set(|f| f.refuse = true);
    proxy.reset_all();
    eventually("the data plane notices", 10, || {
        dp.shared().link().connected_to.is_none()
    })
    .await;
    let w = spawn_writer(&cp, "refused", 30, Duration::ZERO);
    join_writer(w, 20).await;
    eventually("the data plane retries", 10, || {
        proxy.stats.refused.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(dp.state(), held, "changed while unreachable");
    assert_eq!(
        dp.shared().store.list("consumers").unwrap().len(),
        0,
        "still serving the last config"
    );
    proxy.clear();
    let took = converge_timed(&dp, &cp, 20).await;
    assert_eq!(dp.shared().store.list("consumers").unwrap().len(), 30);
    mon.check(&cp).await;
    report!(
        "refused: {} connection attempts refused; converged {took:?} after accepting again",
        proxy.stats.refused.load(Ordering::Relaxed)
    );
    cp.shutdown().await;
}

/// A reset in the middle of a 2,000-entity full sync, on every attempt: nothing is applied
/// (the data plane stays empty at version 0), and once the wire is clean it syncs in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_frame_during_full_sync() {
    let _serial = SERIAL.lock().await;
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    seed(&cp, "full", 2000).await;
    let proxy = FaultProxy::start(cp.running().cluster_addr).await;

    // Calibrate: how many bytes a clean full sync sends down.
    let mut probe = dp_via(&cp, &proxy, |_| {}).await;
    probe.converge(&cp, 30).await;
    let total = proxy.stats.bytes_down.load(Ordering::Relaxed);
    probe.stop().await;
    assert!(total > 100_000, "the full sync is too small: {total} bytes");

    // Half of it: well inside the snapshot frame.
    let cut = total / 2 + 7;
    proxy.set(|f| f.reset_after_down = Some(cut));
    let resets0 = proxy.resets();
    let mut dp = dp_via(&cp, &proxy, |_| {}).await;
    let mon = Monitor::start(&dp);
    eventually("three resets mid-snapshot", 20, || {
        proxy.resets() >= resets0 + 3
    })
    .await;
    assert_eq!(dp.state().0, 0, "part of a full sync was applied");
    assert!(dp.shared().store.list("consumers").unwrap().is_empty());
    proxy.clear();
    let took = converge_timed(&dp, &cp, 30).await;
    assert_eq!(dp.shared().store.list("consumers").unwrap().len(), 2000);
    assert_eq!(dp.shared().status_json()["full_syncs"], 1);
    let seen = mon.check(&cp).await;
    assert_eq!(seen.len(), 2, "0, then the head: {seen:?}");
    report!(
        "full sync of 2,000 consumers = {total} bytes down; reset at byte {cut} {} times; converged {took:?} after clearing",
        proxy.resets() - resets0
    );
    dp.stop().await;
    cp.shutdown().await;
}

/// A catch-up of 600 versions cut into many small answers, with every connection reset after
/// ~20 KB (mid-frame): each connection commits whole answers only, progress is kept across
/// reconnects (no full sync), and the data plane converges while the fault is still on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_frame_during_incremental_catch_up() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.cluster.max_payload = 4096; // a few versions per answer
    let cp = TestCp::start_with(db, cfg).await;
    let proxy = FaultProxy::start(cp.running().cluster_addr).await;
    let mut dp = dp_via(&cp, &proxy, |c| c.cluster.max_payload = 4096).await;
    dp.converge(&cp, 20).await;
    dp.stop().await;
    let (start, _) = dp.state();
    // One consumer per version (not one batch: each op of a batch is its own version anyway).
    seed(&cp, "catch", 600).await;

    proxy.set(|f| f.reset_after_down = Some(20_011));
    let resets0 = proxy.resets();
    dp.restart().await;
    let mon = Monitor::start(&dp);
    let took = converge_timed(&dp, &cp, 25).await;
    let resets = proxy.resets() - resets0;
    assert!(resets >= 2, "the catch-up was not interrupted: {resets}");
    let st = dp.shared().status_json();
    assert_eq!(st["full_syncs"], 0, "{st}");
    let seen = mon.check(&cp).await;
    assert!(
        seen.iter().filter(|v| **v > start).count() >= 3,
        "too few steps: {seen:?}"
    );
    report!(
        "catch-up of 600 versions with a reset every ~20 KB: {resets} resets, {} commits, converged in {took:?} under the fault",
        seen.len()
    );
    proxy.clear();
    dp.stop().await;
    cp.shutdown().await;
}

/// The data plane stops reading in the middle of a large answer: the control plane's write
/// stalls and it disconnects the data plane after its write timeout (idle timeouts are far
/// longer, so nothing else can end the link); the data plane resyncs once it reads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reads_cp_disconnects_on_write_stall_and_dp_resyncs() {
    let _serial = SERIAL.lock().await;
    let slow = |c: &mut ClusterSettings| {
        c.ping_interval = Duration::from_secs(20);
        c.idle_timeout = Duration::from_secs(60);
        c.call_timeout = Duration::from_secs(60);
        c.write_timeout = Duration::from_secs(1);
    };
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    slow(&mut cfg.cluster);
    let cp = TestCp::start_with(db, cfg).await;
    let proxy = FaultProxy::start(cp.running().cluster_addr).await;
    let mut dp = dp_via(&cp, &proxy, |c| slow(&mut c.cluster)).await;
    dp.converge(&cp, 20).await;
    dp.stop().await;
    // A catch-up answer of several hundred KB, far more than the stalled path buffers.
    seed_tagged(&cp, "stall", 3000, 16).await;

    // Let the handshake through, then stop reading: the catch-up answer is far larger.
    // 12 KB: past the TLS handshake, the upgrade and the hello (~4 KB together).
    proxy.set(|f| f.stall_down_after = Some(12 * 1024));
    let accepted = proxy.accepted();
    let t = Instant::now();
    dp.restart().await;
    let mon = Monitor::start(&dp);
    let node = dp.shared().node_id.clone();
    eventually("the data plane connects", 10, || connected_node(&cp, &node)).await;
    let dropped = eventually("the control plane drops the stalled data plane", 10, || {
        !connected_node(&cp, &node)
    })
    .await;
    let since_connect = t.elapsed();
    assert!(
        since_connect < Duration::from_secs(15),
        "not the write timeout"
    );
    assert!(
        dp.state().0 < cp.head().await.0,
        "caught up through a stall"
    );
    proxy.clear();
    let took = converge_timed(&dp, &cp, 30).await;
    assert!(proxy.accepted() > accepted + 1, "no reconnect");
    mon.check(&cp).await;
    report!(
        "stalled reads: the control plane dropped the data plane {dropped:?} after it connected (write timeout 1 s); resynced {took:?} after the stall cleared"
    );
    dp.stop().await;
    cp.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Stuck data planes
// ---------------------------------------------------------------------------------------------

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A raw Kong-style data plane: TLS with the control plane's own certificate, the WebSocket
/// upgrade, the hello (`kong.sync.v2`, snappy), then `STUCK_CALLS` `get_delta` calls from
/// version 0.
/// Nothing is ever read after the hello.
async fn stuck_peer(cp: &TestCp, tls: &deltaplane::net::tls::ClusterTls) -> StuckWs {
    use futures::SinkExt as _;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let wait = Duration::from_secs(10);
    let (addr, _, _) = cp.cluster_target();
    // A peer that does not read, with a slow host's small window and MSS.
    let sock = crate::proxy::slow_host_socket(8 * 1024);
    let tcp = tokio::time::timeout(wait, sock.connect(addr.parse().unwrap()))
        .await
        .expect("connect in time")
        .expect("connect");
    let tls = tokio::time::timeout(wait, tls.connect(tcp, "127.0.0.1"))
        .await
        .expect("TLS in time")
        .expect("TLS");
    let mut req = format!("wss://{addr}/v2/outlet")
        .into_client_request()
        .unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("kong.meta.v1"),
    );
    let (mut ws, _) = tokio::time::timeout(
        wait,
        tokio_tungstenite::client_async_with_config(req, tls, None),
    )
    .await
    .expect("upgrade in time")
    .expect("upgrade");
    let hello = deltaplane::proto::hello::Hello {
        rpc_capabilities: vec!["kong.sync.v2".into()],
        rpc_frame_encodings: vec!["x-snappy-framed".into()],
        kong_version: "3.10.0".into(),
        kong_hostname: STUCK_HOST.into(),
        kong_node_id: uuid::Uuid::new_v4().to_string(),
        kong_conf: json!({"role": "data_plane"}),
    };
    let answer = deltaplane::net::hello::client_handshake(&mut ws, &hello, wait)
        .await
        .expect("hello");
    let enc = deltaplane::proto::codec::Encoding::from_name(&answer.rpc_frame_encoding).unwrap();
    for id in 2..2 + STUCK_CALLS {
        let call = json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": "kong.sync.v2.get_delta",
            "params": [{"default": {"version": deltaplane::proto::version_string(0)}}],
        });
        let frame = deltaplane::proto::codec::encode(enc, call.to_string().as_bytes());
        tokio::time::timeout(wait, ws.send(Message::binary(frame)))
            .await
            .expect("send in time")
            .expect("send");
    }
    ws
}

type StuckWs =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

const STUCK_HOST: &str = "stuck-peer";
/// Full syncs each stuck peer asks for.
const STUCK_CALLS: u64 = 8;

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// 100 raw data planes complete TLS + WebSocket + hello, ask 8 times (pipelined) for a full
/// sync of 3,000 entities and never read again. The control plane disconnects every one of them on write stall (its
/// idle timeout is far longer), its memory stays bounded, its task count returns to the
/// baseline, and a real data plane on the same control plane keeps converging throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_data_planes_are_dropped_and_memory_stays_bounded() {
    let _serial = SERIAL.lock().await;
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    // Long enough that all 100 are stuck at once (opening them takes a few seconds), far
    // shorter than the idle timeout.
    cfg.cluster.write_timeout = Duration::from_secs(8);
    cfg.cluster.idle_timeout = Duration::from_secs(120);
    cfg.cluster.ping_interval = Duration::from_secs(2);
    cfg.cluster.call_timeout = Duration::from_secs(10);
    let cp = TestCp::start_with(db, cfg).await;
    seed_tagged(&cp, "stuck", 3000, 2).await;
    let dp = cp.start_dp().await;
    dp.converge(&cp, 30).await;
    let mon = Monitor::start(&dp);
    let is_raw = |c: &deltaplane::cp::fleet::DpConn| c.who.hostname == STUCK_HOST;
    let stuck_connected = || {
        cp.running()
            .fleet
            .connected()
            .iter()
            .filter(|c| is_raw(c))
            .count()
    };
    // Warm the Admin API's keep-alive connection (a client and a server task) and settle;
    // then the baseline.
    join_writer(spawn_writer(&cp, "warm", 3, Duration::ZERO), 10).await;
    dp.converge(&cp, 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tasks0 = alive_tasks();
    let (rss0, hwm0) = memory_kib();

    let (_, crt, key) = cp.cluster_target();
    let tls = deltaplane::net::tls::ClusterTls::load(&deltaplane::net::tls::TlsSettings {
        mode: deltaplane::net::tls::MtlsMode::Shared,
        cert: crt,
        key,
        ca_cert: None,
        server_name: None,
        allowed_common_names: Vec::new(),
    })
    .unwrap();
    let mut peers: Vec<StuckWs> = Vec::new();
    let mut max_stuck = 0;
    let mut max_tasks = tasks0;
    let t_open = Instant::now();
    for wave in 0..4 {
        let opened = futures::future::join_all((0..25).map(|_| stuck_peer(&cp, &tls))).await;
        peers.extend(opened);
        max_stuck = max_stuck.max(stuck_connected());
        max_tasks = max_tasks.max(alive_tasks());
        // Writes go on meanwhile; the real data plane keeps up.
        let w = spawn_writer(&cp, &format!("wave{wave}"), 25, Duration::ZERO);
        join_writer(w, 20).await;
        dp.converge(&cp, 20).await;
        max_stuck = max_stuck.max(stuck_connected());
        max_tasks = max_tasks.max(alive_tasks());
    }
    let opened_in = t_open.elapsed();
    assert_eq!(max_stuck, 100, "not all stuck at once");
    let (rss_peak_sample, _) = memory_kib();

    // Every stuck one is dropped on write stall; the real one is not.
    let all_dropped = eventually("every stuck data plane is disconnected", 20, || {
        stuck_connected() == 0
    })
    .await;
    assert!(
        connected_node(&cp, &dp.shared().node_id),
        "the real data plane was dropped too"
    );
    let w = spawn_writer(&cp, "after", 50, Duration::ZERO);
    join_writer(w, 20).await;
    let conv = converge_timed(&dp, &cp, 20).await;
    let (rss1, hwm1) = memory_kib();
    let tasks_with_clients = alive_tasks();

    drop(peers);
    let t = Instant::now();
    while alive_tasks() > tasks0 + 2 && t.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back = t.elapsed();
    let tasks_end = alive_tasks();
    let (rss2, _) = memory_kib();
    mon.check(&cp).await;

    report!(
        "100 stuck DPs ({STUCK_CALLS} pipelined 3,000-entity full syncs each, never read): opened in {opened_in:?}; at most {max_stuck} connected at once; all dropped {all_dropped:?} after the last wave; real DP converged {conv:?} after 50 more writes"
    );
    report!(
        "memory: RSS {rss0} KiB before, {rss_peak_sample} KiB with all 100 opened, {rss1} KiB after they were dropped, {rss2} KiB after the clients closed; VmHWM {hwm0} -> {hwm1} KiB (+{} KiB)",
        hwm1.saturating_sub(hwm0)
    );
    report!(
        "tokio tasks: {tasks0} baseline, {max_tasks} peak sampled, {tasks_with_clients} once the CP dropped them (clients still open), {tasks_end} after the clients closed ({back:?})"
    );
    assert!(
        max_tasks > tasks0 + 50,
        "the stuck connections never ran on the control plane"
    );
    // Generous: a few MiB per stuck connection would already be a leak of note.
    assert!(
        hwm1.saturating_sub(hwm0) < 512 * 1024,
        "peak memory grew by {} KiB with 100 stuck data planes",
        hwm1 - hwm0
    );
    assert!(
        tasks_end <= tasks0 + 2,
        "tasks did not return to the baseline: {tasks_end} vs {tasks0}"
    );
    assert!(
        tasks_with_clients <= tasks0 + 2,
        "the control plane keeps tasks for dropped connections: {tasks_with_clients} vs {tasks0}"
    );
    cp.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Clock skew
// ---------------------------------------------------------------------------------------------

async fn exec(cp: &TestCp, sql: &str, a: i64, b: i64) {
    match cp.store().pool() {
        deltaplane::cp::store::Pool::Sqlite(p) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .bind(a)
                .bind(b)
                .execute(p)
                .await
                .unwrap();
        }
        deltaplane::cp::store::Pool::Postgres(p) => {
            sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
                .bind(a)
                .bind(b)
                .execute(p)
                .await
                .unwrap();
        }
    }
}

/// Retained versions: (count, min, max).
async fn retained(cp: &TestCp) -> (i64, i64, i64) {
    let sql = "SELECT COUNT(*), MIN(version), MAX(version) FROM dp_versions";
    match cp.store().pool() {
        deltaplane::cp::store::Pool::Sqlite(p) => sqlx::query_as(sql).fetch_one(p).await.unwrap(),
        deltaplane::cp::store::Pool::Postgres(p) => sqlx::query_as(sql).fetch_one(p).await.unwrap(),
    }
}

/// Wall-clock time decides nothing: entities stamped far in the future or past, and change-log
/// versions stamped as by control planes whose clocks jump back and forth, sync like any other;
/// the age-based purge keeps the retained versions a contiguous suffix; whether a data plane
/// gets deltas or a full sync depends only on its version against the horizon.
///
/// Not covered: the processes' own clocks cannot be skewed in-process (no clock injection), so
/// this skews the stored timestamps those clocks produce instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_does_not_decide() {
    let _serial = SERIAL.lock().await;
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let mut dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    dp.stop().await;
    let (dp_v, _) = dp.state();

    // Entities from the far future and the far past (Kong accepts an explicit created_at).
    let future = 4_102_444_800i64; // 2100-01-01
    for (name, at) in [("future", future), ("past", 1i64)] {
        let c = cp
            .create("/consumers", json!({"username": name, "created_at": at}))
            .await;
        assert_eq!(c["created_at"], at, "{c}");
    }
    for i in 0..20 {
        cp.create("/consumers", json!({"username": format!("skew-{i}")}))
            .await;
    }
    let (head, _) = cp.head().await;
    // The versions after the data plane's, stamped by clocks that jump: future, past, now...
    for v in (dp_v + 1)..=head {
        let at = match v % 3 {
            0 => future,
            1 => 1,
            _ => deltaplane::node::now_secs(),
        };
        exec(
            &cp,
            "UPDATE dp_versions SET created_at = $1 WHERE version = $2",
            at,
            v,
        )
        .await;
    }
    // Versions up to the data plane's are young: nothing after them may go, however old its
    // stamp, and nothing at all goes while the oldest is young.
    let before = retained(&cp).await;
    assert_eq!(cp.store().purge_once(3600, 0, 10_000).await.unwrap(), 0);
    assert_eq!(retained(&cp).await, before);

    // The data plane catches up incrementally, to the same hash.
    dp.restart().await;
    let mon = Monitor::start(&dp);
    dp.converge(&cp, 20).await;
    let st = dp.shared().status_json();
    assert_eq!(st["full_syncs"], 0, "{st}");
    let stored = dp.shared().store.list("consumers").unwrap();
    let future_c = stored.iter().find(|c| c["username"] == "future").unwrap();
    assert_eq!(future_c["created_at"], future);
    dp.stop().await;
    let (caught_up, _) = dp.state();

    // Now everything up to 5 versions below the head is ancient, the rest from the future:
    // the purge removes exactly that prefix, and the retained log stays contiguous.
    let keep_from = head - 5;
    exec(
        &cp,
        "UPDATE dp_versions SET created_at = $1 WHERE version < $2",
        1,
        keep_from,
    )
    .await;
    exec(
        &cp,
        "UPDATE dp_versions SET created_at = $1 WHERE version >= $2",
        future,
        keep_from,
    )
    .await;
    while cp.store().purge_once(3600, 0, 7).await.unwrap() > 0 {}
    let (n, min, max) = retained(&cp).await;
    assert_eq!((min, max), (keep_from, head));
    assert_eq!(n, max - min + 1, "the retained versions have a gap");

    // A write after the purge; the data plane, at the head before it, is still within the
    // horizon: deltas, not a full sync.
    cp.create(
        "/consumers",
        json!({"username": "after-purge", "created_at": 1}),
    )
    .await;
    assert!(caught_up >= keep_from - 1);
    dp.restart().await;
    dp.converge(&cp, 20).await;
    assert_eq!(dp.shared().status_json()["full_syncs"], 0);
    // A fresh data plane is below the horizon by version alone: a full sync.
    let fresh = cp.start_dp().await;
    fresh.converge(&cp, 20).await;
    assert_eq!(fresh.shared().status_json()["full_syncs"], 1);
    mon.check(&cp).await;
    cp.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL crash and restart
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct Attempt {
    username: String,
    started: Instant,
    elapsed: Duration,
    status: u16,
    body: Value,
}

const NOT_APPLIED: &str = "database unavailable; the request was not applied";

/// A throwaway PostgreSQL cluster crashes (`pg_ctl -m immediate stop`) under write load and
/// comes back: while it is down every write answers 503 "not applied" within 3 s; every write
/// acknowledged before, during or after is there; every "not applied" write is not; versions
/// stay gap-free; the CP recovers by itself and the data plane converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crash_and_restart_under_writes() {
    if std::env::var(PG_ENV).is_err() {
        report!(
            "NOTE: postgres_crash_and_restart_under_writes did NOT run: set {PG_ENV} (it starts its own throwaway cluster)"
        );
        return;
    }
    let _serial = SERIAL.lock().await;
    let pg = PgCluster::start().await;
    let db = TestDb {
        url: pg.url.clone(),
        dir: tempfile::tempdir().unwrap(),
        pg: None,
    };
    let mut cfg = db.cp_config();
    cfg.database_url = Some(pg.url.clone());
    cfg.database_timeout = Duration::from_secs(1);
    let cp = TestCp::start_with(db, cfg).await;
    let dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let mon = Monitor::start(&dp);

    let attempts = Arc::new(Mutex::new(Vec::<Attempt>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut writers = Vec::new();
    for w in 0..3 {
        let (attempts, stop, client, base) = (
            attempts.clone(),
            stop.clone(),
            client.clone(),
            cp.base.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let username = format!("pg-{w}-{i}");
                i += 1;
                let started = Instant::now();
                let r = client
                    .post(format!("{base}/consumers"))
                    .json(&json!({"username": username}))
                    .send()
                    .await
                    .expect("the Admin API answers");
                let status = r.status().as_u16();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                attempts.lock().unwrap().push(Attempt {
                    username,
                    started,
                    elapsed: started.elapsed(),
                    status,
                    body,
                });
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let acks = |attempts: &Mutex<Vec<Attempt>>| {
        attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.status == 201)
            .count()
    };
    eventually("writes before the crash", 20, || acks(&attempts) >= 30).await;

    let crashed_at = Instant::now();
    tokio::task::block_in_place(|| pg.crash());
    let down_at = Instant::now();
    // Down for a while under load.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let restart_at = Instant::now();
    tokio::task::block_in_place(|| pg.start_server());
    let up_at = Instant::now();
    let acks_at_restart = acks(&attempts);
    let recovered_after = || {
        attempts
            .lock()
            .unwrap()
            .iter()
            .filter(|a| a.status == 201 && a.started > up_at)
            .count()
    };
    while recovered_after() < 30 {
        assert!(
            up_at.elapsed() < Duration::from_secs(30),
            "writes do not succeed again without restarting the CP; server log:\n{}",
            pg.log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let recovered = up_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        tokio::time::timeout(Duration::from_secs(15), w)
            .await
            .expect("writer stops")
            .expect("writer");
    }
    let attempts = attempts.lock().unwrap().clone();

    // Sent and answered while it was down: 503 with a clear body, fast. (One sent just before
    // the restart may succeed once the server is back: the pool retries within its timeout.)
    let down: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.started >= down_at && a.started + a.elapsed < restart_at)
        .collect();
    if std::env::var("FAULTS_DEBUG").is_ok() {
        for a in attempts.iter().filter(|a| a.started + a.elapsed >= down_at) {
            report!(
                "{:?} +{:?} {} {}",
                a.started - down_at,
                a.elapsed,
                a.status,
                a.body
            );
        }
    }
    assert!(
        down.len() >= 2,
        "too few writes hit the outage: {}",
        down.len()
    );
    for a in &down {
        assert_eq!(a.status, 503, "while down: {a:?}");
        assert_eq!(a.body["message"], NOT_APPLIED, "{a:?}");
        assert!(a.elapsed <= Duration::from_secs(3), "slow 503: {a:?}");
    }
    let max_503 = down.iter().map(|a| a.elapsed).max().unwrap();
    let mut lat: Vec<Duration> = down.iter().map(|a| a.elapsed).collect();
    lat.sort();
    let median_503 = lat[lat.len() / 2];
    // Anything else: acknowledged, or a 503 that says what it knows, within the bound.
    let mut unknown = 0;
    for a in &attempts {
        assert!(a.elapsed <= Duration::from_secs(3), "slow answer: {a:?}");
        match a.status {
            201 => {}
            503 if a.body["message"] == NOT_APPLIED => {}
            503 => unknown += 1,
            _ => panic!("unexpected answer: {a:?}"),
        }
    }
    // Acknowledged means present; "not applied" means absent.
    let mut acked = 0;
    for a in &attempts {
        let r = cp.get(&format!("/consumers/{}", a.username)).await;
        match a.status {
            201 => {
                acked += 1;
                assert_eq!(r.status, 200, "acknowledged write lost: {a:?}");
            }
            503 if a.body["message"] == NOT_APPLIED => {
                assert_eq!(
                    r.status, 404,
                    "a write answered 'not applied' exists: {a:?}"
                )
            }
            _ => assert!(r.status == 200 || r.status == 404, "{r:?}"),
        }
    }
    // Gap-free versions, each with a delta, every consumer created exactly once in the log.
    let mut last = 0;
    let mut created = std::collections::HashSet::new();
    loop {
        let mut batch = Vec::new();
        cp.store()
            .changes_after(last, 1000, |c| {
                batch.push(c);
                Ok(())
            })
            .await
            .unwrap()
            .expect("within the horizon");
        if batch.is_empty() {
            break;
        }
        for c in batch {
            assert!(
                c.version == last || c.version == last + 1,
                "gap after {last}: {}",
                c.version
            );
            last = c.version;
            if c.entity_type == "consumers" && c.entity.is_some() {
                assert!(created.insert(c.id.clone()), "created twice: {}", c.id);
            }
        }
    }
    let (head, _) = cp.head().await;
    assert_eq!(last, head);
    let present = cp.store().version_info().await.map(|i| i.version).unwrap();
    assert_eq!(present, head);
    let conv = converge_timed(&dp, &cp, 30).await;
    mon.check(&cp).await;
    report!(
        "PostgreSQL crash (pg_ctl took {:?}): {} attempts, {acked} acknowledged ({} before the restart), {} answered 503 while down (median {median_503:?}, max {max_503:?}), {unknown} 'outcome unknown'; first 30 writes after the restart within {recovered:?}; DP converged {conv:?} later; head {head}, log gap-free",
        down_at - crashed_at,
        attempts.len(),
        acks_at_restart,
        down.len()
    );
    cp.shutdown().await;
    drop(pg);
}
