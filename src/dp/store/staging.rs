//! Paged transfers: a snapshot or a version too large for one frame arrives as pages, each
//! staged in its own transaction ([`DpStore::stage_begin`], [`DpStore::stage_page`],
//! [`DpStore::stage_page_bytes`]), then applied all at once as one [`Apply`]
//! ([`DpStore::stage_commit`], [`DpStore::stage_commit_with`]) or forgotten
//! ([`DpStore::stage_discard`]). Also the encoding of a transfer's [`ApplyKind`].
//!
//! [`Apply`]: crate::dp::store::Apply

use redb::{Durability, ReadableDatabase, ReadableTable, Table, WriteTransaction};
use serde_json::{Value, json};

use crate::dp::store::tables::{STAGED, TRANSFERS};
use crate::dp::store::{Applied, ApplyError, ApplyKind, DeltaSink, DpStore, DpStoreError};
use crate::proto::Delta;

/// Staged page bytes are stored in rows of at most this size (a little under a power of two,
/// so redb's page for one row is not twice the row).
pub const STAGE_ROW_BYTES: usize = (1 << 20) - (16 << 10);

// === impl DpStore ===

impl DpStore {
    /// Starts (or restarts) a paged transfer: a snapshot or a version too large for one frame.
    /// Pages are staged as opaque bytes, each in its own transaction, while the current
    /// configuration stays readable and [`DpStore::state`] unchanged. Staging does not survive
    /// a reopen, so its transactions skip the fsync; only [`DpStore::stage_commit`]'s is durable.
    pub fn stage_begin(&self, transfer_id: &str, kind: ApplyKind) -> Result<(), DpStoreError> {
        let txn = self.staging_txn()?;
        {
            let mut staged = txn.open_table(STAGED)?;
            clear_staged(&mut staged, transfer_id)?;
            let mut transfers = txn.open_table(TRANSFERS)?;
            transfers.insert(transfer_id, encode_kind(&kind).as_slice())?;
        }
        txn.commit()?;
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

    /// Applies every staged page, in page order, as one apply (one write transaction), and
    /// removes the staging in that same transaction. Pages must be contiguous from 0. A rejected
    /// transfer is discarded. The change feed is told that everything may have changed.
    ///
    /// `decode(page_no, bytes, sink)` turns one staged page back into deltas and feeds them to
    /// `sink` one at a time; its errors (and the sink's, which it must pass on) reject the
    /// transfer. It runs on a second thread, with validation, while this one writes.
    pub fn stage_commit_with<D>(&self, transfer_id: &str, decode: D) -> Result<Applied, ApplyError>
    where
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let res = self.stage_commit_inner(transfer_id, decode);
        if matches!(
            res,
            Err(ApplyError::Invalid { .. } | ApplyError::Version(_) | ApplyError::Staging { .. })
        ) {
            self.stage_discard(transfer_id)?;
        }
        res
    }

    /// Forgets a transfer and its staged pages.
    pub fn stage_discard(&self, transfer_id: &str) -> Result<(), DpStoreError> {
        let txn = self.staging_txn()?;
        {
            clear_staged(&mut txn.open_table(STAGED)?, transfer_id)?;
            txn.open_table(TRANSFERS)?.remove(transfer_id)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Replaces the rows of one staged page; `None` leaves it unstaged.
    fn stage_rows(
        &self,
        transfer_id: &str,
        page_no: u64,
        bytes: Option<&[u8]>,
    ) -> Result<(), DpStoreError> {
        let txn = self.staging_txn()?;
        {
            if txn.open_table(TRANSFERS)?.get(transfer_id)?.is_none() {
                return Err(DpStoreError::UnknownTransfer(transfer_id.to_owned()));
            }
            let mut staged = txn.open_table(STAGED)?;
            staged.retain_in(
                (transfer_id, page_no, 0)..=(transfer_id, page_no, u64::MAX),
                |_, _| false,
            )?;
            if let Some(bytes) = bytes {
                // An empty page still gets a row, so it counts as staged.
                let mut rows = bytes.chunks(STAGE_ROW_BYTES);
                let first = rows.next().unwrap_or_default();
                staged.insert((transfer_id, page_no, 0), first)?;
                for (idx, row) in rows.enumerate() {
                    staged.insert((transfer_id, page_no, idx as u64 + 1), row)?;
                }
            }
        }
        txn.commit()?;
        crate::failpoint::hit("dp.stage.page");
        Ok(())
    }

    fn stage_commit_inner<D>(&self, transfer_id: &str, mut decode: D) -> Result<Applied, ApplyError>
    where
        D: FnMut(u64, &[u8], &mut DeltaSink<'_>) -> Result<(), ApplyError> + Send,
    {
        let staging_err = |reason: String| ApplyError::Staging {
            transfer_id: transfer_id.to_owned(),
            reason,
        };
        // Staged pages are committed, so a read snapshot streams them while the apply writes.
        let rtx = self.inner.db.begin_read().map_err(DpStoreError::from)?;
        let kind = {
            let transfers = rtx.open_table(TRANSFERS)?;
            let Some(raw) = transfers.get(transfer_id)? else {
                return Err(DpStoreError::UnknownTransfer(transfer_id.to_owned()).into());
            };
            decode_kind(raw.value()).ok_or_else(|| staging_err("corrupt transfer kind".into()))?
        };
        let staged = rtx.open_table(STAGED)?;
        let mut apply = self.begin(kind)?;
        apply.for_transfer(transfer_id);
        apply.feed(|sink| {
            // One page at a time: its rows are joined, decoded, and dropped.
            let mut page: Vec<u8> = Vec::new();
            let mut current: Option<u64> = None;
            for row in staged.range((transfer_id, 0, 0)..=(transfer_id, u64::MAX, u64::MAX))? {
                let (key, value) = row?;
                let (_, page_no, _) = key.value();
                if Some(page_no) != current {
                    if let Some(done) = current {
                        decode(done, &page, sink)?;
                        page.clear();
                    }
                    let next = current.map_or(0, |p| p + 1);
                    if page_no != next {
                        return Err(staging_err(format!(
                            "page {page_no} staged but page {next} missing"
                        )));
                    }
                    current = Some(page_no);
                }
                page.extend_from_slice(value.value());
            }
            if let Some(done) = current {
                decode(done, &page, sink)?;
            }
            Ok(())
        })?;
        apply.commit()
    }

    /// A write transaction for staging: durable only when the store is, and even then without
    /// an fsync of its own (staging is discarded on open; the durable commit that ends a
    /// transfer persists what it needs).
    fn staging_txn(&self) -> Result<WriteTransaction, DpStoreError> {
        let mut txn = self.inner.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        Ok(txn)
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

/// Removes every staged row of `transfer_id`.
pub(super) fn clear_staged(
    staged: &mut Table<'_, (&'static str, u64, u64), &'static [u8]>,
    transfer_id: &str,
) -> Result<(), DpStoreError> {
    staged.retain_in(
        (transfer_id, 0, 0)..=(transfer_id, u64::MAX, u64::MAX),
        |_, _| false,
    )?;
    Ok(())
}

/// A transfer's kind as its `transfers` row holds it (JSON).
fn encode_kind(kind: &ApplyKind) -> Vec<u8> {
    let v = match kind {
        ApplyKind::Full { version, epoch } => {
            json!({"full": {"version": version, "epoch": epoch}})
        }
        ApplyKind::Incremental {
            expect_from,
            latest,
        } => json!({"incremental": {"expect_from": expect_from, "latest": latest}}),
    };
    serde_json::to_vec(&v).unwrap_or_default()
}

fn decode_kind(raw: &[u8]) -> Option<ApplyKind> {
    let v: Value = serde_json::from_slice(raw).ok()?;
    if let Some(full) = v.get("full") {
        return Some(ApplyKind::Full {
            version: full.get("version")?.as_i64()?,
            epoch: full.get("epoch").and_then(Value::as_str).map(str::to_owned),
        });
    }
    let inc = v.get("incremental")?;
    Some(ApplyKind::Incremental {
        expect_from: inc.get("expect_from")?.as_i64()?,
        latest: inc.get("latest").and_then(Value::as_i64),
    })
}
