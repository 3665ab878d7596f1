//! The change feed: after each committed apply the store publishes a [`Committed`] (the new
//! version, its state hash, and what changed) to every subscriber of
//! [`DpStore::subscribe`](crate::dp::store::DpStore::subscribe).
//!
//! # Contract
//!
//! - One message per committed apply, published after the commit returned (durable when the
//!   store is) and after [`DpStore::state`](crate::dp::store::DpStore::state) shows it, in commit
//!   order. A rejected or aborted apply, and an incremental apply of no deltas (nothing is
//!   written), publish nothing; a paged transfer publishes nothing before its commit.
//! - An incremental apply names every `(type, id)` it wrote or deleted
//!   ([`Changed::Entities`]). Versions coalesced into one transaction (see "Coalescing
//!   versions" in the store's doc) publish the union of their changes once, with the final
//!   version. A delete that found nothing (absent, or in
//!   another workspace) changed nothing and is not named.
//! - A full sync and a paged transfer's commit publish [`Changed::All`], and so does an
//!   incremental apply that changed more than [`MAX_NAMED`] entities: the consumer rereads
//!   everything.
//!
//! # Lagging
//!
//! The feed is a [`tokio::sync::broadcast`] channel of [`FEED_CAPACITY`] messages. A subscriber
//! that falls further behind gets [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError)
//! from its next `recv` (`TryRecvError::Lagged` from `try_recv`): it has missed changes and
//! must resync. It takes [`DpStore::snapshot`](crate::dp::store::DpStore::snapshot), rebuilds
//! everything it derives from that one snapshot, and then goes on receiving. Messages that
//! arrive after the resync may describe commits the snapshot already shows; rereading the keys
//! they name from a newer snapshot is harmless, so a consumer that treats every message as
//! "reread these keys (or everything) from a snapshot" needs no version bookkeeping. Versions
//! are not monotonic across full syncs (the CP's database may have been replaced), so compare
//! them for equality only. A subscriber created after a commit does not see its message: take
//! a snapshot after subscribing to start from a known state.

use std::collections::BTreeSet;

use crate::proto::StateHash;

/// Messages a subscriber may fall behind by before it is told it lagged.
pub const FEED_CAPACITY: usize = 256;

/// An incremental apply that changes more entities than this publishes [`Changed::All`]
/// instead of naming them, so a huge batch does not hold a huge set in memory.
pub const MAX_NAMED: usize = 10_000;

/// One committed apply, as the change feed publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The version the store is now the state of.
    pub version: i64,
    pub state_hash: StateHash,
    pub changed: Changed,
}

/// What an apply changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have changed: reread everything.
    All,
    /// Exactly these `(entity type, id)` were written or deleted.
    Entities(BTreeSet<(String, String)>),
}

// === impl Changed ===

impl Changed {
    /// Whether entity `id` of `entity_type` may have changed.
    pub fn contains(&self, entity_type: &str, id: &str) -> bool {
        match self {
            Changed::All => true,
            Changed::Entities(keys) => keys.contains(&(entity_type.to_owned(), id.to_owned())),
        }
    }

    /// Records that `(entity_type, id)` was written or deleted.
    pub(super) fn note(&mut self, entity_type: &str, id: &str) {
        let Changed::Entities(keys) = self else {
            return;
        };
        let key = (entity_type.to_owned(), id.to_owned());
        if keys.len() >= MAX_NAMED && !keys.contains(&key) {
            *self = Changed::All;
            return;
        }
        keys.insert(key);
    }
}

impl Default for Changed {
    fn default() -> Changed {
        Changed::Entities(BTreeSet::new())
    }
}
