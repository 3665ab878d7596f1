//! The fleet simulator's quick mode, in-process: 20 simulated data planes (Kong and
//! deltaplane dialects mixed) on real mTLS WebSockets to an in-process control plane, 20
//! Admin API writes, then the simulator's correctness gate: every DP at the CP's head with
//! the CP's state hash (each DP verified its hash after every apply), and no Kong DP notified
//! twice for one version or for a version it holds. Correctness only, no speed assertion;
//! the real-process modes are `examples/fleetsim`.

use std::sync::Arc;
use std::time::Duration;

use deltaplane::net::tls::{ClusterTls, TlsSettings};

use crate::harness::{Backend, TestCp};

#[path = "../../examples/fleetsim/floor.rs"]
mod floor;
#[path = "../../examples/fleetsim/sim.rs"]
mod sim;

const DPS: u32 = 20;
const WRITES: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_fleet_reaches_the_head_with_the_cps_hash() {
    let cp = TestCp::start(Backend::Sqlite).await.unwrap();
    let (cluster, crt, key) = cp.cluster_target();
    let tls = ClusterTls::load(&TlsSettings::shared(crt, key)).unwrap();
    let rpc_url = format!("{}/rpc", cp.base);
    let http = reqwest::Client::new();
    let ids = sim::seed(&http, &cp.base, 4).await.unwrap();
    let cfg = Arc::new(sim::SimConfig {
        cluster,
        rpc_url: rpc_url.clone(),
        tls,
        poll: Duration::from_secs(30),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(500),
        timeout: Duration::from_secs(10),
        max_payload: 16 << 20,
        ramp: 8,
        status_interval: Duration::ZERO,
    });
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let fleet = sim::spawn(cfg, 0, DPS, sim::Mix::Mixed, tx);
    let mut pump = sim::Pump::new(rx, DPS as usize);

    let (head, _) = sim::cp_head(&rpc_url).await.unwrap();
    pump.until(Duration::from_secs(60), "first sync", |t| t.all_at(head))
        .await
        .unwrap();
    let t0s = sim::write_paced(&http, &cp.base, &ids, WRITES, 50.0)
        .await
        .unwrap();
    assert_eq!(t0s.len(), WRITES);
    let (new_head, _) = sim::cp_head(&rpc_url).await.unwrap();
    assert_eq!(new_head, head + WRITES as i64, "one version per write");
    pump.until(Duration::from_secs(60), "catch up", |t| t.all_at(new_head))
        .await
        .unwrap();
    // Late notifications would show up as violations: give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    pump.drain();
    pump.tracker.gate(new_head).unwrap();

    let c = fleet.counters.snapshot();
    let get = |name: &str| c[sim::COUNTER_NAMES.iter().position(|n| *n == name).unwrap()];
    let counters = fleet.counters.to_line();
    // Every DP did one full sync, then followed the writes incrementally: the Kong DPs after
    // notifications, the deltaplane DPs from pushes.
    assert!(get("answer_full") >= DPS as u64, "{counters}");
    assert!(get("answer_deltas") >= DPS as u64, "{counters}");
    assert!(get("notify") >= DPS as u64 / 2, "{counters}");
    assert!(get("push_applied") >= DPS as u64 / 2, "{counters}");
    fleet.shutdown().await;
    cp.shutdown().await;
}

/// `fleetsim floor --tls` on a few connections: mutual TLS 1.3 handshakes with the CP's
/// configuration, every push decrypted by its DP side and every report read by the CP side
/// through epoll (the floor checks both). Correctness only, no speed assertion.
#[test]
fn tls_floor_pushes_and_reads_reports() {
    let res = floor::tls(8, 200, 120, 2).unwrap();
    assert!(res.negotiated.starts_with("TLSv1_3 "), "{}", res.negotiated);
    // One record: 5 B header, the 200 B frame, 1 B content type, 16 B AEAD tag.
    assert_eq!(res.push_wire_bytes, 222);
}
