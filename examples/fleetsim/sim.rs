//! The fleet simulator's core: simulated data planes, one small tokio task each, each with a
//! real mTLS WebSocket to `/v2/outlet`, the real `kong.meta.v1.hello` and the real sync
//! protocol, in two dialects:
//!
//! - [`Dialect::Kong`]: what Kong 3.10's DP does over sync v2 (`kong/clustering/services/sync/
//!   rpc.lua`): announces only `kong.sync.v2`, offers only `x-snappy-framed`, pulls with
//!   `get_delta` on connect, on every 30 s poll and on `notify_new_version` (answered `true`),
//!   and reports its version with a `get_delta` notification after each apply. It counts the
//!   notifications it gets: a second `notify_new_version` for the same version, or one for a
//!   version it holds (or has just been sent in an answer), is a [`Event::Violation`].
//! - [`Dialect::Deltaplane`]: what deltaplane's DP does: announces `kong.sync.v2`,
//!   `deltaplane.sync.v1` and `deltaplane.push.v1`, offers zstd, applies a pushed delta when it
//!   holds the version it follows, or a later one it carries (skipping the deltas it holds),
//!   and the epoch matches, else calls `get_delta`. Paged
//!   answers are not implemented: the sim refuses them (a violation), so runs keep
//!   configurations far below one frame.
//!
//! A simulated DP holds only its version, its epoch, a map `(type, pk) → entity StateHash` and
//! the running [`StateHash`]. After every exchange it hands `(version, hash)` to the process's
//! checker task, which compares it with the CP's state hash at that version, fetched once per
//! version from the CP's operator `/rpc` (`deltaplane.sync_version` with `{"at": v}`), never
//! per DP. Timestamps are taken by the DP when it has applied, before the comparison, so the
//! fetch never counts as the DP's latency.
//!
//! The driver side is [`Tracker`]: it consumes [`Event`]s (from this process or, as text
//! lines, from child processes) and answers "who is where", the latency samples and the
//! correctness gate. Shared by `examples/fleetsim/main.rs` and `tests/it/fleetsim.rs`.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deltaplane::net::tls::ClusterTls;
use deltaplane::net::{dial, hello, operator};
use deltaplane::proto::codec::{self, Encoding};
use deltaplane::proto::hello::{Hello, data_plane_conf};
use deltaplane::proto::jsonrpc::{self, RpcError};
use deltaplane::proto::v2::{self, GetDelta, NotifyNewVersion};
use deltaplane::proto::{
    CAP_DELTAPLANE_PUSH_V1, CAP_DELTAPLANE_SYNC_V1, CAP_KONG_SYNC_V2, Delta, StateHash, Version,
};
use futures::{SinkExt as _, StreamExt as _};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Which data plane a simulated one behaves as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Kong,
    Deltaplane,
}

/// How a fleet is split between dialects: all one, or alternating by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    Kong,
    Deltaplane,
    Mixed,
}

/// Where the simulated DPs connect and how they behave.
pub struct SimConfig {
    /// The CP's cluster listener, `host:port`.
    pub cluster: String,
    /// The CP's operator JSON-RPC, `http://host:port/rpc`.
    pub rpc_url: String,
    pub tls: ClusterTls,
    /// The safety poll (Kong's and ours: 30 s).
    pub poll: Duration,
    /// Reconnect back-off, jittered and doubling as the real DP's (`dp::link`).
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Bound of each connect step and of the hello.
    pub timeout: Duration,
    /// `cluster_max_payload` announced in the hello, and the frame cap.
    pub max_payload: usize,
    /// How many DPs may be in their first connect (TLS, hello, first sync) at once; reconnects
    /// are paced by the back-off only, as real DPs are.
    pub ramp: usize,
    /// A deltaplane DP reports pushed versions at most this often (the real DP's
    /// `--status-report-interval`); zero: after every apply.
    pub status_interval: Duration,
}

/// What the driver hears from the fleet. `dp` is the global index of the simulated DP; `t` is
/// `CLOCK_MONOTONIC` in nanoseconds ([`mono_ns`]), comparable across processes on one host.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The hello succeeded.
    Connected { dp: u32, t: u64 },
    /// The connection ended (or could not be made).
    Disconnected { dp: u32, t: u64 },
    /// An exchange completed (`get_delta` answer or push) and the DP is now at `v`; `applied`
    /// when it changed the DP's state, `full` for a full sync, `ok` when the DP's state hash
    /// equals the CP's at `v`.
    Synced {
        dp: u32,
        v: i64,
        t: u64,
        applied: bool,
        full: bool,
        ok: bool,
    },
    /// Something the gate fails on.
    Violation { dp: u32, what: String },
}

/// Counters of one process's fleet, by name ([`COUNTER_NAMES`]).
#[derive(Clone, Copy, Debug)]
pub enum C {
    /// `get_delta` calls.
    GetDelta,
    /// Answers that changed nothing.
    AnswerEmpty,
    /// Incremental applies, fetched or pushed.
    AnswerDeltas,
    /// Full syncs applied.
    AnswerFull,
    /// `get_delta` error answers.
    ErrorAnswer,
    /// `notify_new_version`s received, and those for a version seen already on the
    /// connection (`NotifyDup`) or held (`NotifyHeld`); violations for Kong DPs only.
    Notify,
    NotifyDup,
    NotifyHeld,
    /// Pushes received, applied, and refused (another version or epoch: `get_delta` instead).
    Push,
    PushApplied,
    PushRefused,
    /// Status reports (`get_delta` notifications) sent.
    Status,
    /// Hellos completed, and connects or hellos that failed.
    Connect,
    ConnectFail,
}

pub const COUNTER_NAMES: [&str; 14] = [
    "get_delta",
    "answer_empty",
    "answer_deltas",
    "answer_full",
    "error_answer",
    "notify",
    "notify_dup",
    "notify_held",
    "push",
    "push_applied",
    "push_refused",
    "status",
    "connect",
    "connect_fail",
];

#[derive(Default)]
pub struct Counters([AtomicU64; 14]);

/// A running fleet of simulated DPs in this process.
pub struct Fleet {
    pub counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

/// Spawns simulated DPs with global indexes `first..first + count` (dialects by `mix`), and
/// their checker; events go to `out`.
pub fn spawn(
    cfg: Arc<SimConfig>,
    first: u32,
    count: u32,
    mix: Mix,
    out: mpsc::UnboundedSender<Event>,
) -> Fleet {
    let (stop, stop_rx) = watch::channel(false);
    let (raw_tx, raw_rx) = mpsc::unbounded_channel();
    let plugins: Vec<(String, String)> = deltaplane::schema::Registry::builtin()
        .plugins()
        .map(|p| {
            (
                p.name.clone(),
                deltaplane::schema::KONG_COMPAT_VERSION.to_owned(),
            )
        })
        .collect();
    let shared = Arc::new(Shared {
        kong_conf: data_plane_conf(&[], cfg.max_payload, &plugins),
        ramp: Arc::new(Semaphore::new(cfg.ramp.max(1))),
        counters: Arc::new(Counters::default()),
        raw: raw_tx,
        cfg,
    });
    let mut tasks = JoinSet::new();
    tasks.spawn(checker(shared.cfg.rpc_url.clone(), raw_rx, out));
    for idx in first..first + count {
        let dialect = mix.dialect_of(idx);
        let dp = SimDp {
            idx,
            dialect,
            node_id: uuid::Uuid::new_v4().to_string(),
            version: 0,
            epoch: None,
            hash: StateHash::ZERO,
            entities: HashMap::new(),
        };
        tasks.spawn(run_dp(dp, shared.clone(), stop_rx.clone()));
    }
    Fleet {
        counters: shared.counters.clone(),
        stop,
        tasks,
    }
}

impl Fleet {
    /// Closes every connection and waits for the tasks.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        // The checker ends once every DP task (holding its sender) has ended.
        while self.tasks.join_next().await.is_some() {}
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the same clock in every process of the host.
pub fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// `clock` in nanoseconds (one of Linux's clocks, which always exist there).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Raises this process's `RLIMIT_NOFILE` soft limit to its hard limit; returns the new soft
/// limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit to fill / read.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

// === impl Mix, Dialect ===

impl Mix {
    pub fn parse(s: &str) -> Option<Mix> {
        match s {
            "kong" => Some(Mix::Kong),
            "deltaplane" => Some(Mix::Deltaplane),
            "mixed" => Some(Mix::Mixed),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mix::Kong => "kong",
            Mix::Deltaplane => "deltaplane",
            Mix::Mixed => "mixed",
        }
    }

    /// Mixed: even indexes are Kong DPs, odd ones deltaplane DPs.
    pub fn dialect_of(self, idx: u32) -> Dialect {
        match self {
            Mix::Kong => Dialect::Kong,
            Mix::Deltaplane => Dialect::Deltaplane,
            Mix::Mixed if idx.is_multiple_of(2) => Dialect::Kong,
            Mix::Mixed => Dialect::Deltaplane,
        }
    }
}

// === impl Counters ===

impl Counters {
    fn inc(&self, c: C) {
        self.0[c as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, c: C) -> u64 {
        self.0[c as usize].load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> [u64; 14] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }

    /// `name=value` pairs, space-separated.
    pub fn to_line(&self) -> String {
        let s = self.snapshot();
        COUNTER_NAMES
            .iter()
            .zip(s)
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Reads [`Counters::to_line`] back.
    pub fn parse_line(line: &str) -> [u64; 14] {
        let mut out = [0u64; 14];
        for pair in line.split_whitespace() {
            if let Some((n, v)) = pair.split_once('=')
                && let Some(i) = COUNTER_NAMES.iter().position(|x| *x == n)
            {
                out[i] = v.parse().unwrap_or(0);
            }
        }
        out
    }
}

// === impl Event ===

impl Event {
    /// One text line (no newline), for a child process's stdout.
    pub fn to_line(&self) -> String {
        match self {
            Event::Connected { dp, t } => format!("C {dp} {t}"),
            Event::Disconnected { dp, t } => format!("D {dp} {t}"),
            Event::Synced {
                dp,
                v,
                t,
                applied,
                full,
                ok,
            } => format!(
                "S {dp} {v} {t} {} {} {}",
                *applied as u8, *full as u8, *ok as u8
            ),
            Event::Violation { dp, what } => format!("X {dp} {}", what.replace('\n', " ")),
        }
    }

    pub fn from_line(line: &str) -> Option<Event> {
        let mut it = line.splitn(3, ' ');
        let kind = it.next()?;
        let dp: u32 = it.next()?.parse().ok()?;
        let rest = it.next().unwrap_or("");
        let mut nums = rest.split(' ');
        let mut num = || -> Option<u64> { nums.next()?.parse().ok() };
        Some(match kind {
            "C" => Event::Connected { dp, t: num()? },
            "D" => Event::Disconnected { dp, t: num()? },
            "S" => Event::Synced {
                dp,
                v: num()? as i64,
                t: num()?,
                applied: num()? == 1,
                full: num()? == 1,
                ok: num()? == 1,
            },
            "X" => Event::Violation {
                dp,
                what: rest.to_owned(),
            },
            _ => return None,
        })
    }
}

// === the checker ===

/// What a DP task tells its process's checker.
enum Raw {
    Event(Event),
    Synced {
        dp: u32,
        v: i64,
        hash: StateHash,
        t: u64,
        applied: bool,
        full: bool,
    },
}

/// Compares each DP's state hash with the CP's at that version (fetched once per version and
/// cached), and forwards every event to `out`.
async fn checker(
    rpc_url: String,
    mut rx: mpsc::UnboundedReceiver<Raw>,
    out: mpsc::UnboundedSender<Event>,
) {
    let mut book: HashMap<i64, Result<StateHash, String>> = HashMap::new();
    while let Some(raw) = rx.recv().await {
        let event = match raw {
            Raw::Event(e) => e,
            Raw::Synced {
                dp,
                v,
                hash,
                t,
                applied,
                full,
            } => {
                if let std::collections::hash_map::Entry::Vacant(slot) = book.entry(v) {
                    let h = if v == 0 {
                        Ok(StateHash::ZERO)
                    } else {
                        cp_hash_at(&rpc_url, v).await
                    };
                    slot.insert(h);
                }
                let ok = match &book[&v] {
                    Ok(expected) if *expected == hash => true,
                    Ok(expected) => {
                        let _ = out.send(Event::Violation {
                            dp,
                            what: format!("state hash at {v}: ours {hash}, the CP's {expected}"),
                        });
                        false
                    }
                    Err(e) => {
                        let _ = out.send(Event::Violation {
                            dp,
                            what: format!("cannot verify version {v}: {e}"),
                        });
                        false
                    }
                };
                Event::Synced {
                    dp,
                    v,
                    t,
                    applied,
                    full,
                    ok,
                }
            }
        };
        if out.send(event).is_err() {
            return;
        }
    }
}

/// The CP's state hash at `v`, from `deltaplane.sync_version` (three tries).
async fn cp_hash_at(rpc_url: &str, v: i64) -> Result<StateHash, String> {
    let mut last = String::new();
    for attempt in 0..3 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let params = serde_json::json!({ "at": v });
        match operator::call(rpc_url, None, "deltaplane.sync_version", Some(params)).await {
            Ok(r) => {
                return r["state_hash_at"]
                    .as_str()
                    .and_then(StateHash::from_hex)
                    .ok_or_else(|| format!("no state_hash_at in {r}"));
            }
            Err(e) => last = format!("{e:#}"),
        }
    }
    Err(last)
}

// === one simulated DP ===

/// What every DP task of a process shares.
struct Shared {
    cfg: Arc<SimConfig>,
    /// The hello's `kong_conf` (the bundled plugins, as a real DP announces them).
    kong_conf: Value,
    ramp: Arc<Semaphore>,
    counters: Arc<Counters>,
    raw: mpsc::UnboundedSender<Raw>,
}

/// The whole state of one simulated DP, kept across connections.
struct SimDp {
    idx: u32,
    dialect: Dialect,
    node_id: String,
    version: i64,
    /// The CP change-log epoch the configuration came from (deltaplane CPs say it in the
    /// hello).
    epoch: Option<String>,
    hash: StateHash,
    /// `type \0 pk` → the entity's digest.
    entities: HashMap<Box<str>, StateHash>,
}

/// One connection's state.
struct Conn<S> {
    ws: S,
    encoding: Encoding,
    cp_epoch: Option<String>,
    next_id: u64,
    /// The outstanding `get_delta`: (id, version asked from).
    inflight: Option<(u64, i64)>,
    /// The newest version announced (notify or push).
    notified: i64,
    /// The newest `latest_version` received in an answer or push on this connection.
    received: i64,
    /// The CP's head as its answers say (deltaplane CPs).
    head: i64,
    /// `notify_new_version`s per announced version, on this connection.
    notifies: HashMap<i64, u32>,
    /// Ask again at this time (after an error answer).
    retry_at: Option<tokio::time::Instant>,
    /// When the last status report went out, and whether an applied push waits for one.
    last_report: Option<tokio::time::Instant>,
    report_pending: bool,
}

enum End {
    Stopped,
    Closed(String),
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn run_dp(mut dp: SimDp, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let cfg = shared.cfg.clone();
    let mut permit = shared.ramp.clone().acquire_owned().await.ok();
    let mut attempt: u32 = 0;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = dp.session(&shared, &mut stop, &mut permit).await;
        // The first connect is over, however it went: let the next DP in.
        permit = None;
        match outcome {
            Ok(End::Stopped) => return,
            Ok(End::Closed(why)) | Err(why) => {
                tracing::debug!(dp = dp.idx, %why, "connection ended");
            }
        }
        if started.elapsed() > cfg.reconnect_max {
            attempt = 0;
        }
        let delay = backoff(cfg.reconnect_min, cfg.reconnect_max, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Resolves once `stop` is true (without holding the watch guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// The real DP's back-off (`dp::link`): uniform in [d/2, d], d = min · 2^attempt, capped.
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let d = min
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
        .max(Duration::from_millis(1));
    let lo = d / 2;
    lo + (d - lo).mul_f64(rand::random::<f64>())
}

impl SimDp {
    fn emit(&self, shared: &Shared, e: Event) {
        let _ = shared.raw.send(Raw::Event(e));
    }

    fn violation(&self, shared: &Shared, what: String) {
        self.emit(shared, Event::Violation { dp: self.idx, what });
    }

    async fn session(
        &mut self,
        shared: &Shared,
        stop: &mut watch::Receiver<bool>,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<End, String> {
        let conn = match self.connect(shared).await {
            Ok(conn) => conn,
            Err(e) => {
                shared.counters.inc(C::ConnectFail);
                return Err(e);
            }
        };
        shared.counters.inc(C::Connect);
        self.emit(
            shared,
            Event::Connected {
                dp: self.idx,
                t: mono_ns(),
            },
        );
        let res = self.serve(shared, conn, stop, permit).await;
        self.emit(
            shared,
            Event::Disconnected {
                dp: self.idx,
                t: mono_ns(),
            },
        );
        res
    }

    async fn connect(&self, shared: &Shared) -> Result<Conn<Ws>, String> {
        let cfg = &shared.cfg;
        // Sized for an idle DP: small reads, unbuffered writes; one frame at most max_payload.
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0)
            .max_write_buffer_size(cfg.max_payload + 1024)
            .max_message_size(Some(cfg.max_payload))
            .max_frame_size(Some(cfg.max_payload));
        let mut ws = dial::open_v2(&cfg.tls, &cfg.cluster, ws_config, cfg.timeout)
            .await
            .map_err(|e| format!("open: {e:#}"))?;
        let (caps, encodings) = match self.dialect {
            Dialect::Kong => (
                vec![CAP_KONG_SYNC_V2.to_owned()],
                vec![Encoding::SnappyFramed.name().to_owned()],
            ),
            Dialect::Deltaplane => (
                vec![
                    CAP_KONG_SYNC_V2.to_owned(),
                    CAP_DELTAPLANE_SYNC_V1.to_owned(),
                    CAP_DELTAPLANE_PUSH_V1.to_owned(),
                ],
                vec![
                    Encoding::Zstd.name().to_owned(),
                    Encoding::SnappyFramed.name().to_owned(),
                ],
            ),
        };
        let hello_msg = Hello {
            rpc_capabilities: caps,
            rpc_frame_encodings: encodings,
            kong_version: deltaplane::schema::KONG_COMPAT_VERSION.to_owned(),
            kong_hostname: format!("sim-{}", self.idx),
            kong_node_id: self.node_id.clone(),
            kong_conf: shared.kong_conf.clone(),
        };
        let result = hello::client_handshake(&mut ws, &hello_msg, cfg.timeout)
            .await
            .map_err(|e| format!("hello: {e}"))?;
        let encoding = result
            .encoding()
            .ok_or("the CP chose an unknown encoding")?;
        Ok(Conn {
            ws,
            encoding,
            cp_epoch: result.epoch().map(str::to_owned),
            next_id: 0,
            inflight: None,
            notified: 0,
            received: 0,
            head: 0,
            notifies: HashMap::new(),
            retry_at: None,
            last_report: None,
            report_pending: false,
        })
    }

    async fn serve(
        &mut self,
        shared: &Shared,
        mut conn: Conn<Ws>,
        stop: &mut watch::Receiver<bool>,
        permit: &mut Option<OwnedSemaphorePermit>,
    ) -> Result<End, String> {
        let cfg = &shared.cfg;
        self.ask(shared, &mut conn).await?;
        let mut poll = tokio::time::interval(cfg.poll);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            let far = tokio::time::Instant::now() + Duration::from_secs(86400);
            let retry = conn.retry_at.unwrap_or(far);
            let report_at = conn
                .last_report
                .filter(|_| conn.report_pending)
                .map(|t| t + cfg.status_interval);
            tokio::select! {
                msg = conn.ws.next() => match msg {
                    Some(Ok(Message::Binary(frame))) => {
                        let synced = self.on_frame(shared, &mut conn, &frame).await?;
                        if synced {
                            // The first sync is done: the next DP may start its first connect.
                            *permit = None;
                        }
                    }
                    Some(Ok(Message::Close(c))) => return Ok(End::Closed(format!("closed by the CP: {c:?}"))),
                    // tungstenite answers pings itself; text frames are not part of the protocol.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(format!("read: {e}")),
                    None => return Ok(End::Closed("end of stream".into())),
                },
                _ = poll.tick() => {
                    if conn.inflight.is_none() {
                        self.ask(shared, &mut conn).await?;
                    }
                }
                _ = tokio::time::sleep_until(report_at.unwrap_or(far)), if report_at.is_some() => {
                    self.report(shared, &mut conn).await?;
                }
                _ = tokio::time::sleep_until(retry) => {
                    conn.retry_at = None;
                    if conn.inflight.is_none() {
                        self.ask(shared, &mut conn).await?;
                    }
                }
                _ = stopped(stop) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), conn.ws.close(None)).await;
                    return Ok(End::Stopped);
                }
            }
        }
    }

    /// Reports our version (and, as a deltaplane DP, our state hash) to the CP.
    async fn report(&self, shared: &Shared, conn: &mut Conn<Ws>) -> Result<(), String> {
        let hash = (self.dialect == Dialect::Deltaplane).then(|| self.hash.to_hex());
        let status = GetDelta::new(Version::new(self.version), hash).to_params();
        shared.counters.inc(C::Status);
        conn.last_report = Some(tokio::time::Instant::now());
        conn.report_pending = false;
        self.send(conn, &jsonrpc::notification(v2::GET_DELTA, &status))
            .await
    }

    async fn send(&self, conn: &mut Conn<Ws>, json: &[u8]) -> Result<(), String> {
        let frame = codec::encode(conn.encoding, json);
        conn.ws
            .send(Message::binary(frame))
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// Calls `get_delta` from our version (from 0 when our configuration is from another
    /// epoch).
    async fn ask(&self, shared: &Shared, conn: &mut Conn<Ws>) -> Result<(), String> {
        let other_epoch = matches!((&self.epoch, &conn.cp_epoch), (Some(a), Some(b)) if a != b);
        let asked = if other_epoch { 0 } else { self.version };
        let hash = (self.dialect == Dialect::Deltaplane && asked > 0).then(|| self.hash.to_hex());
        let params = GetDelta::new(Version::new(asked), hash).to_params();
        let id = conn.next_id;
        conn.next_id += 1;
        conn.inflight = Some((id, asked));
        shared.counters.inc(C::GetDelta);
        self.send(conn, &jsonrpc::request(id, v2::GET_DELTA, &params))
            .await
    }

    /// Handles one frame; true when an exchange completed.
    async fn on_frame(
        &mut self,
        shared: &Shared,
        conn: &mut Conn<Ws>,
        frame: &[u8],
    ) -> Result<bool, String> {
        let json = codec::decode(conn.encoding, frame, 16 * shared.cfg.max_payload)
            .map_err(|e| format!("decode: {e}"))?;
        let is_batch = json
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|&b| b == b'[');
        let text = std::str::from_utf8(&json).map_err(|e| format!("not UTF-8: {e}"))?;
        let mut synced = false;
        if is_batch {
            let items: Vec<&RawValue> =
                serde_json::from_str(text).map_err(|e| format!("batch: {e}"))?;
            for item in items {
                synced |= self.on_message(shared, conn, item.get()).await?;
            }
        } else {
            synced = self.on_message(shared, conn, text).await?;
        }
        Ok(synced)
    }

    async fn on_message(
        &mut self,
        shared: &Shared,
        conn: &mut Conn<Ws>,
        text: &str,
    ) -> Result<bool, String> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow, default)]
            id: Option<&'a RawValue>,
            #[serde(borrow, default)]
            method: Option<Cow<'a, str>>,
            #[serde(borrow, default)]
            params: Option<&'a RawValue>,
            #[serde(borrow, default)]
            result: Option<&'a RawValue>,
            #[serde(default)]
            error: Option<Value>,
        }
        let m: Envelope<'_> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON-RPC message: {e}"))?;
        let id: Option<Value> = match m.id {
            Some(raw) => serde_json::from_str(raw.get()).ok(),
            None => None,
        };
        if let Some(method) = m.method.as_deref() {
            let params = m.params.map(RawValue::get).unwrap_or("[]");
            if method == v2::NOTIFY_NEW_VERSION {
                let p: Value = serde_json::from_str(params).unwrap_or(Value::Null);
                let parsed = NotifyNewVersion::from_params(&p);
                if let Some(id) = &id {
                    let reply = match &parsed {
                        Ok(_) => jsonrpc::result(id, &Value::Bool(true)),
                        Err(e) => jsonrpc::error(Some(id), e),
                    };
                    self.send(conn, &reply).await?;
                }
                match parsed {
                    Ok(n) => self.on_notify(shared, conn, n.new_version.get()).await?,
                    Err(e) => self.violation(shared, format!("bad notify_new_version: {e}")),
                }
                return Ok(false);
            }
            if method == v2::PUSH_DELTAS && self.dialect == Dialect::Deltaplane {
                return self.on_push(shared, conn, params).await;
            }
            if let Some(id) = &id {
                let reply = jsonrpc::error(Some(id), &RpcError::method_not_found());
                self.send(conn, &reply).await?;
            }
            return Ok(false);
        }
        let Some((want, asked)) = conn.inflight else {
            return Ok(false);
        };
        if id.as_ref().and_then(Value::as_u64) != Some(want) {
            return Ok(false);
        }
        conn.inflight = None;
        match (m.result, m.error) {
            (Some(result), None) => {
                self.on_answer(shared, conn, result.get(), asked, false)
                    .await
            }
            (_, error) => {
                shared.counters.inc(C::ErrorAnswer);
                tracing::debug!(dp = self.idx, ?error, "get_delta error answer");
                conn.retry_at = Some(tokio::time::Instant::now() + shared.cfg.reconnect_min);
                Ok(false)
            }
        }
    }

    async fn on_notify(
        &mut self,
        shared: &Shared,
        conn: &mut Conn<Ws>,
        v: i64,
    ) -> Result<(), String> {
        shared.counters.inc(C::Notify);
        let held = self.version.max(conn.received);
        let kong = self.dialect == Dialect::Kong;
        if v <= held {
            shared.counters.inc(C::NotifyHeld);
            if kong {
                self.violation(
                    shared,
                    format!("notify_new_version for {v}, which it holds or was sent ({held})"),
                );
            }
        }
        let n = conn.notifies.entry(v).or_insert(0);
        *n += 1;
        if *n > 1 {
            shared.counters.inc(C::NotifyDup);
            if kong {
                self.violation(
                    shared,
                    format!("notify_new_version for {v} received {n} times"),
                );
            }
        }
        conn.notified = conn.notified.max(v);
        if v > self.version && conn.inflight.is_none() {
            self.ask(shared, conn).await?;
        }
        Ok(())
    }

    /// A pushed answer (the push contract): applied when we hold `after`, or a later version
    /// below its `latest_version` (the deltas we hold are skipped), under the push's epoch;
    /// else a `get_delta`.
    async fn on_push(
        &mut self,
        shared: &Shared,
        conn: &mut Conn<Ws>,
        params: &str,
    ) -> Result<bool, String> {
        shared.counters.inc(C::Push);
        let push = v2::read_push(params).map_err(|e| format!("bad push: {e}"))?;
        let after = Some(push.after.get());
        let ours = self.epoch.as_deref() == Some(push.epoch)
            && conn.cp_epoch.as_deref() == Some(push.epoch);
        let continues = match after {
            Some(a) if a == self.version => true,
            // Built from a report we had overtaken: read its head only then.
            Some(a) if a < self.version => v2::read_answer(push.answer)
                .ok()
                .and_then(|a| a.latest_version)
                .is_some_and(|l| l.get() > self.version),
            _ => false,
        };
        if ours && continues {
            shared.counters.inc(C::PushApplied);
            let asked = self.version;
            return self.on_answer(shared, conn, push.answer, asked, true).await;
        }
        shared.counters.inc(C::PushRefused);
        if let Ok(a) = v2::read_answer(push.answer)
            && let Some(l) = a.latest_version
        {
            conn.notified = conn.notified.max(l.get());
        }
        if conn.notified > self.version && conn.inflight.is_none() {
            self.ask(shared, conn).await?;
        }
        Ok(false)
    }

    /// Applies a `get_delta` result (or a pushed one) asked from `asked`.
    async fn on_answer(
        &mut self,
        shared: &Shared,
        conn: &mut Conn<Ws>,
        text: &str,
        asked: i64,
        pushed: bool,
    ) -> Result<bool, String> {
        let answer = match v2::read_answer(text) {
            Ok(a) => a,
            Err(e) => {
                self.violation(shared, format!("unreadable answer: {e}"));
                return Err(format!("unreadable answer: {e}"));
            }
        };
        if answer.transfer.is_some() {
            let what = "paged answer: the simulator does not page (keep the configuration \
                        smaller than one frame)";
            self.violation(shared, what.to_owned());
            return Err(what.to_owned());
        }
        let latest = answer.latest_version.map(Version::get);
        if let Some(l) = latest {
            conn.received = conn.received.max(l);
            if pushed {
                conn.notified = conn.notified.max(l);
            }
        }
        if let Some(h) = answer.head {
            conn.head = conn.head.max(h.get());
        }
        if !answer.full_sync && asked != self.version {
            // A push moved us while this answer was on its way: it is stale.
            if conn.inflight.is_none() && conn.notified.max(conn.head) > self.version {
                self.ask(shared, conn).await?;
            }
            return Ok(false);
        }
        let full = answer.full_sync;
        // A push may start below our version: its deltas through it are ours already.
        let held = (pushed && !full).then_some(asked);
        match self.apply(answer.namespace, full, latest, asked, held) {
            Ok(Some(v)) => {
                shared
                    .counters
                    .inc(if full { C::AnswerFull } else { C::AnswerDeltas });
                if full {
                    self.epoch = conn.cp_epoch.clone();
                }
                self.version = v;
                conn.notifies.retain(|k, _| *k > v);
                let _ = shared.raw.send(Raw::Synced {
                    dp: self.idx,
                    v,
                    hash: self.hash,
                    t: mono_ns(),
                    applied: true,
                    full,
                });
                // The status report (Kong's `update_status`; ours adds the state hash), after a
                // push at most once per status interval, as the real DP.
                let wait = pushed
                    && conn
                        .last_report
                        .is_some_and(|t| t.elapsed() < shared.cfg.status_interval);
                if wait {
                    conn.report_pending = true;
                } else {
                    self.report(shared, conn).await?;
                }
            }
            Ok(None) => {
                shared.counters.inc(C::AnswerEmpty);
                let _ = shared.raw.send(Raw::Synced {
                    dp: self.idx,
                    v: self.version,
                    hash: self.hash,
                    t: mono_ns(),
                    applied: false,
                    full: false,
                });
            }
            Err(e) => {
                // Start over from nothing: the next answer is a full sync.
                self.version = 0;
                self.epoch = None;
                self.hash = StateHash::ZERO;
                self.entities.clear();
                self.violation(shared, format!("cannot apply answer from {asked}: {e}"));
                return Err(e);
            }
        }
        if conn.inflight.is_none() && conn.notified.max(conn.head) > self.version {
            self.ask(shared, conn).await?;
        }
        Ok(true)
    }

    /// Folds an answer's deltas into the entity map and the running hash. `Ok(None)` when it
    /// changed nothing (an empty incremental answer).
    fn apply(
        &mut self,
        ns: &str,
        full: bool,
        latest: Option<i64>,
        asked: i64,
        held: Option<i64>,
    ) -> Result<Option<i64>, String> {
        let (mut map, mut hash) = if full {
            (HashMap::new(), StateHash::ZERO)
        } else {
            (std::mem::take(&mut self.entities), self.hash)
        };
        let mut first_v = None;
        let mut last_v = None;
        let parsed = v2::for_each_delta(ns, |value| {
            let d = Delta::from_wire(value).map_err(|e| e.to_string())?;
            if held.is_some_and(|h| d.version <= h) {
                return Ok(());
            }
            first_v.get_or_insert(d.version);
            if last_v.is_some_and(|l| d.version < l) {
                return Err(format!(
                    "delta versions go down: {} after {l:?}",
                    d.version,
                    l = last_v
                ));
            }
            last_v = Some(d.version);
            let key: Box<str> = format!("{}\0{}", d.entity_type, d.id).into();
            match &d.entity {
                Some(e) => {
                    let h = StateHash::of_entity(&d.entity_type, &d.ws_id, &d.id, e);
                    if let Some(old) = map.insert(key, h) {
                        hash.sub(&old);
                    }
                    hash.add(&h);
                }
                None => {
                    if let Some(old) = map.remove(&key) {
                        hash.sub(&old);
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = parsed {
            return Err(format!("deltas: {e}"));
        }
        if !full {
            let Some(first) = first_v else {
                self.entities = map;
                return Ok(None);
            };
            if first != asked + 1 {
                return Err(format!("gap: first delta is {first}, we hold {asked}"));
            }
        }
        let Some(v) = latest.or(last_v) else {
            return Err("a full sync without a version".into());
        };
        self.entities = map;
        self.hash = hash;
        Ok(Some(v))
    }
}

// === the driver's view ===

/// What the driver knows of one simulated DP.
#[derive(Debug, Clone, Default)]
pub struct DpView {
    pub connected: bool,
    /// The version after its last exchange, and whether its hash matched the CP's there.
    pub version: i64,
    pub ok: bool,
    /// When its last exchange completed (`mono_ns`).
    pub synced_at: u64,
    pub connects: u32,
    pub full_syncs: u32,
    /// (version, time) of every apply, when recording.
    pub applied: Vec<(i64, u64)>,
}

/// The driver's view of a whole fleet, fed with [`Event`]s.
#[derive(Debug, Default)]
pub struct Tracker {
    pub dps: Vec<DpView>,
    pub violations: Vec<(u32, String)>,
    pub n_violations: u64,
    /// Record every apply's (version, time) (latency runs).
    pub record: bool,
}

impl Tracker {
    pub fn new(n: usize) -> Tracker {
        Tracker {
            dps: vec![DpView::default(); n],
            ..Tracker::default()
        }
    }

    pub fn grow(&mut self, n: usize) {
        if self.dps.len() < n {
            self.dps.resize(n, DpView::default());
        }
    }

    pub fn on(&mut self, e: Event) {
        match e {
            Event::Connected { dp, .. } => {
                if let Some(d) = self.dps.get_mut(dp as usize) {
                    d.connected = true;
                    d.connects += 1;
                }
            }
            Event::Disconnected { dp, .. } => {
                if let Some(d) = self.dps.get_mut(dp as usize) {
                    d.connected = false;
                }
            }
            Event::Synced {
                dp,
                v,
                t,
                applied,
                full,
                ok,
            } => {
                let record = self.record;
                if let Some(d) = self.dps.get_mut(dp as usize) {
                    d.version = v;
                    d.ok = ok;
                    d.synced_at = t;
                    if full {
                        d.full_syncs += 1;
                    }
                    if applied && record {
                        d.applied.push((v, t));
                    }
                }
            }
            Event::Violation { dp, what } => {
                self.n_violations += 1;
                if self.violations.len() < 20 {
                    self.violations.push((dp, what));
                }
            }
        }
    }

    /// DPs at `v` with a verified hash.
    pub fn n_at(&self, v: i64) -> usize {
        self.dps.iter().filter(|d| d.version == v && d.ok).count()
    }

    pub fn all_at(&self, v: i64) -> bool {
        self.dps.iter().all(|d| d.version == v && d.ok)
    }

    pub fn full_syncs(&self) -> u64 {
        self.dps.iter().map(|d| d.full_syncs as u64).sum()
    }

    /// When each DP first applied a version ≥ `v` (`None` if it never did), from the recorded
    /// applies.
    pub fn reached(&self, v: i64) -> Vec<Option<u64>> {
        self.dps
            .iter()
            .map(|d| {
                let i = d.applied.partition_point(|(x, _)| *x < v);
                d.applied.get(i).map(|(_, t)| *t)
            })
            .collect()
    }

    /// The correctness gate: every DP at the CP's head with the CP's state hash there, and no
    /// violation.
    pub fn gate(&self, head: i64) -> Result<(), String> {
        let behind: Vec<String> = self
            .dps
            .iter()
            .enumerate()
            .filter(|(_, d)| !(d.version == head && d.ok))
            .take(5)
            .map(|(i, d)| format!("dp {i} at {} (hash ok: {})", d.version, d.ok))
            .collect();
        let n_behind = self
            .dps
            .iter()
            .filter(|d| !(d.version == head && d.ok))
            .count();
        if n_behind == 0 && self.n_violations == 0 {
            return Ok(());
        }
        let violations: Vec<String> = self
            .violations
            .iter()
            .take(5)
            .map(|(dp, w)| format!("dp {dp}: {w}"))
            .collect();
        Err(format!(
            "gate FAILED: {n_behind} of {} DPs not at head {head} with its hash {behind:?}; \
             {} violations {violations:?}",
            self.dps.len(),
            self.n_violations
        ))
    }
}

// === driving a run ===

/// Events in, a [`Tracker`] kept up to date.
pub struct Pump {
    pub rx: mpsc::UnboundedReceiver<Event>,
    pub tracker: Tracker,
}

impl Pump {
    pub fn new(rx: mpsc::UnboundedReceiver<Event>, n: usize) -> Pump {
        Pump {
            rx,
            tracker: Tracker::new(n),
        }
    }

    /// Feeds every event already queued.
    pub fn drain(&mut self) {
        while let Ok(e) = self.rx.try_recv() {
            self.tracker.on(e);
        }
    }

    /// Feeds events until `cond` holds; fails after `limit` with `what` and the gate's view.
    pub async fn until(
        &mut self,
        limit: Duration,
        what: &str,
        cond: impl Fn(&Tracker) -> bool,
    ) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + limit;
        self.drain();
        while !cond(&self.tracker) {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => {
                    self.tracker.on(e);
                    self.drain();
                }
                Ok(None) => return Err(format!("{what}: the fleet is gone")),
                Err(_) => {
                    let at: std::collections::BTreeMap<i64, usize> =
                        self.tracker
                            .dps
                            .iter()
                            .fold(Default::default(), |mut m, d| {
                                *m.entry(d.version).or_default() += 1;
                                m
                            });
                    return Err(format!(
                        "{what}: not reached in {limit:?}; DPs by version {at:?}; {} violations \
                         {:?}",
                        self.tracker.n_violations, self.tracker.violations
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The CP's head and its state hash, from `deltaplane.sync_version`.
pub async fn cp_head(rpc_url: &str) -> Result<(i64, StateHash), String> {
    let r = operator::call(rpc_url, None, "deltaplane.sync_version", None)
        .await
        .map_err(|e| format!("{e:#}"))?;
    let v = r["version"].as_i64().ok_or("no version")?;
    let h = r["state_hash"]
        .as_str()
        .and_then(StateHash::from_hex)
        .ok_or("no state_hash")?;
    Ok((v, h))
}

/// Creates `n` services through the Admin API at `admin` (`http://host:port`); their ids.
pub async fn seed(http: &reqwest::Client, admin: &str, n: usize) -> Result<Vec<String>, String> {
    let mut ids = Vec::with_capacity(n);
    for s in 0..n {
        let body = serde_json::json!({
            "name": format!("sim-svc-{s}"),
            "host": format!("svc-{s}.test"),
        });
        let r = http
            .post(format!("{admin}/services"))
            .json(&body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().as_u16() != 201 {
            return Err(format!("creating a service: {}", r.status()));
        }
        let v: Value = r.json().await.map_err(|e| e.to_string())?;
        ids.push(v["id"].as_str().ok_or("service id")?.to_owned());
    }
    Ok(ids)
}

/// One Admin API write that changes service `ids[i % len]` (its tags), so it makes exactly one
/// version; returns `mono_ns` just before it was sent.
pub async fn write_one(
    http: &reqwest::Client,
    admin: &str,
    ids: &[String],
    i: usize,
) -> Result<u64, String> {
    let id = &ids[i % ids.len()];
    let t0 = mono_ns();
    let r = http
        .patch(format!("{admin}/services/{id}"))
        .json(&serde_json::json!({ "tags": [format!("w{i}")] }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if r.status().as_u16() != 200 {
        return Err(format!("PATCH answered {}", r.status()));
    }
    Ok(t0)
}

/// `writes` sequential writes, the i-th sent no earlier than `i / rate` seconds after the
/// first; the send times.
pub async fn write_paced(
    http: &reqwest::Client,
    admin: &str,
    ids: &[String],
    writes: usize,
    rate: f64,
) -> Result<Vec<u64>, String> {
    let start = tokio::time::Instant::now();
    let mut t0s = Vec::with_capacity(writes);
    for i in 0..writes {
        let at = start + Duration::from_secs_f64(i as f64 / rate.max(1e-3));
        tokio::time::sleep_until(at).await;
        t0s.push(write_one(http, admin, ids, i).await?);
    }
    Ok(t0s)
}
