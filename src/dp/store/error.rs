//! The store's errors: [`DpStoreError`] for opening and reading, [`ApplyError`] for an apply
//! (with [`VersionError`] for batches whose versions do not fit), and the `From` impls that
//! fold redb's per-operation errors into them.

use serde_json::Value;

/// Why the store could not be opened or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DpStoreError {
    #[error("storage: {0}")]
    Redb(#[from] redb::Error),
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("unknown entity type '{0}'")]
    UnknownType(String),
}

/// Why an apply was rejected. Nothing of it was written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// Some deltas are invalid: Kong's `err_t` for `notify_validation_error`. `fields` maps
    /// entity type → entity id → Kong's field error tree; `flattened` has one item per entity.
    #[error("{message}")]
    Invalid {
        message: String,
        fields: Value,
        flattened: Vec<Value>,
    },
    /// The versions of the batch do not fit the stored version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// A paged transfer is incomplete.
    #[error("transfer '{transfer_id}': {reason}")]
    Staging { transfer_id: String, reason: String },
    #[error(transparent)]
    Storage(#[from] DpStoreError),
}

/// How a batch's versions fail the version rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VersionError {
    /// The caller believed the store was at `expected`; it is at `stored`.
    #[error("expected to apply after version {expected}, but the store is at {stored}")]
    Conflict { expected: i64, stored: i64 },
    /// A delta's version does not follow the previous one (or the stored version).
    #[error("delta version {got} does not follow version {after}")]
    Gap { after: i64, got: i64 },
    /// A full-sync delta carries another version than the sync.
    #[error("full sync to version {expected} got a delta of version {got}")]
    FullSyncMismatch { expected: i64, got: i64 },
    /// The batch ends at `last`, not at the CP's latest version.
    #[error("deltas end at version {last}, the latest version is {latest}")]
    NotLatest { last: i64, latest: i64 },
}

// === impl DpStoreError ===

impl From<redb::TransactionError> for DpStoreError {
    fn from(e: redb::TransactionError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::TableError> for DpStoreError {
    fn from(e: redb::TableError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::StorageError> for DpStoreError {
    fn from(e: redb::StorageError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::CommitError> for DpStoreError {
    fn from(e: redb::CommitError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::DatabaseError> for DpStoreError {
    fn from(e: redb::DatabaseError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}
impl From<redb::SetDurabilityError> for DpStoreError {
    fn from(e: redb::SetDurabilityError) -> DpStoreError {
        DpStoreError::Redb(e.into())
    }
}

// === impl ApplyError ===

impl From<redb::StorageError> for ApplyError {
    fn from(e: redb::StorageError) -> ApplyError {
        ApplyError::Storage(e.into())
    }
}
impl From<redb::TableError> for ApplyError {
    fn from(e: redb::TableError) -> ApplyError {
        ApplyError::Storage(e.into())
    }
}
