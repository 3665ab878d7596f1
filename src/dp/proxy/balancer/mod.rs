//! Upstreams, targets and DNS: Kong 3.10's load balancing for the proxy.
//!
//! Specification: `kong/runloop/balancer/*.lua` and `kong/db/schema/entities/upstreams.lua`,
//! `targets.lua` in Kong's tree.
//!
//! - [`Balancers`]: every upstream of one configuration, by workspace and name, rebuilt per
//!   configuration version and reusing the runtime state of the previous one.
//! - [`Upstream`]: one upstream's targets, algorithm ([`Algorithm`]), health (passive
//!   counting through [`Pick::report`], active probes in a task per upstream: `health.rs`)
//!   and hashing ([`Upstream::hash_key`]).
//! - [`Resolver`]: A/AAAA resolution with a TTL cache, shared by the whole process.
//!
//! **Use from the proxy**, per request whose service host names an upstream
//! ([`Balancers::get`] with the service's workspace):
//! 1. `let key = upstream.hash_key(&input)`; when `key.cookie` is set, add its
//!    [`HashCookie::set_cookie`] to the response.
//! 2. `let pick = upstream.pick(key.key.as_deref(), &tried).await?` (an error is a 503 with
//!    its `Display` text); connect to `pick.addr`, with Host `upstream.host_header()`, else
//!    `pick.host` (plus the port when not the default), unless the route preserves the host.
//! 3. `pick.report(outcome)` once the attempt is over; on a retry push `pick.addr` to `tried`
//!    and pick again (a dropped, unreported Pick only releases its connection).
//!
//! Other service hosts go through [`Resolver::resolve`].
//!
//! **Round-robin and `slots`.** Kong 3.10's wheel has `total_weight / gcd` slots
//! (`round_robin.lua`); `slots` sizes only the consistent-hashing continuum. We follow the
//! source.
//!
//! **Unit of balancing.** Kong balances over *addresses*: each A record of a target's host
//! name becomes its own wheel entry with the target's weight, and health is kept per
//! address. Here the unit is the *target*: a host-name target is one entry with its weight,
//! resolved at pick time (through the TTL cache) and rotated over its addresses; health is
//! kept per target. For IP targets (the common case) both are the same.

mod config;
mod hash;
mod health;
mod resolver;
mod tls;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::seq::SliceRandom;
use serde_json::Value;

pub use config::{
    ActiveConfig, Algorithm, HashOn, HealthConfig, PassiveConfig, ProbeType, Thresholds,
    UpstreamConfig,
};
pub use resolver::Resolver;

use health::{Health, Report};

/// Every upstream of one configuration, by name (a service's `host` names an upstream when
/// an upstream of that name exists in its workspace).
#[derive(Debug, Default)]
pub struct Balancers {
    /// Upstreams by name, then workspace id (one lookup by `&str`, no key to build).
    by_name: HashMap<String, Vec<(String, Arc<Upstream>)>>,
    /// Upstreams by id, for the next configuration to reuse.
    by_id: HashMap<String, Arc<Upstream>>,
}

/// What a consistent-hashing upstream hashes on, gathered by the proxy for one request.
pub struct HashInput<'a> {
    /// The authenticated consumer's id (or, without a consumer, the credential's id).
    pub consumer_id: Option<&'a str>,
    /// The client's address (`$remote_addr`).
    pub client_ip: std::net::IpAddr,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
    /// The normalised request path, without the query (`$uri`).
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// Kong's uri_captures of the matched route: by name and by index.
    pub captures: &'a dyn Fn(&str) -> Option<String>,
}

/// The hash key of one request, and the cookie to set when Kong would create one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HashKey {
    /// The value to hash; `None` when the upstream does not hash or no input was present
    /// (the ring then hashes the empty string, as Kong does).
    pub key: Option<String>,
    /// Set when `hash_on` is `cookie` and the request had none: the proxy adds
    /// [`HashCookie::set_cookie`] to the response.
    pub cookie: Option<HashCookie>,
}

/// A hash cookie Kong sets on the response (`set_cookie` in `kong/runloop/balancer/init.lua`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashCookie {
    /// `hash_on_cookie`.
    pub name: String,
    /// The generated uuid.
    pub value: String,
    /// `hash_on_cookie_path`.
    pub path: String,
}

impl HashCookie {
    /// The `Set-Cookie` value Kong sends: `name=value; Path=path; Same-Site=Lax; HttpOnly`.
    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Path={}; Same-Site=Lax; HttpOnly",
            self.name, self.value, self.path
        )
    }
}

/// Why no address was picked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalancerError {
    /// No healthy target (or none at all); Kong answers 503.
    #[error("failure to get a peer from the ring-balancer")]
    NoPeer,
    /// The host name did not resolve (the detail is for logs); Kong answers 503
    /// "name resolution failed".
    #[error("name resolution failed")]
    NameResolution(String),
}

/// How one attempt went, for passive health checks and the latency algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status after this long.
    Response {
        /// The response status.
        status: u16,
        /// Connect plus response time.
        latency: Duration,
    },
    /// Connecting, sending or receiving failed.
    TcpError,
    /// Connecting, sending or receiving timed out.
    Timeout,
}

/// One target of an upstream with its runtime state.
#[derive(Debug)]
pub(crate) struct Target {
    /// The host as Kong names the address (IPv6 in brackets), for the hashing ring.
    name: String,
    /// The host to resolve and to send as Host (IPv6 without brackets).
    host: String,
    port: u16,
    weight: u32,
    /// Whether the balancer uses it (mirrors `health.state`).
    available: AtomicBool,
    health: Mutex<Health>,
    /// Connections picked and not yet released.
    connections: AtomicU32,
    /// The latency EWMA (seconds) and when it was last updated.
    ewma: Mutex<(f64, Option<Instant>)>,
    /// Rotation over the addresses of a host name.
    next_addr: AtomicUsize,
}

impl Target {
    fn new(cfg: &config::TargetConfig) -> Target {
        let name = if cfg.host.contains(':') {
            format!("[{}]", cfg.host)
        } else {
            cfg.host.clone()
        };
        Target {
            name,
            host: cfg.host.clone(),
            port: cfg.port,
            weight: cfg.weight,
            available: AtomicBool::new(true),
            health: Mutex::new(Health::default()),
            connections: AtomicU32::new(0),
            ewma: Mutex::new((0.0, None)),
            next_addr: AtomicUsize::new(0),
        }
    }

    fn available(&self) -> bool {
        self.available.load(Ordering::Acquire)
    }
}

/// How an upstream picks a target.
#[derive(Debug)]
enum Algo {
    /// Kong's wheel (`round_robin.lua`): target indexes, shuffled, and the pointer.
    RoundRobin {
        wheel: Vec<u32>,
        pointer: AtomicUsize,
    },
    /// Kong's continuum (`consistent_hashing.lua`): a target index per point, or `NONE`.
    Hashing { continuum: Vec<u32> },
    /// `least_connections.lua`.
    LeastConnections,
    /// `latency.lua`.
    Latency,
}

/// An empty continuum point.
const NONE: u32 = u32::MAX;
/// Kong's points per target at equal weight (`SERVER_POINTS`).
const SERVER_POINTS: f64 = 160.0;
/// Kong's smallest continuum (`MIN_CONTINUUM_SIZE`, also the default).
const MIN_CONTINUUM_SIZE: u32 = 1000;
/// The EWMA decay time of the latency algorithm, in seconds (`DECAY_TIME`).
const DECAY_TIME: f64 = 10.0;

/// One upstream: its targets, algorithm, health checks and hashing rules.
#[derive(Debug)]
pub struct Upstream {
    config: UpstreamConfig,
    /// The entity and its targets' entities (sorted by id), to tell whether the next
    /// configuration changed it.
    entity: Value,
    target_entities: Vec<Value>,
    /// Targets sorted by name then port (Kong's continuum order).
    targets: Vec<Arc<Target>>,
    algo: Algo,
    resolver: Arc<Resolver>,
    /// The active prober, aborted on drop.
    active: Mutex<Option<tokio::task::AbortHandle>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(task) = self
            .active
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }
}

/// A picked address. Holds one connection on its target (least-connections) until it is
/// reported or dropped.
#[derive(Debug)]
pub struct Pick {
    /// The address to connect to.
    pub addr: SocketAddr,
    /// The target's host name (for the upstream Host header when not preserve_host, unless
    /// the upstream sets host_header: see [`Upstream::host_header`]); an IPv6 target is in
    /// brackets, ready for a Host header.
    pub host: String,
    /// The target's port.
    pub port: u16,
    upstream: Arc<Upstream>,
    target: Arc<Target>,
}

impl Drop for Pick {
    fn drop(&mut self) {
        self.target.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Pick {
    /// Reports how the attempt went, for passive health checks, least-connections (the
    /// connection count is held from pick until the Pick is dropped or reported) and latency.
    pub fn report(self, outcome: Outcome) {
        let up = &self.upstream;
        if up.config.health.enabled() {
            let passive = &up.config.health.passive;
            let report = match outcome {
                Outcome::Response { status, .. } => {
                    if passive.healthy.http_statuses.contains(&status) {
                        Some((Report::Success, passive.healthy.successes))
                    } else if passive.unhealthy.http_statuses.contains(&status) {
                        Some((Report::HttpFailure, passive.unhealthy.http_failures))
                    } else {
                        None
                    }
                }
                Outcome::TcpError => Some((Report::TcpFailure, passive.unhealthy.tcp_failures)),
                Outcome::Timeout => Some((Report::Timeout, passive.unhealthy.timeouts)),
            };
            if let Some((report, limit)) = report {
                up.record(&self.target, report, limit);
            }
        }
        if let (Algo::Latency, Outcome::Response { latency, .. }) = (&up.algo, outcome) {
            let mut ewma = self.target.ewma.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            *ewma = (decay(*ewma, latency.as_secs_f64(), now), Some(now));
        }
    }
}

/// Kong's `decay_ewma`: the EWMA moved towards `rtt` by the time since its last update.
/// Never touched, it takes `rtt` whole.
fn decay((ewma, touched): (f64, Option<Instant>), rtt: f64, now: Instant) -> f64 {
    let Some(touched) = touched else { return rtt };
    let td = now.saturating_duration_since(touched).as_secs_f64();
    let weight = (-td / DECAY_TIME).exp();
    ewma * weight + rtt * (1.0 - weight)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Kong's round-robin wheel: each target `weight / gcd` times, shuffled.
fn build_wheel(targets: &[Arc<Target>]) -> Vec<u32> {
    let divisor = targets.iter().fold(0, |d, t| gcd(d, u64::from(t.weight)));
    if divisor == 0 {
        return Vec::new();
    }
    let mut wheel = Vec::new();
    for (idx, target) in targets.iter().enumerate() {
        let points = u64::from(target.weight) / divisor;
        wheel.extend(std::iter::repeat_n(idx as u32, points as usize));
    }
    wheel.shuffle(&mut rand::rng());
    wheel
}

/// Kong's continuum index of a value: xxhash32 (seed 0) modulo the number of points.
fn continuum_index(value: &str, points: u32) -> usize {
    (xxhash_rust::xxh32::xxh32(value.as_bytes(), 0) % points) as usize
}

/// Kong's consistent-hashing continuum (`afterHostUpdate` in `consistent_hashing.lua`):
/// `slots` points (at least 1000); each target gets
/// `floor(weight / total_weight * n_targets * 160)` points (at least 1 when weighted) at
/// `xxhash32("<ip>::<port> <i>") % points`, a collision moving to the next `i`.
fn build_continuum(targets: &[Arc<Target>], slots: u32) -> Vec<u32> {
    let points = if slots >= MIN_CONTINUUM_SIZE {
        slots
    } else {
        MIN_CONTINUUM_SIZE
    };
    let mut continuum = vec![NONE; points as usize];
    let total_weight: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total_weight == 0 {
        return continuum;
    }
    let n_targets = targets.len() as f64;
    for (idx, target) in targets.iter().enumerate() {
        let prop = f64::from(target.weight) / total_weight as f64;
        let mut entries = (prop * n_targets * SERVER_POINTS).floor() as u64;
        if target.weight > 0 && entries == 0 {
            entries = 1;
        }
        let mut i: u64 = 1;
        while i <= entries {
            let name = format!("{}::{} {}", target.name, target.port, i);
            let slot = &mut continuum[continuum_index(&name, points)];
            if *slot == NONE {
                *slot = idx as u32;
            } else {
                entries += 1;
            }
            i += 1;
            if i > u64::from(points) {
                tracing::error!(
                    "consistent hashing balancer requires more entries to add the number of hosts requested, please increase the wheel size"
                );
                return continuum;
            }
        }
    }
    continuum
}

impl Upstream {
    /// Builds an upstream; `previous` (the same upstream in the replaced configuration)
    /// lends the health state and latency average of targets still there.
    fn build(
        config: UpstreamConfig,
        entity: Value,
        targets: Vec<(config::TargetConfig, Value)>,
        previous: Option<&Upstream>,
        resolver: &Arc<Resolver>,
    ) -> Upstream {
        let target_entities: Vec<Value> = targets.iter().map(|(_, v)| v.clone()).collect();
        let mut list: Vec<Arc<Target>> = targets
            .iter()
            .map(|(cfg, _)| Arc::new(Target::new(cfg)))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name).then(a.port.cmp(&b.port)));
        // Without a health checker (Kong creates none when every interval and unhealthy
        // threshold is 0) every target is healthy, whatever the previous state.
        let previous = previous.filter(|_| config.health.enabled());
        if let Some(previous) = previous {
            for target in &list {
                let old = previous
                    .targets
                    .iter()
                    .find(|o| o.host == target.host && o.port == target.port);
                if let Some(old) = old {
                    let health = old.health.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    target
                        .available
                        .store(health.state.available(), Ordering::Release);
                    *target.health.lock().unwrap_or_else(|e| e.into_inner()) = health;
                    *target.ewma.lock().unwrap_or_else(|e| e.into_inner()) =
                        *old.ewma.lock().unwrap_or_else(|e| e.into_inner());
                }
            }
        }
        let algo = match config.algorithm {
            Algorithm::RoundRobin => Algo::RoundRobin {
                wheel: build_wheel(&list),
                pointer: AtomicUsize::new(0),
            },
            Algorithm::ConsistentHashing => Algo::Hashing {
                continuum: build_continuum(&list, config.slots),
            },
            Algorithm::LeastConnections => Algo::LeastConnections,
            Algorithm::Latency => Algo::Latency,
        };
        let upstream = Upstream {
            config,
            entity,
            target_entities,
            targets: list,
            algo,
            resolver: Arc::clone(resolver),
            active: Mutex::new(None),
        };
        if matches!(upstream.algo, Algo::Latency) {
            upstream.slow_start_new_targets();
        }
        upstream
    }

    /// Latency: a target with no average yet starts at the mean of the available ones
    /// (`calculate_slow_start_ewma` in `latency.lua`), so it is not flooded.
    fn slow_start_new_targets(&self) {
        let known: Vec<f64> = self
            .targets
            .iter()
            .filter(|t| t.available())
            .filter_map(|t| {
                let e = t.ewma.lock().unwrap_or_else(|e| e.into_inner());
                e.1.map(|_| e.0)
            })
            .collect();
        let mean = if known.is_empty() {
            0.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let now = Instant::now();
        for t in &self.targets {
            let mut e = t.ewma.lock().unwrap_or_else(|e| e.into_inner());
            if e.1.is_none() {
                *e = (mean, Some(now));
            }
        }
    }

    /// Counts one health report for a target and applies a change of availability.
    fn record(&self, target: &Target, report: Report, limit: u32) {
        let change = target
            .health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(report, limit);
        if let Some(available) = change {
            target.available.store(available, Ordering::Release);
            tracing::warn!(
                upstream = %self.config.name,
                target = %format!("{}:{}", target.name, target.port),
                "[healthchecks] target became {}",
                if available { "healthy" } else { "unhealthy" }
            );
            if available && matches!(self.algo, Algo::Latency) {
                // Kong drops an unavailable address's average and slow-starts it on return.
                *target.ewma.lock().unwrap_or_else(|e| e.into_inner()) = (0.0, None);
                self.slow_start_new_targets();
            }
        }
    }

    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The upstream's id.
    pub fn id(&self) -> &str {
        &self.config.id
    }

    /// The upstream's `host_header`: when set, the Host sent upstream (unless the route
    /// preserves the host), as `balancer_data.hostname` in Kong's `execute`.
    pub fn host_header(&self) -> Option<&str> {
        self.config.host_header.as_deref()
    }

    /// The upstream's settings as read from its entity.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// The health of each target, as `(target, usable)` with the target as `host:port`
    /// (sorted by host then port), for status pages and tests.
    pub fn target_health(&self) -> Vec<(String, bool)> {
        self.targets
            .iter()
            .map(|t| (format!("{}:{}", t.name, t.port), t.available()))
            .collect()
    }

    /// The hash key for this request per `hash_on` / `hash_fallback` (and their
    /// `_header`/`_cookie`/`_query_arg`/`_uri_capture` fields); `Some(cookie)` in the result
    /// when Kong would set the hash cookie on the response (cookie absent: Kong generates a
    /// uuid value, `hash_on_cookie_path`). The fallback is used only when the first input is
    /// absent from the request.
    pub fn hash_key(&self, input: &HashInput<'_>) -> HashKey {
        let cfg = &self.config;
        if cfg.hash_on == HashOn::None {
            return HashKey::default();
        }
        let (key, cookie) = hash::input_value(&cfg.hash_on, input, &cfg.cookie_path);
        if key.is_some() {
            return HashKey { key, cookie };
        }
        let (key, cookie) = hash::input_value(&cfg.hash_fallback, input, &cfg.cookie_path);
        HashKey { key, cookie }
    }

    /// Whether enough weight is usable (`updateStatus` in `balancers.lua`: the healthy share
    /// of the total weight must exceed `healthchecks.threshold` percent).
    fn balancer_healthy(&self) -> bool {
        let total: u64 = self.targets.iter().map(|t| u64::from(t.weight)).sum();
        if total == 0 {
            return false;
        }
        let usable: u64 = self
            .targets
            .iter()
            .filter(|t| t.available())
            .map(|t| u64::from(t.weight))
            .sum();
        usable as f64 / total as f64 * 100.0 > self.config.health.threshold
    }

    /// Picks a target address. `tried` are the addresses already tried for this request
    /// (retries go to another target when one exists, as Kong does). Resolves target host
    /// names through the shared resolver (with TTL). Errors: no healthy target
    /// ("failure to get a peer from the ring-balancer"), name resolution failed.
    pub async fn pick(
        self: &Arc<Self>,
        key: Option<&str>,
        tried: &[SocketAddr],
    ) -> Result<Pick, BalancerError> {
        // Targets whose name did not resolve for this pick are left out, like Kong's targets
        // without addresses; when none is left, the resolution error is the answer.
        let mut failed = vec![false; self.targets.len()];
        let mut last_error = None;
        loop {
            let Some(idx) = self.choose(key, tried, &failed) else {
                return Err(last_error.unwrap_or(BalancerError::NoPeer));
            };
            let target = &self.targets[idx];
            match self.resolver.resolve(&target.host, target.port).await {
                Ok(addrs) if !addrs.is_empty() => {
                    let fresh: Vec<SocketAddr> = addrs
                        .iter()
                        .copied()
                        .filter(|a| !tried.contains(a))
                        .collect();
                    let from = if fresh.is_empty() { &addrs } else { &fresh };
                    let turn = match key {
                        Some(k) if matches!(self.algo, Algo::Hashing { .. }) => {
                            xxhash_rust::xxh32::xxh32(k.as_bytes(), 0) as usize
                        }
                        _ => target.next_addr.fetch_add(1, Ordering::Relaxed),
                    };
                    let addr = from[turn % from.len()];
                    target.connections.fetch_add(1, Ordering::AcqRel);
                    return Ok(Pick {
                        addr,
                        host: target.name.clone(),
                        port: target.port,
                        upstream: Arc::clone(self),
                        target: Arc::clone(target),
                    });
                }
                Ok(_) => {
                    last_error = Some(BalancerError::NameResolution(format!(
                        "{}: no address",
                        target.host
                    )));
                }
                Err(err) => last_error = Some(err),
            }
            failed[idx] = true;
        }
    }

    /// Chooses a target index per the algorithm, skipping unavailable, weight-0 and
    /// `failed` targets; targets whose every known address is in `tried` are taken only
    /// when no other target is usable.
    fn choose(&self, key: Option<&str>, tried: &[SocketAddr], failed: &[bool]) -> Option<usize> {
        let usable = |i: usize| {
            let t = &self.targets[i];
            !failed[i] && t.weight > 0 && t.available()
        };
        // Empty on a first attempt, which then costs no allocation or lookup here.
        let was_tried: Vec<bool> = if tried.is_empty() {
            Vec::new()
        } else {
            self.targets
                .iter()
                .map(|t| {
                    self.resolver
                        .cached(&t.host, t.port)
                        .is_some_and(|addrs| addrs.iter().all(|a| tried.contains(a)))
                })
                .collect()
        };
        let tried_target = |i: usize| was_tried.get(i).copied().unwrap_or(false);
        let any_fresh =
            !was_tried.is_empty() && (0..self.targets.len()).any(|i| usable(i) && !tried_target(i));
        let ok = |i: usize| usable(i) && !(any_fresh && tried_target(i));
        match &self.algo {
            Algo::RoundRobin { wheel, pointer } => {
                let n = wheel.len();
                if n == 0 {
                    return None;
                }
                let start = pointer.fetch_add(1, Ordering::Relaxed);
                for step in 0..n {
                    let idx = wheel[(start + step) % n] as usize;
                    if ok(idx) {
                        if step > 0 {
                            pointer.fetch_add(step, Ordering::Relaxed);
                        }
                        return Some(idx);
                    }
                }
                None
            }
            Algo::Hashing { continuum } => {
                let points = continuum.len();
                let start = continuum_index(key.unwrap_or(""), points as u32);
                // Kong walks the continuum downwards from the hashed point.
                (0..points)
                    .map(|step| continuum[(start + points - step) % points])
                    .find(|&idx| idx != NONE && ok(idx as usize))
                    .map(|idx| idx as usize)
            }
            Algo::LeastConnections => {
                if !self.balancer_healthy() {
                    return None;
                }
                // `(connections + 1) / weight`, lowest first; the `+ 1` lets weight decide
                // among idle targets (`least_connections.lua`).
                (0..self.targets.len())
                    .filter(|&i| ok(i))
                    .map(|i| {
                        let t = &self.targets[i];
                        let load = f64::from(t.connections.load(Ordering::Acquire) + 1)
                            / f64::from(t.weight);
                        (i, load)
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(i, _)| i)
            }
            Algo::Latency => {
                if !self.balancer_healthy() {
                    return None;
                }
                let candidates: Vec<usize> =
                    (0..self.targets.len()).filter(|&i| usable(i)).collect();
                if candidates.len() == 1 {
                    // Kong scores only when more than one address is available.
                    return Some(candidates[0]);
                }
                let now = Instant::now();
                // Kong gives up when every available address was tried (`latency.lua`).
                candidates
                    .into_iter()
                    .filter(|&i| !tried_target(i))
                    .map(|i| {
                        let t = &self.targets[i];
                        let e = *t.ewma.lock().unwrap_or_else(|e| e.into_inner());
                        (i, decay(e, 0.0, now) / f64::from(t.weight))
                    })
                    .min_by(|a, b| a.1.total_cmp(&b.1))
                    .map(|(i, _)| i)
            }
        }
    }
}

impl Balancers {
    /// Built from the stored `upstreams` and `targets` entities (Kong's JSON). `previous`
    /// (the configuration being replaced) lends its runtime state: an upstream whose entity
    /// and targets are unchanged is reused as is (the same Arc: health, connection counts,
    /// latency averages, round-robin position, active-check task all survive); a changed
    /// upstream keeps the health state of targets that are still there. Bad entities are
    /// reported as (id, message) and left out. `resolver` is the process-wide resolver used
    /// for target host names and by the active health checks.
    ///
    /// Active health checks start here, so call it inside a tokio runtime when any upstream
    /// has them (without one, they are logged as not started).
    pub fn new(
        upstreams: &[Value],
        targets: &[Value],
        previous: Option<&Balancers>,
        resolver: &Arc<Resolver>,
    ) -> (Balancers, Vec<(String, String)>) {
        let mut errors = Vec::new();
        let entity_id = |v: &Value| {
            v.get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned()
        };
        // Targets by upstream id; Kong keeps one target per (upstream, target).
        let mut by_upstream: HashMap<String, Vec<(config::TargetConfig, Value)>> = HashMap::new();
        for entity in targets {
            match config::parse_target(entity) {
                Ok(cfg) => {
                    let list = by_upstream.entry(cfg.upstream_id.clone()).or_default();
                    if list
                        .iter()
                        .any(|(o, _)| o.host == cfg.host && o.port == cfg.port)
                    {
                        errors.push((
                            cfg.id.clone(),
                            format!("duplicate target {}:{} in its upstream", cfg.host, cfg.port),
                        ));
                    } else {
                        list.push((cfg, entity.clone()));
                    }
                }
                Err(message) => errors.push((entity_id(entity), message)),
            }
        }
        let mut balancers = Balancers::default();
        for entity in upstreams {
            let cfg = match config::parse_upstream(entity) {
                Ok(cfg) => cfg,
                Err(message) => {
                    errors.push((entity_id(entity), message));
                    continue;
                }
            };
            let taken = balancers
                .by_name
                .get(&cfg.name)
                .is_some_and(|list| list.iter().any(|(ws, _)| *ws == cfg.ws_id));
            if taken || balancers.by_id.contains_key(&cfg.id) {
                errors.push((cfg.id.clone(), format!("duplicate upstream '{}'", cfg.name)));
                continue;
            }
            let mut its_targets = by_upstream.remove(&cfg.id).unwrap_or_default();
            its_targets.sort_by(|a, b| a.0.id.cmp(&b.0.id));
            let old = previous.and_then(|p| p.by_id.get(&cfg.id));
            let unchanged = old.filter(|old| {
                Arc::ptr_eq(&old.resolver, resolver)
                    && old.entity == *entity
                    && old.target_entities.len() == its_targets.len()
                    && old
                        .target_entities
                        .iter()
                        .zip(&its_targets)
                        .all(|(a, (_, b))| a == b)
            });
            let upstream = match unchanged {
                Some(old) => Arc::clone(old),
                None => {
                    let upstream = Arc::new(Upstream::build(
                        cfg,
                        entity.clone(),
                        its_targets,
                        old.map(|o| &**o),
                        resolver,
                    ));
                    if let Some(task) = health::spawn_active(&upstream) {
                        *upstream.active.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
                    }
                    upstream
                }
            };
            balancers
                .by_id
                .insert(upstream.config.id.clone(), Arc::clone(&upstream));
            balancers
                .by_name
                .entry(upstream.config.name.clone())
                .or_default()
                .push((upstream.config.ws_id.clone(), upstream));
        }
        for (upstream_id, orphans) in by_upstream {
            for (cfg, _) in orphans {
                errors.push((cfg.id, format!("target of unknown upstream {upstream_id}")));
            }
        }
        (balancers, errors)
    }

    /// The upstream named `name` in workspace `ws_id`.
    pub fn get(&self, ws_id: &str, name: &str) -> Option<Arc<Upstream>> {
        self.by_name
            .get(name)?
            .iter()
            .find(|(ws, _)| ws == ws_id)
            .map(|(_, up)| Arc::clone(up))
    }

    /// How many upstreams this configuration has.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Every upstream of this configuration, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_id.values()
    }

    /// Whether this configuration has no upstream.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
