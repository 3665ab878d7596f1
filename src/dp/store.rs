//! The data plane's redb store (being written).
