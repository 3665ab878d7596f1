//! Fuzz target bodies, shared by `fuzz/` (cargo-fuzz) and the test suite, which replays the
//! checked-in corpus on stable Rust. Each function panics only when an invariant breaks.
//!
//! Structured inputs are decoded by hand from the bytes (no `arbitrary`), so the main crate
//! needs no extra dependency and a corpus file means the same thing to both.
//!
//! One file per target, named after it:
//!
//! - `admin_entity.rs`: Admin API bodies through the schema engine.
//! - `state_hash.rs`: the state hash does not depend on order.
//! - `delta_apply.rs`: op sequences applied to the DP store (in memory) and to a reference
//!   model that must agree after every op.
//! - `wire_frame.rs`: frame decoders, JSON-RPC, the hello, `get_delta` answers, sync v1.

mod admin_entity;
mod delta_apply;
mod state_hash;
mod wire_frame;

pub use admin_entity::admin_entity;
pub use delta_apply::delta_apply;
pub use state_hash::state_hash;
pub use wire_frame::wire_frame;
