//! The named pieces the schema files refer to: validators, shorthands, transforms and custom
//! entity checks too specific to describe declaratively. Messages follow Kong's where Kong has one.

use std::net::{IpAddr, Ipv6Addr};

use serde_json::{Map, Value, json};
use sha2::Digest as _;

use super::FieldErrors;

pub const VALIDATORS: &[&str] = &[
    "uuid",
    "host",
    "host_with_optional_port",
    "ip",
    "cidr",
    "ip_or_cidr",
    "path",
    "route_path",
    "url",
    "tag",
    "utf8_name",
    "name",
    "wildcard_host",
    "sni",
    "header_name",
    "pem_certificate",
    "pem_key",
    "semantic_version",
    "regex",
];

/// Described one by one in `schema/CUSTOM_CHECKS.md`.
pub const CUSTOM_CHECKS: &[&str] = &[
    "route_methods",
    "route_hosts",
    "route_headers",
    "route_endpoints",
    "route_atc_compat",
    "upstream_distinct",
    "cookie_name",
    "certificate_key_matches",
    "certificate_alt_type",
    "ca_certificate_rules",
    "plugin_config",
    "workspace_name_reserved",
    "jwt_rsa_public_key",
    "jwt_maximum_expiration",
    "rate_limiting_config",
    "cors_origins",
];

pub const SHORTHANDS: &[&str] = &[
    "service_url",
    "upstream_algorithm",
    "upstream_hash_on",
    "rate_limiting_redis_legacy",
];
pub const TRANSFORMS: &[&str] = &["basicauth_password", "target_format", "ca_cert_digest"];

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()
}

pub fn validate_named(name: &str, v: &Value) -> Result<(), String> {
    let Some(s) = v.as_str() else {
        // Validators apply to strings; non-string values were type-checked already.
        return Ok(());
    };
    match name {
        "uuid" => is_uuid(s)
            .then_some(())
            .ok_or_else(|| "expected a valid UUID".into()),
        "host" => validate_host(s),
        "host_with_optional_port" => validate_host_with_optional_port(s),
        "ip" => s
            .parse::<IpAddr>()
            .map(|_| ())
            .map_err(|_| "not an ip address".into()),
        "cidr" => validate_cidr(s).ok_or_else(|| "invalid cidr range: Invalid IP address".into()),
        "ip_or_cidr" => {
            if s.parse::<IpAddr>().is_ok() || validate_cidr(s).is_some() {
                Ok(())
            } else {
                Err("invalid ip or cidr range: '".to_owned() + s + "'")
            }
        }
        "path" => validate_path(s),
        "route_path" => validate_route_path(s),
        "url" => parse_url(s).map(|_| ()),
        "tag" => validate_tag(s),
        "utf8_name" | "name" => validate_name(s, name == "utf8_name"),
        "wildcard_host" | "sni" => validate_wildcard_host(s),
        "header_name" => {
            if !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
            {
                Ok(())
            } else {
                Err(format!(
                    "bad header name '{s}', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
                ))
            }
        }
        "pem_certificate" => parse_certificates(s).map(|_| ()),
        "pem_key" => parse_key(s).map(|_| ()),
        "semantic_version" => {
            let parts: Vec<&str> = s.split('.').collect();
            if (1..=3).contains(&parts.len())
                && parts
                    .iter()
                    .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            {
                Ok(())
            } else {
                Err("invalid version number: must be in format of X.Y.Z".into())
            }
        }
        // Regexes are compiled by the data plane's router; the control plane only stores them.
        "regex" => Ok(()),
        other => Err(format!("unknown validator '{other}'")),
    }
}

fn is_hostname(s: &str) -> bool {
    if s.is_empty() || s.len() > 253 {
        return false;
    }
    let s = s.strip_suffix('.').unwrap_or(s);
    s.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !label.starts_with('-')
            && !label.ends_with('-')
    })
}

fn validate_host(s: &str) -> Result<(), String> {
    let bare = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(s);
    if bare.parse::<IpAddr>().is_ok() || is_hostname(s) {
        Ok(())
    } else {
        Err(format!("invalid hostname: {s}"))
    }
}

/// Splits `host[:port]`, bracketed IPv6 included.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (ip, after) = rest.split_once(']')?;
        ip.parse::<Ipv6Addr>().ok()?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((format!("[{ip}]"), port));
    }
    if s.parse::<Ipv6Addr>().is_ok() {
        return Some((format!("[{s}]"), None));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Some((h.to_owned(), Some(p.parse::<u16>().ok()?))),
        None => Some((s.to_owned(), None)),
    }
}

fn validate_host_with_optional_port(s: &str) -> Result<(), String> {
    match split_host_port(s) {
        Some((host, _)) if validate_host(&host).is_ok() => Ok(()),
        _ => Err(format!("invalid value: {s}")),
    }
}

fn validate_cidr(s: &str) -> Option<()> {
    let (ip, bits) = s.split_once('/')?;
    let bits: u8 = bits.parse().ok()?;
    match ip.parse::<IpAddr>().ok()? {
        IpAddr::V4(_) if bits <= 32 => Some(()),
        IpAddr::V6(_) if bits <= 128 => Some(()),
        _ => None,
    }
}

fn validate_path(s: &str) -> Result<(), String> {
    if !s.starts_with('/') {
        return Err("should start with: /".into());
    }
    if s.contains("//") {
        return Err("must not have empty segments".into());
    }
    if let Some(bad) = s
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || *c == '?' || *c == '#')
    {
        return Err(format!(
            "invalid path: '{s}' (characters outside of the reserved list of RFC 3986 found: {bad:?})"
        ));
    }
    validate_percent_encoding(s)
}

fn validate_percent_encoding(s: &str) -> Result<(), String> {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let ok = b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !ok {
                return Err(format!(
                    "invalid url-encoded value: '{}'",
                    &s[i..(i + 3).min(s.len())]
                ));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

fn validate_route_path(s: &str) -> Result<(), String> {
    if let Some(rest) = s.strip_prefix('~') {
        if rest.starts_with('/') {
            return Ok(());
        }
    } else if s.starts_with('/') {
        return validate_percent_encoding(s);
    }
    Err("should start with: / (fixed path) or ~/ (regex path)".into())
}

fn validate_tag(s: &str) -> Result<(), String> {
    if !s.is_empty() && s.chars().all(|c| !c.is_control() && c != ',' && c != '/') {
        Ok(())
    } else {
        Err(format!(
            "invalid tag '{s}': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"
        ))
    }
}

fn validate_name(s: &str, allow_utf8: bool) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(c, '.' | '-' | '_' | '~')
                || (allow_utf8 && !c.is_ascii() && !c.is_control() && !c.is_whitespace())
        });
    if ok {
        Ok(())
    } else if allow_utf8 {
        Err(format!(
            "invalid value '{s}': the only accepted ascii characters are alphanumerics or ., -, _, and ~"
        ))
    } else {
        Err(format!(
            "invalid value '{s}': it must only contain alphanumeric and '., -, _, ~' characters"
        ))
    }
}

fn validate_wildcard_host(s: &str) -> Result<(), String> {
    let stripped = s
        .strip_prefix("*.")
        .or_else(|| s.strip_suffix(".*"))
        .unwrap_or(s);
    if s.matches('*').count() > 1 || stripped.contains('*') {
        return Err("only one wildcard must be specified".into());
    }
    if is_hostname(stripped) || stripped.parse::<IpAddr>().is_ok() {
        Ok(())
    } else {
        Err(format!("invalid hostname: {s}"))
    }
}

pub struct ParsedUrl {
    pub scheme: String,
    pub host: String,
    pub port: Option<u16>,
    pub path: Option<String>,
}

pub fn parse_url(s: &str) -> Result<ParsedUrl, String> {
    let bad = || format!("missing host in url: '{s}'");
    let (scheme, rest) = s
        .split_once("://")
        .ok_or_else(|| format!("missing scheme in url: '{s}'"))?;
    if scheme.is_empty()
        || !scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
    {
        return Err(format!("invalid scheme in url: '{s}'"));
    }
    let (authority, path) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], Some(&rest[i..])),
        None => (rest, None),
    };
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if authority.is_empty() {
        return Err(bad());
    }
    let (host, port) =
        split_host_port(authority).ok_or_else(|| format!("invalid port in url: '{s}'"))?;
    validate_host(&host).map_err(|_| format!("invalid host in url: '{s}'"))?;
    let path = path
        .map(|p| p.split(['?', '#']).next().unwrap_or("").to_owned())
        .filter(|p| !p.is_empty());
    Ok(ParsedUrl {
        scheme: scheme.to_ascii_lowercase(),
        host,
        port,
        path,
    })
}

pub fn apply_shorthand(name: &str, input: &mut Map<String, Value>, errors: &mut FieldErrors) {
    match name {
        "service_url" => {
            let Some(url) = input.remove("url") else {
                return;
            };
            if url.is_null() {
                return;
            }
            let Some(s) = url.as_str() else {
                errors.field("url", "expected a string");
                return;
            };
            match parse_url(s) {
                Ok(u) => {
                    let default_port = match u.scheme.as_str() {
                        "https" | "grpcs" | "wss" | "tls" => 443,
                        _ => 80,
                    };
                    input.insert("port".into(), Value::from(u.port.unwrap_or(default_port)));
                    input.insert("protocol".into(), Value::String(u.scheme));
                    input.insert("host".into(), Value::String(u.host));
                    input.insert(
                        "path".into(),
                        u.path.map(Value::String).unwrap_or(Value::Null),
                    );
                }
                Err(e) => errors.field("url", e),
            }
        }
        "upstream_algorithm" => {
            if let Some(Value::String(a)) = input.get("algorithm")
                && (a == "least-connections" || a == "latency")
            {
                input.insert("hash_on".into(), Value::Null);
            }
        }
        "upstream_hash_on" => {
            if let Some(h) = input.get("hash_on").cloned() {
                match h {
                    Value::Null => {
                        input.insert("hash_on".into(), Value::from("none"));
                    }
                    Value::String(s) if s == "none" => {
                        input.insert("algorithm".into(), Value::from("round-robin"));
                    }
                    Value::String(_) => {
                        input.insert("algorithm".into(), Value::from("consistent-hashing"));
                    }
                    _ => {}
                }
            }
        }
        "rate_limiting_redis_legacy" => {
            let legacy = [
                "host",
                "port",
                "username",
                "password",
                "database",
                "ssl",
                "ssl_verify",
                "server_name",
                "timeout",
            ];
            for name in legacy {
                if let Some(v) = input.remove(&format!("redis_{name}")) {
                    if v.is_null() {
                        continue;
                    }
                    let redis = input
                        .entry("redis")
                        .or_insert_with(|| Value::Object(Map::new()));
                    if redis.is_null() {
                        *redis = Value::Object(Map::new());
                    }
                    if let Value::Object(r) = redis {
                        r.insert(name.to_owned(), v);
                    }
                }
            }
        }
        other => errors.entity(format!("unknown shorthand '{other}'")),
    }
}

/// Runs a field's `transform` on an entity that passed validation. `carried` says whether the
/// request carried the field.
pub fn apply_transform(
    name: &str,
    field: &str,
    carried: bool,
    entity: &mut Map<String, Value>,
    errors: &mut FieldErrors,
) {
    match name {
        // Kong's basic-auth stores sha1(password .. consumer_id) in hex, recomputed on every
        // write that carries a password (and only then: the stored value is already a hash).
        "basicauth_password" => {
            if !carried {
                return;
            }
            let Some(Value::String(password)) = entity.get(field) else {
                return;
            };
            let consumer_id = entity
                .get("consumer")
                .and_then(|c| c.get("id"))
                .and_then(Value::as_str)
                .unwrap_or("");
            let mut h = sha1::Sha1::new();
            h.update(password.as_bytes());
            h.update(consumer_id.as_bytes());
            entity.insert(field.to_owned(), Value::String(hex::encode(h.finalize())));
        }
        // Kong's targets DAO: `host[:port]`, default port 8000, IPv6 bracketed.
        "target_format" => {
            let Some(Value::String(target)) = entity.get(field) else {
                return;
            };
            match split_host_port(target) {
                Some((host, port)) if validate_host(&host).is_ok() => {
                    let normalized = format!("{host}:{}", port.unwrap_or(8000));
                    entity.insert(field.to_owned(), Value::String(normalized));
                }
                _ => errors.field(
                    field,
                    format!("Invalid target ('{target}'); not a valid hostname or ip address"),
                ),
            }
        }
        // The SHA-256 of the CA certificate's DER, overwriting any client value.
        "ca_cert_digest" => {
            let Some(Value::String(pem)) = entity.get("cert") else {
                return;
            };
            match parse_certificates(pem) {
                Ok(certs) => {
                    let digest = sha2::Sha256::digest(certs[0].as_ref());
                    entity.insert(field.to_owned(), Value::String(hex::encode(digest)));
                }
                Err(_) => errors.field(field, "cannot create digest value of certificate"),
            }
        }
        other => errors.field(field, format!("unknown transform '{other}'")),
    }
}

pub fn parse_certificates(
    pem: &str,
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, String> {
    use rustls_pki_types::pem::PemObject;
    let certs: Result<Vec<_>, _> =
        rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    match certs {
        Ok(c) if !c.is_empty() => {
            for der in &c {
                x509_parser::parse_x509_certificate(der).map_err(|e| format!("invalid certificate: {e}"))?;
            }
            Ok(c)
        }
        _ => Err("invalid certificate: x509.new: asn1/tasn_dec.c:309:error:0D07803A:asn1 encoding routines:asn1_item_embed_d2i:nested asn1 error".into()),
    }
}

pub fn parse_key(pem: &str) -> Result<rustls_pki_types::PrivateKeyDer<'static>, String> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| "invalid key: pkey.new:load_key: failed to load key".into())
}

/// The DER SubjectPublicKeyInfo of a PEM certificate's leaf, and whether it is RSA.
fn cert_spki(pem: &str) -> Option<(Vec<u8>, bool)> {
    let certs = parse_certificates(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&certs[0]).ok()?;
    let spki = cert.tbs_certificate.subject_pki;
    let is_rsa = spki.algorithm.algorithm.to_id_string() == "1.2.840.113549.1.1.1";
    Some((spki.raw.to_vec(), is_rsa))
}

fn key_spki(pem: &str) -> Option<Vec<u8>> {
    let key = parse_key(pem).ok()?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).ok()?;
    signer.public_key().map(|spki| spki.as_ref().to_vec())
}

pub fn custom_check(name: &str, obj: &mut Map<String, Value>, errors: &mut FieldErrors) {
    match name {
        "route_methods" => each_string(obj, "methods", errors, |m| {
            (!m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()))
                .then_some(())
                .ok_or_else(|| format!("invalid value: {m}"))
        }),
        "route_hosts" => each_string(obj, "hosts", errors, route_host),
        "route_headers" => {
            if let Some(Value::Object(headers)) = obj.get("headers")
                && headers.keys().any(|k| k.eq_ignore_ascii_case("host"))
            {
                errors.field("headers", "cannot contain 'host' header, which must be specified in the 'hosts' attribute");
            }
        }
        "route_endpoints" => {
            for field in ["sources", "destinations"] {
                let Some(Value::Array(items)) = obj.get(field) else {
                    continue;
                };
                let errs: Vec<Value> = items
                    .iter()
                    .map(|i| {
                        if non_empty_value(i.get("ip")) || non_empty_value(i.get("port")) {
                            Value::Null
                        } else {
                            json!({"@entity": ["at least one of these fields must be non-empty: 'ip', 'port'"]})
                        }
                    })
                    .collect();
                if errs.iter().any(|e| !e.is_null()) {
                    errors.field(field, Value::Array(errs));
                }
            }
        }
        "route_atc_compat" => route_atc_compat(obj, errors),
        "upstream_distinct" => {
            for (a, b) in [
                ("hash_on_header", "hash_fallback_header"),
                ("hash_on_query_arg", "hash_fallback_query_arg"),
                ("hash_on_uri_capture", "hash_fallback_uri_capture"),
            ] {
                if non_empty(obj, a) && obj.get(a) == obj.get(b) {
                    errors.entity(format!(
                        "values of these fields must be distinct: '{a}', '{b}'"
                    ));
                }
            }
        }
        "cookie_name" => {
            if let Some(Value::String(c)) = obj.get("hash_on_cookie") {
                if c.is_empty() {
                    errors.field("hash_on_cookie", "no token provided");
                } else if c
                    .bytes()
                    .any(|b| !(32..127).contains(&b) || b" \t()<>@,;:\\\"/?={}[]".contains(&b))
                {
                    errors.field(
                        "hash_on_cookie",
                        "contains one or more invalid characters. ASCII control characters (0-31;127), space, tab and the characters ()<>@,;:\\\"/?={}[] are not allowed.",
                    );
                }
            }
        }
        "certificate_key_matches" => {
            for (cert_field, key_field, label) in
                [("cert", "key", ""), ("cert_alt", "key_alt", "alternative ")]
            {
                let (Some(Value::String(cert)), Some(Value::String(key))) =
                    (obj.get(cert_field), obj.get(key_field))
                else {
                    continue;
                };
                if is_vault_ref(cert) || is_vault_ref(key) {
                    continue;
                }
                if let (Some((cert_spki, _)), Some(key_spki)) = (cert_spki(cert), key_spki(key))
                    && cert_spki != key_spki
                {
                    errors.entity(format!("{label}certificate does not match key"));
                }
            }
        }
        "certificate_alt_type" => {
            let (Some(Value::String(a)), Some(Value::String(b))) =
                (obj.get("cert"), obj.get("cert_alt"))
            else {
                return;
            };
            if is_vault_ref(a) || is_vault_ref(b) {
                return;
            }
            if let (Some((_, ta)), Some((_, tb))) = (cert_spki(a), cert_spki(b))
                && ta == tb
            {
                errors.entity(
                    "certificate and alternative certificate need to have different type (e.g. RSA and ECDSA), the provided certificates were both of the same type",
                );
            }
        }
        "ca_certificate_rules" => ca_certificate_rules(obj, errors),
        "workspace_name_reserved" => {
            const CORE: &str = "workspaces, consumers, certificates, services, routes, snis, upstreams, targets, plugins, tags, ca_certificates, clustering_data_planes, parameters, vaults, key_sets, keys, filter_chains";
            if let Some(Value::String(n)) = obj.get("name")
                && CORE.split(", ").any(|c| c == n)
            {
                errors.field("name", format!("must not be one of: {CORE}"));
            }
        }
        "jwt_rsa_public_key" => {
            const NEEDS_KEY: &[&str] = &[
                "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA",
            ];
            let alg = obj.get("algorithm").and_then(Value::as_str).unwrap_or("");
            if NEEDS_KEY.contains(&alg)
                && let Some(Value::String(k)) = obj.get("rsa_public_key")
                && !is_loadable_key(k)
            {
                errors.field("rsa_public_key", "invalid key");
            }
        }
        "jwt_maximum_expiration" => {
            let max = obj
                .get("config")
                .and_then(|c| c.get("maximum_expiration"))
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            let has_exp = obj
                .get("config")
                .and_then(|c| c.get("claims_to_verify"))
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|v| v == "exp"));
            if max > 0.0 && !has_exp {
                errors.at("config.claims_to_verify", "expected to contain: exp");
            }
        }
        "rate_limiting_config" => rate_limiting_config(obj, errors),
        "cors_origins" => {
            let Some(Value::Array(origins)) = obj.get("config").and_then(|c| c.get("origins"))
            else {
                return;
            };
            let errs: Vec<Value> = origins
                .iter()
                .map(|o| match o.as_str() {
                    Some("*") => Value::Null,
                    Some(r) if regex::Regex::new(r).is_ok() => Value::Null,
                    Some(r) => Value::String(format!("'{r}' is not a valid regex")),
                    None => Value::Null,
                })
                .collect();
            if errs.iter().any(|e| !e.is_null()) {
                errors.at("config.origins", Value::Array(errs));
            }
        }
        other => errors.entity(format!("unknown check '{other}'")),
    }
}

fn is_vault_ref(s: &str) -> bool {
    s.starts_with("{vault://")
}

fn is_loadable_key(pem: &str) -> bool {
    use rustls_pki_types::pem::PemObject;
    parse_key(pem).is_ok()
        || rustls_pki_types::SubjectPublicKeyInfoDer::from_pem_slice(pem.as_bytes()).is_ok()
        || parse_certificates(pem).is_ok()
}

fn non_empty_value(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(m)) => !m.is_empty(),
        Some(_) => true,
    }
}

fn non_empty(obj: &Map<String, Value>, name: &str) -> bool {
    non_empty_value(obj.get(name))
}

fn str_list(obj: &Map<String, Value>, name: &str) -> Vec<String> {
    obj.get(name)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `check` on every string of the array field `name`, reporting per element.
fn each_string(
    obj: &Map<String, Value>,
    name: &str,
    errors: &mut FieldErrors,
    check: impl Fn(&str) -> Result<(), String>,
) {
    let Some(Value::Array(items)) = obj.get(name) else {
        return;
    };
    let errs: Vec<Value> = items
        .iter()
        .map(|v| match v.as_str().map(&check) {
            Some(Err(e)) => Value::String(e),
            _ => Value::Null,
        })
        .collect();
    if errs.iter().any(|e| !e.is_null()) {
        errors.field(name, Value::Array(errs));
    }
}

fn route_host(h: &str) -> Result<(), String> {
    if h.matches('*').count() > 1 {
        return Err("invalid wildcard: must have at most one wildcard".into());
    }
    if h.contains('*') && !(h.starts_with("*.") || h.ends_with(".*")) {
        return Err("invalid wildcard: must be placed at leftmost or rightmost label".into());
    }
    validate_host_with_optional_port(&h.replace('*', "abc"))
        .map_err(|_| format!("invalid value: {h}"))
}

/// Regex paths and `~*` header values must compile with Rust `regex` semantics, as the ATC
/// router of `traditional_compatible` compiles them.
fn route_atc_compat(obj: &mut Map<String, Value>, errors: &mut FieldErrors) {
    let mut bad = Vec::new();
    for p in str_list(obj, "paths") {
        if let Some(re) = p.strip_prefix('~')
            && let Err(e) = regex::Regex::new(re)
        {
            bad.push(format!(
                "invalid regex in path '{p}': {}",
                first_line(&e.to_string())
            ));
        }
    }
    if let Some(Value::Object(headers)) = obj.get("headers") {
        for values in headers.values() {
            for v in values
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if let Some(re) = v.strip_prefix("~*")
                    && let Err(e) = regex::Regex::new(re)
                {
                    bad.push(format!(
                        "invalid regex in header value '{v}': {}",
                        first_line(&e.to_string())
                    ));
                }
            }
        }
    }
    for b in bad {
        errors.entity(format!("Router Expression failed validation: {b}"));
    }
}

fn first_line(s: &str) -> String {
    s.lines().last().unwrap_or(s).trim().to_owned()
}

fn ca_certificate_rules(obj: &mut Map<String, Value>, errors: &mut FieldErrors) {
    let Some(Value::String(pem)) = obj.get("cert") else {
        return;
    };
    if pem.matches("-----BEGIN CERTIFICATE-----").count() > 1 {
        errors.entity("please submit only one certificate at a time");
        return;
    }
    let Ok(certs) = parse_certificates(pem) else {
        return;
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(&certs[0]) else {
        return;
    };
    if cert.validity().time_to_expiration().is_none() {
        errors.entity("certificate expired, \"Not After\" time is in the past");
        return;
    }
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        errors.entity("certificate does not appear to be a CA because it is missing the \"CA\" basic constraint");
    }
}

fn rate_limiting_config(obj: &mut Map<String, Value>, errors: &mut FieldErrors) {
    let Some(Value::Object(config)) = obj.get("config") else {
        return;
    };
    const PERIODS: [&str; 6] = ["second", "minute", "hour", "day", "month", "year"];
    for f in PERIODS.iter().chain(&["error_code"]) {
        if let Some(n) = config.get(*f).and_then(Value::as_f64)
            && n <= 0.0
        {
            errors.at(&format!("config.{f}"), "value must be greater than 0");
        }
    }
    let set: Vec<(&str, f64)> = PERIODS
        .iter()
        .filter_map(|p| config.get(*p).and_then(Value::as_f64).map(|v| (*p, v)))
        .collect();
    'outer: for (i, (lower, lv)) in set.iter().enumerate() {
        for (upper, uv) in &set[i + 1..] {
            if uv < lv {
                errors.field("config", format!("The limit for {upper}({uv:.1}) cannot be lower than the limit for {lower}({lv:.1})"));
                break 'outer;
            }
        }
    }
    let policy = config
        .get("policy")
        .and_then(Value::as_str)
        .unwrap_or("local");
    let sync_rate = config
        .get("sync_rate")
        .and_then(Value::as_f64)
        .unwrap_or(-1.0);
    if policy != "redis" && sync_rate != -1.0 {
        errors.field("config", "sync_rate can only be used with the redis policy");
    } else if policy == "redis" && sync_rate != -1.0 && sync_rate < 0.02 {
        errors.field(
            "config",
            "sync_rate must be greater than 0.02, or -1 to disable",
        );
    }
}
