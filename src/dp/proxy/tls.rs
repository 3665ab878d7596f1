//! The proxy's TLS certificates, chosen per SNI from the configuration's `certificates` and
//! `snis` (Kong's `kong/runloop/certificate.lua`: an exact name first, then a `*.` prefix
//! wildcard, then a `.*` suffix wildcard; the node's default certificate when none matches).

use std::collections::HashMap;
use std::sync::Arc;

use rustls::SignatureScheme;
use rustls::crypto::ring::sign::any_supported_type;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;

/// One certificate entity: its primary pair and, optionally, its alternate (Kong's
/// `cert_alt` / `key_alt`, of the other key type).
#[derive(Debug)]
struct Pair {
    primary: Arc<CertifiedKey>,
    alternate: Option<Arc<CertifiedKey>>,
}

/// The SNI table of one configuration.
#[derive(Debug, Default)]
pub struct Certificates {
    exact: HashMap<String, Arc<Pair>>,
    /// `*.example.com` stored as `.example.com`.
    prefix_wildcards: Vec<(String, Arc<Pair>)>,
    /// `www.example.*` stored as `www.example.`.
    suffix_wildcards: Vec<(String, Arc<Pair>)>,
}

impl Certificates {
    /// Builds the table from the stored `certificates` and `snis`. A certificate that does not
    /// parse is reported as (id, message) and left out, with the SNIs naming it.
    pub fn new(certificates: &[Value], snis: &[Value]) -> (Certificates, Vec<(String, String)>) {
        let mut errors = Vec::new();
        let mut by_id = HashMap::new();
        for c in certificates {
            let id = c["id"].as_str().unwrap_or("").to_owned();
            match pair(c) {
                Ok(p) => {
                    by_id.insert(id, Arc::new(p));
                }
                Err(e) => errors.push((id, e)),
            }
        }
        let mut table = Certificates::default();
        for s in snis {
            let (Some(name), Some(cert)) = (s["name"].as_str(), s["certificate"]["id"].as_str())
            else {
                continue;
            };
            let Some(p) = by_id.get(cert) else { continue };
            let name = name.to_ascii_lowercase();
            if let Some(rest) = name.strip_prefix('*') {
                table.prefix_wildcards.push((rest.to_owned(), p.clone()));
            } else if let Some(rest) = name.strip_suffix('*') {
                table.suffix_wildcards.push((rest.to_owned(), p.clone()));
            } else {
                table.exact.insert(name, p.clone());
            }
        }
        // The longest wildcard first, so the most specific one wins.
        table
            .prefix_wildcards
            .sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        table
            .suffix_wildcards
            .sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        (table, errors)
    }

    /// The certificate for an SNI, if the configuration has one.
    pub fn find(&self, sni: &str, schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        let sni = sni.to_ascii_lowercase();
        let pair = self
            .exact
            .get(&sni)
            .or_else(|| {
                self.prefix_wildcards
                    .iter()
                    .find(|(suffix, _)| sni.ends_with(suffix.as_str()))
                    .map(|(_, p)| p)
            })
            .or_else(|| {
                self.suffix_wildcards
                    .iter()
                    .find(|(prefix, _)| sni.starts_with(prefix.as_str()))
                    .map(|(_, p)| p)
            })?;
        match &pair.alternate {
            Some(alt) if !supports(&pair.primary, schemes) && supports(alt, schemes) => {
                Some(alt.clone())
            }
            _ => Some(pair.primary.clone()),
        }
    }

    /// How many SNI names the table holds.
    pub fn len(&self) -> usize {
        self.exact.len() + self.prefix_wildcards.len() + self.suffix_wildcards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn supports(key: &CertifiedKey, schemes: &[SignatureScheme]) -> bool {
    key.key.choose_scheme(schemes).is_some()
}

fn pair(c: &Value) -> Result<Pair, String> {
    let primary = certified(c["cert"].as_str(), c["key"].as_str())?;
    let alternate = match (c["cert_alt"].as_str(), c["key_alt"].as_str()) {
        (Some(cert), Some(key)) => Some(certified(Some(cert), Some(key))?),
        _ => None,
    };
    Ok(Pair { primary, alternate })
}

/// A certificate chain and key from PEM.
pub fn certified(cert: Option<&str>, key: Option<&str>) -> Result<Arc<CertifiedKey>, String> {
    let cert = cert.ok_or("a certificate without `cert`")?;
    let key = key.ok_or("a certificate without `key`")?;
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("invalid certificate PEM: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in `cert`".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
        .map_err(|e| format!("invalid key PEM: {e}"))?;
    let signing = any_supported_type(&key).map_err(|e| format!("unsupported key: {e}"))?;
    Ok(Arc::new(CertifiedKey::new(chain, signing)))
}

/// Resolves the proxy's certificate per handshake from the configuration being served.
pub struct SniResolver {
    current: Arc<dyn Fn() -> Arc<Certificates> + Send + Sync>,
    default: Arc<CertifiedKey>,
}

impl std::fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl SniResolver {
    /// `current` returns the certificates of the configuration being served; `default` is
    /// the certificate of a handshake no SNI of it matches (or without SNI).
    pub fn new(
        current: Arc<dyn Fn() -> Arc<Certificates> + Send + Sync>,
        default: Arc<CertifiedKey>,
    ) -> SniResolver {
        SniResolver { current, default }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(sni) = hello.server_name()
            && let Some(found) = (self.current)().find(sni, hello.signature_schemes())
        {
            return Some(found);
        }
        Some(self.default.clone())
    }
}

/// A self-signed default certificate for the proxy (Kong generates one at start too:
/// `kong/cmd/utils/prefix_handler.lua`, `gen_default_ssl_cert`).
pub fn default_certificate() -> Result<Arc<CertifiedKey>, String> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned()]).map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    certified(Some(&cert.pem()), Some(&key.serialize_pem()))
}

/// A client-side verifier that accepts any server certificate but still checks the
/// handshake signatures: Kong's default towards upstreams (`tls_verify` unset,
/// `nginx_proxy_proxy_ssl_verify` off) and active probes with
/// `https_verify_certificate = false`.
#[derive(Debug)]
pub(crate) struct AcceptAnyCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl AcceptAnyCert {
    pub(crate) fn new() -> AcceptAnyCert {
        AcceptAnyCert {
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }
}

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
