//! The most recent versions' deltas, in memory: read from the database once per version and
//! shared by every data plane that asks from a version the window covers (and by the pushes
//! of [`super::v2`]'s fan-out), so the cost of a new version does not grow with the fleet.
//!
//! Why answering from it is as safe as reading the database (see ARCHITECTURE.md):
//! - It holds a contiguous run of versions `base+1 ..= top` of one change log (epoch), each
//!   exactly as a committed read returned it; versions never change once committed.
//! - It is filled only by reads of the change log after `top` (one snapshot, which sees
//!   versions gap-free and in order), or with versions this control plane's own writer has
//!   committed ([`Store::committed_after`]: the very rows its transaction wrote, with the
//!   epoch that transaction read, taken only when they continue `top` without a gap); a
//!   read that reports another epoch empties it.
//! - It answers only for `base <= after <= top`; anything below `base` (evicted by the byte
//!   bound) or above `top` goes to the database as before.
//! - "Up to date" is answered from it only when `top` is at least the head this control plane
//!   has seen committed; otherwise it first reads what is missing.

use std::collections::{HashMap, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use crate::cp::store::{Store, StoreError, VersionDeltas};
use crate::proto::v2::RawDelta;

/// Most versions read in one catch-up; further behind, the window restarts at the head.
const MAX_READ_VERSIONS: i64 = 10_000;

/// Most deltas of one version the window keeps. A larger version is a bulk change (a
/// declarative import): the window restarts after it, without reading it whole, and data
/// planes that need it read it from the database (paged when large), as data planes further
/// behind do. The window is for the steady state, small versions sent to many data planes;
/// holding a bulk version would be one more copy of a large configuration in memory.
const MAX_VERSION_DELTAS: usize = crate::cp::store::COMMITTED_MAX_DELTAS;

/// The window of recent versions.
pub struct Recent {
    store: Store,
    max_bytes: usize,
    window: Mutex<Window>,
    /// One reader at a time fills the window (the others wait and find it filled).
    fill: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Window {
    /// `None` until the first fill.
    epoch: Option<String>,
    /// The window holds the versions after this one.
    base: i64,
    versions: VecDeque<Arc<VersionDeltas>>,
    bytes: usize,
    /// Answers already joined from the window, by a caller's key; valid while `top` is.
    joined: HashMap<(i64, usize), Joined>,
}

/// Deltas of `after+1 ..= to` joined into one comma-separated text.
#[derive(Clone)]
pub struct Joined {
    pub to: i64,
    /// The window's top when joined (the head the answer can announce).
    pub top: i64,
    pub deltas: Arc<Vec<u8>>,
    pub epoch: Arc<str>,
}

impl Window {
    fn top(&self) -> i64 {
        self.base + self.versions.len() as i64
    }

    fn reset(&mut self, epoch: String, base: i64) {
        *self = Window {
            epoch: Some(epoch),
            base,
            ..Window::default()
        };
    }
}

impl Recent {
    /// A window bounded to about `max_bytes` of delta text (at least the newest version is
    /// kept unless it alone is larger).
    pub fn new(store: Store, max_bytes: usize) -> Recent {
        Recent {
            store,
            max_bytes,
            window: Mutex::new(Window::default()),
            fill: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The newest version held (the head as of the last fill).
    fn top(&self) -> Option<i64> {
        let w = self.lock();
        w.epoch.as_ref().map(|_| w.top())
    }

    /// Reads the versions after the window's top up to at least `head` (one database read
    /// for any number of data planes waiting). With the window disabled (`max_bytes` 0) it
    /// does nothing.
    pub async fn catch_up(&self, head: i64) -> Result<(), StoreError> {
        if self.max_bytes == 0 || self.top().is_some_and(|t| t >= head) {
            return Ok(());
        }
        // Boxed: the read runs once per version, while this future is part of every
        // get_delta's, thousands at once after a notification (issue 11: memory per DP).
        Box::pin(self.fill_to(head)).await
    }

    /// [`Recent::catch_up`] past its quick check.
    async fn fill_to(&self, head: i64) -> Result<(), StoreError> {
        let _filling = self.fill.lock().await;
        while self.fill_once(head).await? {}
        Ok(())
    }

    /// One read towards `head`; true when the window restarted after a bulk version and
    /// should read on.
    async fn fill_once(&self, head: i64) -> Result<bool, StoreError> {
        let (epoch, top) = {
            let w = self.lock();
            (w.epoch.clone(), w.top())
        };
        let Some(epoch) = epoch else {
            // First use: the window starts empty at the head (nothing older is needed by a
            // data plane that is up to date; older ones read the database as before).
            return self.restart_at_head().await.map(|()| false);
        };
        if top >= head {
            return Ok(false);
        }
        if let Some(own) = self.store.committed_after(&epoch, top, head) {
            // Committed by this control plane's own writer: the rows it wrote, no read.
            let mut w = self.lock();
            if w.epoch.as_deref() == Some(epoch.as_str()) && w.top() == top {
                for v in own {
                    w.bytes += v.deltas.byte_len();
                    w.versions.push_back(v);
                }
                self.evict(&mut w);
            }
            return Ok(false);
        }
        if head - top > MAX_READ_VERSIONS {
            // Far behind (the database was written by others while this control plane could
            // not read it): start again at the head rather than read a long history.
            return self.restart_at_head().await.map(|()| false);
        }
        let mut read: Vec<VersionDeltas> = Vec::new();
        let mut bulk: Option<i64> = None;
        let result = self
            .store
            .changes_after_raw(top, (head - top).max(1), |c| {
                if read.last().is_none_or(|v| v.version != c.version) {
                    read.push(VersionDeltas::new(c.version));
                }
                let last = read.last_mut().expect("pushed above");
                if last.deltas.len() >= MAX_VERSION_DELTAS {
                    bulk = Some(c.version);
                    read.pop();
                    return ControlFlow::Break(());
                }
                last.push(&RawDelta::from(&c));
                ControlFlow::Continue(())
            })
            .await?;
        let mut w = self.lock();
        let info = match result {
            Ok(info) if info.epoch == epoch => info,
            // Another change log, or history purged past the window while nobody asked:
            // start again at the head.
            Ok(info) => {
                tracing::info!(epoch = %info.epoch, "change log epoch changed: recent versions dropped");
                w.reset(info.epoch, info.version);
                return Ok(false);
            }
            Err(_) => {
                drop(w);
                return self.restart_at_head().await.map(|()| false);
            }
        };
        let upto = top.saturating_add((head - top).max(1)).min(info.version);
        // A version with no deltas cannot exist (every version is a write), but the window
        // must stay contiguous whatever the read returned.
        let mut next = top + 1;
        for mut v in read {
            v.deltas.shrink_to_fit();
            if v.version != next || v.version > upto {
                w.reset(epoch.clone(), info.version);
                return Ok(false);
            }
            next += 1;
            w.bytes += v.deltas.byte_len();
            w.versions.push_back(Arc::new(v));
        }
        if let Some(bulk) = bulk.filter(|b| *b == next) {
            tracing::debug!(
                version = bulk,
                "a version of more than {MAX_VERSION_DELTAS} deltas: recent versions restart after it"
            );
            w.reset(epoch, bulk);
            return Ok(bulk < head);
        }
        if next <= upto {
            // Versions the read did not return: do not guess, start at the head.
            w.reset(epoch, info.version);
            return Ok(false);
        }
        self.evict(&mut w);
        Ok(false)
    }

    /// After versions were added: drops the oldest past the byte bound, and the joined
    /// answers (the top moved).
    fn evict(&self, w: &mut Window) {
        while w.bytes > self.max_bytes && !w.versions.is_empty() {
            let old = w.versions.pop_front().expect("not empty");
            w.bytes -= old.deltas.byte_len();
            w.base += 1;
        }
        w.joined.clear();
    }

    /// Empties the window and starts it at the current head.
    async fn restart_at_head(&self) -> Result<(), StoreError> {
        let info = self.store.version_info().await?;
        self.lock().reset(info.epoch, info.version);
        Ok(())
    }

    /// The deltas after `after`, as many whole versions as fit `budget` bytes and
    /// `max_versions`, if the window covers `after` (`None`: ask the database). An empty
    /// `deltas` with `to == after` means up to date. `None` too when the first version alone
    /// is larger than `budget` (the database path knows how to cut or page it).
    pub fn deltas_after(&self, after: i64, budget: usize, max_versions: i64) -> Option<Joined> {
        let mut w = self.lock();
        let epoch: Arc<str> = w.epoch.as_deref()?.into();
        if after < w.base || after > w.top() {
            return None;
        }
        if let Some(j) = w.joined.get(&(after, budget)) {
            return Some(j.clone());
        }
        let first = (after - w.base) as usize;
        let mut bytes = 0;
        let mut to = after;
        for v in w.versions.iter().skip(first) {
            let n = v.deltas.byte_len() + usize::from(bytes > 0);
            if bytes + n > budget || to - after >= max_versions {
                break;
            }
            bytes += n;
            to = v.version;
        }
        if to == after && after < w.top() {
            return None;
        }
        let mut out = Vec::with_capacity(bytes);
        for v in w.versions.iter().skip(first).take((to - after) as usize) {
            if !out.is_empty() {
                out.push(b',');
            }
            out.extend_from_slice(v.deltas.slice(0, v.deltas.len()));
        }
        let joined = Joined {
            to,
            top: w.top(),
            deltas: Arc::new(out),
            epoch,
        };
        // Data planes come in a few groups (at the head, one behind…): a few entries serve
        // them all, and a bound keeps stragglers from filling memory.
        if w.joined.len() < 32 {
            w.joined.insert((after, budget), joined.clone());
        }
        Some(joined)
    }
}
