//! Upstreams, targets and DNS. (Temporary stand-in: no upstreams; DNS through tokio.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

/// Every upstream of one configuration.
#[derive(Default)]
pub struct Balancers {}

impl Balancers {
    pub fn new(
        _upstreams: &[Value],
        _targets: &[Value],
        _previous: Option<&Balancers>,
    ) -> (Balancers, Vec<(String, String)>) {
        (Balancers {}, Vec::new())
    }

    pub fn get(&self, _ws_id: &str, _name: &str) -> Option<Arc<Upstream>> {
        None
    }
}

/// Hash inputs.
pub struct HashInput<'a> {
    pub consumer_id: Option<&'a str>,
    pub client_ip: std::net::IpAddr,
    pub headers: &'a http::HeaderMap,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub captures: &'a dyn Fn(&str) -> Option<String>,
}

/// A hash key.
pub struct HashKey {
    pub key: Option<String>,
    pub cookie: Option<String>,
}

/// One upstream.
pub struct Upstream {}

impl Upstream {
    pub fn name(&self) -> &str {
        ""
    }
    pub fn hash_key(&self, _input: &HashInput<'_>) -> HashKey {
        HashKey {
            key: None,
            cookie: None,
        }
    }
    pub async fn pick(
        &self,
        _key: Option<&str>,
        _tried: &[SocketAddr],
    ) -> Result<Pick, BalancerError> {
        Err(BalancerError::NoPeer)
    }
}

/// A picked target.
pub struct Pick {
    pub addr: SocketAddr,
    pub host: String,
    pub port: u16,
}

impl Pick {
    pub fn report(self, _outcome: Outcome) {}
}

/// How an attempt went.
pub enum Outcome {
    Response { status: u16, latency: Duration },
    TcpError,
    Timeout,
}

/// Why no target.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("failure to get a peer from the ring-balancer")]
    NoPeer,
    #[error("name resolution failed: {0}")]
    NameResolution(String),
}

/// DNS.
#[derive(Default)]
pub struct Resolver {}

impl Resolver {
    pub fn new() -> Resolver {
        Resolver {}
    }
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, BalancerError> {
        tokio::net::lookup_host((host, port))
            .await
            .map(|a| a.collect())
            .map_err(|e| BalancerError::NameResolution(e.to_string()))
    }
}
