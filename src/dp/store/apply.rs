//! One apply: [`DpStore::begin`] opens a redb write transaction, [`Apply::delta`] and
//! [`Apply::feed`] check and queue deltas and write them a chunk at a time, and
//! [`Apply::commit`] checks the final state, writes version, epoch and state hash, commits,
//! and publishes the change on the feed.
//!
//! Deltas are buffered in small chunks and written with the tables opened once per chunk (a
//! redb `Table` borrows its transaction, so it cannot live across `delta` calls), which keeps a
//! 100k-entity full sync streaming: only one chunk and the index bookkeeping are held in
//! memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

use redb::{Durability, ReadableTable, WriteTransaction};

use crate::dp::store::checks::{Checker, check_final_state};
use crate::dp::store::feed::{Changed, Committed};
use crate::dp::store::tables::{
    ENTITIES, KEYS, META, REFS, Tables, key_ws, parse_body, write_meta,
};
use crate::dp::store::{
    Applied, ApplyError, ApplyKind, DpState, DpStore, DpStoreError, VersionError,
};
use crate::proto::{Delta, StateHash};
use crate::schema::EntitySchema;
use crate::schema::index::EntityIndex;

/// One apply in progress: an open redb write transaction. Dropping it aborts.
pub struct Apply<'a> {
    store: &'a DpStore,
    txn: WriteTransaction,
    epoch: Option<String>,
    /// Version rules, validation and error collection: everything that needs no table.
    check: Checker,
    /// Validated deltas not yet written; written with the tables opened once per chunk.
    pending: Vec<Pending>,
    pending_bytes: usize,
    work: Work,
    /// The commit of a paged transfer: it writes and publishes even when it has no deltas.
    transfer: bool,
    /// Commit nothing when the result equals the stored state ([`Apply::skip_if_unchanged`]).
    skip_unchanged: bool,
    /// This apply's turn among the store's applies, given back when it is dropped: after the
    /// transaction (declared above, so dropped first) and after the commit was published.
    _turn: WriterTurn<'a>,
}

/// What a caller's page decoder feeds deltas into (see [`DpStore::apply_pages`]).
pub type DeltaSink<'s> = dyn FnMut(Delta) -> Result<(), ApplyError> + 's;

/// Deltas buffered before the tables are opened and they are written.
const CHUNK_DELTAS: usize = 512;
const CHUNK_BYTES: usize = 4 << 20;
/// Chunks validated ahead of the writer by [`Apply::feed`].
const CHUNKS_AHEAD: usize = 2;

/// One validated delta.
pub(super) struct Pending {
    pub(super) schema: Arc<EntitySchema>,
    pub(super) id: String,
    pub(super) ws: String,
    /// `None` for a delete.
    pub(super) upsert: Option<Upsert>,
}

/// A validated entity, ready to write: everything derived from its value is computed before
/// the writer sees it.
pub(super) struct Upsert {
    /// Canonical JSON, as stored and hashed.
    pub(super) body: Vec<u8>,
    pub(super) hash: StateHash,
    pub(super) index: EntityIndex,
}

/// Bookkeeping of an apply, checked at commit.
#[derive(Default)]
pub(super) struct Work {
    pub(super) hash: StateHash,
    pub(super) n_entities: u64,
    /// A full sync: every table was emptied at begin, so the commit checks every foreign
    /// reference row rather than a list of those written.
    pub(super) full: bool,
    /// Foreign references written by an incremental apply: `(parent_type, parent_id,
    /// child_type, field, child_id)`.
    pub(super) refs_written: Vec<[String; 5]>,
    /// Entities deleted: `(type, id)`.
    pub(super) deleted: Vec<(String, String)>,
    /// Keys contested in this batch — taken over from another entity at some point — with
    /// every entity that held or took them since: `(type, ws, field, value)` → ids. At commit
    /// exactly one of them may still hold the value (a hand-over through a transient holder
    /// is rechecked too).
    /// In order of appearance: the holder from before the batch comes first and keeps the
    /// value when several still hold it.
    pub(super) contested: BTreeMap<[String; 4], Vec<String>>,
    /// What the change feed will be told at commit.
    pub(super) changed: Changed,
}

/// Lets one apply at a time run from [`DpStore::begin`] until its commit is published, so
/// [`DpStore::state`] and the change feed follow commit order. redb alone serialises only the
/// write transactions: the next one could commit and publish between an earlier commit and
/// its publication.
///
/// A flag and a condition variable rather than a `MutexGuard`, so an [`Apply`] stays `Send`.
pub(super) struct WriterSlot {
    busy: Mutex<bool>,
    freed: Condvar,
}

/// A turn taken from a [`WriterSlot`], given back on drop.
pub(super) struct WriterTurn<'a> {
    slot: &'a WriterSlot,
}

// === impl DpStore ===

impl DpStore {
    /// Starts an apply. Waits for any other apply to finish (redb has one writer at a time), then
    /// checks `expect_from` of an incremental apply against the stored version.
    pub fn begin(&self, kind: ApplyKind) -> Result<Apply<'_>, ApplyError> {
        let turn = self.inner.writer.take();
        let mut txn = self.inner.db.begin_write().map_err(DpStoreError::from)?;
        let durability = if self.inner.durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        // One-phase commits without quick repair: redb's defaults, one fsync per commit. Quick
        // repair (the allocator state saved by every commit, and a two-phase commit) cost a
        // second fsync per version; what it saves is the repair on the first open after a
        // crash, which verifies the checksums and rebuilds the allocator state once (timed in
        // `benches/dp_apply.rs`).
        txn.set_durability(durability).map_err(DpStoreError::from)?;
        // The state of the last commit: this turn excludes any other commit until it ends.
        let stored = self.state();
        let mut work = Work::default();
        let epoch = match &kind {
            ApplyKind::Incremental { expect_from, .. } => {
                if *expect_from != stored.version {
                    return Err(VersionError::Conflict {
                        expected: *expect_from,
                        stored: stored.version,
                    }
                    .into());
                }
                work.hash = stored.state_hash;
                work.n_entities = stored.n_entities;
                stored.epoch.clone()
            }
            ApplyKind::Full { epoch, .. } => {
                txn.delete_table(ENTITIES)?;
                txn.delete_table(KEYS)?;
                txn.delete_table(REFS)?;
                work.full = true;
                work.changed = Changed::All;
                epoch.clone()
            }
        };
        Ok(Apply {
            store: self,
            txn,
            epoch,
            check: Checker::new(
                Arc::clone(&self.inner.registry),
                kind,
                stored.version,
                self.inner.runnable_plugins.get().cloned(),
            ),
            pending: Vec::with_capacity(CHUNK_DELTAS),
            pending_bytes: 0,
            work,
            transfer: false,
            skip_unchanged: false,
            _turn: turn,
        })
    }

    /// Applies a whole batch: `begin`, every delta, `commit`.
    pub fn apply(
        &self,
        kind: ApplyKind,
        deltas: impl IntoIterator<Item = Delta>,
    ) -> Result<Applied, ApplyError> {
        let mut apply = self.begin(kind)?;
        for d in deltas {
            apply.delta(d)?;
        }
        apply.commit()
    }
}

// === impl Apply ===

impl Apply<'_> {
    /// Checks the delta's version, validates it, and queues it for writing into this
    /// transaction. Version errors end the apply at once; validation errors are collected (all
    /// of them, Kong-style) and reported by [`Apply::commit`].
    pub fn delta(&mut self, d: Delta) -> Result<(), ApplyError> {
        if let Some(p) = self.check.check(d)? {
            self.pending_bytes += p.size();
            self.pending.push(p);
            if self.pending.len() >= CHUNK_DELTAS || self.pending_bytes >= CHUNK_BYTES {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// [`Apply::delta`] for every delta `produce` feeds to its sink. `produce` runs (decoding,
    /// with validation) on this thread; once it has filled a first chunk, a second thread
    /// writes the validated chunks while it goes on (at most [`CHUNKS_AHEAD`] chunks ahead).
    /// A batch that fits one chunk (one version, a few deltas) is written here, with no second
    /// thread. `produce` must pass on the sink's errors. The first error (the writer's before
    /// the producer's) is returned; the apply is then to be dropped.
    pub fn feed<P>(&mut self, produce: P) -> Result<(), ApplyError>
    where
        P: FnOnce(&mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        self.flush()?;
        let check = &mut self.check;
        let txn = &self.txn;
        // Moved to the writer thread when it starts.
        let mut work = Some(&mut self.work);
        std::thread::scope(|scope| {
            type Writer<'s> = (
                std::sync::mpsc::SyncSender<Vec<Pending>>,
                std::thread::ScopedJoinHandle<'s, Result<(), ApplyError>>,
            );
            let mut writer: Option<Writer<'_>> = None;
            let mut chunk = Vec::new();
            let mut bytes = 0;
            let produced = produce(&mut |d| {
                let Some(p) = check.check(d)? else {
                    return Ok(());
                };
                bytes += p.size();
                chunk.push(p);
                if chunk.len() < CHUNK_DELTAS && bytes < CHUNK_BYTES {
                    return Ok(());
                }
                bytes = 0;
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(CHUNK_DELTAS));
                let (tx, _) = match &writer {
                    Some(w) => w,
                    None => {
                        let Some(work) = work.take() else {
                            unreachable!("the writer starts once, with the bookkeeping")
                        };
                        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Pending>>(CHUNKS_AHEAD);
                        let handle = scope.spawn(move || {
                            for chunk in rx {
                                write_pending(txn, work, chunk)?;
                            }
                            Ok(())
                        });
                        writer.insert((tx, handle))
                    }
                };
                // The writer failed and will say why; this only stops the producer.
                tx.send(full).map_err(|_| {
                    ApplyError::Storage(DpStoreError::Corrupt("writer stopped".into()))
                })
            });
            match writer {
                // Everything fit one chunk: written here.
                None => match (produced, work.take()) {
                    (Ok(()), Some(work)) => write_pending(txn, work, chunk),
                    (Ok(()), None) => unreachable!("no writer thread took the bookkeeping"),
                    (Err(e), _) => Err(e),
                },
                Some((tx, handle)) => {
                    if produced.is_ok() && !chunk.is_empty() {
                        let _ = tx.send(chunk);
                    }
                    drop(tx);
                    let written = handle
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                    written.and(produced)
                }
            }
        })
    }

    /// Checks foreign references and unique keys against the final state, writes version, epoch
    /// and state hash, and commits. On any error nothing is written. Once committed, the
    /// change is published on the store's change feed.
    pub fn commit(mut self) -> Result<Applied, ApplyError> {
        if let Some(e) = self.check.version_error.take() {
            return Err(e.into());
        }
        let version = match (&self.check.kind, self.check.last_version) {
            (ApplyKind::Full { version, .. }, _) => *version,
            (ApplyKind::Incremental { .. }, Some(last)) => last,
            (ApplyKind::Incremental { .. }, None) => self.check.stored_version,
        };
        if let ApplyKind::Incremental {
            latest: Some(latest),
            ..
        } = self.check.kind
            && latest != version
        {
            return Err(VersionError::NotLatest {
                last: version,
                latest,
            }
            .into());
        }
        if self.check.errors.is_empty() {
            self.flush()?;
        }
        if self.check.errors.is_empty() {
            check_final_state(
                &self.check.registry,
                &self.txn,
                &self.work,
                &mut self.check.errors,
            )?;
        }
        self.check.check_runnable();
        if !self.check.errors.is_empty() {
            return Err(std::mem::take(&mut self.check.errors).into_error());
        }
        if self.skip_unchanged {
            // This apply's turn excludes every other commit: the stored state is current.
            let stored = self.store.state();
            if stored.version > 0
                && stored.epoch == self.epoch
                && stored.state_hash == self.work.hash
                && stored.n_entities == self.work.n_entities
            {
                return Ok(Applied {
                    version: stored.version,
                    state_hash: stored.state_hash,
                    n_entities: stored.n_entities,
                    n_deltas: 0,
                });
            }
        }
        if self.check.n_deltas == 0
            && matches!(self.check.kind, ApplyKind::Incremental { .. })
            && !self.transfer
        {
            // Nothing to write (an empty transfer still commits, as a transfer always has).
            return Ok(Applied {
                version,
                state_hash: self.work.hash,
                n_entities: self.work.n_entities,
                n_deltas: 0,
            });
        }
        let state = DpState {
            version,
            epoch: self.epoch.clone(),
            state_hash: self.work.hash,
            n_entities: self.work.n_entities,
        };
        write_meta(&mut self.txn.open_table(META)?, &state)?;
        let store = self.store;
        let n_deltas = self.check.n_deltas;
        crate::failpoint::hit("dp.apply.commit");
        self.txn.commit().map_err(DpStoreError::from)?;
        crate::failpoint::hit("dp.apply.committed");
        let applied = Applied {
            version,
            state_hash: state.state_hash,
            n_entities: state.n_entities,
            n_deltas,
        };
        *store.inner.state.write().unwrap_or_else(|e| e.into_inner()) = state;
        // Still within this apply's turn, so messages go out in commit order.
        if store.inner.feed.receiver_count() > 0 {
            let _ = store.inner.feed.send(Arc::new(Committed {
                version,
                state_hash: applied.state_hash,
                changed: std::mem::take(&mut self.work.changed),
            }));
        }
        Ok(applied)
    }

    /// Makes [`Apply::commit`] write nothing when the checked result has the stored epoch,
    /// state hash and entity count (the same configuration, read again): it then returns
    /// the stored version with `n_deltas == 0`, and the feed hears nothing. A data plane
    /// running from a file uses it so that re-reading an unchanged file makes no version.
    pub fn skip_if_unchanged(&mut self) {
        self.skip_unchanged = true;
    }

    /// Makes this apply the commit of a paged transfer: the feed is told that everything may
    /// have changed.
    pub(super) fn for_transfer(&mut self) {
        self.transfer = true;
        self.work.changed = Changed::All;
    }

    /// Writes the queued deltas, with the tables opened once.
    pub fn flush(&mut self) -> Result<(), ApplyError> {
        self.pending_bytes = 0;
        write_pending(&self.txn, &mut self.work, std::mem::take(&mut self.pending))
    }
}

// === impl Pending ===

impl Pending {
    /// Bytes it holds, roughly.
    pub(super) fn size(&self) -> usize {
        self.upsert.as_ref().map_or(64, |u| u.body.len() + 64)
    }
}

// === impl Tables ===

impl Tables<'_> {
    /// Writes one validated delta with its index rows, and keeps the apply's bookkeeping.
    ///
    /// The replaced entity is read from its row in place (its digest and index computed from
    /// the borrowed bytes), and index rows it shares with the new version are left as they
    /// are: a version that changes one field of an entity rewrites its entity row only.
    fn write(&mut self, work: &mut Work, p: Pending) -> Result<(), ApplyError> {
        let schema = &*p.schema;
        let ty = schema.name.as_str();
        let id = p.id.as_str();
        let old = match &p.upsert {
            Some(u) => match self
                .entities
                .insert((ty, id), (p.ws.as_str(), u.body.as_slice()))?
            {
                Some(row) => Some(replaced(schema, id, row.value(), work)?),
                None => None,
            },
            None => {
                let mut other_ws = None;
                let old = match self.entities.remove((ty, id))? {
                    None => None,
                    Some(row) => {
                        let (ws, body) = row.value();
                        if ws == p.ws {
                            Some(replaced(schema, id, (ws, body), work)?)
                        } else {
                            other_ws = Some((ws.to_owned(), body.to_vec()));
                            None
                        }
                    }
                };
                // In another workspace: Kong's delete finds nothing. Put it back.
                if let Some((ws, body)) = other_ws {
                    self.entities
                        .insert((ty, id), (ws.as_str(), body.as_slice()))?;
                }
                old
            }
        };
        if p.upsert.is_some() || old.is_some() {
            work.changed.note(ty, id);
        }
        let new_index = p.upsert.as_ref().map(|u| &u.index);
        let new_kws = key_ws(schema, &p.ws);
        // Index rows of the old version that the new one keeps (same workspace for keys).
        let keeps_key = |old_kws: &str, field: &str, value: &str| {
            old_kws == new_kws
                && new_index.is_some_and(|n| n.keys.iter().any(|(f, v)| f == field && v == value))
        };
        if let Some((old_ws, old_index)) = &old {
            let kws = key_ws(schema, old_ws);
            for (field, value) in &old_index.keys {
                if keeps_key(kws, field, value) {
                    continue;
                }
                let key = (ty, kws, field.as_str(), value.as_str());
                let owned = self.keys.get(key)?.is_some_and(|row| row.value() == id);
                if owned {
                    self.keys.remove(key)?;
                }
            }
            for r @ (field, parent_ty, parent_id) in &old_index.refs {
                if new_index.is_some_and(|n| n.refs.contains(r)) {
                    continue;
                }
                self.refs.remove((
                    parent_ty.as_str(),
                    parent_id.as_str(),
                    ty,
                    field.as_str(),
                    id,
                ))?;
            }
            if p.upsert.is_none() {
                work.deleted.push((ty.to_owned(), id.to_owned()));
            }
        }
        let Some(Upsert { hash, index, .. }) = &p.upsert else {
            return Ok(());
        };
        work.hash.add(hash);
        work.n_entities += 1;
        for (field, value) in &index.keys {
            let key = (ty, new_kws, field.as_str(), value.as_str());
            let kept = old.as_ref().is_some_and(|(old_ws, old_index)| {
                old_index.keys.iter().any(|(f, v)| f == field && v == value)
                    && key_ws(schema, old_ws) == new_kws
            });
            // A kept key is still ours unless another delta of this batch took it.
            if kept && self.keys.get(key)?.is_some_and(|row| row.value() == id) {
                continue;
            }
            let displaced = self
                .keys
                .insert(key, id)?
                .map(|other| other.value().to_owned())
                .filter(|other| other != id);
            if displaced.is_none() && work.contested.is_empty() {
                continue;
            }
            let k = [
                ty.to_owned(),
                new_kws.to_owned(),
                field.clone(),
                value.clone(),
            ];
            if displaced.is_some() || work.contested.contains_key(&k) {
                let holders = work.contested.entry(k).or_default();
                for h in displaced.into_iter().chain(std::iter::once(id.to_owned())) {
                    if !holders.contains(&h) {
                        holders.push(h);
                    }
                }
            }
        }
        for r @ (field, parent_ty, parent_id) in &index.refs {
            if old
                .as_ref()
                .is_some_and(|(_, old_index)| old_index.refs.contains(r))
            {
                continue;
            }
            self.refs.insert(
                (
                    parent_ty.as_str(),
                    parent_id.as_str(),
                    ty,
                    field.as_str(),
                    id,
                ),
                (),
            )?;
            // A full sync checks every row of the (new) table at commit instead.
            if !work.full {
                work.refs_written.push([
                    parent_ty.clone(),
                    parent_id.clone(),
                    ty.to_owned(),
                    field.clone(),
                    id.to_owned(),
                ]);
            }
        }
        Ok(())
    }
}

/// The entity a write replaced or deleted, from its row: its digest leaves the state hash and
/// its workspace and index rows are returned.
fn replaced(
    schema: &EntitySchema,
    id: &str,
    (ws, body): (&str, &[u8]),
    work: &mut Work,
) -> Result<(String, EntityIndex), ApplyError> {
    // Stored bodies are canonical: written from `Upsert::body`.
    work.hash
        .sub(&StateHash::of_entity_bytes(&schema.name, ws, id, body));
    work.n_entities = work.n_entities.saturating_sub(1);
    let index = schema.index_of(&parse_body(body)?);
    Ok((ws.to_owned(), index))
}

// === impl WriterSlot ===

impl WriterSlot {
    pub(super) fn new() -> WriterSlot {
        WriterSlot {
            busy: Mutex::new(false),
            freed: Condvar::new(),
        }
    }

    /// Waits until no other apply holds a turn, and takes it.
    fn take(&self) -> WriterTurn<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *busy {
            busy = self.freed.wait(busy).unwrap_or_else(|e| e.into_inner());
        }
        *busy = true;
        WriterTurn { slot: self }
    }
}

impl Drop for WriterTurn<'_> {
    fn drop(&mut self) {
        *self.slot.busy.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.slot.freed.notify_one();
    }
}

/// Writes validated deltas, with the tables opened once.
fn write_pending(
    txn: &WriteTransaction,
    work: &mut Work,
    pending: Vec<Pending>,
) -> Result<(), ApplyError> {
    if pending.is_empty() {
        return Ok(());
    }
    let mut tables = Tables::open(txn)?;
    for p in pending {
        tables.write(work, p)?;
        crate::failpoint::hit("dp.apply.write");
    }
    Ok(())
}
