//! prometheus (priority 13): the per-request metrics of `kong/plugins/prometheus/handler.lua`
//! and `exporter.lua` (`log`), in a long-lived [`Exporter`].
//!
//! Names (with Kong's `kong_` prefix) and labels:
//! - `kong_http_requests_total{service,route,code,source,workspace,consumer}` (`status_code_metrics`)
//! - `kong_kong_latency_ms`, `kong_upstream_latency_ms`, `kong_request_latency_ms`
//!   `{service,route,workspace}` histograms (`latency_metrics`)
//! - `kong_bandwidth_bytes{service,route,direction,workspace,consumer}` (`bandwidth_metrics`):
//!   a counter in Kong; typed `gauge` here because `prometheus_client` appends `_total` to every
//!   counter's name, and Kong's dashboards query the name without it
//! - `kong_upstream_target_health{upstream,target,address,state,subsystem}`, fed by the
//!   balancer through [`Exporter::set_target_health`] when any instance sets
//!   `upstream_health_metrics`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::Value;

use super::request::{Ctx, LogEntry, ResponseSource};
use super::util::bool_or;

/// `KONG_LATENCY_BUCKETS` of `exporter.lua`.
const KONG_LATENCY_BUCKETS: [f64; 17] = [
    1.0, 2.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0, 750.0, 1000.0,
    3000.0, 6000.0,
];

/// `UPSTREAM_LATENCY_BUCKETS` of `exporter.lua` (also the request latency's).
const UPSTREAM_LATENCY_BUCKETS: [f64; 13] = [
    25.0, 50.0, 80.0, 100.0, 250.0, 400.0, 700.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0,
];

/// The label set of every family: (name, value) pairs in Kong's order.
type Labels = Vec<(&'static str, String)>;

/// A histogram family with a plain constructor.
type Histograms = Family<Labels, Histogram, fn() -> Histogram>;

/// prometheus' config.
pub(super) struct PrometheusConf {
    /// Label requests with the consumer's username.
    per_consumer: bool,
    /// Count `kong_http_requests_total`.
    status_code_metrics: bool,
    /// Observe the latency histograms.
    latency_metrics: bool,
    /// Count `kong_bandwidth_bytes`.
    bandwidth_metrics: bool,
    /// Export `kong_upstream_target_health` (any instance turns it on for all).
    pub(super) upstream_health_metrics: bool,
}

impl PrometheusConf {
    /// Parses the config (Kong's shape, defaults filled; `ai_metrics` and `wasm_metrics`
    /// have nothing to measure here).
    pub(super) fn parse(conf: &Value) -> PrometheusConf {
        PrometheusConf {
            per_consumer: bool_or(conf, "per_consumer", false),
            status_code_metrics: bool_or(conf, "status_code_metrics", false),
            latency_metrics: bool_or(conf, "latency_metrics", false),
            bandwidth_metrics: bool_or(conf, "bandwidth_metrics", false),
            upstream_health_metrics: bool_or(conf, "upstream_health_metrics", false),
        }
    }
}

/// The request metrics of the prometheus plugin, kept across plugin tables.
pub struct Exporter {
    /// `kong_http_requests_total`.
    status: Family<Labels, Counter>,
    /// `kong_kong_latency_ms`.
    kong_latency: Histograms,
    /// `kong_upstream_latency_ms`.
    upstream_latency: Histograms,
    /// `kong_request_latency_ms`.
    total_latency: Histograms,
    /// `kong_bandwidth_bytes` (only ever incremented).
    bandwidth: Family<Labels, Gauge<u64, AtomicU64>>,
    /// `kong_upstream_target_health`.
    target_health: Family<Labels, Gauge>,
    /// Whether any prometheus instance of the current table sets `upstream_health_metrics`.
    upstream_health: AtomicBool,
}

impl Exporter {
    /// A new exporter with empty metrics.
    pub fn new() -> std::sync::Arc<Exporter> {
        std::sync::Arc::new(Exporter {
            status: Family::default(),
            kong_latency: Family::new_with_constructor(|| Histogram::new(KONG_LATENCY_BUCKETS)),
            upstream_latency: Family::new_with_constructor(|| {
                Histogram::new(UPSTREAM_LATENCY_BUCKETS)
            }),
            total_latency: Family::new_with_constructor(|| {
                Histogram::new(UPSTREAM_LATENCY_BUCKETS)
            }),
            bandwidth: Family::default(),
            target_health: Family::default(),
            upstream_health: AtomicBool::new(false),
        })
    }

    /// Registers the metrics into `registry` (names as in `exporter.lua`, `kong_` prefixed).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kong_http_requests",
            "HTTP status codes per consumer/service/route in Kong",
            self.status.clone(),
        );
        registry.register(
            "kong_kong_latency_ms",
            "Latency added by Kong and enabled plugins for each service/route in Kong",
            self.kong_latency.clone(),
        );
        registry.register(
            "kong_upstream_latency_ms",
            "Latency added by upstream response for each service/route in Kong",
            self.upstream_latency.clone(),
        );
        registry.register(
            "kong_request_latency_ms",
            "Total latency incurred during requests for each service/route in Kong",
            self.total_latency.clone(),
        );
        registry.register(
            "kong_bandwidth_bytes",
            "Total bandwidth (ingress/egress) throughput in bytes",
            self.bandwidth.clone(),
        );
        registry.register(
            "kong_upstream_target_health",
            "Health status of targets of upstream. States = healthchecks_off|healthy|unhealthy|dns_error, value is 1 when state is populated.",
            self.target_health.clone(),
        );
    }

    /// Whether the balancer should report target health (some instance sets
    /// `upstream_health_metrics`; Kong's `configure`).
    pub fn upstream_health_enabled(&self) -> bool {
        self.upstream_health.load(Ordering::Relaxed)
    }

    /// Called by each new plugin table.
    pub(super) fn set_upstream_health_enabled(&self, enabled: bool) {
        self.upstream_health.store(enabled, Ordering::Relaxed);
        if !enabled {
            self.target_health.clear();
        }
    }

    /// Sets one target address's health: 1 for `state`, 0 for the three other states
    /// (`healthchecks_off`, `healthy`, `unhealthy`, `dns_error`); `address` is `ip:port`, or
    /// empty for `dns_error`. Ignored when no instance enables it.
    pub fn set_target_health(&self, upstream: &str, target: &str, address: &str, state: &str) {
        if !self.upstream_health_enabled() {
            return;
        }
        for s in ["healthchecks_off", "healthy", "unhealthy", "dns_error"] {
            let labels: Labels = vec![
                ("upstream", upstream.to_owned()),
                ("target", target.to_owned()),
                ("address", address.to_owned()),
                ("state", s.to_owned()),
                ("subsystem", "http".to_owned()),
            ];
            self.target_health
                .get_or_create(&labels)
                .set(i64::from(s == state));
        }
    }

    /// Clears every target health series (before a full refresh, as Kong's scrape does).
    pub fn reset_target_health(&self) {
        self.target_health.clear();
    }

    /// The log phase of one request (`exporter.lua`'s `log`); requests with no route are not
    /// measured.
    pub(super) fn log(&self, conf: &PrometheusConf, ctx: &Ctx, entry: &LogEntry) {
        let Some(route) = ctx.route_name.clone().or_else(|| ctx.route_id.clone()) else {
            return;
        };
        let service = ctx
            .service_name
            .clone()
            .or_else(|| ctx.service_host.clone())
            .unwrap_or_default();
        let consumer = if conf.per_consumer {
            ctx.consumer
                .as_ref()
                .and_then(|c| c.username.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        let workspace = ctx.workspace_name.clone();
        if conf.bandwidth_metrics {
            for (direction, size) in [
                ("ingress", entry.request_bytes),
                ("egress", entry.response_bytes),
            ] {
                if size > 0 {
                    let labels: Labels = vec![
                        ("service", service.clone()),
                        ("route", route.clone()),
                        ("direction", direction.to_owned()),
                        ("workspace", workspace.clone()),
                        ("consumer", consumer.clone()),
                    ];
                    self.bandwidth.get_or_create(&labels).inc_by(size);
                }
            }
        }
        if conf.status_code_metrics {
            let source = if entry.source == ResponseSource::Service {
                "service"
            } else {
                "kong"
            };
            let labels: Labels = vec![
                ("service", service.clone()),
                ("route", route.clone()),
                ("code", entry.status.to_string()),
                ("source", source.to_owned()),
                ("workspace", workspace.clone()),
                ("consumer", consumer),
            ];
            self.status.get_or_create(&labels).inc();
        }
        if conf.latency_metrics {
            let labels: Labels = vec![
                ("service", service),
                ("route", route),
                ("workspace", workspace),
            ];
            self.total_latency
                .get_or_create(&labels)
                .observe(entry.latency_total.as_millis() as f64);
            if let Some(upstream) = entry.latency_upstream {
                self.upstream_latency
                    .get_or_create(&labels)
                    .observe(upstream.as_millis() as f64);
            }
            self.kong_latency
                .get_or_create(&labels)
                .observe(entry.latency_kong.as_millis() as f64);
        }
    }
}
