//! DNS for service hosts and target hosts: A and AAAA records (and `/etc/hosts`), cached for
//! each answer's TTL, with concurrent lookups of one name sharing a single query.
//!
//! Kong resolves a service host that names no upstream with its DNS client
//! (`kong/runloop/balancer/init.lua`, `execute`: `toip`), and caches answers by TTL.
//! IP literals never reach the DNS client.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;

use super::BalancerError;

/// The shared future of one lookup in flight.
type PendingLookup = Shared<BoxFuture<'static, Result<Arc<[IpAddr]>, String>>>;

/// One cache slot: an answer with its expiry, a recent failure, or a lookup in flight.
enum Slot {
    Ready {
        ips: Arc<[IpAddr]>,
        expires: Instant,
    },
    Failed {
        error: String,
        expires: Instant,
    },
    Pending(PendingLookup),
}

/// How long a failed lookup is remembered (Kong's `dns_error_ttl` default: 1 s), so a bad
/// name does not send one query per request.
const ERROR_TTL: Duration = Duration::from_secs(1);

/// A caching A/AAAA resolver shared by the whole process (pass one `Arc<Resolver>` to every
/// [`super::Balancers::new`] and to the proxy for plain service hosts).
pub struct Resolver {
    /// hickory's resolver, reading `/etc/resolv.conf` and `/etc/hosts`; `None` only when it
    /// could not be built at all (then every name fails, IP literals still work).
    inner: Option<TokioResolver>,
    /// Answers by host name (lowercased), with their expiry.
    cache: Arc<Mutex<HashMap<String, Slot>>>,
    /// The longest time an answer is kept, whatever its TTL.
    max_ttl: Duration,
    /// How many lookups went to hickory (cache misses), for tests and metrics.
    lookups: Arc<AtomicU64>,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("max_ttl", &self.max_ttl)
            .field("lookups", &self.lookups.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

impl Resolver {
    /// The longest TTL kept by default: one hour.
    pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);

    /// A resolver with the system configuration (`/etc/resolv.conf`, `/etc/hosts`), querying
    /// A and AAAA records. When the system configuration cannot be read, it falls back to no
    /// name server (only `/etc/hosts` and IP literals resolve) and logs why.
    pub fn new() -> Resolver {
        Self::with_max_ttl(Self::DEFAULT_MAX_TTL)
    }

    /// Like [`Resolver::new`], keeping each answer at most `max_ttl` (a record's own TTL
    /// applies when shorter).
    pub fn with_max_ttl(max_ttl: Duration) -> Resolver {
        let builder = match TokioResolver::builder_tokio() {
            Ok(builder) => builder,
            Err(err) => {
                tracing::warn!(%err, "cannot read the system DNS configuration; only /etc/hosts and IP literals resolve");
                hickory_resolver::Resolver::builder_with_config(
                    ResolverConfig::default(),
                    TokioRuntimeProvider::default(),
                )
            }
        };
        let mut builder = builder;
        builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        let inner = match builder.build() {
            Ok(resolver) => Some(resolver),
            Err(err) => {
                tracing::error!(%err, "cannot build the DNS resolver; only IP literals resolve");
                None
            }
        };
        Resolver {
            inner,
            cache: Arc::new(Mutex::new(HashMap::new())),
            max_ttl,
            lookups: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Resolves `host` to socket addresses on `port`. An IP literal (IPv6 with or without
    /// brackets) answers at once; a name is answered from the cache while its TTL lasts,
    /// else looked up (one lookup per name at a time, shared by every caller waiting on it).
    /// Errors: [`BalancerError::NameResolution`] when the name does not resolve or has no
    /// address.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, BalancerError> {
        if let Some(ip) = parse_ip_literal(host) {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let ips = self.lookup(host).await?;
        Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
    }

    /// The cached, unexpired addresses of `host` (IP literals included), without any lookup.
    pub fn cached(&self, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        if let Some(ip) = parse_ip_literal(host) {
            return Some(vec![SocketAddr::new(ip, port)]);
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(&host.to_ascii_lowercase()) {
            Some(Slot::Ready { ips, expires }) if *expires > Instant::now() => {
                Some(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
            }
            _ => None,
        }
    }

    /// How many lookups missed the cache and went to the DNS (or `/etc/hosts`).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// The addresses of a name: from the cache, from a lookup in flight, or from a new lookup.
    async fn lookup(&self, host: &str) -> Result<Arc<[IpAddr]>, BalancerError> {
        let key = host.to_ascii_lowercase();
        let pending = {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            match cache.get(&key) {
                Some(Slot::Ready { ips, expires }) if *expires > Instant::now() => {
                    return Ok(ips.clone());
                }
                Some(Slot::Failed { error, expires }) if *expires > Instant::now() => {
                    return Err(BalancerError::NameResolution(error.clone()));
                }
                Some(Slot::Pending(pending)) => pending.clone(),
                _ => {
                    let Some(inner) = self.inner.clone() else {
                        return Err(BalancerError::NameResolution(format!(
                            "{host}: no DNS resolver"
                        )));
                    };
                    let pending = self.start_lookup(inner, key.clone());
                    cache.insert(key, Slot::Pending(pending.clone()));
                    pending
                }
            }
        };
        pending.await.map_err(BalancerError::NameResolution)
    }

    /// Starts one lookup whose result every waiter shares. The lookup itself stores its
    /// answer in the cache (or clears the slot on failure); when every waiter goes away
    /// before it ends, the next caller finds the slot pending and polls the same lookup.
    fn start_lookup(&self, inner: TokioResolver, key: String) -> PendingLookup {
        let cache = Arc::clone(&self.cache);
        let lookups = Arc::clone(&self.lookups);
        let max_ttl = self.max_ttl;
        async move {
            lookups.fetch_add(1, Ordering::Relaxed);
            let result = inner.lookup_ip(key.as_str()).await;
            let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(answer) => {
                    let ips: Arc<[IpAddr]> = answer.iter().collect();
                    if ips.is_empty() {
                        let error = format!("{key}: empty record received");
                        cache.insert(key, failed(error.clone()));
                        return Err(error);
                    }
                    let now = Instant::now();
                    let ttl = answer
                        .valid_until()
                        .saturating_duration_since(now)
                        .min(max_ttl);
                    cache.insert(
                        key,
                        Slot::Ready {
                            ips: ips.clone(),
                            expires: now + ttl,
                        },
                    );
                    Ok(ips)
                }
                Err(err) => {
                    let error = format!("{key}: {err}");
                    cache.insert(key, failed(error.clone()));
                    Err(error)
                }
            }
        }
        .boxed()
        .shared()
    }
}

/// A failure slot, kept for [`ERROR_TTL`].
fn failed(error: String) -> Slot {
    Slot::Failed {
        error,
        expires: Instant::now() + ERROR_TTL,
    }
}

/// An IP literal, IPv6 possibly in brackets (`[::1]`), as Kong's `hostname_type` sees it.
pub(crate) fn parse_ip_literal(host: &str) -> Option<IpAddr> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse().ok()
}
