//! The plugins the data plane executes, and the plugin table of one configuration.
//!
//! The behaviour follows Kong 3.10: which configuration of a plugin applies to a request comes
//! from `kong/runloop/plugins_iterator.lua`, each plugin from its `kong/plugins/<name>/handler.lua`.
//!
//! - `table`: [`Plugins`], the plugin table (configs, consumers, credentials, ACL groups).
//! - `request`: [`Ctx`], [`LogEntry`] and the responses plugins answer with.
//! - one file per plugin: `cors`, `jwt`, `keyauth`, `basicauth`, `ip`, `acl`, `ratelimit`,
//!   `prometheus`; `auth` holds what the three auth plugins share (consumer headers, anonymous).
//! - `clock`: the time source (settable in tests).

mod acl;
mod auth;
mod basicauth;
mod clock;
mod cors;
mod ip;
mod jwt;
mod keyauth;
mod prometheus;
mod ratelimit;
mod request;
mod table;
mod util;

#[cfg(test)]
mod tests;

pub use clock::Clock;
pub use prometheus::Exporter;
pub use request::{BodyFuture, Consumer, Credential, Ctx, LogEntry, PluginMessage, ResponseSource};
pub use table::Plugins;

/// The plugins this data plane executes, with their versions (Kong 3.10's handler
/// VERSIONs: the DP announces these to the CP).
pub const EXECUTED: &[(&str, &str)] = &[
    ("cors", "3.10.0"),
    ("jwt", "3.10.0"),
    ("key-auth", "3.10.0"),
    ("basic-auth", "3.10.0"),
    ("ip-restriction", "3.10.0"),
    ("acl", "3.10.0"),
    ("rate-limiting", "3.10.0"),
    ("prometheus", "3.10.0"),
];
