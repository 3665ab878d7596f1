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
            if std::env::var_os("DELTAPLANE_BENCH_LOG_STATEMENTS").is_some() {
                // Every statement in the server's log, to count round trips per version.
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "ALTER DATABASE {name} SET log_statement = 'all'"
                )))
                .execute(&pool)
                .await
                .unwrap();
            }
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

/// What one intake benchmark cost, summed over every `iter_custom` call (warm-up included).
#[derive(Default)]
struct Cost {
    versions: u64,
    wall: Duration,
    /// CPU of this process (the CP: Admin-side writers, the group-commit writer, sqlx).
    cp_cpu: Duration,
    /// PostgreSQL only: CPU of the database's backends, in clock ticks.
    pg_ticks: u64,
    /// PostgreSQL only: voluntary context switches of the backends, about one per round trip
    /// (a backend sleeps in `recv` after answering) plus one per WAL flush it waits for.
    pg_wakeups: u64,
    /// PostgreSQL only: committed transactions in the database (group-commit batches).
    pg_commits: u64,
}

impl Cost {
    fn report(&self, label: &str) {
        let per = |x: f64| x / self.versions.max(1) as f64;
        let mut line = format!(
            "{label}: {} versions in {:.2?}: {:.0} versions/s, CP CPU {:.1} µs/version",
            self.versions,
            self.wall,
            self.versions as f64 / self.wall.as_secs_f64(),
            per(self.cp_cpu.as_secs_f64() * 1e6),
        );
        if self.pg_commits > 0 {
            let tick_us = 1e6 / clock_ticks_per_sec() as f64;
            line += &format!(
                ", PostgreSQL backend CPU {:.1} µs/version, {:.2} backend wake-ups/version, {:.2} versions/transaction",
                per(self.pg_ticks as f64 * tick_us),
                per(self.pg_wakeups as f64),
                self.versions as f64 / self.pg_commits as f64,
            );
        }
        eprintln!("{line}");
    }
}

fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and reads nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn clock_ticks_per_sec() -> i64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) }
}

/// PostgreSQL's counters for the database `name`: (backend CPU ticks, backend voluntary
/// context switches, committed transactions). The server must run on this machine.
async fn pg_counters(pool: &sqlx::PgPool, name: &str) -> (u64, u64, u64) {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(name)
        .fetch_all(pool)
        .await
        .unwrap();
    let (mut ticks, mut wakeups) = (0, 0);
    for pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the parenthesised command: state is field 3, utime 14, stime 15.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            wakeups += status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    let commits: i64 =
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(name)
            .fetch_one(pool)
            .await
            .unwrap();
    (ticks, wakeups, commits as u64)
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
        // PostgreSQL's counters are read through the admin database, so reading them adds
        // nothing to the bench database's backends or transactions.
        let stats = db.pg.as_ref().map(|(admin, name)| {
            let pool = rt.block_on(sqlx::PgPool::connect(admin)).unwrap();
            (pool, name.clone())
        });
        let mut seq = 0u64;
        for writers in [1usize, 8] {
            let mut cost = Cost::default();
            let label = format!("{}/{writers}_writers", db.label);
            group.bench_function(&label, |b| {
                b.iter_custom(|iters| {
                    seq += 1;
                    let run = seq;
                    rt.block_on(async {
                        let pg_before = match &stats {
                            Some((pool, name)) => Some(pg_counters(pool, name).await),
                            None => None,
                        };
                        let cpu_before = cpu_time();
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
                        let elapsed = start.elapsed();
                        cost.versions += iters;
                        cost.wall += elapsed;
                        cost.cp_cpu += cpu_time().saturating_sub(cpu_before);
                        if let (Some((pool, name)), Some(before)) = (&stats, pg_before) {
                            let after = pg_counters(pool, name).await;
                            cost.pg_ticks += after.0.saturating_sub(before.0);
                            cost.pg_wakeups += after.1.saturating_sub(before.1);
                            // Backends publish their counts about once a second, so this
                            // figure is approximate over short runs.
                            cost.pg_commits += after.2.saturating_sub(before.2);
                        }
                        elapsed
                    })
                })
            });
            if cost.versions > 0 {
                cost.report(&format!("intake/{label}"));
            }
        }
        if let Some((pool, _)) = stats {
            rt.block_on(pool.close());
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
        // Loaded on first use, so a filter that selects no read benchmark loads nothing.
        let fixture = std::cell::OnceCell::new();
        let head = || {
            *fixture.get_or_init(|| {
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
                rt.block_on(store.version_info()).unwrap().version
            })
        };

        group.throughput(Throughput::Elements(100_000));
        group.bench_function(format!("{}/snapshot_100k", db.label), |b| {
            head();
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
            let head = head();
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
