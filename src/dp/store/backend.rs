//! The store's file backend: redb's own [`FileBackend`], plus early writeback. A large write
//! transaction (a full sync writes the whole configuration) leaves its pages dirty in the
//! kernel's page cache until the commit's fsync, which then writes them all while the apply
//! waits. Here, every [`WRITEBACK_BYTES`] written, the kernel is asked to start writing the
//! file back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which does not wait for the disk), so
//! the disk works while the apply is still parsing and validating, and the fsync finds little
//! left to do. Durability is unchanged: only `sync_data` (fsync) makes a commit durable, as
//! before. Small commits (one version) write far less than the threshold and never ask.

use std::fs::File;
use std::ops::Bound;
use std::os::fd::{AsRawFd as _, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Bytes written between two writeback requests.
const WRITEBACK_BYTES: u64 = 8 << 20;

/// [`FileBackend`] with early writeback (see the module's doc).
#[derive(Debug)]
pub(super) struct WritebackFile {
    inner: FileBackend,
    /// The file `inner` owns; valid as long as `inner` is.
    fd: RawFd,
    /// Bytes written since the last writeback request or sync.
    unrequested: AtomicU64,
}

// === impl WritebackFile ===

impl WritebackFile {
    /// Opens (or creates) `path` as redb's `Builder::create` does.
    pub(super) fn open(path: &Path) -> std::io::Result<WritebackFile> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let fd = file.as_raw_fd();
        let inner = FileBackend::new(file).map_err(std::io::Error::other)?;
        Ok(WritebackFile {
            inner,
            fd,
            unrequested: AtomicU64::new(0),
        })
    }
}

impl StorageBackend for WritebackFile {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        self.unrequested.store(0, Ordering::Relaxed);
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.inner.write(offset, data)?;
        let len = data.len() as u64;
        if self.unrequested.fetch_add(len, Ordering::Relaxed) + len >= WRITEBACK_BYTES {
            self.unrequested.store(0, Ordering::Relaxed);
            // SAFETY: `fd` is the open file `inner` owns. A failure only means no early
            // writeback: the commit's fsync writes the pages either way.
            unsafe { libc::sync_file_range(self.fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
        Ok(())
    }

    fn close(&self) -> Result<(), std::io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
