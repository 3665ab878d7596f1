//! Cluster mTLS: certificate loading and generation, and rustls configurations for Kong's
//! `shared` and `pki` modes.
//!
//! - `shared`: the control plane (CP) and every data plane (DP) hold the same certificate and key.
//!   Each side accepts the peer only if the peer's leaf certificate has the same SHA-256 digest as
//!   its own, is within its validity period, and the peer proves it holds the key (handshake
//!   signatures are verified).
//!   Names and issuers are ignored, so Kong's `kong hybrid gen_cert` certificate (CN
//!   `kong_clustering`, no SAN) works. The DP sends SNI `kong_clustering`.
//! - `pki`: every DP has its own certificate issued by `ca_cert`. The CP requires a client
//!   certificate chaining to the CA, optionally restricted to `allowed_common_names`. The DP
//!   verifies the CP against the same CA and `server_name` (or the host it connects to).
//!
//! All material is loaded and validated once by [`ClusterTls::load`]; the rustls configurations
//! are built there too, so a running node cannot fail on bad configuration later.
//! Refused peers are logged with their reason (`tracing::warn!`) by the verifiers in `verify.rs`
//! and never reach the layer above: the handshake fails.
//! A missing client certificate is refused by rustls before any verifier runs, so only
//! [`ClusterTls::accept`] logs that one: prefer it to a bare `TlsAcceptor`.

mod source;
mod verify;

#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail, format_err};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, InvalidDnsNameError, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::net::tls::verify::{PinnedCertVerifier, PkiClientVerifier, PkiServerVerifier, Side};

/// The server name a DP sends (SNI) in `shared` mode, and the CN of generated shared certificates.
pub const SHARED_SERVER_NAME: &str = "kong_clustering";

/// File names written by [`generate_shared_cert`] and looked for by [`ensure_dev_cert`].
pub const SHARED_CERT_FILE: &str = "cluster.crt";
pub const SHARED_KEY_FILE: &str = "cluster.key";

/// Validity of generated shared certificates; `kong hybrid gen_cert` defaults to 1095 days.
const SHARED_CERT_VALIDITY: Duration = Duration::from_secs(1095 * 24 * 60 * 60);

/// Generated certificates start a day early so that a DP whose clock lags the CP's accepts them.
const SHARED_CERT_BACKDATE: Duration = Duration::from_secs(24 * 60 * 60);

/// The cluster listener speaks HTTP/1.1 (WebSocket upgrade) only.
const ALPN_HTTP_1_1: &[u8] = b"http/1.1";

/// Kong's `cluster_mtls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtlsMode {
    /// One certificate shared by the CP and all DPs, pinned by digest.
    Shared,
    /// Per-DP certificates issued by a CA.
    Pki,
}

/// Where the cluster TLS material comes from; the `cluster_*` settings of Kong.
///
/// `cert`, `key` and `ca_cert` may each be a file path, PEM text, or base64-encoded PEM.
#[derive(Clone)]
pub struct TlsSettings {
    pub mode: MtlsMode,
    /// Our certificate (chain, leaf first): `cluster_cert`.
    pub cert: String,
    /// The private key of `cert`: `cluster_cert_key`.
    pub key: String,
    /// `pki` only, required there: the CA that issues CP and DP certificates (`cluster_ca_cert`).
    pub ca_cert: Option<String>,
    /// `pki` only, DP side: the name the CP certificate must be valid for (`cluster_server_name`).
    /// When unset, the host the DP connects to is used.
    pub server_name: Option<String>,
    /// `pki` only, CP side: if not empty, a client certificate is accepted only if its CN or one
    /// of its DNS names is in this list.
    pub allowed_common_names: Vec<String>,
}

/// Loaded and validated cluster TLS material and the rustls configurations built from it.
///
/// Cheap to clone: everything is behind one `Arc`.
#[derive(Clone)]
pub struct ClusterTls {
    inner: Arc<ClusterTlsInner>,
}

/// What the handshake tells about the peer, taken from its leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// SHA-256 of the DER certificate, lowercase hex.
    pub fingerprint_sha256: String,
    pub common_name: Option<String>,
    /// DNS names and IP addresses of the subject alternative name extension.
    pub sans: Vec<String>,
    /// Unix seconds; the CP stores `not_after` as Kong's `cert_details.expiry_timestamp`.
    pub not_before: i64,
    pub not_after: i64,
}

struct ClusterTlsInner {
    mode: MtlsMode,
    /// `pki` only: the name the CP must present, overriding the host.
    server_name: Option<ServerName<'static>>,
    /// Our own leaf certificate.
    identity: PeerIdentity,
    server_config: Arc<ServerConfig>,
    client_config: Arc<ClientConfig>,
}

// === impl MtlsMode ===

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Shared => "shared",
            MtlsMode::Pki => "pki",
        }
    }
}

impl FromStr for MtlsMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<MtlsMode> {
        match s {
            "shared" => Ok(MtlsMode::Shared),
            "pki" => Ok(MtlsMode::Pki),
            other => bail!("unknown mTLS mode `{other}` (expected `shared` or `pki`)"),
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl TlsSettings ===

impl TlsSettings {
    /// `shared` mode with this certificate and key (the mode of the CP's generated one).
    pub fn shared(cert: impl Into<String>, key: impl Into<String>) -> TlsSettings {
        TlsSettings {
            mode: MtlsMode::Shared,
            cert: cert.into(),
            key: key.into(),
            ca_cert: None,
            server_name: None,
            allowed_common_names: Vec::new(),
        }
    }
}

/// `key` may hold the private key itself, so it is never printed.
impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .field("ca_cert", &self.ca_cert)
            .field("server_name", &self.server_name)
            .field("allowed_common_names", &self.allowed_common_names)
            .finish()
    }
}

// === impl ClusterTls ===

impl ClusterTls {
    /// Reads and checks the material, and builds both rustls configurations.
    ///
    /// An expired or not yet valid certificate is only logged: handshakes refuse it anyway.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<ClusterTls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());

        let cert_pem = source::read_pem("cert", &settings.cert)?;
        let chain = source::parse_certs("cert", &cert_pem)?;
        let key_pem = source::read_pem("key", &settings.key)?;
        let key = source::parse_key("key", &key_pem)?;
        check_key_matches(&chain, &key, &provider)?;

        let leaf = &chain[0];
        let identity = PeerIdentity::from_der(leaf)
            .context("cert: the first certificate is not a valid X.509 certificate")?;
        warn_if_outside_validity(&identity);

        let (client_verifier, server_verifier, server_name): (
            Arc<dyn rustls::server::danger::ClientCertVerifier>,
            Arc<dyn rustls::client::danger::ServerCertVerifier>,
            Option<ServerName<'static>>,
        ) = match settings.mode {
            MtlsMode::Shared => {
                if !settings.allowed_common_names.is_empty() {
                    bail!(
                        "allowed_common_names applies only to mTLS mode `pki`; in `shared` mode the peer must present the same certificate"
                    );
                }
                (
                    Arc::new(PinnedCertVerifier::new(Side::ControlPlane, leaf, &identity)),
                    Arc::new(PinnedCertVerifier::new(Side::DataPlane, leaf, &identity)),
                    None,
                )
            }
            MtlsMode::Pki => {
                let Some(ca_cert) = &settings.ca_cert else {
                    bail!("ca_cert must be set when the mTLS mode is `pki`");
                };
                let roots = Arc::new(load_roots(ca_cert)?);
                let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.clone(),
                    provider.clone(),
                )
                .build()
                .context("ca_cert: cannot build the client certificate verifier")?;
                let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .context("ca_cert: cannot build the server certificate verifier")?;
                let server_name = match &settings.server_name {
                    Some(name) => Some(ServerName::try_from(name.clone()).map_err(|_| {
                        format_err!("server_name `{name}` is not a valid DNS name or IP address")
                    })?),
                    None => None,
                };
                (
                    Arc::new(PkiClientVerifier {
                        inner: client_verifier,
                        allowed_common_names: settings.allowed_common_names.clone(),
                    }),
                    Arc::new(PkiServerVerifier {
                        inner: server_verifier,
                    }),
                    server_name,
                )
            }
        };

        let mut server_config = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("building the TLS server configuration")?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .context("building the TLS server configuration")?;
        server_config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        // No resumption: every connection runs the full certificate checks (expiry included),
        // and cluster connections are long-lived, so resumption would save nothing.
        server_config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server_config.send_tls13_tickets = 0;

        let mut client_config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("building the TLS client configuration")?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier)
            .with_client_auth_cert(chain, key)
            .context("building the TLS client configuration")?;
        client_config.alpn_protocols = vec![ALPN_HTTP_1_1.to_vec()];
        client_config.resumption = Resumption::disabled();

        Ok(ClusterTls {
            inner: Arc::new(ClusterTlsInner {
                mode: settings.mode,
                server_name,
                identity,
                server_config: Arc::new(server_config),
                client_config: Arc::new(client_config),
            }),
        })
    }

    pub fn mode(&self) -> MtlsMode {
        self.inner.mode
    }

    /// Our own certificate, e.g. to log its fingerprint and expiry at startup.
    pub fn identity(&self) -> &PeerIdentity {
        &self.inner.identity
    }

    /// For the CP cluster listener: a client certificate is required; ALPN `http/1.1`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.inner.server_config.clone()
    }

    /// For the DP: presents our certificate and verifies the CP's per the mode.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.inner.client_config.clone()
    }

    /// The name the DP sends and checks when connecting to `host`:
    /// `kong_clustering` in `shared` mode; `server_name`, else `host`, in `pki` mode.
    ///
    /// `host` may be a DNS name or an IP address, IPv6 with or without brackets.
    /// A `host` that is neither is logged and replaced by `invalid`, which no certificate should
    /// be valid for, so the handshake fails; use [`ClusterTls::try_server_name_for`] to get the
    /// error instead.
    pub fn server_name_for(&self, host: &str) -> ServerName<'static> {
        self.try_server_name_for(host).unwrap_or_else(|_| {
            tracing::warn!(
                host,
                "the control plane host is not a valid DNS name or IP address; the TLS name check will fail"
            );
            // The reserved top-level domain `invalid` (RFC 6761); the IP fallback is unreachable.
            ServerName::try_from("invalid").unwrap_or(ServerName::IpAddress(
                std::net::IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED).into(),
            ))
        })
    }

    /// [`ClusterTls::server_name_for`], failing on a `host` that is not a DNS name or IP address.
    pub fn try_server_name_for(
        &self,
        host: &str,
    ) -> Result<ServerName<'static>, InvalidDnsNameError> {
        match (self.inner.mode, &self.inner.server_name) {
            (MtlsMode::Shared, _) => ServerName::try_from(SHARED_SERVER_NAME),
            (MtlsMode::Pki, Some(server_name)) => Ok(server_name.clone()),
            (MtlsMode::Pki, None) => {
                let host = host
                    .strip_prefix('[')
                    .and_then(|host| host.strip_suffix(']'))
                    .unwrap_or(host);
                ServerName::try_from(host.to_owned())
            }
        }
    }

    /// CP side: runs the TLS handshake on an accepted connection and returns the DP's identity.
    ///
    /// Refusals are logged here or by the verifiers. No timeout is applied: wrap the call.
    pub async fn accept<IO>(
        &self,
        io: IO,
    ) -> io::Result<(tokio_rustls::server::TlsStream<IO>, PeerIdentity)>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.server_config());
        let stream = acceptor
            .accept(io)
            .await
            .inspect_err(|err| log_handshake_failure(Side::ControlPlane, err))?;
        let identity = PeerIdentity::from_connection(stream.get_ref().1).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no parsable client certificate after the handshake",
            )
        })?;
        Ok((stream, identity))
    }

    /// DP side: runs the TLS handshake towards the CP at `host`.
    ///
    /// In TLS 1.3 the CP checks our certificate after the DP considers the handshake done, so
    /// a refusal by the CP may only show on the first read.
    /// No timeout is applied: wrap the call.
    pub async fn connect<IO>(
        &self,
        io: IO,
        host: &str,
    ) -> io::Result<tokio_rustls::client::TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let server_name = self
            .try_server_name_for(host)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let connector = tokio_rustls::TlsConnector::from(self.client_config());
        connector
            .connect(server_name, io)
            .await
            .inspect_err(|err| log_handshake_failure(Side::DataPlane, err))
    }
}

/// Never prints key material.
impl fmt::Debug for ClusterTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterTls")
            .field("mode", &self.inner.mode)
            .field("server_name", &self.inner.server_name)
            .field("identity", &self.inner.identity)
            .finish_non_exhaustive()
    }
}

// === impl PeerIdentity ===

impl PeerIdentity {
    /// Parses a DER certificate; `None` if it is not X.509.
    pub fn from_der(cert: &[u8]) -> Option<PeerIdentity> {
        use x509_parser::extensions::GeneralName;

        let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
        let common_name = parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned);
        let mut sans = Vec::new();
        if let Ok(Some(extension)) = parsed.subject_alternative_name() {
            for name in &extension.value.general_names {
                match name {
                    GeneralName::DNSName(dns_name) => sans.push((*dns_name).to_owned()),
                    GeneralName::IPAddress(bytes) => {
                        if let Some(ip) = ip_from_bytes(bytes) {
                            sans.push(ip.to_string());
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(PeerIdentity {
            fingerprint_sha256: hex::encode(verify::sha256(cert)),
            common_name,
            sans,
            not_before: parsed.validity().not_before.timestamp(),
            not_after: parsed.validity().not_after.timestamp(),
        })
    }

    /// The peer's leaf certificate of an established connection.
    pub fn from_connection(connection: &rustls::CommonState) -> Option<PeerIdentity> {
        let leaf = connection.peer_certificates()?.first()?;
        PeerIdentity::from_der(leaf)
    }
}

// === certificate generation ===

/// Writes a new self-signed shared-mode certificate (`cluster.crt`) and key (`cluster.key`,
/// mode 0600) into `dir`, like `kong hybrid gen_cert`: CN and DNS name `kong_clustering`,
/// valid for 1095 days; but ECDSA P-256 where Kong's is P-384 (`kong/cmd/hybrid.lua`): a
/// handshake then costs each side about a third of the CPU (`benches/handshake.rs`: 1.44 →
/// 0.45 ms here), which is what a fleet reconnecting after a restart pays. Kong's OpenSSL takes
/// P-256 (Kong generates its own default certificates with it:
/// `kong/cmd/utils/prefix_handler.lua`), shared mode pins the certificate's digest, not its
/// key type, and Kong's own P-384 pairs keep working here.
///
/// Refuses to overwrite either file. Creates `dir` if needed.
pub fn generate_shared_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join(SHARED_CERT_FILE);
    let key_path = dir.join(SHARED_KEY_FILE);
    for path in [&cert_path, &key_path] {
        // `symlink_metadata` also sees a dangling symlink, which `create_new` would refuse.
        if path.symlink_metadata().is_ok() {
            bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;

    let (cert_pem, key_pem) = shared_cert_pem()?;
    write_new_file(&key_path, key_pem.as_bytes(), 0o600)?;
    if let Err(err) = write_new_file(&cert_path, cert_pem.as_bytes(), 0o644) {
        // Do not leave a key without its certificate behind.
        let _ = std::fs::remove_file(&key_path);
        return Err(err);
    }
    Ok((cert_path, key_path))
}

/// Returns the development shared certificate of `data_dir`, generating it on first use.
///
/// The `bool` is true when the files were just created.
pub fn ensure_dev_cert(data_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, bool)> {
    let cert_path = data_dir.join(SHARED_CERT_FILE);
    let key_path = data_dir.join(SHARED_KEY_FILE);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => Ok((cert_path, key_path, false)),
        (false, false) => {
            let (cert_path, key_path) = generate_shared_cert(data_dir)?;
            Ok((cert_path, key_path, true))
        }
        (true, false) | (false, true) => bail!(
            "only one of {} and {} exists; restore the other or remove it to generate a new pair",
            cert_path.display(),
            key_path.display()
        ),
    }
}

fn shared_cert_pem() -> anyhow::Result<(String, String)> {
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating the shared certificate key")?;
    let mut params = rcgen::CertificateParams::new(vec![SHARED_SERVER_NAME.to_owned()])
        .context("building the shared certificate")?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SHARED_SERVER_NAME);
    let since_epoch = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .context("the system clock is before 1970")?;
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - SHARED_CERT_BACKDATE;
    params.not_after = now + SHARED_CERT_VALIDITY;
    let cert = params
        .self_signed(&key_pair)
        .context("signing the shared certificate")?;
    Ok((cert.pem(), key_pair.serialize_pem()))
}

fn write_new_file(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;

    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

// === helpers ===

fn check_key_matches(
    chain: &[CertificateDer<'static>],
    key: &rustls_pki_types::PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> anyhow::Result<()> {
    match CertifiedKey::from_der(chain.to_vec(), key.clone_key(), provider) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            bail!("key does not match cert (the private key is not the certificate's key)")
        }
        Err(err) => bail!("key: unusable private key: {err}"),
    }
}

fn load_roots(ca_cert: &str) -> anyhow::Result<RootCertStore> {
    let ca_pem = source::read_pem("ca_cert", ca_cert)?;
    let mut roots = RootCertStore::empty();
    for cert in source::parse_certs("ca_cert", &ca_pem)? {
        roots
            .add(cert)
            .map_err(|err| format_err!("ca_cert: unusable CA certificate: {err}"))?;
    }
    Ok(roots)
}

fn warn_if_outside_validity(identity: &PeerIdentity) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |since_epoch| {
            i64::try_from(since_epoch.as_secs()).unwrap_or(i64::MAX)
        });
    if now > identity.not_after {
        tracing::warn!(
            not_after = identity.not_after,
            fingerprint = %identity.fingerprint_sha256,
            "the cluster certificate has expired; handshakes will fail"
        );
    } else if now < identity.not_before {
        tracing::warn!(
            not_before = identity.not_before,
            fingerprint = %identity.fingerprint_sha256,
            "the cluster certificate is not yet valid; handshakes will fail"
        );
    }
}

fn ip_from_bytes(bytes: &[u8]) -> Option<std::net::IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(std::net::IpAddr::from),
        _ => None,
    }
}

/// The rustls error inside a tokio-rustls handshake error, if any.
fn rustls_error(err: &io::Error) -> Option<&rustls::Error> {
    err.get_ref()?.downcast_ref::<rustls::Error>()
}

fn log_handshake_failure(side: Side, err: &io::Error) {
    let peer = side.peer();
    match rustls_error(err) {
        // The verifier has already logged the reason.
        Some(rustls::Error::InvalidCertificate(_)) => {
            tracing::debug!(error = %err, "cluster TLS handshake with the {peer} refused");
        }
        Some(rustls::Error::NoCertificatesPresented) => {
            tracing::warn!("refusing the {peer}: it presented no client certificate");
        }
        Some(rustls::Error::AlertReceived(alert)) => {
            tracing::warn!(
                alert = ?alert,
                "cluster TLS handshake failed: the {peer} refused it"
            );
        }
        Some(rustls_err) => {
            tracing::warn!(
                "cluster TLS handshake with the {peer} failed: {}",
                verify::describe(rustls_err)
            );
        }
        // Plain IO errors (resets, EOF) come from port scanners and health checks too.
        None => tracing::debug!(error = %err, "cluster TLS handshake with the {peer} failed"),
    }
}
