//! The fleet simulator (issue 11, item 4): thousands of simulated data planes, each a real mTLS
//! WebSocket to `/v2/outlet` with the real hello and protocol (Kong 3.10's dialect or
//! deltaplane's, see `sim.rs`), against the real `target/release/deltaplane-cp` process
//! (temp dir, free ports, SQLite `synchronous=FULL`, its generated shared certificate).
//!
//! The simulated DPs run in child processes of this harness (`--role sims`, at most
//! `--per-proc` DPs each, 5,000 by default: the open-files hard limit here is 20,000 per
//! process), never in the CP's; every process raises its `RLIMIT_NOFILE` soft limit to the
//! hard limit. Each simulated DP holds only its version, a map `(type, pk) → entity hash` and
//! the running state hash, and checks after every apply that its hash equals the CP's at that
//! version (fetched once per version per process from the CP's `/rpc`). Every run ends with
//! the correctness gate: all DPs at the CP's head with the CP's state hash, no Kong DP
//! notified twice for one version or for a version it holds, no protocol error; otherwise the
//! harness exits non-zero.
//!
//! ```sh
//! cargo build --release --bins --examples
//! B=target/release/examples/fleetsim
//! $B latency --dps 1000 --dialect kong --writes 100 --rate 5
//! $B latency --dps 10000 --dialect deltaplane --writes 60 --rate 1
//! $B idle --counts 0,1000,5000,10000 --dialect deltaplane
//! $B storm --dps 5000 --dialect deltaplane
//! $B floor --sockets 9000 --tls
//! $B --quick latency          # also: --quick idle, --quick storm, --quick floor
//! ```
//!
//! * `latency`: sequential Admin API writes (`--writes`, at most `--rate` per second) → the
//!   time until the first, the median and the last DP has applied each one (its state hash
//!   computed; the comparison with the CP's follows off the DP's path): p50 / p99 / max over
//!   the writes for each. Also the CP's CPU time (utime + stime from `/proc`) per DP per
//!   version in µs, the simulators' CPU, and the floor below for the same N.
//! * `idle`: the CP's RSS (`VmRSS`) at each of `--counts` connected DPs, and ΔRSS / ΔN in KiB
//!   per connection; idle means after the hello, the first `get_delta` and one notification
//!   (one write after each step, applied by every DP), then `--settle-ms`.
//! * `storm`: with `--dps` connected, SIGKILL the CP (`--signal term` for a graceful stop) and
//!   start it again on the same data dir and ports; the clock starts when the new CP answers
//!   on its Admin API. Time until every DP is back at the head, how many got a full sync, the
//!   CP's CPU per reconnecting DP (ms, from listening to all back) and the simulators' CPU. The
//!   DPs reconnect with the real DP's jittered exponential back-off (`--reconnect-min-ms`,
//!   `--reconnect-max-ms`).
//! * `floor`: a bare loop writing `--bytes` (200) to each of `--sockets` loopback TCP sockets,
//!   no TLS, no framing: the floor fan-out figures are compared with (`latency` runs it for
//!   min(N, 9,000) sockets before it starts the CP). With `--tls`, in the same run, the floor
//!   of the CP's work per DP per version on mTLS connections (`floor.rs`): encrypt and write a
//!   `--bytes` push to each, then read one `--report-bytes` (120) report from each through
//!   epoll; µs per connection, this thread's CPU and wall, min / median over `--reps`. One
//!   thread, no runtime, no WebSocket, no JSON. 9,000 connections hold 18,000 descriptors.
//! * `--quick`: any mode with 20 DPs (both dialects mixed), 20 writes; correctness only
//!   (`floor`: 200 sockets, and the TLS floor on 20 connections with or without `--tls`). The
//!   integration test `tests/it/fleetsim.rs` runs the same core in-process.
//!
//! Simulated deltaplane DPs refuse paged answers (`deltaplane.sync.v1` transfers): runs keep
//! the configuration to a few services, far below one frame.

mod floor;
mod sim;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::{Parser, Subcommand};
use deltaplane::net::tls::{ClusterTls, TlsSettings};
use tokio::sync::{mpsc, watch};

use sim::{Event, Mix, Pump, SimConfig};

#[derive(Parser)]
#[command(
    about = "Fleet simulator: simulated DPs (Kong or deltaplane dialect) against the \
                   real deltaplane-cp. Build first: cargo build --release --bins --examples"
)]
struct Cli {
    /// Directory holding deltaplane-cp [default: <target>/release]
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Keep the temp dir (CP log and database) and print its path
    #[arg(long, global = true)]
    keep: bool,
    /// Small and fast: 20 DPs, both dialects mixed, 20 writes; correctness only
    #[arg(long, global = true)]
    quick: bool,
    /// kong, deltaplane or mixed (alternating)
    #[arg(long, global = true, default_value = "mixed")]
    dialect: String,
    /// Simulated DPs per child process
    #[arg(long, global = true, default_value_t = 5000)]
    per_proc: u32,
    /// DPs per process in their first connect at once
    #[arg(long, global = true, default_value_t = 32)]
    ramp: usize,
    /// Services in the configuration (the writes rotate over them)
    #[arg(long, global = true, default_value_t = 4)]
    services: usize,
    /// Safety poll of every DP, seconds (Kong's and ours: 30)
    #[arg(long, global = true, default_value_t = 30)]
    poll_secs: u64,
    /// deltaplane DPs report pushed versions at most this often, as the real DP's
    /// `--status-report-interval` (its default, 1 s; 0: after every apply)
    #[arg(long, global = true, default_value_t = 1000)]
    status_interval_ms: u64,
    #[arg(long, global = true, default_value_t = 500)]
    reconnect_min_ms: u64,
    #[arg(long, global = true, default_value_t = 30_000)]
    reconnect_max_ms: u64,
    /// Give up waiting for the fleet after this long (plus 1 s per 50 DPs)
    #[arg(long, global = true, default_value_t = 120)]
    timeout_secs: u64,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// Sequential writes → first / median / last DP applied; CP CPU per DP per version.
    Latency {
        #[arg(long, default_value_t = 1000)]
        dps: u32,
        #[arg(long, default_value_t = 100)]
        writes: usize,
        /// Writes per second at most (each waits for the previous one's answer)
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
    },
    /// CP RSS at each number of idle connected DPs.
    Idle {
        #[arg(long, value_delimiter = ',', default_value = "0,1000,5000,10000")]
        counts: Vec<u32>,
        /// Quiet time before each RSS reading
        #[arg(long, default_value_t = 3000)]
        settle_ms: u64,
    },
    /// Kill and restart the CP under N connected DPs.
    Storm {
        #[arg(long, default_value_t = 5000)]
        dps: u32,
        /// kill (SIGKILL) or term (SIGTERM, graceful)
        #[arg(long, default_value = "kill")]
        signal: String,
    },
    /// Bare loop writing --bytes to --sockets loopback sockets; with --tls, also the CP's
    /// push and report work on as many mTLS connections.
    Floor {
        #[arg(long, default_value_t = 9000)]
        sockets: usize,
        #[arg(long, default_value_t = 200)]
        bytes: usize,
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Also the TLS floor: push --bytes over mTLS to each connection, read one
        /// --report-bytes report from each through epoll
        #[arg(long)]
        tls: bool,
        /// The plaintext size of each DP's status report (--tls)
        #[arg(long, default_value_t = 120)]
        report_bytes: usize,
    },
}

/// A child's arguments (`fleetsim --role sims ...`).
#[derive(Parser)]
struct SimsArgs {
    #[arg(long)]
    first: u32,
    #[arg(long)]
    count: u32,
    #[arg(long)]
    dialect: String,
    #[arg(long)]
    cluster: String,
    #[arg(long)]
    rpc: String,
    #[arg(long)]
    cert: String,
    #[arg(long)]
    key: String,
    #[arg(long)]
    poll_secs: u64,
    #[arg(long)]
    status_interval_ms: u64,
    #[arg(long)]
    ramp: usize,
    #[arg(long)]
    reconnect_min_ms: u64,
    #[arg(long)]
    reconnect_max_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let nofile = sim::raise_nofile();
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--role") {
        ensure!(
            args.get(2).map(String::as_str) == Some("sims"),
            "--role: only `sims`"
        );
        let rest = std::iter::once(args[0].clone()).chain(args[3..].iter().cloned());
        return run_sims(SimsArgs::parse_from(rest));
    }
    let cli = Cli::parse();
    if let Mode::Floor {
        sockets,
        bytes,
        reps,
        tls,
        report_bytes,
    } = cli.mode
    {
        // No runtime: the floors measure this one thread's work and nothing else.
        println!("load average at start: {}", loadavg());
        let res = run_floor(&cli, sockets, bytes, reps, tls, report_bytes, nofile);
        println!("load average at end: {}", loadavg());
        return res;
    }
    println!("open files: soft limit raised to {nofile} (per process)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    println!("load average at start: {}", loadavg());
    let res = rt.block_on(drive(cli));
    println!("load average at end: {}", loadavg());
    rt.shutdown_timeout(Duration::from_secs(2));
    res
}

async fn drive(cli: Cli) -> anyhow::Result<()> {
    let mix = Mix::parse(&cli.dialect).context("--dialect: kong, deltaplane or mixed")?;
    let mix = if cli.quick { Mix::Mixed } else { mix };
    match &cli.mode {
        Mode::Floor { .. } => bail!("floor runs without the runtime"),
        Mode::Latency { dps, writes, rate } => {
            let (n, writes, rate) = if cli.quick {
                (20, 20, 50.0)
            } else {
                (*dps, *writes, *rate)
            };
            latency(&cli, mix, n, writes, rate).await
        }
        Mode::Idle { counts, settle_ms } => {
            let counts = if cli.quick {
                vec![0, 10, 20]
            } else {
                counts.clone()
            };
            idle(&cli, mix, &counts, Duration::from_millis(*settle_ms)).await
        }
        Mode::Storm { dps, signal } => {
            let n = if cli.quick { 20 } else { *dps };
            let sig = match signal.as_str() {
                "kill" => libc::SIGKILL,
                "term" => libc::SIGTERM,
                _ => bail!("--signal: kill or term"),
            };
            storm(&cli, mix, n, sig).await
        }
    }
}

// === the child: simulated DPs ===

fn run_sims(a: SimsArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mix = Mix::parse(&a.dialect).context("--dialect")?;
        let tls = ClusterTls::load(&TlsSettings::shared(&a.cert, &a.key))?;
        let cfg = Arc::new(SimConfig {
            cluster: a.cluster.clone(),
            rpc_url: a.rpc.clone(),
            tls,
            poll: Duration::from_secs(a.poll_secs),
            reconnect_min: Duration::from_millis(a.reconnect_min_ms),
            reconnect_max: Duration::from_millis(a.reconnect_max_ms),
            timeout: Duration::from_secs(30),
            max_payload: 16 << 20,
            ramp: a.ramp,
            status_interval: Duration::from_millis(a.status_interval_ms),
        });
        let (tx, mut rx) = mpsc::unbounded_channel();
        let fleet = sim::spawn(cfg, a.first, a.count, mix, tx);
        let counters = fleet.counters.clone();
        // stdin: `stats` asks for the counters; `quit` or EOF ends the run. Plain threads:
        // the library's tokio has no stdio.
        let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<bool>();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "stats" => {
                        let _ = cmd_tx.send(true);
                    }
                    "quit" => break,
                    _ => {}
                }
            }
            let _ = cmd_tx.send(false);
        });
        let (line_tx, line_rx) = std::sync::mpsc::channel::<String>();
        let writer = std::thread::spawn(move || {
            use std::io::Write as _;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            while let Ok(line) = line_rx.recv() {
                let _ = out.write_all(line.as_bytes());
                while let Ok(line) = line_rx.try_recv() {
                    let _ = out.write_all(line.as_bytes());
                }
                if out.flush().is_err() {
                    return;
                }
            }
        });
        loop {
            tokio::select! {
                e = rx.recv() => {
                    let Some(e) = e else { break };
                    let _ = line_tx.send(format!("{}\n", e.to_line()));
                }
                c = cmd_rx.recv() => {
                    if c == Some(true) {
                        // Events before the counters, so the driver has seen what they count.
                        while let Ok(e) = rx.try_recv() {
                            let _ = line_tx.send(format!("{}\n", e.to_line()));
                        }
                        let _ = line_tx.send(format!("N 0 {}\n", counters.to_line()));
                    } else {
                        break;
                    }
                }
            }
        }
        fleet.shutdown().await;
        drop(line_tx);
        let _ = writer.join();
        Ok(())
    })
}

/// One child process of simulated DPs, seen from the driver.
struct SimProc {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    pid: u32,
    /// (replies so far, the last counters).
    stats: watch::Receiver<(u64, [u64; 14])>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl SimProc {
    async fn counters(&mut self) -> anyhow::Result<[u64; 14]> {
        use std::io::Write as _;
        let seen = self.stats.borrow().0;
        self.stdin.write_all(b"stats\n")?;
        self.stdin.flush()?;
        let r = tokio::time::timeout(
            Duration::from_secs(30),
            self.stats.wait_for(|(n, _)| *n > seen),
        )
        .await
        .context("no stats from a sims process")??;
        Ok(r.1)
    }

    async fn quit(mut self) {
        use std::io::Write as _;
        let _ = self.stdin.write_all(b"quit\n");
        let _ = self.stdin.flush();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for SimProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

// === the world: a CP process, sims processes, a temp dir ===

struct World {
    cli_keep: bool,
    cp_bin: PathBuf,
    tmp: tempfile::TempDir,
    http: reqwest::Client,
    admin_port: u16,
    cluster_port: u16,
    cp: Option<std::process::Child>,
    sims: Vec<SimProc>,
    events: mpsc::UnboundedSender<Event>,
    /// Simulated DPs spawned so far (the next global index).
    n_dps: u32,
    sims_args: Vec<String>,
    mix: Mix,
    per_proc: u32,
}

impl World {
    async fn new(cli: &Cli, mix: Mix) -> anyhow::Result<(World, Pump)> {
        let dir = match &cli.bin_dir {
            Some(d) => d.clone(),
            None => {
                // <target>/release/examples/fleetsim → <target>/release
                let exe = std::env::current_exe()?;
                match exe.ancestors().nth(2) {
                    Some(d) if d.join("deltaplane-cp").is_file() => d.to_path_buf(),
                    _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release"),
                }
            }
        };
        let cp_bin = dir.join("deltaplane-cp");
        ensure!(
            cp_bin.is_file(),
            "{} is missing: build with `cargo build --release --bins --examples` (or pass \
             --bin-dir)",
            cp_bin.display()
        );
        let tmp = tempfile::Builder::new()
            .prefix("fleetsim-")
            .disable_cleanup(cli.keep)
            .tempdir()?;
        if cli.keep {
            println!("(--keep) CP log and data in {}", tmp.path().display());
        }
        let ports = free_ports(2)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let sims_args = vec![
            "--poll-secs".into(),
            cli.poll_secs.to_string(),
            "--status-interval-ms".into(),
            cli.status_interval_ms.to_string(),
            "--ramp".into(),
            cli.ramp.to_string(),
            "--reconnect-min-ms".into(),
            cli.reconnect_min_ms.to_string(),
            "--reconnect-max-ms".into(),
            cli.reconnect_max_ms.to_string(),
        ];
        Ok((
            World {
                cli_keep: cli.keep,
                cp_bin,
                tmp,
                http: reqwest::Client::builder().tcp_nodelay(true).build()?,
                admin_port: ports[0],
                cluster_port: ports[1],
                cp: None,
                sims: Vec::new(),
                events: tx,
                n_dps: 0,
                sims_args,
                mix,
                per_proc: cli.per_proc.max(1),
            },
            Pump::new(rx, 0),
        ))
    }

    fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    fn rpc(&self) -> String {
        format!("{}/rpc", self.admin())
    }

    fn cp_dir(&self) -> PathBuf {
        self.tmp.path().join("cp")
    }

    fn cp_pid(&self) -> anyhow::Result<u32> {
        Ok(self.cp.as_ref().context("no CP running")?.id())
    }

    /// Starts the CP (same data dir and ports every time) and waits until its Admin API
    /// answers; returns `mono_ns` then.
    async fn start_cp(&mut self) -> anyhow::Result<u64> {
        let dir = self.cp_dir();
        std::fs::create_dir_all(&dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("cp.log"))?;
        let mut cmd = std::process::Command::new(&self.cp_bin);
        cmd.args(["serve", "--data-dir"])
            .arg(&dir)
            .args(["--admin-listen", &format!("127.0.0.1:{}", self.admin_port)])
            .args([
                "--cluster-listen",
                &format!("127.0.0.1:{}", self.cluster_port),
            ])
            .args(["--sqlite-synchronous", "full"]);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("DELTAPLANE_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawning deltaplane-cp")?;
        self.cp = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(cp) = self.cp.as_mut()
                && let Some(status) = cp.try_wait()?
            {
                bail!("the CP exited ({status}); see {}", self.log_tail());
            }
            let ready = dir.join("cluster.crt").exists()
                && matches!(
                    self.http.get(format!("{}/status", self.admin())).send().await,
                    Ok(r) if r.status().is_success()
                );
            if ready {
                return Ok(sim::mono_ns());
            }
            ensure!(Instant::now() < deadline, "the CP did not start in 60 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn kill_cp(&mut self, sig: i32) -> anyhow::Result<()> {
        let mut cp = self.cp.take().context("no CP")?;
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(cp.id() as i32, sig) };
        cp.wait()?;
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.tmp.path().join("cp.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(15).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// Adds `count` simulated DPs, in child processes of at most `per_proc` each.
    async fn add_dps(&mut self, pump: &mut Pump, count: u32) -> anyhow::Result<()> {
        let mut left = count;
        while left > 0 {
            let n = left.min(self.per_proc);
            self.spawn_sims(self.n_dps, n).await?;
            self.n_dps += n;
            left -= n;
        }
        pump.tracker.grow(self.n_dps as usize);
        Ok(())
    }

    async fn spawn_sims(&mut self, first: u32, count: u32) -> anyhow::Result<()> {
        let exe = std::env::current_exe()?;
        let dir = self.cp_dir();
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["--role", "sims"])
            .args(["--first", &first.to_string()])
            .args(["--count", &count.to_string()])
            .args(["--dialect", self.mix.name()])
            .args(["--cluster", &format!("127.0.0.1:{}", self.cluster_port)])
            .args(["--rpc", &self.rpc()])
            .arg("--cert")
            .arg(dir.join("cluster.crt"))
            .arg("--key")
            .arg(dir.join("cluster.key"))
            .args(&self.sims_args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().context("spawning a sims process")?;
        let pid = child.id();
        let stdin = child.stdin.take().context("sims stdin")?;
        let stdout = child.stdout.take().context("sims stdout")?;
        let (stats_tx, stats) = watch::channel((0u64, [0u64; 14]));
        let events = self.events.clone();
        let reader = std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("N 0 ") {
                    let c = sim::Counters::parse_line(rest);
                    stats_tx.send_modify(|(n, v)| {
                        *n += 1;
                        *v = c;
                    });
                } else if let Some(e) = Event::from_line(&line) {
                    let _ = events.send(e);
                }
            }
        });
        self.sims.push(SimProc {
            child,
            stdin,
            pid,
            stats,
            reader: Some(reader),
        });
        Ok(())
    }

    /// Counters summed over every sims process.
    async fn counters(&mut self) -> anyhow::Result<[u64; 14]> {
        let mut sum = [0u64; 14];
        for s in &mut self.sims {
            for (acc, v) in sum.iter_mut().zip(s.counters().await?) {
                *acc += v;
            }
        }
        Ok(sum)
    }

    fn sims_cpu(&self) -> f64 {
        self.sims.iter().map(|s| proc_cpu_secs(s.pid)).sum()
    }

    /// The simulators' RSS, summed, in MiB.
    fn sims_rss_mib(&self) -> f64 {
        let kib: u64 = self.sims.iter().map(|s| rss_kib(s.pid).unwrap_or(0)).sum();
        kib as f64 / 1024.0
    }

    async fn finish(mut self) {
        for s in std::mem::take(&mut self.sims) {
            s.quit().await;
        }
        if let Some(mut cp) = self.cp.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(cp.id() as i32, libc::SIGTERM) };
            let _ = cp.wait();
        }
        if self.cli_keep {
            println!("kept {}", self.tmp.path().display());
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(cp) = self.cp.as_mut() {
            let _ = cp.kill();
            let _ = cp.wait();
        }
    }
}

/// Time budget for the fleet to get somewhere.
fn budget(cli: &Cli, n: u32) -> Duration {
    Duration::from_secs(cli.timeout_secs + n as u64 / 50)
}

fn counter(c: &[u64; 14], name: &str) -> u64 {
    sim::COUNTER_NAMES
        .iter()
        .position(|n| *n == name)
        .map_or(0, |i| c[i])
}

fn print_counters(c: &[u64; 14]) {
    let pairs: Vec<String> = sim::COUNTER_NAMES
        .iter()
        .zip(c)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    println!("sim counters: {}", pairs.join(", "));
}

/// Runs the gate against the CP's head; an error names what failed.
async fn gate(world: &mut World, pump: &mut Pump) -> anyhow::Result<i64> {
    let (head, hash) = sim::cp_head(&world.rpc())
        .await
        .map_err(anyhow::Error::msg)?;
    // Anything still on its way (late notifications, say) counts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = world.counters().await?;
    pump.drain();
    match pump.tracker.gate(head) {
        Ok(()) => {
            println!(
                "GATE OK: all {} DPs at head {head} with the CP's state hash {}…, no violation",
                pump.tracker.dps.len(),
                &hash.to_hex()[..16]
            );
            Ok(head)
        }
        Err(e) => bail!("{e}"),
    }
}

// === mode: latency ===

async fn latency(cli: &Cli, mix: Mix, n: u32, writes: usize, rate: f64) -> anyhow::Result<()> {
    ensure!(n >= 1 && writes >= 1, "--dps and --writes ≥ 1");
    let floor_n = (n as usize).min(9000);
    let fl = floor::plain(floor_n, 200, 7)?.wall_ms();
    println!(
        "floor: {floor_n} loopback sockets × 200 B: min {:.2} ms, median {:.2} ms",
        fl.min, fl.median
    );
    let (mut world, mut pump) = World::new(cli, mix).await?;
    world.start_cp().await?;
    let ids = sim::seed(&world.http, &world.admin(), cli.services)
        .await
        .map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    world.add_dps(&mut pump, n).await?;
    let (h0, _) = sim::cp_head(&world.rpc())
        .await
        .map_err(anyhow::Error::msg)?;
    pump.until(budget(cli, n), "every DP at the head", |t| t.all_at(h0))
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "{n} DPs ({}) connected and at version {h0} in {:.1} s; CP RSS {}",
        mix.name(),
        t.elapsed().as_secs_f64(),
        rss_mib(world.cp_pid()?)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    pump.drain();
    pump.tracker.record = true;
    let c0 = world.counters().await?;
    let fan0 = fan_out_histogram(&world.http, &world.admin()).await;
    let cp_pid = world.cp_pid()?;
    let (cp0, sims0, self0) = (proc_cpu_secs(cp_pid), world.sims_cpu(), self_cpu_secs());
    let drops0 = floor::backlog_drops();
    let wall0 = Instant::now();

    let http = world.http.clone();
    let admin = world.admin();
    let writer =
        tokio::spawn(async move { sim::write_paced(&http, &admin, &ids, writes, rate).await });
    while !writer.is_finished() {
        if let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(20), pump.rx.recv()).await {
            pump.tracker.on(e);
        }
    }
    let t0s = writer.await?.map_err(anyhow::Error::msg)?;
    let head = h0 + writes as i64;
    pump.until(budget(cli, n), "every DP at the last write", |t| {
        t.all_at(head)
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let wall = wall0.elapsed().as_secs_f64();
    let (cp1, sims1, self1) = (proc_cpu_secs(cp_pid), world.sims_cpu(), self_cpu_secs());
    let drops = floor::backlog_drops().saturating_sub(drops0);
    let c1 = world.counters().await?;

    let mut first = Vec::new();
    let mut median = Vec::new();
    let mut last = Vec::new();
    for (i, t0) in t0s.iter().enumerate() {
        let v = h0 + 1 + i as i64;
        let mut ts: Vec<u64> = pump
            .tracker
            .reached(v)
            .into_iter()
            .map(|t| {
                t.context("a DP never applied a version")
                    .map(|t| t.saturating_sub(*t0))
            })
            .collect::<anyhow::Result<_>>()?;
        ts.sort_unstable();
        first.push(ts[0]);
        median.push(ts[(ts.len() - 1) / 2]);
        last.push(ts[ts.len() - 1]);
    }
    let dv = (n as f64) * writes as f64;
    println!();
    println!(
        "### latency: {n} DPs ({}), {writes} writes at ≤ {rate}/s, durable CP (SQLite FULL), mTLS",
        mix.name()
    );
    println!();
    println!("| write → applied on | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, xs) in [
        ("first DP", &first),
        ("median DP", &median),
        ("last DP", &last),
    ] {
        let s = stat_ms(xs);
        println!("| {name} | {:.2} | {:.2} | {:.2} |", s.0, s.1, s.2);
    }
    println!();
    let cp_cpu = cp1 - cp0;
    println!(
        "CP CPU: {:.2} s over {wall:.1} s ({:.0}% of one core): {:.1} µs per DP per version, \
         {:.2} ms per version",
        cp_cpu,
        100.0 * cp_cpu / wall,
        cp_cpu * 1e6 / dv,
        cp_cpu * 1e3 / writes as f64
    );
    println!(
        "simulators' CPU: {:.2} s ({:.1} µs per DP per version); driver CPU {:.2} s",
        sims1 - sims0,
        (sims1 - sims0) * 1e6 / dv,
        self1 - self0
    );
    // Segments dropped here are resent by TCP later: the DPs that lost one see the version
    // late, and the CP pays the resend (see floor.rs).
    println!("loopback backlog drops during the writes: {drops} (/proc/net/softnet_stat)");
    let s_last = stat_ms(&last);
    println!(
        "write → last DP p50 / floor({floor_n}) median: {:.1}×",
        s_last.0 / fl.median
    );
    let fan1 = fan_out_histogram(&world.http, &world.admin()).await;
    if let (Some(a), Some(b)) = (fan0, fan1) {
        print_fan_out(&a, &b, fl.median);
    }
    let d: Vec<u64> = c1.iter().zip(c0).map(|(a, b)| a - b).collect();
    let d: [u64; 14] = d.try_into().unwrap_or([0; 14]);
    print_counters(&d);
    let (kong, dp) = dialect_counts(mix, 0, n);
    if kong > 0 {
        println!(
            "notifications per DP per version (all DPs): {:.3}; pushes applied per \
             deltaplane DP per version: {:.3}",
            counter(&d, "notify") as f64 / dv,
            if dp > 0 {
                counter(&d, "push_applied") as f64 / (dp as f64 * writes as f64)
            } else {
                0.0
            }
        );
    } else {
        println!(
            "pushes applied per DP per version: {:.3}; get_delta calls per DP per version: {:.3}",
            counter(&d, "push_applied") as f64 / dv,
            counter(&d, "get_delta") as f64 / dv
        );
    }
    gate(&mut world, &mut pump).await?;
    world.finish().await;
    Ok(())
}

/// (Kong DPs, deltaplane DPs) among `first..first + n`.
fn dialect_counts(mix: Mix, first: u32, n: u32) -> (u32, u32) {
    (first..first + n).fold((0, 0), |(k, d), i| match mix.dialect_of(i) {
        sim::Dialect::Kong => (k + 1, d),
        sim::Dialect::Deltaplane => (k, d + 1),
    })
}

// === mode: idle ===

async fn idle(cli: &Cli, mix: Mix, counts: &[u32], settle: Duration) -> anyhow::Result<()> {
    let mut counts = counts.to_vec();
    counts.sort_unstable();
    counts.dedup();
    let (mut world, mut pump) = World::new(cli, mix).await?;
    world.start_cp().await?;
    let ids = sim::seed(&world.http, &world.admin(), cli.services)
        .await
        .map_err(anyhow::Error::msg)?;
    let cp_pid = world.cp_pid()?;
    let mut rows: Vec<(u32, u64)> = Vec::new();
    let mut write_no = 0usize;
    for &target in &counts {
        if target > world.n_dps {
            let t = Instant::now();
            let add = target - world.n_dps;
            world.add_dps(&mut pump, add).await?;
            let (h, _) = sim::cp_head(&world.rpc())
                .await
                .map_err(anyhow::Error::msg)?;
            pump.until(budget(cli, target), "every DP at the head", |t| t.all_at(h))
                .await
                .map_err(anyhow::Error::msg)?;
            // One notification (or push) for everybody.
            sim::write_one(&world.http, &world.admin(), &ids, write_no)
                .await
                .map_err(anyhow::Error::msg)?;
            write_no += 1;
            let h = h + 1;
            pump.until(budget(cli, target), "every DP at the write", |t| {
                t.all_at(h)
            })
            .await
            .map_err(anyhow::Error::msg)?;
            println!(
                "{target} DPs connected, synced, notified once ({:.1} s)",
                t.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(settle).await;
        pump.drain();
        let rss = rss_kib(cp_pid)?;
        rows.push((target, rss));
    }
    println!();
    println!(
        "### idle: CP RSS by connected DPs ({}), after hello + first get_delta + one \
         notification, settle {settle:?}",
        mix.name()
    );
    println!();
    println!("| DPs | CP RSS MiB | ΔRSS/ΔN KiB vs previous | vs first |");
    println!("|---|---|---|---|");
    for (i, (n, rss)) in rows.iter().enumerate() {
        let per = |j: usize| {
            let (n0, r0) = rows[j];
            if *n > n0 {
                format!("{:.1}", (*rss as f64 - r0 as f64) / (*n - n0) as f64)
            } else {
                "-".into()
            }
        };
        println!(
            "| {n} | {:.1} | {} | {} |",
            *rss as f64 / 1024.0,
            if i > 0 { per(i - 1) } else { "-".into() },
            per(0)
        );
    }
    println!();
    let c = world.counters().await?;
    print_counters(&c);
    println!(
        "simulators' CPU: {:.2} s; their RSS {:.1} MiB ({:.1} KiB per simulated DP)",
        world.sims_cpu(),
        world.sims_rss_mib(),
        world.sims_rss_mib() * 1024.0 / f64::from(world.n_dps.max(1))
    );
    gate(&mut world, &mut pump).await?;
    world.finish().await;
    Ok(())
}

// === mode: storm ===

async fn storm(cli: &Cli, mix: Mix, n: u32, sig: i32) -> anyhow::Result<()> {
    let (mut world, mut pump) = World::new(cli, mix).await?;
    world.start_cp().await?;
    sim::seed(&world.http, &world.admin(), cli.services)
        .await
        .map_err(anyhow::Error::msg)?;
    let t = Instant::now();
    world.add_dps(&mut pump, n).await?;
    let (head, _) = sim::cp_head(&world.rpc())
        .await
        .map_err(anyhow::Error::msg)?;
    pump.until(budget(cli, n), "every DP at the head", |t| t.all_at(head))
        .await
        .map_err(anyhow::Error::msg)?;
    println!(
        "{n} DPs ({}) connected and at version {head} in {:.1} s",
        mix.name(),
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    pump.drain();
    let c0 = world.counters().await?;
    let full0 = pump.tracker.full_syncs();
    let sims0 = world.sims_cpu();
    world.kill_cp(sig)?;
    let t_listen = world.start_cp().await?;
    let cp_pid = world.cp_pid()?;
    let cp0 = proc_cpu_secs(cp_pid);
    let sims_at_listen = world.sims_cpu();
    pump.until(budget(cli, n), "every DP back at the head", |t| {
        t.dps
            .iter()
            .all(|d| d.connected && d.synced_at > t_listen && d.version == head && d.ok)
    })
    .await
    .map_err(anyhow::Error::msg)?;
    let t_all = pump
        .tracker
        .dps
        .iter()
        .map(|d| d.synced_at)
        .max()
        .unwrap_or(t_listen);
    let cp1 = proc_cpu_secs(cp_pid);
    let sims1 = world.sims_cpu();
    let c1 = world.counters().await?;
    let d: Vec<u64> = c1.iter().zip(c0).map(|(a, b)| a - b).collect();
    let d: [u64; 14] = d.try_into().unwrap_or([0; 14]);
    let mut back: Vec<u64> = pump
        .tracker
        .dps
        .iter()
        .map(|d| d.synced_at.saturating_sub(t_listen))
        .collect();
    back.sort_unstable();
    println!();
    println!(
        "### storm: CP {} and restarted under {n} DPs ({}), clock from the new CP's first \
         answer",
        if sig == libc::SIGKILL {
            "SIGKILLed"
        } else {
            "stopped (SIGTERM)"
        },
        mix.name()
    );
    println!();
    println!(
        "all back at the head in {:.2} s (median DP {:.2} s); full syncs {}; CP CPU {:.2} s = \
         {:.2} ms per reconnecting DP; simulators' CPU {:.2} s ({:.2} ms per DP; {:.2} s \
         before the CP listened)",
        (t_all - t_listen) as f64 / 1e9,
        back[(back.len() - 1) / 2] as f64 / 1e9,
        pump.tracker.full_syncs() - full0,
        cp1 - cp0,
        (cp1 - cp0) * 1e3 / n as f64,
        sims1 - sims0,
        (sims1 - sims_at_listen) * 1e3 / n as f64,
        sims_at_listen - sims0,
    );
    print_counters(&d);
    gate(&mut world, &mut pump).await?;
    world.finish().await;
    Ok(())
}

// === mode: floor ===

/// `floor`: the plain loop and, with `tls` (always in `--quick`, on 20 connections), the TLS
/// floor after it in the same run, so that the two compare.
fn run_floor(
    cli: &Cli,
    sockets: usize,
    bytes: usize,
    reps: usize,
    tls: bool,
    report_bytes: usize,
    nofile: u64,
) -> anyhow::Result<()> {
    let n = if cli.quick { 200 } else { sockets };
    let plain = floor::plain(n, bytes, reps)?;
    let wall_ms = plain.wall_ms();
    println!(
        "floor: {n} loopback sockets × {bytes} B, bare write loop: min {:.2} ms, median {:.2} ms \
         over {reps} reps",
        wall_ms.min, wall_ms.median
    );
    println!(
        "floor: {n} sockets: bare write min/median {} µs per socket CPU (wall {} µs); loopback \
         backlog {}",
        plain.cpu_us_per(n),
        plain.wall_us_per(n),
        plain.drops()
    );
    if !tls && !cli.quick {
        return Ok(());
    }
    let n = if cli.quick { 20 } else { sockets };
    // Both ends of every connection, the listener, the epoll instance, stdio.
    let fds = 2 * n as u64 + 16;
    ensure!(
        fds <= nofile,
        "floor --tls: {n} connections need about {fds} open files; the soft limit is {nofile} \
         (raised to the hard limit)"
    );
    println!("open files: soft limit raised to {nofile}");
    let t = floor::tls(n, bytes, report_bytes, reps)?;
    println!(
        "floor --tls: {}, mutual, the CP's TLS configuration and generated P-256 certificate; \
         push {bytes} B plaintext = {} B on the wire, report {report_bytes} B plaintext; {reps} \
         reps",
        t.negotiated, t.push_wire_bytes
    );
    println!(
        "floor --tls: {n} connections: push (TLS write) min/median {} µs per connection CPU, \
         report (epoll + TLS read) {} µs CPU ({} epoll_wait calls), sum {} µs CPU; wall: push \
         {}, report {}, sum {} µs; loopback backlog: push {}, report {}",
        t.push.cpu_us_per(n),
        t.report.cpu_us_per(n),
        t.epoll_waits,
        t.sum.cpu_us_per(n),
        t.push.wall_us_per(n),
        t.report.wall_us_per(n),
        t.sum.wall_us_per(n),
        t.push.drops(),
        t.report.drops(),
    );
    Ok(())
}

// === /proc, ports, statistics ===

/// Nearest-rank p50 / p99 / max of nanosecond samples, in milliseconds.
fn stat_ms(ns: &[u64]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = ns.iter().map(|&x| x as f64 / 1e6).collect();
    ms.sort_by(f64::total_cmp);
    if ms.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    let rank = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    (rank(0.5), rank(0.99), rank(1.0))
}

/// utime + stime of a process, in seconds (`/proc/<pid>/stat`); 0 when it is gone.
fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name is in parentheses and may hold spaces: count fields after it.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are 12 and 13 after the name and state.
    let ticks: u64 = f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

fn self_cpu_secs() -> f64 {
    proc_cpu_secs(std::process::id())
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}

fn rss_mib(pid: u32) -> String {
    match rss_kib(pid) {
        Ok(k) => format!("{:.1} MiB", k as f64 / 1024.0),
        Err(e) => format!("unknown ({e})"),
    }
}

/// Free loopback ports: all bound at once (so they are distinct), then released.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unavailable ({e})"))
}

/// The CP's `deltaplane_fan_out_written_seconds` histogram (cumulative buckets `(le, count)`,
/// sum, count) from its `/metrics`; `None` when it cannot be read.
async fn fan_out_histogram(
    http: &reqwest::Client,
    admin: &str,
) -> Option<(Vec<(f64, f64)>, f64, f64)> {
    let text = http
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let name = "deltaplane_fan_out_written_seconds";
    let mut buckets = Vec::new();
    let (mut sum, mut count) = (0.0, 0.0);
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        if let Some(rest) = series.strip_prefix(&format!("{name}_bucket{{le=\"")) {
            let le = rest.trim_end_matches("\"}");
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            buckets.push((le, value));
        } else if series == format!("{name}_sum") {
            sum = value;
        } else if series == format!("{name}_count") {
            count = value;
        }
    }
    (!buckets.is_empty()).then_some((buckets, sum, count))
}

/// Commit seen → last frame written, for the versions of this run (the difference of two
/// scrapes): mean, and p50 / p99 as the histogram bucket bounds they fall under.
fn print_fan_out(a: &(Vec<(f64, f64)>, f64, f64), b: &(Vec<(f64, f64)>, f64, f64), floor_ms: f64) {
    let n = b.2 - a.2;
    if n <= 0.0 {
        return;
    }
    let mean_ms = (b.1 - a.1) / n * 1e3;
    let bound = |q: f64| {
        b.0.iter()
            .zip(&a.0)
            .find(|((_, cb), (_, ca))| cb - ca >= q * n)
            .map_or(f64::INFINITY, |((le, _), _)| le * 1e3)
    };
    println!(
        "CP: head seen → last push/notification written to its socket, {n:.0} versions: mean \
         {mean_ms:.1} ms ({:.1}× the floor's median), p50 ≤ {} ms, p99 ≤ {} ms (histogram buckets)",
        mean_ms / floor_ms,
        bound(0.5),
        bound(0.99)
    );
}
