//! Change intake (durable versions/s through the group-commit writer, 1 and 8 writers) and
//! change-log reads (100k-entity snapshot, 10k-version delta range).
//!
//! `cargo bench --bench changelog`; PostgreSQL figures when `DELTAPLANE_TEST_PG_URL` is set
//! (a fresh database is created and dropped). SQLite runs with `synchronous=FULL`, the default.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use deltaplane::cp::store::{Op, Store, StoreOptions};
use deltaplane::cp::writer::Writer;
use serde_json::json;

struct Db {
    label: &'static str,
    opts: StoreOptions,
    _dir: tempfile::TempDir,
    pg: Option<(String, String)>,
}

fn databases(rt: &tokio::runtime::Runtime, tag: &str) -> Vec<Db> {
    let mut out = Vec::new();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = StoreOptions::new(format!(
        "sqlite://{}",
        dir.path().join("bench.db").display()
    ));
    opts.sqlite_synchronous_full = true;
    out.push(Db {
        label: "sqlite-full",
        opts,
        _dir: dir,
        pg: None,
    });
    if let Ok(admin) = std::env::var("DELTAPLANE_TEST_PG_URL") {
        let name = format!("deltaplane_bench_{tag}_{}", std::process::id());
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(&admin)
                .await
                .expect("PostgreSQL reachable");
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name}"
            )))
            .execute(&pool)
            .await
            .unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&pool)
                .await
                .unwrap();
        });
        let base = admin.rsplit_once('/').unwrap().0.to_owned();
        out.push(Db {
            label: "postgres",
            opts: StoreOptions::new(format!("{base}/{name}")),
            _dir: tempfile::tempdir().unwrap(),
            pg: Some((admin, name)),
        });
    } else {
        eprintln!("NOTE: DELTAPLANE_TEST_PG_URL unset: PostgreSQL benchmarks skipped");
    }
    out
}

fn drop_db(rt: &tokio::runtime::Runtime, db: &Db) {
    if let Some((admin, name)) = &db.pg {
        rt.block_on(async {
            let pool = sqlx::PgPool::connect(admin).await.unwrap();
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            )))
            .execute(&pool)
            .await;
        });
    }
}

fn intake(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("intake");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(1));
    for db in databases(&rt, "intake") {
        let store = rt.block_on(Store::open(db.opts.clone())).unwrap();
        let writer = rt.block_on(async { Writer::spawn(store.clone(), 256) });
        let mut seq = 0u64;
        for writers in [1usize, 8] {
            group.bench_function(format!("{}/{writers}_writers", db.label), |b| {
                b.iter_custom(|iters| {
                    seq += 1;
                    let run = seq;
                    rt.block_on(async {
                        let start = Instant::now();
                        let tasks: Vec<_> = (0..writers)
                            .map(|w| {
                                let writer = writer.clone();
                                let n = iters as usize / writers + usize::from(w < iters as usize % writers);
                                tokio::spawn(async move {
                                    for i in 0..n {
                                        let op = Op::Create {
                                            entity: "consumers".into(),
                                            input: json!({"username": format!("r{run}-w{w}-{i}"), "tags": ["bench"]}),
                                            scope: None,
                                        };
                                        writer.write(op).await.expect("write");
                                    }
                                })
                            })
                            .collect();
                        for t in tasks {
                            t.await.unwrap();
                        }
                        start.elapsed()
                    })
                })
            });
        }
        rt.block_on(store.close());
        drop_db(&rt, &db);
    }
    group.finish();
}

fn reads(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("read");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for db in databases(&rt, "reads") {
        let mut opts = db.opts.clone();
        opts.sqlite_synchronous_full = false; // loading the fixture only
        let store = rt.block_on(Store::open(opts)).unwrap();
        let loaded = Instant::now();
        rt.block_on(async {
            // 100k consumers of ~1 KB, 1000 per transaction (each its own version).
            for batch in 0..100 {
                let ops = (0..1000)
                    .map(|i| Op::Create {
                        entity: "consumers".into(),
                        input: json!({"username": format!("u{batch}-{i}"), "custom_id": format!("{batch}-{i}-{}", "x".repeat(900)), "tags": ["t"]}),
                        scope: None,
                    })
                    .collect();
                for r in store.write_batch(ops).await {
                    r.expect("fixture write");
                }
            }
        });
        eprintln!(
            "{}: loaded 100k entities in {:?}",
            db.label,
            loaded.elapsed()
        );
        let head = rt.block_on(store.version_info()).unwrap().version;

        group.throughput(Throughput::Elements(100_000));
        group.bench_function(format!("{}/snapshot_100k", db.label), |b| {
            b.iter(|| {
                let n = rt.block_on(async {
                    let mut n = 0usize;
                    store
                        .snapshot(|c| {
                            n += usize::from(c.entity.is_some());
                            Ok(())
                        })
                        .await
                        .unwrap();
                    n
                });
                assert!(n >= 100_000);
            })
        });
        group.throughput(Throughput::Elements(10_000));
        group.bench_function(format!("{}/changes_10k_versions", db.label), |b| {
            b.iter(|| {
                let n = rt.block_on(async {
                    let mut n = 0usize;
                    store
                        .changes_after(head - 10_000, 10_000, |_| {
                            n += 1;
                            Ok(())
                        })
                        .await
                        .unwrap()
                        .unwrap();
                    n
                });
                assert_eq!(n, 10_000);
            })
        });
        rt.block_on(store.close());
        drop_db(&rt, &db);
    }
    group.finish();
}

criterion_group!(benches, intake, reads);
criterion_main!(benches);
