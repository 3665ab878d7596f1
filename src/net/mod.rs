//! The runtime pieces of a cluster link that both planes use, independent of what is synced:
//!
//! - [`tls`]: cluster mTLS on rustls (`shared` and `pki`).
//! - [`dial`]: TCP, TLS and the `/v2/outlet` upgrade, from the data plane's side.
//! - [`hello`]: the `kong.meta.v1.hello` exchange over a WebSocket.
//! - [`peer`]: the symmetric JSON-RPC peer (calls both ways on one socket, bounded queues,
//!   pings, write-stall and silence detection).
//! - [`operator`]: the operator JSON-RPC (`/rpc` over HTTP and WebSocket) and its client.
//! - [`stats`]: transport counters (bytes sent per encoding, frames refused) for the planes'
//!   metrics.
//! - [`constant_time_eq`]: comparing a presented bearer token with the configured one.

pub mod dial;
pub mod hello;
pub mod operator;
pub mod peer;
pub mod stats;
pub mod tls;

/// Compares a presented secret (a bearer token) with the configured one in time that does
/// not depend on where they differ; only the length may show.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
