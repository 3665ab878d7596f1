//! `deltaplane-dp` settings: flags, `DELTAPLANE_DP_*` environment variables and an optional TOML
//! file, with precedence flag > environment > file > default (as for the control plane).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::net::tls::MtlsMode;
use crate::schema::KONG_COMPAT_VERSION;
use crate::settings::parse_duration;
use crate::settings::{CLUSTER_KEYS, ClusterSettings, DpClusterArgs, Layer, split_list};

#[derive(Debug, Parser)]
#[command(
    name = "deltaplane-dp",
    version,
    about = "deltaplane data plane: follows a control plane's change log into a local redb store"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Connect to the control plane(s), sync, and serve the status listener
    Run(Box<RunArgs>),
    /// Show the data plane's sync version (calls /rpc on the status listener)
    Status(StatusArgs),
}

#[derive(Debug, Args, Clone)]
pub struct StatusArgs {
    /// The data plane's operator JSON-RPC endpoint
    #[arg(
        long,
        env = "DELTAPLANE_DP_RPC",
        default_value = "http://127.0.0.1:8100/rpc"
    )]
    pub rpc: String,
    /// Print JSON instead of a summary
    #[arg(long)]
    pub json: bool,
}

/// Every flag can also be set as `DELTAPLANE_DP_<FLAG>` or as a key named like the flag in the
/// `--config` TOML file.
#[derive(Debug, Args, Default, Clone)]
pub struct RunArgs {
    /// TOML file whose keys are flag names
    #[arg(long, env = "DELTAPLANE_DP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control plane cluster address(es), host:port; repeat or comma-separate for failover
    /// [default: 127.0.0.1:8005]
    #[arg(
        long,
        env = "DELTAPLANE_DP_CLUSTER_CONTROL_PLANE",
        value_delimiter = ','
    )]
    pub cluster_control_plane: Option<Vec<String>>,
    /// Directory for the redb store and the node id [default: ./deltaplane-dp]
    #[arg(long, env = "DELTAPLANE_DP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Status listener (GET /status, /status/ready, /rpc) [default: 127.0.0.1:8100]
    #[arg(long, env = "DELTAPLANE_DP_STATUS_LISTEN")]
    pub status_listen: Option<String>,
    /// The Kong version announced to the control plane [default: 3.10.0]
    #[arg(long, env = "DELTAPLANE_DP_KONG_COMPAT_VERSION")]
    pub kong_compat_version: Option<String>,
    /// Labels, `key:value` comma-separated
    #[arg(long, env = "DELTAPLANE_DP_CLUSTER_DP_LABELS", value_delimiter = ',')]
    pub cluster_dp_labels: Option<Vec<String>>,
    #[command(flatten)]
    pub cluster: DpClusterArgs,
    /// Name the control plane's certificate must carry (pki mode) [default: the host]
    #[arg(long, env = "DELTAPLANE_DP_CLUSTER_SERVER_NAME")]
    pub cluster_server_name: Option<String>,
    /// Safety poll: ask the control plane for changes this often even without a notification
    /// [default: 30s]
    #[arg(long, env = "DELTAPLANE_DP_SYNC_POLL_INTERVAL")]
    pub sync_poll_interval: Option<String>,
    /// After applying pushed versions, report where this data plane is to the control plane
    /// at most this often (the latest version is reported once the interval has passed); 0
    /// reports after every apply. Each report costs the control plane a read per data plane;
    /// its fleet view lags by up to this much after a burst of versions. Kong's data planes
    /// ping after an apply at their next 1 s tick [default: 1s]
    #[arg(long, env = "DELTAPLANE_DP_STATUS_REPORT_INTERVAL")]
    pub status_report_interval: Option<String>,
    /// Plugins this data plane runs (Kong's `plugins`), comma-separated `name` or
    /// `name:version`; announced so the control plane withholds configurations using others
    /// [default: every plugin deltaplane knows]
    #[arg(long, env = "DELTAPLANE_DP_PLUGINS", value_delimiter = ',')]
    pub plugins: Option<Vec<String>>,
    /// Sync protocol: `auto` (v2 when the control plane offers it, else v1), `v2` or `v1`
    /// [default: auto]
    #[arg(long, env = "DELTAPLANE_DP_SYNC")]
    pub sync: Option<SyncMode>,
    /// Commit every applied version durably (fsync) [default: true]
    #[arg(long, env = "DELTAPLANE_DP_DURABLE", num_args = 0..=1, default_missing_value = "true")]
    pub durable: Option<bool>,
    /// The proxy's plain HTTP listener, `host:port` or `off` (a sync-only data plane)
    /// [default: 127.0.0.1:8000]
    #[arg(long, env = "DELTAPLANE_DP_PROXY_LISTEN")]
    pub proxy_listen: Option<String>,
    /// The proxy's TLS listener (certificates by SNI from the configuration), `host:port` or
    /// `off` [default: off]
    #[arg(long, env = "DELTAPLANE_DP_PROXY_LISTEN_TLS")]
    pub proxy_listen_tls: Option<String>,
    /// Addresses or CIDR networks whose X-Forwarded-* headers the proxy trusts
    /// (Kong's `trusted_ips`), comma-separated [default: none]
    #[arg(long, env = "DELTAPLANE_DP_TRUSTED_IPS", value_delimiter = ',')]
    pub trusted_ips: Option<Vec<String>>,
    /// Run from this declarative file (Kong's DB-less `declarative_config`, YAML or JSON)
    /// instead of following a control plane; re-read on SIGHUP
    #[arg(long, env = "DELTAPLANE_DP_DECLARATIVE_CONFIG")]
    pub declarative_config: Option<PathBuf>,
    /// With --declarative-config: enables `POST /config` on the status listener, guarded by
    /// `Authorization: Bearer <token>` [default: off, no `POST /config`]
    #[arg(long, env = "DELTAPLANE_DP_CONFIG_TOKEN", hide_env_values = true)]
    pub config_token: Option<String>,
    /// Largest `POST /config` body in bytes; larger ones get 413 [default: 67108864]
    #[arg(long, env = "DELTAPLANE_DP_CONFIG_MAX_BODY")]
    pub config_max_body: Option<usize>,
}

/// Resolved data-plane settings.
#[derive(Debug, Clone)]
pub struct DpConfig {
    pub control_planes: Vec<String>,
    pub data_dir: PathBuf,
    pub status_listen: SocketAddr,
    pub kong_compat_version: String,
    pub labels: Vec<String>,
    pub cluster_cert: String,
    pub cluster_cert_key: String,
    pub cluster_mtls: MtlsMode,
    pub cluster_ca_cert: Option<String>,
    pub cluster_server_name: Option<String>,
    pub cluster: ClusterSettings,
    pub sync_poll_interval: Duration,
    /// Pushed versions are reported to the control plane at most this often; zero: after
    /// every apply.
    pub status_report_interval: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// Back-off after a rejected (invalid) batch, or a configuration the control plane
    /// withholds, before asking again; doubles per consecutive failure, up to 64x.
    pub invalid_backoff: Duration,
    pub durable: bool,
    /// `None`: not announced (the CP assumes every plugin it knows).
    pub plugins: Option<Vec<String>>,
    /// Which sync protocol to speak.
    pub sync: SyncMode,
    /// The proxy's listeners; `None` is off. [`DpConfig::new`] leaves both off (tests and
    /// tools start several data planes on one machine); the `run` command's default for
    /// the plain listener is `127.0.0.1:8000`.
    pub proxy_listen: Option<SocketAddr>,
    pub proxy_listen_tls: Option<SocketAddr>,
    /// Kong's `trusted_ips`.
    pub trusted_ips: Vec<crate::dp::proxy::ipnet::IpNet>,
    /// Run from this file instead of a control plane (`control_planes` is then empty).
    pub declarative_config: Option<PathBuf>,
    /// `POST /config` is served (file mode only) when set; requests must carry it as a
    /// bearer token.
    pub config_token: Option<String>,
    /// Largest `POST /config` body.
    pub config_max_body: usize,
    /// File mode: re-read the file on SIGHUP.
    pub reload_on_sighup: bool,
}

/// `--config-max-body`'s default: 64 MiB, as the control plane's `/config`.
pub const DEFAULT_CONFIG_MAX_BODY: usize = 64 << 20;

/// The `run` command's plain proxy listener when none is given: loopback, where Kong listens
/// on `0.0.0.0:8000` (a deliberate safe default, see the README).
pub const DEFAULT_PROXY_LISTEN: &str = "127.0.0.1:8000";

/// `host:port`, or `off`.
fn listen_or_off(flag: &str, v: &str) -> anyhow::Result<Option<SocketAddr>> {
    if v.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .with_context(|| format!("invalid --{flag} '{v}': expected host:port or off"))
}

/// `--sync`: which protocol the data plane speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyncMode {
    /// Sync v2 when the control plane offers it; v1 (`/v1/outlet`) when its hello lacks
    /// `kong.sync.v2` or `/v2/outlet` refuses the upgrade. Re-checked on every reconnect.
    #[default]
    Auto,
    /// Only sync v2 (as Kong's DP: wait while the control plane does not offer it).
    V2,
    /// Only sync v1.
    V1,
}

impl std::str::FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SyncMode, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(SyncMode::Auto),
            "v2" => Ok(SyncMode::V2),
            "v1" => Ok(SyncMode::V1),
            other => Err(format!("--sync must be auto, v2 or v1, not '{other}'")),
        }
    }
}

const KNOWN_KEYS: &[&str] = &[
    "cluster-control-plane",
    "data-dir",
    "status-listen",
    "kong-compat-version",
    "cluster-dp-labels",
    "cluster-server-name",
    "sync-poll-interval",
    "durable",
    "plugins",
    "sync",
    "proxy-listen",
    "proxy-listen-tls",
    "trusted-ips",
    "declarative-config",
    "config-token",
    "config-max-body",
];

impl DpConfig {
    /// Defaults for everything, data under `data_dir`, certificate files given.
    pub fn new(
        data_dir: impl Into<PathBuf>,
        control_plane: impl Into<String>,
        cert: impl Into<String>,
        key: impl Into<String>,
    ) -> DpConfig {
        DpConfig {
            control_planes: vec![control_plane.into()],
            data_dir: data_dir.into(),
            status_listen: "127.0.0.1:8100".parse().expect("valid address"),
            kong_compat_version: KONG_COMPAT_VERSION.to_owned(),
            labels: Vec::new(),
            cluster_cert: cert.into(),
            cluster_cert_key: key.into(),
            cluster_mtls: MtlsMode::Shared,
            cluster_ca_cert: None,
            cluster_server_name: None,
            cluster: ClusterSettings::default(),
            sync_poll_interval: Duration::from_secs(30),
            // Kong's DP (`kong/clustering/data_plane.lua`): after an apply it pings at the
            // write thread's next 1 s tick, one ping for every apply in that second.
            status_report_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(500),
            reconnect_max: Duration::from_secs(30),
            invalid_backoff: Duration::from_secs(5),
            durable: true,
            plugins: None,
            sync: SyncMode::Auto,
            proxy_listen: None,
            proxy_listen_tls: None,
            trusted_ips: Vec::new(),
            declarative_config: None,
            config_token: None,
            config_max_body: DEFAULT_CONFIG_MAX_BODY,
            reload_on_sighup: true,
        }
    }

    /// A data plane that runs from `file` with no control plane (Kong's DB-less mode):
    /// defaults for everything else, data under `data_dir`.
    pub fn declarative(data_dir: impl Into<PathBuf>, file: impl Into<PathBuf>) -> DpConfig {
        let mut cfg = DpConfig::new(data_dir, "", "", "");
        cfg.control_planes.clear();
        cfg.declarative_config = Some(file.into());
        cfg
    }

    /// Whether this data plane runs from a declarative file rather than a control plane.
    pub fn file_mode(&self) -> bool {
        self.declarative_config.is_some()
    }

    pub fn from_args(args: &RunArgs) -> anyhow::Result<DpConfig> {
        let file = Layer::read_file(args.config.as_deref(), &[KNOWN_KEYS, CLUSTER_KEYS].concat())?;
        let layer = Layer { file: &file };
        let declarative: Option<PathBuf> =
            layer.get(args.declarative_config.clone(), "declarative-config")?;
        let given_cps = layer.get(
            args.cluster_control_plane.clone().map(|v| v.join(",")),
            "cluster-control-plane",
        )?;
        if let (Some(path), Some(cps)) = (&declarative, &given_cps) {
            anyhow::bail!(
                "--declarative-config {} cannot be combined with --cluster-control-plane {cps}: \
                 a data plane either runs from a file (Kong's DB-less mode) or follows a \
                 control plane; remove one of them",
                path.display()
            );
        }
        let cps = match (&declarative, given_cps) {
            (Some(_), _) => Vec::new(),
            (None, Some(s)) => split_list(&s),
            (None, None) => vec!["127.0.0.1:8005".into()],
        };
        anyhow::ensure!(
            declarative.is_some() || !cps.is_empty(),
            "--cluster-control-plane is empty"
        );
        for cp in &cps {
            anyhow::ensure!(
                cp.rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
                "--cluster-control-plane '{cp}' is not host:port"
            );
        }
        let data_dir = layer
            .get(args.data_dir.clone(), "data-dir")?
            .unwrap_or_else(|| PathBuf::from("deltaplane-dp"));
        let mut cluster = ClusterSettings::default();
        let link = args.cluster.flags().resolve(&layer, &mut cluster)?;
        let cert = link
            .cert
            .unwrap_or_else(|| "deltaplane-cp/cluster.crt".into());
        let key = link
            .key
            .unwrap_or_else(|| "deltaplane-cp/cluster.key".into());
        let mut cfg = DpConfig::new(data_dir, "", cert, key);
        cfg.cluster = cluster;
        cfg.cluster_mtls = link.mtls;
        cfg.cluster_ca_cert = link.ca_cert;
        cfg.control_planes = cps;
        if let Some(a) = layer.get(args.status_listen.clone(), "status-listen")? {
            cfg.status_listen = a
                .parse()
                .with_context(|| format!("invalid --status-listen '{a}'"))?;
        }
        if let Some(v) = layer.get(args.kong_compat_version.clone(), "kong-compat-version")? {
            cfg.kong_compat_version = v;
        }
        if let Some(l) = layer.get(
            args.cluster_dp_labels.clone().map(|v| v.join(",")),
            "cluster-dp-labels",
        )? {
            cfg.labels = split_list(&l);
            check_labels(&cfg.labels)?;
        }
        cfg.cluster_server_name =
            layer.get(args.cluster_server_name.clone(), "cluster-server-name")?;
        if let Some(p) = layer.get(args.sync_poll_interval.clone(), "sync-poll-interval")? {
            cfg.sync_poll_interval = parse_duration(&p).map_err(anyhow::Error::msg)?;
        }
        if let Some(p) = layer.get(
            args.status_report_interval.clone(),
            "status-report-interval",
        )? {
            cfg.status_report_interval = parse_duration(&p).map_err(anyhow::Error::msg)?;
        }
        if let Some(d) = layer.get(args.durable, "durable")? {
            cfg.durable = d;
        }
        if let Some(p) = layer.get(args.plugins.clone().map(|v| v.join(",")), "plugins")? {
            cfg.plugins = Some(split_list(&p));
        }
        if let Some(m) = layer.get(args.sync, "sync")? {
            cfg.sync = m;
        }
        let proxy = layer
            .get(args.proxy_listen.clone(), "proxy-listen")?
            .unwrap_or_else(|| DEFAULT_PROXY_LISTEN.to_owned());
        cfg.proxy_listen = listen_or_off("proxy-listen", &proxy)?;
        if let Some(v) = layer.get(args.proxy_listen_tls.clone(), "proxy-listen-tls")? {
            cfg.proxy_listen_tls = listen_or_off("proxy-listen-tls", &v)?;
        }
        if let Some(t) = layer.get(args.trusted_ips.clone().map(|v| v.join(",")), "trusted-ips")? {
            cfg.trusted_ips = split_list(&t)
                .iter()
                .map(|n| n.parse().map_err(anyhow::Error::msg))
                .collect::<anyhow::Result<_>>()
                .context("--trusted-ips")?;
        }
        cfg.declarative_config = declarative;
        cfg.config_token = layer.get(args.config_token.clone(), "config-token")?;
        if let Some(n) = layer.get(args.config_max_body, "config-max-body")? {
            anyhow::ensure!(n > 0, "--config-max-body must be at least 1 byte");
            cfg.config_max_body = n;
        }
        cfg.check_file_mode()?;
        cfg.check_plugins()?;
        Ok(cfg)
    }
}

impl DpConfig {
    /// The plugins this data plane runs, as (name, version), announced to the control plane
    /// over either protocol: `--plugins` (a name without a version runs at
    /// `--kong-compat-version`), or every plugin this build has a schema for.
    pub fn announced_plugins(&self, registry: &crate::schema::Registry) -> Vec<(String, String)> {
        if self.proxies() && self.plugins.is_none() {
            // A data plane never silently skips a plugin: with the proxy on, it announces
            // exactly what it executes, so a configuration using anything else is withheld.
            return crate::dp::proxy::plugins::EXECUTED
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect();
        }
        match &self.plugins {
            Some(list) => list
                .iter()
                .map(|p| match p.split_once(':') {
                    Some((n, v)) => (n.to_owned(), v.to_owned()),
                    None => (p.clone(), self.kong_compat_version.clone()),
                })
                .collect(),
            None => registry
                .plugins()
                .map(|p| (p.name.clone(), self.kong_compat_version.clone()))
                .collect(),
        }
    }
}

impl DpConfig {
    /// The file-mode settings fit together: a file or control planes, not both; a token only
    /// with a file.
    pub fn check_file_mode(&self) -> anyhow::Result<()> {
        match &self.declarative_config {
            Some(path) => anyhow::ensure!(
                self.control_planes.is_empty(),
                "--declarative-config {} cannot be combined with --cluster-control-plane {}: \
                 a data plane either runs from a file (Kong's DB-less mode) or follows a \
                 control plane; remove one of them",
                path.display(),
                self.control_planes.join(",")
            ),
            None => {
                anyhow::ensure!(
                    self.config_token.is_none(),
                    "--config-token enables POST /config, which only a data plane running \
                     from --declarative-config serves"
                );
                anyhow::ensure!(
                    !self.control_planes.is_empty(),
                    "no --cluster-control-plane and no --declarative-config: nothing to run from"
                );
            }
        }
        if let Some(t) = &self.config_token {
            anyhow::ensure!(!t.is_empty(), "--config-token is empty");
        }
        Ok(())
    }

    /// Whether this data plane runs the proxy.
    pub fn proxies(&self) -> bool {
        self.proxy_listen.is_some() || self.proxy_listen_tls.is_some()
    }

    /// With the proxy on, `--plugins` may only name plugins the proxy executes.
    pub fn check_plugins(&self) -> anyhow::Result<()> {
        let (true, Some(list)) = (self.proxies(), &self.plugins) else {
            return Ok(());
        };
        let executed = crate::dp::proxy::plugins::EXECUTED;
        for p in list {
            let name = p.split_once(':').map_or(p.as_str(), |(n, _)| n);
            anyhow::ensure!(
                executed.iter().any(|(n, _)| *n == name),
                "--plugins names '{name}', which this data plane's proxy does not execute \
                 (it executes {}); remove it, or run a sync-only data plane with \
                 --proxy-listen off",
                executed
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        Ok(())
    }
}

/// Kong's rules for `cluster_dp_labels`: at most 10 `key:value` pairs, key and value 1–63
/// characters of letters, digits and `_.-`, unique keys, and no key in Kong's reserved
/// prefixes.
pub fn check_labels(labels: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        labels.len() <= 10,
        "--cluster-dp-labels: at most 10 labels, got {}",
        labels.len()
    );
    let ok_chars = |s: &str| {
        s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    let mut seen = std::collections::HashSet::new();
    for label in labels {
        let Some((k, v)) = label.split_once(':') else {
            anyhow::bail!("--cluster-dp-labels: '{label}' is not key:value");
        };
        anyhow::ensure!(
            (1..=63).contains(&k.len()) && (1..=63).contains(&v.len()),
            "--cluster-dp-labels: '{label}': key and value must be 1 to 63 characters"
        );
        anyhow::ensure!(
            ok_chars(k) && ok_chars(v),
            "--cluster-dp-labels: '{label}': only letters, digits, '_', '.' and '-' are allowed"
        );
        for reserved in ["kong", "konnect", "insomnia", "mesh", "kic"] {
            anyhow::ensure!(
                !k.to_ascii_lowercase().starts_with(reserved),
                "--cluster-dp-labels: '{label}': keys starting with '{reserved}' are reserved"
            );
        }
        anyhow::ensure!(seen.insert(k), "--cluster-dp-labels: key '{k}' given twice");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_kong_rules() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_labels(&l(&["region:eu-west-1", "tier:gold"])).is_ok());
        assert!(check_labels(&l(&["nokey"])).is_err());
        assert!(check_labels(&l(&["kong_x:1"])).is_err());
        assert!(check_labels(&l(&["KICfoo:1"])).is_err());
        assert!(check_labels(&l(&[":v"])).is_err());
        assert!(check_labels(&l(&["k:v w"])).is_err());
        assert!(check_labels(&l(&[&format!("k:{}", "v".repeat(64))])).is_err());
        assert!(check_labels(&l(&["a:1", "a:2"])).is_err());
        let eleven: Vec<String> = (0..11).map(|i| format!("k{i}:v")).collect();
        assert!(check_labels(&eleven).is_err());
    }
}
