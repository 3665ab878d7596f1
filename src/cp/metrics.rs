//! The control plane's metrics, served at `/metrics` on the Admin API (behind its token).
//!
//! Events are counted where they happen, through the small methods of [`CpMetrics`]: each is
//! one relaxed atomic add on a counter created at start (label sets are fixed enums, so no
//! lookup, lock or allocation per increment). Everything that describes current state (the
//! head, the connected data planes, Kong's `data_plane_*` gauges) is computed when scraped,
//! from the store's head and the fleet, never kept up to date on the sync path.
//!
//! Kong's names (its prometheus plugin's hybrid-mode metrics) are kept where one exists; ours
//! start with `deltaplane_`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::fleet::health;
use super::listener::ClusterCtx;
use crate::net::stats::{Label, LinkStats};
use crate::proto::{SyncProtocol, SyncStatus};

/// How deltas reached a data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Sent unasked, as a notification carrying the next version's deltas.
    Pushed,
    /// In a `get_delta` answer.
    Fetched,
}

impl How {
    const ALL: [How; 2] = [How::Pushed, How::Fetched];

    fn as_str(self) -> &'static str {
        match self {
            How::Pushed => "pushed",
            How::Fetched => "fetched",
        }
    }
}

/// Why a data plane's connection was refused before its session started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeRefusal {
    /// The TLS handshake failed or timed out (no or wrong client certificate, say).
    Tls,
    /// The WebSocket upgrade failed or was refused (unknown path, no `kong.meta.v1`
    /// subprotocol, `/v1/outlet` without `node_id`).
    Upgrade,
    /// The hello (v2) or `basic_info` (v1) was missing, malformed or had no common encoding.
    Hello,
    /// Kong's version check refused the data plane.
    KongVersionIncompatible,
    /// Admission control turned it away (too many handshakes at once).
    RateLimited,
}

impl HandshakeRefusal {
    const ALL: [HandshakeRefusal; 5] = [
        HandshakeRefusal::Tls,
        HandshakeRefusal::Upgrade,
        HandshakeRefusal::Hello,
        HandshakeRefusal::KongVersionIncompatible,
        HandshakeRefusal::RateLimited,
    ];

    fn as_str(self) -> &'static str {
        match self {
            HandshakeRefusal::Tls => "tls",
            HandshakeRefusal::Upgrade => "upgrade",
            HandshakeRefusal::Hello => "hello",
            HandshakeRefusal::KongVersionIncompatible => "kong_version_incompatible",
            HandshakeRefusal::RateLimited => "rate_limited",
        }
    }
}

const PROTOCOLS: [SyncProtocol; 2] = [SyncProtocol::V1, SyncProtocol::V2];

fn protocol_slot(p: SyncProtocol) -> usize {
    match p {
        SyncProtocol::V1 => 0,
        SyncProtocol::V2 => 1,
    }
}

/// The states of a connected data plane, as [`health`] names them.
const CONNECTED_STATES: [&str; 4] = ["in_sync", "behind", "failing", "incompatible"];

/// The control plane's counters; created once at start, shared through [`ClusterCtx`].
#[derive(Debug)]
pub struct CpMetrics {
    /// The counters below, registered once.
    registry: Registry,
    notifications: Counter,
    delta_messages: [Counter; How::ALL.len()],
    full_syncs: [Counter; PROTOCOLS.len()],
    handshakes_refused: [Counter; HandshakeRefusal::ALL.len()],
    /// From a new head seen by the fan-out to the last of its pushes and notifications
    /// written to its socket.
    fan_out_written: Histogram,
    /// Bytes and refusals of every JSON-RPC connection (and of sync v1's sockets).
    link: Arc<LinkStats>,
    /// Bytes of sync v1 pushes (gzip), reported beside the JSON-RPC encodings.
    v1_sent_bytes: AtomicU64,
    node_id: String,
    kong_version: String,
}

impl CpMetrics {
    pub fn new(node_id: String, kong_version: String) -> CpMetrics {
        let mut registry = Registry::default();
        let notifications = Counter::default();
        registry.register(
            "deltaplane_notifications_sent",
            "kong.sync.v2.notify_new_version calls sent to data planes",
            notifications.clone(),
        );
        let delta_messages = labelled(
            &mut registry,
            "deltaplane_delta_messages",
            "Messages carrying deltas sent to data planes: pushed with the notification, or \
             fetched by a get_delta answer",
            "how",
            How::ALL.map(How::as_str),
        );
        let full_syncs = labelled(
            &mut registry,
            "deltaplane_full_syncs",
            "Full configurations sent to data planes (v2: a full get_delta answer or paged \
             transfer; v1: every push)",
            "protocol",
            PROTOCOLS.map(SyncProtocol::as_str),
        );
        let handshakes_refused = labelled(
            &mut registry,
            "deltaplane_handshakes_refused",
            "Data-plane connections refused before their session started, by reason",
            "reason",
            HandshakeRefusal::ALL.map(HandshakeRefusal::as_str),
        );
        let fan_out_written = Histogram::new(FAN_OUT_BUCKETS);
        registry.register_with_unit(
            "deltaplane_fan_out_written",
            "Time from a new change-log head seen by the fan-out (right after its commit on \
             this control plane) to the last of the pushes and notifications announcing it \
             written to its data plane's socket",
            prometheus_client::registry::Unit::Seconds,
            fan_out_written.clone(),
        );
        CpMetrics {
            registry,
            notifications,
            fan_out_written,
            delta_messages,
            full_syncs,
            handshakes_refused,
            link: Arc::default(),
            v1_sent_bytes: AtomicU64::new(0),
            node_id,
            kong_version,
        }
    }

    /// A `notify_new_version` was sent to a data plane.
    pub fn notification_sent(&self) {
        self.notifications.inc();
    }

    /// A message with deltas was sent to a data plane.
    pub fn deltas_sent(&self, how: How) {
        self.delta_messages[how as usize].inc();
    }

    /// A full configuration was sent to a data plane.
    pub fn full_sync_sent(&self, protocol: SyncProtocol) {
        self.full_syncs[protocol_slot(protocol)].inc();
    }

    /// A new head was announced to every data plane: the last frame was written `took` after
    /// the fan-out saw the head.
    pub fn fan_out_written(&self, took: std::time::Duration) {
        self.fan_out_written.observe(took.as_secs_f64());
    }

    /// A data plane's connection was refused before its session started.
    pub fn handshake_refused(&self, why: HandshakeRefusal) {
        self.handshakes_refused[why as usize].inc();
    }

    /// A sync v1 push of `bytes` (gzip) was written to a data plane: a full sync.
    pub fn v1_pushed(&self, bytes: usize) {
        self.v1_sent_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.full_sync_sent(SyncProtocol::V1);
    }

    /// The transport counters to give every connection (`PeerConfig`), and to count sync v1's
    /// refused frames in.
    pub fn link(&self) -> &Arc<LinkStats> {
        &self.link
    }
}

/// 0.5 ms to about 4 s.
const FAN_OUT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 4.0, 8.0,
];

/// Registers a counter family with one label and every value of it, returning the counters
/// in the order of `values`.
fn labelled<const N: usize>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    key: &'static str,
    values: [&'static str; N],
) -> [Counter; N] {
    let family = Family::<Label, Counter>::default();
    let counters = values.map(|v| family.get_or_create(&[(key, v)]).clone());
    registry.register(name, help, family);
    counters
}

/// `GET /metrics`; merged into the Admin API, so its token guards it.
pub fn router(ctx: Arc<ClusterCtx>) -> axum::Router {
    axum::Router::new()
        .route("/metrics", get(metrics))
        .with_state(ctx)
}

async fn metrics(State(ctx): State<Arc<ClusterCtx>>, headers: HeaderMap) -> Response {
    let now = scrape(&ctx).await;
    crate::net::stats::exposition(&headers, &[&ctx.metrics.registry, &now])
}

type DpLabels = [(&'static str, String); 3];
type DpVersionLabels = [(&'static str, String); 4];

/// The gauges of this moment, and the counters kept elsewhere.
async fn scrape(ctx: &ClusterCtx) -> Registry {
    let m = &ctx.metrics;
    let mut r = Registry::default();
    let head = *ctx.store.subscribe().borrow();
    r.register(
        "deltaplane_head_version",
        "The newest version of the change log this control plane knows",
        Gauge::<i64>::default().tap(head),
    );
    let info = Family::<[(&'static str, String); 2], Gauge>::default();
    info.get_or_create(&[
        ("node_id", m.node_id.clone()),
        ("version", m.kong_version.clone()),
    ])
    .set(1);
    r.register("kong_node_info", "Kong node info", info);
    let build = Family::<Label, Gauge>::default();
    build
        .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
        .set(1);
    r.register("deltaplane_build_info", "The deltaplane release", build);
    r.register(
        "deltaplane_v1_exports",
        "Versions exported and compressed for sync v1 (once per version, whatever the number \
         of v1 data planes)",
        Counter::<u64>::default().tap(ctx.v1.exports()),
    );
    m.link.register(
        &mut r,
        &[("gzip-v1", m.v1_sent_bytes.load(Ordering::Relaxed))],
    );

    // The cluster's data planes as Kong lists them (every row of the shared table), and this
    // control plane's connections by protocol and state. One database read, as Kong's
    // exporter reads `clustering_data_planes`; when it fails, the datastore is unreachable and
    // the connections are counted with state "unknown".
    let rows = ctx.fleet.data_plane_rows().await;
    r.register(
        "kong_datastore_reachable",
        "Datastore reachable from Kong, 0 is unreachable",
        Gauge::<i64>::default().tap(i64::from(rows.is_ok())),
    );
    let connected = Family::<[(&'static str, &'static str); 2], Gauge>::default();
    for p in PROTOCOLS {
        for s in CONNECTED_STATES {
            connected
                .get_or_create(&[("protocol", p.as_str()), ("state", s)])
                .set(0);
        }
    }
    let last_seen = Family::<DpLabels, Gauge>::default();
    let config_hash = Family::<DpLabels, Gauge<f64, AtomicU64>>::default();
    let compatible = Family::<DpVersionLabels, Gauge>::default();
    match rows {
        Ok(rows) => {
            let now = crate::node::now_secs();
            for row in &rows {
                let labels: DpLabels = [
                    ("node_id", row.node_id.clone()),
                    ("hostname", row.hostname.clone()),
                    ("ip", row.address.clone()),
                ];
                last_seen.get_or_create(&labels).set(row.last_seen);
                if let Some(n) = row.config_hash.as_deref().and_then(hex_value) {
                    config_hash.get_or_create(&labels).set(n);
                }
                let [a, b, c] = labels;
                let incompatible = [
                    SyncStatus::KongVersionIncompatible,
                    SyncStatus::PluginSetIncompatible,
                    SyncStatus::PluginVersionIncompatible,
                ]
                .iter()
                .any(|s| s.as_str() == row.sync_status);
                compatible
                    .get_or_create(&[a, b, c, ("kong_version", row.kong_version.clone())])
                    .set(i64::from(!incompatible));
                if row.connected_to.as_deref() == Some(ctx.node_id.as_str()) {
                    let protocol = if row.protocol == SyncProtocol::V1.as_str() {
                        SyncProtocol::V1
                    } else {
                        SyncProtocol::V2
                    };
                    connected
                        .get_or_create(&[
                            ("protocol", protocol.as_str()),
                            ("state", health(row, head, now)),
                        ])
                        .inc();
                }
            }
        }
        Err(_) => {
            for c in ctx.fleet.connected() {
                connected
                    .get_or_create(&[("protocol", c.who.protocol.as_str()), ("state", "unknown")])
                    .inc();
            }
        }
    }
    r.register(
        "deltaplane_data_planes_connected",
        "Data planes connected to this control plane, by protocol and state (in_sync, behind: \
         below the head, failing: its last apply failed, incompatible: configuration withheld \
         by a compatibility check; unknown while the database is unreachable)",
        connected,
    );
    r.register(
        "kong_data_plane_last_seen",
        "Last time data plane contacted control plane",
        last_seen,
    );
    r.register(
        "kong_data_plane_config_hash",
        "Config hash numeric value of the data plane (sync v1 data planes: sync v2's \
         configuration hash is a version string, not a number)",
        config_hash,
    );
    r.register(
        "kong_data_plane_version_compatible",
        "Version compatible status of the data plane, 0 is incompatible",
        compatible,
    );
    r
}

/// A hex string's value as a number, as Kong's exporter reads an md5 config hash
/// (`tonumber("0x" .. hash)`); `None` for anything that is not hex.
fn hex_value(s: &str) -> Option<f64> {
    if s.is_empty() {
        return None;
    }
    s.chars().try_fold(0f64, |acc, c| {
        c.to_digit(16).map(|d| acc * 16.0 + f64::from(d))
    })
}

/// Sets a fresh metric's value on the way into a registry.
trait Tap: Sized {
    type Value;
    fn tap(self, v: Self::Value) -> Self;
}

impl Tap for Gauge<i64> {
    type Value = i64;
    fn tap(self, v: i64) -> Self {
        self.set(v);
        self
    }
}

impl Tap for Counter<u64> {
    type Value = u64;
    fn tap(self, v: u64) -> Self {
        self.inc_by(v);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_hashes_read_as_kong_reads_them() {
        assert_eq!(hex_value("ff"), Some(255.0));
        assert_eq!(
            hex_value("0123456789abcdef0123456789abcdef"),
            Some(0x0123456789abcdef0123456789abcdef_u128 as f64)
        );
        assert_eq!(hex_value("v02_0000000000000000000000000000000a"), None);
        assert_eq!(hex_value(""), None);
    }

    #[test]
    fn counters_keep_their_labels() {
        let m = CpMetrics::new("n".into(), "3.10.0".into());
        m.deltas_sent(How::Fetched);
        m.deltas_sent(How::Fetched);
        m.handshake_refused(HandshakeRefusal::KongVersionIncompatible);
        m.v1_pushed(10);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &m.registry).unwrap();
        for line in [
            "deltaplane_delta_messages_total{how=\"fetched\"} 2",
            "deltaplane_delta_messages_total{how=\"pushed\"} 0",
            "deltaplane_handshakes_refused_total{reason=\"kong_version_incompatible\"} 1",
            "deltaplane_handshakes_refused_total{reason=\"tls\"} 0",
            "deltaplane_full_syncs_total{protocol=\"v1\"} 1",
            "deltaplane_notifications_sent_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
