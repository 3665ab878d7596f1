//! deltaplane: a control-plane / data-plane configuration sync engine, compatible with Kong
//! Gateway's hybrid mode.
//!
//! # Layout
//!
//! Two planes as siblings over shared, plane-neutral layers (ARCHITECTURE.md draws it):
//!
//! - [`schema`]: entity descriptions (`schema/*.json`) and the generic validation engine.
//! - [`declarative`]: Kong's declarative files (`_format_version`) read into entities and
//!   written back, with no I/O; both planes use it.
//! - [`proto`]: the cluster protocol with no I/O: versions, deltas, the state hash, frame
//!   codecs, JSON-RPC, the hello, typed sync v2 messages, sync v1 messages and hash.
//! - [`net`]: the runtime pieces of a cluster link: mTLS, the hello exchange, the symmetric
//!   JSON-RPC peer, the operator JSON-RPC endpoint, and what both planes' `/metrics` share.
//! - [`uri`]: Kong's URI normalisation (`kong/tools/uri.lua`), for the router and the
//!   declarative reader.
//! - [`settings`] and [`node`]: flags both binaries accept; node id, clock, shutdown signal.
//! - [`cp`] (feature `cp`): the control plane: its SQL store, Admin API, cluster listener.
//! - [`dp`] (feature `dp`): the data plane: its redb store, sync link, status listener, and the
//!   proxy that serves traffic by the synced configuration (router, balancer, plugins); or,
//!   with no control plane, the configuration of a declarative file (`dp::file`).

pub mod cli;
#[cfg(feature = "cp")]
pub mod cp;
pub mod declarative;
#[cfg(feature = "dp")]
pub mod dp;
#[doc(hidden)]
pub mod failpoint;
#[doc(hidden)]
#[cfg(all(feature = "cp", feature = "dp", any(test, feature = "fuzzing")))]
pub mod fuzzing;
pub mod net;
pub mod node;
pub mod proto;
pub mod schema;
pub mod settings;
pub mod uri;
