//! The cluster wire: frame encodings, JSON-RPC 2.0 messages, and the symmetric peer that runs
//! Kong's `kong.meta.v1` protocol over a WebSocket.

pub mod codec;
pub mod hello;
pub mod jsonrpc;
pub mod peer;
