//! The load side of `proxybench`: a fixed-body upstream, a closed-loop generator (capacity)
//! and an open-loop fixed-rate generator (latency, with coordinated omission counted).
//!
//! Both generators speak HTTP/1.1 over `K` keep-alive connections, one hyper client
//! connection each (no pool, no retries). A request that fails (transport error, timeout or a
//! status other than 200) is counted as failed and its connection is reopened.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, mpsc};

/// The upstream's answer: 100 bytes, always the same.
pub const BODY: &[u8; 100] =
    b"proxybench upstream: a fixed body of exactly one hundred bytes, the same for every request!!!!!!!!!\n";

/// How long one request may take before it counts as failed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections the upstream has accepted so far (a proxy that does not keep its upstream
/// connections alive shows here).
pub static UPSTREAM_ACCEPTED: AtomicU64 = AtomicU64::new(0);

/// Starts the upstream on a free loopback port: every request gets `200` and [`BODY`].
/// It runs on the caller's runtime until the process exits.
pub async fn start_upstream() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let _ = tcp.set_nodelay(true);
            UPSTREAM_ACCEPTED.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    let mut res = Response::new(Full::new(Bytes::from_static(BODY)));
                    res.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/plain"),
                    );
                    Ok::<_, Infallible>(res)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Where a generator sends its requests: `GET http://addr{path}`.
#[derive(Clone, Debug)]
pub struct Target {
    /// The listener (the proxy under test, or the upstream itself).
    pub addr: SocketAddr,
    /// The request path, e.g. `/bench`.
    pub path: String,
}

/// One keep-alive client connection to a target.
pub struct Conn {
    target: Target,
    host: header::HeaderValue,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    /// A connection to `target`, opened on first use.
    pub fn new(target: &Target) -> Conn {
        Conn {
            host: header::HeaderValue::from_str(&target.addr.to_string())
                .expect("a socket address is a valid header value"),
            target: target.clone(),
            sender: None,
        }
    }

    async fn open(&mut self) -> anyhow::Result<&mut SendRequest<Empty<Bytes>>> {
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = TcpStream::connect(self.target.addr).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.sender = Some(sender);
        }
        Ok(self.sender.as_mut().expect("opened above"))
    }

    /// Sends `GET path` and reads the whole answer; returns its status. On any error the
    /// connection is dropped (the next call reopens it).
    pub async fn get(&mut self, path: &str) -> anyhow::Result<StatusCode> {
        let res = tokio::time::timeout(REQUEST_TIMEOUT, self.get_inner(path)).await;
        match res {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => {
                self.sender = None;
                Err(e)
            }
            Err(_) => {
                self.sender = None;
                anyhow::bail!("no answer in {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn get_inner(&mut self, path: &str) -> anyhow::Result<StatusCode> {
        let host = self.host.clone();
        let sender = self.open().await?;
        sender.ready().await?;
        let req = Request::get(path)
            .header(header::HOST, host)
            .body(Empty::new())?;
        let res = sender.send_request(req).await?;
        let status = res.status();
        res.into_body().collect().await?;
        Ok(status)
    }

    /// `GET` of the target's own path; a status other than 200 is an error.
    pub async fn get_ok(&mut self) -> anyhow::Result<()> {
        let path = self.target.path.clone();
        let status = self.get(&path).await?;
        anyhow::ensure!(status == StatusCode::OK, "status {status}");
        Ok(())
    }
}

/// What a closed-loop run measured.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// Requests answered 200 in the measured window.
    pub ok: u64,
    /// Requests that failed in the measured window.
    pub failed: u64,
    /// The measured window's length.
    pub secs: f64,
}

impl Capacity {
    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

/// Closed loop: `conns` connections, each sending its next request as soon as the previous
/// answer is read, for `secs` seconds after a short unmeasured warm-up. `window` is called
/// at the start and at the end of the measured window (to read CPU counters).
pub async fn closed_loop(
    target: &Target,
    conns: usize,
    warmup: Duration,
    dur: Duration,
    mut window: impl FnMut(),
) -> anyhow::Result<Capacity> {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = Conn::new(target);
        let (ok, failed, measuring, stop) =
            (ok.clone(), failed.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let res = conn.get_ok().await;
                if measuring.load(Ordering::Relaxed) {
                    match res {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    window();
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    measuring.store(false, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    window();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.context("a closed-loop worker panicked")?;
    }
    Ok(Capacity {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        secs,
    })
}

/// What an open-loop run measured, over its measured window only.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// Latency of each successful request, from its intended send time to its full answer.
    pub latencies: Vec<Duration>,
    /// Requests answered 200.
    pub ok: u64,
    /// Requests that failed (transport error, timeout, status other than 200).
    pub failed: u64,
    /// The first few failures, as text.
    pub errors: Vec<String>,
    /// Requests scheduled in the measured window.
    pub scheduled: u64,
    /// The measured window's length (summed when runs are merged).
    pub secs: f64,
    /// CPU-seconds this harness (generator, upstream, pacing) used in the window: near
    /// `secs`, the harness's own queueing is in the latencies.
    pub harness_cpu: f64,
}

impl OpenLoop {
    /// Adds `other`'s samples and counts to these (pooling runs).
    pub fn merge(&mut self, other: OpenLoop) {
        self.latencies.extend(other.latencies);
        self.ok += other.ok;
        self.failed += other.failed;
        self.scheduled += other.scheduled;
        self.secs += other.secs;
        self.harness_cpu += other.harness_cpu;
        for e in other.errors {
            if self.errors.len() < 5 {
                self.errors.push(e);
            }
        }
    }
}

/// Open loop at a fixed rate: a pacing thread schedules request `i` at `start + i / rate`
/// (woken by `nanosleep` with a 1 ns timer slack, not tokio's millisecond timer) and hands
/// its intended send time to whichever of the `conns` connections is free. Latency is
/// measured from the intended send time, so time spent waiting for a free connection (a
/// slow proxy stalling the generator) is counted, not omitted. Requests scheduled during
/// `warmup` are sent but not recorded; `window` is called at the start and the end of the
/// measured window. `during` runs concurrently with the measured window (churn) and its
/// result is returned.
pub async fn open_loop<F, T>(
    target: &Target,
    conns: usize,
    rate: f64,
    warmup: Duration,
    dur: Duration,
    mut window: impl FnMut(),
    during: F,
) -> anyhow::Result<(OpenLoop, T)>
where
    F: Future<Output = T>,
{
    anyhow::ensure!(rate > 0.0, "the rate must be positive");
    let interval = Duration::from_secs_f64(1.0 / rate);
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + warmup;
    let end = measure_from + dur;
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || pace(tx, start, interval, end))?;
    let rx = Arc::new(Mutex::new(rx));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(Instant, Result<Duration, String>)>();
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut conn = Conn::new(target);
        let rx = rx.clone();
        let done = done_tx.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(intended) = next else { break };
                let res = conn.get_ok().await;
                let res = match res {
                    Ok(()) => Ok(intended.elapsed()),
                    Err(e) => Err(format!("{e:#}")),
                };
                if done.send((intended, res)).is_err() {
                    break;
                }
            }
        }));
    }
    drop(done_tx);
    let collect = async move {
        let mut out = OpenLoop {
            latencies: Vec::with_capacity((rate * dur.as_secs_f64()) as usize + 16),
            ok: 0,
            failed: 0,
            errors: Vec::new(),
            scheduled: 0,
            secs: dur.as_secs_f64(),
            harness_cpu: 0.0,
        };
        while let Some((intended, res)) = done_rx.recv().await {
            if intended < measure_from || intended >= end {
                continue;
            }
            out.scheduled += 1;
            match res {
                Ok(lat) => {
                    out.ok += 1;
                    out.latencies.push(lat);
                }
                Err(e) => {
                    out.failed += 1;
                    if out.errors.len() < 5 {
                        out.errors.push(e);
                    }
                }
            }
        }
        out
    };
    let collector = tokio::spawn(collect);
    let harness = || crate::cpu_secs(std::process::id()).unwrap_or(f64::NAN);
    tokio::time::sleep_until(measure_from.into()).await;
    window();
    let harness_start = harness();
    let during = during.await;
    tokio::time::sleep_until(end.into()).await;
    window();
    let harness_cpu = harness() - harness_start;
    pacer
        .join()
        .map_err(|_| anyhow::anyhow!("the pacing thread panicked"))?;
    for t in tasks {
        t.await.context("an open-loop worker panicked")?;
    }
    let mut out = collector.await.context("the collector panicked")?;
    out.harness_cpu = harness_cpu;
    Ok((out, during))
}

/// Puts the calling thread (and the threads and processes it creates after) under
/// SCHED_FIFO at `priority`.
pub fn set_fifo(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param that outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the harness runs under SCHED_FIFO (`--realtime`): the pacing thread then takes
/// a priority above the runtime's thread, so that it is not queued behind it.
pub static REALTIME: AtomicBool = AtomicBool::new(false);

/// The pacing thread: sends each intended send time once it has come, then sleeps until the
/// next one. Returns when every time before `end` was sent (dropping `tx` ends the workers).
fn pace(tx: mpsc::UnboundedSender<Instant>, start: Instant, interval: Duration, end: Instant) {
    // SAFETY: prctl(PR_SET_TIMERSLACK) only changes this thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    if REALTIME.load(Ordering::Relaxed) {
        // Best effort: the harness itself already runs under SCHED_FIFO 1.
        let _ = set_fifo(2);
    }
    let mut next = start;
    while next < end {
        let now = Instant::now();
        while next <= now && next < end {
            if tx.send(next).is_err() {
                return;
            }
            next += interval;
        }
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
}

/// Latency percentiles (nearest rank), in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pct {
    /// The median.
    pub p50: f64,
    /// The 90th percentile.
    pub p90: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The largest sample.
    pub max: f64,
    /// How many samples.
    pub n: usize,
}

/// Nearest-rank p50, p99 and max of `samples`, in milliseconds (NaN when empty).
pub fn pct(samples: &[Duration]) -> Pct {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = |q: f64| {
        if ms.is_empty() {
            return f64::NAN;
        }
        let k = ((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len());
        ms[k - 1]
    };
    Pct {
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: rank(1.0),
        n: ms.len(),
    }
}

/// Rounds summarised: the median of the rounds' p50, p90 and p99 (one disturbed round, on a
/// shared machine, does not decide them), the largest max, and all samples counted.
pub fn median_pct(rounds: &[Pct]) -> Pct {
    let med = |f: fn(&Pct) -> f64| {
        let mut xs: Vec<f64> = rounds.iter().map(f).collect();
        xs.sort_by(f64::total_cmp);
        match xs.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => xs[n / 2],
            n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
        }
    };
    Pct {
        p50: med(|p| p.p50),
        p90: med(|p| p.p90),
        p99: med(|p| p.p99),
        max: rounds.iter().map(|p| p.max).fold(f64::NAN, f64::max),
        n: rounds.iter().map(|p| p.n).sum(),
    }
}
