//! The data plane's proxy: Kong's HTTP gateway, driven by the synced configuration.
//!
//! - `router/`: Kong 3.10's `traditional_compatible` router (matching, priority, the upstream
//!   URI), with no I/O.
//! - `balancer/`: upstreams and targets (Kong's algorithms, health checks) and DNS for plain
//!   service hosts.
//! - `plugins/`: the plugins this data plane executes, and the plugin table of one
//!   configuration.

pub mod balancer;
pub mod plugins;
pub mod router;
