//! Proxy benchmarks of the data plane (issue 12), with real `deltaplane-cp` and
//! `deltaplane-dp` processes, side by side with nginx in the same run.
//!
//! ```sh
//! scripts/bench-proxy.sh            # builds release once, installs nginx if missing, runs all
//! scripts/bench-proxy.sh --quick    # short durations
//! cargo run --release --example proxybench -- --bin-dir target/release --nginx nginx
//! ```
//!
//! Layout on a 2-core machine: the proxy under test (the DP, or nginx's master and its one
//! worker) is pinned to core 0; this harness (the upstream, the load generator, the Admin
//! API client) and the idle CP are pinned to core 1.
//!
//! 1. Efficiency: capacity of direct / DP / nginx (closed loop, 64 connections), then each at
//!    50% of the slower proxy's capacity (open loop, fixed rate, latency from the intended
//!    send time) with the proxy's CPU time from `/proc/<pid>/stat` over the measured window.
//! 2. Propagation: Admin API write of a route with a fresh path → first non-404 answer for
//!    that path on the DP proxy (polled continuously on one keep-alive connection).
//! 3. Churn: fixed-rate traffic through the DP without, then with, one route change per
//!    second; p99 both ways and failed requests.
//!
//! On a machine shared with builds, pass `--realtime` (root): without it a woken proxy or
//! harness waits for a builder's time slice, the proxies idle half the time at "capacity"
//! and every p99 is a few milliseconds of scheduler delay. `--runs 3` interleaves the
//! systems in rounds and reports medians over the rounds. The harness reports its own CPU
//! share per window: above 80% of its core, its own queueing (and, under `--realtime`, RT
//! throttling at 95%) is in the latencies, and the summary calls those targets unreliable
//! rather than met or missed; `--load 0.25` then measures latency with headroom.
//!
//! Every child process is killed when the harness exits (also on error or panic).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use http::StatusCode;
use serde_json::json;

#[path = "proxybench/load.rs"]
mod load;
#[path = "common/procs.rs"]
mod procs;

use load::{Capacity, Conn, OpenLoop, Pct, Target, median_pct, pct};
use procs::{Procs, cpu_secs, free_ports, loadavg};

#[derive(Parser, Debug)]
#[command(
    about = "Proxy benchmarks: deltaplane-dp vs nginx (efficiency, latency), Admin write → \
             route served, latency under route churn. Build first: cargo build --release --bins"
)]
struct Cli {
    /// Directory holding deltaplane-cp and deltaplane-dp [default: <target>/release]
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// nginx binary for the comparison
    #[arg(long, default_value = "nginx")]
    nginx: PathBuf,
    /// Skip the nginx comparison (the reason is printed)
    #[arg(long)]
    no_nginx: bool,
    /// Short durations (a smoke run; the numbers are noisier)
    #[arg(long)]
    quick: bool,
    /// Keep the temp dir (process logs, databases, nginx.conf) and print its path
    #[arg(long)]
    keep: bool,
    /// Core of the proxy under test
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    /// Core of this harness (upstream, load generator) and the CP
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// Connections of the closed-loop capacity runs
    #[arg(long, default_value_t = 64)]
    capacity_conns: usize,
    /// Connections of the fixed-rate runs
    #[arg(long, default_value_t = 64)]
    conns: usize,
    /// Fraction of the slower proxy's capacity the fixed-rate runs use
    #[arg(long, default_value_t = 0.5)]
    load: f64,
    /// Admin writes measured by the propagation scenario [default: 200; --quick: 30]
    #[arg(long)]
    writes: Option<usize>,
    /// Nice value for this harness and the proxies under test (and the CP, which inherits
    /// it), e.g. -10 so that other work on a shared machine (builds) takes less of their
    /// cores; 0 leaves it unchanged. Needs root (or CAP_SYS_NICE) below 0
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    nice: i32,
    /// Rounds of scenario 1 (each runs direct, deltaplane, nginx in turn) and of scenario 3
    /// (each runs without, then with churn); the rounds' samples are pooled
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Run the proxies under test and this harness (and the CP it spawns) under SCHED_FIFO
    /// (priority 1; the pacing thread 2), so that other work on a shared machine (builds)
    /// cannot delay their wake-ups by a time slice; RT throttling caps each at 95% of its
    /// core. Needs root (or CAP_SYS_NICE)
    #[arg(long)]
    realtime: bool,
    /// Skip scenario 2 and 3 (efficiency only)
    #[arg(long)]
    efficiency_only: bool,
}

/// Durations of each phase.
struct Durations {
    capacity: Duration,
    fixed: Duration,
    warmup: Duration,
    churn: Duration,
    writes: usize,
}

impl Durations {
    fn of(cli: &Cli) -> Durations {
        if cli.quick {
            Durations {
                capacity: Duration::from_secs(2),
                fixed: Duration::from_secs(3),
                warmup: Duration::from_millis(500),
                churn: Duration::from_secs(6),
                writes: cli.writes.unwrap_or(30),
            }
        } else {
            Durations {
                capacity: Duration::from_secs(5),
                fixed: Duration::from_secs(10),
                warmup: Duration::from_secs(1),
                churn: Duration::from_secs(30),
                writes: cli.writes.unwrap_or(200),
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let cores = online_cores();
    let pinned = if cores.contains(&cli.proxy_core)
        && cores.contains(&cli.load_core)
        && cli.proxy_core != cli.load_core
    {
        // Before any thread exists: every thread of the harness inherits the mask.
        pin(0, cli.load_core).context("pinning the harness")?;
        true
    } else {
        false
    };
    if cli.nice != 0 {
        renice(cli.nice).with_context(|| format!("--nice {}", cli.nice))?;
    }
    if cli.realtime {
        // SCHED_FIFO for the harness too: at nice -20 under the fair scheduler a woken
        // harness still waits for a builder's time slice (measured: the proxies then idle
        // half the time at "capacity"). The price: above 95% of its core, RT throttling
        // stalls the harness for 50 ms at a time; the summary flags latencies measured
        // with the harness above 80%.
        load::set_fifo(1).context("--realtime: SCHED_FIFO for the harness")?;
        load::REALTIME.store(true, Ordering::Relaxed);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let res = rt.block_on(run(&cli, pinned, &cores));
    rt.shutdown_timeout(Duration::from_secs(2));
    res
}

// === processes and the machine ===

/// The cores this process may run on.
fn online_cores() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pins thread `tid` (0: the calling thread) to `core`.
fn pin(tid: libc::pid_t, core: usize) -> std::io::Result<()> {
    // SAFETY: the set is a plain bit set on the stack; sched_setaffinity only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        if libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Sets the nice value of the calling thread (and of the threads it creates after).
fn renice(nice: i32) -> std::io::Result<()> {
    // SAFETY: setpriority has no memory preconditions; `which`/`who` name the caller.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes `cmd`'s process run on `core` only, at nice value `nice` when it is not 0, and
/// under SCHED_FIFO at `realtime` priority when it is not 0 (all set in the child between
/// fork and exec).
fn place_command(cmd: &mut Command, core: Option<usize>, nice: i32, realtime: i32) {
    // SAFETY: the closure only makes the sched_setaffinity, setpriority and
    // sched_setscheduler system calls, which are async-signal-safe, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(core) = core {
                pin(0, core)?;
            }
            if nice != 0 {
                renice(nice)?;
            }
            if realtime != 0 {
                load::set_fifo(realtime)?;
            }
            Ok(())
        });
    }
}

/// The pids whose parent is `parent` (nginx's workers).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn locate_bins(dir: Option<&Path>) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            // <target>/<profile>/examples/proxybench → <target>/release
            let exe = std::env::current_exe()?;
            match exe.ancestors().nth(3) {
                Some(target) if target.join("release").is_dir() => target.join("release"),
                _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"),
            }
        }
    };
    let (cp, dp) = (dir.join("deltaplane-cp"), dir.join("deltaplane-dp"));
    for b in [&cp, &dp] {
        ensure!(
            b.is_file(),
            "{} is missing: build the release binaries first with `cargo build --release \
             --bins` (or pass --bin-dir)",
            b.display()
        );
    }
    Ok((cp, dp))
}

/// Why nginx cannot be used, if it cannot: runs `nginx -v`.
fn probe_nginx(nginx: &Path) -> Result<String, String> {
    match Command::new(nginx).arg("-v").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Ok(o) => Err(format!(
            "`{} -v` failed: {}",
            nginx.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", nginx.display())),
    }
}

// === the cluster and nginx ===

struct Bench {
    procs: Procs,
    tmp: tempfile::TempDir,
    http: reqwest::Client,
    admin: String,
    cp_dir: PathBuf,
    cluster: SocketAddr,
    upstream: SocketAddr,
    proxy_core: Option<usize>,
    /// The nice value of the proxies under test (`--nice`).
    nice: i32,
    /// Their SCHED_FIFO priority, 0 for none (`--realtime`).
    realtime: i32,
}

/// The DP process under test.
struct Dp {
    pid: u32,
    proxy: SocketAddr,
    status: SocketAddr,
}

/// The nginx under test.
struct Nginx {
    master: u32,
    listen: SocketAddr,
}

impl Bench {
    /// Starts the CP (on the harness's core), creates the benchmark service and its route
    /// (`/bench`, forwarded to the upstream).
    async fn start(
        cp_bin: &Path,
        upstream: SocketAddr,
        keep: bool,
        proxy_core: Option<usize>,
        nice: i32,
        realtime: i32,
    ) -> anyhow::Result<Bench> {
        let tmp = tempfile::Builder::new()
            .prefix("proxybench-")
            .disable_cleanup(keep)
            .tempdir()?;
        if keep {
            println!("(--keep) logs and data in {}", tmp.path().display());
        }
        let cp_dir = tmp.path().join("cp");
        std::fs::create_dir_all(&cp_dir)?;
        let ports = free_ports(2)?;
        let admin = format!("127.0.0.1:{}", ports[0]);
        let cluster: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse()?;
        let mut cmd = Command::new(cp_bin);
        cmd.args(["serve", "--data-dir"])
            .arg(&cp_dir)
            .args(["--admin-listen", &admin])
            .args(["--cluster-listen", &cluster.to_string()]);
        let mut procs = Procs::default();
        procs.spawn("cp", cmd, &tmp.path().join("cp.log"))?;
        let mut bench = Bench {
            procs,
            tmp,
            http: reqwest::Client::builder().tcp_nodelay(true).build()?,
            admin: format!("http://{admin}"),
            cp_dir,
            cluster,
            upstream,
            proxy_core,
            nice,
            realtime,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            bench.procs.check_alive()?;
            let ready = bench.cp_dir.join("cluster.crt").exists()
                && bench.cp_dir.join("cluster.key").exists()
                && matches!(
                    bench.http.get(format!("{}/status", bench.admin)).send().await,
                    Ok(r) if r.status().is_success()
                );
            if ready {
                break;
            }
            ensure!(Instant::now() < deadline, "the CP did not start in 60 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bench
            .admin_write(
                reqwest::Method::POST,
                "/services",
                json!({"name": "s", "url": format!("http://{upstream}")}),
            )
            .await?;
        bench
            .admin_write(
                reqwest::Method::POST,
                "/services/s/routes",
                json!({"name": "bench", "paths": ["/bench"]}),
            )
            .await?;
        Ok(bench)
    }

    /// One Admin API write; fails unless it answers 2xx.
    async fn admin_write(
        &self,
        method: reqwest::Method,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<()> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.admin));
        if method != reqwest::Method::DELETE {
            req = req.json(&body);
        }
        let res = req.send().await?;
        let status = res.status();
        if !status.is_success() {
            let text = res.text().await.unwrap_or_default();
            bail!("{method} {path}: {status}: {text}");
        }
        Ok(())
    }

    /// Starts the DP with its proxy on the proxy core and waits until `/bench` answers 200.
    async fn start_dp(&mut self, dp_bin: &Path) -> anyhow::Result<Dp> {
        let ports = free_ports(2)?;
        let status: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse()?;
        let proxy: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse()?;
        let mut cmd = Command::new(dp_bin);
        cmd.args(["run", "--data-dir"])
            .arg(self.tmp.path().join("dp"))
            .args(["--cluster-control-plane", &self.cluster.to_string()])
            .arg("--cluster-cert")
            .arg(self.cp_dir.join("cluster.crt"))
            .arg("--cluster-cert-key")
            .arg(self.cp_dir.join("cluster.key"))
            .args(["--status-listen", &status.to_string()])
            .args(["--proxy-listen", &proxy.to_string()]);
        place_command(&mut cmd, self.proxy_core, self.nice, self.realtime);
        let pid = self
            .procs
            .spawn("dp", cmd, &self.tmp.path().join("dp.log"))?;
        let dp = Dp { pid, proxy, status };
        self.wait_answering(dp.proxy, "the DP proxy").await?;
        Ok(dp)
    }

    /// Starts nginx (one worker) on the proxy core, proxying to the upstream with a
    /// keep-alive pool, and waits until it answers.
    async fn start_nginx(&mut self, nginx: &Path) -> anyhow::Result<Nginx> {
        let dir = self.tmp.path().join("nginx");
        for d in ["", "logs", "tmp"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let port = free_ports(1)?[0];
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let d = dir.display();
        let conf = format!(
            "worker_processes 1;\n\
             pid {d}/nginx.pid;\n\
             error_log {d}/logs/error.log warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n\
             \x20   proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp/scgi;\n\
             \x20   upstream up {{\n\
             \x20       server {up};\n\
             \x20       keepalive 64;\n\
             \x20   }}\n\
             \x20   server {{\n\
             \x20       listen {listen};\n\
             \x20       location / {{\n\
             \x20           proxy_pass http://up;\n\
             \x20           proxy_http_version 1.1;\n\
             \x20           proxy_set_header Connection \"\";\n\
             \x20       }}\n\
             \x20   }}\n\
             }}\n",
            up = self.upstream,
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut cmd = Command::new(nginx);
        cmd.arg("-p")
            .arg(&dir)
            .arg("-e")
            .arg(dir.join("logs/error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"]);
        place_command(&mut cmd, self.proxy_core, self.nice, self.realtime);
        let master = self
            .procs
            .spawn_graceful("nginx", cmd, &self.tmp.path().join("nginx.log"))?;
        self.wait_answering(listen, "nginx").await?;
        Ok(Nginx { master, listen })
    }

    /// Waits until `GET /bench` on `addr` answers 200 (60 s at most).
    async fn wait_answering(&mut self, addr: SocketAddr, what: &str) -> anyhow::Result<()> {
        let target = Target {
            addr,
            path: "/bench".into(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            self.procs.check_alive()?;
            if Conn::new(&target).get_ok().await.is_ok() {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what} did not answer 200 on /bench in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// === scenario 1: efficiency ===

/// One system under test in scenario 1.
struct System {
    name: &'static str,
    target: Target,
    /// The processes whose CPU time counts (empty: the direct baseline).
    pids: Vec<u32>,
}

impl System {
    fn cpu(&self) -> f64 {
        self.pids
            .iter()
            .map(|&p| cpu_secs(p).unwrap_or(f64::NAN))
            .sum()
    }
}

/// What scenario 1 measured for one system.
struct Efficiency {
    capacity: Capacity,
    /// Proxy CPU-seconds over the capacity window.
    capacity_cpu: f64,
    /// Harness CPU-seconds over the capacity window (near the window's length: the
    /// generator, not the proxy, may be the limit).
    capacity_harness_cpu: f64,
    fixed: OpenLoop,
    fixed_rate: f64,
    /// Proxy CPU-seconds over the fixed-rate window.
    fixed_cpu: f64,
    lat: Pct,
    /// Connections the upstream accepted during this system's runs (capacity and fixed).
    upstream_conns: u64,
}

impl Efficiency {
    fn req_per_cpu(&self) -> f64 {
        self.fixed.ok as f64 / self.fixed_cpu
    }

    fn req_per_cpu_at_capacity(&self) -> f64 {
        self.capacity.ok as f64 / self.capacity_cpu
    }
}

async fn capacity_of(
    sys: &System,
    conns: usize,
    d: &Durations,
) -> anyhow::Result<(Capacity, f64, f64)> {
    let mut marks: Vec<(f64, f64)> = Vec::new();
    let cap = load::closed_loop(&sys.target, conns, d.warmup, d.capacity, || {
        marks.push((sys.cpu(), cpu_secs(std::process::id()).unwrap_or(f64::NAN)));
    })
    .await?;
    ensure!(marks.len() == 2, "the capacity window was not marked");
    Ok((cap, marks[1].0 - marks[0].0, marks[1].1 - marks[0].1))
}

async fn fixed_rate_of(
    sys: &System,
    conns: usize,
    rate: f64,
    d: &Durations,
) -> anyhow::Result<(OpenLoop, f64)> {
    let mut marks: Vec<f64> = Vec::new();
    let (out, ()) = load::open_loop(
        &sys.target,
        conns,
        rate,
        d.warmup,
        d.fixed,
        || marks.push(sys.cpu()),
        async {},
    )
    .await?;
    ensure!(marks.len() == 2, "the fixed-rate window was not marked");
    Ok((out, marks[1] - marks[0]))
}

// === scenario 2: Admin write → route answers ===

struct Propagation {
    lat: Pct,
    /// Writes whose route never answered (timeout) or answered other than 200.
    failed: usize,
    errors: Vec<String>,
}

/// Creates `writes` routes with fresh paths, one at a time; for each, a poller sends
/// `GET <path>` continuously on one keep-alive connection to the DP proxy from before the
/// write is sent until the first answer other than 404. The latency is write sent → that
/// answer.
async fn propagation(bench: &Bench, dp: &Dp, writes: usize) -> anyhow::Result<Propagation> {
    let target = Target {
        addr: dp.proxy,
        path: "/bench".into(),
    };
    let mut samples = Vec::with_capacity(writes);
    let mut failed = 0;
    let mut errors = Vec::new();
    let run = rand::random::<u32>();
    for i in 0..writes + 3 {
        // A trailing slash: `/prop-…-1/` must not prefix-match `/prop-…-10/`.
        let path = format!("/prop-{run:08x}-{i}/");
        let mut conn = Conn::new(&target);
        // The connection is open and the path answers 404 before the write is sent.
        let first = conn.get(&path).await?;
        ensure!(
            first == StatusCode::NOT_FOUND,
            "{path} answered {first} before its route existed"
        );
        let poll_path = path.clone();
        let poller = tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let status = conn.get(&poll_path).await;
                let at = Instant::now();
                match status {
                    Ok(StatusCode::NOT_FOUND) if at < deadline => {}
                    Ok(s) => return Ok((s, at)),
                    Err(e) => return Err(e),
                }
                // Let the Admin write (same thread) make progress between polls.
                tokio::task::yield_now().await;
            }
        });
        let sent = Instant::now();
        let write = bench
            .admin_write(
                reqwest::Method::POST,
                "/services/s/routes",
                json!({"name": format!("prop-{run:08x}-{i}"), "paths": [path]}),
            )
            .await;
        write?;
        let res = poller.await.context("the poller panicked")?;
        // The first 3 are a warm-up (first incremental builds, connection set-up).
        let measured = i >= 3;
        match res {
            Ok((StatusCode::OK, at)) => {
                if measured {
                    samples.push(at - sent);
                }
            }
            Ok((s, _)) => {
                if measured {
                    failed += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{path}: status {s}"));
                    }
                }
            }
            Err(e) => {
                if measured {
                    failed += 1;
                    if errors.len() < 5 {
                        errors.push(format!("{path}: {e:#}"));
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(Propagation {
        lat: pct(&samples),
        failed,
        errors,
    })
}

// === scenario 3: churn ===

struct Churn {
    quiet: OpenLoop,
    churned: OpenLoop,
    /// Each round's latencies without and with churn.
    quiet_rounds: Vec<Pct>,
    churned_rounds: Vec<Pct>,
    /// Route changes made (and failed) during the churn window.
    changes: usize,
    change_errors: Vec<String>,
}

/// Fixed-rate traffic to `/bench` through the DP: once without churn, then with one route
/// change per second (alternately: create a route with a fresh path; delete it).
async fn churn(
    bench: &Bench,
    dp: &Dp,
    conns: usize,
    rate: f64,
    d: &Durations,
    round: u32,
) -> anyhow::Result<Churn> {
    let target = Target {
        addr: dp.proxy,
        path: "/bench".into(),
    };
    let (quiet, ()) =
        load::open_loop(&target, conns, rate, d.warmup, d.churn, || {}, async {}).await?;
    let changes = async {
        let mut made = 0;
        let mut errors = Vec::new();
        let start = tokio::time::Instant::now();
        let n = d.churn.as_secs() as usize;
        for i in 0..n {
            tokio::time::sleep_until(start + Duration::from_secs(i as u64)).await;
            let name = format!("churn-{round}-{}", i / 2);
            let path = format!("/{name}/");
            let res = if i % 2 == 0 {
                bench
                    .admin_write(
                        reqwest::Method::POST,
                        "/services/s/routes",
                        json!({"name": name, "paths": [path]}),
                    )
                    .await
            } else {
                bench
                    .admin_write(
                        reqwest::Method::DELETE,
                        &format!("/routes/{name}"),
                        json!({}),
                    )
                    .await
            };
            match res {
                Ok(()) => made += 1,
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        (made, errors)
    };
    let (churned, (made, change_errors)) =
        load::open_loop(&target, conns, rate, d.warmup, d.churn, || {}, changes).await?;
    Ok(Churn {
        quiet_rounds: vec![pct(&quiet.latencies)],
        churned_rounds: vec![pct(&churned.latencies)],
        quiet,
        churned,
        changes: made,
        change_errors,
    })
}

// === the run ===

async fn run(cli: &Cli, pinned: bool, cores: &[usize]) -> anyhow::Result<()> {
    let d = Durations::of(cli);
    let (cp_bin, dp_bin) = locate_bins(cli.bin_dir.as_deref())?;
    let command_line = std::env::args().collect::<Vec<_>>().join(" ");
    let load_start = loadavg();
    println!("command: {command_line}");
    println!("load average at start: {load_start}");
    if pinned {
        println!(
            "pinning: proxy under test on core {}, harness (upstream, generator) and CP on \
             core {}",
            cli.proxy_core, cli.load_core
        );
    } else {
        println!(
            "pinning skipped: cores {cores:?} do not include both --proxy-core {} and \
             --load-core {}",
            cli.proxy_core, cli.load_core
        );
    }
    println!(
        "scheduling of the harness, the CP and the proxies under test: nice {}, {}",
        cli.nice,
        if cli.realtime {
            "SCHED_FIFO 1 (--realtime)"
        } else {
            "SCHED_OTHER"
        }
    );
    let nginx = if cli.no_nginx {
        println!("nginx comparison skipped: --no-nginx");
        None
    } else {
        match probe_nginx(&cli.nginx) {
            Ok(v) => {
                println!("nginx: {} ({v})", cli.nginx.display());
                Some(cli.nginx.clone())
            }
            Err(why) => {
                println!("nginx comparison skipped: {why}");
                None
            }
        }
    };

    let upstream = load::start_upstream().await?;
    let proxy_core = pinned.then_some(cli.proxy_core);
    let mut bench = Bench::start(
        &cp_bin,
        upstream,
        cli.keep,
        proxy_core,
        cli.nice,
        if cli.realtime { 1 } else { 0 },
    )
    .await?;
    let dp = bench.start_dp(&dp_bin).await?;
    println!(
        "deltaplane-dp: pid {}, proxy on {}, status on http://{}",
        dp.pid, dp.proxy, dp.status
    );
    let ngx = match &nginx {
        Some(bin) => Some(bench.start_nginx(bin).await?),
        None => None,
    };
    let mut systems = vec![
        System {
            name: "direct",
            target: Target {
                addr: upstream,
                path: "/bench".into(),
            },
            pids: Vec::new(),
        },
        System {
            name: "deltaplane",
            target: Target {
                addr: dp.proxy,
                path: "/bench".into(),
            },
            pids: vec![dp.pid],
        },
    ];
    if let Some(n) = &ngx {
        let mut pids = vec![n.master];
        let workers = children_of(n.master);
        bench
            .procs
            .grandchildren
            .extend(workers.iter().map(|&w| (w, "nginx".to_owned())));
        pids.extend(workers);
        ensure!(pids.len() >= 2, "nginx has no worker process");
        println!("nginx pids (master, workers): {pids:?}");
        systems.push(System {
            name: "nginx",
            target: Target {
                addr: n.listen,
                path: "/bench".into(),
            },
            pids,
        });
    }

    // 1. Capacity, closed loop.
    println!(
        "\n## 1. Efficiency\ncapacity: closed loop, {} connections, {:?} each",
        cli.capacity_conns, d.capacity
    );
    // Each round runs every system once, in turn, so that the machine's other load
    // spreads over all of them alike; the rounds are pooled.
    let mut caps: Vec<(Capacity, f64, f64)> = Vec::new();
    let mut upstream_conns: Vec<u64> = vec![0; systems.len()];
    for round in 0..cli.runs {
        for (k, sys) in systems.iter().enumerate() {
            let accepted = load::UPSTREAM_ACCEPTED.load(Ordering::Relaxed);
            let (cap, cpu, harness) = capacity_of(sys, cli.capacity_conns, &d).await?;
            upstream_conns[k] += load::UPSTREAM_ACCEPTED.load(Ordering::Relaxed) - accepted;
            bench.procs.check_alive()?;
            println!(
                "  {:<10} run {}: {:>9.0} req/s  failed {}  proxy CPU {:.2} s  harness CPU \
                 {:.2} s / {:.2} s",
                sys.name,
                round + 1,
                cap.rps(),
                cap.failed,
                cpu,
                harness,
                cap.secs
            );
            if round == 0 {
                caps.push((cap, cpu, harness));
            } else {
                let c = &mut caps[k];
                c.0.ok += cap.ok;
                c.0.failed += cap.failed;
                c.0.secs += cap.secs;
                c.1 += cpu;
                c.2 += harness;
            }
        }
    }
    let slower = caps[1..]
        .iter()
        .map(|(c, _, _)| c.rps())
        .fold(f64::INFINITY, f64::min);
    let rate = (slower * cli.load).max(1.0);
    println!(
        "fixed rate: {rate:.0} req/s ({:.0}% of the slower proxy's capacity), {} connections, \
         {:?} measured after {:?}, {} round(s)",
        cli.load * 100.0,
        cli.conns,
        d.fixed,
        d.warmup,
        cli.runs
    );
    let mut fixed: Vec<Option<(OpenLoop, f64)>> = systems.iter().map(|_| None).collect();
    let mut rounds: Vec<Vec<Pct>> = systems.iter().map(|_| Vec::new()).collect();
    for round in 0..cli.runs {
        for (k, sys) in systems.iter().enumerate() {
            let accepted = load::UPSTREAM_ACCEPTED.load(Ordering::Relaxed);
            let (run, cpu) = fixed_rate_of(sys, cli.conns, rate, &d).await?;
            upstream_conns[k] += load::UPSTREAM_ACCEPTED.load(Ordering::Relaxed) - accepted;
            bench.procs.check_alive()?;
            let lat = pct(&run.latencies);
            rounds[k].push(lat);
            println!(
                "  {:<10} run {}: p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  ok {} \
                 ({:.0} req/s of {} scheduled)  failed {}  proxy CPU {:.2} s  harness CPU {:.2} \
                 s{}",
                sys.name,
                round + 1,
                lat.p50,
                lat.p90,
                lat.p99,
                lat.max,
                run.ok,
                run.ok as f64 / run.secs,
                run.scheduled,
                run.failed,
                cpu,
                run.harness_cpu,
                run.errors
                    .first()
                    .map(|e| format!("  (first error: {e})"))
                    .unwrap_or_default()
            );
            match &mut fixed[k] {
                None => fixed[k] = Some((run, cpu)),
                Some((all, all_cpu)) => {
                    all.merge(run);
                    *all_cpu += cpu;
                }
            }
        }
    }
    let mut effs = Vec::new();
    for ((((cap, ccpu, hcpu), f), conns), rounds) in
        caps.into_iter().zip(fixed).zip(upstream_conns).zip(rounds)
    {
        let (fixed, cpu) = f.context("no fixed-rate run")?;
        let lat = median_pct(&rounds);
        effs.push(Efficiency {
            capacity: cap,
            capacity_cpu: ccpu,
            capacity_harness_cpu: hcpu,
            fixed,
            fixed_rate: rate,
            fixed_cpu: cpu,
            lat,
            upstream_conns: conns,
        });
    }
    if let Some(_n) = ngx {
        // nginx is not needed any more: scenarios 2 and 3 are the DP's alone.
        bench.procs.stop("nginx");
    }

    let mut prop = None;
    let mut ch = None;
    if !cli.efficiency_only {
        println!(
            "\n## 2. Admin write → route answers on the DP proxy ({} writes)",
            d.writes
        );
        let p = propagation(&bench, &dp, d.writes).await?;
        bench.procs.check_alive()?;
        println!(
            "  p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms  n {}  failed {}",
            p.lat.p50, p.lat.p99, p.lat.max, p.lat.n, p.failed
        );
        for e in &p.errors {
            println!("  error: {e}");
        }
        prop = Some(p);

        let dp_rate = effs[1].capacity.rps() * cli.load;
        println!(
            "\n## 3. Latency under churn: {dp_rate:.0} req/s ({:.0}% of the DP's capacity), \
             {:?} without, then {:?} with 1 route change per second",
            cli.load * 100.0,
            d.churn,
            d.churn
        );
        let mut c: Option<Churn> = None;
        for round in 0..cli.runs {
            let r = churn(&bench, &dp, cli.conns, dp_rate, &d, round).await?;
            bench.procs.check_alive()?;
            for (what, o) in [("no churn", &r.quiet), ("churn", &r.churned)] {
                let l = pct(&o.latencies);
                println!(
                    "  run {}: {what:<9} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms  \
                     harness CPU {:.2} s / {:.2} s",
                    round + 1,
                    l.p50,
                    l.p90,
                    l.p99,
                    l.max,
                    o.harness_cpu,
                    o.secs
                );
            }
            match &mut c {
                None => c = Some(r),
                Some(all) => {
                    all.quiet.merge(r.quiet);
                    all.churned.merge(r.churned);
                    all.changes += r.changes;
                    all.quiet_rounds.extend(r.quiet_rounds);
                    all.churned_rounds.extend(r.churned_rounds);
                    all.change_errors.extend(r.change_errors);
                }
            }
        }
        let c = c.context("no churn run")?;
        println!("  all rounds (pooled samples; median of the rounds' p99):");
        for (what, o, rounds) in [
            ("no churn", &c.quiet, &c.quiet_rounds),
            ("churn", &c.churned, &c.churned_rounds),
        ] {
            let l = pct(&o.latencies);
            println!(
                "  {what:<9} p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms (median {:.3} ms)  max \
                 {:.3} ms  ok {}  failed {}",
                l.p50,
                l.p90,
                l.p99,
                median_pct(rounds).p99,
                l.max,
                o.ok,
                o.failed
            );
            for e in &o.errors {
                println!("    error: {e}");
            }
        }
        println!("  route changes made: {}", c.changes);
        for e in &c.change_errors {
            println!("  change error: {e}");
        }
        ch = Some(c);
    }
    let load_end = loadavg();
    println!(
        "\n{}",
        summary(
            &effs,
            prop.as_ref(),
            ch.as_ref(),
            &command_line,
            &load_start,
            &load_end
        )
    );
    Ok(())
}

/// Above this share of its core, the harness's own queueing shows in the latencies it
/// measures: latency targets are then reported as unreliable rather than met or missed.
const HARNESS_SATURATED: f64 = 0.8;

fn yes(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

/// The markdown summary: one table, then the command line and the load averages.
fn summary(
    effs: &[Efficiency],
    prop: Option<&Propagation>,
    ch: Option<&Churn>,
    command_line: &str,
    load_start: &str,
    load_end: &str,
) -> String {
    let mut s = String::new();
    let direct = &effs[0];
    let dp = &effs[1];
    let ngx = effs.get(2);
    let col = |f: &dyn Fn(&Efficiency) -> String| -> (String, String, String) {
        (
            f(direct),
            f(dp),
            ngx.map(f).unwrap_or_else(|| "skipped".into()),
        )
    };
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "| measure | direct | deltaplane | nginx | deltaplane / nginx | target | met |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    let ratio = |a: f64, b: Option<f64>| match b {
        Some(b) if b != 0.0 => format!("{:.2}", a / b),
        _ => "n/a".into(),
    };
    // Capacity.
    let (a, b, c) = col(&|e| format!("{:.0}", e.capacity.rps()));
    let _ = writeln!(
        s,
        "| capacity, req/s (closed loop) | {a} | {b} | {c} | {} | | |",
        ratio(dp.capacity.rps(), ngx.map(|n| n.capacity.rps()))
    );
    let (_, b, c) = col(&|e| format!("{:.2}", e.capacity_cpu / e.capacity.secs));
    let _ = writeln!(
        s,
        "| proxy CPU share during capacity run (1.00 = its core was all its own) | – | {b} | {c} | | | |"
    );
    let (a, b, c) = col(&|e| format!("{:.2}", e.capacity_harness_cpu / e.capacity.secs));
    let _ = writeln!(
        s,
        "| harness CPU share during capacity run (1.00 = generator-bound) | {a} | {b} | {c} | | | |"
    );
    let (_, b, c) = col(&|e| format!("{:.0}", e.req_per_cpu_at_capacity()));
    let _ = writeln!(
        s,
        "| req per proxy CPU-second at capacity | – | {b} | {c} | {} | | |",
        ratio(
            dp.req_per_cpu_at_capacity(),
            ngx.map(|n| n.req_per_cpu_at_capacity())
        )
    );
    let _ = writeln!(
        s,
        "| fixed rate, req/s | {r:.0} | {r:.0} | {} | | | |",
        if ngx.is_some() {
            format!("{:.0}", dp.fixed_rate)
        } else {
            "skipped".into()
        },
        r = dp.fixed_rate
    );
    let (a, b, c) = col(&|e| format!("{:.3}", e.lat.p50));
    let _ = writeln!(s, "| p50 latency, ms | {a} | {b} | {c} | | | |");
    let (a, b, c) = col(&|e| format!("{:.3}", e.lat.p90));
    let _ = writeln!(s, "| p90 latency, ms | {a} | {b} | {c} | | | |");
    let (a, b, c) = col(&|e| format!("{:.3}", e.lat.p99));
    let _ = writeln!(s, "| p99 latency, ms | {a} | {b} | {c} | | | |");
    let (a, b, c) = col(&|e| format!("{:.3}", e.lat.max));
    let _ = writeln!(s, "| max latency, ms | {a} | {b} | {c} | | | |");
    let (_, b, c) = col(&|e| format!("{:.3}", e.lat.p50 - direct.lat.p50));
    let _ = writeln!(
        s,
        "| added p50 over direct, ms | – | {b} | {c} | {} | | |",
        ratio(
            dp.lat.p50 - direct.lat.p50,
            ngx.map(|n| n.lat.p50 - direct.lat.p50)
        )
    );
    let (a, b, c) = col(&|e| format!("{:.2}", e.fixed.harness_cpu / e.fixed.secs));
    let _ = writeln!(
        s,
        "| harness CPU share at the fixed rate (near 1.00: generator-bound, latency unreliable) | {a} | {b} | {c} | | | |"
    );
    let saturated = effs
        .iter()
        .any(|e| e.fixed.harness_cpu / e.fixed.secs > HARNESS_SATURATED);
    let added_p99 = dp.lat.p99 - direct.lat.p99;
    let (_, b, c) = col(&|e| format!("{:.3}", e.lat.p99 - direct.lat.p99));
    let _ = writeln!(
        s,
        "| added p99 over direct, ms | – | {b} | {c} | {} | deltaplane ≤ 1 ms | {} |",
        ratio(added_p99, ngx.map(|n| n.lat.p99 - direct.lat.p99)),
        if saturated {
            "unreliable (harness saturated)"
        } else {
            yes(added_p99 <= 1.0)
        }
    );
    let (_, b, c) = col(&|e| format!("{:.2}", e.fixed_cpu));
    let _ = writeln!(
        s,
        "| proxy CPU-seconds in the window | – | {b} | {c} | | | |"
    );
    let (_, b, c) = col(&|e| format!("{:.0}", e.req_per_cpu()));
    let per_cpu = ngx.map(|n| dp.req_per_cpu() / n.req_per_cpu());
    let _ = writeln!(
        s,
        "| req per proxy CPU-second at the fixed rate | – | {b} | {c} | {} | ≥ 0.80 | {} |",
        ratio(dp.req_per_cpu(), ngx.map(|n| n.req_per_cpu())),
        per_cpu.map(|r| yes(r >= 0.8)).unwrap_or("n/a")
    );
    let (a, b, c) = col(&|e| format!("{}", e.upstream_conns));
    let _ = writeln!(
        s,
        "| upstream connections opened (all runs) | {a} | {b} | {c} | | | |"
    );
    let (a, b, c) = col(&|e| format!("{}", e.fixed.failed + e.capacity.failed));
    let _ = writeln!(
        s,
        "| failed requests | {a} | {b} | {c} | | 0 | {} |",
        yes(b == "0")
    );
    if let Some(p) = prop {
        let _ = writeln!(
            s,
            "| Admin write → route answers, p50 ms (n = {}) | | {:.2} | | | ≤ 10 ms | {} |",
            p.lat.n,
            p.lat.p50,
            yes(p.lat.p50 <= 10.0)
        );
        let _ = writeln!(
            s,
            "| Admin write → route answers, p99 ms | | {:.2} | | | ≤ 25 ms | {} |",
            p.lat.p99,
            yes(p.lat.p99 <= 25.0)
        );
        let _ = writeln!(
            s,
            "| Admin write → route answers, max ms; failed | | {:.2}; {} | | | 0 failed | {} |",
            p.lat.max,
            p.failed,
            yes(p.failed == 0)
        );
    }
    if let Some(c) = ch {
        let q = median_pct(&c.quiet_rounds);
        let w = median_pct(&c.churned_rounds);
        let _ = writeln!(s, "| p99 without churn, ms | | {:.3} | | | | |", q.p99);
        let _ = writeln!(
            s,
            "| harness CPU share without / with churn | | {:.2} / {:.2} | | | | |",
            c.quiet.harness_cpu / c.quiet.secs,
            c.churned.harness_cpu / c.churned.secs
        );
        let _ = writeln!(
            s,
            "| p99 with 1 route change/s ({} changes), ms | | {:.3} | | | | |",
            c.changes, w.p99
        );
        let _ = writeln!(
            s,
            "| p99 churn − no churn, ms | | {:.3} | | | ≤ 1 ms | {} |",
            w.p99 - q.p99,
            if [&c.quiet, &c.churned]
                .iter()
                .any(|o| o.harness_cpu / o.secs > HARNESS_SATURATED)
            {
                "unreliable (harness saturated)"
            } else {
                yes(w.p99 - q.p99 <= 1.0)
            }
        );
        let failed = c.quiet.failed + c.churned.failed;
        let _ = writeln!(
            s,
            "| failed requests, both churn runs | | {failed} | | | 0 | {} |",
            yes(failed == 0)
        );
    }
    let _ = writeln!(
        s,
        "\nLatency is measured from each request's intended send time (open loop). p50, p90 \
         and p99 are the median over the rounds of each round's percentile; max is over all \
         rounds. Request counts and CPU time are summed over the rounds."
    );
    let _ = writeln!(s, "\ncommand: `{command_line}`");
    let _ = writeln!(
        s,
        "load average (1, 5, 15 min): {load_start} at start, {load_end} at end"
    );
    s
}
