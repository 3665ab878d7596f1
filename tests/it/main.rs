//! The integration tests: everything through public interfaces (HTTP, the store's API, the
//! binaries). `harness` starts control planes in-process on port 0 with temporary databases.
//!
//! PostgreSQL tests run when `DELTAPLANE_TEST_PG_URL` is set (CI sets it); each test creates a
//! fresh database and drops it afterwards.

mod admin;
mod bad_input;
mod binaries;
mod changelog;
mod crash;
mod declarative;
mod diagnostics;
mod dp_file;
mod dp_store;
mod fanout;
mod faults;
mod fleet;
mod fleetsim;
mod fuzz_corpus;
mod gateway;
mod harness;
mod interop;
mod kong_client;
mod layering;
mod metrics;
mod pgcluster;
mod plugin_schemas;
mod plugins;
mod proxy;
mod rawpeer;
mod router_cases;
mod sync;
mod upgrade;
mod upstreams;
mod v1;
