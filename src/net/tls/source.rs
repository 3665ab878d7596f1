//! Reading certificate and key material given the way Kong accepts it: a file path, PEM text,
//! or base64-encoded PEM.

use std::path::Path;

use anyhow::{Context, bail, format_err};
use base64::Engine;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Values at least this long, or spanning several lines, are never echoed in error messages:
/// they are more likely to be (broken) key material than a path.
const MAX_ECHOED_VALUE_LEN: usize = 200;

/// Returns the PEM text behind `value`, trying in order: PEM text, an existing file, base64.
///
/// `what` names the setting in error messages (`cert`, `key`, `ca_cert`).
pub(crate) fn read_pem(what: &str, value: &str) -> anyhow::Result<Vec<u8>> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        bail!("{what} is empty");
    }
    if looks_like_pem(trimmed.as_bytes()) {
        return Ok(trimmed.as_bytes().to_vec());
    }
    let path = Path::new(trimmed);
    if path.exists() {
        let bytes = std::fs::read(path)
            .with_context(|| format!("{what}: cannot read file {}", path.display()))?;
        if !looks_like_pem(&bytes) {
            bail!("{what}: file {} does not contain PEM data", path.display());
        }
        return Ok(bytes);
    }
    if let Some(bytes) = decode_base64_pem(trimmed) {
        return Ok(bytes);
    }
    if trimmed.len() < MAX_ECHOED_VALUE_LEN && !trimmed.contains('\n') {
        bail!(
            "{what}: file {trimmed} does not exist (and the value is neither PEM text nor base64-encoded PEM)"
        );
    }
    bail!("{what}: the value is not PEM text, base64-encoded PEM, or the path of an existing file")
}

/// Parses every `CERTIFICATE` block of `pem`, in order. At least one is required.
pub(crate) fn parse_certs(what: &str, pem: &[u8]) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| format_err!("{what}: invalid PEM: {err}"))?;
    if certs.is_empty() {
        bail!("{what}: no CERTIFICATE block found in the PEM data");
    }
    for cert in &certs {
        if x509_parser::parse_x509_certificate(cert).is_err() {
            bail!("{what}: a CERTIFICATE block is not a valid X.509 certificate");
        }
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, PKCS#1 or SEC1) of `pem`.
pub(crate) fn parse_key(what: &str, pem: &[u8]) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|err| match err {
        rustls_pki_types::pem::Error::NoItemsFound => format_err!(
            "{what}: no unencrypted private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY) found in the PEM data"
        ),
        err => format_err!("{what}: invalid PEM: {err}"),
    })
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|window| window == b"-----BEGIN ")
}

/// Kong accepts base64 with or without padding and with line breaks.
fn decode_base64_pem(value: &str) -> Option<Vec<u8>> {
    let compact: String = value.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(compact).ok()?;
    looks_like_pem(&bytes).then_some(bytes)
}
