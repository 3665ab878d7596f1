//! jwt (priority 1450): `kong/plugins/jwt/handler.lua`, `jwt_parser.lua`, `daos.lua`.
//!
//! Signatures are verified with `ring`: HS256/384/512, RS256/384/512 (PKCS#1 v1.5, keys of
//! 2048 to 8192 bits), PS256/384/512, ES256, ES384 (raw `r || s`), EdDSA with Ed25519 keys.
//! ES512 and Ed448 keys, which `ring` cannot verify, are refused with a 500 whose message
//! says so, and a log line (Kong would verify them).

use std::collections::BTreeMap;
use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use http::{Method, Response};
use http_body_util::Full;
use regex::Regex;
use ring::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use serde_json::Value;

use super::auth::{credential_consumer, set_anonymous, set_consumer};
use super::request::{Ctx, error_response, json_response, unexpected_error};
use super::table::{JwtSecret, Plugins};
use super::util::{ArgValue, bool_or, header_values, opt_num, opt_str, opt_str_list, query_arg};

/// The algorithms of `daos.lua` (`alg_verify` in `jwt_parser.lua`).
const ALGORITHMS: [&str; 13] = [
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256",
    "PS384", "PS512", "EdDSA",
];

/// jwt's config.
pub(super) struct JwtConf {
    /// Query arguments holding a token.
    uri_param_names: Vec<String>,
    /// Cookies holding a token.
    cookie_names: Vec<String>,
    /// Headers holding `Bearer <token>`.
    header_names: Vec<String>,
    /// The claim (or header field) naming the secret's key.
    key_claim_name: String,
    /// Whether HMAC secrets are stored base64url-encoded.
    secret_is_base64: bool,
    /// Registered claims to verify (`exp`, `nbf`).
    claims_to_verify: Vec<String>,
    /// The anonymous consumer (id or username).
    anonymous: Option<String>,
    /// Authenticate OPTIONS requests too.
    run_on_preflight: bool,
    /// The longest lifetime a token may have, in seconds (0: no limit).
    maximum_expiration: f64,
    /// `Bearer realm="<realm>"` or `Bearer`.
    www_base: String,
    /// The same with `error="invalid_token"`.
    www_error: String,
}

impl JwtConf {
    /// Parses the config (Kong's shape, defaults filled).
    pub(super) fn parse(conf: &Value) -> Result<JwtConf, String> {
        let realm = opt_str(conf, "realm");
        let (www_base, www_error) = match &realm {
            Some(realm) => {
                let base = format!("Bearer realm=\"{realm}\"");
                let error = format!("{base}, error=\"invalid_token\"");
                (base, error)
            }
            None => (
                "Bearer".to_owned(),
                "Bearer error=\"invalid_token\"".to_owned(),
            ),
        };
        let claims_to_verify = opt_str_list(conf, "claims_to_verify")?.unwrap_or_default();
        if let Some(bad) = claims_to_verify.iter().find(|c| *c != "exp" && *c != "nbf") {
            return Err(format!("config.claims_to_verify: unknown claim '{bad}'"));
        }
        Ok(JwtConf {
            uri_param_names: opt_str_list(conf, "uri_param_names")?
                .unwrap_or_else(|| vec!["jwt".to_owned()]),
            cookie_names: opt_str_list(conf, "cookie_names")?.unwrap_or_default(),
            header_names: opt_str_list(conf, "header_names")?
                .unwrap_or_else(|| vec!["authorization".to_owned()]),
            key_claim_name: opt_str(conf, "key_claim_name").unwrap_or_else(|| "iss".to_owned()),
            secret_is_base64: bool_or(conf, "secret_is_base64", false),
            claims_to_verify,
            anonymous: opt_str(conf, "anonymous"),
            run_on_preflight: bool_or(conf, "run_on_preflight", true),
            maximum_expiration: opt_num(conf, "maximum_expiration").unwrap_or(0.0),
            www_base,
            www_error,
        })
    }
}

/// A token found in the request: a string, or a query flag with no value (Lua's `true`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Token {
    /// `?jwt` with no value.
    Flag,
    /// A token string.
    Text(String),
}

/// `\s*[Bb]earer\s+(.+)`, searched anywhere in the header.
static BEARER: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*[Bb]earer\s+(.+)").expect("static regex"));

/// The value of cookie `name` (nginx's `$cookie_<name>`: the first one, names compared
/// case-insensitively).
fn cookie(ctx: &Ctx, name: &str) -> Option<String> {
    for header in header_values(&ctx.headers, "cookie") {
        for pair in header.split(';') {
            if let Some((k, v)) = pair.trim_start().split_once('=')
                && k.trim().eq_ignore_ascii_case(name)
            {
                return Some(v.trim().to_owned());
            }
        }
    }
    None
}

/// Kong's `retrieve_tokens`: the distinct tokens in the query, cookies and headers.
fn retrieve_tokens(conf: &JwtConf, ctx: &Ctx) -> Vec<Token> {
    let mut set: std::collections::BTreeSet<Token> = Default::default();
    for name in &conf.uri_param_names {
        match query_arg(ctx.query.as_deref(), name) {
            Some(ArgValue::One(t)) if !t.is_empty() => {
                set.insert(Token::Text(t));
            }
            Some(ArgValue::Flag) => {
                set.insert(Token::Flag);
            }
            Some(ArgValue::Many(values)) => {
                for value in values {
                    if let ArgValue::One(t) = value
                        && !t.is_empty()
                    {
                        set.insert(Token::Text(t));
                    }
                }
            }
            _ => {}
        }
    }
    for name in &conf.cookie_names {
        if let Some(value) = cookie(ctx, name)
            && !value.is_empty()
        {
            set.insert(Token::Text(value));
        }
    }
    for name in &conf.header_names {
        if let Some(value) = header_values(&ctx.headers, name).into_iter().next()
            && let Some(found) = BEARER.captures(&value).and_then(|c| c.get(1))
            && !found.as_str().is_empty()
        {
            set.insert(Token::Text(found.as_str().to_owned()));
        }
    }
    set.into_iter().collect()
}

/// Base64url decoding as `jwt_parser.lua` does it: padding optional.
fn b64url(input: &str) -> Option<Vec<u8>> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    engine.decode(input).ok()
}

/// A decoded token (`decode_token`).
struct Jwt {
    /// `header_64 . "." . claims_64`, the signed bytes.
    signed: String,
    /// The header.
    header: serde_json::Map<String, Value>,
    /// The claims.
    claims: serde_json::Map<String, Value>,
    /// The signature bytes.
    signature: Vec<u8>,
    /// The algorithm (one of [`ALGORITHMS`]).
    alg: String,
}

/// Why a token or its verification failed.
enum Failure {
    /// A 401 with `{"message"}` and a `WWW-Authenticate` header (base or with error).
    Unauthorized(String, bool),
    /// A 401 with `{"message"}` and no `WWW-Authenticate` (the consumer of a secret is gone).
    NoConsumer(String),
    /// A 401 with the claim errors as the body (`kong.response.exit`).
    Claims(BTreeMap<String, Value>),
    /// A Lua error in Kong (an assertion): 500 "An unexpected error occurred".
    Unexpected(String),
    /// Something `ring` cannot verify: a visible refusal.
    Unsupported(String),
}

/// Kong's `decode_token`: `Err` is the "Bad token; ..." reason, or a Lua error.
fn decode(token: &str) -> Result<Jwt, Failure> {
    let bad = |reason: &str| Failure::Unauthorized(format!("Bad token; {reason}"), true);
    // `tokenize(token, ".", 3)`: the third part keeps any further dots.
    let mut parts = token.splitn(3, '.');
    let header_64 = parts.next().unwrap_or_default();
    let (Some(claims_64), Some(signature_64)) = (parts.next(), parts.next()) else {
        return Err(bad("invalid JSON"));
    };
    let header: Value = b64url(header_64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("invalid JSON"))?;
    let claims: Value = b64url(claims_64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| bad("invalid JSON"))?;
    let Value::Object(header) = header else {
        return Err(Failure::Unexpected(
            "jwt header is not a JSON object".to_owned(),
        ));
    };
    let alg = match header.get("alg") {
        Some(Value::String(alg)) if ALGORITHMS.contains(&alg.as_str()) => alg.clone(),
        _ => return Err(bad("invalid alg")),
    };
    let claims = match claims {
        Value::Null => return Err(bad("invalid claims")),
        Value::Object(claims) => claims,
        _ => {
            return Err(Failure::Unexpected(
                "jwt claims are not a JSON object".to_owned(),
            ));
        }
    };
    let signature = b64url(signature_64).ok_or_else(|| bad("invalid signature"))?;
    Ok(Jwt {
        signed: format!("{header_64}.{claims_64}"),
        header,
        claims,
        signature,
        alg,
    })
}

/// The DER of the first PEM block in `pem`, with its label.
fn pem_der(pem: &str) -> Option<(String, Vec<u8>)> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.trim().as_bytes()).ok()?;
    Some((parsed.label, parsed.contents))
}

/// The key bytes `ring` wants from a public key PEM, with the key's algorithm OID: for
/// SubjectPublicKeyInfo, the subjectPublicKey bits (RSAPublicKey DER, an EC point, an
/// Ed25519 key); a PKCS#1 `RSA PUBLIC KEY` block is already RSAPublicKey.
fn public_key(pem: &str) -> Option<(String, Vec<u8>)> {
    use x509_parser::prelude::FromDer;
    let (label, der) = pem_der(pem)?;
    if label == "RSA PUBLIC KEY" {
        return Some(("1.2.840.113549.1.1.1".to_owned(), der));
    }
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).ok()?;
    Some((
        spki.algorithm.algorithm.to_id_string(),
        spki.subject_public_key.data.to_vec(),
    ))
}

/// Verifies the signature with the secret value (`verify_signature`).
fn verify_signature(jwt: &Jwt, key: &[u8]) -> Result<bool, Failure> {
    let data = jwt.signed.as_bytes();
    let hmac =
        |alg| ring::hmac::verify(&ring::hmac::Key::new(alg, key), data, &jwt.signature).is_ok();
    let alg = jwt.alg.as_str();
    match alg {
        "HS256" => return Ok(hmac(ring::hmac::HMAC_SHA256)),
        "HS384" => return Ok(hmac(ring::hmac::HMAC_SHA384)),
        "HS512" => return Ok(hmac(ring::hmac::HMAC_SHA512)),
        _ => {}
    }
    let pem = String::from_utf8_lossy(key);
    let Some((oid, key)) = public_key(&pem) else {
        return Err(Failure::Unexpected(
            "Consumer Public Key is Invalid".to_owned(),
        ));
    };
    // The signature lengths `jwt_parser.lua` asserts (a Lua error: 500).
    let expected_len = match alg {
        "ES256" => Some(64),
        "ES384" => Some(96),
        "PS256" | "PS384" | "PS512" => Some(256),
        _ => None,
    };
    if let Some(len) = expected_len
        && jwt.signature.len() != len
    {
        return Err(Failure::Unexpected(format!(
            "Signature must be {len} bytes"
        )));
    }
    let algorithm: &'static dyn VerificationAlgorithm = match (alg, oid.as_str()) {
        ("RS256", _) => &signature::RSA_PKCS1_2048_8192_SHA256,
        ("RS384", _) => &signature::RSA_PKCS1_2048_8192_SHA384,
        ("RS512", _) => &signature::RSA_PKCS1_2048_8192_SHA512,
        ("PS256", _) => &signature::RSA_PSS_2048_8192_SHA256,
        ("PS384", _) => &signature::RSA_PSS_2048_8192_SHA384,
        ("PS512", _) => &signature::RSA_PSS_2048_8192_SHA512,
        ("ES256", _) => &signature::ECDSA_P256_SHA256_FIXED,
        ("ES384", _) => &signature::ECDSA_P384_SHA384_FIXED,
        // Ed25519's OID; Ed448 (1.3.101.113) is not in ring.
        ("EdDSA", "1.3.101.112") => &signature::ED25519,
        ("EdDSA", _) => {
            return Err(Failure::Unsupported(
                "EdDSA keys other than Ed25519".to_owned(),
            ));
        }
        ("ES512", _) => return Err(Failure::Unsupported("ES512".to_owned())),
        (other, _) => return Err(Failure::Unsupported(other.to_owned())),
    };
    Ok(UnparsedPublicKey::new(algorithm, key)
        .verify(data, &jwt.signature)
        .is_ok())
}

/// Kong's `verify_registered_claims` then `check_maximum_expiration`.
fn verify_claims(conf: &JwtConf, jwt: &Jwt, now: u64) -> Result<(), Failure> {
    let now = now as f64;
    let mut errors = BTreeMap::new();
    for name in &conf.claims_to_verify {
        match jwt.claims.get(name).and_then(Value::as_f64) {
            None => {
                errors.insert(name.clone(), Value::from("must be a number"));
            }
            Some(value) => {
                if name == "nbf" && value > now {
                    errors.insert(name.clone(), Value::from("token not valid yet"));
                }
                if name == "exp" && value <= now {
                    errors.insert(name.clone(), Value::from("token expired"));
                }
            }
        }
    }
    if !errors.is_empty() {
        return Err(Failure::Claims(errors));
    }
    if conf.maximum_expiration > 0.0 {
        let exceeds = match jwt.claims.get("exp").and_then(Value::as_f64) {
            None => true,
            Some(exp) => exp - now > conf.maximum_expiration,
        };
        if exceeds {
            let mut errors = BTreeMap::new();
            errors.insert(
                "exp".to_owned(),
                Value::from("exceeds maximum allowed expiration"),
            );
            return Err(Failure::Claims(errors));
        }
    }
    Ok(())
}

/// Kong's `do_authentication`.
fn authenticate(plugins: &Plugins, conf: &JwtConf, ctx: &mut Ctx) -> Result<(), Failure> {
    let unauthorized = |message: String| Failure::Unauthorized(message, true);
    let tokens = retrieve_tokens(conf, ctx);
    let token = match tokens.as_slice() {
        [] => return Err(Failure::Unauthorized("Unauthorized".to_owned(), false)),
        [Token::Text(token)] => token.clone(),
        [Token::Flag] => return Err(unauthorized("Unrecognizable token".to_owned())),
        _ => return Err(unauthorized("Multiple tokens provided".to_owned())),
    };
    let jwt = decode(&token)?;
    let claim = &conf.key_claim_name;
    let key = match jwt
        .claims
        .get(claim)
        .filter(|v| !matches!(v, Value::Null | Value::Bool(false)))
    {
        Some(value) => Some(value),
        None => jwt
            .header
            .get(claim)
            .filter(|v| !matches!(v, Value::Null | Value::Bool(false))),
    };
    let key = match key {
        None => return Err(unauthorized(format!("No mandatory '{claim}' in claims"))),
        Some(Value::String(s)) if s.is_empty() => {
            return Err(unauthorized(format!("Invalid '{claim}' in claims")));
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    };
    let data = plugins.ws_data(&ctx.ws_id);
    let Some(secret): Option<&JwtSecret> = data.jwt.get(&key) else {
        return Err(unauthorized(format!(
            "No credentials found for given '{claim}'"
        )));
    };
    if jwt.alg != secret.algorithm {
        return Err(unauthorized("Invalid algorithm".to_owned()));
    }
    let symmetric = secret.algorithm.starts_with("HS");
    let value: Option<Vec<u8>> = if symmetric && conf.secret_is_base64 {
        secret.secret.as_deref().and_then(b64url)
    } else if symmetric {
        secret.secret.as_ref().map(|s| s.as_bytes().to_vec())
    } else {
        secret
            .rsa_public_key
            .as_ref()
            .map(|s| s.as_bytes().to_vec())
    };
    let Some(value) = value else {
        return Err(unauthorized("Invalid key/secret".to_owned()));
    };
    if !verify_signature(&jwt, &value)? {
        return Err(unauthorized("Invalid signature".to_owned()));
    }
    verify_claims(conf, &jwt, plugins.clock.now_secs())?;
    let credential = secret.credential.clone();
    let Some(consumer) = credential_consumer(plugins, ctx, &credential) else {
        return Err(Failure::NoConsumer(format!(
            "Could not find consumer for '{claim}={key}'"
        )));
    };
    set_consumer(ctx, consumer, Some(credential));
    Ok(())
}

/// The access phase.
pub(super) fn access(
    plugins: &Plugins,
    conf: &JwtConf,
    ctx: &mut Ctx,
) -> Option<Response<Full<Bytes>>> {
    if !conf.run_on_preflight && ctx.method == Method::OPTIONS {
        return None;
    }
    if conf.anonymous.is_some() && ctx.credential.is_some() {
        return None;
    }
    let failure = match authenticate(plugins, conf, ctx) {
        Ok(()) => return None,
        Err(failure) => failure,
    };
    // Lua errors and refusals are not authentication failures: Kong's error propagates.
    match failure {
        Failure::Unexpected(reason) => {
            tracing::error!("jwt: {reason}");
            return Some(unexpected_error());
        }
        Failure::Unsupported(what) => {
            tracing::error!(
                "jwt: {what} is not supported by this data plane (ring cannot verify it)"
            );
            let message = format!("JWT algorithm {what} is not supported by this data plane");
            return Some(error_response(500, &message, &[]));
        }
        _ => {}
    }
    if let Some(anonymous) = &conf.anonymous {
        return set_anonymous(plugins, ctx, anonymous);
    }
    match failure {
        Failure::Unauthorized(message, with_error) => {
            let www = if with_error {
                conf.www_error.clone()
            } else {
                conf.www_base.clone()
            };
            Some(json_response(
                401,
                &serde_json::json!({ "message": message }),
                &[("www-authenticate", www)],
            ))
        }
        Failure::NoConsumer(message) => Some(json_response(
            401,
            &serde_json::json!({ "message": message }),
            &[],
        )),
        Failure::Claims(errors) => {
            let body = Value::Object(errors.into_iter().collect());
            Some(json_response(
                401,
                &body,
                &[("www-authenticate", conf.www_error.clone())],
            ))
        }
        Failure::Unexpected(_) | Failure::Unsupported(_) => None,
    }
}
