//! What the sync layer needs from the database besides the change log: the data-plane table
//! shared by every control plane, and the PostgreSQL listener that learns about versions
//! committed by other control planes.

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

use super::{Pool, Store, StoreError, on_backend};

/// The channel every commit notifies with its version (see `write.rs`).
pub const VERSIONS_CHANNEL: &str = "deltaplane_versions";

/// The plugins a configuration uses ([`Store::plugins_in_use`]), at a version of a change log.
#[derive(Debug, Clone)]
pub struct PluginsInUse {
    pub version: i64,
    pub epoch: String,
    pub names: std::collections::BTreeSet<String>,
}

/// One data plane as the cluster last saw it.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DataPlaneRow {
    pub node_id: String,
    pub hostname: String,
    pub address: String,
    pub kong_version: String,
    pub protocol: String,
    pub version: i64,
    pub state_hash: Option<String>,
    /// Node id of the control plane it is connected to; `None` once disconnected.
    pub connected_to: Option<String>,
    pub last_seen: i64,
    pub last_error: Option<String>,
    /// JSON object of labels.
    pub labels: String,
    /// JSON array of the DP's RPC capabilities.
    pub capabilities: String,
    pub cert_expiry: Option<i64>,
    /// Kong's `sync_status`: unknown, normal, kong_version_incompatible,
    /// plugin_set_incompatible, plugin_version_incompatible.
    pub sync_status: String,
    /// What Kong shows as `config_hash`: the v1 md5 or the v2 version string.
    pub config_hash: Option<String>,
    pub updated_at: i64,
}

const COLUMNS: &str = "node_id, hostname, address, kong_version, protocol, version, state_hash, connected_to, last_seen, last_error, labels, capabilities, cert_expiry, sync_status, config_hash, updated_at";

impl Store {
    /// Inserts or replaces a data plane's row.
    pub async fn upsert_data_plane(&self, row: &DataPlaneRow) -> Result<(), StoreError> {
        self.upsert_data_planes(std::slice::from_ref(row)).await
    }

    /// Inserts or replaces data-plane rows, all in one transaction (one fsync).
    pub async fn upsert_data_planes(&self, rows: &[DataPlaneRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        // Multi-row statements: a fleet of thousands is refreshed in a few round trips. One
        // statement may not touch a row twice (a data plane reconnecting while its old
        // connection is still listed): the last row of a node wins.
        const ROWS_PER_STATEMENT: usize = 500;
        let mut last: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            last.insert(&r.node_id, i);
        }
        let rows: Vec<&DataPlaneRow> = rows
            .iter()
            .enumerate()
            .filter(|(i, r)| last[r.node_id.as_str()] == *i)
            .map(|(_, r)| r)
            .collect();
        on_backend!(self.pool(), p => {
            let mut tx = p.begin().await?;
            for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                let mut q = sqlx::QueryBuilder::new(format!("INSERT INTO dp_data_planes ({COLUMNS}) "));
                q.push_values(chunk, |mut b, row| {
                    b.push_bind(&row.node_id)
                        .push_bind(&row.hostname)
                        .push_bind(&row.address)
                        .push_bind(&row.kong_version)
                        .push_bind(&row.protocol)
                        .push_bind(row.version)
                        .push_bind(&row.state_hash)
                        .push_bind(&row.connected_to)
                        .push_bind(row.last_seen)
                        .push_bind(&row.last_error)
                        .push_bind(&row.labels)
                        .push_bind(&row.capabilities)
                        .push_bind(row.cert_expiry)
                        .push_bind(&row.sync_status)
                        .push_bind(&row.config_hash)
                        .push_bind(row.updated_at);
                });
                q.push(" ON CONFLICT (node_id) DO UPDATE SET hostname = excluded.hostname, address = excluded.address, \
                 kong_version = excluded.kong_version, protocol = excluded.protocol, version = excluded.version, \
                 state_hash = excluded.state_hash, connected_to = excluded.connected_to, last_seen = excluded.last_seen, \
                 last_error = excluded.last_error, labels = excluded.labels, capabilities = excluded.capabilities, \
                 cert_expiry = excluded.cert_expiry, sync_status = excluded.sync_status, \
                 config_hash = excluded.config_hash, updated_at = excluded.updated_at");
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Marks a data plane disconnected from `cp_node`, unless it has meanwhile connected to
    /// another control plane.
    pub async fn disconnect_data_plane(
        &self,
        node_id: &str,
        cp_node: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        on_backend!(self.pool(), p => {
            sqlx::query("UPDATE dp_data_planes SET connected_to = NULL, last_seen = $3 WHERE node_id = $1 AND connected_to = $2")
                .bind(node_id)
                .bind(cp_node)
                .bind(now)
                .execute(p)
                .await?;
        });
        Ok(())
    }

    /// Marks every data plane recorded as connected to `cp_node` disconnected: at start, the
    /// connections of this control plane's previous run are gone. Returns how many.
    pub async fn release_data_planes(&self, cp_node: &str) -> Result<u64, StoreError> {
        Ok(on_backend!(self.pool(), p => {
            sqlx::query("UPDATE dp_data_planes SET connected_to = NULL WHERE connected_to = $1")
                .bind(cp_node)
                .execute(p)
                .await?
                .rows_affected()
        }))
    }

    /// Records the cluster certificate this control plane presents, and returns the other
    /// control planes on this database that present a different one in the same mode (seen
    /// within `recent` seconds), as `(node_id, mode)`.
    pub async fn record_cluster_cert(
        &self,
        cp_node: &str,
        mtls_mode: &str,
        digest: &str,
        now: i64,
        recent: i64,
    ) -> Result<Vec<String>, StoreError> {
        Ok(on_backend!(self.pool(), p => {
            sqlx::query(
                "INSERT INTO dp_cluster_certs (node_id, mtls_mode, cert_digest, updated_at) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (node_id) DO UPDATE SET mtls_mode = excluded.mtls_mode, \
                 cert_digest = excluded.cert_digest, updated_at = excluded.updated_at")
                .bind(cp_node)
                .bind(mtls_mode)
                .bind(digest)
                .bind(now)
                .execute(p)
                .await?;
            sqlx::query_scalar::<_, String>(
                "SELECT node_id FROM dp_cluster_certs WHERE node_id <> $1 AND mtls_mode = $2 \
                 AND cert_digest <> $3 AND updated_at >= $4 ORDER BY node_id")
                .bind(cp_node)
                .bind(mtls_mode)
                .bind(digest)
                .bind(now - recent)
                .fetch_all(p)
                .await?
        }))
    }

    /// Every data plane known to the cluster, by node id.
    pub async fn data_planes(&self) -> Result<Vec<DataPlaneRow>, StoreError> {
        Ok(on_backend!(self.pool(), p => {
            sqlx::query_as::<_, DataPlaneRow>(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM dp_data_planes ORDER BY node_id")))
                .fetch_all(p)
                .await?
        }))
    }

    /// One page of data planes ordered by node id, after `after` (keyset pagination).
    pub async fn data_planes_page(
        &self,
        after: Option<&str>,
        size: i64,
    ) -> Result<Vec<DataPlaneRow>, StoreError> {
        Ok(on_backend!(self.pool(), p => {
            sqlx::query_as::<_, DataPlaneRow>(sqlx::AssertSqlSafe(format!("SELECT {COLUMNS} FROM dp_data_planes WHERE node_id > $1 ORDER BY node_id LIMIT $2")))
                .bind(after.unwrap_or(""))
                .bind(size)
                .fetch_all(p)
                .await?
        }))
    }

    /// The names of the plugins the current configuration uses (with `enabled_only`, only the
    /// enabled ones: what a data plane must be able to run, as Kong's v1 export leaves
    /// disabled plugins out), and the version and epoch it is at.
    pub async fn plugins_in_use(&self, enabled_only: bool) -> Result<PluginsInUse, StoreError> {
        let (version, epoch, names): (i64, String, Vec<Option<String>>) = match self.pool() {
            Pool::Sqlite(p) => {
                let mut c = p.begin().await?;
                let (v, e): (i64, String) =
                    sqlx::query_as("SELECT version, epoch FROM dp_meta WHERE id = 1")
                        .fetch_one(&mut *c)
                        .await?;
                let n = sqlx::query_scalar(
                    "SELECT DISTINCT json_extract(body, '$.name') FROM dp_entities WHERE type = $1 \
                     AND ($2 = 0 OR json_extract(body, '$.enabled') = 1)",
                )
                .bind(crate::schema::PLUGINS)
                .bind(enabled_only as i64)
                .fetch_all(&mut *c)
                .await?;
                c.commit().await?;
                (v, e, n)
            }
            Pool::Postgres(p) => {
                let mut c = p
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?;
                let (v, e): (i64, String) =
                    sqlx::query_as("SELECT version, epoch FROM dp_meta WHERE id = 1")
                        .fetch_one(&mut *c)
                        .await?;
                let n = sqlx::query_scalar(
                    "SELECT DISTINCT (body::jsonb)->>'name' FROM dp_entities WHERE type = $1 \
                     AND (NOT $2 OR (body::jsonb)->>'enabled' = 'true')",
                )
                .bind(crate::schema::PLUGINS)
                .bind(enabled_only)
                .fetch_all(&mut *c)
                .await?;
                c.commit().await?;
                (v, e, n)
            }
        };
        Ok(PluginsInUse {
            version,
            epoch,
            names: names.into_iter().flatten().collect(),
        })
    }

    /// Deletes rows of data planes not seen since `before` (unix seconds). Returns how many.
    pub async fn purge_data_planes(&self, before: i64) -> Result<u64, StoreError> {
        Ok(on_backend!(self.pool(), p => {
            sqlx::query("DELETE FROM dp_data_planes WHERE last_seen < $1")
                .bind(before)
                .execute(p)
                .await?
                .rows_affected()
        }))
    }

    /// Keeps [`Store::subscribe`] current with versions committed by other control planes on
    /// the same PostgreSQL database. NOTIFY is only a hint: after every (re)connect and every
    /// `poll` the head is re-read from the change log, so a notification lost while the
    /// listener was away costs latency, never a version. On SQLite this returns at once (one
    /// control plane per file; commits update the watch directly).
    pub async fn follow_other_writers(&self, poll: Duration, mut stop: watch::Receiver<bool>) {
        let Pool::Postgres(pool) = self.pool() else {
            return;
        };
        let pool = pool.clone();
        loop {
            if *stop.borrow() {
                return;
            }
            let mut listener = match PgListener::connect_with(&pool).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "version listener: connect failed; retrying");
                    self.reread_head().await;
                    tokio::select! {
                        _ = tokio::time::sleep(poll) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
            if let Err(e) = listener.listen(VERSIONS_CHANNEL).await {
                tracing::warn!(error = %e, "version listener: LISTEN failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(poll) => continue,
                    _ = stop.changed() => return,
                }
            }
            // Anything committed before LISTEN took effect is found here.
            self.reread_head().await;
            loop {
                tokio::select! {
                    msg = listener.try_recv() => match msg {
                        Ok(Some(n)) => {
                            if let Ok(v) = n.payload().parse::<i64>() {
                                self.observe(v);
                            }
                        }
                        // The connection was lost and re-established: notifications may be gone.
                        Ok(None) => self.reread_head().await,
                        Err(e) => {
                            tracing::warn!(error = %e, "version listener failed; reconnecting");
                            break;
                        }
                    },
                    _ = tokio::time::sleep(poll) => self.reread_head().await,
                    _ = stop.changed() => return,
                }
            }
        }
    }

    async fn reread_head(&self) {
        match self.version_info().await {
            Ok(info) => self.observe(info.version),
            Err(e) => tracing::debug!(error = %e, "re-reading the change-log head failed"),
        }
    }
}
