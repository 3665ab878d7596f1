//! The data plane: its redb store, the sync client, and the status listener.

pub mod store;
