//! Data-plane apply throughput: (a) one full sync of 10k and 100k ~1 KB entities in one durable
//! transaction, fed one delta at a time (`Apply::delta`) and through `Apply::feed` (validation
//! on a second thread), (b) 1,000 incremental versions of one entity each, one durable transaction per
//! version, (c) the same 1,000 versions batched 100 per transaction.
//!
//! `cargo bench --bench dp_apply`. Entities are generated (services and routes shaped as the CP
//! stores them, built once through `Registry::prepare`), so no CP is needed. Before criterion
//! runs, one pass of each prints entities/s, the split between validation and the rest, and the
//! peak RSS growth of a 100k full sync.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deltaplane::dp::store::{ApplyKind, DpStore, DpStoreOptions};
use deltaplane::proto::Delta;
use deltaplane::schema::{Mode, Registry};
use serde_json::{Value, json};

const WS: &str = "0c5d5a1e-0000-4000-8000-000000000000";

fn uuid(kind: u32, i: u64) -> String {
    format!("{kind:08x}-0000-4000-8000-{i:012x}")
}

/// A stored-form entity of `ty` from `input`, as the CP would have written it.
fn prepared(ty: &str, input: Value) -> Value {
    let registry = Registry::builtin();
    let schema = registry.get(ty).unwrap();
    registry
        .prepare(schema, input, None, Mode::Insert, 1_700_000_000)
        .unwrap()
        .entity
}

fn workspace(version: i64) -> Delta {
    let ws = prepared("workspaces", json!({"id": WS, "name": "default"}));
    Delta {
        entity_type: "workspaces".into(),
        id: WS.into(),
        ws_id: WS.into(),
        version,
        entity: Some(ws),
    }
}

fn tags(i: u64) -> Vec<String> {
    (0..12).map(|t| format!("team-{t}-tag-{i}")).collect()
}

/// Service `i`, about 1 KB of canonical JSON.
fn service(i: u64, version: i64) -> Delta {
    let e = prepared(
        "services",
        json!({"id": uuid(1, i), "name": format!("service-{i}"), "host": format!("upstream-{i}.internal.example.com"),
               "path": format!("/api/v1/service/{i}"), "tags": tags(i)}),
    );
    Delta {
        entity_type: "services".into(),
        id: uuid(1, i),
        ws_id: WS.into(),
        version,
        entity: Some(e),
    }
}

/// Route `i` of service `service_idx`, about 1 KB.
fn route(i: u64, service_idx: u64, version: i64) -> Delta {
    let e = prepared(
        "routes",
        json!({"id": uuid(2, i), "name": format!("route-{i}"), "paths": [format!("/r/{i}/a"), format!("/r/{i}/b")],
               "hosts": [format!("host-{i}.example.com")], "methods": ["GET", "POST"],
               "service": {"id": uuid(1, service_idx)}, "tags": tags(i)}),
    );
    Delta {
        entity_type: "routes".into(),
        id: uuid(2, i),
        ws_id: WS.into(),
        version,
        entity: Some(e),
    }
}

/// A full snapshot of `n` entities (half services, half routes) plus the workspace.
fn snapshot(n: u64, version: i64) -> Vec<Delta> {
    let mut out = vec![workspace(version)];
    let half = n / 2;
    out.extend((0..half).map(|i| service(i, version)));
    out.extend((0..n - half).map(|i| route(i, i % half.max(1), version)));
    out
}

fn open(path: &Path) -> DpStore {
    DpStore::open(
        path,
        Arc::clone(Registry::builtin()),
        DpStoreOptions::recommended(),
    )
    .unwrap()
}

fn full_kind(version: i64) -> ApplyKind {
    ApplyKind::Full {
        version,
        epoch: Some("bench".into()),
    }
}

fn full_sync(deltas: Vec<Delta>) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("dp.redb"));
    let start = Instant::now();
    store.apply(full_kind(1), deltas).unwrap();
    start.elapsed()
}

/// As [`full_sync`], through `Apply::feed`: validation on a second thread while this one
/// writes (how the DP client applies answers and paged transfers).
fn full_sync_fed(deltas: Vec<Delta>) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("dp.redb"));
    let start = Instant::now();
    let mut apply = store.begin(full_kind(1)).unwrap();
    apply
        .feed(|sink| {
            for d in deltas {
                sink(d)?;
            }
            Ok(())
        })
        .unwrap();
    apply.commit().unwrap();
    start.elapsed()
}

/// A store holding the workspace and one service, at version 1.
fn base_store(path: &Path) -> DpStore {
    let store = open(path);
    store
        .apply(full_kind(1), [workspace(1), service(0, 1)])
        .unwrap();
    store
}

/// `n_versions` versions of one new route each, `per_txn` versions per transaction.
fn incremental(n_versions: u64, per_txn: u64) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let store = base_store(&dir.path().join("dp.redb"));
    let batches: Vec<Vec<Delta>> = (0..n_versions)
        .map(|i| route(i, 0, i as i64 + 2))
        .collect::<Vec<_>>()
        .chunks(per_txn as usize)
        .map(<[Delta]>::to_vec)
        .collect();
    let start = Instant::now();
    for batch in batches {
        let from = store.state().version;
        store
            .apply(
                ApplyKind::Incremental {
                    expect_from: from,
                    latest: None,
                },
                batch,
            )
            .unwrap();
    }
    start.elapsed()
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// One pass of each workload, printed, before criterion's repeated runs.
fn figures() {
    // First, while the process is small: a 100k full sync fed from a generator, as a client
    // that parses the get_delta answer incrementally would feed it. Peak RSS covers the store's
    // buffers, redb's cache and dirty pages (generation time is included in this one).
    let rss_start = rss_kib("VmRSS:");
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("dp.redb"));
    let start = Instant::now();
    let streamed = std::iter::once(workspace(1))
        .chain((0..50_000).map(|i| service(i, 1)))
        .chain((0..50_000).map(|i| route(i, i, 1)));
    store.apply(full_kind(1), streamed).unwrap();
    let took = start.elapsed();
    let file_mib = std::fs::metadata(dir.path().join("dp.redb")).unwrap().len() as f64 / 1048576.0;
    drop(store);
    eprintln!(
        "full sync 100k streamed (incl. generating): {took:.2?}; peak RSS {:.0} MiB \
         (process start {:.0} MiB); redb file {file_mib:.0} MiB",
        rss_kib("VmHWM:") as f64 / 1024.0,
        rss_start as f64 / 1024.0,
    );
    let deltas = snapshot(100_000, 1);
    let json_bytes: usize = deltas
        .iter()
        .map(|d| serde_json::to_vec(&d.to_wire()).unwrap().len())
        .sum();
    let registry = Registry::builtin();
    let start = Instant::now();
    for d in &deltas {
        let schema = registry.get(&d.entity_type).unwrap();
        registry
            .prepare(schema, d.entity.clone().unwrap(), None, Mode::Insert, 0)
            .unwrap();
    }
    let validate = start.elapsed();
    let n = deltas.len();
    let took = full_sync(deltas);
    eprintln!(
        "full sync 100k: {n} entities, {:.1} MiB of wire JSON, {took:.2?} ({:.0} entities/s); \
         validation alone {validate:.2?}",
        json_bytes as f64 / 1048576.0,
        n as f64 / took.as_secs_f64(),
    );
    let took = full_sync_fed(snapshot(100_000, 1));
    eprintln!(
        "full sync 100k through Apply::feed (two threads): {took:.2?} ({:.0} entities/s)",
        100_001.0 / took.as_secs_f64()
    );
    let took = full_sync(snapshot(10_000, 1));
    eprintln!(
        "full sync 10k: {took:.2?} ({:.0} entities/s)",
        10_001.0 / took.as_secs_f64()
    );
    for per_txn in [1, 100] {
        let took = incremental(1000, per_txn);
        eprintln!(
            "1000 versions, {per_txn} per durable txn: {took:.2?} ({:.0} versions/s, {:.2?}/txn)",
            1000.0 / took.as_secs_f64(),
            took / (1000 / per_txn) as u32
        );
    }
}

fn benches(c: &mut Criterion) {
    figures();
    let mut g = c.benchmark_group("dp_full_sync");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for n in [10_000u64, 100_000] {
        let deltas = snapshot(n, 1);
        g.throughput(Throughput::Elements(deltas.len() as u64));
        g.bench_function(format!("{n}"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| full_sync(deltas.clone())).sum())
        });
        g.bench_function(format!("{n}_fed"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| full_sync_fed(deltas.clone())).sum())
        });
    }
    g.finish();
    let mut g = c.benchmark_group("dp_incremental_1000_versions");
    g.sample_size(10);
    g.throughput(Throughput::Elements(1000));
    for per_txn in [1u64, 100] {
        g.bench_function(format!("{per_txn}_per_txn"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| incremental(1000, per_txn)).sum())
        });
    }
    g.finish();
}

criterion_group!(dp_apply, benches);
criterion_main!(dp_apply);
