//! Certificate verifiers for the cluster link.
//!
//! `shared` mode pins the peer's leaf certificate to our own by SHA-256 digest, as Kong does,
//! and ignores names and issuers.
//! `pki` mode wraps rustls' webpki verifiers to add the common-name allow list and to log why a
//! peer was refused.
//! Every refusal is logged here with its reason, because rustls itself only logs through the
//! `log` crate and the accept loop above sees a terse error.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::net::tls::PeerIdentity;

/// Which end of the link a verifier runs on; only changes the log messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The control plane verifying a data plane's client certificate.
    ControlPlane,
    /// The data plane verifying the control plane's server certificate.
    DataPlane,
}

// === impl Side ===

impl Side {
    /// The other end, as named in logs.
    pub(crate) fn peer(self) -> &'static str {
        match self {
            Side::ControlPlane => "data plane",
            Side::DataPlane => "control plane",
        }
    }
}

/// `shared` mode: the peer must present exactly our certificate and prove it holds the key.
#[derive(Debug)]
pub(crate) struct PinnedCertVerifier {
    side: Side,
    /// SHA-256 of our own leaf certificate (DER).
    pinned_digest: [u8; 32],
    /// Validity of our own leaf certificate, which is the peer's once the digest matched.
    not_before: i64,
    not_after: i64,
    algorithms: WebPkiSupportedAlgorithms,
}

/// `pki` mode on the control plane: webpki chain verification plus the common-name allow list.
#[derive(Debug)]
pub(crate) struct PkiClientVerifier {
    pub(crate) inner: Arc<dyn ClientCertVerifier>,
    /// Empty means every certificate issued by the CA is accepted.
    pub(crate) allowed_common_names: Vec<String>,
}

/// `pki` mode on the data plane: webpki verification against the CA and the server name.
#[derive(Debug)]
pub(crate) struct PkiServerVerifier {
    pub(crate) inner: Arc<rustls::client::WebPkiServerVerifier>,
}

/// A human reason for a refused certificate, for logs.
pub(crate) fn describe(err: &rustls::Error) -> String {
    let rustls::Error::InvalidCertificate(cert_err) = err else {
        return err.to_string();
    };
    match cert_err {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "certificate expired".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate is not yet valid".to_owned()
        }
        CertificateError::UnknownIssuer => {
            "certificate is not issued by the configured CA (unknown issuer)".to_owned()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            format!("certificate is not valid for the expected server name ({cert_err})")
        }
        CertificateError::BadSignature => "certificate signature is invalid".to_owned(),
        _ => cert_err.to_string(),
    }
}

// === impl PinnedCertVerifier ===

impl PinnedCertVerifier {
    /// `own_leaf` is our certificate and `own` its parsed identity.
    pub(crate) fn new(
        side: Side,
        own_leaf: &CertificateDer<'_>,
        own: &PeerIdentity,
    ) -> PinnedCertVerifier {
        PinnedCertVerifier {
            side,
            pinned_digest: sha256(own_leaf),
            not_before: own.not_before,
            not_after: own.not_after,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn verify_leaf(
        &self,
        end_entity: &CertificateDer<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let digest = sha256(end_entity);
        if digest != self.pinned_digest {
            let reason = match self.side {
                Side::ControlPlane => {
                    "client certificate digest does not match the control plane certificate"
                }
                Side::DataPlane => {
                    "server certificate digest does not match the data plane certificate"
                }
            };
            tracing::warn!(
                peer_fingerprint = %hex::encode(digest),
                expected_fingerprint = %hex::encode(self.pinned_digest),
                "refusing the {}: {reason}",
                self.side.peer()
            );
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        // The digest matched, so the peer's certificate is ours and so is its validity period.
        let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        if now_secs > self.not_after {
            tracing::warn!(
                not_after = self.not_after,
                "refusing the {}: certificate expired",
                self.side.peer()
            );
            return Err(CertificateError::ExpiredContext {
                time: now,
                not_after: unix_time(self.not_after),
            }
            .into());
        }
        if now_secs < self.not_before {
            tracing::warn!(
                not_before = self.not_before,
                "refusing the {}: certificate is not yet valid",
                self.side.peer()
            );
            return Err(CertificateError::NotValidYetContext {
                time: now,
                not_before: unix_time(self.not_before),
            }
            .into());
        }
        Ok(())
    }

    fn verify_tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
            .inspect_err(|err| log_bad_signature(self.side, err))
    }

    fn verify_tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
            .inspect_err(|err| log_bad_signature(self.side, err))
    }
}

impl ClientCertVerifier for PinnedCertVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the client should send its one certificate whatever its issuer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify_leaf(end_entity, now)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Names are deliberately not checked: Kong's `gen_cert` certificate has no SAN, and the
        // digest pin is a stronger check than any name.
        self.verify_leaf(end_entity, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify_tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

// === impl PkiClientVerifier ===

impl ClientCertVerifier for PkiClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let res = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|err| {
                tracing::warn!(
                    error = %err,
                    "refusing data plane client certificate: {}",
                    describe(err)
                );
            })?;
        if self.allowed_common_names.is_empty() {
            return Ok(res);
        }
        let identity = PeerIdentity::from_der(end_entity);
        let allowed = identity
            .as_ref()
            .is_some_and(|identity| is_allowed(identity, &self.allowed_common_names));
        if !allowed {
            tracing::warn!(
                common_name = ?identity.as_ref().and_then(|identity| identity.common_name.as_deref()),
                sans = ?identity.as_ref().map(|identity| &identity.sans),
                "refusing data plane client certificate: CN not allowed (neither the CN nor a DNS name is in allowed_common_names)"
            );
            return Err(CertificateError::ApplicationVerificationFailure.into());
        }
        Ok(res)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls12_signature(message, cert, dss)
            .inspect_err(|err| log_bad_signature(Side::ControlPlane, err))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .inspect_err(|err| log_bad_signature(Side::ControlPlane, err))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Matches the certificate's CN or any of its DNS names (case-insensitively for DNS names).
fn is_allowed(identity: &PeerIdentity, allowed_common_names: &[String]) -> bool {
    allowed_common_names.iter().any(|allowed| {
        identity.common_name.as_deref() == Some(allowed.as_str())
            || identity
                .sans
                .iter()
                .filter(|san| san.parse::<std::net::IpAddr>().is_err())
                .any(|dns_name| dns_name.eq_ignore_ascii_case(allowed))
    })
}

// === impl PkiServerVerifier ===

impl ServerCertVerifier for PkiServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|err| {
                tracing::warn!(
                    error = %err,
                    server_name = ?server_name,
                    "refusing control plane server certificate: {}",
                    describe(err)
                );
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls12_signature(message, cert, dss)
            .inspect_err(|err| log_bad_signature(Side::DataPlane, err))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner
            .verify_tls13_signature(message, cert, dss)
            .inspect_err(|err| log_bad_signature(Side::DataPlane, err))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

// === helpers ===

pub(crate) fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

fn log_bad_signature(side: Side, err: &rustls::Error) {
    tracing::warn!(
        error = %err,
        "refusing the {}: handshake signature does not verify (the peer does not hold the certificate's private key)",
        side.peer()
    );
}

fn unix_time(secs: i64) -> UnixTime {
    UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(secs).unwrap_or(0),
    ))
}
