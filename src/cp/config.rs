//! `deltaplane-cp` settings: flags, `DELTAPLANE_*` environment variables and an optional TOML
//! file, with precedence flag > environment > file > default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::net::tls::MtlsMode;
use crate::schema::KONG_COMPAT_VERSION;
use crate::settings::{
    CLUSTER_KEYS, ClusterSettings, CpClusterArgs, Layer, parse_duration, split_list,
};

#[derive(Debug, Parser)]
#[command(
    name = "deltaplane-cp",
    version,
    about = "deltaplane control plane: Kong-compatible Admin API and change log"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the Admin API (migrating the database first)
    Serve(ServeArgs),
    /// Apply database migrations and exit
    Migrate(ServeArgs),
    /// Cluster certificates
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Show the control plane's sync version and its data planes (calls /rpc)
    Status(StatusArgs),
    /// Declarative files (Kong's `_format_version`): import, export, validate
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Make a file the whole configuration (one version), through the running control
    /// plane's Admin API (`POST /config`), or the database when no control plane runs
    Import {
        /// The file (YAML or JSON), or `-` for standard input
        file: String,
        /// Upsert only, never delete (Kong's `kong config db_import`)
        #[arg(long)]
        upsert: bool,
        /// Print the difference without writing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        target: ConfigTarget,
    },
    /// Write the configuration as a file (Kong's `db_export`; `--nested`: decK's shape)
    Export {
        /// Output file; standard output when absent
        file: Option<PathBuf>,
        /// yaml or json
        #[arg(long, default_value = "yaml")]
        format: String,
        /// Children nested under their parents (decK)
        #[arg(long)]
        nested: bool,
        /// Overwrite an existing file
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        target: ConfigTarget,
    },
    /// Check a file and print its problems with line numbers (Kong's `kong config parse`)
    Validate {
        /// The file (YAML or JSON), or `-` for standard input
        file: String,
    },
}

/// Where `config import` / `export` find the configuration: the Admin API at `--admin-url`
/// (default: the `--admin-listen` address the control plane's settings give), or, when
/// nothing answers there, the database those settings name.
#[derive(Debug, Args, Clone)]
pub struct ConfigTarget {
    /// The running control plane's Admin API [default: http://<admin-listen>]
    #[arg(long, env = "DELTAPLANE_ADMIN_URL")]
    pub admin_url: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a shared-mode cluster certificate (CN and SAN `kong_clustering`) and its key
    Generate {
        /// Directory for cluster.crt and cluster.key
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// The operator JSON-RPC endpoint
    #[arg(
        long,
        env = "DELTAPLANE_RPC",
        default_value = "http://127.0.0.1:8001/rpc"
    )]
    pub rpc: String,
    /// Bearer token for the Admin API listener
    #[arg(long, env = "DELTAPLANE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Print JSON instead of a summary
    #[arg(long)]
    pub json: bool,
}

/// Every flag can also be set as `DELTAPLANE_<FLAG>` (upper case, `-` → `_`; lists
/// comma-separated) or as a key named like the flag in the `--config` TOML file.
#[derive(Debug, Args, Default, Clone)]
pub struct ServeArgs {
    /// TOML file whose keys are flag names (e.g. `admin-listen = "127.0.0.1:8001"`)
    #[arg(long, env = "DELTAPLANE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the embedded SQLite database and node files [default: ./deltaplane-cp]
    #[arg(long, env = "DELTAPLANE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://user@host:port/db); SQLite under --data-dir when unset
    #[arg(long, env = "DELTAPLANE_DATABASE_URL")]
    pub database_url: Option<String>,
    /// How long a request waits for a database connection before failing with 503 [default: 3s]
    #[arg(long, env = "DELTAPLANE_DATABASE_TIMEOUT")]
    pub database_timeout: Option<String>,
    /// SQLite durability: `full` survives power loss, `normal` (WAL) only process crashes [default: full]
    #[arg(long, env = "DELTAPLANE_SQLITE_SYNCHRONOUS")]
    pub sqlite_synchronous: Option<String>,
    /// Admin API listen address [default: 127.0.0.1:8001]
    #[arg(long, env = "DELTAPLANE_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Token required on every Admin API request, as `Authorization: Bearer` or
    /// `Kong-Admin-Token` (required for non-loopback binds)
    #[arg(long, env = "DELTAPLANE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// Allow a non-loopback Admin API bind without --admin-token [default: false]
    #[arg(long, env = "DELTAPLANE_ADMIN_INSECURE", num_args = 0..=1, default_missing_value = "true")]
    pub admin_insecure: Option<bool>,
    /// Largest accepted Admin API request body in bytes [default: 4194304]
    #[arg(long, env = "DELTAPLANE_ADMIN_BODY_LIMIT")]
    pub admin_body_limit: Option<usize>,
    /// Largest accepted `POST /config` body (a declarative file) in bytes [default: 67108864]
    #[arg(long, env = "DELTAPLANE_ADMIN_CONFIG_MAX_BODY")]
    pub admin_config_max_body: Option<usize>,
    /// Keep change-log versions at least this long (e.g. 24h, 7d) [default: 24h]
    #[arg(long, env = "DELTAPLANE_CHANGELOG_RETENTION_AGE")]
    pub changelog_retention_age: Option<String>,
    /// Keep at least this many change-log versions behind the head [default: 100000]
    #[arg(long, env = "DELTAPLANE_CHANGELOG_RETENTION_VERSIONS")]
    pub changelog_retention_versions: Option<i64>,
    /// How often the change-log purge runs [default: 60s]
    #[arg(long, env = "DELTAPLANE_CHANGELOG_PURGE_INTERVAL")]
    pub changelog_purge_interval: Option<String>,
    /// The Kong version this control plane follows and reports [default: 3.10.0]
    #[arg(long, env = "DELTAPLANE_KONG_COMPAT_VERSION")]
    pub kong_compat_version: Option<String>,
    /// Most Admin API writes committed together in one transaction [default: 256]
    #[arg(long, env = "DELTAPLANE_MAX_WRITE_BATCH")]
    pub max_write_batch: Option<usize>,
    /// Cluster listener for data planes, TLS only [default: 127.0.0.1:8005]
    #[arg(long, env = "DELTAPLANE_CLUSTER_LISTEN")]
    pub cluster_listen: Option<String>,
    #[command(flatten)]
    pub cluster: CpClusterArgs,
    /// Common names / SANs allowed for data-plane certificates (pki mode; comma-separated)
    #[arg(
        long,
        env = "DELTAPLANE_CLUSTER_ALLOWED_COMMON_NAMES",
        value_delimiter = ','
    )]
    pub cluster_allowed_common_names: Option<Vec<String>>,
    /// Offer sync v2 in the hello (Kong's cluster_rpc_sync); off, data planes use v1 [default: true]
    #[arg(long, env = "DELTAPLANE_CLUSTER_SYNC_V2", num_args = 0..=1, default_missing_value = "true")]
    pub cluster_sync_v2: Option<bool>,
    /// Serve /v2/outlet at all (Kong's cluster_rpc); off, only /v1/outlet [default: true]
    #[arg(long, env = "DELTAPLANE_CLUSTER_RPC", num_args = 0..=1, default_missing_value = "true")]
    pub cluster_rpc: Option<bool>,
    /// Sync v1: push the first change at once, then at most one push per this interval [default: 1s]
    #[arg(long, env = "DELTAPLANE_CLUSTER_PUSH_INTERVAL")]
    pub cluster_push_interval: Option<String>,
    /// Plugins this control plane accepts (Kong's `plugins`): `bundled` (every plugin bundled
    /// with Kong), `off` (none) and plugin names, comma-separated; any other plugin is refused
    /// [default: bundled]
    #[arg(long, env = "DELTAPLANE_PLUGINS", value_delimiter = ',')]
    pub plugins: Option<Vec<String>>,
    /// Bytes of recent versions' deltas kept in memory to answer data planes without a
    /// database read (0: off) [default: 67108864]
    #[arg(long, env = "DELTAPLANE_CLUSTER_DELTA_CACHE_SIZE")]
    pub cluster_delta_cache_size: Option<usize>,
    /// New data-plane connections admitted per second, so a reconnecting fleet's TLS
    /// handshakes do not starve the connected ones (0: unlimited) [default: 1000]
    #[arg(long, env = "DELTAPLANE_CLUSTER_HANDSHAKE_RATE")]
    pub cluster_handshake_rate: Option<u32>,
    /// Forget a data plane not seen for this long (at least 60s) [default: 14d]
    #[arg(long, env = "DELTAPLANE_CLUSTER_DATA_PLANE_PURGE_DELAY")]
    pub cluster_data_plane_purge_delay: Option<String>,
}

/// Resolved control-plane settings.
#[derive(Debug, Clone)]
pub struct CpConfig {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub database_timeout: Duration,
    pub sqlite_synchronous_full: bool,
    pub admin_listen: SocketAddr,
    pub admin_token: Option<String>,
    pub admin_insecure: bool,
    pub body_limit: usize,
    /// Largest `POST /config` body (`--admin-config-max-body`).
    pub config_body_limit: usize,
    pub changelog_retention_age: Duration,
    pub changelog_retention_versions: i64,
    pub purge_interval: Duration,
    pub kong_compat_version: String,
    pub max_batch: usize,
    pub cluster_listen: SocketAddr,
    pub cluster: ClusterSettings,
    /// `None`: use (or generate) `cluster.crt` / `cluster.key` in the data dir.
    pub cluster_cert: Option<(String, String)>,
    pub cluster_mtls: MtlsMode,
    pub cluster_ca_cert: Option<String>,
    pub cluster_allowed_common_names: Vec<String>,
    /// Data-plane status rows expire after this long without news (Kong's
    /// `cluster_data_plane_purge_delay`).
    pub data_plane_purge_delay: Duration,
    /// Kong's `plugins` setting as given (`bundled`, `off`, names); see [`CpConfig::enabled_plugins`].
    pub plugins: Vec<String>,
}

impl CpConfig {
    /// Defaults for everything, data under `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> CpConfig {
        CpConfig {
            data_dir: data_dir.into(),
            database_url: None,
            database_timeout: Duration::from_secs(3),
            sqlite_synchronous_full: true,
            admin_listen: "127.0.0.1:8001".parse().expect("valid address"),
            admin_token: None,
            admin_insecure: false,
            body_limit: 4 * 1024 * 1024,
            config_body_limit: 64 * 1024 * 1024,
            changelog_retention_age: Duration::from_secs(24 * 3600),
            changelog_retention_versions: 100_000,
            purge_interval: Duration::from_secs(60),
            kong_compat_version: KONG_COMPAT_VERSION.to_owned(),
            max_batch: 256,
            cluster_listen: "127.0.0.1:8005".parse().expect("valid address"),
            cluster: ClusterSettings::default(),
            cluster_cert: None,
            cluster_mtls: MtlsMode::Shared,
            cluster_ca_cert: None,
            cluster_allowed_common_names: Vec::new(),
            data_plane_purge_delay: Duration::from_secs(14 * 86400),
            plugins: vec!["bundled".into()],
        }
    }

    /// Resolves flags (already merged with the environment by clap) over the TOML file over defaults.
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<CpConfig> {
        let file = Layer::read_file(args.config.as_deref(), &[KNOWN_KEYS, CLUSTER_KEYS].concat())?;
        let layer = Layer { file: &file };
        let mut cfg = CpConfig::new(
            layer
                .get(args.data_dir.clone(), "data-dir")?
                .unwrap_or_else(super::default_data_dir),
        );
        cfg.database_url = layer.get(args.database_url.clone(), "database-url")?;
        if let Some(t) = layer.get(args.database_timeout.clone(), "database-timeout")? {
            cfg.database_timeout = parse_duration(&t).map_err(anyhow::Error::msg)?;
        }
        if let Some(s) = layer.get(args.sqlite_synchronous.clone(), "sqlite-synchronous")? {
            cfg.sqlite_synchronous_full = match s.to_ascii_lowercase().as_str() {
                "full" => true,
                "normal" => false,
                other => {
                    anyhow::bail!("--sqlite-synchronous must be full or normal, not '{other}'")
                }
            };
        }
        if let Some(a) = layer.get(args.admin_listen.clone(), "admin-listen")? {
            cfg.admin_listen = a
                .parse()
                .with_context(|| format!("invalid --admin-listen '{a}'"))?;
        }
        cfg.admin_token = layer
            .get(args.admin_token.clone(), "admin-token")?
            .filter(|t| !t.is_empty());
        cfg.admin_insecure = layer
            .get(args.admin_insecure, "admin-insecure")?
            .unwrap_or(false);
        if let Some(n) = layer.get(args.admin_body_limit, "admin-body-limit")? {
            cfg.body_limit = n;
        }
        if let Some(n) = layer.get(args.admin_config_max_body, "admin-config-max-body")? {
            cfg.config_body_limit = n;
        }
        if let Some(a) = layer.get(
            args.changelog_retention_age.clone(),
            "changelog-retention-age",
        )? {
            cfg.changelog_retention_age = parse_duration(&a).map_err(anyhow::Error::msg)?;
        }
        if let Some(n) = layer.get(
            args.changelog_retention_versions,
            "changelog-retention-versions",
        )? {
            anyhow::ensure!(
                n >= 0,
                "--changelog-retention-versions must not be negative"
            );
            cfg.changelog_retention_versions = n;
        }
        if let Some(a) = layer.get(
            args.changelog_purge_interval.clone(),
            "changelog-purge-interval",
        )? {
            cfg.purge_interval = parse_duration(&a).map_err(anyhow::Error::msg)?;
        }
        if let Some(v) = layer.get(args.kong_compat_version.clone(), "kong-compat-version")? {
            cfg.kong_compat_version = v;
        }
        if let Some(n) = layer.get(args.max_write_batch, "max-write-batch")? {
            anyhow::ensure!(n >= 1, "--max-write-batch must be at least 1");
            cfg.max_batch = n;
        }
        if let Some(a) = layer.get(args.cluster_listen.clone(), "cluster-listen")? {
            cfg.cluster_listen = a
                .parse()
                .with_context(|| format!("invalid --cluster-listen '{a}'"))?;
        }
        let link = args.cluster.flags().resolve(&layer, &mut cfg.cluster)?;
        cfg.cluster_cert = match (link.cert, link.key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => anyhow::bail!("--cluster-cert and --cluster-cert-key go together"),
        };
        cfg.cluster_mtls = link.mtls;
        cfg.cluster_ca_cert = link.ca_cert;
        if let Some(names) = layer.get(
            args.cluster_allowed_common_names
                .clone()
                .map(|v| v.join(",")),
            "cluster-allowed-common-names",
        )? {
            cfg.cluster_allowed_common_names = split_list(&names);
        }
        if let Some(b) = layer.get(args.cluster_sync_v2, "cluster-sync-v2")? {
            cfg.cluster.sync_v2 = b;
        }
        if let Some(b) = layer.get(args.cluster_rpc, "cluster-rpc")? {
            cfg.cluster.rpc = b;
        }
        if let Some(d) = layer.get(args.cluster_push_interval.clone(), "cluster-push-interval")? {
            cfg.cluster.push_interval = parse_duration(&d).map_err(anyhow::Error::msg)?;
        }
        if let Some(n) = layer.get(args.cluster_delta_cache_size, "cluster-delta-cache-size")? {
            cfg.cluster.delta_cache_bytes = n;
        }
        if let Some(n) = layer.get(args.cluster_handshake_rate, "cluster-handshake-rate")? {
            cfg.cluster.handshake_rate = n;
        }
        if let Some(d) = layer.get(
            args.cluster_data_plane_purge_delay.clone(),
            "cluster-data-plane-purge-delay",
        )? {
            let d = parse_duration(&d).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                d >= Duration::from_secs(60),
                "--cluster-data-plane-purge-delay must be at least 60s"
            );
            cfg.data_plane_purge_delay = d;
        }
        if let Some(p) = layer.get(args.plugins.clone().map(|v| v.join(",")), "plugins")? {
            cfg.plugins = split_list(&p);
        }
        cfg.enabled_plugins(crate::schema::Registry::builtin())?;
        Ok(cfg)
    }

    /// The plugins this control plane accepts, from `plugins` as Kong's `conf_loader` reads it:
    /// `bundled` adds every bundled plugin, `off` alone enables none, and a name must be a
    /// plugin this build has a schema for.
    pub fn enabled_plugins(
        &self,
        registry: &crate::schema::Registry,
    ) -> anyhow::Result<std::collections::BTreeSet<String>> {
        let mut enabled = std::collections::BTreeSet::new();
        for item in &self.plugins {
            match item.as_str() {
                "off" => {}
                "bundled" => enabled.extend(
                    crate::schema::BUNDLED_PLUGINS
                        .iter()
                        .filter(|p| registry.plugin(p).is_some())
                        .map(|p| p.to_string()),
                ),
                name if registry.plugin(name).is_some() => {
                    enabled.insert(name.to_owned());
                }
                name => anyhow::bail!(
                    "--plugins: '{name}' is not a plugin deltaplane has a schema for (use \
                     bundled, off, or names from GET /schemas/plugins)"
                ),
            }
        }
        anyhow::ensure!(
            !self.plugins.iter().any(|p| p == "off") || self.plugins.len() == 1,
            "--plugins: 'off' cannot be combined with other values"
        );
        Ok(enabled)
    }

    /// The Admin API may only listen beyond loopback with a token, or when told it is fine.
    pub fn check_admin_exposure(&self) -> anyhow::Result<()> {
        if !self.admin_listen.ip().is_loopback()
            && self.admin_token.is_none()
            && !self.admin_insecure
        {
            anyhow::bail!(
                "refusing to serve the Admin API on non-loopback address {} without --admin-token \
                 (or --admin-insecure to accept the risk)",
                self.admin_listen
            );
        }
        Ok(())
    }
}

const KNOWN_KEYS: &[&str] = &[
    "data-dir",
    "database-url",
    "database-timeout",
    "sqlite-synchronous",
    "admin-listen",
    "admin-token",
    "admin-insecure",
    "admin-config-max-body",
    "admin-body-limit",
    "changelog-retention-age",
    "changelog-retention-versions",
    "changelog-purge-interval",
    "kong-compat-version",
    "max-write-batch",
    "cluster-listen",
    "cluster-allowed-common-names",
    "cluster-data-plane-purge-delay",
    "cluster-sync-v2",
    "cluster-rpc",
    "cluster-push-interval",
    "cluster-delta-cache-size",
    "cluster-handshake-rate",
    "plugins",
];
