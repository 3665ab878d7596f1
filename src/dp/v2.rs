//! The data plane's sync v2 session: hello, then pull `kong.sync.v2.get_delta` on connect, on
//! every `notify_new_version`, and on a slow safety poll; apply each answer in one redb
//! transaction.
//!
//! A rejected answer, or a configuration the control plane withholds (the data plane's
//! plugins), is asked for again only after a doubling back-off, on the same connection; a
//! withheld one also as soon as the control plane announces a new version. Either shows as
//! `last_error` until a configuration is applied.
//!
//! Answers are parsed as a stream (`proto::v2::for_each_delta`): the deltas array is never
//! held as a `Value` tree, only one delta at a time, so a full sync needs little more memory
//! than its decoded bytes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::watch;

use super::link::End;
use super::metrics::ApplyKind as DpApplyKind;
use super::store::{ApplyError, ApplyKind, DeltaSink, DpStore};
use super::{DpConfig, DpShared, SyncMode};
use crate::net::dial::{self, OpenError};
use crate::net::hello;
use crate::net::peer::{CallError, CloseReason, Handler, Peer, Reply};
use crate::net::tls::ClusterTls;
use crate::proto::codec::Encoding;
use crate::proto::hello::{Hello, data_plane_conf};
use crate::proto::jsonrpc::RpcError;
use crate::proto::v2::PUSH_DELTAS;
use crate::proto::v2::{self, GET_DELTA, GET_PAGE, GetDelta, GetPage, NOTIFY_NEW_VERSION};
use crate::proto::v2::{NOTIFY_VALIDATION_ERROR, NotifyNewVersion, NotifyValidationError};
use crate::proto::{
    CAP_DELTAPLANE_PUSH_V1, CAP_DELTAPLANE_SYNC_V1, CAP_KONG_SYNC_V2, Delta, SyncProtocol, Version,
    is_withheld,
};

const DP_METHODS: &[&str] = &[NOTIFY_NEW_VERSION, PUSH_DELTAS];

/// Pushed versions waiting for the session loop; more are fetched with get_delta instead.
const PUSH_QUEUE: usize = 64;
/// Most pushed versions applied in one transaction.
const PUSHES_PER_COMMIT: usize = 64;
/// Pages of a paged transfer fetched ahead of the one being applied (each up to a frame).
const PAGES_AHEAD: usize = 1;

/// One sync v2 session on `cp`: open `/v2/outlet`, hello, then pull until the connection ends
/// or `stop`.
pub(super) async fn session(
    cfg: &DpConfig,
    tls: &ClusterTls,
    shared: &Arc<DpShared>,
    cp: &str,
    mut stop: watch::Receiver<bool>,
) -> Result<End, OpenError> {
    let timeout = cfg.cluster.handshake_timeout;
    let pcfg = crate::net::peer::PeerConfig {
        stats: Some(shared.metrics.link().clone()),
        ..cfg.cluster.peer_config()
    };
    let mut ws = dial::open_v2(tls, cp, crate::net::peer::ws_config(&pcfg), timeout).await?;
    let our_caps = vec![
        CAP_KONG_SYNC_V2.to_owned(),
        CAP_DELTAPLANE_SYNC_V1.to_owned(),
        CAP_DELTAPLANE_PUSH_V1.to_owned(),
    ];
    let hello_msg = Hello {
        rpc_capabilities: our_caps.clone(),
        rpc_frame_encodings: vec![
            Encoding::Zstd.name().to_owned(),
            Encoding::SnappyFramed.name().to_owned(),
        ],
        kong_version: cfg.kong_compat_version.clone(),
        kong_hostname: shared.hostname.clone(),
        kong_node_id: shared.node_id.clone(),
        kong_conf: data_plane_conf(
            &cfg.labels,
            cfg.cluster.max_payload,
            &cfg.announced_plugins(shared.store.registry()),
        ),
    };
    let result = hello::client_handshake(&mut ws, &hello_msg, timeout)
        .await
        .map_err(|e| anyhow::anyhow!("hello: {e}"))?;
    let encoding = result
        .encoding()
        .context("the control plane chose an unknown encoding")?;
    let cp_epoch = result.epoch().map(str::to_owned);
    let cp_caps = result.rpc_capabilities.clone();
    let offers_v2 = result.offers(CAP_KONG_SYNC_V2);
    let (notified_tx, mut notified) = watch::channel(0i64);
    let (pushes_tx, mut pushes) = tokio::sync::mpsc::channel(PUSH_QUEUE);
    let handler = Arc::new(DpHandler {
        shared: shared.clone(),
        notified: notified_tx,
        pushes: pushes_tx,
    });
    let peer = Peer::start(ws, encoding, pcfg, our_caps, cp_caps.clone(), handler);
    shared.update_link(|l| {
        l.connected_to = Some(cp.to_owned());
        l.cp_epoch = cp_epoch.clone();
        l.connects += 1;
    });
    tracing::info!(control_plane = %cp, encoding = encoding.name(), caps = ?cp_caps, epoch = ?cp_epoch, "connected to the control plane");
    if !offers_v2 && cfg.sync == SyncMode::Auto {
        close_and_wait(&peer).await;
        return Ok(End::NoSyncV2(
            "the control plane's hello does not offer kong.sync.v2".into(),
        ));
    }
    if !offers_v2 {
        tracing::warn!(control_plane = %cp, "the control plane does not offer kong.sync.v2; waiting");
        return Ok(tokio::select! {
            r = peer.closed() => End::Closed(describe_close(&r, cfg.cluster.max_payload)),
            _ = stopped(&mut stop) => { close_and_wait(&peer).await; End::Stopped }
        });
    }
    shared.update_link(|l| l.protocol = Some(SyncProtocol::V2));
    let syncer = Syncer {
        stop: stop.clone(),
        shared: shared.clone(),
        peer: peer.clone(),
        cp_epoch,
        paging: result.offers(CAP_DELTAPLANE_SYNC_V1),
        reports: std::sync::Mutex::new(Reports {
            interval: cfg.status_report_interval,
            last_sent: None,
            pending: false,
        }),
    };
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut rejections: u32 = 0;
    // The `last_error` shown while the control plane withholds the configuration or answers
    // with errors; cleared by the next successful sync, and a newer announced version is
    // worth asking for at once.
    let mut cp_refusal: Option<String> = None;
    // Consecutive error answers.
    let mut failures: u32 = 0;
    let mut poll = tokio::time::interval(cfg.sync_poll_interval);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.tick().await;
    let mut want = true;
    loop {
        if want && retry_at.is_none_or(|t| tokio::time::Instant::now() >= t) {
            want = false;
            match syncer.sync().await {
                Ok(()) => {
                    retry_at = None;
                    rejections = 0;
                    failures = 0;
                    // At the control plane's head: whatever failed before (a refusal, an
                    // error answer, a dropped connection before this one) is over.
                    cp_refusal = None;
                    shared.update_link(|l| l.last_error = None);
                }
                Err(SyncError::Rejected(msg)) => {
                    // Doubles per consecutive rejection, up to 64x: a bad batch is never
                    // refetched in a tight loop, and a fixed one is picked up eventually.
                    let backoff = cfg.invalid_backoff * (1u32 << rejections.min(6));
                    rejections += 1;
                    tracing::warn!(control_plane = %cp, error = %msg, ?backoff, "deltas rejected; staying on the last good version");
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    want = true;
                    cp_refusal = None;
                }
                Err(SyncError::Withheld(msg)) => {
                    // The link is fine: keep it. The control plane announces every new
                    // version, which is when asking again can succeed (see the notification
                    // below); the same doubling back-off only guards against missing one.
                    let backoff = cfg.invalid_backoff * (1u32 << rejections.min(6));
                    rejections += 1;
                    if cp_refusal.as_ref() != Some(&msg) {
                        tracing::warn!(control_plane = %cp, error = %msg, "the control plane withholds the configuration; staying on the last good version");
                    }
                    shared.update_link(|l| l.last_error = Some(msg.clone()));
                    cp_refusal = Some(msg);
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    want = true;
                }
                Err(SyncError::Failed(msg)) => {
                    // Doubles from reconnect_min up to reconnect_max: a control plane whose
                    // database is down is not asked in a tight loop; the link stays up.
                    let backoff = cfg
                        .reconnect_min
                        .saturating_mul(1u32 << failures.min(16))
                        .min(cfg.reconnect_max);
                    failures += 1;
                    let shown = format!("control plane error: {msg}");
                    if cp_refusal.as_ref() != Some(&shown) {
                        tracing::warn!(control_plane = %cp, error = %msg, ?backoff, "the control plane answered with an error; staying on the last good version");
                    }
                    shared.update_link(|l| l.last_error = Some(shown.clone()));
                    cp_refusal = Some(shown);
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    want = true;
                }
                Err(SyncError::Link(msg)) => {
                    tracing::info!(control_plane = %cp, error = %msg, "sync failed; will retry");
                    retry_at = Some(tokio::time::Instant::now() + cfg.reconnect_min);
                    want = true;
                }
            }
        }
        let far = tokio::time::Instant::now() + Duration::from_secs(24 * 3600);
        let wake = retry_at.filter(|_| want).unwrap_or(far);
        let report_at = syncer.report_due();
        tokio::select! {
            c = notified.changed() => {
                if c.is_err() { return Ok(End::Closed("handler gone".into())) }
                let v = *notified.borrow_and_update();
                if v > shared.store.state().version {
                    want = true;
                    if cp_refusal.is_some() {
                        // A new configuration may be one the control plane sends (and a
                        // commit means its database works again): ask now.
                        retry_at = None;
                    }
                }
            }
            Some(first) = pushes.recv() => {
                let mut batch = vec![first];
                while batch.len() < PUSHES_PER_COMMIT {
                    match pushes.try_recv() {
                        Ok(p) => batch.push(p),
                        Err(_) => break,
                    }
                }
                if want || retry_at.is_some() {
                    // A pull is due (or backing off after a failure): it fetches these too.
                    continue;
                }
                match syncer.apply_pushes(batch).await {
                    Ok(Pushed::AtHead) => {}
                    Ok(Pushed::Fetch) => want = true,
                    Err(e) => {
                        tracing::warn!(control_plane = %cp, error = %e, "pushed deltas rejected; fetching instead");
                        retry_at = Some(tokio::time::Instant::now() + cfg.invalid_backoff);
                        want = true;
                    }
                }
            }
            _ = poll.tick() => want = true,
            _ = tokio::time::sleep_until(report_at.unwrap_or(far)), if report_at.is_some() => {
                syncer.send_due_report().await;
            }
            _ = tokio::time::sleep_until(wake) => {}
            r = peer.closed() => return Ok(End::Closed(describe_close(&r, cfg.cluster.max_payload))),
            _ = stopped(&mut stop) => {
                close_and_wait(&peer).await;
                return Ok(End::Stopped);
            }
        }
    }
}

/// Why the connection ended, for `last_error`, with what to do about it where we know.
fn describe_close(r: &CloseReason, max_payload: usize) -> String {
    match r {
        CloseReason::Local { code: 1009, .. } => format!(
            "{r}: a message from the control plane was larger than this data plane's \
             --cluster-max-payload ({max_payload} bytes); raise it, or run a control plane that \
             pages answers to the data plane's limit"
        ),
        CloseReason::IdleTimeout => {
            format!("{r}: the control plane stopped answering pings (network, or it is overloaded)")
        }
        _ => r.to_string(),
    }
}

/// Resolves once `stop` is true (without holding the watch guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Closes the connection and waits (briefly) until its tasks are gone, so nothing holds the
/// store after shutdown.
async fn close_and_wait(peer: &Peer) {
    peer.close(1001, "data plane shutting down");
    let _ = tokio::time::timeout(Duration::from_secs(5), peer.closed()).await;
}

struct DpHandler {
    shared: Arc<DpShared>,
    notified: watch::Sender<i64>,
    /// Pushed versions, for the session loop to apply in order.
    pushes: tokio::sync::mpsc::Sender<QueuedPush>,
}

/// A pushed version as received: its text, and its head read once.
struct QueuedPush {
    text: Box<RawValue>,
    /// `None`: unreadable, or not what a push may carry (a full sync, a transfer, no
    /// `latest_version`): the data plane fetches instead.
    head: Option<PushHead>,
}

struct PushHead {
    after: i64,
    latest: i64,
    /// The newest version the push names: its `latest_version`, or the control plane's head
    /// when that is further (a cut push).
    announced: i64,
    /// The control plane's epoch and the answer's namespace, as byte ranges of `text`.
    epoch: std::ops::Range<usize>,
    namespace: std::ops::Range<usize>,
}

impl QueuedPush {
    fn read(text: Box<RawValue>) -> QueuedPush {
        let all = text.get();
        // `read_push` and `read_answer` return slices of `all`.
        let range = |part: &str| {
            let start = part.as_ptr() as usize - all.as_ptr() as usize;
            start..start + part.len()
        };
        let head = v2::read_push(all).ok().and_then(|push| {
            let answer = v2::read_answer(push.answer).ok()?;
            if answer.full_sync || answer.transfer.is_some() {
                return None;
            }
            let latest = answer.latest_version?.get();
            Some(PushHead {
                after: push.after.get(),
                latest,
                announced: answer.head.map_or(latest, |h| h.get().max(latest)),
                epoch: range(push.epoch),
                namespace: range(answer.namespace),
            })
        });
        QueuedPush { text, head }
    }

    fn epoch(&self, head: &PushHead) -> &str {
        &self.text.get()[head.epoch.clone()]
    }

    fn namespace(&self, head: &PushHead) -> &str {
        &self.text.get()[head.namespace.clone()]
    }
}

/// Pushes up to this size are queued on the connection's reader ([`Handler::notify_now`]).
const INLINE_PUSH_BYTES: usize = 64 * 1024;

impl DpHandler {
    /// Queues a pushed version for the session loop (or, when the loop is behind, has the
    /// version fetched instead).
    fn take_push(&self, params: Box<RawValue>) {
        let push = QueuedPush::read(params);
        let latest = push.head.as_ref().map(|h| h.announced);
        if let Some(l) = latest {
            self.shared.metrics.learned(l);
            self.shared
                .update_link(|s| s.cp_version_seen = s.cp_version_seen.max(l));
        }
        if let Err(e) = self.pushes.try_send(push) {
            // The loop is behind: the version is fetched instead.
            tracing::debug!(error = %e, "push queue full");
            if let Some(l) = latest {
                self.notified.send_if_modified(|cur| {
                    let newer = l > *cur;
                    *cur = (*cur).max(l);
                    newer
                });
            }
        }
    }
}

impl Handler for DpHandler {
    fn methods(&self) -> &[&'static str] {
        DP_METHODS
    }

    fn raw_methods(&self) -> &[&'static str] {
        &[PUSH_DELTAS]
    }

    fn call_raw(
        &self,
        _peer: Peer,
        _method: String,
        params: Box<RawValue>,
        _notification: bool,
    ) -> BoxFuture<'static, Result<Reply, RpcError>> {
        self.take_push(params);
        let result = Ok(Reply::Value(Value::Bool(true)));
        Box::pin(async move { result })
    }

    /// A small push is queued right on the reader (one task hop less between the socket and
    /// the apply); a large one goes through [`Handler::call_raw`] and is not copied.
    fn notify_now(
        &self,
        _peer: &Peer,
        method: &str,
        params: &RawValue,
    ) -> Option<Result<(), RpcError>> {
        if method != PUSH_DELTAS || params.get().len() > INLINE_PUSH_BYTES {
            return None;
        }
        self.take_push(params.to_owned());
        Some(Ok(()))
    }

    fn call(
        &self,
        _peer: Peer,
        method: String,
        params: Value,
        _notification: bool,
    ) -> BoxFuture<'static, Result<Reply, RpcError>> {
        let shared = self.shared.clone();
        let notified = self.notified.clone();
        Box::pin(async move {
            if method != NOTIFY_NEW_VERSION {
                return Err(RpcError::method_not_found());
            }
            let v = NotifyNewVersion::from_params(&params)?.new_version.get();
            shared.metrics.learned(v);
            shared.update_link(|l| l.cp_version_seen = l.cp_version_seen.max(v));
            notified.send_if_modified(|cur| {
                let newer = v > *cur;
                if newer {
                    *cur = v;
                }
                newer
            });
            Ok(Value::Bool(true).into())
        })
    }
}

/// What became of pushed versions.
enum Pushed {
    /// Applied, and the control plane's head is no further.
    AtHead,
    /// Not applicable as they came (a gap, another epoch, a cut answer): fetch.
    Fetch,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::Rejected(m)
            | SyncError::Withheld(m)
            | SyncError::Failed(m)
            | SyncError::Link(m) => f.write_str(m),
        }
    }
}

enum SyncError {
    /// The control plane sent something this data plane will not apply.
    Rejected(String),
    /// The control plane withholds the configuration from this data plane (its plugins):
    /// its message.
    Withheld(String),
    /// The control plane answered with an error (its database is down, say): the link
    /// works, the answer did not. Shown in the status; retried with a back-off.
    Failed(String),
    /// The exchange failed (timeout, disconnect); nothing was applied.
    Link(String),
}

struct Syncer {
    /// Checked between answers, so a long catch-up does not delay shutdown.
    stop: watch::Receiver<bool>,
    shared: Arc<DpShared>,
    peer: Peer,
    cp_epoch: Option<String>,
    paging: bool,
    reports: std::sync::Mutex<Reports>,
}

/// When the status report after pushed versions is due (`--status-report-interval`).
struct Reports {
    interval: Duration,
    last_sent: Option<tokio::time::Instant>,
    /// A pushed version was applied and not reported yet.
    pending: bool,
}

impl Syncer {
    /// Pulls until the data plane is at the control plane's head (an empty answer), applying
    /// each answer in one transaction.
    async fn sync(&self) -> Result<(), SyncError> {
        // Bounded: an answer carries at most max_versions, so a long catch-up takes a few rounds.
        for _ in 0..10_000 {
            if *self.stop.borrow() {
                return Ok(());
            }
            let state = self.shared.store.state();
            let epoch_ok = match (&state.epoch, &self.cp_epoch) {
                (Some(ours), Some(theirs)) => ours == theirs,
                _ => true,
            };
            if !epoch_ok {
                tracing::info!(ours = ?state.epoch, theirs = ?self.cp_epoch, "the control plane's change log is a different one (new epoch): full sync");
            }
            let asked = if epoch_ok { state.version } else { 0 };
            // A deltaplane control plane records where we are from this request already: a
            // data plane that comes back up to date sends nothing else.
            let params = GetDelta::new(
                Version::new(asked),
                (self.paging && asked > 0).then(|| state.state_hash.to_hex()),
            )
            .to_params();
            self.shared.update_link(|l| l.sync_requests += 1);
            let text = self
                .peer
                .call(GET_DELTA, params)
                .await
                .map_err(|e| match e {
                    CallError::Rpc(e)
                        if e.code == RpcError::SERVER_ERROR && is_withheld(&e.message) =>
                    {
                        SyncError::Withheld(e.message)
                    }
                    CallError::Rpc(e) => SyncError::Failed(format!("get_delta: {e}")),
                    e => SyncError::Link(format!("get_delta: {e}")),
                })?;
            let applied = self.apply_answer(text, asked).await?;
            match applied {
                None => {
                    self.shared.update_link(|l| {
                        l.last_sync_at = Some(crate::node::now_secs());
                        l.cp_version_seen = l.cp_version_seen.max(state.version);
                    });
                    return Ok(());
                }
                Some((v, full)) => {
                    self.report_applied(v, |l| {
                        if full {
                            l.full_syncs += 1;
                        } else {
                            l.incremental_syncs += 1;
                        }
                    })
                    .await;
                    // A deltaplane CP said where its head is: stop once there. (A Kong CP
                    // does not; ask again until an answer is empty.)
                    if self.paging && v >= self.shared.link().cp_version_seen {
                        return Ok(());
                    }
                }
            }
        }
        Ok(())
    }

    /// Applies one get_delta answer: `Ok(Some((version, full_sync)))`, or `Ok(None)` when
    /// there was nothing to apply (up to date).
    async fn apply_answer(
        &self,
        text: Box<RawValue>,
        asked: i64,
    ) -> Result<Option<(i64, bool)>, SyncError> {
        let answer = v2::read_answer(text.get()).map_err(|e| SyncError::Rejected(e.to_string()))?;
        let full = answer.full_sync;
        let latest = answer.latest_version.map(Version::get);
        let head = answer.head.map(Version::get);
        let transfer = answer.transfer;
        if let Some(l) = latest.max(head) {
            self.shared
                .update_link(|s| s.cp_version_seen = s.cp_version_seen.max(l));
        }
        if let Some(t) = &transfer {
            if !self.paging {
                return Err(SyncError::Rejected("unexpected paged transfer".into()));
            }
            let kind = match (full, latest) {
                (true, Some(version)) => ApplyKind::Full {
                    version,
                    epoch: self.cp_epoch.clone(),
                },
                (false, latest) => ApplyKind::Incremental {
                    expect_from: asked,
                    latest,
                },
                (true, None) => {
                    return Err(SyncError::Rejected(
                        "paged full sync without latest_version".into(),
                    ));
                }
            };
            let v = self.paged(t, kind).await?;
            self.shared.update_link(|l| l.paged_transfers += 1);
            return Ok(Some((v, full)));
        }
        let store = self.shared.store.clone();
        let epoch = self.cp_epoch.clone();
        let bytes = text.get().len();
        let started = std::time::Instant::now();
        let outcome = tokio::task::spawn_blocking(move || {
            apply_stream(&store, text.get(), |first| {
                if full {
                    Some(ApplyKind::Full {
                        version: latest.or(first)?,
                        epoch,
                    })
                } else {
                    Some(ApplyKind::Incremental {
                        expect_from: asked,
                        latest,
                    })
                }
            })
        })
        .await
        .map_err(|e| SyncError::Link(format!("apply task: {e}")))?;
        if let Ok(Some(_)) = &outcome {
            let kind = if full {
                DpApplyKind::Full
            } else {
                DpApplyKind::Incremental
            };
            self.shared.metrics.apply_duration(kind, started.elapsed());
        }
        match outcome {
            Ok(Some(v)) if full => {
                let entities = self.shared.store.state().n_entities;
                tracing::info!(version = v, entities, bytes, took = ?started.elapsed(), "full sync applied");
                Ok(Some((v, full)))
            }
            Ok(v) => Ok(v.map(|v| (v, full))),
            Err(e) => Err(self.reject(e, latest).await),
        }
    }

    /// Applies pushed versions that continue this data plane's version, in order, all in one
    /// transaction (versions that arrived while the last commit ran are coalesced into the
    /// next), with the same checks as a `get_delta` answer and the same status report.
    async fn apply_pushes(&self, batch: Vec<QueuedPush>) -> Result<Pushed, SyncError> {
        let state = self.shared.store.state();
        if state.epoch.is_some() && state.epoch != self.cp_epoch {
            return Ok(Pushed::Fetch);
        }
        let (chain, at, fetch) = chain_pushes(state.version, self.cp_epoch.as_deref(), batch);
        if chain.is_empty() {
            if fetch {
                self.shared.update_link(|l| l.pushes_refused += 1);
            }
            return Ok(if fetch { Pushed::Fetch } else { Pushed::AtHead });
        }
        let pushed = chain.len() as u64;
        let started = std::time::Instant::now();
        let store = self.shared.store.clone();
        let from = state.version;
        let outcome = apply_in_place(move || {
            let kind = ApplyKind::Incremental {
                expect_from: from,
                latest: Some(at),
            };
            let mut apply = store.begin(kind)?;
            apply.feed(|sink| {
                for (push, held) in &chain {
                    let head = push
                        .head
                        .as_ref()
                        .expect("only readable pushes are chained");
                    feed_deltas_above(push.namespace(head), *held, sink)?;
                }
                Ok(())
            })?;
            Ok::<_, ApplyError>(apply.commit()?.version)
        })
        .map_err(|e| SyncError::Link(format!("apply task: {e}")))?;
        let v = match outcome {
            Ok(v) => v,
            Err(e) => return Err(self.reject(e, Some(at)).await),
        };
        self.shared
            .metrics
            .apply_duration(DpApplyKind::Incremental, started.elapsed());
        self.report_pushed(v, |l| {
            l.incremental_syncs += 1;
            l.pushes_applied += pushed;
            if fetch {
                l.pushes_refused += 1;
            }
        })
        .await;
        if fetch || self.shared.link().cp_version_seen > v {
            return Ok(Pushed::Fetch);
        }
        Ok(Pushed::AtHead)
    }

    /// [`Syncer::report_applied`] for pushed versions: the report to the control plane waits
    /// when one went out less than the status report interval ago ([`Syncer::report_due`]).
    async fn report_pushed(&self, v: i64, count: impl FnOnce(&mut super::LinkStatus)) {
        let wait = {
            let mut r = self.reports.lock().unwrap_or_else(|e| e.into_inner());
            let wait = r.last_sent.is_some_and(|t| t.elapsed() < r.interval);
            r.pending = wait;
            wait
        };
        if wait {
            self.record_applied(v, count);
        } else {
            self.report_applied(v, count).await;
        }
    }

    /// When the waiting report is due, if one waits.
    fn report_due(&self) -> Option<tokio::time::Instant> {
        let r = self.reports.lock().unwrap_or_else(|e| e.into_inner());
        r.pending
            .then(|| r.last_sent.map(|t| t + r.interval))
            .flatten()
    }

    /// Sends the waiting report: where the data plane is now.
    async fn send_due_report(&self) {
        let state = self.shared.store.state();
        self.send_report(state.version, state.state_hash).await;
    }

    /// The link's status and watchers after a committed apply of `v`.
    fn record_applied(&self, v: i64, count: impl FnOnce(&mut super::LinkStatus)) {
        self.shared.update_link(|l| {
            count(l);
            l.last_sync_at = Some(crate::node::now_secs());
            l.last_error = None;
            l.cp_version_seen = l.cp_version_seen.max(v);
        });
        // Watchers see the version only once the status reflects it.
        self.shared.applied(v);
    }

    /// After a committed apply of `v`: the link's status (`count` adds the apply's kind),
    /// watchers, and the status report to the control plane.
    async fn report_applied(&self, v: i64, count: impl FnOnce(&mut super::LinkStatus)) {
        self.record_applied(v, count);
        let hash = self.shared.store.state().state_hash;
        self.send_report(v, hash).await;
    }

    /// Tells the control plane where we are (Kong's status notification); deltaplane control
    /// planes record the state hash too.
    async fn send_report(&self, v: i64, hash: crate::proto::StateHash) {
        {
            let mut r = self.reports.lock().unwrap_or_else(|e| e.into_inner());
            r.last_sent = Some(tokio::time::Instant::now());
            r.pending = false;
        }
        let status = GetDelta::new(Version::new(v), self.paging.then(|| hash.to_hex()));
        let _ = self.peer.notify(GET_DELTA, status.to_params()).await;
    }

    /// Fetches a paged transfer's pages one after the other and applies them as they come
    /// ([`DpStore::apply_pages`]): page n is decoded, validated and written on blocking
    /// threads while page n + 1 is fetched, in one write transaction committed after the
    /// last page. A fetch that fails ends the transfer with nothing written.
    async fn paged(&self, t: &v2::TransferRef, kind: ApplyKind) -> Result<i64, SyncError> {
        tracing::info!(transfer = %t.id, pages = t.pages, ?kind, "paged transfer started");
        let started = std::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(u64, Box<RawValue>)>(PAGES_AHEAD);
        let store = self.shared.store.clone();
        let (id, k, pages) = (t.id.clone(), kind.clone(), t.pages as u64);
        let applying = tokio::task::spawn_blocking(move || {
            let arrived = std::iter::from_fn(|| rx.blocking_recv())
                .map(|(no, text)| (no, Box::<str>::from(text).into_boxed_bytes()));
            store.apply_pages(&id, k, pages, arrived, decode_page)
        });
        let mut fetch_error = None;
        for page in 0..t.pages {
            let fetched = self
                .peer
                .call(
                    GET_PAGE,
                    GetPage {
                        id: t.id.clone(),
                        page: page as u64,
                    }
                    .to_params(),
                )
                .await;
            match fetched {
                // A send fails only when the apply ended early; it says why.
                Ok(text) => {
                    if tx.send((page as u64, text)).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    fetch_error = Some(match e {
                        CallError::Rpc(e) => SyncError::Failed(format!("get_page {page}: {e}")),
                        e => SyncError::Link(format!("get_page {page}: {e}")),
                    });
                    break;
                }
            }
        }
        // The apply commits after the last page, or finds the transfer cut short.
        drop(tx);
        let fetched = started.elapsed();
        let committed = applying
            .await
            .map_err(|e| SyncError::Link(format!("apply task: {e}")))?;
        match &committed {
            Ok(a) => {
                let k = if matches!(kind, ApplyKind::Full { .. }) {
                    DpApplyKind::Full
                } else {
                    DpApplyKind::Incremental
                };
                // The apply ran from the first page to the commit.
                self.shared.metrics.apply_duration(k, started.elapsed());
                tracing::info!(transfer = %t.id, pages = t.pages, version = a.version, entities = a.n_entities, ?fetched, total = ?started.elapsed(), "paged transfer applied")
            }
            Err(e) => {
                tracing::info!(transfer = %t.id, pages = t.pages, ?fetched, total = ?started.elapsed(), error = %e, "paged transfer failed")
            }
        }
        if let Some(e) = fetch_error {
            return Err(e);
        }
        match committed {
            Ok(a) => Ok(a.version),
            Err(e) => {
                let latest = match kind {
                    ApplyKind::Full { version, .. } => Some(version),
                    ApplyKind::Incremental { latest, .. } => latest,
                };
                Err(self.reject(e, latest).await)
            }
        }
    }

    /// Reports a rejected batch to the control plane and turns it into a `SyncError`.
    async fn reject(&self, e: ApplyError, latest: Option<i64>) -> SyncError {
        let message = e.to_string();
        self.shared
            .update_link(|l| l.last_error = Some(message.clone()));
        if let ApplyError::Invalid {
            message,
            fields,
            flattened,
        } = &e
        {
            let report = NotifyValidationError {
                version: latest.map(Version::new),
                message: message.clone(),
                fields: fields.clone(),
                flattened_errors: flattened.clone(),
            };
            let _ = self
                .peer
                .notify(NOTIFY_VALIDATION_ERROR, report.to_params())
                .await;
        }
        SyncError::Rejected(message)
    }
}

/// Streams the deltas of a get_delta answer (`{"default":{…}}`) into one store transaction,
/// parsed and validated on a second thread while this one writes ([`Apply::feed`]).
/// `kind` is given the first delta's version (for Kong control planes that send no
/// `latest_version`). `Ok(None)` when there was nothing to apply.
///
/// [`Apply::feed`]: super::store::Apply::feed
pub fn apply_stream(
    store: &DpStore,
    answer: &str,
    kind: impl FnOnce(Option<i64>) -> Option<ApplyKind>,
) -> Result<Option<i64>, ApplyError> {
    let ns = v2::answer_namespace(answer).map_err(invalid)?;
    // The first delta only (parsing stops there): the kind may depend on its version.
    let mut first = None;
    let peeked = v2::for_each_delta(ns, |v| {
        first = Some(v);
        Err(String::new())
    });
    let first = match first {
        Some(v) => Some(
            Delta::from_wire(v)
                .map_err(|e| invalid(format!("sync deltas is invalid: {e}")))?
                .version,
        ),
        None => {
            peeked.map_err(invalid)?;
            None
        }
    };
    let Some(first) = first else {
        return match kind(None) {
            // A full sync of nothing still replaces the configuration.
            Some(k @ ApplyKind::Full { .. }) => Ok(Some(store.begin(k)?.commit()?.version)),
            _ => Ok(None),
        };
    };
    let k = kind(Some(first)).ok_or_else(|| invalid("no version to apply".into()))?;
    let mut apply = store.begin(k)?;
    apply.feed(|sink| feed_deltas(ns, sink))?;
    Ok(Some(apply.commit()?.version))
}

/// A rejection that names no entity.
fn invalid(message: String) -> ApplyError {
    ApplyError::Invalid {
        message,
        fields: Value::Object(Default::default()),
        flattened: Vec::new(),
    }
}

/// The decoder [`DpStore::apply_pages`] calls back for each page `paged` fetched: the
/// page's JSON text (`{"deltas": [...]}`), its deltas fed to the apply one at a time.
pub(crate) fn decode_page(
    page_no: u64,
    bytes: &[u8],
    sink: &mut DeltaSink<'_>,
) -> Result<(), ApplyError> {
    let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("page {page_no}: {e}")))?;
    feed_deltas(text, sink).map_err(|e| match e {
        ApplyError::Invalid {
            message,
            fields,
            flattened,
        } if flattened.is_empty() => ApplyError::Invalid {
            message: format!("page {page_no}: {message}"),
            fields,
            flattened,
        },
        e => e,
    })
}

/// Picks the queued pushes that continue from version `held` under the control plane's
/// `epoch`, in order: each with the version through which its deltas are already held, then
/// the version the chain leads to, and whether a fetch is needed (a push that is unreadable,
/// of another epoch, or leaves a gap after the data plane's version).
///
/// A push may start below the version held (`after < held < latest_version`): the control
/// plane built it from a status report older than the data plane's latest apply (a report in
/// flight when it pushed). Its deltas through `held` are the ones already applied, from the
/// same change log (the epoch matches), so the rest continue the data plane's version and
/// apply without a `get_delta` round trip.
fn chain_pushes(
    held: i64,
    epoch: Option<&str>,
    batch: Vec<QueuedPush>,
) -> (Vec<(QueuedPush, i64)>, i64, bool) {
    let mut at = held;
    let mut chain = Vec::with_capacity(batch.len());
    for push in batch {
        let Some(head) = &push.head else {
            return (chain, at, true);
        };
        if Some(push.epoch(head)) != epoch {
            return (chain, at, true);
        }
        if head.latest <= at {
            continue; // already held (fetched meanwhile)
        }
        if head.after > at {
            return (chain, at, true);
        }
        let skip = at;
        at = head.latest;
        chain.push((push, skip));
    }
    (chain, at, false)
}

/// Feeds the deltas of `ns_json` (an object with a `deltas` array) to `sink`, one at a time.
fn feed_deltas(ns_json: &str, sink: &mut DeltaSink<'_>) -> Result<(), ApplyError> {
    feed_deltas_above(ns_json, i64::MIN, sink)
}

/// Feeds an answer's deltas of versions above `held` to `sink` (a push's deltas through
/// `held` are already applied: see [`chain_pushes`]).
fn feed_deltas_above(ns_json: &str, held: i64, sink: &mut DeltaSink<'_>) -> Result<(), ApplyError> {
    let mut failure = None;
    let parsed = v2::for_each_delta(ns_json, |v| {
        Delta::from_wire(v)
            .map_err(|e| invalid(format!("sync deltas is invalid: {e}")))
            .and_then(|d| if d.version > held { sink(d) } else { Ok(()) })
            .map_err(|e| {
                failure = Some(e);
                String::new()
            })
    });
    match failure {
        Some(f) => Err(f),
        None => parsed.map_err(invalid),
    }
}

impl fmt::Debug for Syncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Syncer")
            .field("paging", &self.paging)
            .finish()
    }
}

/// Runs a pushed version's apply (a durable commit of a few pages) on this thread. The link
/// runs on a thread and a single-threaded runtime of its own (`dp::on_own_thread`), so
/// blocking it holds up only the link, and the apply costs no thread hop; measured with
/// `loadtest latency` (1 and 10 DPs), DP CPU per applied version 0.39–0.44 ms through
/// `block_in_place` or 0.34–0.37 ms inline. Elsewhere (a multi-threaded runtime) the worker
/// hands its other tasks to another thread first (`block_in_place`).
fn apply_in_place<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let run = || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
            .map_err(|_| "the apply panicked".to_owned())
    };
    match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(run),
        _ => run(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::proto::{Delta, Version};

    fn delta(v: i64) -> Delta {
        Delta {
            entity_type: "services".into(),
            id: format!("00000000-0000-4000-8000-{v:012}"),
            ws_id: "ws".into(),
            version: v,
            entity: Some(
                json!({"id": format!("00000000-0000-4000-8000-{v:012}"), "name": format!("s{v}")}),
            ),
        }
    }

    /// A push of versions `after + 1 ..= latest` (one delta each) under `epoch`, as queued.
    fn push(after: i64, latest: i64, epoch: &str) -> QueuedPush {
        let deltas: Vec<String> = (after + 1..=latest)
            .map(|v| delta(v).to_wire().to_string())
            .collect();
        let answer = v2::write_answer(
            deltas.join(",").as_bytes(),
            &v2::AnswerHead {
                latest_version: Version::new(latest),
                ..Default::default()
            },
        );
        // The params of the message the control plane sends.
        let message: Value =
            serde_json::from_slice(&v2::write_push(Version::new(after), epoch, &answer)).unwrap();
        QueuedPush::read(RawValue::from_string(message["params"].to_string()).unwrap())
    }

    fn chained(chain: &[(QueuedPush, i64)]) -> Vec<(i64, i64, i64)> {
        chain
            .iter()
            .map(|(p, held)| {
                let h = p.head.as_ref().unwrap();
                (h.after, h.latest, *held)
            })
            .collect()
    }

    #[test]
    fn pushes_chain_from_the_version_held() {
        let (chain, at, fetch) =
            chain_pushes(5, Some("e1"), vec![push(5, 6, "e1"), push(6, 8, "e1")]);
        assert_eq!(chained(&chain), [(5, 6, 5), (6, 8, 6)]);
        assert_eq!((at, fetch), (8, false));
    }

    #[test]
    fn a_push_from_below_the_version_held_continues_it() {
        // Built from a report older than the apply of 6: its delta of 6 is skipped.
        let (chain, at, fetch) =
            chain_pushes(6, Some("e1"), vec![push(5, 7, "e1"), push(7, 8, "e1")]);
        assert_eq!(chained(&chain), [(5, 7, 6), (7, 8, 7)]);
        assert_eq!((at, fetch), (8, false));
        // Entirely held: nothing to apply, nothing to fetch.
        let (chain, at, fetch) = chain_pushes(7, Some("e1"), vec![push(5, 7, "e1")]);
        assert!(chain.is_empty());
        assert_eq!((at, fetch), (7, false));
    }

    #[test]
    fn a_gap_another_epoch_or_an_unreadable_push_is_fetched() {
        let (chain, at, fetch) =
            chain_pushes(5, Some("e1"), vec![push(5, 6, "e1"), push(7, 8, "e1")]);
        assert_eq!(chained(&chain), [(5, 6, 5)]);
        assert_eq!((at, fetch), (6, true));
        let (chain, _, fetch) = chain_pushes(5, Some("e1"), vec![push(5, 6, "e2")]);
        assert!(chain.is_empty() && fetch);
        let unreadable = QueuedPush::read(RawValue::from_string("[{}]".into()).unwrap());
        let (chain, _, fetch) = chain_pushes(5, Some("e1"), vec![unreadable]);
        assert!(chain.is_empty() && fetch);
    }

    #[test]
    fn held_deltas_are_not_fed_again() {
        let p = push(5, 8, "e1");
        let head = p.head.as_ref().unwrap();
        let mut fed = Vec::new();
        feed_deltas_above(p.namespace(head), 6, &mut |d: Delta| {
            fed.push(d.version);
            Ok(())
        })
        .unwrap();
        assert_eq!(fed, [7, 8]);
    }
}
