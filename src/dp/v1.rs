//! Sync v1 on the data plane: `/v1/outlet`, Kong's full-configuration push.
//!
//! The data plane sends `basic_info` (plugins, labels), then pings with its 32-character config
//! hash every ping interval and right after each apply. Each `reconfigure` message is applied
//! as one full sync (one redb write transaction; the old configuration is served until it
//! commits), unless its hash equals the stored one. Only the newest message received is kept
//! while an apply runs (Kong's `next_data`).
//!
//! The md5 config hash is remembered next to the store in `v1_hash.json`, tagged with the
//! (version, epoch) it belongs to and written right after each commit; one that does not match
//! the store (a crash between the two writes, or a v2 sync since) is ignored, which only costs
//! one more apply.
//!
//! deltaplane control planes add `deltaplane_version` / `deltaplane_epoch` to the message, so
//! the data plane stores the version it holds, exactly as over v2. From a Kong control plane
//! (no such fields) each apply takes the next local version.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use super::store::{ApplyKind, DpStore};
use super::{DpConfig, DpShared};
use crate::net::stats::Refusal;
use crate::net::tls::ClusterTls;
use crate::proto::v1::hash::EMPTY_HASH;
use crate::proto::v1::{Received, Reconfigure};

/// How a v1 session ended.
pub enum V1End {
    Stopped,
    Closed(String),
}

/// The v1 hash stored next to the redb file, valid for one (version, epoch).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct V1Hash {
    pub version: i64,
    pub epoch: Option<String>,
    /// The hash the control plane sent.
    pub cp_hash: String,
    /// The hash reported in pings: `cp_hash`, or 32 zeros for a configuration holding nothing
    /// but workspaces (as a Kong data plane stores).
    pub hash: String,
}

fn hash_file(data_dir: &Path) -> PathBuf {
    data_dir.join("v1_hash.json")
}

/// The stored v1 hash, if it belongs to what the store holds.
pub fn load_hash(data_dir: &Path, store: &DpStore) -> Option<V1Hash> {
    let text = std::fs::read(hash_file(data_dir)).ok()?;
    let h: V1Hash = serde_json::from_slice(&text).ok()?;
    let s = store.state();
    (s.version == h.version && s.epoch == h.epoch && s.version > 0).then_some(h)
}

fn save_hash(data_dir: &Path, h: &V1Hash) -> std::io::Result<()> {
    let tmp = data_dir.join("v1_hash.json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(h).expect("serialises"))?;
    std::fs::rename(&tmp, hash_file(data_dir))
}

/// What one received message did.
#[derive(Debug)]
pub enum Outcome {
    /// Not a reconfigure message (or an older version than stored): nothing to do.
    Ignored(String),
    /// The stored configuration already has this hash: nothing applied.
    Same,
    Applied {
        hash: V1Hash,
        n_entities: u64,
    },
}

/// Applies one (gzip-compressed) reconfigure message to `store`; blocking.
pub fn apply_message(
    store: &DpStore,
    data_dir: &Path,
    gz: &[u8],
    max_decompressed: usize,
) -> Result<Outcome, String> {
    let raw = crate::proto::v1::gunzip(gz, max_decompressed)?;
    let msg = match crate::proto::v1::read_message(&raw)? {
        Received::Other(ty) => return Ok(Outcome::Ignored(format!("message type {ty}"))),
        Received::Reconfigure(msg) => msg,
    };
    drop(raw);
    let Reconfigure {
        config_hash: cp_hash,
        version,
        epoch,
        config_table,
    } = msg;
    let state = store.state();
    let known = load_hash(data_dir, store);
    // Kong's rule: the same hash is the same configuration. From a deltaplane control plane the
    // version must match too (a version can come back to an earlier configuration), so the data
    // plane still records the version it is the state of.
    let same_hash = known
        .as_ref()
        .is_some_and(|k| k.cp_hash == cp_hash || k.hash == cp_hash);
    let same_version = match version {
        Some(v) => v == state.version && epoch == state.epoch,
        None => true,
    };
    if same_hash && same_version {
        return Ok(Outcome::Same);
    }
    if let Some(v) = version
        && epoch.is_some()
        && epoch == state.epoch
        && v < state.version
    {
        return Ok(Outcome::Ignored(format!(
            "version {v} is older than the stored {}",
            state.version
        )));
    }
    let table = match config_table {
        Some(Value::Object(t)) => t,
        _ => return Err("reconfigure: config_table must be an object".into()),
    };
    let version = version.unwrap_or(state.version + 1);
    let deltas = crate::proto::v1::export::deltas(store.registry(), table, version)?;
    let only_workspaces = deltas
        .iter()
        .all(|d| d.entity_type == crate::schema::WORKSPACES);
    let applied = store
        .apply(
            ApplyKind::Full {
                version,
                epoch: epoch.clone(),
            },
            deltas,
        )
        .map_err(|e| e.to_string())?;
    let hash = V1Hash {
        version,
        epoch,
        hash: if only_workspaces {
            EMPTY_HASH.to_owned()
        } else {
            cp_hash.clone()
        },
        cp_hash,
    };
    if let Err(e) = save_hash(data_dir, &hash) {
        // Only costs an apply of the same configuration later.
        tracing::warn!(error = %e, "could not record the v1 config hash");
    }
    Ok(Outcome::Applied {
        hash,
        n_entities: applied.n_entities,
    })
}

/// `basic_info`: the plugins this data plane runs and its labels.
fn basic_info(cfg: &DpConfig, shared: &DpShared) -> Value {
    let plugins = cfg.announced_plugins(shared.store.registry());
    crate::proto::v1::basic_info(&plugins, &cfg.labels, cfg.cluster.max_payload)
}

/// One v1 session with `cp` until it ends or `stop`.
pub async fn session(
    cfg: &DpConfig,
    tls: &ClusterTls,
    shared: &Arc<DpShared>,
    cp: &str,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<V1End> {
    let s = &cfg.cluster;
    let timeout = s.handshake_timeout;
    let stream = crate::net::dial::connect_tls(tls, cp, timeout).await?;
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("node_id", &shared.node_id)
        .append_pair("node_hostname", &shared.hostname)
        .append_pair("node_version", &cfg.kong_compat_version)
        .finish();
    let url = format!("wss://{cp}{}?{query}", crate::proto::v1::PATH);
    let pcfg = cfg.cluster.peer_config();
    let (mut ws, _resp) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::client_async_with_config(
            url.as_str(),
            stream,
            Some(crate::net::peer::ws_config(&pcfg)),
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("WebSocket handshake timed out"))?
    .context("WebSocket handshake (/v1/outlet)")?;
    let info = serde_json::to_vec(&basic_info(cfg, shared)).expect("serialises");
    send(&mut ws, Message::Binary(Bytes::from(info)), s.write_timeout)
        .await
        .context("sending basic_info")?;
    shared.update_link(|l| {
        l.connected_to = Some(cp.to_owned());
        l.protocol = Some(crate::proto::SyncProtocol::V1);
        l.connects += 1;
    });
    tracing::info!(control_plane = %cp, "connected to the control plane (sync v1)");

    let data_dir = cfg.data_dir.clone();
    let max = s.max_decompressed();
    let mut hash = load_hash(&data_dir, &shared.store)
        .map(|h| h.hash)
        .unwrap_or_else(|| EMPTY_HASH.to_owned());
    let mut ping = tokio::time::interval(s.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let idle = tokio::time::sleep(s.idle_timeout);
    tokio::pin!(idle);
    // The newest message not yet applied (with when it arrived), and the apply in progress.
    let mut next: Option<(Bytes, Instant)> = None;
    let mut applying: Option<(ApplyTask, Timing)> = None;
    let end = loop {
        if applying.is_none()
            && let Some((gz, received)) = next.take()
        {
            let store = shared.store.clone();
            let dir = data_dir.clone();
            let task = tokio::task::spawn_blocking(move || apply_message(&store, &dir, &gz, max));
            applying = Some((
                task,
                Timing {
                    received,
                    started: Instant::now(),
                },
            ));
        }
        tokio::select! {
            msg = ws.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + s.idle_timeout);
                match msg {
                    Some(Ok(Message::Binary(gz))) => next = Some((gz, Instant::now())),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                        if reason.contains("incompatible") {
                            shared.update_link(|l| l.last_error = Some(reason.clone()));
                        }
                        break V1End::Closed(format!("closed by the control plane: {reason}"));
                    }
                    None => break V1End::Closed("connection closed".into()),
                    Some(Ok(Message::Text(text))) => {
                        // Asked for in basic_info: why the control plane sends nothing.
                        match crate::proto::v1::read_withheld_notice(&text) {
                            Some(message) => {
                                tracing::warn!(control_plane = %cp, %message, "sync v1: the control plane withholds the configuration");
                                shared.update_link(|l| l.last_error = Some(message));
                            }
                            None => {
                                shared.metrics.link().refused(Refusal::UnsupportedFrame);
                                tracing::debug!(control_plane = %cp, "sync v1: ignoring an unexpected text frame");
                            }
                        }
                    }
                    Some(Ok(other)) => {
                        shared.metrics.link().refused(Refusal::UnsupportedFrame);
                        tracing::debug!(control_plane = %cp, ?other, "sync v1: ignoring an unexpected frame");
                    }
                    Some(Err(e)) => {
                        if let Some(r) = crate::net::stats::refusal_of(&e) {
                            shared.metrics.link().refused(r);
                        }
                        break V1End::Closed(format!("read: {e}"));
                    }
                }
            }
            done = async { (&mut applying.as_mut().expect("guarded").0).await }, if applying.is_some() => {
                let timing = applying.take().expect("guarded").1;
                let outcome = done.unwrap_or_else(|e| Err(format!("apply task: {e}")));
                if handle_outcome(shared, cp, outcome, timing, &mut hash) {
                    // Tell the control plane at once.
                    ping.reset();
                    if let Err(e) = send(&mut ws, Message::Ping(Bytes::from(hash.clone())), s.write_timeout).await {
                        break V1End::Closed(format!("ping: {e}"));
                    }
                }
            }
            _ = ping.tick() => {
                if let Err(e) = send(&mut ws, Message::Ping(Bytes::from(hash.clone())), s.write_timeout).await {
                    break V1End::Closed(format!("ping: {e}"));
                }
            }
            _ = &mut idle => break V1End::Closed(format!("silent for {:?}", s.idle_timeout)),
            _ = stopped(&mut stop) => {
                let frame = crate::net::peer::close_frame(
                    tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Away,
                    "data plane shutting down",
                );
                let _ = tokio::time::timeout(s.write_timeout, ws.close(Some(frame))).await;
                break V1End::Stopped;
            }
        }
    };
    // Nothing may hold the store after the session: let a running apply finish.
    if let Some((task, timing)) = applying {
        let outcome = task
            .await
            .unwrap_or_else(|e| Err(format!("apply task: {e}")));
        handle_outcome(shared, cp, outcome, timing, &mut hash);
    }
    Ok(end)
}

type ApplyTask = tokio::task::JoinHandle<Result<Outcome, String>>;

/// When a reconfigure message arrived and when its apply started.
struct Timing {
    received: Instant,
    started: Instant,
}

/// Records an apply's outcome; true when the control plane should hear of it (a ping).
fn handle_outcome(
    shared: &DpShared,
    cp: &str,
    outcome: Result<Outcome, String>,
    timing: Timing,
    hash: &mut String,
) -> bool {
    match outcome {
        Ok(Outcome::Applied {
            hash: h,
            n_entities,
        }) => {
            let m = &shared.metrics;
            m.apply_duration(super::metrics::ApplyKind::Full, timing.started.elapsed());
            // A v1 frame names its version only once decoded: it was learned on arrival.
            m.learned_at(h.version, timing.received);
            tracing::info!(control_plane = %cp, version = h.version, hash = %h.cp_hash, entities = n_entities, "sync v1: configuration applied");
            shared.update_link(|l| {
                l.full_syncs += 1;
                l.last_sync_at = Some(crate::node::now_secs());
                l.last_error = None;
                l.cp_version_seen = l.cp_version_seen.max(h.version);
                if h.epoch.is_some() {
                    l.cp_epoch = h.epoch.clone();
                }
            });
            shared.applied(h.version);
            *hash = h.hash;
            true
        }
        Ok(Outcome::Same) => {
            tracing::debug!(control_plane = %cp, "sync v1: same configuration received; nothing to apply");
            let v = shared.store.state().version;
            shared.update_link(|l| {
                l.v1_skipped += 1;
                l.last_sync_at = Some(crate::node::now_secs());
                l.last_error = None;
                l.cp_version_seen = l.cp_version_seen.max(v);
            });
            true
        }
        Ok(Outcome::Ignored(why)) => {
            tracing::debug!(control_plane = %cp, %why, "sync v1: message ignored");
            false
        }
        Err(e) => {
            tracing::warn!(control_plane = %cp, error = %e, "sync v1: configuration rejected; keeping the current one");
            shared.update_link(|l| l.last_error = Some(e));
            false
        }
    }
}

async fn send<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    msg: Message,
    timeout: Duration,
) -> anyhow::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    tokio::time::timeout(timeout.max(Duration::from_secs(1)), ws.send(msg))
        .await
        .map_err(|_| anyhow::anyhow!("write stalled"))??;
    Ok(())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
