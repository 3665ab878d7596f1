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

use crate::cp::store::{RawChange, Store, StoreError, VersionInfo};
use crate::proto::version_string;

/// Deltas serialised back to back (comma-separated, no brackets), with where each one starts.
#[derive(Debug)]
pub struct Serialized {
    pub version: i64,
    pub epoch: String,
    pub full_sync: bool,
    bytes: Vec<u8>,
    starts: Vec<usize>,
}

impl Serialized {
    fn new(version: i64, epoch: String, full_sync: bool) -> Serialized {
        Serialized {
            version,
            epoch,
            full_sync,
            bytes: Vec::new(),
            starts: Vec::new(),
        }
    }

    fn push(&mut self, c: &RawChange<'_>) {
        if !self.starts.is_empty() {
            self.bytes.push(b',');
        }
        self.starts.push(self.bytes.len());
        write_delta(&mut self.bytes, c);
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Bytes of the deltas `range`, comma-separated.
    fn slice(&self, from: usize, to: usize) -> &[u8] {
        if from >= to {
            return &[];
        }
        let start = self.starts[from];
        let end = if to < self.starts.len() {
            self.starts[to] - 1 // the comma before delta `to`
        } else {
            self.bytes.len()
        };
        &self.bytes[start..end]
    }

    /// Cuts the deltas into pages of at most `page_bytes` each (a single delta larger than
    /// that gets a page of its own). Returns the delta index ranges.
    fn pages(&self, page_bytes: usize) -> Vec<(usize, usize)> {
        let end_of = |i: usize| {
            if i + 1 < self.starts.len() {
                self.starts[i + 1] - 1
            } else {
                self.bytes.len()
            }
        };
        let mut pages = Vec::new();
        let mut from = 0;
        while from < self.starts.len() {
            let mut to = from + 1;
            while to < self.starts.len() && end_of(to) - self.starts[from] <= page_bytes {
                to += 1;
            }
            pages.push((from, to));
            from = to;
        }
        pages
    }
}

/// `{"entity":…,"pk":{"id":…},"type":…,"version":…,"ws_id":…}` — keys in serde_json's order.
fn write_delta(out: &mut Vec<u8>, c: &RawChange<'_>) {
    out.extend_from_slice(b"{\"entity\":");
    match c.entity {
        Some(text) => out.extend_from_slice(text.as_bytes()),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"pk\":{\"id\":");
    serde_json::to_writer(&mut *out, c.id).expect("string serialises");
    out.extend_from_slice(b"},\"type\":");
    serde_json::to_writer(&mut *out, c.entity_type).expect("string serialises");
    out.extend_from_slice(b",\"version\":\"");
    out.extend_from_slice(version_string(c.version).as_bytes());
    out.extend_from_slice(b"\",\"ws_id\":");
    serde_json::to_writer(&mut *out, c.ws_id).expect("string serialises");
    out.push(b'}');
}

fn result_text(
    deltas: &[u8],
    full_sync: bool,
    latest: i64,
    transfer: Option<(&str, usize)>,
) -> String {
    let mut out = Vec::with_capacity(deltas.len() + 160);
    out.extend_from_slice(b"{\"default\":{\"deltas\":[");
    out.extend_from_slice(deltas);
    out.extend_from_slice(b"],");
    if let Some((id, pages)) = transfer {
        out.extend_from_slice(b"\"deltaplane_transfer\":");
        out.extend_from_slice(
            serde_json::json!({ "id": id, "pages": pages })
                .to_string()
                .as_bytes(),
        );
        out.push(b',');
    }
    out.extend_from_slice(if full_sync {
        b"\"full_sync\":true,"
    } else {
        b"\"full_sync\":false,"
    });
    out.extend_from_slice(b"\"latest_version\":\"");
    out.extend_from_slice(version_string(latest).as_bytes());
    out.extend_from_slice(b"\"}}");
    String::from_utf8(out).expect("built from UTF-8 pieces")
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
}

/// What kind of peer asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Asker {
    /// The peer announced `deltaplane.sync.v1` and can fetch pages.
    pub paging: bool,
    /// The peer's frame encoding (whether an answer fits one frame depends on it).
    pub encoding: &'static str,
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

type Shared = tokio::sync::OnceCell<Result<(Option<(String, Decision)>, i64), String>>;

/// Full-sync answers built concurrently (bounds the CP's memory when many fresh DPs arrive).
const FULL_ANSWERS_AT_ONCE: usize = 2;

/// How long an idle paged transfer is kept.
const TRANSFER_TTL: Duration = Duration::from_secs(120);
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
        let mut head = 0;
        let (text, decision) = match dp_version.filter(|v| *v > 0) {
            Some(after) => match self
                .incremental_shared(after, asker, fits, &mut head)
                .await?
            {
                Some(answer) => answer,
                None => self.full(asker, fits, &mut head).await?,
            },
            None => self.full(asker, fits, &mut head).await?,
        };
        if !asker.paging {
            return Ok((text, decision));
        }
        // Our data planes also learn the head, so after a cut answer they ask again at once
        // and after a complete one they do not ask again in vain.
        const PREFIX: &str = "{\"default\":{";
        debug_assert!(text.starts_with(PREFIX));
        let text = format!(
            "{PREFIX}\"deltaplane_head\":\"{}\",{}",
            version_string(head),
            &text[PREFIX.len()..]
        );
        Ok((text, decision))
    }

    /// [`Feed::incremental`], with concurrent identical requests sharing one read. A request
    /// that arrives while a read is running gets that read's answer, which may miss a version
    /// committed meanwhile; its data plane is notified of that version and asks again.
    async fn incremental_shared(
        &self,
        after: i64,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
        head_out: &mut i64,
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
                let mut head = 0;
                self.incremental(after, asker, fits, &mut head)
                    .await
                    .map(|answer| (answer, head))
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
        let (answer, head) = result.map_err(FeedError::Shared)?;
        *head_out = head;
        Ok(answer)
    }

    /// `None` when a full sync is needed (below the horizon, or ahead of the change log).
    async fn incremental(
        &self,
        after: i64,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
        head_out: &mut i64,
    ) -> Result<Option<(String, Decision)>, FeedError> {
        use std::ops::ControlFlow;
        let budget = self.limits.frame_bytes;
        let mut out = Serialized::new(after, String::new(), false);
        // (deltas, version, bytes) at the end of each whole version read so far.
        let mut boundaries: Vec<(usize, i64, usize)> = Vec::new();
        let mut cut_mid_version = false;
        let head = self
            .store
            .changes_after_raw(after, self.limits.max_versions, |c| {
                if c.version != out.version && !out.is_empty() {
                    boundaries.push((out.len(), out.version, out.bytes.len()));
                    if out.bytes.len() > budget {
                        return ControlFlow::Break(());
                    }
                }
                if out.bytes.len() > budget && !boundaries.is_empty() {
                    // This version cannot be part of the answer any more.
                    cut_mid_version = true;
                    return ControlFlow::Break(());
                }
                out.version = c.version;
                out.push(&c);
                ControlFlow::Continue(())
            })
            .await?;
        let info: VersionInfo = match head {
            Ok(info) => info,
            Err(_behind) => return Ok(None),
        };
        *head_out = info.version;
        if after > info.version {
            // The data plane is ahead of this change log (a restored database): full sync.
            return Ok(None);
        }
        if out.is_empty() {
            return Ok(Some((
                result_text(&[], false, info.version, None),
                Decision::UpToDate,
            )));
        }
        if !cut_mid_version && boundaries.last().map(|b| b.1) != Some(out.version) {
            boundaries.push((out.len(), out.version, out.bytes.len()));
        }
        if let Some(&(n, version, _)) = boundaries.iter().rev().find(|b| b.2 <= budget) {
            let text = result_text(out.slice(0, n), false, version, None);
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
        let text = result_text(out.slice(0, n), false, version, None);
        if text.len() <= self.limits.max_decompressed && fits(text.as_bytes()) {
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
        out.starts.truncate(n);
        let end = out.slice(0, n).len();
        out.bytes.truncate(end);
        out.version = version;
        out.epoch = info.epoch;
        Ok(Some(self.start_transfer(Arc::new(out))))
    }

    async fn full(
        &self,
        asker: Asker,
        fits: &(dyn Fn(&[u8]) -> bool + Sync),
        head: &mut i64,
    ) -> Result<(String, Decision), FeedError> {
        let _permit = self
            .full_permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let snap = self.current_snapshot().await?;
        *head = snap.version;
        let body = snap.slice(0, snap.len());
        let size = body.len() + 160;
        if size <= self.limits.max_decompressed {
            let text = result_text(body, true, snap.version, None);
            if text.len() <= self.limits.frame_bytes || fits(text.as_bytes()) {
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
        Ok(self.start_transfer(snap))
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
        let mut out = Serialized::new(0, String::new(), true);
        let info = self
            .store
            .snapshot_raw(|c| {
                out.push(&c);
                std::ops::ControlFlow::Continue(())
            })
            .await?;
        out.version = info.version;
        out.epoch = info.epoch;
        let snap = Arc::new(out);
        *cached = Some((snap.clone(), Instant::now()));
        Ok(snap)
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

    fn start_transfer(&self, data: Arc<Serialized>) -> (String, Decision) {
        let pages = data.pages(self.limits.frame_bytes);
        let id = uuid::Uuid::new_v4().to_string();
        let decision = Decision::Paged {
            version: data.version,
            full_sync: data.full_sync,
        };
        let text = result_text(&[], data.full_sync, data.version, Some((&id, pages.len())));
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
        let body = t.data.slice(from, to);
        let mut out = Vec::with_capacity(body.len() + 200);
        out.extend_from_slice(b"{\"deltas\":[");
        out.extend_from_slice(body);
        out.extend_from_slice(b"],\"full_sync\":");
        out.extend_from_slice(if t.data.full_sync { b"true" } else { b"false" });
        out.extend_from_slice(b",\"id\":");
        serde_json::to_writer(&mut out, id).expect("string serialises");
        out.extend_from_slice(format!(",\"page\":{page},\"pages\":{}", t.pages.len()).as_bytes());
        out.extend_from_slice(b",\"version\":\"");
        out.extend_from_slice(version_string(t.data.version).as_bytes());
        out.extend_from_slice(b"\"}");
        Ok(String::from_utf8(out).expect("built from UTF-8 pieces"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change<'a>(v: i64, id: &'a str) -> RawChange<'a> {
        RawChange {
            version: v,
            entity_type: "services",
            id,
            ws_id: "ws",
            entity: Some("{\"id\":\"x\"}"),
        }
    }

    #[test]
    fn serialized_deltas_parse_and_page() {
        let mut s = Serialized::new(3, "e".into(), true);
        let ids: Vec<String> = (0..10).map(|i| format!("id-{i}")).collect();
        for id in &ids {
            s.push(&change(3, id));
        }
        let all: serde_json::Value =
            serde_json::from_str(&result_text(s.slice(0, s.len()), true, 3, None)).unwrap();
        let deltas = all["default"]["deltas"].as_array().unwrap();
        assert_eq!(deltas.len(), 10);
        assert_eq!(deltas[4]["pk"]["id"], "id-4");
        assert_eq!(deltas[4]["version"], "v02_0000000000000000000000000003");
        let one = s.slice(0, 1).len();
        let pages = s.pages(one * 3 + 2);
        assert_eq!(pages, vec![(0, 3), (3, 6), (6, 9), (9, 10)]);
        for (from, to) in pages {
            let text = format!("[{}]", String::from_utf8_lossy(s.slice(from, to)));
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v.as_array().unwrap().len(), to - from);
        }
        // A budget smaller than one delta still makes progress.
        assert_eq!(s.pages(1).len(), 10);
    }
}
