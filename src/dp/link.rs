//! The data plane's link to its control planes: pick one (round robin over
//! `--cluster-control-plane`), run a session on it (sync v2, or v1 under `--sync v1` or as
//! `--sync auto`'s fallback), and after it ends wait a jittered exponential back-off before the
//! next. `--sync auto` falls back to v1 when the hello lacks `kong.sync.v2` or `/v2/outlet`
//! refuses the upgrade ([`OpenError::Refused`]), and tries v2 again on every reconnect.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::watch;

use super::{DpConfig, DpShared, SyncMode};
use crate::net::dial::OpenError;
use crate::net::tls::{ClusterTls, TlsSettings};

/// The TLS material from the data plane's settings.
pub fn tls_for(cfg: &DpConfig) -> anyhow::Result<ClusterTls> {
    ClusterTls::load(&TlsSettings {
        mode: cfg.cluster_mtls,
        cert: cfg.cluster_cert.clone(),
        key: cfg.cluster_cert_key.clone(),
        ca_cert: cfg.cluster_ca_cert.clone(),
        server_name: cfg.cluster_server_name.clone(),
        allowed_common_names: Vec::new(),
    })
    .with_context(|| {
        format!(
            "loading the cluster certificate ({}, {}); pass --cluster-cert and \
             --cluster-cert-key: the control plane writes cluster.crt and cluster.key to its \
             data directory (./deltaplane-cp by default) on first start",
            cfg.cluster_cert, cfg.cluster_cert_key
        )
    })
}

/// Follows the control plane(s) until `stop`.
pub async fn run(
    cfg: DpConfig,
    tls: ClusterTls,
    shared: Arc<DpShared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt: u32 = 0;
    let mut index = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        let cp = cfg.control_planes[index % cfg.control_planes.len()].clone();
        let started = std::time::Instant::now();
        let outcome = match cfg.sync {
            SyncMode::V1 => v1_session(&cfg, &tls, &shared, &cp, stop.clone()).await,
            mode => match super::v2::session(&cfg, &tls, &shared, &cp, stop.clone()).await {
                Ok(End::NoSyncV2(why)) => {
                    tracing::info!(control_plane = %cp, reason = %why, "falling back to sync v1");
                    v1_session(&cfg, &tls, &shared, &cp, stop.clone()).await
                }
                Err(OpenError::Refused(why)) if mode == SyncMode::Auto => {
                    tracing::info!(control_plane = %cp, reason = %why, "falling back to sync v1");
                    v1_session(&cfg, &tls, &shared, &cp, stop.clone()).await
                }
                Ok(end) => Ok(end),
                Err(OpenError::Refused(why)) => Err(anyhow::Error::msg(why)),
                Err(OpenError::Failed(e)) => Err(e),
            },
        };
        // Versions the control plane announced and this data plane did not apply: the next
        // session may be on another change log.
        shared.metrics.forget_learned();
        match outcome {
            Ok(End::Stopped) => {
                shared.update_link(|l| l.connected_to = None);
                return;
            }
            Ok(End::NoSyncV2(reason)) => {
                tracing::info!(control_plane = %cp, %reason, "disconnected from the control plane");
            }
            Ok(End::Closed(reason)) => {
                tracing::info!(control_plane = %cp, %reason, "disconnected from the control plane");
                // Shown until the next successful sync clears it.
                shared.update_link(|l| l.last_error = Some(format!("{cp}: {reason}")));
            }
            Err(e) => {
                let shown = match crate::net::dial::hint(&e, &cp) {
                    Some(hint) => format!("{e:#}; {hint}"),
                    None => format!("{e:#}"),
                };
                tracing::warn!(control_plane = %cp, error = %shown, "control plane connection failed");
                shared.update_link(|l| l.last_error = Some(format!("{cp}: {shown}")));
            }
        }
        shared.update_link(|l| l.connected_to = None);
        // A session that lasted a while was healthy: start the back-off over.
        if started.elapsed() > cfg.reconnect_max {
            attempt = 0;
        }
        index += 1;
        let delay = backoff(cfg.reconnect_min, cfg.reconnect_max, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Jittered exponential back-off: uniform in [d/2, d] with d = min · 2^attempt, capped at max.
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    let d = min
        .saturating_mul(1u32 << attempt.min(20))
        .min(max)
        .max(Duration::from_millis(1));
    let lo = d / 2;
    lo + (d - lo).mul_f64(rand::random::<f64>())
}

/// How a session ended (a failure is an `Err`).
pub(super) enum End {
    Stopped,
    Closed(String),
    /// `--sync auto` and the control plane's hello lacks `kong.sync.v2`: use v1.
    NoSyncV2(String),
}

/// A sync v1 session (`dp::v1`), ending like a v2 one.
async fn v1_session(
    cfg: &DpConfig,
    tls: &ClusterTls,
    shared: &Arc<DpShared>,
    cp: &str,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<End> {
    Ok(
        match super::v1::session(cfg, tls, shared, cp, stop).await? {
            super::v1::V1End::Stopped => End::Stopped,
            super::v1::V1End::Closed(reason) => End::Closed(reason),
        },
    )
}
