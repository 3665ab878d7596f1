//! rate-limiting (priority 910) with `policy: local`: `kong/plugins/rate-limiting/handler.lua`,
//! `policies/init.lua` (the `local` policy), `expiration.lua`, `kong/tools/timestamp.lua`.
//!
//! Counters live in [`Counters`], shared by successive plugin tables, keyed as Kong keys its
//! shared dict: `ratelimit:<route_id>:<service_id>:<identifier>:<period_date>:<period>` (the
//! plugin's route and service, all-zero uuid when unset). They survive a rebuild whenever the
//! plugin keeps its scope, which includes keeping its id.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use http::{HeaderName, Response};
use http_body_util::Full;
use serde_json::Value;

use super::request::{Ctx, error_response};
use super::table::{PluginInstance, Plugins};
use super::util::{bool_or, header_first, lua_number, opt_num, opt_str};

/// The periods, with their window in seconds (`expiration.lua`) and header names.
const PERIODS: [(&str, u64, &str, &str); 6] = [
    (
        "second",
        1,
        "x-ratelimit-limit-second",
        "x-ratelimit-remaining-second",
    ),
    (
        "minute",
        60,
        "x-ratelimit-limit-minute",
        "x-ratelimit-remaining-minute",
    ),
    (
        "hour",
        3600,
        "x-ratelimit-limit-hour",
        "x-ratelimit-remaining-hour",
    ),
    (
        "day",
        86400,
        "x-ratelimit-limit-day",
        "x-ratelimit-remaining-day",
    ),
    (
        "month",
        2_592_000,
        "x-ratelimit-limit-month",
        "x-ratelimit-remaining-month",
    ),
    (
        "year",
        31_536_000,
        "x-ratelimit-limit-year",
        "x-ratelimit-remaining-year",
    ),
];

/// `EMPTY_UUID` of `policies/init.lua`.
const EMPTY_UUID: &str = "00000000-0000-0000-0000-000000000000";

/// What `limit_by` counts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum LimitBy {
    /// The consumer (or credential) id.
    Consumer,
    /// The credential id.
    Credential,
    /// The client IP.
    Ip,
    /// The service id.
    Service,
    /// A request header's value.
    Header(String),
    /// The request path, when it equals the configured one.
    Path(String),
}

/// rate-limiting's config.
pub(super) struct RateLimitConf {
    /// The limit per period, in [`PERIODS`] order.
    limits: [Option<f64>; 6],
    /// What is counted.
    limit_by: LimitBy,
    /// Send no rate-limit headers.
    hide_client_headers: bool,
    /// The status of a refusal.
    error_code: u16,
    /// The message of a refusal.
    error_message: String,
}

impl RateLimitConf {
    /// Parses the config; the `redis` and `cluster` policies are refused (this DP counts in
    /// memory only), as is `sync_rate` other than -1 (only meaningful with redis).
    pub(super) fn parse(conf: &Value) -> Result<RateLimitConf, String> {
        let policy = opt_str(conf, "policy").unwrap_or_else(|| "local".to_owned());
        if policy != "local" {
            return Err(format!(
                "policy '{policy}' is not supported by this data plane (only 'local')"
            ));
        }
        let mut limits = [None; 6];
        for (i, (name, ..)) in PERIODS.iter().enumerate() {
            limits[i] = opt_num(conf, name);
        }
        if limits.iter().all(Option::is_none) {
            return Err(
                "at least one of second, minute, hour, day, month, year is required".to_owned(),
            );
        }
        let limit_by = match opt_str(conf, "limit_by").as_deref().unwrap_or("consumer") {
            "consumer" => LimitBy::Consumer,
            "credential" => LimitBy::Credential,
            "ip" => LimitBy::Ip,
            "service" => LimitBy::Service,
            "header" => LimitBy::Header(
                opt_str(conf, "header_name")
                    .ok_or("config.header_name is required with limit_by header")?,
            ),
            "path" => LimitBy::Path(
                opt_str(conf, "path").ok_or("config.path is required with limit_by path")?,
            ),
            other => return Err(format!("config.limit_by: unknown value '{other}'")),
        };
        let error_code = opt_num(conf, "error_code").unwrap_or(429.0);
        if !(100.0..=599.0).contains(&error_code) || error_code.fract() != 0.0 {
            return Err(format!("config.error_code: invalid status {error_code}"));
        }
        Ok(RateLimitConf {
            limits,
            limit_by,
            hide_client_headers: bool_or(conf, "hide_client_headers", false),
            error_code: error_code as u16,
            error_message: opt_str(conf, "error_message")
                .unwrap_or_else(|| "API rate limit exceeded".to_owned()),
        })
    }
}

/// One counter: its value and when it expires (ms since the epoch).
struct Counter {
    /// The count.
    value: u64,
    /// The expiry, set at creation (Kong's `shm:incr(key, 1, 0, ttl)`).
    expires_ms: u64,
}

/// The in-memory counters of the `local` policy, shared across plugin tables.
#[derive(Default)]
pub(crate) struct Counters {
    /// The counters and the number of increments since the last sweep of expired ones.
    inner: Mutex<(HashMap<String, Counter>, u32)>,
}

impl Counters {
    /// Reads the counters of `keys` (0 when absent or expired); when none is at its limit
    /// (`allowed` says so from the usages), increments them all. Returns the usages read.
    fn check_and_increment(
        &self,
        keys: &[(String, u64)],
        now_ms: u64,
        allowed: impl FnOnce(&[u64]) -> bool,
    ) -> Vec<u64> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (map, since_sweep) = &mut *guard;
        let usages: Vec<u64> = keys
            .iter()
            .map(|(key, _)| {
                map.get(key)
                    .filter(|c| c.expires_ms > now_ms)
                    .map_or(0, |c| c.value)
            })
            .collect();
        if allowed(&usages) {
            for (key, ttl_secs) in keys {
                let counter = map.entry(key.clone()).or_insert(Counter {
                    value: 0,
                    expires_ms: 0,
                });
                if counter.expires_ms <= now_ms {
                    *counter = Counter {
                        value: 0,
                        expires_ms: now_ms + ttl_secs * 1000,
                    };
                }
                counter.value += 1;
            }
            *since_sweep += 1;
            if *since_sweep >= 4096 {
                *since_sweep = 0;
                map.retain(|_, c| c.expires_ms > now_ms);
            }
        }
        usages
    }

    /// The number of live counters (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0.len()
    }
}

/// Days since the epoch of a civil date (proleptic Gregorian, UTC).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date (year, month) of a day since the epoch.
fn civil_from_days(z: i64) -> (i64, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m)
}

/// Kong's `timestamp.get_timestamps`: the start (ms) of the current second, minute, hour,
/// day, month and year, in UTC, in [`PERIODS`] order.
pub(super) fn period_starts(now_ms: u64) -> [u64; 6] {
    let secs = now_ms / 1000;
    let day = secs / 86400;
    let (year, month) = civil_from_days(day as i64);
    let month_start = days_from_civil(year, month, 1) as u64 * 86400;
    let year_start = days_from_civil(year, 1, 1) as u64 * 86400;
    [
        secs,
        secs / 60 * 60,
        secs / 3600 * 3600,
        day * 86400,
        month_start,
        year_start,
    ]
    .map(|s| s * 1000)
}

/// Kong's `get_identifier`; falls back to the client IP.
fn identifier(conf: &RateLimitConf, ctx: &Ctx) -> String {
    let found = match &conf.limit_by {
        LimitBy::Service => ctx.service_id.clone(),
        LimitBy::Consumer => ctx
            .consumer
            .as_ref()
            .map(|c| c.id.clone())
            .or_else(|| ctx.credential.as_ref().map(|c| c.id.clone())),
        LimitBy::Credential => ctx.credential.as_ref().map(|c| c.id.clone()),
        LimitBy::Header(name) => header_first(&ctx.headers, name),
        LimitBy::Path(path) => (ctx.path == *path).then(|| ctx.path.clone()),
        LimitBy::Ip => None,
    };
    found.unwrap_or_else(|| ctx.client_ip.to_string())
}

/// The access phase: counts the request, stores the headers for the response, answers
/// `error_code` when a limit is reached (the refused request is not counted, as in Kong).
///
/// `fault_tolerant` has nothing to tolerate here: the in-memory policy cannot fail.
pub(super) fn access(
    plugins: &Plugins,
    instance: &PluginInstance,
    conf: &RateLimitConf,
    ctx: &mut Ctx,
) -> Option<Response<Full<Bytes>>> {
    let now_ms = plugins.clock.now_secs() * 1000;
    let id = identifier(conf, ctx);
    let starts = period_starts(now_ms);
    let route = instance.route_id.as_deref().unwrap_or(EMPTY_UUID);
    let service = instance.service_id.as_deref().unwrap_or(EMPTY_UUID);
    let active: Vec<usize> = (0..6).filter(|i| conf.limits[*i].is_some()).collect();
    let keys: Vec<(String, u64)> = active
        .iter()
        .map(|&i| {
            let (period, window, ..) = PERIODS[i];
            (
                format!("ratelimit:{route}:{service}:{id}:{}:{period}", starts[i]),
                window,
            )
        })
        .collect();
    let limits: Vec<f64> = active
        .iter()
        .map(|&i| conf.limits[i].unwrap_or(0.0))
        .collect();
    let usages = plugins
        .counters
        .check_and_increment(&keys, now_ms, |usages| {
            usages
                .iter()
                .zip(&limits)
                .all(|(usage, limit)| limit - *usage as f64 > 0.0)
        });
    let stop = (0..usages.len())
        .rev()
        .find(|&j| limits[j] - usages[j] as f64 <= 0.0);

    let mut reset = 0.0;
    if !conf.hide_client_headers {
        let mut headers: Vec<(HeaderName, String)> = Vec::new();
        // (limit, window, remaining) of the period closest to its limit.
        let mut chosen: Option<(f64, u64, f64)> = None;
        for (j, &i) in active.iter().enumerate() {
            let (_, window, limit_header, remaining_header) = PERIODS[i];
            let limit = limits[j];
            let mut remaining = limit - usages[j] as f64;
            if stop.is_none() || stop == Some(j) {
                remaining -= 1.0;
            }
            let remaining = remaining.max(0.0);
            let better = match chosen {
                None => true,
                Some((_, w, r)) => remaining < r || (remaining == r && window > w),
            };
            if better {
                chosen = Some((limit, window, remaining));
                let elapsed = (now_ms - starts[i]) / 1000;
                reset = (window as f64 - elapsed as f64).max(1.0);
            }
            headers.push((HeaderName::from_static(limit_header), lua_number(limit)));
            headers.push((
                HeaderName::from_static(remaining_header),
                lua_number(remaining),
            ));
        }
        if let Some((limit, _, remaining)) = chosen {
            headers.push((
                HeaderName::from_static("ratelimit-limit"),
                lua_number(limit),
            ));
            headers.push((
                HeaderName::from_static("ratelimit-remaining"),
                lua_number(remaining),
            ));
            headers.push((
                HeaderName::from_static("ratelimit-reset"),
                lua_number(reset),
            ));
        }
        if stop.is_some() {
            headers.push((HeaderName::from_static("retry-after"), lua_number(reset)));
        }
        ctx.rate_limit_headers = headers;
    }
    if stop.is_some() {
        let mut response = error_response(conf.error_code, &conf.error_message, &[]);
        for (name, value) in &ctx.rate_limit_headers {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                response.headers_mut().insert(name.clone(), value);
            }
        }
        return Some(response);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kong/tools/timestamp.lua`'s `get_timestamps` in UTC.
    #[test]
    fn period_starts_are_utc_calendar() {
        // 2024-02-29T13:45:30.250Z
        let now = 1_709_214_330_250;
        let s = period_starts(now);
        assert_eq!(s[0], 1_709_214_330_000);
        assert_eq!(s[1], 1_709_214_300_000); // 13:45:00
        assert_eq!(s[2], 1_709_211_600_000); // 13:00:00
        assert_eq!(s[3], 1_709_164_800_000); // 2024-02-29
        assert_eq!(s[4], 1_706_745_600_000); // 2024-02-01
        assert_eq!(s[5], 1_704_067_200_000); // 2024-01-01
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_from_days(0), (1970, 1));
    }
}
