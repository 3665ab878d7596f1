//! The control plane's store: entities, their indexes, and the versioned change log, on SQLite
//! (embedded default) or PostgreSQL.
//!
//! Both backends run the same SQL text (`$n` placeholders work on both); the differences — how a
//! writer takes the version lock, `pg_notify`, pool options, migrations — are explicit match arms
//! on [`Pool`]. Writes go through [`Store::write_batch`]: one database transaction, the version
//! lock taken first, one savepoint and one version per operation.

mod fleet;
mod import;
mod read;
mod revalidate;
mod write;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use sqlx::SqlSafeStr;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use tokio::sync::watch;

use crate::node::now_secs;
use crate::proto::v2::{DeltaText, RawDelta};
use crate::schema::{FieldErrors, Registry};

pub use crate::proto::StateHash;
pub use fleet::{DataPlaneRow, PluginsInUse};
pub use import::{ConfigProblems, ImportMode, ImportOutcome, ImportedEntity, TypeCounts};
pub use read::{
    BehindHorizon, Change, ListQuery, Page, RawChange, TagFilter, TagPage, TagRow, VersionInfo,
};
pub use revalidate::Invalid;
pub use write::{Op, Outcome, Scope};

/// A connection pool of either backend.
#[derive(Clone, Debug)]
pub enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Runs the same code against whichever pool (or transaction) `$x` holds.
macro_rules! on_backend {
    ($x:expr, $p:ident => $body:expr) => {
        match $x {
            $crate::cp::store::Pool::Sqlite($p) => $body,
            $crate::cp::store::Pool::Postgres($p) => $body,
        }
    };
}
pub(crate) use on_backend;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// How the store opens its database.
#[derive(Clone)]
pub struct StoreOptions {
    /// `sqlite://path` or `postgres://...`.
    pub url: String,
    pub max_connections: u32,
    /// How long a request waits for a connection before failing with 503.
    pub acquire_timeout: Duration,
    /// SQLite only: `synchronous=FULL` (survives power loss) instead of `NORMAL`.
    pub sqlite_synchronous_full: bool,
    /// Test hook: called after a write transaction took its versions and before it commits.
    pub before_commit: Option<Arc<dyn Fn() -> Duration + Send + Sync>>,
}

impl StoreOptions {
    pub fn new(url: impl Into<String>) -> StoreOptions {
        StoreOptions {
            url: url.into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            sqlite_synchronous_full: true,
            before_commit: None,
        }
    }

    /// The SQLite database file under a data directory.
    pub fn sqlite_in(data_dir: &std::path::Path) -> StoreOptions {
        StoreOptions::new(format!(
            "sqlite://{}",
            data_dir.join("deltaplane.db").display()
        ))
    }
}

/// Why a store operation failed. The Admin API maps each to Kong's HTTP status and body.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("{}", .0.message())]
    Schema(FieldErrors),
    #[error("UNIQUE violation detected on '{}'", kong_pretty(.0))]
    Unique(serde_json::Map<String, Value>),
    #[error("{message}")]
    ForeignKey {
        message: String,
        fields: serde_json::Map<String, Value>,
    },
    /// Foreign keys given by a unique field of the referenced entity that name no entity
    /// (Kong's `FOREIGN_KEYS_UNRESOLVED`), sorted by field, then by unique field.
    #[error("{} foreign key(s) unresolved", .0.len())]
    ForeignKeysUnresolved(Vec<UnresolvedForeignKey>),
    #[error("{0}")]
    ReferencedByOthers(String),
    #[error("{message}")]
    PrimaryKey {
        message: String,
        fields: serde_json::Map<String, Value>,
    },
    #[error("Not found")]
    NotFound,
    /// A declarative import whose final state breaks unique keys or references: every
    /// problem, in the declarative error shape (Kong's code 14).
    #[error("declarative config is invalid")]
    InvalidConfig(Box<crate::declarative::Invalid>),
    #[error("{0}")]
    BadRequest(String),
    /// The database could not be reached in time; nothing was written. Holds the cause, for logs.
    #[error("database unavailable")]
    Unavailable(String),
    /// The connection failed during COMMIT: the write may or may not have been applied.
    #[error("commit outcome unknown")]
    CommitUnknown(String),
    /// Anything else; the cause is for logs only, never for clients.
    #[error("internal error")]
    Internal(String),
}

/// Why the store could not be opened, in one line that names the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "unsupported database URL scheme '{0}': use postgres://user@host:port/db, or leave \
         --database-url unset for the embedded SQLite database"
    )]
    UnsupportedScheme(String),
    #[error("invalid database URL: {0}")]
    BadUrl(String),
    #[error("connection refused at {0}: is PostgreSQL running there? (check --database-url)")]
    Refused(String),
    #[error(
        "database \"{db}\" does not exist on {at}: create it (createdb {db}, or CREATE \
         DATABASE {db}), or fix --database-url"
    )]
    NoDatabase { db: String, at: String },
    #[error(
        "PostgreSQL at {at} refused user \"{user}\": {message} (check the user and password in \
         --database-url, and pg_hba.conf)"
    )]
    AuthRefused {
        at: String,
        user: String,
        message: String,
    },
    #[error(
        "no answer from PostgreSQL at {at} within {timeout:?} (check --database-url and the network)"
    )]
    Timeout { at: String, timeout: Duration },
    #[error("connecting to PostgreSQL at {at}: {cause}")]
    Connect { at: String, cause: String },
    #[error("{}", with_cause(.0))]
    Store(#[from] StoreError),
}

/// A [`StoreError`] with the cause it keeps for logs.
fn with_cause(e: &StoreError) -> String {
    match e {
        StoreError::Unavailable(c) | StoreError::Internal(c) | StoreError::CommitUnknown(c) => {
            format!("{e}: {c}")
        }
        _ => e.to_string(),
    }
}

impl OpenError {
    /// Names the cause of a failed first connection to PostgreSQL.
    fn from_pg(e: sqlx::Error, options: &PgConnectOptions) -> OpenError {
        let at = format!("{}:{}", options.get_host(), options.get_port());
        match &e {
            sqlx::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                OpenError::Refused(at)
            }
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // invalid_catalog_name
                Some("3D000") => OpenError::NoDatabase {
                    db: options.get_database().unwrap_or_default().to_owned(),
                    at,
                },
                // invalid_password, invalid_authorization_specification
                Some("28P01" | "28000") => OpenError::AuthRefused {
                    at,
                    user: options.get_username().to_owned(),
                    message: db.message().to_owned(),
                },
                _ => OpenError::Connect {
                    at,
                    cause: e.to_string(),
                },
            },
            _ => OpenError::Connect {
                at,
                cause: e.to_string(),
            },
        }
    }
}

/// A foreign key given as `{unique_field: value}` that matched no `entity`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnresolvedForeignKey {
    /// The foreign field of the written entity (`service`).
    pub field: String,
    /// The unique field of the referenced entity it was given by (`name`).
    pub unique_field: String,
    pub value: Value,
    /// The referenced entity type (`services`).
    pub entity: String,
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> StoreError {
        if is_unavailable(&e) {
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Internal(e.to_string())
        }
    }
}

impl From<anyhow::Error> for StoreError {
    fn from(e: anyhow::Error) -> StoreError {
        StoreError::Internal(format!("{e:#}"))
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => is_unavailable_code(&db.code().unwrap_or_default()),
        _ => false,
    }
}

/// A database error code that means the database cannot serve now: SQLite busy/locked past the
/// busy timeout; PostgreSQL shutting down or not accepting.
fn is_unavailable_code(code: &str) -> bool {
    matches!(
        code,
        "5" | "6" | "517" | "57P01" | "57P02" | "57P03" | "53300" | "08006" | "08003" | "08001"
    )
}

impl StoreError {
    /// What `From<sqlx::Error>` makes of a database error with this code and message, for an
    /// error the database reported as data rather than as a failed statement.
    fn from_database(code: &str, message: &str) -> StoreError {
        let text = format!("error returned from database: {message}");
        if is_unavailable_code(code) {
            StoreError::Unavailable(text)
        } else {
            StoreError::Internal(text)
        }
    }
}

/// Lua-table style rendering used in Kong's messages: `{name="x",port=80}`.
pub fn kong_pretty(m: &serde_json::Map<String, Value>) -> String {
    fn one(v: &Value) -> String {
        match v {
            Value::Null => "null".into(),
            Value::String(s) => format!("{s:?}"),
            Value::Object(m) => kong_pretty(m),
            Value::Array(a) => format!("{{{}}}", a.iter().map(one).collect::<Vec<_>>().join(",")),
            other => other.to_string(),
        }
    }
    let parts: Vec<String> = m.iter().map(|(k, v)| format!("{k}={}", one(v))).collect();
    format!("{{{}}}", parts.join(","))
}

/// The control plane's store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    registry: Arc<Registry>,
    options: StoreOptions,
    /// Latest version committed through this store (other CPs' commits arrive via `observe`).
    head_tx: watch::Sender<i64>,
    default_ws: std::sync::OnceLock<String>,
    /// The connection write transactions run on, kept between them (`write::WriteSlot`).
    write_slot: tokio::sync::Mutex<write::WriteSlot>,
    /// The versions this store's own write transactions committed most recently, as they
    /// were written to the change log ([`Store::committed_after`]).
    committed: std::sync::Mutex<Committed>,
}

/// The deltas of one version in the change log's wire form ([`DeltaText`]).
#[derive(Debug)]
pub struct VersionDeltas {
    pub version: i64,
    pub deltas: DeltaText,
    /// A delta of the version is a plugin ([`schema::PLUGINS`](crate::schema::PLUGINS)): the
    /// plugins the configuration uses may have changed.
    pub plugins: bool,
}

impl VersionDeltas {
    pub fn new(version: i64) -> VersionDeltas {
        VersionDeltas {
            version,
            deltas: DeltaText::new(),
            plugins: false,
        }
    }

    /// Appends one delta of the version.
    pub fn push(&mut self, d: &RawDelta<'_>) {
        self.plugins |= d.entity_type == crate::schema::PLUGINS;
        self.deltas.push(d);
    }
}

/// The last versions committed by this store, contiguous, with the epoch the transaction
/// read them under. Bounded: [`COMMITTED_KEEP`] versions of at most
/// [`COMMITTED_MAX_DELTAS`] deltas each.
#[derive(Default)]
struct Committed {
    epoch: Option<Arc<str>>,
    versions: std::collections::VecDeque<Arc<VersionDeltas>>,
}

/// Most versions kept for [`Store::committed_after`].
const COMMITTED_KEEP: usize = 64;
/// A version with more deltas is not kept (a bulk change: readers go to the database).
pub const COMMITTED_MAX_DELTAS: usize = 4096;

fn migrations(backend: &Backend) -> sqlx::migrate::Migrator {
    use sqlx::migrate::{Migration, MigrationType, Migrator};
    let files: &[(i64, &str, &'static str)] = match backend {
        Backend::Sqlite => &[
            (
                1,
                "init",
                include_str!("../../../migrations/sqlite/0001_init.sql"),
            ),
            (
                2,
                "data_planes",
                include_str!("../../../migrations/sqlite/0002_data_planes.sql"),
            ),
            (
                3,
                "data_plane_status",
                include_str!("../../../migrations/sqlite/0003_data_plane_status.sql"),
            ),
            (
                4,
                "cluster_certs",
                include_str!("../../../migrations/sqlite/0004_cluster_certs.sql"),
            ),
        ],
        Backend::Postgres => &[
            (
                1,
                "init",
                include_str!("../../../migrations/postgres/0001_init.sql"),
            ),
            (
                2,
                "data_planes",
                include_str!("../../../migrations/postgres/0002_data_planes.sql"),
            ),
            (
                3,
                "data_plane_status",
                include_str!("../../../migrations/postgres/0003_data_plane_status.sql"),
            ),
            (
                4,
                "cluster_certs",
                include_str!("../../../migrations/postgres/0004_cluster_certs.sql"),
            ),
            (
                5,
                "apply_creates",
                include_str!("../../../migrations/postgres/0005_apply_creates.sql"),
            ),
        ],
    };
    Migrator::with_migrations(
        files
            .iter()
            .map(|(v, d, sql)| {
                Migration::new(
                    *v,
                    (*d).into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

impl Store {
    /// Connects, applies pending migrations, and makes sure the change log exists (the default
    /// workspace is version 1).
    pub async fn open(options: StoreOptions) -> Result<Store, OpenError> {
        let store = Store::connect(options).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Connects without migrating.
    pub async fn connect(options: StoreOptions) -> Result<Store, OpenError> {
        let scheme = options.url.split_once(':').map_or("", |(s, _)| s);
        let pool = match scheme {
            "postgres" | "postgresql" => {
                let connect = PgConnectOptions::from_str(&options.url)
                    .map_err(|e| OpenError::BadUrl(e.to_string()))?;
                // One connection first, to name the cause of a failure (the pool would only
                // say that it timed out).
                let at = format!("{}:{}", connect.get_host(), connect.get_port());
                use sqlx::Connection as _;
                match tokio::time::timeout(
                    options.acquire_timeout,
                    sqlx::PgConnection::connect_with(&connect),
                )
                .await
                {
                    Err(_) => {
                        return Err(OpenError::Timeout {
                            at,
                            timeout: options.acquire_timeout,
                        });
                    }
                    Ok(Err(e)) => return Err(OpenError::from_pg(e, &connect)),
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                    }
                }
                Pool::Postgres(
                    PgPoolOptions::new()
                        .max_connections(options.max_connections)
                        .acquire_timeout(options.acquire_timeout)
                        .connect_with(connect)
                        .await
                        .map_err(StoreError::from)?,
                )
            }
            "sqlite" => {
                let connect = SqliteConnectOptions::from_str(&options.url)
                    .map_err(|e| OpenError::BadUrl(e.to_string()))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(if options.sqlite_synchronous_full {
                        SqliteSynchronous::Full
                    } else {
                        SqliteSynchronous::Normal
                    })
                    .foreign_keys(false)
                    .busy_timeout(options.acquire_timeout);
                Pool::Sqlite(
                    SqlitePoolOptions::new()
                        .max_connections(options.max_connections)
                        .acquire_timeout(options.acquire_timeout)
                        .connect_with(connect)
                        .await
                        .map_err(StoreError::from)?,
                )
            }
            other => return Err(OpenError::UnsupportedScheme(other.to_owned())),
        };
        let (head_tx, _) = watch::channel(0);
        Ok(Store {
            inner: Arc::new(Inner {
                pool,
                registry: Registry::builtin().clone(),
                options,
                head_tx,
                default_ws: std::sync::OnceLock::new(),
                write_slot: Default::default(),
                committed: Default::default(),
            }),
        })
    }

    pub fn backend(&self) -> Backend {
        match &self.inner.pool {
            Pool::Sqlite(_) => Backend::Sqlite,
            Pool::Postgres(_) => Backend::Postgres,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.inner.pool
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.inner.registry
    }

    /// Applies migrations and creates the change log's first version (the default workspace)
    /// when the database is new. Safe to run concurrently from several control planes.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let migrator = migrations(&self.backend());
        on_backend!(&self.inner.pool, p => migrator.run(p).await.map_err(|e| StoreError::Internal(e.to_string()))?);
        self.bootstrap().await?;
        let info = self.version_info().await?;
        self.inner.head_tx.send_replace(info.version);
        Ok(())
    }

    async fn bootstrap(&self) -> Result<(), StoreError> {
        let epoch = uuid::Uuid::new_v4().to_string();
        let now = now_secs();
        on_backend!(&self.inner.pool, p => {
            sqlx::query("INSERT INTO dp_meta (id, version, epoch, state_hash, created_at) VALUES (1, 0, $1, $2, $3) ON CONFLICT (id) DO NOTHING")
                .bind(&epoch)
                .bind(StateHash::ZERO.to_hex())
                .bind(now)
                .execute(p)
                .await?;
        });
        let ws = self.default_workspace_id().await?;
        if ws.is_none() {
            let outcome = self
                .write_batch(vec![Op::Create {
                    entity: crate::schema::WORKSPACES.into(),
                    input: serde_json::json!({"name": "default", "config": {}, "meta": {}}),
                    scope: None,
                }])
                .await;
            if let Some(Err(e)) = outcome.into_iter().next() {
                // Another control plane created it first: fine.
                if !matches!(e, StoreError::Unique(_)) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// The id of the `default` workspace, cached after the first successful read.
    pub async fn default_workspace_id(&self) -> Result<Option<String>, StoreError> {
        if let Some(ws) = self.inner.default_ws.get() {
            return Ok(Some(ws.clone()));
        }
        let id: Option<String> = on_backend!(&self.inner.pool, p => {
            sqlx::query_scalar("SELECT id FROM dp_keys WHERE type = 'workspaces' AND name = 'name' AND value = $1")
                .bind("\"default\"")
                .fetch_optional(p)
                .await?
        });
        if let Some(id) = &id {
            let _ = self.inner.default_ws.set(id.clone());
        }
        Ok(id)
    }

    pub(crate) async fn ws(&self) -> Result<String, StoreError> {
        self.default_workspace_id()
            .await?
            .ok_or_else(|| StoreError::Internal("default workspace missing".into()))
    }

    /// A receiver of the latest version known to be committed.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.head_tx.subscribe()
    }

    /// Records the versions a write transaction of this store has just committed (before the
    /// head moves), contiguous and in order, read under `epoch`; `None` for a version not
    /// kept (a bulk change). Anything that does not continue what is kept replaces it.
    pub(super) fn record_committed(&self, epoch: &str, versions: Vec<Option<VersionDeltas>>) {
        let mut c = self
            .inner
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if c.epoch.as_deref() != Some(epoch) {
            c.versions.clear();
            c.epoch = Some(epoch.into());
        }
        for v in versions {
            let Some(v) = v else {
                // A gap from here on: keep nothing before it.
                c.versions.clear();
                continue;
            };
            if c.versions
                .back()
                .is_some_and(|l| l.version + 1 != v.version)
            {
                c.versions.clear();
            }
            c.versions.push_back(Arc::new(v));
        }
        while c.versions.len() > COMMITTED_KEEP {
            c.versions.pop_front();
        }
    }

    /// Versions `after+1 ..= upto` exactly as this store's own transactions wrote them to the
    /// change log of `epoch`, if every one of them was committed here and is still kept;
    /// `None` otherwise (then read the change log). Cheaper than a read, and ready as soon as
    /// the commit returns.
    pub fn committed_after(
        &self,
        epoch: &str,
        after: i64,
        upto: i64,
    ) -> Option<Vec<Arc<VersionDeltas>>> {
        let c = self
            .inner
            .committed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if c.epoch.as_deref() != Some(epoch) || upto <= after {
            return None;
        }
        let first = c.versions.front()?.version;
        let last = c.versions.back()?.version;
        if after + 1 < first || upto > last {
            return None;
        }
        let skip = (after + 1 - first) as usize;
        Some(
            c.versions
                .iter()
                .skip(skip)
                .take((upto - after) as usize)
                .cloned()
                .collect(),
        )
    }

    /// True when every version `after+1 ..= upto` of `epoch` was committed by this store and
    /// is still kept ([`Store::committed_after`]), and none of them changed a plugin: the
    /// plugins in use at `upto` are those at `after`. False when that is not known.
    pub fn plugins_unchanged(&self, epoch: &str, after: i64, upto: i64) -> bool {
        upto == after
            || self
                .committed_after(epoch, after, upto)
                .is_some_and(|vs| vs.iter().all(|v| !v.plugins))
    }

    /// Records that `version` is committed (by this store, or seen through another control
    /// plane's notification).
    pub fn observe(&self, version: i64) {
        self.inner.head_tx.send_if_modified(|v| {
            if version > *v {
                *v = version;
                true
            } else {
                false
            }
        });
    }

    pub async fn close(&self) {
        // The pool's close waits for every lent connection, the kept write connection too.
        self.inner.write_slot.lock().await.discard();
        on_backend!(&self.inner.pool, p => p.close().await);
    }
}
