//! Paged transfers: a snapshot or a version too large for one frame arrives as pages. The v2
//! session applies them as they arrive ([`DpStore::apply_pages`]): one [`Apply`] open from
//! the first page to the commit, so decoding and writing a page overlap fetching the next.
//!
//! They can also be staged as they come ([`DpStore::stage_begin`], [`DpStore::stage_page`],
//! [`DpStore::stage_page_bytes`]), then applied all at once as one [`Apply`]
//! ([`DpStore::stage_commit`], [`DpStore::stage_commit_with`]) or forgotten
//! ([`DpStore::stage_discard`]); the session did that until issue 11 (the fetch then came
//! before the apply, and the spool cost a copy of the configuration through the page cache).
//!
//! Staged pages live outside redb, in a spool: an unlinked file beside the store's file (or
//! memory, for a store opened on a backend). Staging never survived a reopen (transfers are not
//! resumable), so redb's transactions bought nothing for it, and its pages cost twice: written
//! into the store file and read back, and left behind in it as free space redb never gives
//! back (a 100k-entity transfer grew the file by the size of the whole configuration). Now
//! only the final tables reach redb, in the one write transaction of [`Apply::commit`]; a crash
//! at any point leaves the last committed configuration, and the kernel frees an unlinked
//! spool when its process dies.
//!
//! [`Apply`]: crate::dp::store::Apply
//! [`Apply::commit`]: crate::dp::store::Apply::commit

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::Value;

use crate::dp::store::{Applied, ApplyError, ApplyKind, DeltaSink, DpStore, DpStoreError};
use crate::proto::Delta;

/// Staged page bytes used to be stored in redb rows of at most this size. Kept for callers
/// that size pages by it; staging itself no longer splits pages.
pub const STAGE_ROW_BYTES: usize = (1 << 20) - (16 << 10);

/// The transfers being staged in one store.
pub(super) struct Staging {
    /// Spool files are `<store file>.staging-<pid>-<n>`, unlinked as soon as they are created;
    /// `None` spools in memory.
    spool_prefix: Option<PathBuf>,
    next_spool: AtomicU64,
    transfers: Mutex<HashMap<String, Transfer>>,
}

/// One transfer: its kind and its pages.
struct Transfer {
    kind: ApplyKind,
    /// Created with the first page.
    spool: Option<Spool>,
    /// Page number → `(offset, length)` in the spool. A page staged again is appended anew.
    pages: BTreeMap<u64, (u64, usize)>,
}

/// Where a transfer's page bytes are appended.
enum Spool {
    File { file: File, len: u64 },
    Memory(Vec<u8>),
}

// === impl Staging ===

impl Staging {
    /// Staging for a store on the file `path`: spools beside it. Spools left by a process that
    /// died between creating and unlinking one are removed.
    pub(super) fn beside(path: &Path) -> Staging {
        let prefix = PathBuf::from(format!("{}.staging-", path.display()));
        remove_stale_spools(&prefix);
        Staging {
            spool_prefix: Some(prefix),
            next_spool: AtomicU64::new(0),
            transfers: Mutex::new(HashMap::new()),
        }
    }

    /// Staging in memory, for a store opened on a backend.
    pub(super) fn in_memory() -> Staging {
        Staging {
            spool_prefix: None,
            next_spool: AtomicU64::new(0),
            transfers: Mutex::new(HashMap::new()),
        }
    }

    fn transfers(&self) -> std::sync::MutexGuard<'_, HashMap<String, Transfer>> {
        self.transfers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_spool(&self) -> Result<Spool, DpStoreError> {
        let Some(prefix) = &self.spool_prefix else {
            return Ok(Spool::Memory(Vec::new()));
        };
        let n = self.next_spool.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("{}{}-{n}", prefix.display(), std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| spool_error(&path, e))?;
        // Unlinked at once: nothing to clean up after a crash, the kernel frees it.
        let _ = std::fs::remove_file(&path);
        Ok(Spool::File { file, len: 0 })
    }
}

// === impl Spool ===

impl Spool {
    /// Appends `bytes`; returns their offset.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<u64> {
        match self {
            Spool::File { file, len } => {
                let offset = *len;
                file.write_all(bytes)?;
                *len += bytes.len() as u64;
                Ok(offset)
            }
            Spool::Memory(buf) => {
                let offset = buf.len() as u64;
                buf.extend_from_slice(bytes);
                Ok(offset)
            }
        }
    }

    /// The `len` bytes at `offset`, into `buf` (cleared first).
    fn read(&self, offset: u64, len: usize, buf: &mut Vec<u8>) -> std::io::Result<()> {
        buf.clear();
        match self {
            Spool::File { file, .. } => {
                buf.resize(len, 0);
                file.read_exact_at(buf, offset)
            }
            Spool::Memory(bytes) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                let page = bytes
                    .get(start..start.saturating_add(len))
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.extend_from_slice(page);
                Ok(())
            }
        }
    }
}

// === impl DpStore ===

impl DpStore {
    /// Starts (or restarts) a paged transfer: a snapshot or a version too large for one frame.
    /// Pages are staged as opaque bytes outside the store's tables, while the current
    /// configuration stays readable and [`DpStore::state`] unchanged. Staging does not survive
    /// a reopen; only [`DpStore::stage_commit`] writes to the store.
    pub fn stage_begin(&self, transfer_id: &str, kind: ApplyKind) -> Result<(), DpStoreError> {
        self.inner.staging.transfers().insert(
            transfer_id.to_owned(),
            Transfer {
                kind,
                spool: None,
                pages: BTreeMap::new(),
            },
        );
        Ok(())
    }

    /// Stages page `page_no` (pages count from 0) of deltas, for [`DpStore::stage_commit`].
    /// Staging a page again replaces it; a page of no deltas is not staged (it is missing).
    pub fn stage_page(
        &self,
        transfer_id: &str,
        page_no: u64,
        deltas: &[Delta],
    ) -> Result<(), DpStoreError> {
        if deltas.is_empty() {
            return self.stage_rows(transfer_id, page_no, None);
        }
        // JSON lines of wire deltas, read back one at a time by `decode_delta_lines`.
        let mut bytes = Vec::new();
        for d in deltas {
            serde_json::to_writer(&mut bytes, &d.to_wire()).expect("a JSON value serialises");
            bytes.push(b'\n');
        }
        self.stage_rows(transfer_id, page_no, Some(&bytes))
    }

    /// Stages page `page_no` (pages count from 0): `bytes` as the caller got them, not looked
    /// at here; [`DpStore::stage_commit_with`] hands them back to the caller's decoder. Staging
    /// a page again replaces it.
    pub fn stage_page_bytes(
        &self,
        transfer_id: &str,
        page_no: u64,
        bytes: &[u8],
    ) -> Result<(), DpStoreError> {
        self.stage_rows(transfer_id, page_no, Some(bytes))
    }

    /// Commits a transfer staged with [`DpStore::stage_page`]: [`DpStore::stage_commit_with`]
    /// with the matching decoder.
    pub fn stage_commit(&self, transfer_id: &str) -> Result<Applied, ApplyError> {
        self.stage_commit_with(transfer_id, |page_no, bytes, sink| {
            decode_delta_lines(transfer_id, page_no, bytes, sink)
        })
    }

    /// Applies every staged page, in page order, as one apply (one write transaction). Pages
    /// must be contiguous from 0. A rejected transfer (invalid, versions that do not fit,
    /// missing pages) is discarded, and so is a committed one; after a storage error it stays
    /// staged. The change feed is told that everything may have changed.
    ///
    /// `decode(page_no, bytes, sink)` turns one staged page back into deltas and feeds them to
    /// `sink` one at a time; its errors (and the sink's, which it must pass on) reject the
    /// transfer. It runs on a second thread, with validation, while this one writes.
    pub fn stage_commit_with<D>(&self, transfer_id: &str, decode: D) -> Result<Applied, ApplyError>
    where
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let Some(transfer) = self.inner.staging.transfers().remove(transfer_id) else {
            return Err(DpStoreError::UnknownTransfer(transfer_id.to_owned()).into());
        };
        let res = self.stage_commit_inner(transfer_id, &transfer, decode);
        if matches!(res, Err(ApplyError::Storage(_))) {
            // Kept for a retry, unless a new transfer of that id began meanwhile.
            self.inner
                .staging
                .transfers()
                .entry(transfer_id.to_owned())
                .or_insert(transfer);
        }
        res
    }

    /// Applies a paged transfer of `pages` pages as they arrive, in one apply: the write
    /// transaction is open from the first page to the commit, each page is decoded and
    /// validated (on this thread) and written (on a second one, [`Apply::feed`]) while the
    /// caller fetches the next, and nothing is staged. `arrived` yields `(page_no, bytes)`
    /// in page order and blocks until the next page is there; it ending before page
    /// `pages - 1`, or a page out of order, is [`ApplyError::Staging`] and nothing is
    /// written (a transfer cut by a lost link). `decode` is as for
    /// [`DpStore::stage_commit_with`].
    ///
    /// What staging guaranteed still holds: the pages' deltas are rows of an uncommitted
    /// redb transaction, which no reader sees and a crash or a drop discards, so the store
    /// shows the previous configuration until the one commit, and a rejected transfer
    /// writes nothing. The apply holds the store's writer turn meanwhile; its only other
    /// writer is the same session, which waits for the transfer anyway.
    ///
    /// [`Apply::feed`]: crate::dp::store::Apply::feed
    pub fn apply_pages<B, D>(
        &self,
        transfer_id: &str,
        kind: ApplyKind,
        pages: u64,
        arrived: impl IntoIterator<Item = (u64, B)> + Send,
        mut decode: D,
    ) -> Result<Applied, ApplyError>
    where
        B: AsRef<[u8]>,
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let staging_err = |reason: String| ApplyError::Staging {
            transfer_id: transfer_id.to_owned(),
            reason,
        };
        let mut apply = self.begin(kind)?;
        apply.for_transfer();
        apply.feed(|sink| {
            let mut expected = 0u64;
            for (page_no, bytes) in arrived {
                if page_no != expected || page_no >= pages {
                    return Err(staging_err(format!(
                        "page {page_no} arrived, expected page {expected} of {pages}"
                    )));
                }
                decode(page_no, bytes.as_ref(), sink)?;
                drop(bytes);
                expected += 1;
                crate::failpoint::hit("dp.stage.page");
            }
            if expected < pages {
                return Err(staging_err(format!(
                    "interrupted after {expected} of {pages} pages"
                )));
            }
            Ok(())
        })?;
        apply.commit()
    }

    /// Forgets a transfer and its staged pages.
    pub fn stage_discard(&self, transfer_id: &str) -> Result<(), DpStoreError> {
        self.inner.staging.transfers().remove(transfer_id);
        Ok(())
    }

    /// Replaces one staged page; `None` leaves it unstaged.
    fn stage_rows(
        &self,
        transfer_id: &str,
        page_no: u64,
        bytes: Option<&[u8]>,
    ) -> Result<(), DpStoreError> {
        let staging = &self.inner.staging;
        let mut transfers = staging.transfers();
        let Some(t) = transfers.get_mut(transfer_id) else {
            return Err(DpStoreError::UnknownTransfer(transfer_id.to_owned()));
        };
        match bytes {
            None => {
                t.pages.remove(&page_no);
            }
            Some(bytes) => {
                let spool = match &mut t.spool {
                    Some(spool) => spool,
                    None => t.spool.insert(staging.new_spool()?),
                };
                let offset = spool
                    .append(bytes)
                    .map_err(|e| spool_error(Path::new("spool"), e))?;
                t.pages.insert(page_no, (offset, bytes.len()));
            }
        }
        drop(transfers);
        crate::failpoint::hit("dp.stage.page");
        Ok(())
    }

    fn stage_commit_inner<D>(
        &self,
        transfer_id: &str,
        transfer: &Transfer,
        mut decode: D,
    ) -> Result<Applied, ApplyError>
    where
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let staging_err = |reason: String| ApplyError::Staging {
            transfer_id: transfer_id.to_owned(),
            reason,
        };
        let mut apply = self.begin(transfer.kind.clone())?;
        apply.for_transfer();
        apply.feed(|sink| {
            // One page at a time: read, decoded, and its buffer reused for the next.
            let mut page = Vec::new();
            for (expected, (&page_no, &(offset, len))) in (0u64..).zip(&transfer.pages) {
                if page_no != expected {
                    return Err(staging_err(format!(
                        "page {page_no} staged but page {expected} missing"
                    )));
                }
                if let Some(spool) = &transfer.spool {
                    spool
                        .read(offset, len, &mut page)
                        .map_err(|e| staging_err(format!("reading page {page_no}: {e}")))?;
                }
                decode(page_no, &page, sink)?;
            }
            Ok(())
        })?;
        apply.commit()
    }
}

/// Feeds the deltas of a [`DpStore::stage_page`] page to `sink`, one at a time. Bytes that
/// are not such a page are a staging error; the sink's errors are passed on as they are.
fn decode_delta_lines(
    transfer_id: &str,
    page_no: u64,
    bytes: &[u8],
    sink: &mut DeltaSink<'_>,
) -> Result<(), ApplyError> {
    for v in serde_json::Deserializer::from_slice(bytes).into_iter::<Value>() {
        let d = v
            .map_err(|e| e.to_string())
            .and_then(|v| Delta::from_wire(v).map_err(|e| e.to_string()))
            .map_err(|e| ApplyError::Staging {
                transfer_id: transfer_id.to_owned(),
                reason: format!("corrupt staged delta on page {page_no}: {e}"),
            })?;
        sink(d)?;
    }
    Ok(())
}

fn spool_error(path: &Path, e: std::io::Error) -> DpStoreError {
    DpStoreError::Spool(format!("{}: {e}", path.display()))
}

/// Removes `<prefix>*` files: spools of a process that died before unlinking its own.
fn remove_stale_spools(prefix: &Path) {
    let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let name = name.to_string_lossy();
    for entry in entries.flatten() {
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with(name.as_ref())
        {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
