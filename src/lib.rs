//! deltaplane: a control-plane / data-plane configuration sync engine, compatible with Kong
//! Gateway's hybrid mode.
//!
//! # Layout
//!
//! - [`schema`]: entity descriptions (`schema/*.json`) and the generic validation engine.
//! - [`store`]: the control plane's database (SQLite or PostgreSQL), entities and the versioned
//!   change log with its state hash.
//! - [`cp`]: the control plane: Admin API, group-commit writer, configuration, serve loop.
//! - [`sync`]: version strings and the delta shape shared by both planes.
//! - [`wire`]: frame encodings, JSON-RPC messages and the symmetric WebSocket peer.
//! - [`tls`]: cluster mTLS (`shared` and `pki`).
//! - [`dp`]: the data plane: redb store, sync client, status listener.
//! - [`v1`]: Kong's sync v1 (full-config push): config hash, `config_table` export.

pub mod cli;
pub mod cp;
pub mod dp;
#[doc(hidden)]
pub mod failpoint;
#[doc(hidden)]
pub mod fuzzing;
pub mod rpc;
pub mod schema;
pub mod store;
pub mod sync;
pub mod tls;
pub mod v1;
pub mod wire;
