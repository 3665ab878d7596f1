//! The control plane's answer to `kong.sync.v2.get_delta`: real incremental deltas from the
//! change log, cut at version boundaries to fit a frame, or a full snapshot; and paged
//! transfers (`deltaplane.sync.v1.get_page`) for answers larger than one frame.
//!
//! Answers are built as JSON text straight from the stored entity text: no `Value` tree is
//! built for entities, and the full snapshot of a version is built once and shared by every
//! data plane that needs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cp::recent::Recent;
use crate::cp::store::{Store, StoreError, VersionInfo};
use crate::proto::Version;
use crate::proto::v2::{AnswerHead, DeltaText, RawDelta, write_answer, write_page};

/// Deltas of one answer or snapshot, with the version they lead to.
#[derive(Debug)]
pub struct Serialized {
    pub version: i64,
    pub epoch: String,
    pub full_sync: bool,
    deltas: DeltaText,
}

impl Serialized {
    fn new(version: i64, epoch: String, full_sync: bool) -> Serialized {
        Serialized {
            version,
            epoch,
            full_sync,
            deltas: DeltaText::new(),
        }
    }
}

fn result_text(
    deltas: &[u8],
    full_sync: bool,
    latest: i64,
    transfer: Option<(&str, usize)>,
    head: Option<i64>,
) -> String {
    write_answer(
        deltas,
        &AnswerHead {
            full_sync,
            latest_version: Version::new(latest),
            transfer,
            head: head.map(Version::new),
        },
    )
}

/// Sizes the feed works with.
#[derive(Debug, Clone, Copy)]
pub struct FeedLimits {
    /// Largest uncompressed answer assumed to fit one frame without trying to compress it.
    pub frame_bytes: usize,
    /// Largest uncompressed answer ever sent in one frame (the peers' decompressed cap).
    pub max_decompressed: usize,
    /// Most versions in one incremental answer.
    pub max_versions: i64,
    /// Bytes of recent versions' deltas kept in memory ([`Recent`]); 0 turns it off.
    pub recent_bytes: usize,
}

/// What kind of peer asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asker {
    /// The peer announced `deltaplane.sync.v1` and can fetch pages.
    pub paging: bool,
    /// The peer's frame encoding (whether an answer fits one frame depends on it).
    pub encoding: &'static str,
    /// The largest frame the peer takes (compressed): the smaller of the control plane's
    /// `cluster_max_payload` and the one the data plane announced.
    pub max_payload: usize,
}

impl Asker {
    /// The peer's decompressed-size cap that goes with its payload limit.
    fn max_decompressed(&self) -> usize {
        self.max_payload.saturating_mul(16)
    }
}

/// An answer from the recent versions ([`Feed::recent_answer`]).
pub struct RecentAnswer {
    pub text: String,
    pub decision: Decision,
    /// The newest version the window held.
    pub top: i64,
    /// The change log's epoch.
    pub epoch: std::sync::Arc<str>,
}

/// Why the feed could not answer.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The answer does not fit one frame and the peer cannot page (a Kong data plane).
    #[error(
        "the configuration at version {version} needs {bytes} bytes, more than one frame \
         (cluster_max_payload) carries, and the data plane cannot fetch it in pages"
    )]
    TooLarge { version: i64, bytes: usize },
    /// A shared read failed (the message of the underlying error).
    #[error("{0}")]
    Shared(String),
    #[error("unknown or expired transfer {0}")]
    UnknownTransfer(String),
    #[error("transfer {id} has {pages} pages; page {page} does not exist")]
    NoSuchPage {
        id: String,
        page: usize,
        pages: usize,
    },
}

/// An answer larger than one frame, fetched page by page.
struct Transfer {
    data: Arc<Serialized>,
    pages: Vec<(usize, usize)>,
    last_used: Instant,
}

/// Builds `get_delta` answers. One per control plane, shared by all connections.
pub struct Feed {
    store: Store,
    limits: FeedLimits,
    /// The recent versions, answered without a database read.
    recent: Recent,
    /// The latest full snapshot, shared by every data plane that needs a full sync at it.
    /// The latest snapshot built and when it was last used; [`Feed::expire_idle`] drops it
    /// so an idle CP does not keep a copy of the whole configuration.
    snapshot: tokio::sync::Mutex<Option<(Arc<Serialized>, Instant)>>,
    /// Full answers being built at once; each holds a copy of the configuration.
    full_permits: tokio::sync::Semaphore,
    transfers: Mutex<HashMap<String, Transfer>>,
    /// Incremental reads in flight, by (after, asker): data planes at the same version asking
    /// at the same time (every DP after a notification) share one database read.
    inflight: Mutex<HashMap<(i64, Asker), Arc<Shared>>>,
}

type Shared = tokio::sync::OnceCell<Result<Option<(String, Decision)>, String>>;

/// Full-sync answers built concurrently (bounds the CP's memory when many fresh DPs arrive).
const FULL_ANSWERS_AT_ONCE: usize = 2;

/// How long an idle paged transfer is kept.
const TRANSFER_TTL: Duration = Duration::from_secs(120);
/// Most bytes of deltas in one page of a transfer (less when a frame carries less). The data
/// plane applies a page while it fetches the next, so smaller pages fill and drain that
/// pipeline sooner and hold less in flight; 4 MiB pages cost one round trip per ~4,000
/// entities of 1 KB (issue 11: 27 pages for 100k).
const TRANSFER_PAGE_BYTES: usize = 4 << 20;
/// At most this many transfers are kept; the least recently used goes first.
const MAX_TRANSFERS: usize = 16;

/// What `get_delta` decided, for logs and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    UpToDate,
    Incremental { from: i64, to: i64 },
    Full { version: i64 },
    Paged { version: i64, full_sync: bool },
}

impl Feed {
    pub fn new(store: Store, limits: FeedLimits) -> Feed {
        Feed {
            recent: Recent::new(store.clone(), limits.recent_bytes),
            store,
            limits,
            snapshot: tokio::sync::Mutex::new(None),
            full_permits: tokio::sync::Semaphore::new(FULL_ANSWERS_AT_ONCE),
            transfers: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
        }
    }

    /// The `get_delta` result for a data plane at `dp_version` (`None`: not a valid version).
    /// `fits` says whether an uncompressed answer larger than `frame_bytes` still fits one frame
    /// once encoded for this peer.
    pub async fn get_delta(
        &self,
        dp_version: Option<i64>,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<(String, Decision), FeedError> {
        // The database reads are boxed: most answers come from memory, and this future is
        // part of every get_delta's, thousands at once after a notification to Kong data
        // planes (inlined, the reads made each some 9 KiB; issue 11: memory per DP).
        match dp_version.filter(|v| *v > 0) {
            Some(after) => {
                if let Some(answer) = self.answer_from_recent(after, asker).await {
                    return Ok(answer);
                }
                Box::pin(self.answer_from_database(after, asker, fits)).await
            }
            None => Box::pin(self.full(asker, fits)).await,
        }
    }

    /// The recent versions' window (also used by the pushes).
    pub fn recent(&self) -> &Recent {
        &self.recent
    }

    /// The answer for a data plane at `after` from the recent versions, when they cover it:
    /// no database read (one shared read per version fills the window).
    async fn answer_from_recent(&self, after: i64, asker: Asker) -> Option<(String, Decision)> {
        let head = *self.store.subscribe().borrow();
        if let Err(e) = self.recent.catch_up(head).await {
            tracing::debug!(error = %e, "reading recent versions failed");
            return None;
        }
        let a = self.recent_answer(after, asker)?;
        (a.top >= head).then_some((a.text, a.decision))
    }

    /// The answer for `after` from the recent versions as they are (no read), if they cover
    /// it: what [`Feed::get_delta`] answers from memory, and what a push carries.
    pub fn recent_answer(&self, after: i64, asker: Asker) -> Option<RecentAnswer> {
        let j =
            self.recent
                .deltas_after(after, self.frame_bytes(asker), self.limits.max_versions)?;
        let announced = asker.paging.then_some(j.top);
        let (text, decision) = if j.to == after {
            let text = result_text(&[], false, j.top, None, announced);
            (text, Decision::UpToDate)
        } else {
            let text = result_text(&j.deltas, false, j.to, None, announced);
            let decision = Decision::Incremental {
                from: after + 1,
                to: j.to,
            };
            (text, decision)
        };
        Some(RecentAnswer {
            text,
            decision,
            top: j.top,
            epoch: j.epoch,
        })
    }

    /// The answer for a data plane at `after` read from the change log.
    async fn answer_from_database(
        &self,
        after: i64,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<(String, Decision), FeedError> {
        match self.incremental_shared(after, asker, fits).await? {
            Some(answer) => Ok(answer),
            None => self.full(asker, fits).await,
        }
    }

    /// [`Feed::incremental`], with concurrent identical requests sharing one read. A request
    /// that arrives while a read is running gets that read's answer, which may miss a version
    /// committed meanwhile; its data plane is notified of that version and asks again.
    async fn incremental_shared(
        &self,
        after: i64,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<Option<(String, Decision)>, FeedError> {
        let key = (after, asker);
        let cell = self
            .inflight
            .lock()
            .expect("inflight lock")
            .entry(key)
            .or_default()
            .clone();
        let result = cell
            .get_or_init(|| async {
                self.incremental(after, asker, fits)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .clone();
        {
            let mut inflight = self.inflight.lock().expect("inflight lock");
            if inflight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                inflight.remove(&key);
            }
        }
        result.map_err(FeedError::Shared)
    }

    /// `None` when a full sync is needed (below the horizon, or ahead of the change log).
    async fn incremental(
        &self,
        after: i64,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<Option<(String, Decision)>, FeedError> {
        use std::ops::ControlFlow;
        let budget = self.frame_bytes(asker);
        let mut out = Serialized::new(after, String::new(), false);
        // (deltas, version, bytes) at the end of each whole version read so far.
        let mut boundaries: Vec<(usize, i64, usize)> = Vec::new();
        let mut cut_mid_version = false;
        let head = self
            .store
            .changes_after_raw(after, self.limits.max_versions, |c| {
                if c.version != out.version && !out.deltas.is_empty() {
                    boundaries.push((out.deltas.len(), out.version, out.deltas.byte_len()));
                    if out.deltas.byte_len() > budget {
                        return ControlFlow::Break(());
                    }
                }
                if out.deltas.byte_len() > budget && !boundaries.is_empty() {
                    // This version cannot be part of the answer any more.
                    cut_mid_version = true;
                    return ControlFlow::Break(());
                }
                out.version = c.version;
                out.deltas.push(&RawDelta::from(&c));
                ControlFlow::Continue(())
            })
            .await?;
        let info: VersionInfo = match head {
            Ok(info) => info,
            Err(_behind) => return Ok(None),
        };
        if after > info.version {
            // The data plane is ahead of this change log (a restored database): full sync.
            return Ok(None);
        }
        // Our data planes also learn the head, so after a cut answer they ask again at once
        // and after a complete one they do not ask again in vain.
        let head = asker.paging.then_some(info.version);
        if out.deltas.is_empty() {
            return Ok(Some((
                result_text(&[], false, info.version, None, head),
                Decision::UpToDate,
            )));
        }
        if !cut_mid_version && boundaries.last().map(|b| b.1) != Some(out.version) {
            boundaries.push((out.deltas.len(), out.version, out.deltas.byte_len()));
        }
        if let Some(&(n, version, _)) = boundaries.iter().rev().find(|b| b.2 <= budget) {
            let text = result_text(out.deltas.slice(0, n), false, version, None, head);
            return Ok(Some((
                text,
                Decision::Incremental {
                    from: after + 1,
                    to: version,
                },
            )));
        }
        // The first version alone is larger than the budget.
        let (n, version, _) = boundaries[0];
        let text = result_text(out.deltas.slice(0, n), false, version, None, head);
        if text.len() <= self.max_decompressed(asker) && fits(text.as_bytes()) {
            let decision = Decision::Incremental {
                from: after + 1,
                to: version,
            };
            return Ok(Some((text, decision)));
        }
        if !asker.paging {
            return Err(FeedError::TooLarge {
                version,
                bytes: text.len(),
            });
        }
        drop(text);
        out.deltas.truncate(n);
        out.version = version;
        out.epoch = info.epoch;
        Ok(Some(self.start_transfer(
            Arc::new(out),
            info.version,
            asker,
        )))
    }

    async fn full(
        &self,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
    ) -> Result<(String, Decision), FeedError> {
        let _permit = self
            .full_permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let snap = self.current_snapshot().await?;
        let body = snap.deltas.slice(0, snap.deltas.len());
        let size = body.len() + 160;
        // A peer that pages gets a snapshot larger than a frame in pages without trying to
        // compress it whole first: the pages always fit, the data plane applies each while
        // the next is on its way, and the attempt cost the whole copy and compression of a
        // configuration that rarely fits (issue 11: half the control plane's CPU for a
        // 100k-entity full sync, to find that 106 MiB compress to more than 16 MiB).
        let try_one_frame = !asker.paging || size <= self.frame_bytes(asker);
        if try_one_frame && size <= self.max_decompressed(asker) {
            let text = result_text(
                body,
                true,
                snap.version,
                None,
                asker.paging.then_some(snap.version),
            );
            if text.len() <= self.frame_bytes(asker) || fits(text.as_bytes()) {
                return Ok((
                    text,
                    Decision::Full {
                        version: snap.version,
                    },
                ));
            }
        }
        if !asker.paging {
            return Err(FeedError::TooLarge {
                version: snap.version,
                bytes: size,
            });
        }
        let head = snap.version;
        Ok(self.start_transfer(snap, head, asker))
    }

    /// The snapshot at the current head, built at most once per version (single flight).
    async fn current_snapshot(&self) -> Result<Arc<Serialized>, FeedError> {
        let mut cached = self.snapshot.lock().await;
        let head = self.store.version_info().await?;
        if let Some((s, used)) = cached
            .as_mut()
            .filter(|(s, _)| s.version == head.version && s.epoch == head.epoch)
        {
            *used = Instant::now();
            return Ok(s.clone());
        }
        *cached = None; // free the old one before building the next
        let (info, deltas) = self.store.snapshot_text().await?;
        let snap = Arc::new(Serialized {
            version: info.version,
            epoch: info.epoch,
            full_sync: true,
            deltas,
        });
        *cached = Some((snap.clone(), Instant::now()));
        Ok(snap)
    }

    /// The largest uncompressed answer assumed to fit one of `asker`'s frames without trying
    /// to compress it (room left for the JSON-RPC envelope).
    fn frame_bytes(&self, asker: Asker) -> usize {
        self.limits
            .frame_bytes
            .min(asker.max_payload.saturating_sub(1024).max(1024))
    }

    fn max_decompressed(&self, asker: Asker) -> usize {
        self.limits.max_decompressed.min(asker.max_decompressed())
    }

    /// Drops the cached snapshot and transfers not used for `idle`.
    pub fn expire_idle(&self, idle: Duration) {
        if let Ok(mut cached) = self.snapshot.try_lock()
            && cached
                .as_ref()
                .is_some_and(|(_, used)| used.elapsed() > idle)
        {
            *cached = None;
        }
        let mut transfers = self.transfers.lock().expect("transfers lock");
        transfers.retain(|_, t| t.last_used.elapsed() < TRANSFER_TTL);
    }

    /// Keeps `data` for paging; only peers that can page get here, so the answer carries the
    /// `head`.
    fn start_transfer(&self, data: Arc<Serialized>, head: i64, asker: Asker) -> (String, Decision) {
        let pages = data
            .deltas
            .pages(self.frame_bytes(asker).min(TRANSFER_PAGE_BYTES));
        let id = uuid::Uuid::new_v4().to_string();
        let decision = Decision::Paged {
            version: data.version,
            full_sync: data.full_sync,
        };
        let text = result_text(
            &[],
            data.full_sync,
            data.version,
            Some((&id, pages.len())),
            Some(head),
        );
        let mut transfers = self.transfers.lock().expect("transfers lock");
        let now = Instant::now();
        transfers.retain(|_, t| now.duration_since(t.last_used) < TRANSFER_TTL);
        while transfers.len() >= MAX_TRANSFERS {
            let oldest = transfers
                .iter()
                .min_by_key(|(_, t)| t.last_used)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => transfers.remove(&k),
                None => break,
            };
        }
        transfers.insert(
            id,
            Transfer {
                data,
                pages,
                last_used: now,
            },
        );
        (text, decision)
    }

    /// Page `page` of transfer `id`: `{"id":…,"page":…,"pages":…,"version":…,"deltas":[…]}`.
    pub fn page(&self, id: &str, page: usize) -> Result<String, FeedError> {
        let mut transfers = self.transfers.lock().expect("transfers lock");
        let t = transfers
            .get_mut(id)
            .ok_or_else(|| FeedError::UnknownTransfer(id.to_owned()))?;
        t.last_used = Instant::now();
        let &(from, to) = t.pages.get(page).ok_or_else(|| FeedError::NoSuchPage {
            id: id.to_owned(),
            page,
            pages: t.pages.len(),
        })?;
        Ok(write_page(
            t.data.deltas.slice(from, to),
            t.data.full_sync,
            id,
            page,
            t.pages.len(),
            Version::new(t.data.version),
        ))
    }
}
