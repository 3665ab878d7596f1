//! Paged transfers: a snapshot or a version too large for one frame arrives as pages. The v2
//! session applies them as they arrive ([`DpStore::apply_pages`]): one [`Apply`] open from
//! the first page to the commit, so decoding and writing a page overlap fetching the next.
//!
//! Nothing of a transfer is kept outside that apply: its pages' deltas are rows of the one
//! uncommitted write transaction, and only the final tables reach redb, at [`Apply::commit`].
//! A crash at any point leaves the last committed configuration, and transfers are not
//! resumable (a cut transfer is fetched again from its first page).
//!
//! [`Apply`]: crate::dp::store::Apply
//! [`Apply::commit`]: crate::dp::store::Apply::commit

use crate::dp::store::{Applied, ApplyError, ApplyKind, DeltaSink, DpStore};

// === impl DpStore ===

impl DpStore {
    /// Applies a paged transfer of `pages` pages as they arrive, in one apply: the write
    /// transaction is open from the first page to the commit, each page is decoded and
    /// validated (on this thread) and written (on a second one, [`Apply::feed`]) while the
    /// caller fetches the next. `arrived` yields `(page_no, bytes)` in page order (pages
    /// count from 0) and blocks until the next page is there; it ending before page
    /// `pages - 1`, or a page out of order, is [`ApplyError::Staging`] and nothing is
    /// written (a transfer cut by a lost link).
    ///
    /// `decode(page_no, bytes, sink)` turns one page into deltas and feeds them to `sink`
    /// one at a time; its errors (and the sink's, which it must pass on) reject the
    /// transfer. A transfer is accepted or rejected by the rules of one apply of all its
    /// pages' deltas, except that an incremental transfer of no deltas still commits; the
    /// change feed is told that everything may have changed.
    ///
    /// The pages' deltas are rows of an uncommitted redb transaction, which no reader sees
    /// and a crash or a drop discards, so the store shows the previous configuration until
    /// the one commit, and a rejected transfer writes nothing. The apply holds the store's
    /// writer turn meanwhile; its only other writer is the same session, which waits for
    /// the transfer anyway.
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
        let cut = |reason: String| ApplyError::Staging {
            transfer_id: transfer_id.to_owned(),
            reason,
        };
        let mut apply = self.begin(kind)?;
        apply.for_transfer();
        apply.feed(|sink| {
            let mut expected = 0u64;
            for (page_no, bytes) in arrived {
                if page_no != expected || page_no >= pages {
                    return Err(cut(format!(
                        "page {page_no} arrived, expected page {expected} of {pages}"
                    )));
                }
                decode(page_no, bytes.as_ref(), sink)?;
                drop(bytes);
                expected += 1;
                crate::failpoint::hit("dp.stage.page");
            }
            if expected < pages {
                return Err(cut(format!(
                    "interrupted after {expected} of {pages} pages"
                )));
            }
            Ok(())
        })?;
        apply.commit()
    }
}
