//! The data plane's metrics, served at `/metrics` on the status listener.
//!
//! Durations are observed where they happen, through the small methods of [`DpMetrics`]
//! (once per apply, not per delta). Everything that describes current state (connected, the
//! applied version, the counts `/status` shows) is read when scraped from [`DpShared`], never
//! kept up to date on the sync path.
//!
//! `deltaplane_version_learned_to_applied_seconds` measures from the moment this data plane
//! learned that a version exists (a `notify_new_version` or pushed deltas naming it, or a
//! sync v1 `reconfigure` frame received) to its durable apply. It is not write → applied: the
//! control plane's part (commit → notification) is not in it, because no message carries the
//! commit time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::DpShared;
use crate::net::stats::{Label, LinkStats};

/// Bucket bounds (seconds) of the duration histograms: from a small incremental apply (an
/// fsync is about 0.2 ms here) to a full sync of 100,000 entities (seconds).
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Versions learned and not yet applied, kept at most (the oldest are kept: a data plane this
/// far behind catches up in one answer anyway).
const MAX_LEARNED: usize = 1024;

/// What an apply was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyKind {
    Full,
    Incremental,
}

impl ApplyKind {
    const ALL: [ApplyKind; 2] = [ApplyKind::Full, ApplyKind::Incremental];

    fn as_str(self) -> &'static str {
        match self {
            ApplyKind::Full => "full",
            ApplyKind::Incremental => "incremental",
        }
    }
}

/// The data plane's histograms and transport counters; created once at start, shared through
/// [`DpShared`].
#[derive(Debug)]
pub struct DpMetrics {
    /// The histograms below, registered once.
    registry: Registry,
    apply_duration: [Histogram; ApplyKind::ALL.len()],
    learned_to_applied: Histogram,
    /// Version → when it was first learned of, for versions not yet applied.
    learned: Mutex<BTreeMap<i64, Instant>>,
    link: Arc<LinkStats>,
    kong_version: String,
    /// Unix seconds when this data plane's cluster certificate expires.
    cert_expiry: i64,
}

impl DpMetrics {
    pub fn new(kong_version: String, cert_expiry: i64) -> DpMetrics {
        let mut registry = Registry::default();
        let family = Family::<Label, Histogram, _>::new_with_constructor(histogram as fn() -> _);
        let apply_duration =
            ApplyKind::ALL.map(|k| family.get_or_create(&[("kind", k.as_str())]).clone());
        registry.register_with_unit(
            "deltaplane_apply_duration",
            "Time to apply one answer, push or v1 reconfigure durably (parse, validate, write, \
             commit), by kind",
            Unit::Seconds,
            family,
        );
        let learned_to_applied = histogram();
        registry.register_with_unit(
            "deltaplane_version_learned_to_applied",
            "Time from learning that a version exists (notify_new_version or pushed deltas \
             naming it, or a v1 reconfigure frame received) to its durable apply; the control \
             plane's commit-to-notification time is not included",
            Unit::Seconds,
            learned_to_applied.clone(),
        );
        DpMetrics {
            registry,
            apply_duration,
            learned_to_applied,
            learned: Mutex::new(BTreeMap::new()),
            link: Arc::default(),
            kong_version,
            cert_expiry,
        }
    }

    /// An apply of `kind` took `took`, from the start of its work to its durable commit.
    pub fn apply_duration(&self, kind: ApplyKind, took: Duration) {
        self.apply_duration[kind as usize].observe(took.as_secs_f64());
    }

    /// The control plane said `version` exists (a notification or pushed deltas), now.
    pub fn learned(&self, version: i64) {
        self.learned_at(version, Instant::now());
    }

    /// The data plane learned of `version` at `at` (the first time counts).
    pub fn learned_at(&self, version: i64, at: Instant) {
        let mut learned = self.learned.lock().expect("learned lock");
        if learned.len() < MAX_LEARNED || learned.contains_key(&version) {
            let first = learned.entry(version).or_insert(at);
            *first = (*first).min(at);
        }
    }

    /// `version` is durably applied: observes every learned version it covers.
    pub(super) fn applied(&self, version: i64) {
        let now = Instant::now();
        let covered = {
            let mut learned = self.learned.lock().expect("learned lock");
            let newer = learned.split_off(&(version.saturating_add(1)));
            std::mem::replace(&mut *learned, newer)
        };
        for at in covered.into_values() {
            self.learned_to_applied
                .observe(now.saturating_duration_since(at).as_secs_f64());
        }
    }

    /// A session ended: what its control plane announced and was not applied is forgotten (the
    /// next control plane may be on another change log).
    pub fn forget_learned(&self) {
        self.learned.lock().expect("learned lock").clear();
    }

    /// The transport counters to give every connection (`PeerConfig`), and to count sync v1's
    /// refused frames in.
    pub fn link(&self) -> &Arc<LinkStats> {
        &self.link
    }
}

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// `GET /metrics` on the status listener.
pub(super) async fn metrics(State(dp): State<Arc<DpShared>>, headers: HeaderMap) -> Response {
    let now = scrape(&dp);
    crate::net::stats::exposition(&headers, &[&dp.metrics.registry, &now])
}

/// The gauges of this moment, and the counters `/status` shows.
fn scrape(dp: &DpShared) -> Registry {
    let m = &dp.metrics;
    let state = dp.store.state();
    let link = dp.link();
    let mut r = Registry::default();
    let gauge = |r: &mut Registry, name: &str, help: &str, v: i64| {
        let g = Gauge::<i64>::default();
        g.set(v);
        r.register(name, help, g);
    };
    let counter = |r: &mut Registry, name: &str, help: &str, v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        r.register(name, help, c);
    };
    gauge(
        &mut r,
        "kong_control_plane_connected",
        "Kong connected to control plane, 0 is unconnected",
        i64::from(link.connected_to.is_some()),
    );
    gauge(
        &mut r,
        "kong_data_plane_cluster_cert_expiry_timestamp",
        "Unix timestamp of Data Plane's cluster_cert expiry time",
        m.cert_expiry,
    );
    // The store answers a read transaction: as Kong's DB-less data plane, always reachable
    // unless the file broke.
    gauge(
        &mut r,
        "kong_datastore_reachable",
        "Datastore reachable from Kong, 0 is unreachable",
        i64::from(dp.store.snapshot().is_ok()),
    );
    let info = Family::<[(&'static str, String); 2], Gauge>::default();
    info.get_or_create(&[
        ("node_id", dp.node_id.clone()),
        ("version", m.kong_version.clone()),
    ])
    .set(1);
    r.register("kong_node_info", "Kong node info", info);
    let build = Family::<Label, Gauge>::default();
    build
        .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
        .set(1);
    r.register("deltaplane_build_info", "The deltaplane release", build);
    gauge(
        &mut r,
        "deltaplane_applied_version",
        "The version of the configuration durably applied",
        state.version,
    );
    gauge(
        &mut r,
        "deltaplane_control_plane_version_seen",
        "The newest version the control plane announced",
        link.cp_version_seen,
    );
    gauge(
        &mut r,
        "deltaplane_entities",
        "Entities in the applied configuration",
        i64::try_from(state.n_entities).unwrap_or(i64::MAX),
    );
    counter(
        &mut r,
        "deltaplane_full_syncs",
        "Full configurations applied (sync v2 full answers, sync v1 reconfigures)",
        link.full_syncs,
    );
    counter(
        &mut r,
        "deltaplane_incremental_syncs",
        "Incremental answers applied",
        link.incremental_syncs,
    );
    counter(
        &mut r,
        "deltaplane_paged_transfers",
        "Applies that arrived as paged transfers (larger than one frame)",
        link.paged_transfers,
    );
    counter(
        &mut r,
        "deltaplane_v1_unchanged",
        "Sync v1 pushes whose hash equalled the stored one (nothing applied)",
        link.v1_skipped,
    );
    counter(
        &mut r,
        "deltaplane_connects",
        "Sessions that completed the hello (v2) or sent basic_info (v1)",
        link.connects,
    );
    counter(
        &mut r,
        "deltaplane_sync_requests",
        "get_delta requests sent (answers awaited, not status reports)",
        link.sync_requests,
    );
    m.link.register(&mut r, &[]);
    if let Some(file) = dp.file() {
        let st = file.status();
        let loads = Family::<[(&'static str, &'static str); 1], Counter>::default();
        for (result, n) in [
            ("applied", st.applied),
            ("unchanged", st.unchanged),
            ("failed", st.failed),
        ] {
            loads.get_or_create(&[("result", result)]).inc_by(n);
        }
        r.register(
            "deltaplane_declarative_loads",
            "Declarative configurations loaded (file or POST /config), by result",
            loads,
        );
        gauge(
            &mut r,
            "deltaplane_declarative_last_load_failed",
            "1 when the last declarative load failed (the previous configuration is served)",
            i64::from(st.last_error.is_some()),
        );
    }
    if let Some(proxy) = dp.proxy() {
        let st = proxy.status();
        gauge(
            &mut r,
            "deltaplane_proxy_serving_version",
            "The configuration version the proxy serves",
            st.serving_version,
        );
        let by_class = Family::<[(&'static str, &'static str); 1], Counter>::default();
        for (i, class) in ["1xx", "2xx", "3xx", "4xx", "5xx"].into_iter().enumerate() {
            by_class
                .get_or_create(&[("class", class)])
                .inc_by(proxy.proxy.stats.by_class[i].load(std::sync::atomic::Ordering::Relaxed));
        }
        r.register(
            "deltaplane_proxy_responses",
            "Responses the proxy sent, by status class",
            by_class,
        );
        r.register_with_unit(
            "deltaplane_proxy_upstream_latency",
            "Upstream latency: connect to response header",
            Unit::Seconds,
            proxy.proxy.stats.upstream_latency.clone(),
        );
        // `kong_upstream_target_health`, read from the balancers being served when a
        // prometheus instance asks for it (`upstream_health_metrics`).
        if proxy.exporter.upstream_health_enabled() {
            proxy.exporter.reset_target_health();
            for up in proxy.proxy.current().balancers.iter() {
                let checked = up.config().health.enabled();
                for (target, usable) in up.target_health() {
                    let state = match (checked, usable) {
                        (false, _) => "healthchecks_off",
                        (true, true) => "healthy",
                        (true, false) => "unhealthy",
                    };
                    proxy
                        .exporter
                        .set_target_health(up.name(), &target, &target, state);
                }
            }
        }
        proxy.exporter.register(&mut r);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(m: &DpMetrics) -> String {
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry).unwrap();
        text.lines()
            .find(|l| l.starts_with("deltaplane_version_learned_to_applied_seconds_count"))
            .unwrap()
            .to_owned()
    }

    #[test]
    fn each_learned_version_is_observed_once_when_applied() {
        let m = DpMetrics::new("3.10.0".into(), 0);
        m.learned(5);
        m.learned(6);
        m.learned(8);
        m.applied(6);
        assert_eq!(
            count(&m),
            "deltaplane_version_learned_to_applied_seconds_count 2"
        );
        m.applied(7);
        assert_eq!(
            count(&m),
            "deltaplane_version_learned_to_applied_seconds_count 2"
        );
        m.forget_learned();
        m.applied(9);
        assert_eq!(
            count(&m),
            "deltaplane_version_learned_to_applied_seconds_count 2"
        );
        m.learned(10);
        m.learned(10);
        m.applied(10);
        assert_eq!(
            count(&m),
            "deltaplane_version_learned_to_applied_seconds_count 3"
        );
    }
}
