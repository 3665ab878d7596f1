//! The cluster protocol with no I/O: what both planes and every test client agree on, as
//! types and pure functions. Nothing here names tokio, sqlx or redb (`.ci/layering` checks).
//!
//! - [`version`]: change-log versions and Kong's `v02_` strings.
//! - [`delta`]: the delta shape and its lenient reader.
//! - [`hash`]: the state hash of a whole configuration.
//! - [`codec`]: frame encodings (`x-snappy-framed`, `x-zstd`).
//! - [`jsonrpc`]: JSON-RPC 2.0 messages, Kong's error codes and batch rules.
//! - [`hello`]: `kong.meta.v1.hello`, capabilities and what a hello says about its sender.
//! - [`v2`]: typed `kong.sync.v2` / `deltaplane.sync.v1` params and results, the answer
//!   writer and the streaming answer reader.
//! - [`v1`]: Kong's sync v1 messages and config hash.

pub mod codec;
pub mod delta;
pub mod hash;
pub mod hello;
pub mod jsonrpc;
pub mod v1;
pub mod v2;
pub mod version;

pub use delta::{Delta, DeltaError};
pub use hash::StateHash;
pub use version::{EMPTY_VERSION, Version, parse_version, version_string};

/// Kong's capability for incremental sync.
pub const CAP_KONG_SYNC_V2: &str = "kong.sync.v2";
/// Our extensions (paged transfers), only ever called on a peer that announced them.
pub const CAP_DELTAPLANE_SYNC_V1: &str = "deltaplane.sync.v1";
/// Our pushed deltas: the control plane sends small versions to the data plane unasked
/// ([`v2::PUSH_DELTAS`]), one shared frame for every data plane that announced this.
pub const CAP_DELTAPLANE_PUSH_V1: &str = "deltaplane.push.v1";

/// The data plane's `sync_status` when the configuration uses a plugin it lacks; the control
/// plane then withholds the configuration.
pub const PLUGIN_SET_INCOMPATIBLE: &str = "plugin_set_incompatible";
/// The data plane's `sync_status` when it runs a plugin of another major or a newer minor
/// version than the control plane; the control plane then withholds the configuration.
pub const PLUGIN_VERSION_INCOMPATIBLE: &str = "plugin_version_incompatible";

/// Kong's `sync_status` of a data plane, as the control plane records it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum SyncStatus {
    #[default]
    Unknown,
    Normal,
    /// Refused at connect: another major, or a newer minor, Kong version.
    KongVersionIncompatible,
    /// The configuration uses a plugin the data plane lacks: withheld.
    PluginSetIncompatible,
    /// The data plane runs a plugin of another major or a newer minor version: withheld.
    PluginVersionIncompatible,
}

impl SyncStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncStatus::Unknown => "unknown",
            SyncStatus::Normal => "normal",
            SyncStatus::KongVersionIncompatible => "kong_version_incompatible",
            SyncStatus::PluginSetIncompatible => PLUGIN_SET_INCOMPATIBLE,
            SyncStatus::PluginVersionIncompatible => PLUGIN_VERSION_INCOMPATIBLE,
        }
    }
}

impl std::fmt::Display for SyncStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sync protocol a data plane speaks on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncProtocol {
    /// Kong's full-configuration push on `/v1/outlet`.
    V1,
    /// JSON-RPC on `/v2/outlet` (`kong.sync.v2`).
    V2,
}

impl SyncProtocol {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncProtocol::V1 => "v1",
            SyncProtocol::V2 => "v2",
        }
    }
}

impl std::fmt::Display for SyncProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a `get_delta` error message is the control plane withholding the configuration
/// (the message starts with the data plane's `sync_status`) rather than failing.
pub fn is_withheld(message: &str) -> bool {
    [PLUGIN_SET_INCOMPATIBLE, PLUGIN_VERSION_INCOMPATIBLE]
        .iter()
        .any(|status| {
            message
                .strip_prefix(status)
                .is_some_and(|rest| rest.starts_with(':'))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withheld_messages_are_told_apart() {
        assert!(is_withheld(
            "plugin_set_incompatible: uses plugins: rate-limiting"
        ));
        assert!(is_withheld(
            "plugin_version_incompatible: the data plane runs x 3.11.0"
        ));
        assert!(!is_withheld("plugin_set_incompatible"));
        assert!(!is_withheld("database unavailable: timed out"));
    }
}
