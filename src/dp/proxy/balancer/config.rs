//! The upstream and target entities (Kong's JSON) read into typed settings.
//!
//! Field names and defaults: `kong/db/schema/entities/upstreams.lua` and `targets.lua`
//! (our `schema/upstreams.json`, `schema/targets.json`). Defaults apply when a field is
//! absent or null, so a partially filled entity still works.

use std::time::Duration;

use serde_json::Value;

use super::resolver::parse_ip_literal;

/// The load-balancing algorithm of an upstream (`algorithm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// `round-robin`: Kong's weighted, shuffled wheel.
    RoundRobin,
    /// `consistent-hashing`: Kong's xxhash32 continuum.
    ConsistentHashing,
    /// `least-connections`: fewest open connections relative to weight.
    LeastConnections,
    /// `latency`: lowest decayed response time (EWMA) relative to weight.
    Latency,
}

/// One input of `hash_on` / `hash_fallback`, with the field it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// `none`: no hashing.
    None,
    /// `consumer`: the authenticated consumer's id.
    Consumer,
    /// `ip`: the client's address.
    Ip,
    /// `header`: the value of this header.
    Header(String),
    /// `cookie`: the value of this cookie (created when absent).
    Cookie(String),
    /// `path`: the normalised request path.
    Path,
    /// `query_arg`: the value of this query argument.
    QueryArg(String),
    /// `uri_capture`: this capture group of the matched route's regex path.
    UriCapture(String),
}

/// The settings of one health-check direction (healthy or unhealthy).
#[derive(Debug, Clone, PartialEq)]
pub struct Thresholds {
    /// Seconds between active probes of targets in this state (0: never).
    pub interval: Duration,
    /// Statuses counted towards this state.
    pub http_statuses: Vec<u16>,
    /// `healthy.successes`: successes that make a target healthy (0: disabled).
    pub successes: u32,
    /// `unhealthy.http_failures` (0: disabled).
    pub http_failures: u32,
    /// `unhealthy.tcp_failures` (0: disabled).
    pub tcp_failures: u32,
    /// `unhealthy.timeouts` (0: disabled).
    pub timeouts: u32,
}

/// The kind of active probe (`healthchecks.active.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeType {
    /// A TCP connection is the whole check.
    Tcp,
    /// An HTTP/1.1 GET over plain TCP (also used for `grpc`).
    Http,
    /// An HTTP/1.1 GET over TLS (also used for `grpcs`).
    Https,
}

/// `healthchecks.active`.
#[derive(Debug, Clone, PartialEq)]
pub struct ActiveConfig {
    /// The probe kind.
    pub probe: ProbeType,
    /// The probe's timeout.
    pub timeout: Duration,
    /// How many probes run at once.
    pub concurrency: usize,
    /// The probed path.
    pub http_path: String,
    /// The SNI of https probes (else the host header or the target's name).
    pub https_sni: Option<String>,
    /// Whether https probes verify the certificate.
    pub https_verify_certificate: bool,
    /// Extra request headers: name and values.
    pub headers: Vec<(String, Vec<String>)>,
    /// The healthy side: interval, statuses, successes.
    pub healthy: Thresholds,
    /// The unhealthy side: interval, statuses, failure thresholds.
    pub unhealthy: Thresholds,
}

/// `healthchecks.passive`.
#[derive(Debug, Clone, PartialEq)]
pub struct PassiveConfig {
    /// The healthy side (statuses, successes).
    pub healthy: Thresholds,
    /// The unhealthy side (statuses, failure thresholds).
    pub unhealthy: Thresholds,
}

/// `healthchecks`.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthConfig {
    /// Active probing.
    pub active: ActiveConfig,
    /// Passive counting of proxied responses.
    pub passive: PassiveConfig,
    /// `threshold`: the percentage of healthy weight below which the balancer is unhealthy.
    pub threshold: f64,
}

impl HealthConfig {
    /// Whether Kong creates a health checker for the upstream at all
    /// (`is_upstream_using_healthcheck` in `kong/runloop/balancer/healthcheckers.lua`):
    /// without one, reports are ignored and every target stays healthy.
    pub fn enabled(&self) -> bool {
        !self.active.healthy.interval.is_zero()
            || !self.active.unhealthy.interval.is_zero()
            || self.passive.unhealthy.tcp_failures != 0
            || self.passive.unhealthy.timeouts != 0
            || self.passive.unhealthy.http_failures != 0
    }

    /// Whether active probes run at all.
    pub fn active_enabled(&self) -> bool {
        !self.active.healthy.interval.is_zero() || !self.active.unhealthy.interval.is_zero()
    }
}

/// An upstream entity, read.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// `id`.
    pub id: String,
    /// `name`.
    pub name: String,
    /// `ws_id` (empty when absent).
    pub ws_id: String,
    /// `algorithm`.
    pub algorithm: Algorithm,
    /// `hash_on` with its field.
    pub hash_on: HashOn,
    /// `hash_fallback` with its field.
    pub hash_fallback: HashOn,
    /// `hash_on_cookie_path`.
    pub cookie_path: String,
    /// `slots`.
    pub slots: u32,
    /// `host_header`.
    pub host_header: Option<String>,
    /// `healthchecks`.
    pub health: HealthConfig,
}

/// A target entity, read.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetConfig {
    /// `id`.
    pub id: String,
    /// The upstream's id (`upstream.id`).
    pub upstream_id: String,
    /// The host part of `target` (IPv6 without brackets).
    pub host: String,
    /// The port part of `target`.
    pub port: u16,
    /// `weight`.
    pub weight: u32,
}

fn str_field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    v.get(name).and_then(Value::as_str)
}

fn u64_field(v: &Value, name: &str, default: u64) -> u64 {
    match v.get(name) {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().map(|f| f.max(0.0) as u64))
            .unwrap_or(default),
        _ => default,
    }
}

fn secs_field(v: &Value, name: &str, default: f64) -> Duration {
    let secs = v.get(name).and_then(Value::as_f64).unwrap_or(default);
    if secs.is_finite() && secs > 0.0 {
        Duration::from_secs_f64(secs.min(1e9))
    } else {
        Duration::ZERO
    }
}

fn statuses(v: &Value, default: &[u16]) -> Vec<u16> {
    match v.get("http_statuses").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .filter_map(Value::as_u64)
            .filter_map(|s| u16::try_from(s).ok())
            .collect(),
        None => default.to_vec(),
    }
}

const ACTIVE_HEALTHY: &[u16] = &[200, 302];
const ACTIVE_UNHEALTHY: &[u16] = &[429, 404, 500, 501, 502, 503, 504, 505];
const PASSIVE_HEALTHY: &[u16] = &[
    200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 306, 307, 308,
];
const PASSIVE_UNHEALTHY: &[u16] = &[429, 500, 503];

fn thresholds(v: &Value, default_statuses: &[u16]) -> Thresholds {
    let n = |name| u32::try_from(u64_field(v, name, 0)).unwrap_or(u32::MAX);
    Thresholds {
        interval: secs_field(v, "interval", 0.0),
        http_statuses: statuses(v, default_statuses),
        successes: n("successes"),
        http_failures: n("http_failures"),
        tcp_failures: n("tcp_failures"),
        timeouts: n("timeouts"),
    }
}

fn health_config(v: &Value) -> HealthConfig {
    let null = Value::Null;
    let active = v.get("active").unwrap_or(&null);
    let passive = v.get("passive").unwrap_or(&null);
    let headers = match active.get("headers").and_then(Value::as_object) {
        Some(map) => map
            .iter()
            .map(|(name, values)| {
                let values = match values {
                    Value::Array(list) => list
                        .iter()
                        .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                        .collect(),
                    Value::String(s) => vec![s.clone()],
                    other => vec![other.to_string()],
                };
                (name.clone(), values)
            })
            .collect(),
        None => Vec::new(),
    };
    HealthConfig {
        active: ActiveConfig {
            probe: match str_field(active, "type").unwrap_or("http") {
                "tcp" => ProbeType::Tcp,
                "https" | "grpcs" => ProbeType::Https,
                _ => ProbeType::Http,
            },
            timeout: secs_field(active, "timeout", 1.0),
            concurrency: u64_field(active, "concurrency", 10).clamp(1, 1 << 16) as usize,
            http_path: str_field(active, "http_path").unwrap_or("/").to_owned(),
            https_sni: str_field(active, "https_sni").map(str::to_owned),
            https_verify_certificate: active
                .get("https_verify_certificate")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            headers,
            healthy: thresholds(active.get("healthy").unwrap_or(&null), ACTIVE_HEALTHY),
            unhealthy: thresholds(active.get("unhealthy").unwrap_or(&null), ACTIVE_UNHEALTHY),
        },
        passive: PassiveConfig {
            healthy: thresholds(passive.get("healthy").unwrap_or(&null), PASSIVE_HEALTHY),
            unhealthy: thresholds(passive.get("unhealthy").unwrap_or(&null), PASSIVE_UNHEALTHY),
        },
        threshold: v.get("threshold").and_then(Value::as_f64).unwrap_or(0.0),
    }
}

fn hash_input(entity: &Value, kind: Option<&str>, prefix: &str) -> Result<HashOn, String> {
    let field = |suffix: &str| -> Result<String, String> {
        let name = format!("{prefix}_{suffix}");
        match str_field(entity, &name) {
            Some(s) if !s.is_empty() => Ok(s.to_owned()),
            _ => Err(format!(
                "{name} is required when {prefix} is '{}'",
                kind.unwrap_or("")
            )),
        }
    };
    Ok(match kind.unwrap_or("none") {
        "none" => HashOn::None,
        "consumer" => HashOn::Consumer,
        "ip" => HashOn::Ip,
        "header" => HashOn::Header(field("header")?),
        // Kong has a single `hash_on_cookie` for both sides.
        "cookie" => HashOn::Cookie(match str_field(entity, "hash_on_cookie") {
            Some(s) if !s.is_empty() => s.to_owned(),
            _ => {
                return Err(format!(
                    "hash_on_cookie is required when {prefix} is 'cookie'"
                ));
            }
        }),
        "path" => HashOn::Path,
        "query_arg" => HashOn::QueryArg(field("query_arg")?),
        "uri_capture" => HashOn::UriCapture(field("uri_capture")?),
        other => return Err(format!("{prefix}: unknown value '{other}'")),
    })
}

/// Reads an upstream entity. Errors name the bad field.
pub fn parse_upstream(entity: &Value) -> Result<UpstreamConfig, String> {
    let id = str_field(entity, "id")
        .ok_or("upstream without an id")?
        .to_owned();
    let name = str_field(entity, "name")
        .filter(|n| !n.is_empty())
        .ok_or("upstream without a name")?
        .to_owned();
    let algorithm = match str_field(entity, "algorithm").unwrap_or("round-robin") {
        "round-robin" => Algorithm::RoundRobin,
        "consistent-hashing" => Algorithm::ConsistentHashing,
        "least-connections" => Algorithm::LeastConnections,
        "latency" => Algorithm::Latency,
        other => return Err(format!("unknown algorithm '{other}'")),
    };
    let hash_on = hash_input(entity, str_field(entity, "hash_on"), "hash_on")?;
    let hash_fallback = hash_input(entity, str_field(entity, "hash_fallback"), "hash_fallback")?;
    let slots = u64_field(entity, "slots", 10_000).clamp(10, 65_536) as u32;
    let null = Value::Null;
    Ok(UpstreamConfig {
        id,
        name,
        ws_id: str_field(entity, "ws_id").unwrap_or_default().to_owned(),
        algorithm,
        hash_on,
        hash_fallback,
        cookie_path: str_field(entity, "hash_on_cookie_path")
            .unwrap_or("/")
            .to_owned(),
        slots,
        host_header: str_field(entity, "host_header").map(str::to_owned),
        health: health_config(entity.get("healthchecks").unwrap_or(&null)),
    })
}

/// Splits a target's `target` field, `host:port` or `[ipv6]:port` (Kong always stores the
/// port; a missing one defaults to 8000 as in `kong/db/schema/entities/targets.lua`).
pub fn split_target(target: &str) -> Result<(String, u16), String> {
    const DEFAULT_PORT: u16 = 8000;
    if let Some(rest) = target.strip_prefix('[') {
        let (ip, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("invalid target '{target}'"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse()
                .map_err(|_| format!("invalid port in target '{target}'"))?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return Err(format!("invalid target '{target}'")),
        };
        return Ok((ip.to_owned(), port));
    }
    if parse_ip_literal(target).is_some() {
        // A bare IPv6 address has colons but no port.
        return Ok((target.to_owned(), DEFAULT_PORT));
    }
    match target.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Ok((
            host.to_owned(),
            port.parse()
                .map_err(|_| format!("invalid port in target '{target}'"))?,
        )),
        Some(_) => Err(format!("invalid target '{target}'")),
        None if !target.is_empty() => Ok((target.to_owned(), DEFAULT_PORT)),
        None => Err("empty target".to_owned()),
    }
}

/// Reads a target entity. Errors name the bad field.
pub fn parse_target(entity: &Value) -> Result<TargetConfig, String> {
    let id = str_field(entity, "id")
        .ok_or("target without an id")?
        .to_owned();
    let upstream_id = entity
        .get("upstream")
        .and_then(|u| u.get("id"))
        .and_then(Value::as_str)
        .ok_or("target without an upstream")?
        .to_owned();
    let (host, port) = split_target(str_field(entity, "target").ok_or("target without a target")?)?;
    let weight = u64_field(entity, "weight", 100);
    if weight > 65_535 {
        return Err(format!("weight {weight} is not between 0 and 65535"));
    }
    Ok(TargetConfig {
        id,
        upstream_id,
        host,
        port,
        weight: weight as u32,
    })
}
