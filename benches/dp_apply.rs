//! Data-plane apply throughput: (a) one full sync of 10k and 100k ~1 KB entities in one durable
//! transaction, fed one delta at a time (`Apply::delta`) and through `Apply::feed` (validation
//! on a second thread), (b) 1,000 incremental versions of one entity each, one durable transaction per
//! version, (c) the same 1,000 versions batched 100 per transaction, and (d) the floor: a
//! durable 1-row redb commit next to our apply of one small version (one delta), p50/p99 and
//! CPU per commit, and the ratio ours/floor.
//!
//! `cargo bench --bench dp_apply`. Entities are generated (services and routes shaped as the CP
//! stores them, built once through `Registry::prepare`), so no CP is needed. Before criterion
//! runs, one pass of each prints entities/s, the split between validation and the rest, and the
//! peak RSS growth of a 100k full sync. `DP_APPLY_FIGURES=floor,full,incremental` (any subset)
//! picks the passes; `cargo bench --bench dp_apply -- none` skips criterion's runs.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group};
use deltaplane::dp::store::{ApplyKind, DpStore, DpStoreOptions};
use deltaplane::proto::Delta;
use deltaplane::schema::{Mode, Registry};
use redb::{Database, Durability, TableDefinition};
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

/// Apparent length and allocated bytes of a file, in MiB.
fn file_mib(path: &Path) -> (f64, f64) {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).unwrap();
    (
        m.len() as f64 / 1048576.0,
        (m.blocks() * 512) as f64 / 1048576.0,
    )
}

/// `deltas` cut into pages of about `page_bytes` of JSON (`{"deltas":[...]}`), as the CP
/// sends a paged transfer.
fn pages_of(deltas: &[Delta], page_bytes: usize) -> Vec<String> {
    let mut pages = Vec::new();
    let mut page: Vec<String> = Vec::new();
    let mut bytes = 0;
    for d in deltas {
        let text = serde_json::to_string(&d.to_wire()).unwrap();
        if !page.is_empty() && bytes + text.len() > page_bytes {
            pages.push(std::mem::take(&mut page));
            bytes = 0;
        }
        bytes += text.len();
        page.push(text);
    }
    pages.push(page);
    pages
        .into_iter()
        .map(|p| format!("{{\"deltas\":[{}]}}", p.join(",")))
        .collect()
}

/// Applies `pages` as the v2 session does: [`DpStore::apply_pages`], fed one page at a time,
/// with a decoder like the session's.
fn apply_pages(store: &DpStore, pages: &[String]) {
    let arrived = pages
        .iter()
        .enumerate()
        .map(|(i, p)| (i as u64, p.as_bytes()));
    store
        .apply_pages(
            "t",
            full_kind(1),
            pages.len() as u64,
            arrived,
            |_, bytes, sink| {
                // As the session's page decoder: the deltas streamed one at a time.
                let mut failure = None;
                let text = std::str::from_utf8(bytes).unwrap();
                deltaplane::proto::v2::for_each_delta(text, |v| {
                    sink(Delta::from_wire(v).unwrap()).map_err(|e| {
                        failure = Some(e);
                        String::new()
                    })
                })
                .unwrap();
                failure.map_or(Ok(()), Err)
            },
        )
        .unwrap();
}

/// A full sync as a paged transfer, the way the v2 session applies one, into a new store:
/// returns the time, the CPU time, the time `Database::compact` then takes (timed apart, on
/// the closed store's file; it only removes the hole redb's doubling left), and the file's
/// size before and after it.
fn paged_full_sync(
    pages: &[String],
    durable: bool,
) -> (Duration, Duration, Duration, (f64, f64), (f64, f64)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dp.redb");
    let opts = DpStoreOptions {
        durable,
        ..DpStoreOptions::recommended()
    };
    let store = DpStore::open(&path, Arc::clone(Registry::builtin()), opts).unwrap();
    let (cpu, start) = (cpu_time(), Instant::now());
    apply_pages(&store, pages);
    let took = start.elapsed();
    drop(store);
    let cpu = cpu_time() - cpu;
    let before = file_mib(&path);
    let start = Instant::now();
    let mut db = Database::open(&path).unwrap();
    while db.compact().unwrap() {}
    drop(db);
    let compaction = start.elapsed();
    (took, cpu, compaction, before, file_mib(&path))
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

/// Process CPU time (user + system) so far.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Latencies of one variant, and the process CPU time they cost.
#[derive(Default)]
struct Samples {
    took: Vec<Duration>,
    cpu: Duration,
}

impl Samples {
    fn time(&mut self, f: impl FnOnce()) {
        let (cpu, start) = (cpu_time(), Instant::now());
        f();
        self.took.push(start.elapsed());
        self.cpu += cpu_time() - cpu;
    }

    fn pct(&self, p: f64) -> Duration {
        let mut v = self.took.clone();
        v.sort();
        v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
    }

    fn line(&self, name: &str, floor: Option<&Samples>) -> String {
        let cpu = self.cpu / self.took.len() as u32;
        let ratio = floor.map_or(String::new(), |f| {
            format!(
                "; ours/floor p50 {:.2}, p99 {:.2}",
                self.pct(0.5).as_secs_f64() / f.pct(0.5).as_secs_f64(),
                self.pct(0.99).as_secs_f64() / f.pct(0.99).as_secs_f64()
            )
        });
        format!(
            "{name}: n {}, p50 {:.3} ms, p99 {:.3} ms, CPU {:.1} µs/commit{ratio}",
            self.took.len(),
            self.pct(0.5).as_secs_f64() * 1e3,
            self.pct(0.99).as_secs_f64() * 1e3,
            cpu.as_secs_f64() * 1e6,
        )
    }
}

const FLOOR_TABLE: TableDefinition<&str, &[u8]> = TableDefinition::new("t");

/// The disk's floor as redb offers it: durable commits of one ~1.1 KB row each (a new key), on
/// a file already holding `rows` such rows; `two_phase` adds 2-phase commit with quick repair.
fn floor_commit(db: &Database, key: u64, two_phase: bool) {
    let mut txn = db.begin_write().unwrap();
    txn.set_durability(Durability::Immediate).unwrap();
    if two_phase {
        txn.set_two_phase_commit(true);
        txn.set_quick_repair(true);
    }
    {
        let mut t = txn.open_table(FLOOR_TABLE).unwrap();
        t.insert(format!("row-{key:012}").as_str(), [7u8; 1100].as_slice())
            .unwrap();
    }
    txn.commit().unwrap();
}

/// A one-delta get_delta answer, as the CP writes it.
fn answer_text(d: &Delta) -> String {
    serde_json::to_string(&json!({"default": {"deltas": [d.to_wire()], "full_sync": false}}))
        .unwrap()
}

/// Service `i` at `version` with `retries` changed: a PATCH of one field.
fn patched(i: u64, version: i64) -> Delta {
    let mut d = service(i, version);
    d.entity.as_mut().unwrap()["retries"] = json!(version % 1000);
    d
}

/// The floor and our one-version apply, interleaved in rounds so drift hits all alike: (a) a
/// 1-row durable redb commit, (b) the same with 2-phase commit and quick repair, (c) one
/// version of one delta (a service PATCH) through `begin`/`delta`/`commit`, and (d) the same
/// version as get_delta answer text through `dp::v2::apply_stream` (the v2 session's path:
/// parse, validate, write). Both files hold 1,000 rows / services first.
fn floor_figures() {
    const ROWS: u64 = 1000;
    let rounds: usize = std::env::var("DP_APPLY_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let per_round = 100;
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Builder::new()
        .set_cache_size(64 << 20)
        .create(dir.path().join("floor.redb"))
        .unwrap();
    {
        let txn = db.begin_write().unwrap();
        {
            let mut t = txn.open_table(FLOOR_TABLE).unwrap();
            for i in 0..ROWS {
                t.insert(format!("base-{i:012}").as_str(), [1u8; 1100].as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let store = open(&dir.path().join("dp.redb"));
    store
        .apply(
            full_kind(1),
            std::iter::once(workspace(1)).chain((0..ROWS).map(|i| service(i, 1))),
        )
        .unwrap();
    let (mut one_pc, mut two_pc, mut ours, mut stream) = Default::default();
    let mut key = 0;
    for _ in 0..rounds {
        for _ in 0..per_round {
            key += 1;
            Samples::time(&mut one_pc, || floor_commit(&db, key, false));
        }
        for _ in 0..per_round {
            key += 1;
            Samples::time(&mut two_pc, || floor_commit(&db, key, true));
        }
        for _ in 0..per_round {
            let from = store.state().version;
            let d = patched(from as u64 % ROWS, from + 1);
            Samples::time(&mut ours, || {
                let mut apply = store
                    .begin(ApplyKind::Incremental {
                        expect_from: from,
                        latest: Some(from + 1),
                    })
                    .unwrap();
                apply.delta(d).unwrap();
                apply.commit().unwrap();
            });
        }
        for _ in 0..per_round {
            let from = store.state().version;
            let text = answer_text(&patched(from as u64 % ROWS, from + 1));
            Samples::time(&mut stream, || {
                deltaplane::dp::v2::apply_stream(&store, &text, |_| {
                    Some(ApplyKind::Incremental {
                        expect_from: from,
                        latest: Some(from + 1),
                    })
                })
                .unwrap();
            });
        }
    }
    assert_eq!(
        store.compute_state_hash().unwrap(),
        store.state().state_hash
    );
    eprintln!(
        "{}",
        one_pc.line("floor: redb durable 1-row commit (1-phase)", None)
    );
    eprintln!(
        "{}",
        two_pc.line(
            "redb durable 1-row commit, 2-phase + quick repair",
            Some(&one_pc)
        )
    );
    eprintln!(
        "{}",
        ours.line(
            "ours: one version, one delta (service PATCH), begin/delta/commit",
            Some(&one_pc)
        )
    );
    eprintln!(
        "{}",
        stream.line(
            "ours: the same as answer text through dp::v2::apply_stream",
            Some(&one_pc)
        )
    );
}

fn wanted(section: &str) -> bool {
    std::env::var("DP_APPLY_FIGURES").map_or(true, |v| v.split(',').any(|s| s == section))
}

/// One pass of each workload, printed, before criterion's repeated runs.
fn figures() {
    if wanted("floor") {
        floor_figures();
    }
    if wanted("paged") {
        paged_figures();
    }
    if wanted("crash") {
        crash_figures();
    }
    if wanted("full") {
        full_figures();
    }
    if wanted("incremental") {
        incremental_figures();
    }
}

/// The v2 session's full sync of 100k ~1.1 KB services (the load harness's `fullsync`
/// configuration) as a paged transfer, durable and not, and the part of it that needs no
/// table: decoding and validating the pages alone, on one thread, as the store's producer
/// thread does it.
fn paged_figures() {
    let services: Vec<Delta> = std::iter::once(workspace(1))
        .chain((0..100_000).map(|i| service(i, 1)))
        .collect();
    let json: usize = services
        .iter()
        .map(|d| serde_json::to_vec(&d.to_wire()).unwrap().len())
        .sum();
    let pages = pages_of(&services, 4 << 20);
    drop(services);
    let registry = Registry::builtin();
    // The store's producer work alone, with the schema's verdict taken on a copy of each
    // entity (`accepts_stored`, as the store did) and on the entity itself (as it does now).
    for copy in [true, false] {
        let (cpu, start) = (cpu_time(), Instant::now());
        let mut n = 0;
        for page in &pages {
            deltaplane::proto::v2::for_each_delta(page, |v| {
                let d = Delta::from_wire(v).unwrap();
                let schema = registry.get(&d.entity_type).unwrap();
                let entity = d.entity.unwrap();
                let body = serde_json::to_vec(&entity).unwrap();
                std::hint::black_box(schema.index_of(&entity));
                if copy {
                    registry.accepts_stored(schema, &entity).unwrap();
                } else {
                    registry
                        .prepare(schema, entity, None, Mode::Insert, 0)
                        .unwrap();
                }
                std::hint::black_box(deltaplane::proto::StateHash::of_entity_bytes(
                    &d.entity_type,
                    &d.ws_id,
                    &d.id,
                    &body,
                ));
                n += 1;
                Ok(())
            })
            .unwrap();
        }
        eprintln!(
            "paged 100k services, {:.1} MiB of wire JSON: decode + canonical bytes + index rows \
             + validate ({}) + digest alone, one thread: {:.2?} ({n} deltas, CPU {:.2?})",
            json as f64 / 1048576.0,
            if copy { "on a copy" } else { "no copy" },
            start.elapsed(),
            cpu_time() - cpu
        );
    }
    for durable in [true, false] {
        let (took, cpu, compaction, (len, alloc), (len_after, alloc_after)) =
            paged_full_sync(&pages, durable);
        eprintln!(
            "paged full sync, 100k services in ~4 MiB pages (apply_pages), \
             durable {durable}: {took:.2?} (CPU {cpu:.2?}); \
             redb file {len:.0} MiB ({alloc:.0} MiB allocated), file / JSON {:.2} ({:.2}); \
             compact() apart: {compaction:.2?} → {len_after:.0} MiB ({alloc_after:.0} MiB \
             allocated)",
            len * 1048576.0 / json as f64,
            alloc * 1048576.0 / json as f64,
        );
    }
}

/// Reopening after a crash: a child process (this bench, re-run) applies the 100k-service
/// paged full sync and aborts without closing the store; then the store is reopened here (redb
/// repairs it: it verifies the checksums and rebuilds the allocator state), and once more
/// after a clean close.
fn crash_figures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dp.redb");
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .env("DP_APPLY_CRASH_CHILD", &path)
        .env_remove("DP_APPLY_FIGURES")
        .status()
        .unwrap();
    assert!(!status.success(), "the child aborts");
    let start = Instant::now();
    let store = open(&path);
    let repaired = start.elapsed();
    assert_eq!(store.state().n_entities, 100_001);
    assert_eq!(
        store.compute_state_hash().unwrap(),
        store.state().state_hash
    );
    drop(store);
    let start = Instant::now();
    let store = open(&path);
    let clean = start.elapsed();
    assert_eq!(store.state().n_entities, 100_001);
    let (len, _) = file_mib(&path);
    eprintln!(
        "reopen of a 100k-service store ({len:.0} MiB) after a crash (repair): {repaired:.2?}; \
         after a clean close: {clean:.2?}"
    );
}

/// The child of [`crash_figures`]: a paged full sync into `path`, then an abort.
fn crash_child(path: &str) -> ! {
    let services: Vec<Delta> = std::iter::once(workspace(1))
        .chain((0..100_000).map(|i| service(i, 1)))
        .collect();
    let pages = pages_of(&services, 4 << 20);
    let store = open(Path::new(path));
    apply_pages(&store, &pages);
    std::process::abort()
}

fn full_figures() {
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
}

fn incremental_figures() {
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

fn main() {
    if let Ok(path) = std::env::var("DP_APPLY_CRASH_CHILD") {
        crash_child(&path);
    }
    dp_apply();
    Criterion::default().configure_from_args().final_summary();
}
