//! The data plane's redb store: the configuration a DP serves, the version it is the state of,
//! and the state hash that proves it equals the control plane's.
//!
//! A `kong.sync.v2.get_delta` result is applied as one [`Apply`]: one redb write transaction that
//! receives the deltas one at a time ([`Apply::delta`]), validates each against its schema,
//! writes it with its index rows, and at [`Apply::commit`] checks what only the final state can
//! tell (foreign references, unique keys), then writes version, epoch and state hash in the same
//! transaction. Dropping an `Apply` (or any error) aborts: store, version and hash stay as they
//! were. Because redb is copy-on-write, a crash leaves the last committed (version, hash).
//!
//! Readers take a [`Snapshot`]: one committed version, whatever commits meanwhile. Each commit
//! is published on a change feed ([`DpStore::subscribe`]) with the entities it changed.
//!
//! # Coalescing versions
//!
//! Versions that arrive while a commit runs need not cost one commit each. Feed the deltas of
//! several consecutive versions, in version order, into one apply:
//!
//! ```ignore
//! let from = store.state().version;
//! let mut apply = store.begin(ApplyKind::Incremental { expect_from: from, latest: Some(last) })?;
//! for d in deltas_of_versions_from_plus_1_to_last { apply.delta(d)?; } // or apply.feed(..)
//! let applied = apply.commit()?; // applied.version == last
//! ```
//!
//! The version rules allow a batch to span versions (the first delta is `from + 1`, each next
//! one equal to or one above the previous), which is what one `get_delta` answer spanning
//! many versions already is. The result is one write transaction and one fsync, the state of
//! the last version (the same state hash and rows as applying them one by one), and one
//! [`Committed`] on the feed with the last version and the union of what the versions changed
//! ([`Changed::All`] past [`MAX_NAMED`] entities). If any version is rejected, none is
//! applied: the caller falls back to applying them one at a time (or to `get_delta`) to find
//! the bad one. `latest: None` skips the check of the last version.
//!
//! # Layout
//!
//! - `mod.rs`: [`DpStore`], its options and state, opening (on a file or in memory).
//! - `read.rs`: [`Snapshot`] and the read methods.
//! - `apply.rs`: [`Apply`] (begin, delta, feed, commit) and the chunked writer.
//! - `checks.rs`: version rules, entity validation, final-state checks, Kong-style errors.
//! - `pages.rs`: paged transfers, applied as their pages arrive.
//! - `feed.rs`: the change feed's messages ([`Committed`], [`Changed`]) and its contract.
//! - `tables.rs`: the redb tables and the encodings of their rows.
//! - `error.rs`: [`DpStoreError`], [`ApplyError`], [`VersionError`].
//!
//! Tables (see `tables.rs`):
//!
//! - `entities`: `(type, id)` → `(ws_id, canonical JSON)`, exactly the entity the CP sent;
//! - `keys`: `(type, ws, field, canonical JSON value)` → id, for unique fields and the cache key
//!   (`@cache_key`, a JSON array); `ws` is empty for types that are not workspaceable;
//! - `refs`: `(parent_type, parent_id, child_type, field, child_id)`, the foreign-key index;
//! - `meta`: version, epoch, state hash, entity count.
//!
//! A paged transfer is one apply (see `pages.rs`), so the file holds only the configuration;
//! the tables `staged` and `transfers` of earlier releases are dropped on open.

mod apply;
mod checks;
mod error;
mod feed;
mod pages;
mod read;
mod tables;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::sync::{Arc, RwLock};

use redb::{Database, StorageBackend};
use tokio::sync::broadcast;

pub use apply::{Apply, DeltaSink};
pub use error::{ApplyError, DpStoreError, VersionError};
pub use feed::{Changed, Committed, FEED_CAPACITY, MAX_NAMED};
pub use read::Snapshot;

use crate::proto::StateHash;
use crate::schema::Registry;
use apply::WriterSlot;
use tables::{ENTITIES, KEYS, META, REFS, STAGED, TRANSFERS, read_meta};

/// How a [`DpStore`] opens its file.
#[derive(Debug, Clone)]
pub struct DpStoreOptions {
    /// redb's page cache, in bytes. It caps the store's own memory beyond one write transaction.
    pub cache_size: usize,
    /// Commit with `Durability::Immediate` (fsync). Without it a crash may lose recent applies,
    /// never half of one.
    pub durable: bool,
}

/// What the store holds, cached in memory and replaced after each commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DpState {
    /// The CP version this is the state of; 0 when nothing was ever applied.
    pub version: i64,
    /// The CP's epoch (its database identity) as of the last full sync.
    pub epoch: Option<String>,
    pub state_hash: StateHash,
    pub n_entities: u64,
}

/// What one apply replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyKind {
    /// A full sync: the deltas are the whole configuration at `version`; everything stored is
    /// replaced. A lower version than the stored one is allowed (the CP's database may have been
    /// replaced); every delta must carry `version`.
    Full { version: i64, epoch: Option<String> },
    /// Deltas after `expect_from`, which must be the stored version. The first delta's version
    /// is `expect_from + 1`, each next one equal to or one above the previous, and the result is
    /// the last delta's version, which must equal `latest` when given.
    Incremental {
        expect_from: i64,
        latest: Option<i64>,
    },
}

/// A committed apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: i64,
    pub state_hash: StateHash,
    pub n_entities: u64,
    pub n_deltas: u64,
}

/// The data plane's store. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct DpStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    registry: Arc<Registry>,
    durable: bool,
    /// The state of the last commit, so [`DpStore::state`] does no I/O.
    state: RwLock<DpState>,
    /// One apply at a time from `begin` to the publication of its commit.
    writer: WriterSlot,
    /// The change feed; a send with no subscriber is dropped.
    feed: broadcast::Sender<Arc<Committed>>,
    /// The plugins this data plane can run, when it says (its proxy executes only these):
    /// a version whose enabled plugins name another is rejected like an invalid entity.
    runnable_plugins: std::sync::OnceLock<Arc<std::collections::HashSet<String>>>,
}

// === impl DpStoreOptions ===

impl DpStoreOptions {
    /// 64 MiB of cache, durable commits.
    pub fn recommended() -> DpStoreOptions {
        DpStoreOptions {
            cache_size: 64 << 20,
            durable: true,
        }
    }
}

// === impl DpStore ===

impl DpStore {
    /// Opens (or creates) the store at `path`. An interrupted paged transfer left nothing (its
    /// apply never committed): transfers are not resumable, the caller starts a new one.
    pub fn open(
        path: &Path,
        registry: Arc<Registry>,
        opts: DpStoreOptions,
    ) -> Result<DpStore, DpStoreError> {
        let db = redb::Builder::new()
            .set_cache_size(opts.cache_size)
            .create(path)?;
        DpStore::init(db, registry, opts)
    }

    /// A new, empty store in memory ([`redb::backends::InMemoryBackend`]): the same store with
    /// nothing on disk, for fuzzing and tests. It is gone when the last clone is dropped.
    pub fn open_in_memory(
        registry: Arc<Registry>,
        opts: DpStoreOptions,
    ) -> Result<DpStore, DpStoreError> {
        DpStore::open_with_backend(redb::backends::InMemoryBackend::new(), registry, opts)
    }

    /// Opens (or creates) the store on a redb storage backend of the caller's: a shared memory
    /// image that outlives the store (to reopen it), or one that injects I/O failures.
    pub fn open_with_backend(
        backend: impl StorageBackend,
        registry: Arc<Registry>,
        opts: DpStoreOptions,
    ) -> Result<DpStore, DpStoreError> {
        let db = redb::Builder::new()
            .set_cache_size(opts.cache_size)
            .create_with_backend(backend)?;
        DpStore::init(db, registry, opts)
    }

    /// Version, epoch, state hash and entity count as of the last commit. No I/O.
    pub fn state(&self) -> DpState {
        self.inner
            .state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Subscribes to the change feed: from now on, one [`Committed`] per committed apply, in
    /// commit order. A subscriber that falls more than [`FEED_CAPACITY`] messages behind is told
    /// it lagged and must resync from [`DpStore::snapshot`] (see `feed.rs` for the contract).
    /// From now on, rejects a version that enables a plugin not in `names`, as Kong's schema
    /// rejects a plugin missing from its `plugins` property
    /// (`kong/db/schema/entities/plugins.lua`). Set once, before the first apply; later
    /// calls are ignored.
    pub fn only_plugins(&self, names: impl IntoIterator<Item = String>) {
        let _ = self
            .inner
            .runnable_plugins
            .set(Arc::new(names.into_iter().collect()));
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Committed>> {
        self.inner.feed.subscribe()
    }

    /// Drops the staging tables of earlier releases, makes sure every table exists (so a read
    /// never meets a missing one), and reads the stored state.
    fn init(
        db: Database,
        registry: Arc<Registry>,
        opts: DpStoreOptions,
    ) -> Result<DpStore, DpStoreError> {
        let txn = db.begin_write()?;
        txn.delete_table(STAGED)?;
        txn.delete_table(TRANSFERS)?;
        let state = {
            txn.open_table(ENTITIES)?;
            txn.open_table(KEYS)?;
            txn.open_table(REFS)?;
            read_meta(&txn.open_table(META)?)?
        };
        txn.commit()?;
        Ok(DpStore {
            inner: Arc::new(Inner {
                db,
                registry,
                durable: opts.durable,
                state: RwLock::new(state),
                writer: WriterSlot::new(),
                feed: broadcast::channel(FEED_CAPACITY).0,
                runnable_plugins: std::sync::OnceLock::new(),
            }),
        })
    }
}
