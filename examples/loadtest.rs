//! End-to-end load harness: the real `deltaplane-cp` / `deltaplane-dp` release binaries as
//! processes (temp dirs, free ports, durable on both ends, mTLS with the CP's generated shared
//! certificate), driven from outside.
//!
//! ```sh
//! cargo build --release --bins --examples
//! cargo run --release --example loadtest -- latency --dps 1,10,100 --writes 200 --runs 3
//! cargo run --release --example loadtest -- latency --dps 1,10 --pg postgres://postgres@127.0.0.1:5432/test
//! cargo run --release --example loadtest -- fullsync --entities 100000
//! cargo run --release --example loadtest -- deltasize --entities 100000
//! cargo run --release --example loadtest -- v1push --entities 100000
//! ```
//!
//! * `latency`: Admin API write → `deltaplane.version` notification (sent by a DP only after the
//!   version is durably applied) on every DP, one write at a time.
//! * `fullsync`: a CP database pre-filled through the library with ~1 KB services; time from a
//!   fresh DP process start to its `/status` version equal to the CP head, and peak RSS.
//! * `deltasize`: one PATCH on the same config, then the harness itself is a DP and measures the
//!   compressed `get_delta` answer for `head - 1` on the wire, per frame encoding.
//! * `v1push`: the same config over sync v1 (`/v1/outlet`): the CP's export + gzip (once per
//!   version, shared), the push on the wire, the DP's apply (in-process, durable redb), and,
//!   after one PATCH, the v1 re-push next to the v2 `get_delta` answer.
//!
//! Every child process is killed when the harness exits (also on error or panic).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use deltaplane::cp::store::{Op, Store, StoreOptions};
use deltaplane::net::tls::{ClusterTls, TlsSettings};
use deltaplane::net::{dial, hello};
use deltaplane::proto::codec::{self, Encoding};
use deltaplane::proto::hello::{Hello, data_plane_conf};
use deltaplane::proto::v2::{self, GetDelta};
use deltaplane::proto::{
    CAP_DELTAPLANE_PUSH_V1, CAP_DELTAPLANE_SYNC_V1, CAP_KONG_SYNC_V2, Version, jsonrpc,
};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[path = "loadtest/etcd.rs"]
mod etcd;
#[path = "common/procs.rs"]
mod procs;
use procs::{Procs, cpu_secs, free_ports, loadavg};

#[derive(Parser)]
#[command(
    about = "End-to-end load harness: runs target/release/deltaplane-cp and deltaplane-dp as \
             processes (durable, mTLS) and measures propagation latency, full-sync time and \
             peak RSS, and delta size on the wire. Build first: cargo build --release --bins"
)]
struct Cli {
    /// Directory holding deltaplane-cp and deltaplane-dp [default: <target>/release]
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Keep each run's temp dir (process logs, databases) and print its path
    #[arg(long, global = true)]
    keep: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Sequential Admin writes; write → durably applied on each of N DPs (watch_version).
    Latency {
        /// Numbers of DP processes, comma-separated; several values are run interleaved
        #[arg(long, value_delimiter = ',', default_value = "1")]
        dps: Vec<usize>,
        /// Measured writes per run
        #[arg(long, default_value_t = 200)]
        writes: usize,
        /// Runs per configuration (interleaved across configurations)
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// PostgreSQL server URL; a fresh database `loadtest_<random>` is created per run and
        /// dropped afterwards. SQLite (synchronous=FULL) when unset
        #[arg(long)]
        pg: Option<String>,
        /// Unmeasured writes before the measured ones (same pacing)
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Pause after every DP applied a write, before the next write
        #[arg(long, default_value_t = 10)]
        gap_ms: u64,
        /// How many services the writes rotate over
        #[arg(long, default_value_t = 4)]
        services: usize,
        /// Give up when a write has not reached every DP in this time
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// etcd binary (3.4+) run side by side as the peer: N watchers on a key prefix, one put
        /// per Admin write, interleaved
        #[arg(long, default_value = "etcd")]
        etcd: PathBuf,
        /// Skip the etcd comparison
        #[arg(long)]
        no_etcd: bool,
        /// Also connect the harness as one more deltaplane-dialect DP that applies nothing and
        /// times write → pushed deltas received (the CP's share of the latency; the CP then
        /// serves N + 1 DPs)
        #[arg(long)]
        probe: bool,
    },
    /// Pre-filled CP (~1 KB services); fresh DP process start → in sync; peak RSS, CPU, file.
    Fullsync {
        #[arg(long, default_value_t = 100_000)]
        entities: usize,
        /// PostgreSQL server URL (a fresh database is created and dropped); SQLite when unset
        #[arg(long)]
        pg: Option<String>,
        /// SQLite only: reuse the filled CP database kept in this directory when it holds one
        /// of --entities services, else fill one and keep a copy there (the fill takes ~50 s)
        #[arg(long)]
        seed: Option<PathBuf>,
        /// Runs, each with a fresh DP process and an empty data dir, against the same CP
        #[arg(long, default_value_t = 1)]
        runs: usize,
    },
    /// Pre-filled CP, one PATCH; get_delta(head - 1) answer size on the wire per encoding.
    Deltasize {
        #[arg(long, default_value_t = 100_000)]
        entities: usize,
        /// PostgreSQL server URL (a fresh database is created and dropped); SQLite when unset
        #[arg(long)]
        pg: Option<String>,
    },
    /// Pre-filled CP over sync v1: export + gzip, push size, DP apply; then one PATCH: the v1
    /// re-push next to the v2 get_delta answer.
    V1push {
        #[arg(long, default_value_t = 100_000)]
        entities: usize,
        /// PostgreSQL server URL (a fresh database is created and dropped); SQLite when unset
        #[arg(long)]
        pg: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bins = Bins::locate(cli.bin_dir.as_deref())?;
    KEEP.store(cli.keep, std::sync::atomic::Ordering::Relaxed);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("load average at start: {}", loadavg());
    let res = rt.block_on(async {
        match cli.scenario {
            Scenario::Latency {
                dps,
                writes,
                runs,
                pg,
                warmup,
                gap_ms,
                services,
                timeout_secs,
                etcd,
                no_etcd,
                probe,
            } => {
                let etcd = if no_etcd {
                    println!("etcd comparison skipped: --no-etcd");
                    None
                } else {
                    match etcd::probe(&etcd) {
                        Ok(v) => {
                            println!("etcd peer: {} ({v})", etcd.display());
                            Some(etcd)
                        }
                        Err(why) => {
                            println!("etcd comparison skipped: {why}");
                            None
                        }
                    }
                };
                let opts = LatencyOpts {
                    writes,
                    warmup,
                    gap: Duration::from_millis(gap_ms),
                    services: services.max(1),
                    timeout: Duration::from_secs(timeout_secs),
                    etcd,
                    probe,
                };
                latency(&bins, &dps, runs, pg.as_deref(), &opts).await
            }
            Scenario::Fullsync {
                entities,
                pg,
                seed,
                runs,
            } => fullsync(&bins, entities, pg.as_deref(), seed.as_deref(), runs).await,
            Scenario::Deltasize { entities, pg } => deltasize(&bins, entities, pg.as_deref()).await,
            Scenario::V1push { entities, pg } => v1push(&bins, entities, pg.as_deref()).await,
        }
    });
    println!("load average at end: {}", loadavg());
    rt.shutdown_timeout(Duration::from_secs(2));
    res
}

// === processes ===

/// `--keep`: leave temp dirs behind.
static KEEP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

struct Bins {
    cp: PathBuf,
    dp: PathBuf,
}

impl Bins {
    fn locate(dir: Option<&Path>) -> anyhow::Result<Bins> {
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => {
                // <target>/<profile>/examples/loadtest → <target>/release
                let exe = std::env::current_exe()?;
                match exe.ancestors().nth(3) {
                    Some(target) if target.join("release").is_dir() => target.join("release"),
                    _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"),
                }
            }
        };
        let bins = Bins {
            cp: dir.join("deltaplane-cp"),
            dp: dir.join("deltaplane-dp"),
        };
        for b in [&bins.cp, &bins.dp] {
            if !b.is_file() {
                bail!(
                    "{} is missing: build the release binaries first with \
                     `cargo build --release --bins` (or pass --bin-dir)",
                    b.display()
                );
            }
        }
        Ok(bins)
    }
}

/// Peak resident set size (`VmHWM`) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .context("no VmHWM line")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmHWM value")?
        .parse()?)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

// === PostgreSQL scratch databases ===

/// A fresh database on the server at `--pg`, dropped on drop (also on error or panic).
struct PgDb {
    server_url: String,
    name: String,
    url: String,
}

impl PgDb {
    async fn create(server_url: &str) -> anyhow::Result<PgDb> {
        use sqlx::Connection as _;
        let name = format!("loadtest_{:016x}", rand::random::<u64>());
        let mut conn = sqlx::PgConnection::connect(server_url)
            .await
            .with_context(|| format!("connecting to {server_url}"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .context("CREATE DATABASE")?;
        conn.close().await?;
        let url = with_database(server_url, &name)?;
        Ok(PgDb {
            server_url: server_url.to_owned(),
            name,
            url,
        })
    }
}

/// `postgres://u@h:p/olddb?x` → `postgres://u@h:p/<name>?x`.
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (scheme, rest) = url.split_once("://").context("a postgres:// URL")?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, format!("?{q}")),
        None => (rest, String::new()),
    };
    let authority = rest.split('/').next().unwrap_or(rest);
    Ok(format!("{scheme}://{authority}/{name}{query}"))
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let server = self.server_url.clone();
        let name = self.name.clone();
        // A separate thread with its own runtime: Drop may run inside the main runtime.
        let res = std::thread::spawn(move || -> anyhow::Result<()> {
            use sqlx::Connection as _;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&server).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await?;
                Ok(())
            })
        })
        .join();
        match res {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop database {}: {e:#}", self.name),
            Err(_) => eprintln!("could not drop database {}: panic", self.name),
        }
    }
}

// === a cluster of processes ===

struct Cp {
    pid: u32,
    admin: String,
    cluster: SocketAddr,
    dir: PathBuf,
}

impl Cp {
    /// The cluster TLS a DP of this CP uses: its generated shared certificate.
    fn cluster_tls(&self) -> anyhow::Result<ClusterTls> {
        let file = |name: &str| self.dir.join(name).display().to_string();
        ClusterTls::load(&TlsSettings::shared(
            file("cluster.crt"),
            file("cluster.key"),
        ))
    }
}

struct Dp {
    pid: u32,
    status: SocketAddr,
}

/// One scenario's world. Field order matters: processes die before the directory and the
/// database go away.
struct World {
    procs: Procs,
    http: reqwest::Client,
    pg: Option<PgDb>,
    tmp: tempfile::TempDir,
    /// Extra `deltaplane-cp serve` arguments for a scenario.
    cp_args: Vec<String>,
}

impl World {
    async fn new(pg_server: Option<&str>) -> anyhow::Result<World> {
        let pg = match pg_server {
            Some(url) => Some(PgDb::create(url).await?),
            None => None,
        };
        let keep = KEEP.load(std::sync::atomic::Ordering::Relaxed);
        let tmp = tempfile::Builder::new()
            .prefix("loadtest-")
            .disable_cleanup(keep)
            .tempdir()?;
        if keep {
            println!("    (--keep) logs and data in {}", tmp.path().display());
        }
        Ok(World {
            procs: Procs::default(),
            http: reqwest::Client::builder()
                .tcp_nodelay(true)
                .pool_max_idle_per_host(256)
                .build()?,
            pg,
            tmp,
            cp_args: Vec::new(),
        })
    }

    fn cp_dir(&self) -> PathBuf {
        self.tmp.path().join("cp")
    }

    /// The store options the CP will use (`cp::store_options` with the defaults).
    fn store_options(&self) -> StoreOptions {
        match &self.pg {
            Some(db) => StoreOptions::new(db.url.clone()),
            None => StoreOptions::sqlite_in(&self.cp_dir()),
        }
    }

    fn backend(&self) -> &'static str {
        if self.pg.is_some() {
            "postgres"
        } else {
            "sqlite"
        }
    }

    async fn start_cp(&mut self, bins: &Bins) -> anyhow::Result<Cp> {
        let dir = self.cp_dir();
        std::fs::create_dir_all(&dir)?;
        let ports = free_ports(2)?;
        let admin = format!("127.0.0.1:{}", ports[0]);
        let cluster: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse()?;
        let mut cmd = Command::new(&bins.cp);
        cmd.args(["serve", "--data-dir"])
            .arg(&dir)
            .args(["--admin-listen", &admin])
            .args(["--cluster-listen", &cluster.to_string()])
            .args(&self.cp_args);
        match &self.pg {
            Some(db) => {
                cmd.args(["--database-url", &db.url]);
            }
            None => {
                cmd.args(["--sqlite-synchronous", "full"]);
            }
        }
        let pid = self
            .procs
            .spawn("cp", cmd, &self.tmp.path().join("cp.log"))?;
        let cp = Cp {
            pid,
            admin: format!("http://{admin}"),
            cluster,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.procs.check_alive()?;
            let ready = cp.dir.join("cluster.crt").exists()
                && cp.dir.join("cluster.key").exists()
                && matches!(
                    self.http.get(format!("{}/status", cp.admin)).send().await,
                    Ok(r) if r.status().is_success()
                );
            if ready {
                break;
            }
            ensure!(Instant::now() < deadline, "the CP did not start in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(cp)
    }

    fn spawn_dps(&mut self, bins: &Bins, cp: &Cp, n: usize) -> anyhow::Result<Vec<Dp>> {
        let ports = free_ports(n)?;
        let mut dps = Vec::with_capacity(n);
        for (i, port) in ports.into_iter().enumerate() {
            let dir = self.tmp.path().join(format!("dp-{i}"));
            let status: SocketAddr = format!("127.0.0.1:{port}").parse()?;
            let mut cmd = Command::new(&bins.dp);
            cmd.args(["run", "--data-dir"])
                .arg(&dir)
                .args(["--cluster-control-plane", &cp.cluster.to_string()])
                .arg("--cluster-cert")
                .arg(cp.dir.join("cluster.crt"))
                .arg("--cluster-cert-key")
                .arg(cp.dir.join("cluster.key"))
                .args(["--status-listen", &status.to_string()])
                .args(["--proxy-listen", "off"])
                .args(["--durable", "true"]);
            let pid = self.procs.spawn(
                &format!("dp-{i}"),
                cmd,
                &self.tmp.path().join(format!("dp-{i}.log")),
            )?;
            dps.push(Dp { pid, status });
        }
        Ok(dps)
    }

    async fn cp_head(&self, cp: &Cp) -> anyhow::Result<(i64, String)> {
        let v: Value = self
            .http
            .get(format!("{}/status", cp.admin))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let c = &v["configuration"];
        Ok((
            c["version"].as_i64().context("CP /status version")?,
            c["state_hash"].as_str().unwrap_or_default().to_owned(),
        ))
    }

    async fn dp_status(&self, dp: &Dp) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("http://{}/status", dp.status))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Waits until every DP reports the CP head, in sync, with the CP's state hash.
    async fn wait_in_sync(&mut self, cp: &Cp, dps: &[Dp], secs: u64) -> anyhow::Result<i64> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut pending: Vec<usize> = (0..dps.len()).collect();
        loop {
            self.procs.check_alive()?;
            let (head, hash) = self.cp_head(cp).await?;
            let mut still = Vec::new();
            for &i in &pending {
                let ok = match self.dp_status(&dps[i]).await {
                    Ok(s) => {
                        s["version"].as_i64() == Some(head)
                            && s["in_sync"] == true
                            && s["state_hash"] == hash.as_str()
                    }
                    Err(_) => false,
                };
                if !ok {
                    still.push(i);
                }
            }
            if still.is_empty() {
                return Ok(head);
            }
            ensure!(
                Instant::now() < deadline,
                "{} of {} DPs not in sync with version {head} after {secs} s (first: dp-{})",
                still.len(),
                dps.len(),
                still[0]
            );
            pending = still;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

// === statistics ===

#[derive(Clone, Copy, Default)]
struct Stat {
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

/// Nearest-rank percentiles, in milliseconds.
fn stat(samples: &[Duration]) -> Stat {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let k = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
        ms[k - 1]
    };
    Stat {
        p50: rank(0.50),
        p99: rank(0.99),
        max: rank(1.0),
        n: ms.len(),
    }
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn fmt3(s: &Stat) -> String {
    format!("{:.2} / {:.2} / {:.2}", s.p50, s.p99, s.max)
}

// === scenario: latency ===

struct LatencyOpts {
    writes: usize,
    warmup: usize,
    gap: Duration,
    services: usize,
    timeout: Duration,
    /// The etcd binary of the side-by-side peer; `None`: deltaplane alone.
    etcd: Option<PathBuf>,
    /// Time write → push received on a harness-side DP too.
    probe: bool,
}

/// Per write: the time to the first, the median and the last receiver, and every receiver.
#[derive(Default)]
struct Spread {
    all: Vec<Duration>,
    first: Vec<Duration>,
    mid: Vec<Duration>,
    last: Vec<Duration>,
    /// The write's own request round trip (Admin PATCH, etcd put).
    request: Vec<Duration>,
}

impl Spread {
    fn push(&mut self, mut arrived: Vec<Duration>, request: Duration) {
        arrived.sort();
        self.first.push(arrived[0]);
        // The lower median: for 10 receivers the 5th, for 1 the only one.
        self.mid.push(arrived[(arrived.len() - 1) / 2]);
        self.last.push(*arrived.last().expect("n ≥ 1"));
        self.all.extend(arrived);
        self.request.push(request);
    }

    fn stats(&self) -> SpreadStat {
        SpreadStat {
            all: stat(&self.all),
            first: stat(&self.first),
            mid: stat(&self.mid),
            last: stat(&self.last),
            request: stat(&self.request),
        }
    }
}

#[derive(Clone, Copy)]
struct SpreadStat {
    all: Stat,
    first: Stat,
    mid: Stat,
    last: Stat,
    request: Stat,
}

struct EtcdCell {
    lat: SpreadStat,
    /// etcd server CPU per put, ms.
    cpu_per_write_ms: f64,
}

struct CellResult {
    lat: SpreadStat,
    /// `--probe`: write → pushed deltas received by the harness's own DP connection.
    probe: Option<Stat>,
    /// Mean per DP and version: learned (push received) → durably applied, and the apply alone
    /// (parse, validate, write, commit), ms.
    dp_learned_to_applied_ms: f64,
    dp_apply_ms: f64,
    /// CP process CPU per Admin write, ms.
    cp_cpu_per_write_ms: f64,
    /// DP processes' CPU per applied version (sum over DPs / (writes × N)), ms.
    dp_cpu_per_version_ms: f64,
    etcd: Option<EtcdCell>,
    load_start: String,
    load_end: String,
    worst: Vec<(Duration, usize, usize)>,
}

enum Event {
    Subscribed,
    Version(usize, i64, Instant),
    Closed(usize, String),
}

/// CPU time (user + system) the processes have used so far, in seconds, summed.
fn cpu_sum(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&p| cpu_secs(p)).sum()
}

/// A DP's own timings, summed over its `/metrics` histograms: (incremental apply seconds,
/// applies, learned → applied seconds, versions).
#[derive(Clone, Copy, Default)]
struct DpTimes {
    apply_s: f64,
    applies: f64,
    learned_s: f64,
    learned: f64,
}

impl std::ops::Sub for DpTimes {
    type Output = DpTimes;
    fn sub(self, o: DpTimes) -> DpTimes {
        DpTimes {
            apply_s: self.apply_s - o.apply_s,
            applies: self.applies - o.applies,
            learned_s: self.learned_s - o.learned_s,
            learned: self.learned - o.learned,
        }
    }
}

impl std::ops::Add for DpTimes {
    type Output = DpTimes;
    fn add(self, o: DpTimes) -> DpTimes {
        DpTimes {
            apply_s: self.apply_s + o.apply_s,
            applies: self.applies + o.applies,
            learned_s: self.learned_s + o.learned_s,
            learned: self.learned + o.learned,
        }
    }
}

async fn dp_times(http: &reqwest::Client, dps: &[Dp]) -> anyhow::Result<DpTimes> {
    let mut sum = DpTimes::default();
    for dp in dps {
        let r = http
            .get(format!("http://{}/metrics", dp.status))
            .send()
            .await?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            // An older DP without /metrics: the breakdown shows NaN.
            return Ok(DpTimes::default());
        }
        let text = r.error_for_status()?.text().await?;
        let get = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0.0)
        };
        sum = sum
            + DpTimes {
                apply_s: get("deltaplane_apply_duration_seconds_sum{kind=\"incremental\"}"),
                applies: get("deltaplane_apply_duration_seconds_count{kind=\"incremental\"}"),
                learned_s: get("deltaplane_version_learned_to_applied_seconds_sum"),
                learned: get("deltaplane_version_learned_to_applied_seconds_count"),
            };
    }
    Ok(sum)
}

/// The disk's floor on this machine, p50 / p99 of 200 samples each, in `dir`: a 4 KiB
/// overwrite inside a preallocated, synced file + `fdatasync` (data only, as a reused WAL
/// such as etcd's pays), and a 4 KiB append + `fdatasync` (the file size changes too).
fn fsync_floor(dir: &Path) -> anyhow::Result<(Stat, Stat)> {
    use std::io::{Seek as _, SeekFrom, Write as _};
    let block = [0x5au8; 4096];
    let path = dir.join("fsync-probe");
    let mut f = File::create(&path)?;
    for _ in 0..200 {
        f.write_all(&block)?;
    }
    f.sync_all()?;
    f.seek(SeekFrom::Start(0))?;
    let mut overwrite = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        overwrite.push(t.elapsed());
    }
    f.seek(SeekFrom::End(0))?;
    let mut append = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        append.push(t.elapsed());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok((stat(&overwrite), stat(&append)))
}

async fn latency(
    bins: &Bins,
    dps: &[usize],
    runs: usize,
    pg: Option<&str>,
    opts: &LatencyOpts,
) -> anyhow::Result<()> {
    ensure!(
        !dps.is_empty() && dps.iter().all(|&n| n > 0),
        "--dps: N ≥ 1"
    );
    ensure!(runs >= 1 && opts.writes >= 1, "--runs and --writes ≥ 1");
    if runs < 3 {
        eprintln!("note: fewer than 3 runs; the medians are not meaningful");
    }
    let backend = if pg.is_some() { "postgres" } else { "sqlite" };
    println!(
        "latency: backend {backend}, DPs {dps:?}, {} writes per run (+{} warm-up), {runs} runs \
         interleaved, gap {:?}, {} services{}",
        opts.writes,
        opts.warmup,
        opts.gap,
        opts.services,
        if opts.etcd.is_some() {
            ", etcd peer with as many watchers (writes alternate deltaplane / etcd)"
        } else {
            ""
        }
    );
    {
        let tmp = tempfile::tempdir()?;
        let (over, append) = fsync_floor(tmp.path())?;
        println!(
            "disk floor in {}: 4 KiB overwrite + fdatasync p50 {:.3} / p99 {:.3} ms; 4 KiB \
             append + fdatasync p50 {:.3} / p99 {:.3} ms",
            std::env::temp_dir().display(),
            over.p50,
            over.p99,
            append.p50,
            append.p99
        );
    }
    let mut results: BTreeMap<usize, Vec<CellResult>> = BTreeMap::new();
    for run in 1..=runs {
        for &n in dps {
            let r = latency_cell(bins, n, run, pg, opts)
                .await
                .with_context(|| format!("run {run}, {n} DPs"))?;
            println!(
                "run {run} N={n:>3}: write→each DP {} ms | write→last DP {} ms | admin {} ms \
                 (p50/p99/max; load {} → {})",
                fmt3(&r.lat.all),
                fmt3(&r.lat.last),
                fmt3(&r.lat.request),
                r.load_start,
                r.load_end
            );
            println!(
                "    CPU: CP {:.3} ms per write, DPs {:.3} ms per applied version | DP mean: \
                 learned→applied {:.3} ms, apply {:.3} ms",
                r.cp_cpu_per_write_ms,
                r.dp_cpu_per_version_ms,
                r.dp_learned_to_applied_ms,
                r.dp_apply_ms
            );
            if let Some(p) = &r.probe {
                println!(
                    "    probe: write → pushed deltas on the harness's DP socket {} ms",
                    fmt3(p)
                );
            }
            if let Some(e) = &r.etcd {
                println!(
                    "    etcd N={n:>3}: put→each watcher {} ms | put→last watcher {} ms | put {} \
                     ms | etcd CPU {:.3} ms per put",
                    fmt3(&e.lat.all),
                    fmt3(&e.lat.last),
                    fmt3(&e.lat.request),
                    e.cpu_per_write_ms
                );
            }
            let worst: Vec<String> = r
                .worst
                .iter()
                .map(|(d, w, dp)| format!("{:.1} ms (write {w}, dp-{dp})", d.as_secs_f64() * 1e3))
                .collect();
            println!("    slowest samples: {}", worst.join(", "));
            results.entry(n).or_default().push(r);
        }
    }
    println!();
    println!(
        "### write → durably applied, {backend}, {} writes per run, mTLS, durable both ends \
         (ms; p50 / p99 / max)",
        opts.writes
    );
    println!();
    println!(
        "| DPs | run | samples (each) | write→each DP p50 | p99 | max | write→last DP p50 | p99 \
         | max | admin write p50 | p99 | max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, rs) in &results {
        for (i, r) in rs.iter().enumerate() {
            println!(
                "| {n} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} \
                 | {:.2} |",
                i + 1,
                r.lat.all.n,
                r.lat.all.p50,
                r.lat.all.p99,
                r.lat.all.max,
                r.lat.last.p50,
                r.lat.last.p99,
                r.lat.last.max,
                r.lat.request.p50,
                r.lat.request.p99,
                r.lat.request.max
            );
        }
        let med = |f: &dyn Fn(&CellResult) -> f64| median(rs.iter().map(f).collect());
        println!(
            "| {n} | **median** | | **{:.2}** | **{:.2}** | **{:.2}** | **{:.2}** | **{:.2}** | \
             **{:.2}** | **{:.2}** | **{:.2}** | **{:.2}** |",
            med(&|r| r.lat.all.p50),
            med(&|r| r.lat.all.p99),
            med(&|r| r.lat.all.max),
            med(&|r| r.lat.last.p50),
            med(&|r| r.lat.last.p99),
            med(&|r| r.lat.last.max),
            med(&|r| r.lat.request.p50),
            med(&|r| r.lat.request.p99),
            med(&|r| r.lat.request.max),
        );
    }
    println!();
    if opts.etcd.is_none() {
        return Ok(());
    }
    println!(
        "### deltaplane vs etcd, same runs, writes alternating (ms; p50 / p99 / max; median over \
         {runs} runs of each figure)"
    );
    println!();
    println!(
        "| N | system | first p50 / p99 / max | median p50 / p99 / max | last p50 / p99 / max | \
         request p50 | server CPU per write | DP CPU per applied version |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (n, rs) in &results {
        let med = |f: &dyn Fn(&CellResult) -> f64| median(rs.iter().map(f).collect());
        let emed = |f: &dyn Fn(&EtcdCell) -> f64| {
            median(rs.iter().filter_map(|r| r.etcd.as_ref()).map(f).collect())
        };
        let three = |p50: f64, p99: f64, max: f64| format!("{p50:.2} / {p99:.2} / {max:.2}");
        println!(
            "| {n} | deltaplane | {} | {} | {} | {:.2} | CP {:.3} ms | {:.3} ms |",
            three(
                med(&|r| r.lat.first.p50),
                med(&|r| r.lat.first.p99),
                med(&|r| r.lat.first.max)
            ),
            three(
                med(&|r| r.lat.mid.p50),
                med(&|r| r.lat.mid.p99),
                med(&|r| r.lat.mid.max)
            ),
            three(
                med(&|r| r.lat.last.p50),
                med(&|r| r.lat.last.p99),
                med(&|r| r.lat.last.max)
            ),
            med(&|r| r.lat.request.p50),
            med(&|r| r.cp_cpu_per_write_ms),
            med(&|r| r.dp_cpu_per_version_ms),
        );
        println!(
            "| {n} | etcd | {} | {} | {} | {:.2} | etcd {:.3} ms | |",
            three(
                emed(&|e| e.lat.first.p50),
                emed(&|e| e.lat.first.p99),
                emed(&|e| e.lat.first.max)
            ),
            three(
                emed(&|e| e.lat.mid.p50),
                emed(&|e| e.lat.mid.p99),
                emed(&|e| e.lat.mid.max)
            ),
            three(
                emed(&|e| e.lat.last.p50),
                emed(&|e| e.lat.last.p99),
                emed(&|e| e.lat.last.max)
            ),
            emed(&|e| e.lat.request.p50),
            emed(&|e| e.cpu_per_write_ms),
        );
    }
    println!();
    // The targets: 1 DP p50 ≤ 1.5× etcd's p50; 10 DPs: last DP p50 ≤ 2× etcd's last watcher p50.
    // Ratios of each run's own pair (same run, same load), then their median.
    for (n, rs) in &results {
        let ratio = |f: &dyn Fn(&SpreadStat) -> f64| {
            median(
                rs.iter()
                    .filter_map(|r| r.etcd.as_ref().map(|e| f(&r.lat) / f(&e.lat)))
                    .collect(),
            )
        };
        let last = ratio(&|s| s.last.p50);
        let target = match n {
            1 => " (target ≤ 1.5×)",
            10 => " (target ≤ 2×)",
            _ => "",
        };
        println!(
            "ratio deltaplane / etcd, N={n}: last p50 {last:.2}×{target}, first p50 {:.2}×, \
             last p99 {:.2}×",
            ratio(&|s| s.first.p50),
            ratio(&|s| s.last.p99)
        );
    }
    println!();
    Ok(())
}

/// Which system a write goes to.
#[derive(Clone, Copy, PartialEq)]
enum System {
    Deltaplane,
    Etcd,
}

async fn latency_cell(
    bins: &Bins,
    n: usize,
    run: usize,
    pg: Option<&str>,
    opts: &LatencyOpts,
) -> anyhow::Result<CellResult> {
    let load_start = loadavg();
    let mut world = World::new(pg).await?;
    let cp = world.start_cp(bins).await?;
    let mut ids = Vec::new();
    for s in 0..opts.services {
        let r = world
            .http
            .post(format!("{}/services", cp.admin))
            .json(&json!({"name": format!("lt-svc-{s}"), "host": format!("svc-{s}.test")}))
            .send()
            .await?;
        ensure!(r.status() == 201, "creating a service: {}", r.status());
        let v: Value = r.json().await?;
        ids.push(v["id"].as_str().context("service id")?.to_owned());
    }
    let dps = world.spawn_dps(bins, &cp, n)?;
    let mut etcd = match &opts.etcd {
        Some(bin) => {
            let dir = world.tmp.path().join("etcd");
            let log = world.tmp.path().join("etcd.log");
            let mut e = etcd::Etcd::start(bin, &mut world.procs, &dir, &log).await?;
            e.watch(n).await?;
            Some(e)
        }
        None => None,
    };
    world.wait_in_sync(&cp, &dps, 120 + n as u64).await?;

    // One watch_version subscription per DP.
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut watchers = Vec::with_capacity(n);
    for (i, dp) in dps.iter().enumerate() {
        let tcp = tokio::net::TcpStream::connect(dp.status).await?;
        tcp.set_nodelay(true)?;
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/rpc", dp.status), tcp)
            .await
            .with_context(|| format!("WebSocket to dp-{i}"))?;
        ws.send(Message::text(
            json!({"jsonrpc": "2.0", "id": 1, "method": "deltaplane.watch_version", "params": []})
                .to_string(),
        ))
        .await?;
        let tx = tx.clone();
        watchers.push(tokio::spawn(async move {
            loop {
                let msg = ws.next().await;
                let at = Instant::now();
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(c))) => {
                        let _ = tx.send(Event::Closed(i, format!("closed: {c:?}")));
                        return;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        let _ = tx.send(Event::Closed(i, e.to_string()));
                        return;
                    }
                    None => {
                        let _ = tx.send(Event::Closed(i, "end of stream".into()));
                        return;
                    }
                };
                let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                    continue;
                };
                if v["method"] == "deltaplane.version" {
                    if let Some(ver) = v["params"]["result"]["version"].as_i64() {
                        let _ = tx.send(Event::Version(i, ver, at));
                    }
                } else if v["id"] == 1 {
                    let ev = if v.get("error").is_some() {
                        Event::Closed(i, format!("subscription refused: {v}"))
                    } else {
                        Event::Subscribed
                    };
                    let _ = tx.send(ev);
                }
            }
        }));
    }
    drop(tx);
    let _abort = AbortOnDrop(watchers);
    let mut subscribed = 0;
    let mut latest = vec![i64::MIN; n];
    while subscribed < n {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(Event::Subscribed)) => subscribed += 1,
            Ok(Some(Event::Version(i, v, _))) => latest[i] = latest[i].max(v),
            Ok(Some(Event::Closed(i, why))) => bail!("dp-{i} watch: {why}"),
            Ok(None) | Err(_) => bail!("only {subscribed} of {n} subscriptions confirmed"),
        }
    }

    let dp_pids: Vec<u32> = dps.iter().map(|d| d.pid).collect();
    let mut head = world.cp_head(&cp).await?.0;
    let (mut probe_rx, _probe_task) = if opts.probe {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = push_probe(&cp, head, tx).await.context("the push probe")?;
        (Some(rx), Some(AbortOnDrop(vec![task])))
    } else {
        (None, None)
    };
    let mut probe_lat = Vec::new();
    let mut counter = 0u64;
    let mut dp_lat = Spread::default();
    let mut etcd_lat = Spread::default();
    let mut worst: Vec<(Duration, usize, usize)> = Vec::new();
    let mut head_start = head;
    // CPU at the start of the measured writes: (CP, DPs, etcd).
    let mut cpu_start = (0.0, 0.0, 0.0);
    let mut times_start = DpTimes::default();
    for w in 0..opts.warmup + opts.writes {
        let measured = w >= opts.warmup;
        if w == opts.warmup {
            head_start = world.cp_head(&cp).await?.0;
            ensure!(
                head_start == head,
                "head {head_start} after the warm-up, expected {head}"
            );
            times_start = dp_times(&world.http, &dps).await?;
            cpu_start = (
                cpu_secs(cp.pid)?,
                cpu_sum(&dp_pids)?,
                match &etcd {
                    Some(e) => cpu_secs(e.pid)?,
                    None => 0.0,
                },
            );
        }
        counter += 1;
        // Alternate which system writes first, so neither always follows the other's write.
        let order = if w % 2 == 0 {
            [System::Deltaplane, System::Etcd]
        } else {
            [System::Etcd, System::Deltaplane]
        };
        for system in order {
            if system == System::Etcd {
                let Some(e) = etcd.as_mut() else { continue };
                let key = format!("run-{run}/key-{}", w % opts.services);
                let (arrived, t_put) = e
                    .put(&key, &format!("write-{counter}"), opts.timeout)
                    .await
                    .with_context(|| format!("etcd write {w}"))?;
                if measured {
                    etcd_lat.push(arrived, t_put);
                }
                tokio::time::sleep(opts.gap).await;
                continue;
            }
            let expected = head + 1;
            let id = &ids[w % ids.len()];
            let body = json!({"path": format!("/loadtest/run-{run}/write-{counter}")});
            let t0 = Instant::now();
            let r = world
                .http
                .patch(format!("{}/services/{id}", cp.admin))
                .json(&body)
                .send()
                .await?;
            let status = r.status();
            let _ = r.bytes().await?;
            let t_admin = t0.elapsed();
            ensure!(status == 200, "PATCH answered {status}");
            let mut arrived: Vec<Option<Duration>> = vec![None; n];
            let mut left = n;
            let deadline = tokio::time::Instant::now() + opts.timeout;
            while left > 0 {
                let ev = match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(ev)) => ev,
                    Ok(None) => bail!("all watchers gone"),
                    Err(_) => {
                        let missing: Vec<usize> =
                            (0..n).filter(|&i| arrived[i].is_none()).collect();
                        world.procs.check_alive()?;
                        bail!(
                            "write {w} (version {expected}): {} DPs did not report it within \
                             {:?} (e.g. dp-{} at {})",
                            missing.len(),
                            opts.timeout,
                            missing[0],
                            latest[missing[0]]
                        );
                    }
                };
                match ev {
                    Event::Version(i, v, at) => {
                        latest[i] = latest[i].max(v);
                        ensure!(
                            v <= expected,
                            "dp-{i} reported version {v} while write {w} should be {expected}: \
                             another writer?"
                        );
                        if v == expected && arrived[i].is_none() {
                            arrived[i] = Some(at.saturating_duration_since(t0));
                            left -= 1;
                        }
                    }
                    Event::Closed(i, why) => bail!("dp-{i} watch: {why}"),
                    Event::Subscribed => {}
                }
            }
            head = expected;
            if let Some(prx) = probe_rx.as_mut() {
                let at = loop {
                    match tokio::time::timeout_at(deadline, prx.recv()).await {
                        Ok(Some((v, at))) if v >= expected => break at,
                        Ok(Some(_)) => {}
                        Ok(None) => bail!("the push probe ended"),
                        Err(_) => bail!("the push probe did not see version {expected}"),
                    }
                };
                if measured {
                    probe_lat.push(at.saturating_duration_since(t0));
                }
            }
            if measured {
                let arrived: Vec<Duration> = arrived.into_iter().map(Option::unwrap).collect();
                for (i, d) in arrived.iter().enumerate() {
                    worst.push((*d, w - opts.warmup, i));
                }
                worst.sort_by_key(|w| std::cmp::Reverse(w.0));
                worst.truncate(3);
                dp_lat.push(arrived, t_admin);
            }
            tokio::time::sleep(opts.gap).await;
        }
    }
    let writes = opts.writes as f64;
    let cp_cpu_per_write_ms = (cpu_secs(cp.pid)? - cpu_start.0) / writes * 1e3;
    let dp_cpu_per_version_ms = (cpu_sum(&dp_pids)? - cpu_start.1) / (writes * n as f64) * 1e3;
    let times = dp_times(&world.http, &dps).await? - times_start;
    let etcd_cell = match &etcd {
        Some(e) => Some(EtcdCell {
            lat: etcd_lat.stats(),
            cpu_per_write_ms: (cpu_secs(e.pid)? - cpu_start.2) / writes * 1e3,
        }),
        None => None,
    };
    let (head_end, hash_end) = world.cp_head(&cp).await?;
    ensure!(
        head_end - head_start == opts.writes as i64,
        "the CP head moved by {} versions for {} writes",
        head_end - head_start,
        opts.writes
    );
    // Correctness gate: every DP holds exactly the CP's configuration.
    for (i, dp) in dps.iter().enumerate() {
        let s = world.dp_status(dp).await?;
        ensure!(
            s["version"].as_i64() == Some(head_end) && s["state_hash"] == hash_end.as_str(),
            "dp-{i} ends at {} / {}, the CP at {head_end} / {hash_end}",
            s["version"],
            s["state_hash"]
        );
    }
    world.procs.check_alive()?;
    drop(etcd);
    drop(world);
    Ok(CellResult {
        lat: dp_lat.stats(),
        probe: opts.probe.then(|| stat(&probe_lat)),
        dp_learned_to_applied_ms: times.learned_s / times.learned * 1e3,
        dp_apply_ms: times.apply_s / times.applies * 1e3,
        cp_cpu_per_write_ms,
        dp_cpu_per_version_ms,
        etcd: etcd_cell,
        load_start,
        load_end: loadavg(),
        worst,
    })
}

/// The harness as one more deltaplane-dialect DP (mTLS, hello announcing pushes): it asks
/// once from `head`, then reports every version it is told of as held (it stores nothing),
/// and sends `(version, arrival)` for each push (or `notify_new_version`).
async fn push_probe(
    cp: &Cp,
    head: i64,
    tx: mpsc::UnboundedSender<(i64, Instant)>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let tls = cp.cluster_tls()?;
    let mut ws = dial::open_v2(
        &tls,
        &format!("127.0.0.1:{}", cp.cluster.port()),
        Default::default(),
        Duration::from_secs(10),
    )
    .await?;
    let result = hello::client_handshake(
        &mut ws,
        &Hello {
            rpc_capabilities: vec![
                CAP_KONG_SYNC_V2.into(),
                CAP_DELTAPLANE_SYNC_V1.into(),
                CAP_DELTAPLANE_PUSH_V1.into(),
            ],
            rpc_frame_encodings: vec![Encoding::Zstd.name().into()],
            kong_version: "3.10.0".into(),
            kong_hostname: "loadtest-probe".into(),
            kong_node_id: uuid::Uuid::new_v4().to_string(),
            kong_conf: data_plane_conf(
                &[],
                1 << 30,
                &deltaplane::schema::Registry::builtin()
                    .plugins()
                    .map(|p| (p.name.clone(), "3.10.0".to_owned()))
                    .collect::<Vec<_>>(),
            ),
        },
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| anyhow::anyhow!("hello: {e}"))?;
    let enc = result.encoding().context("probe: encoding")?;
    let ask = GetDelta::new(Version::new(head), None).to_params();
    ws.send(Message::binary(codec::encode(
        enc,
        &jsonrpc::request(1, v2::GET_DELTA, &ask),
    )))
    .await?;
    Ok(tokio::spawn(async move {
        let mut next_id = 2u64;
        while let Some(Ok(msg)) = ws.next().await {
            let at = Instant::now();
            let Message::Binary(frame) = msg else {
                continue;
            };
            let Ok(json) = codec::decode(enc, &frame, 256 << 20) else {
                return;
            };
            let Ok(jsonrpc::Incoming::Single(jsonrpc::Message::Request(req))) =
                jsonrpc::parse(&json, jsonrpc::DEFAULT_MAX_BATCH)
            else {
                continue;
            };
            let version = if req.method == v2::PUSH_DELTAS {
                v2::read_push(req.params.get())
                    .ok()
                    .and_then(|p| v2::read_answer(p.answer).ok())
                    .and_then(|a| a.latest_version)
                    .map(Version::get)
            } else if req.method == v2::NOTIFY_NEW_VERSION {
                v2::NotifyNewVersion::from_params(&req.params_value())
                    .ok()
                    .map(|n| n.new_version.get())
            } else {
                None
            };
            if let Some(id) = &req.id {
                let reply = jsonrpc::result(id, &Value::Bool(true));
                if ws
                    .send(Message::binary(codec::encode(enc, &reply)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let Some(v) = version else { continue };
            let _ = tx.send((v, at));
            // Report it as held, as a DP does after applying, so the CP pushes the next one.
            let status = GetDelta::new(Version::new(v), None).to_params();
            let msg = if req.method == v2::PUSH_DELTAS {
                jsonrpc::notification(v2::GET_DELTA, &status)
            } else {
                next_id += 1;
                jsonrpc::request(next_id, v2::GET_DELTA, &status)
            };
            if ws
                .send(Message::binary(codec::encode(enc, &msg)))
                .await
                .is_err()
            {
                return;
            }
        }
    }))
}

struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

// === pre-filled configuration ===

struct Fill {
    entities: usize,
    json_bytes: usize,
    secs: f64,
    /// One service's name, for the PATCH in `deltasize`.
    sample_name: String,
}

/// A ~1 KB service (as stored, with defaults, id and timestamps). The padding is
/// pseudo-random `[a-z0-9]` (seeded by `i`), so frames do not compress unrealistically well.
fn big_service(i: usize) -> Value {
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut pad = |salt: u64, n: usize| -> String {
        state ^= salt;
        (0..n)
            .map(|_| {
                // xorshift64*
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                let x = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 58;
                b"abcdefghijklmnopqrstuvwxyz0123456789"[(x % 36) as usize] as char
            })
            .collect()
    };
    json!({
        "name": format!("loadtest-service-{i:07}-{}", pad(1, 140)),
        "host": format!("svc-{i:07}.{}.{}.cluster.internal", pad(2, 60), pad(3, 60)),
        "path": format!("/api/v1/tenant-{i:07}/{}/{}/resources", pad(4, 90), pad(5, 90)),
        "port": 8443,
        "protocol": "https",
        "tags": (0..8).map(|t| format!("team-{t}-loadtest-tag-{:07}", i % 1000)).collect::<Vec<_>>(),
    })
}

async fn fill(world: &World, entities: usize) -> anyhow::Result<Fill> {
    println!(
        "filling the {} database with {entities} services through Store::write_batch ...",
        world.backend()
    );
    std::fs::create_dir_all(world.cp_dir())?;
    let t = Instant::now();
    let store = Store::open(world.store_options())
        .await
        .map_err(|e| anyhow::anyhow!("Store::open: {e:?}"))?;
    let mut json_bytes = 0usize;
    let mut done = 0usize;
    while done < entities {
        let k = (entities - done).min(1000);
        let ops = (done..done + k)
            .map(|i| Op::Create {
                entity: "services".into(),
                input: big_service(i),
                scope: None,
            })
            .collect();
        for (j, r) in store.write_batch(ops).await.into_iter().enumerate() {
            let out = r.map_err(|e| anyhow::anyhow!("service {}: {e:?}", done + j))?;
            let entity = out.entity.context("a created entity")?;
            json_bytes += serde_json::to_string(&entity)?.len();
        }
        done += k;
    }
    store.close().await;
    let secs = t.elapsed().as_secs_f64();
    let name = big_service(entities / 2)["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!(
        "filled {entities} services in {secs:.1} s: average JSON {:.0} bytes, total {} ({} bytes)",
        json_bytes as f64 / entities.max(1) as f64,
        mib(json_bytes as f64),
        json_bytes
    );
    Ok(Fill {
        entities,
        json_bytes,
        secs,
        sample_name: name,
    })
}

// === scenario: fullsync ===

async fn fullsync(
    bins: &Bins,
    entities: usize,
    pg: Option<&str>,
    seed: Option<&Path>,
    runs: usize,
) -> anyhow::Result<()> {
    ensure!(entities >= 1, "--entities ≥ 1");
    ensure!(
        seed.is_none() || pg.is_none(),
        "--seed keeps a SQLite database; not with --pg"
    );
    let mut world = World::new(pg).await?;
    let filled = match seed {
        Some(dir) => seeded_fill(&world, entities, dir).await?,
        None => fill(&world, entities).await?,
    };
    let cp = world.start_cp(bins).await?;
    let (head, hash) = world.cp_head(&cp).await?;
    let json = filled.json_bytes as f64;
    println!();
    println!(
        "### full sync, {}, {} services (~1 KB each), fresh DP process, durable, mTLS",
        world.backend(),
        filled.entities
    );
    println!();
    println!(
        "config JSON (services, as stored): {} ({} bytes, {:.0} bytes per service); fill {:.1} s \
         (not part of the sync); CP head version {head}",
        mib(json),
        filled.json_bytes,
        json / filled.entities as f64,
        filled.secs
    );
    println!();
    println!(
        "| run | DP start → /status version = head | DP CPU | CP CPU | DP VmHWM | VmHWM / JSON \
         | redb file (allocated) | file / JSON (allocated / JSON) | CP VmHWM | load average \
         before → after |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for run in 0..runs.max(1) {
        let cp_cpu_before = cpu_secs(cp.pid)?;
        let load_before = loadavg();
        let t0 = Instant::now();
        let dp = world.spawn_dps(bins, &cp, 1)?.remove(0);
        let took = loop {
            world.procs.check_alive()?;
            if let Ok(s) = world.dp_status(&dp).await
                && s["version"].as_i64() == Some(head)
            {
                break t0.elapsed();
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(600),
                "the DP did not reach version {head} in 600 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let dp_hwm = vm_hwm_kib(dp.pid)? as f64 * 1024.0;
        let dp_cpu = cpu_secs(dp.pid)?;
        let cp_cpu = cpu_secs(cp.pid)? - cp_cpu_before;
        let cp_hwm = vm_hwm_kib(cp.pid)? as f64 * 1024.0;
        // The session counts the transfer just after the store shows its version.
        let s = loop {
            let s = world.dp_status(&dp).await?;
            let counted =
                s["paged_transfers"].as_u64() == Some(1) || s["full_syncs"].as_u64() == Some(1);
            ensure!(
                counted || t0.elapsed() < took + Duration::from_secs(70),
                "no full sync counted: {s}"
            );
            if counted {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        ensure!(
            s["state_hash"] == hash.as_str(),
            "the DP's state hash {} differs from the CP's {hash}",
            s["state_hash"]
        );
        let file = world.tmp.path().join("dp-0").join("config.redb");
        let meta = std::fs::metadata(&file).with_context(|| file.display().to_string())?;
        let (len, alloc) = (meta.len() as f64, {
            use std::os::unix::fs::MetadataExt as _;
            (meta.blocks() * 512) as f64
        });
        let load_after = loadavg();
        println!(
            "| {run} | **{:.2} s** | {:.2} s | {:.2} s | **{}** | **{:.2}** | {} ({}) \
             | **{:.2}** ({:.2}) | {} | {load_before} → {load_after} |",
            took.as_secs_f64(),
            dp_cpu,
            cp_cpu,
            mib(dp_hwm),
            dp_hwm / json,
            mib(len),
            mib(alloc),
            len / json,
            alloc / json,
            mib(cp_hwm),
        );
        // The next run starts from an empty data dir (a fresh DP), same ports scheme.
        world.stop_dp(&dp)?;
        std::fs::remove_dir_all(world.tmp.path().join("dp-0"))?;
    }
    println!();
    Ok(())
}

/// `fill`, with the filled SQLite database kept in `dir` (for --entities services) and copied
/// from there on later runs.
async fn seeded_fill(world: &World, entities: usize, dir: &Path) -> anyhow::Result<Fill> {
    let meta_file = dir.join(format!("seed-{entities}.json"));
    let files = ["deltaplane.db", "deltaplane.db-wal", "deltaplane.db-shm"];
    std::fs::create_dir_all(world.cp_dir())?;
    if let Ok(text) = std::fs::read_to_string(&meta_file) {
        let meta: Value = serde_json::from_str(&text)?;
        for f in files {
            let from = dir.join(format!("{entities}-{f}"));
            if from.exists() {
                std::fs::copy(&from, world.cp_dir().join(f))?;
            }
        }
        println!(
            "CP database of {entities} services copied from {}",
            dir.display()
        );
        return Ok(Fill {
            entities,
            json_bytes: meta["json_bytes"].as_u64().context("json_bytes")? as usize,
            secs: meta["secs"].as_f64().unwrap_or(0.0),
            sample_name: meta["sample_name"].as_str().unwrap_or_default().to_owned(),
        });
    }
    let filled = fill(world, entities).await?;
    std::fs::create_dir_all(dir)?;
    for f in files {
        let from = world.cp_dir().join(f);
        if from.exists() {
            std::fs::copy(&from, dir.join(format!("{entities}-{f}")))?;
        }
    }
    std::fs::write(
        &meta_file,
        json!({"json_bytes": filled.json_bytes, "secs": filled.secs, "sample_name": filled.sample_name})
            .to_string(),
    )?;
    Ok(filled)
}

impl World {
    /// Kills DP `dp` and waits for it, so a next run may reuse its name and data dir.
    fn stop_dp(&mut self, dp: &Dp) -> anyhow::Result<()> {
        self.procs.kill(dp.pid)
    }
}

// === scenario: deltasize ===

async fn deltasize(bins: &Bins, entities: usize, pg: Option<&str>) -> anyhow::Result<()> {
    ensure!(entities >= 1, "--entities ≥ 1");
    let mut world = World::new(pg).await?;
    let filled = fill(&world, entities).await?;
    let cp = world.start_cp(bins).await?;
    let (before, _) = world.cp_head(&cp).await?;
    let r = world
        .http
        .patch(format!("{}/services/{}", cp.admin, filled.sample_name))
        .json(&json!({"retries": 7}))
        .send()
        .await?;
    ensure!(r.status() == 200, "PATCH answered {}", r.status());
    let entity: Value = r.json().await?;
    let entity_json = serde_json::to_string(&entity)?.len();
    let entity_id = entity["id"].as_str().context("id")?.to_owned();
    let (head, _) = world.cp_head(&cp).await?;
    ensure!(head == before + 1, "head {head}, expected {}", before + 1);

    let tls = cp.cluster_tls()?;
    let mut rows = Vec::new();
    for enc in [Encoding::SnappyFramed, Encoding::Zstd] {
        let m = get_delta_once(&tls, cp.cluster, enc, head - 1).await?;
        let answer: Value = serde_json::from_slice(&m.json)?;
        let d = &answer["result"]["default"];
        let deltas = d["deltas"].as_array().context("result.default.deltas")?;
        ensure!(
            deltas.len() == 1 && deltas[0]["entity"]["id"] == entity_id.as_str(),
            "{enc}: expected one delta for service {entity_id}, got {} deltas",
            deltas.len()
        );
        ensure!(
            d["full_sync"] == false,
            "{enc}: the answer is a full sync: {}",
            d["full_sync"]
        );
        let delta_entity = serde_json::to_string(&deltas[0]["entity"])?.len();
        rows.push((enc, m, delta_entity));
    }
    println!();
    println!(
        "### get_delta(head − 1) after one PATCH, {}, {} services in the config ({})",
        world.backend(),
        filled.entities,
        mib(filled.json_bytes as f64)
    );
    println!();
    println!(
        "changed entity JSON: {entity_json} bytes (PATCH answer, compact); target: frame ≤ entity \
         JSON + 256 = {} bytes",
        entity_json + 256
    );
    println!();
    println!(
        "| encoding | WS payload (compressed) | WS frame incl. header | decompressed answer | \
         entity in delta | frame − entity JSON | ≤ entity + 256? | config / frame |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (enc, m, delta_entity) in &rows {
        let frame = m.payload + ws_header_len(m.payload);
        println!(
            "| {} | {} B | {} B | {} B | {} B | {:+} B | {} | {:.0}× |",
            enc,
            m.payload,
            frame,
            m.json.len(),
            delta_entity,
            frame as i64 - entity_json as i64,
            if frame <= entity_json + 256 {
                "yes"
            } else {
                "NO"
            },
            filled.json_bytes as f64 / frame as f64
        );
    }
    println!();
    println!(
        "(TLS adds its record overhead, ~22 B per record with TLS 1.3 AES-GCM/ChaCha, on top of \
         the frame.)"
    );
    Ok(())
}

// === scenario: v1push ===

/// A raw `/v1/outlet` client: connected, `basic_info` sent.
async fn v1_connect(
    tls: &ClusterTls,
    cluster: SocketAddr,
) -> anyhow::Result<
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
> {
    let tcp = tokio::net::TcpStream::connect(cluster).await?;
    tcp.set_nodelay(true)?;
    let stream = tls.connect(tcp, "127.0.0.1").await?;
    let url = format!(
        "wss://{cluster}/v1/outlet?node_id={}&node_hostname=loadtest&node_version=3.10.0",
        uuid::Uuid::new_v4()
    );
    let cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30));
    let (mut ws, _) =
        tokio_tungstenite::client_async_with_config(url.as_str(), stream, Some(cfg)).await?;
    let info = deltaplane::proto::v1::basic_info(&[], &[], 1 << 30);
    ws.send(Message::Binary(serde_json::to_vec(&info)?.into()))
        .await?;
    Ok(ws)
}

/// The next binary frame (a push), within `secs`.
async fn v1_next(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    >,
    secs: u64,
) -> anyhow::Result<Vec<u8>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => bail!("no push in {secs} s"),
            Ok(Some(Ok(Message::Binary(b)))) => return Ok(b.to_vec()),
            Ok(Some(Ok(_))) => continue,
            Ok(other) => bail!("connection ended: {other:?}"),
        }
    }
}

async fn v1push(bins: &Bins, entities: usize, pg: Option<&str>) -> anyhow::Result<()> {
    ensure!(entities >= 1, "--entities ≥ 1");
    let mut world = World::new(pg).await?;
    // A 100k-entity push is larger than Kong's 16 MiB cluster_max_payload (a Kong CP fails
    // the same way); the raw clients here do not ping, so the CP must not drop them.
    world.cp_args = [
        "--cluster-max-payload",
        "1073741824",
        "--cluster-idle-timeout",
        "600s",
    ]
    .map(String::from)
    .to_vec();
    let filled = fill(&world, entities).await?;
    let cp = world.start_cp(bins).await?;
    let (head, cp_hash) = world.cp_head(&cp).await?;
    let tls = cp.cluster_tls()?;
    // First v1 client: nothing cached, so this is export + gzip + send.
    let t = Instant::now();
    let mut ws = v1_connect(&tls, cp.cluster).await?;
    let first = v1_next(&mut ws, 600).await?;
    let first_push = t.elapsed();
    // Second client: the same bytes from the cache.
    let t = Instant::now();
    let mut ws2 = v1_connect(&tls, cp.cluster).await?;
    let second = v1_next(&mut ws2, 600).await?;
    let cached_push = t.elapsed();
    ensure!(
        first == second,
        "two DPs got different bytes for one version"
    );
    let raw = deltaplane::proto::v1::gunzip(&first, 1 << 31).map_err(anyhow::Error::msg)?;
    let msg: Value = serde_json::from_slice(&raw)?;
    ensure!(
        msg["deltaplane_version"] == head,
        "pushed {}",
        msg["deltaplane_version"]
    );
    let config_hash = msg["config_hash"]
        .as_str()
        .context("config_hash")?
        .to_owned();
    drop(msg);
    let export_log = std::fs::read_to_string(world.tmp.path().join("cp.log"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("sync v1: exported"))
        .map(str::to_owned)
        .unwrap_or_else(|| "(no export line in cp.log)".into());

    // The DP's apply: gunzip, parse, unflatten, one durable redb transaction.
    let dp_dir = world.tmp.path().join("v1-dp");
    std::fs::create_dir_all(&dp_dir)?;
    let store = deltaplane::dp::store::DpStore::open(
        &dp_dir.join("config.redb"),
        deltaplane::schema::Registry::builtin().clone(),
        deltaplane::dp::store::DpStoreOptions::recommended(),
    )?;
    let t = Instant::now();
    let outcome = deltaplane::dp::v1::apply_message(&store, &dp_dir, &first, 1 << 31)
        .map_err(anyhow::Error::msg)?;
    let apply = t.elapsed();
    ensure!(
        matches!(outcome, deltaplane::dp::v1::Outcome::Applied { .. }),
        "{outcome:?}"
    );
    ensure!(
        store.state().state_hash.to_hex() == cp_hash,
        "the v1 DP's state hash differs from the CP's"
    );
    let t = Instant::now();
    let again = deltaplane::dp::v1::apply_message(&store, &dp_dir, &first, 1 << 31)
        .map_err(anyhow::Error::msg)?;
    let skip = t.elapsed();
    ensure!(
        matches!(again, deltaplane::dp::v1::Outcome::Same),
        "{again:?}"
    );

    // One PATCH: the v1 re-push versus the v2 get_delta answer.
    let t = Instant::now();
    let r = world
        .http
        .patch(format!("{}/services/{}", cp.admin, filled.sample_name))
        .json(&json!({"retries": 7}))
        .send()
        .await?;
    ensure!(r.status() == 200, "PATCH answered {}", r.status());
    let entity_json = r.text().await?.len();
    let repush = v1_next(&mut ws, 600).await?;
    let repush_time = t.elapsed();
    let t = Instant::now();
    deltaplane::dp::v1::apply_message(&store, &dp_dir, &repush, 1 << 31)
        .map_err(anyhow::Error::msg)?;
    let reapply = t.elapsed();
    let mut v2 = Vec::new();
    for enc in [Encoding::SnappyFramed, Encoding::Zstd] {
        let m = get_delta_once(&tls, cp.cluster, enc, head).await?;
        v2.push((enc, m));
    }
    drop((ws, ws2));

    println!();
    println!(
        "### sync v1 push, {}, {} services in the config ({} as stored JSON)",
        world.backend(),
        filled.entities,
        mib(filled.json_bytes as f64)
    );
    println!();
    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| config_table JSON (decompressed message) | {} ({} bytes) |",
        mib(raw.len() as f64),
        raw.len()
    );
    println!(
        "| push on the wire (gzip, one binary frame) | **{}** ({} bytes, {:.1}× smaller) |",
        mib(first.len() as f64),
        first.len(),
        raw.len() as f64 / first.len() as f64
    );
    println!(
        "| first v1 DP: connect → push received (snapshot + export + md5 + gzip + send) | **{:.2} s** |",
        first_push.as_secs_f64()
    );
    println!(
        "| second v1 DP: connect → same bytes (shared, no export) | **{:.3} s** |",
        cached_push.as_secs_f64()
    );
    println!("| CP export log | `{}` |", export_log.trim());
    println!(
        "| DP apply (gunzip + parse + unflatten + validate + one durable redb txn) | **{:.2} s** |",
        apply.as_secs_f64()
    );
    println!(
        "| DP same-hash push (gunzip + parse + compare, nothing applied) | {:.2} s |",
        skip.as_secs_f64()
    );
    println!("| config hash | {config_hash} |");
    println!();
    println!("### one PATCH on that config: v1 re-push vs v2 get_delta(head)");
    println!();
    println!("| | bytes on the wire | time |");
    println!("|---|---|---|");
    println!("| changed entity JSON (PATCH answer) | {entity_json} B | |");
    println!(
        "| v1 re-push (whole config, gzip) | {} B ({}) | PATCH → push received {:.2} s; DP apply {:.2} s |",
        repush.len(),
        mib(repush.len() as f64),
        repush_time.as_secs_f64(),
        reapply.as_secs_f64()
    );
    for (enc, m) in &v2 {
        println!(
            "| v2 get_delta, {enc} | {} B | one delta |",
            m.payload + ws_header_len(m.payload)
        );
    }
    println!();
    Ok(())
}

struct Measured {
    /// Bytes of the binary WebSocket message (the compressed frame payload).
    payload: usize,
    /// The decompressed JSON-RPC response.
    json: Vec<u8>,
}

/// WebSocket header of an unmasked server → client frame of `payload` bytes.
fn ws_header_len(payload: usize) -> usize {
    match payload {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Connects as a DP offering only `enc`, calls `kong.sync.v2.get_delta` for `version`, and
/// returns the raw size of the answer's frame.
async fn get_delta_once(
    tls: &ClusterTls,
    cluster: SocketAddr,
    enc: Encoding,
    version: i64,
) -> anyhow::Result<Measured> {
    let ws_config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(1 << 30))
        .max_frame_size(Some(1 << 30));
    let mut ws = dial::open_v2(
        tls,
        &format!("127.0.0.1:{}", cluster.port()),
        ws_config,
        Duration::from_secs(10),
    )
    .await?;
    let result = hello::client_handshake(
        &mut ws,
        &Hello {
            rpc_capabilities: vec![CAP_KONG_SYNC_V2.into(), CAP_DELTAPLANE_SYNC_V1.into()],
            rpc_frame_encodings: vec![enc.name().into()],
            kong_version: "3.10.0".into(),
            kong_hostname: "loadtest".into(),
            kong_node_id: uuid::Uuid::new_v4().to_string(),
            kong_conf: data_plane_conf(
                &[],
                1 << 30,
                &deltaplane::schema::Registry::builtin()
                    .plugins()
                    .map(|p| (p.name.clone(), "3.10.0".to_owned()))
                    .collect::<Vec<_>>(),
            ),
        },
        Duration::from_secs(10),
    )
    .await
    .map_err(|e| anyhow::anyhow!("hello: {e}"))?;
    ensure!(
        result.encoding() == Some(enc),
        "the CP chose {} although only {enc} was offered",
        result.rpc_frame_encoding
    );
    const ID: u64 = 2;
    let params = GetDelta::new(Version::new(version), None).to_params();
    let call = jsonrpc::request(ID, v2::GET_DELTA, &params);
    ws.send(Message::binary(codec::encode(enc, &call))).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("no get_delta answer in 30 s")?
            .context("connection closed")??;
        let Message::Binary(frame) = msg else {
            if let Message::Close(c) = msg {
                bail!("the CP closed the connection: {c:?}");
            }
            continue;
        };
        let json = codec::decode(enc, &frame, 256 << 20)?;
        match jsonrpc::parse(&json, jsonrpc::DEFAULT_MAX_BATCH) {
            Ok(jsonrpc::Incoming::Single(jsonrpc::Message::Response(r))) if r.id == ID => {
                if let Err(err) = r.result {
                    bail!("get_delta error: {err}");
                }
                let _ = ws.close(None).await;
                return Ok(Measured {
                    payload: frame.len(),
                    json,
                });
            }
            // A call from the CP (notify_new_version): answer it like a DP would.
            Ok(jsonrpc::Incoming::Single(jsonrpc::Message::Request(jsonrpc::Request {
                id: Some(id),
                ..
            }))) => {
                let reply = jsonrpc::result(&id, &Value::Bool(true));
                ws.send(Message::binary(codec::encode(enc, &reply))).await?;
            }
            _ => {}
        }
    }
}
