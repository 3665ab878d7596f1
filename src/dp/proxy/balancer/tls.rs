//! TLS for `https` active health checks (lua-resty-healthcheck's `run_single_check`:
//! `sslhandshake(nil, https_sni, https_verify_certificate)`).
//!
//! Verification uses the system's CA bundle (the first of `SSL_CERT_FILE` and the usual
//! distribution paths that exists), standing in for Kong's `lua_ssl_trusted_certificate`
//! (default `system`). Without verification any certificate is accepted, but the handshake
//! signatures are still checked.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::dp::proxy::tls::AcceptAnyCert;

/// Where distributions keep their CA bundle.
const CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system roots; empty (every verified handshake fails) when no bundle is found.
fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    let env = std::env::var("SSL_CERT_FILE").ok();
    let path = env
        .iter()
        .map(String::as_str)
        .chain(CA_BUNDLES.iter().copied())
        .find(|p| std::path::Path::new(p).is_file());
    match path {
        Some(path) => match CertificateDer::pem_file_iter(path) {
            Ok(certs) => {
                let (added, ignored) = roots.add_parsable_certificates(certs.flatten());
                tracing::debug!(path, added, ignored, "health checks: CA bundle loaded");
            }
            Err(err) => tracing::warn!(path, %err, "health checks: cannot read the CA bundle"),
        },
        None => tracing::warn!("health checks: no CA bundle found; verified https probes fail"),
    }
    roots
}

/// The client configuration for https probes, verifying or not; built once per process.
pub(super) fn client_config(verify: bool) -> Option<Arc<ClientConfig>> {
    static VERIFYING: OnceLock<Option<Arc<ClientConfig>>> = OnceLock::new();
    static ACCEPTING: OnceLock<Option<Arc<ClientConfig>>> = OnceLock::new();
    let build = |verify: bool| {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|err| tracing::error!(%err, "health checks: no TLS configuration"))
            .ok()?;
        let config = if verify {
            builder
                .with_root_certificates(system_roots())
                .with_no_client_auth()
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::new()))
                .with_no_client_auth()
        };
        Some(Arc::new(config))
    };
    if verify {
        VERIFYING.get_or_init(|| build(true)).clone()
    } else {
        ACCEPTING.get_or_init(|| build(false)).clone()
    }
}

/// The server name to send: an IP address or a DNS name; `None` when neither parses.
pub(super) fn server_name(sni: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(sni.to_owned()).ok()
}
