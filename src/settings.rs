//! Settings both binaries share: the cluster-link flags, the TOML-file layer under the flags,
//! durations and lists as the flags spell them.

use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;

use crate::net::tls::MtlsMode;

/// Declares the cluster-link flags both binaries accept, once, as a clap `Args` struct whose
/// environment variables carry the binary's prefix (`DELTAPLANE_` for the control plane,
/// `DELTAPLANE_DP_` for the data plane). [`ClusterFlags::resolve`] reads them the same way
/// for both.
macro_rules! cluster_args {
    ($(#[$meta:meta])* $name:ident, $env:literal) => {
        $(#[$meta])*
        #[derive(Debug, clap::Args, Default, Clone)]
        pub struct $name {
            /// Cluster certificate (file, PEM or base64 PEM) [control plane default:
            /// <data-dir>/cluster.crt, generated; data plane default: ./deltaplane-cp/cluster.crt]
            #[arg(long, env = concat!($env, "CLUSTER_CERT"))]
            pub cluster_cert: Option<String>,
            /// Cluster certificate key [default: next to the certificate, cluster.key]
            #[arg(long, env = concat!($env, "CLUSTER_CERT_KEY"))]
            pub cluster_cert_key: Option<String>,
            /// `shared` (one certificate, digest pinned) or `pki` (CA-issued) [default: shared]
            #[arg(long, env = concat!($env, "CLUSTER_MTLS"))]
            pub cluster_mtls: Option<String>,
            /// CA that issues the cluster certificates (pki mode)
            #[arg(long, env = concat!($env, "CLUSTER_CA_CERT"))]
            pub cluster_ca_cert: Option<String>,
            /// Largest cluster message in bytes, compressed (Kong's cluster_max_payload)
            /// [default: 16777216]
            #[arg(long, env = concat!($env, "CLUSTER_MAX_PAYLOAD"))]
            pub cluster_max_payload: Option<usize>,
            /// Ping an idle cluster connection after this long [default: 30s]
            #[arg(long, env = concat!($env, "CLUSTER_PING_INTERVAL"))]
            pub cluster_ping_interval: Option<String>,
            /// Drop a cluster connection silent for this long [default: 45s]
            #[arg(long, env = concat!($env, "CLUSTER_IDLE_TIMEOUT"))]
            pub cluster_idle_timeout: Option<String>,
            /// Disconnect a peer whose socket accepts no data for this long [default: 5s]
            #[arg(long, env = concat!($env, "CLUSTER_WRITE_TIMEOUT"))]
            pub cluster_write_timeout: Option<String>,
        }

        impl $name {
            /// The flags, whichever binary they came from.
            pub fn flags(&self) -> ClusterFlags {
                ClusterFlags {
                    cert: self.cluster_cert.clone(),
                    key: self.cluster_cert_key.clone(),
                    mtls: self.cluster_mtls.clone(),
                    ca_cert: self.cluster_ca_cert.clone(),
                    max_payload: self.cluster_max_payload,
                    ping_interval: self.cluster_ping_interval.clone(),
                    idle_timeout: self.cluster_idle_timeout.clone(),
                    write_timeout: self.cluster_write_timeout.clone(),
                }
            }
        }
    };
}

cluster_args!(
    /// The control plane's cluster-link flags (`DELTAPLANE_CLUSTER_*`).
    CpClusterArgs,
    "DELTAPLANE_"
);
cluster_args!(
    /// The data plane's cluster-link flags (`DELTAPLANE_DP_CLUSTER_*`).
    DpClusterArgs,
    "DELTAPLANE_DP_"
);

/// The cluster-link flags both binaries accept, as given (flag or environment).
#[derive(Debug, Default, Clone)]
pub struct ClusterFlags {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub mtls: Option<String>,
    pub ca_cert: Option<String>,
    pub max_payload: Option<usize>,
    pub ping_interval: Option<String>,
    pub idle_timeout: Option<String>,
    pub write_timeout: Option<String>,
}

/// The cluster-link settings resolved from [`ClusterFlags`] over the config file.
#[derive(Debug, Clone)]
pub struct ClusterLink {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub mtls: MtlsMode,
    pub ca_cert: Option<String>,
}

impl ClusterFlags {
    /// Resolves the flags over the config file: the TLS material's names and mode (checked:
    /// `pki` needs a CA) into the result, the payload limit and timers into `settings`.
    pub fn resolve(
        &self,
        layer: &Layer<'_>,
        settings: &mut ClusterSettings,
    ) -> anyhow::Result<ClusterLink> {
        let cert = layer.get(self.cert.clone(), "cluster-cert")?;
        let key = layer.get(self.key.clone(), "cluster-cert-key")?;
        let mtls = match layer.get(self.mtls.clone(), "cluster-mtls")? {
            None => MtlsMode::Shared,
            Some(m) => match m.as_str() {
                "shared" => MtlsMode::Shared,
                "pki" => MtlsMode::Pki,
                _ => anyhow::bail!("--cluster-mtls must be shared or pki, not '{m}'"),
            },
        };
        let ca_cert = layer.get(self.ca_cert.clone(), "cluster-ca-cert")?;
        if mtls == MtlsMode::Pki && ca_cert.is_none() {
            anyhow::bail!("--cluster-mtls pki needs --cluster-ca-cert");
        }
        cluster_layer(
            layer,
            settings,
            self.max_payload,
            [
                self.ping_interval.clone(),
                self.idle_timeout.clone(),
                self.write_timeout.clone(),
            ],
        )?;
        Ok(ClusterLink {
            cert,
            key,
            mtls,
            ca_cert,
        })
    }
}

/// The config-file keys of [`ClusterFlags`].
pub const CLUSTER_KEYS: &[&str] = &[
    "cluster-cert",
    "cluster-cert-key",
    "cluster-mtls",
    "cluster-ca-cert",
    "cluster-max-payload",
    "cluster-ping-interval",
    "cluster-idle-timeout",
    "cluster-write-timeout",
];

/// Cluster-link settings shared by both planes.
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub max_payload: usize,
    pub ping_interval: Duration,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    /// How long a call waits for its response.
    pub call_timeout: Duration,
    /// How long the TLS + WebSocket + hello handshake may take.
    pub handshake_timeout: Duration,
    /// CP only: serve `/v2/outlet` (Kong's `cluster_rpc`).
    pub rpc: bool,
    /// CP only: offer `kong.sync.v2` in the hello (Kong's `cluster_rpc_sync`).
    pub sync_v2: bool,
    /// CP only: sync v1 pushes the first change at once, later ones at most once per this.
    pub push_interval: Duration,
    /// CP only: bytes of recent versions' deltas kept in memory for `get_delta` answers and
    /// pushes (0: off, every answer reads the database).
    pub delta_cache_bytes: usize,
    /// CP only: new cluster connections admitted per second (TLS handshakes cost CPU; after a
    /// restart a whole fleet reconnects at once). 0: unlimited.
    pub handshake_rate: u32,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            max_payload: 16 * 1024 * 1024,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(45),
            write_timeout: Duration::from_secs(5),
            call_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            rpc: true,
            sync_v2: true,
            push_interval: Duration::from_secs(1),
            delta_cache_bytes: 64 * 1024 * 1024,
            handshake_rate: 1000,
        }
    }
}

impl ClusterSettings {
    /// The per-connection limits and timers of a [`crate::net::peer::Peer`] on this link.
    pub fn peer_config(&self) -> crate::net::peer::PeerConfig {
        crate::net::peer::PeerConfig {
            ping_interval: self.ping_interval,
            idle_timeout: self.idle_timeout,
            call_timeout: self.call_timeout,
            write_timeout: self.write_timeout,
            max_payload: self.max_payload,
            max_decompressed: self.max_decompressed(),
            ..crate::net::peer::PeerConfig::default()
        }
    }

    /// The decompressed-size cap that goes with `max_payload`.
    pub fn max_decompressed(&self) -> usize {
        self.max_payload.saturating_mul(16)
    }
}

/// A comma-separated list, trimmed, empty items dropped.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Applies the cluster-link flags (payload, then ping / idle / write timers).
fn cluster_layer(
    layer: &Layer<'_>,
    c: &mut ClusterSettings,
    max_payload: Option<usize>,
    timers: [Option<String>; 3],
) -> anyhow::Result<()> {
    if let Some(n) = layer.get(max_payload, "cluster-max-payload")? {
        anyhow::ensure!(
            n >= 4096,
            "--cluster-max-payload must be at least 4096 bytes"
        );
        c.max_payload = n;
    }
    let [ping, idle, write] = timers;
    for (value, key, slot) in [
        (ping, "cluster-ping-interval", &mut c.ping_interval),
        (idle, "cluster-idle-timeout", &mut c.idle_timeout),
        (write, "cluster-write-timeout", &mut c.write_timeout),
    ] {
        if let Some(v) = layer.get(value, key)? {
            *slot = parse_duration(&v).map_err(anyhow::Error::msg)?;
        }
    }
    anyhow::ensure!(
        c.idle_timeout > c.ping_interval,
        "--cluster-idle-timeout must be longer than --cluster-ping-interval"
    );
    Ok(())
}

/// The config file under the flags.
pub struct Layer<'a> {
    pub file: &'a toml::Table,
}

impl Layer<'_> {
    /// Reads a TOML file of flag names; unknown keys are errors.
    pub fn read_file(
        path: Option<&std::path::Path>,
        known: &[&str],
    ) -> anyhow::Result<toml::Table> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for key in file.keys() {
            anyhow::ensure!(
                known.contains(&key.replace('_', "-").as_str()),
                "unknown key '{key}' in the config file"
            );
        }
        Ok(file)
    }

    /// The flag's value if given, else the file's (keys as flag names, `_` accepted for `-`).
    pub fn get<T: FromStr>(&self, flag: Option<T>, key: &str) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        if flag.is_some() {
            return Ok(flag);
        }
        let value = self
            .file
            .get(key)
            .or_else(|| self.file.get(&key.replace('-', "_")));
        let Some(value) = value else { return Ok(None) };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Array(items) => items
                .iter()
                .map(|i| {
                    i.as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| i.to_string())
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        text.parse::<T>()
            .map(Some)
            .map_err(|e| anyhow::anyhow!("config file key '{key}': {e}"))
    }
}

/// Parses `30s`, `15m`, `24h`, `7d`, `500ms` or a number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("invalid duration '{s}'"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit in '{s}' (use ms, s, m, h or d)"
            ));
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("invalid duration '{s}'"));
    }
    Ok(Duration::from_secs_f64(secs))
}
