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
    "upstream_name",
    "host_with_wildcards",
    "asterisk_or_regex",
    "acme_namespace",
    "header_pair",
    "header_name_pair",
    "transformer_colon_value",
    "rate_limiting_periods",
    "response_ratelimiting_periods",
    "request_termination_body",
    "oauth2_flows",
    "otel_resource_attributes",
    "zipkin_static_tags",
    "http_log_userinfo_authorization",
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
    "aws_lambda_proxy_url",
    "acme_storage",
    "llm_log_statistics",
];

pub const SHORTHANDS: &[&str] = &["service_url", "upstream_algorithm", "upstream_hash_on"];
pub const TRANSFORMS: &[&str] = &["basicauth_password", "target_format", "ca_cert_digest"];

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::parse_str(s).is_ok()
}

/// Runs the named validator (Kong's `custom_validator`) on a value that passed its field's
/// type check and other validators.
pub fn validate_named(name: &str, v: &Value) -> Result<(), String> {
    match (name, v) {
        ("rate_limiting_periods", Value::Object(config)) => return rate_limiting_periods(config),
        ("response_ratelimiting_periods", Value::Object(limit)) => {
            return periods_order(limit, "the limit");
        }
        ("request_termination_body", Value::Object(config)) => {
            return request_termination_body(config);
        }
        ("oauth2_flows", Value::Object(config)) => return oauth2_flows(config),
        ("otel_resource_attributes", Value::Object(attributes)) => {
            return otel_resource_attributes(attributes);
        }
        ("zipkin_static_tags", Value::Array(tags)) => return zipkin_static_tags(tags),
        ("http_log_userinfo_authorization", Value::Object(config)) => {
            return http_log_userinfo_authorization(config);
        }
        _ => {}
    }
    let Some(s) = v.as_str() else {
        // The remaining validators apply to strings; other values were type-checked already.
        return Ok(());
    };
    match name {
        "uuid" => is_uuid(s)
            .then_some(())
            .ok_or_else(|| "expected a valid UUID".into()),
        "host" => kong_validate_host(s),
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
        "rate_limiting_periods"
        | "response_ratelimiting_periods"
        | "request_termination_body"
        | "oauth2_flows"
        | "otel_resource_attributes"
        | "zipkin_static_tags"
        | "http_log_userinfo_authorization" => Ok(()),
        "route_path" => validate_route_path(s),
        "url" => {
            let u = socket_url_parse(s);
            if u.host.is_none() {
                Err("missing host in url".into())
            } else if u.scheme.is_none() {
                Err("missing scheme in url".into())
            } else {
                Ok(())
            }
        }
        "tag" => validate_tag(s),
        "utf8_name" | "name" => validate_name(s, name == "utf8_name"),
        "wildcard_host" => validate_wildcard_host(s),
        "upstream_name" => validate_upstream_name(s),
        // `typedefs.hosts`: each `*` stands for a label; Kong returns normalize_ip's error.
        "host_with_wildcards" => kong_normalize_ip(&s.replace('*', "abc")).map(|_| ()),
        "sni" => kong_validate_sni(s),
        "header_name" => validate_header_name(s),
        "asterisk_or_regex" => {
            if s == "*" || regex::Regex::new(s).is_ok() {
                Ok(())
            } else {
                Err(format!("'{s}' is not a valid regex"))
            }
        }
        "acme_namespace" => {
            // kong/plugins/acme/reserved_words.lua
            const RESERVED: [&str; 3] = [
                "kong_acme:renew_config:",
                "kong_acme:renew_last_run",
                "kong_acme:cert_key:",
            ];
            match RESERVED.iter().find(|w| s.starts_with(**w)) {
                Some(w) => Err(format!(
                    "namespace can't be prefixed with reserved word: {w}"
                )),
                None => Ok(()),
            }
        }
        "header_pair" => header_pair(s, false),
        "header_name_pair" => header_pair(s, true),
        "transformer_colon_value" => {
            let (name, value) = split_colon_pair(s);
            match (name, value) {
                (Some(_), Some(v)) if !v.is_empty() => Ok(()),
                (name, _) => Err(format!("key '{}' has no value", name.unwrap_or("nil"))),
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
    // Kong's `validate_path`: unreserved, sub-delims, `/`, `%`, `:` and `@` only.
    if !s
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_~/%:@!$&'()*+,;=".contains(&b))
    {
        return Err(format!(
            "invalid path: '{s}' (characters outside of the reserved list of RFC 3986 found)"
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
        other => errors.entity(format!("unknown shorthand '{other}'")),
    }
}

/// Runs a field's `transform` on an entity that passed validation. `carried` says whether the
/// request carried the field.
/// Whether transform `name` is one of Kong's schema `transformations` (which a declarative
/// file's `_transform: false` skips) rather than a normalisation Kong's DAO always applies.
pub fn is_schema_transformation(name: &str) -> bool {
    matches!(name, "basicauth_password" | "ca_cert_digest")
}

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
        "aws_lambda_proxy_url" => {
            // kong/plugins/aws-lambda/schema.lua: `proxy_url:match("^([^:]+)://")`.
            if let Some(Value::String(url)) = obj.get("config").and_then(|c| c.get("proxy_url"))
                && let Some((scheme, _)) = url.split_once("://")
                && !scheme.is_empty()
                && !scheme.contains(':')
                && scheme != "http"
            {
                errors.entity("proxy_url scheme must be http");
            }
        }
        "acme_storage" => {
            // The control-plane branch of kong/plugins/acme/schema.lua: `shm` storage is
            // node-local, so a hybrid control plane refuses it (`kong` storage is refused only
            // by a DB-less traditional node, which deltaplane never is).
            if obj.get("config").and_then(|c| c.get("storage")) == Some(&json!("shm")) {
                errors.entity("\"shm\" storage can't be used in Hybrid mode");
            }
        }
        "llm_log_statistics" => {
            // kong/llm/schemas/init.lua UNSUPPORTED_LOG_STATISTICS.
            let route_type = obj.get("route_type").and_then(Value::as_str);
            let provider = obj
                .get("model")
                .and_then(|m| m.get("provider"))
                .and_then(Value::as_str);
            let log_statistics = obj
                .get("logging")
                .and_then(|l| l.get("log_statistics"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if log_statistics
                && route_type == Some("llm/v1/completions")
                && provider == Some("anthropic")
            {
                errors.entity(
                    "anthropic does not support statistics when route_type is llm/v1/completions",
                );
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

/// Kong's `kong.tools.ip.normalize_ip`: the address kind and port of `host[:port]`, or its
/// error message.
fn kong_normalize_ip(address: &str) -> Result<(HostKind, Option<u64>), String> {
    let colons = address.matches(':').count();
    let kind = if colons > 1 {
        HostKind::Ipv6
    } else if !address.replace(':', "").is_empty()
        && address
            .bytes()
            .filter(|b| *b != b':')
            .all(|b| b.is_ascii_digit() || b == b'.')
    {
        HostKind::Ipv4
    } else {
        HostKind::Name
    };
    let check_port = |p: &str| -> Result<u64, String> {
        // `tonumber` of a run of digits; more than 65535 is refused.
        match p.parse::<u64>() {
            Ok(n) if n <= 65535 => Ok(n),
            _ => Err("invalid port number".into()),
        }
    };
    match kind {
        HostKind::Ipv4 => {
            let bad = || format!("invalid ipv4 address: {address}");
            let (ip, port) = match address.split_once(':') {
                Some((ip, port)) => {
                    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad());
                    }
                    (ip, Some(port))
                }
                None => (address, None),
            };
            let octets: Vec<&str> = ip.split('.').collect();
            let ok = octets.len() == 4
                && octets.iter().all(|o| {
                    (1..=3).contains(&o.len())
                        && o.bytes().all(|b| b.is_ascii_digit())
                        && o.parse::<u16>().is_ok_and(|n| n <= 255)
                });
            if !ok {
                return Err(bad());
            }
            Ok((kind, port.map(check_port).transpose()?))
        }
        HostKind::Ipv6 => {
            let (ip, port) = match address.strip_prefix('[') {
                Some(rest) => {
                    let Some((ip, after)) = rest.split_once(']') else {
                        return Err(format!("invalid ipv6 address: {address}"));
                    };
                    let port = match after {
                        "" => None,
                        p => match p.strip_prefix(':') {
                            Some(d) if d.bytes().all(|b| b.is_ascii_digit()) => Some(d),
                            _ => return Err("invalid ipv6 address".into()),
                        },
                    };
                    (ip, port)
                }
                None => (address, None),
            };
            let port = match port {
                Some("") => None,
                Some(p) => Some(check_port(p)?),
                None => None,
            };
            if ip.parse::<Ipv6Addr>().is_err() || ip.contains('.') {
                return Err(format!("invalid ipv6 address: {address}"));
            }
            Ok((kind, port))
        }
        HostKind::Name => {
            let mut name = address;
            let mut port = None;
            if let Some((head, tail)) = address.rsplit_once(':')
                && !tail.is_empty()
                && tail.bytes().all(|b| b.is_ascii_digit())
            {
                name = head;
                port = Some(check_port(tail)?);
            }
            let bad = || format!("invalid hostname: {address}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(bad());
            }
            let segments: Vec<&str> = name.split('.').collect();
            let n = segments.len();
            for (i, segment) in segments.iter().enumerate() {
                if segment.ends_with('-') || (segment.is_empty() && i + 1 != n) {
                    return Err(bad());
                }
            }
            Ok((kind, port))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HostKind {
    Ipv4,
    Ipv6,
    Name,
}

/// `typedefs.host`: a host name or address without a port.
fn kong_validate_host(s: &str) -> Result<(), String> {
    match kong_normalize_ip(s) {
        Err(e) if e == "invalid port number" => Err("must not have a port".into()),
        Err(_) => Err(format!("invalid value: {s}")),
        Ok((_, Some(_))) => Err("must not have a port".into()),
        Ok((_, None)) => Ok(()),
    }
}

/// `typedefs.sni`: a host name, not an address, without a port.
fn kong_validate_sni(s: &str) -> Result<(), String> {
    match kong_normalize_ip(s) {
        Err(e) if e == "invalid port number" => Err("must not have a port".into()),
        Err(_) => Err(format!("invalid value: {s}")),
        Ok((kind, _)) if kind != HostKind::Name => Err("must not be an IP".into()),
        Ok((_, Some(_))) => Err("must not have a port".into()),
        Ok(_) => Ok(()),
    }
}

/// The upstreams' `validate_name` (`kong/db/schema/entities/upstreams.lua`).
fn validate_upstream_name(s: &str) -> Result<(), String> {
    match kong_normalize_ip(s) {
        Err(_) => Err(format!("Invalid name ('{s}'); must be a valid hostname")),
        Ok((kind, _)) if kind != HostKind::Name => {
            Err(format!("Invalid name ('{s}'); no ip addresses allowed"))
        }
        Ok((_, Some(_))) => Err(format!("Invalid name ('{s}'); no port allowed")),
        Ok(_) => Ok(()),
    }
}

/// `kong.tools.http.validate_header_name`: `^[a-zA-Z0-9-_]+$`.
fn validate_header_name(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("no header name provided".into());
    }
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "bad header name '{s}', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
        ))
    }
}

/// The parts of a URL as LuaSocket's `socket.url.parse` finds them (what `typedefs.url`
/// validates with): lenient, it never fails on a non-empty string.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SocketUrl {
    pub scheme: Option<String>,
    pub userinfo: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
}

pub fn socket_url_parse(s: &str) -> SocketUrl {
    let mut res = SocketUrl::default();
    let mut rest = s;
    // `^([%w][%w%+%-%.]*)%:`
    let bytes = rest.as_bytes();
    if bytes.first().is_some_and(u8::is_ascii_alphanumeric) {
        let end = bytes
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || b"+-.".contains(b)))
            .unwrap_or(bytes.len());
        if bytes.get(end) == Some(&b':') {
            res.scheme = Some(rest[..end].to_owned());
            rest = &rest[end + 1..];
        }
    }
    // `^//([^/]*)`
    let Some(after) = rest.strip_prefix("//") else {
        return res;
    };
    let mut authority = &after[..after.find('/').unwrap_or(after.len())];
    // The fragment, query and params are cut from the whole remainder first.
    for sep in ['#', '?', ';'] {
        if let Some(i) = authority.find(sep) {
            authority = &authority[..i];
        }
    }
    // `^([^@]*)@`
    if let Some(i) = authority.find('@') {
        res.userinfo = Some(authority[..i].to_owned());
        authority = &authority[i + 1..];
    }
    // `:([^:%]]*)$`
    if let Some(i) = authority.rfind(':')
        && !authority[i + 1..].contains(']')
    {
        res.port = Some(authority[i + 1..].to_owned());
        authority = &authority[..i];
    }
    if !authority.is_empty() {
        let host = authority
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .filter(|h| !h.is_empty())
            .unwrap_or(authority);
        res.host = Some(host.to_owned());
    }
    res
}

/// Lua's `pair:match("^([^:]+):*(.-)$")`: the name before the first colon and the value after
/// the colons that follow it.
fn split_colon_pair(s: &str) -> (Option<&str>, Option<&str>) {
    let end = s.find(':').unwrap_or(s.len());
    if end == 0 {
        return (None, None);
    }
    let value = s[end..].trim_start_matches(':');
    (Some(&s[..end]), Some(value))
}

/// The transformer plugins' `validate_headers`: the name (and with `with_value` the value)
/// of a `name:value` pair must be a header name.
fn header_pair(s: &str, with_value: bool) -> Result<(), String> {
    let (name, value) = split_colon_pair(s);
    if name.is_none_or(|n| validate_header_name(n).is_err()) {
        return Err(format!("'{}' is not a valid header", name.unwrap_or("nil")));
    }
    if with_value {
        let value = value.unwrap_or("");
        if validate_header_name(value).is_err() {
            return Err(format!("'{value}' is not a valid header"));
        }
    }
    Ok(())
}

/// kong/plugins/rate-limiting/schema.lua `validate_periods_order`.
fn rate_limiting_periods(config: &Map<String, Value>) -> Result<(), String> {
    periods_order(config, "The limit")?;
    let policy = config.get("policy").and_then(Value::as_str);
    let sync_rate = config.get("sync_rate").and_then(Value::as_f64);
    if policy != Some("redis") && sync_rate != Some(-1.0) {
        return Err("sync_rate can only be used with the redis policy".into());
    }
    if policy == Some("redis")
        && let Some(rate) = sync_rate
        && rate != -1.0
        && rate < 0.02
    {
        return Err("sync_rate must be greater than 0.02, or -1 to disable".into());
    }
    Ok(())
}

/// Both rate-limiting plugins: a longer period may not have a lower limit. `what` is
/// `"The limit"` (rate-limiting) or `"the limit"` (response-ratelimiting).
fn periods_order(limits: &Map<String, Value>, what: &str) -> Result<(), String> {
    const PERIODS: [&str; 6] = ["second", "minute", "hour", "day", "month", "year"];
    for (i, lower) in PERIODS.iter().enumerate() {
        let Some(v1) = limits.get(*lower).and_then(Value::as_f64) else {
            continue;
        };
        for upper in &PERIODS[i + 1..] {
            if let Some(v2) = limits.get(*upper).and_then(Value::as_f64)
                && v2 < v1
            {
                return Err(format!(
                    "{what} for {upper}({v2:.1}) cannot be lower than the limit for {lower}({v1:.1})"
                ));
            }
        }
    }
    Ok(())
}

/// kong/plugins/request-termination/schema.lua's config validator.
fn request_termination_body(config: &Map<String, Value>) -> Result<(), String> {
    let present = |k: &str| {
        config
            .get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.is_empty())
    };
    if present("message") && (present("content_type") || present("body")) {
        return Err("message cannot be used with content_type or body".into());
    }
    if present("content_type") && !present("body") {
        return Err("content_type requires a body".into());
    }
    if config.get("echo") == Some(&Value::Bool(true))
        && (present("content_type") || present("body"))
    {
        return Err("echo cannot be used with content_type and body".into());
    }
    Ok(())
}

/// kong/plugins/oauth2/schema.lua `validate_flows`.
fn oauth2_flows(config: &Map<String, Value>) -> Result<(), String> {
    let flows = [
        "enable_authorization_code",
        "enable_implicit_grant",
        "enable_client_credentials",
        "enable_password_grant",
    ];
    if flows
        .iter()
        .any(|f| config.get(*f) == Some(&Value::Bool(true)))
    {
        Ok(())
    } else {
        Err("at least one of these fields must be true: enable_authorization_code, enable_implicit_grant, enable_client_credentials, enable_password_grant".into())
    }
}

/// kong/plugins/opentelemetry/schema.lua `resource_attributes`' validator.
fn otel_resource_attributes(attributes: &Map<String, Value>) -> Result<(), String> {
    for v in attributes.values() {
        match v {
            Value::String(s) if s.is_empty() => return Err("required field missing".into()),
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            Value::Null | Value::Array(_) | Value::Object(_) => {
                let lua_type = if v.is_null() { "userdata" } else { "table" };
                return Err(format!("invalid type of value: {lua_type}"));
            }
        }
    }
    Ok(())
}

/// kong/plugins/zipkin/schema.lua `validate_static_tags`.
fn zipkin_static_tags(tags: &[Value]) -> Result<(), String> {
    let mut seen: Vec<&str> = Vec::new();
    for name in tags
        .iter()
        .filter_map(|t| t.get("name"))
        .filter_map(Value::as_str)
    {
        if seen.contains(&name) {
            return Err(format!("repeated tags are not allowed: {name}"));
        }
        seen.push(name);
    }
    Ok(())
}

/// kong/plugins/http-log/schema.lua's config validator: no user info in the endpoint together
/// with an `Authorization` header.
fn http_log_userinfo_authorization(config: &Map<String, Value>) -> Result<(), String> {
    let Some(endpoint) = config.get("http_endpoint").and_then(Value::as_str) else {
        return Ok(());
    };
    let has_auth_header = config
        .get("headers")
        .and_then(Value::as_object)
        .is_some_and(|h| h.keys().any(|k| k.eq_ignore_ascii_case("authorization")));
    if socket_url_parse(endpoint).userinfo.is_some() && has_auth_header {
        return Err("specifying both an 'Authorization' header and user info in 'http_endpoint' is not allowed".into());
    }
    Ok(())
}

/// `kong.tools.rand.random_string`: 24 random bytes in base64 (32 characters), each `/`
/// replaced by a random upper-case letter and each `+` by a random lower-case one.
pub fn random_string() -> String {
    use base64::Engine as _;
    use rand::Rng as _;
    let mut rng = rand::rng();
    let bytes: [u8; 24] = rng.random();
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .chars()
        .map(|c| match c {
            '/' => char::from(rng.random_range(b'A'..=b'Z')),
            '+' => char::from(rng.random_range(b'a'..=b'z')),
            c => c,
        })
        .collect()
}

/// The session plugin's `random_string`: 32 random bytes in base64, `/` `+` `=` replaced by
/// one random digit, upper-case and lower-case letter respectively.
pub fn random_base64_secret() -> String {
    use base64::Engine as _;
    use rand::Rng as _;
    let mut rng = rand::rng();
    let bytes: [u8; 32] = rng.random();
    let digit = char::from(rng.random_range(b'0'..=b'9')).to_string();
    let upper = char::from(rng.random_range(b'A'..=b'Z')).to_string();
    let lower = char::from(rng.random_range(b'a'..=b'z')).to_string();
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .replace('/', &digit)
        .replace('+', &upper)
        .replace('=', &lower)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_follow_normalize_ip() {
        assert!(kong_validate_host("example.com").is_ok());
        assert!(kong_validate_host("10.0.0.1").is_ok());
        assert!(kong_validate_host("::1").is_ok());
        assert!(kong_validate_host("-lead.example").is_ok());
        assert_eq!(
            kong_validate_host("example.com:80"),
            Err("must not have a port".into())
        );
        assert_eq!(
            kong_validate_host("example.com:99999"),
            Err("must not have a port".into())
        );
        assert_eq!(
            kong_validate_host("bad host"),
            Err("invalid value: bad host".into())
        );
        assert_eq!(
            kong_validate_host("trail-.example"),
            Err("invalid value: trail-.example".into())
        );
        assert_eq!(
            kong_validate_host("1.2.3"),
            Err("invalid value: 1.2.3".into())
        );
        assert_eq!(
            kong_validate_sni("10.0.0.1"),
            Err("must not be an IP".into())
        );
        assert!(kong_validate_sni("example.com.").is_ok());
    }

    #[test]
    fn urls_follow_socket_url() {
        let u = socket_url_parse("https://user:pw@example.com:8443/a?b#c");
        assert_eq!(u.scheme.as_deref(), Some("https"));
        assert_eq!(u.userinfo.as_deref(), Some("user:pw"));
        assert_eq!(u.host.as_deref(), Some("example.com"));
        assert_eq!(u.port.as_deref(), Some("8443"));
        assert_eq!(
            socket_url_parse("http://[::1]:80/").host.as_deref(),
            Some("::1")
        );
        assert_eq!(socket_url_parse("example.com").host, None);
        assert_eq!(socket_url_parse("localhost:8080").host, None);
        assert_eq!(
            validate_named("url", &json!("//example.com")),
            Err("missing scheme in url".into())
        );
        assert_eq!(
            validate_named("url", &json!("example.com")),
            Err("missing host in url".into())
        );
    }

    #[test]
    fn header_pairs() {
        assert!(header_pair("x-a:1", false).is_ok());
        assert!(header_pair("x-a", false).is_ok());
        assert_eq!(
            header_pair("x a:1", false),
            Err("'x a' is not a valid header".into())
        );
        assert_eq!(
            header_pair("x-a:", true),
            Err("'' is not a valid header".into())
        );
        assert!(header_pair("x-a:x-b", true).is_ok());
        assert_eq!(
            validate_named("transformer_colon_value", &json!("k:")),
            Err("key 'k' has no value".into())
        );
    }

    #[test]
    fn random_strings_have_kongs_shape() {
        let s = random_string();
        assert_eq!(s.len(), 32);
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
    }

    #[test]
    fn random_base64_secrets_have_kongs_shape() {
        let s = random_base64_secret();
        assert_eq!(s.len(), 44);
        assert!(s.bytes().all(|b| b.is_ascii_alphanumeric()), "{s}");
    }
}
