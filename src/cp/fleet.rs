//! The fleet: the data planes connected to this control plane (either protocol), their status
//! as this control plane sees it, and the shared `dp_data_planes` table every control plane
//! writes and lists.
//!
//! Status changes only mark a connection; [`Fleet::flush_status`] writes the rows whose
//! status changed by more than progress (an error, a compatibility verdict) at the next 1 s
//! tick, and every row every 10 s (versions applied, `last_seen`), in multi-row statements
//! in one transaction — never on the notify path, where a slow status write would delay a
//! data plane's notification, and never one write per data plane per version. This control
//! plane's own view of its data planes is live; other control planes sharing the database
//! see progress within 10 s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::compat;
use crate::cp::store::{DataPlaneRow, Store, StoreError};
use crate::net::peer::Peer;
use crate::node::now_secs;
use crate::proto::{SyncProtocol, SyncStatus, Version, version_string};

/// How long a row may go without a refresh before its connection is considered gone (the
/// flusher refreshes connected rows every 10 s; a control plane that crashed cannot say its
/// data planes disconnected).
pub const STALE_AFTER_SECS: i64 = 60;

/// The data planes of one control plane.
pub struct Fleet {
    store: Store,
    /// This control plane's node id (`connected_to` of its rows).
    node_id: String,
    kong_compat_version: String,
    conns: Mutex<HashMap<u64, Arc<DpConn>>>,
    next_conn: AtomicU64,
    /// Plugins the configuration uses, at a version (computed only for DPs that announce a
    /// plugin list).
    plugins_in_use: tokio::sync::Mutex<Option<PluginsCache>>,
}

/// [`Store::plugins_in_use`] as of `version` of the change log `epoch`.
struct PluginsCache {
    version: i64,
    epoch: String,
    used: Arc<BTreeSet<String>>,
}

/// Who a newly connected data plane is (from its hello or its `/v1/outlet` query).
#[derive(Debug, Clone)]
pub struct DpIdentity {
    pub protocol: SyncProtocol,
    pub node_id: String,
    pub hostname: String,
    pub address: SocketAddr,
    pub kong_version: String,
    pub labels: Value,
    pub capabilities: Vec<String>,
    /// Unix seconds when its client certificate expires.
    pub cert_expiry: Option<i64>,
    /// The largest frame it takes (`cluster_max_payload` from its hello or `basic_info`),
    /// when it said.
    pub max_payload: Option<usize>,
}

/// One connected data plane.
pub struct DpConn {
    pub who: DpIdentity,
    /// The plugins the DP can run (name → version), from `kong_conf.plugins` in its hello;
    /// `None` when it did not say (then it runs every plugin this CP knows).
    /// Shared by every DP that announced the same list ([`DpConn::new`] interns it).
    pub plugins: Option<Arc<HashMap<String, Option<String>>>>,
    /// The DP follows an older Kong line: fields it does not know are removed before sending.
    pub older: bool,
    status: Mutex<DpStatus>,
    /// The version the DP last reported (its get_delta `version`), or was promised by an
    /// answer; -1 before its first get_delta. Read by the fan-out, written on every report
    /// and push: an atomic, no one waits on it.
    reported: AtomicI64,
    /// The status changed by more than progress (an error, a compatibility verdict): written at the
    /// next tick rather than the next refresh.
    urgent: AtomicBool,
    /// One get_delta answer at a time per DP, from building it until it is written: a DP
    /// that pipelines requests and reads nothing holds one answer, not one per request.
    answer_slot: Arc<tokio::sync::Semaphore>,
    /// Both sides announced `deltaplane.push.v1`: new versions are pushed.
    pub can_push: bool,
    /// Both sides announced `kong.sync.v2`: new versions are announced.
    pub can_notify: bool,
    /// The newest version announced with `notify_new_version`.
    notified: AtomicI64,
    /// The v2 connection, once it runs.
    peer: OnceLock<Peer>,
}

#[derive(Debug, Clone, Default)]
struct DpStatus {
    version: i64,
    /// The state hash the DP reported with `version` (deltaplane DPs only).
    state_hash: Option<String>,
    last_error: Option<String>,
    sync_status: SyncStatus,
    /// The hash a v1 data plane pinged (v2: the version string is the config hash).
    config_hash: Option<String>,
}

impl Fleet {
    pub fn new(store: Store, node_id: String, kong_compat_version: String) -> Fleet {
        Fleet {
            store,
            node_id,
            kong_compat_version,
            conns: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            plugins_in_use: tokio::sync::Mutex::new(None),
        }
    }

    /// Adds a connected data plane to [`Fleet::connected`] and records it; returns its key.
    pub async fn register(&self, conn: Arc<DpConn>) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.conns
            .lock()
            .expect("conns lock")
            .insert(id, conn.clone());
        self.record(&conn, true).await;
        id
    }

    /// Removes a connection and records the disconnect.
    pub async fn unregister(&self, id: u64, conn: &DpConn) {
        self.conns.lock().expect("conns lock").remove(&id);
        if let Err(e) = self
            .store
            .disconnect_data_plane(&conn.who.node_id, &self.node_id, now_secs())
            .await
        {
            tracing::debug!(error = %e, "recording a disconnect failed");
        }
    }

    /// Data planes connected to this control plane right now, oldest connection first.
    pub fn connected(&self) -> Vec<Arc<DpConn>> {
        let conns = self.conns.lock().expect("conns lock");
        let mut keyed: Vec<(u64, Arc<DpConn>)> =
            conns.iter().map(|(k, c)| (*k, c.clone())).collect();
        drop(conns);
        keyed.sort_unstable_by_key(|(k, _)| *k);
        keyed.into_iter().map(|(_, c)| c).collect()
    }

    fn row(&self, conn: &DpConn, connected: bool) -> DataPlaneRow {
        let st = conn.status.lock().expect("status lock").clone();
        let config_hash = st
            .config_hash
            .clone()
            .or_else(|| Some(version_string(st.version)));
        DataPlaneRow {
            config_hash,
            ..self.row_of(&conn.who, st, connected)
        }
    }

    /// The row of a data plane as `who` says and `st` records.
    fn row_of(&self, who: &DpIdentity, st: DpStatus, connected: bool) -> DataPlaneRow {
        DataPlaneRow {
            node_id: who.node_id.clone(),
            hostname: who.hostname.clone(),
            address: who.address.ip().to_string(),
            kong_version: who.kong_version.clone(),
            protocol: who.protocol.as_str().into(),
            version: st.version,
            state_hash: st.state_hash,
            connected_to: connected.then(|| self.node_id.clone()),
            last_seen: now_secs(),
            last_error: st.last_error,
            labels: who.labels.to_string(),
            capabilities: Value::from(who.capabilities.clone()).to_string(),
            cert_expiry: who.cert_expiry,
            sync_status: st.sync_status.as_str().to_owned(),
            config_hash: st.config_hash,
            updated_at: now_secs(),
        }
    }

    /// Writes one connection's row now.
    async fn record(&self, conn: &DpConn, connected: bool) {
        if let Err(e) = self
            .store
            .upsert_data_plane(&self.row(conn, connected))
            .await
        {
            tracing::debug!(error = %e, node_id = %conn.who.node_id, "recording data-plane status failed");
        }
    }

    /// Records a data plane refused for its Kong version (Kong records it, then closes).
    pub async fn record_refused(&self, who: &DpIdentity, reason: &str) {
        let protocol = who.protocol;
        tracing::warn!(node_id = %who.node_id, kong_version = %who.kong_version, %reason, %protocol, "data plane refused: kong_version_incompatible");
        let status = SyncStatus::KongVersionIncompatible;
        let st = DpStatus {
            last_error: Some(format!("{status}: {reason}")),
            sync_status: status,
            ..DpStatus::default()
        };
        let row = self.row_of(who, st, false);
        if let Err(e) = self.store.upsert_data_plane(&row).await {
            tracing::debug!(error = %e, "recording a refused data plane failed");
        }
    }

    /// Every data plane known to the cluster (rows from the shared table, overlaid with this
    /// control plane's live view of its own connections), by node id.
    pub async fn data_plane_rows(&self) -> Result<Vec<DataPlaneRow>, StoreError> {
        let mut rows: BTreeMap<String, DataPlaneRow> = self
            .store
            .data_planes()
            .await?
            .into_iter()
            .map(|r| (r.node_id.clone(), r))
            .collect();
        // A row that names this control plane but has no live connection here is stale (the
        // connection just ended, or belonged to this node's previous run).
        for r in rows.values_mut() {
            if r.connected_to.as_deref() == Some(self.node_id.as_str()) {
                r.connected_to = None;
            }
        }
        for c in self.connected() {
            rows.insert(c.who.node_id.clone(), self.row(&c, true));
        }
        Ok(rows.into_values().collect())
    }

    /// Kong's plugin compatibility check ([`compat::check_plugins`]) for a DP that announced
    /// its plugins. Records the DP's `sync_status` either way.
    pub async fn check_plugins(&self, conn: &DpConn) -> Result<(), String> {
        let Some(dp_plugins) = &conn.plugins else {
            return Ok(());
        };
        let used = {
            let mut cache = self.plugins_in_use.lock().await;
            let head = *self.store.subscribe().borrow();
            match cache.as_mut() {
                Some(c) if c.version == head => c.used.clone(),
                // Versions this control plane committed, none of them a plugin: no read (the
                // push to a fleet waits for this check).
                Some(c)
                    if c.version < head
                        && self.store.plugins_unchanged(&c.epoch, c.version, head) =>
                {
                    c.version = head;
                    c.used.clone()
                }
                _ => {
                    // Boxed: read once per version, and this future is part of every
                    // get_delta's (issue 11: memory per DP).
                    let read = Box::pin(self.store.plugins_in_use(true))
                        .await
                        .map_err(|e| format!("database unavailable: {e}"))?;
                    let used = Arc::new(read.names);
                    *cache = Some(PluginsCache {
                        version: read.version,
                        epoch: read.epoch,
                        used: used.clone(),
                    });
                    used
                }
            }
        };
        let verdict = compat::check_plugins(&used, dp_plugins, &self.kong_compat_version);
        let mut st = conn.status.lock().expect("status lock");
        let (result, changed) = match verdict {
            Ok(()) => {
                let changed = st.sync_status != SyncStatus::Normal;
                if changed {
                    st.sync_status = SyncStatus::Normal;
                    st.last_error = None;
                }
                (Ok(()), changed)
            }
            Err((status, message)) => {
                let changed =
                    st.sync_status != status || st.last_error.as_deref() != Some(&message);
                st.sync_status = status;
                st.last_error = Some(message.clone());
                (Err(message), changed)
            }
        };
        drop(st);
        if changed {
            conn.mark_dirty(true);
        }
        result
    }

    /// `deltaplane.data_planes`.
    pub async fn data_planes(&self) -> Result<Vec<Value>, StoreError> {
        let head = self.store.version_info().await?.version;
        let now = now_secs();
        Ok(self
            .data_plane_rows()
            .await?
            .into_iter()
            .map(|r| {
                let health = health(&r, head, now);
                serde_json::json!({
                    "node_id": r.node_id,
                    "hostname": r.hostname,
                    "address": r.address,
                    "kong_version": r.kong_version,
                    "protocol": r.protocol,
                    "version": r.version,
                    "version_string": version_string(r.version),
                    "state_hash": r.state_hash,
                    "connected_to": r.connected_to.filter(|_| health != "disconnected"),
                    "last_seen": r.last_seen,
                    "last_error": r.last_error,
                    "sync_status": r.sync_status,
                    "health": health,
                    "labels": serde_json::from_str::<Value>(&r.labels).unwrap_or(Value::Null),
                })
            })
            .collect())
    }

    /// Writes the status rows of connected data planes that changed (and, every `refresh`, of
    /// all of them, so `last_seen` stays fresh) in one transaction per tick, until `stop`.
    pub async fn flush_status(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let tick = Duration::from_secs(1);
        let refresh = Duration::from_secs(10);
        let mut last_refresh = std::time::Instant::now();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.changed() => return,
            }
            let all = last_refresh.elapsed() >= refresh;
            if all {
                last_refresh = std::time::Instant::now();
            }
            // Progress alone (a new version applied) waits for the refresh: this control
            // plane's own view is live anyway, and a fleet of thousands at one version per
            // second would otherwise cost a write per data plane per version.
            let rows: Vec<DataPlaneRow> = self
                .connected()
                .into_iter()
                .filter(|c| c.urgent.swap(false, Ordering::Relaxed) || all)
                .map(|c| self.row(&c, true))
                .collect();
            if let Err(e) = self.store.upsert_data_planes(&rows).await {
                tracing::debug!(error = %e, rows = rows.len(), "writing data-plane status failed; will retry");
                for c in self.connected() {
                    c.mark_dirty(true);
                }
            }
        }
    }
}

/// One word for a data plane's state: `disconnected`, `incompatible` (withheld by a
/// compatibility check), `failing` (its last apply failed), `behind` (below the head) or
/// `in_sync`.
pub fn health(r: &DataPlaneRow, head: i64, now: i64) -> &'static str {
    if r.connected_to.is_none() || now - r.last_seen > STALE_AFTER_SECS {
        "disconnected"
    } else if r.sync_status.ends_with("_incompatible") {
        "incompatible"
    } else if r.last_error.is_some() {
        "failing"
    } else if r.version < head {
        "behind"
    } else {
        "in_sync"
    }
}

/// One copy of each distinct plugin list: a fleet of thousands announces a handful of lists,
/// and each is about 4 KiB.
fn intern_plugins(list: HashMap<String, Option<String>>) -> Arc<HashMap<String, Option<String>>> {
    type Lists = Vec<std::sync::Weak<HashMap<String, Option<String>>>>;
    static LISTS: Mutex<Lists> = Mutex::new(Vec::new());
    let mut lists = LISTS.lock().unwrap_or_else(|e| e.into_inner());
    lists.retain(|w| w.strong_count() > 0);
    if let Some(shared) = lists
        .iter()
        .filter_map(|w| w.upgrade())
        .find(|l| **l == list)
    {
        return shared;
    }
    let shared = Arc::new(list);
    lists.push(Arc::downgrade(&shared));
    shared
}

impl DpConn {
    /// A data plane that just connected, `sync_status` normal, nothing reported yet.
    pub fn new(
        who: DpIdentity,
        plugins: Option<HashMap<String, Option<String>>>,
        cp_version: &str,
    ) -> DpConn {
        DpConn {
            older: crate::schema::version_cmp(&who.kong_version, cp_version)
                == std::cmp::Ordering::Less,
            who,
            plugins: plugins.map(intern_plugins),
            status: Mutex::new(DpStatus {
                sync_status: SyncStatus::Normal,
                ..DpStatus::default()
            }),
            reported: AtomicI64::new(-1),
            urgent: AtomicBool::new(false),
            answer_slot: Arc::new(tokio::sync::Semaphore::new(1)),
            can_push: false,
            can_notify: false,
            notified: AtomicI64::new(0),
            peer: OnceLock::new(),
        }
    }

    /// Sets the v2 connection (once).
    pub fn attach(&self, peer: Peer) {
        let _ = self.peer.set(peer);
    }

    /// The v2 connection, if this is one and it runs.
    pub fn peer(&self) -> Option<&Peer> {
        self.peer.get()
    }

    /// The version the DP reported or was promised (-1 before its first get_delta).
    pub fn reported_or_promised(&self) -> i64 {
        self.reported.load(Ordering::Acquire)
    }

    /// Records that the DP is told of `version`; false when it was already told of it or a
    /// newer one (Kong's rule: at most one notification per version).
    pub fn mark_notified(&self, version: i64) -> bool {
        self.notified.fetch_max(version, Ordering::Relaxed) < version
    }

    /// The largest frame to send this DP: the smaller of `cp_limit` and the DP's own.
    pub fn frame_limit(&self, cp_limit: usize) -> usize {
        self.who.max_payload.map_or(cp_limit, |dp| dp.min(cp_limit))
    }

    /// Waits for this DP's one slot for a large answer (get_delta, get_page); hold the permit
    /// until the answer is written.
    pub async fn large_answer_slot(&self) -> OwnedSemaphorePermit {
        self.answer_slot
            .clone()
            .acquire_owned()
            .await
            .expect("the answer slot is never closed")
    }

    /// A v2 report (a get_delta request or status notification): the DP holds `version` (with
    /// `state_hash`, from a deltaplane DP); `None`: no valid version (it has no configuration).
    ///
    /// A connection's requests are handled concurrently (its notifications in order), so a
    /// request sent before an apply may be handled after the status notification that
    /// followed the apply. A request
    /// therefore never moves the recorded version down; a notification (`after_apply`, sent
    /// once a version is committed) is where the DP is, also after a full sync to a lower one.
    pub fn report_v2(
        &self,
        version: Option<Version>,
        state_hash: Option<String>,
        after_apply: bool,
    ) {
        let Some(v) = version.map(Version::get) else {
            self.reported.store(0, Ordering::Release);
            return;
        };
        let mut st = self.status.lock().expect("status lock");
        if !after_apply && v < st.version {
            return;
        }
        // Progress: whatever failed before has been overcome.
        let recovered = v > st.version && st.last_error.take().is_some();
        st.version = v;
        st.state_hash = state_hash;
        drop(st);
        self.mark_dirty(recovered);
        self.reported.store(v, Ordering::Release);
    }

    /// An answer carries the DP to `version` once applied: no need to notify it of that
    /// version (it reports where it really is after applying).
    pub fn promised(&self, version: i64) {
        self.reported.fetch_max(version, Ordering::AcqRel);
    }

    /// A v1 ping: the data plane holds `hash`, the configuration of `version` when the control
    /// plane knows which version it sent with that hash. Written by the flusher.
    pub fn report_v1(&self, hash: &str, version: Option<i64>) {
        let mut st = self.status.lock().expect("status lock");
        if let Some(v) = version {
            if v > st.version {
                st.last_error = None;
            }
            st.version = v;
        }
        st.config_hash = Some(hash.to_owned());
        drop(st);
        self.mark_dirty(false);
    }

    /// Records why the data plane's configuration could not be sent or applied.
    pub fn set_error(&self, message: String) {
        self.status.lock().expect("status lock").last_error = Some(message);
        self.mark_dirty(true);
    }

    /// The status changed; `urgent`: by more than progress, so the row is written at the
    /// next tick (progress waits for the next refresh, which writes every row).
    fn mark_dirty(&self, urgent: bool) {
        if urgent {
            self.urgent.store(true, Ordering::Relaxed);
        }
    }
}
