//! The plugins the data plane executes. (Temporary stand-in: none.)

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use serde_json::Value;

/// The plugins this data plane executes.
pub const EXECUTED: &[(&str, &str)] = &[];

/// A consumer.
#[derive(Debug)]
pub struct Consumer {
    pub id: String,
}

/// A credential.
#[derive(Debug, Clone)]
pub struct Credential {
    pub id: String,
}

/// One request as the plugins see it.
pub struct Ctx {
    pub route_id: Option<String>,
    pub route_name: Option<String>,
    pub service_id: Option<String>,
    pub service_name: Option<String>,
    pub ws_id: String,
    pub client_ip: IpAddr,
    pub method: http::Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: http::HeaderMap,
    pub tls: bool,
    pub consumer: Option<Arc<Consumer>>,
    pub credential: Option<Credential>,
    pub authenticated_groups: Option<Vec<String>>,
}

/// The log phase's facts.
pub struct LogEntry {
    pub status: u16,
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub latency_total: Duration,
    pub latency_upstream: Option<Duration>,
    pub latency_kong: Duration,
}

/// The plugin table.
#[derive(Default)]
pub struct Plugins {}

impl Plugins {
    pub fn new(
        _entities: &dyn Fn(&str) -> Vec<Value>,
        _previous: Option<&Plugins>,
        _exporter: &Arc<Exporter>,
    ) -> (Plugins, Vec<(String, String)>) {
        (Plugins {}, Vec::new())
    }
    pub async fn access(&self, _ctx: &mut Ctx) -> Option<http::Response<Full<Bytes>>> {
        None
    }
    pub fn response(&self, _ctx: &Ctx, _status: http::StatusCode, _headers: &mut http::HeaderMap) {}
    pub fn log(&self, _ctx: &Ctx, _log: &LogEntry) {}
}

/// Prometheus request metrics.
#[derive(Default)]
pub struct Exporter {}

impl Exporter {
    pub fn new() -> Arc<Exporter> {
        Arc::new(Exporter {})
    }
    pub fn register(&self, _registry: &mut prometheus_client::registry::Registry) {}
}
