//! deltaplane: a control-plane / data-plane configuration sync engine, compatible with Kong
//! Gateway's hybrid mode.
//!
//! # Layout
//!
//! - [`schema`]: entity descriptions (`schema/*.json`) and the generic validation engine.
//! - [`store`]: the control plane's database (SQLite or PostgreSQL), entities and the versioned
//!   change log with its state hash.
//! - [`cp`]: the control plane: Admin API, group-commit writer, configuration, serve loop.

pub mod cp;
#[doc(hidden)]
pub mod fuzzing;
pub mod schema;
pub mod store;
