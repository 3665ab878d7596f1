//! basic-auth (priority 1100): `kong/plugins/basic-auth/access.lua` and `crypto.lua`.

use std::sync::LazyLock;

use base64::Engine;
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use regex::Regex;
use serde_json::Value;
use sha1::{Digest, Sha1};

use super::auth::{credential_consumer, set_anonymous, set_consumer};
use super::request::{Ctx, error_response};
use super::table::Plugins;
use super::util::{bool_or, header_first, opt_str};

/// basic-auth's config.
pub(super) struct BasicAuthConf {
    /// The anonymous consumer (id or username).
    anonymous: Option<String>,
    /// Whether to strip the credentials' header before proxying.
    hide_credentials: bool,
    /// `Basic realm="<realm>"`.
    www_authenticate: String,
}

impl BasicAuthConf {
    /// Parses the config (Kong's shape, defaults filled).
    pub(super) fn parse(conf: &Value) -> Result<BasicAuthConf, String> {
        let realm = opt_str(conf, "realm").unwrap_or_else(|| "service".to_owned());
        Ok(BasicAuthConf {
            anonymous: opt_str(conf, "anonymous"),
            hide_credentials: bool_or(conf, "hide_credentials", false),
            www_authenticate: format!("Basic realm=\"{realm}\""),
        })
    }
}

/// Kong's `crypto.hash`: hex sha1 of `password .. consumer_id`.
pub(super) fn hash_password(consumer_id: &str, password: &str) -> String {
    let mut digest = Sha1::new();
    digest.update(password.as_bytes());
    digest.update(consumer_id.as_bytes());
    hex::encode(digest.finalize())
}

/// Decodes base64 as nginx's `ngx.decode_base64` does: the standard alphabet, padding optional.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let trimmed = input.trim_end_matches('=');
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone)
            .with_decode_allow_trailing_bits(true),
    );
    engine.decode(trimmed).ok()
}

/// `\s*[Bb]asic\s*(.+)`, searched anywhere in the header (`ngx.re.gmatch`, first match).
static BASIC: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\s*[Bb]asic\s*(.+)").expect("static regex"));

/// `([^:]+):(.*)`, searched anywhere in the decoded credentials.
static PARTS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"([^:]+):(.*)").expect("static regex"));

/// Kong's `retrieve_credentials`: the header's `Basic` value, base64-decoded, split at the
/// first colon that follows a non-empty username.
fn parse_authorization(value: &str) -> Option<(String, String)> {
    let encoded = BASIC.captures(value)?.get(1)?.as_str();
    let decoded = decode_base64(encoded)?;
    let decoded = String::from_utf8_lossy(&decoded);
    let parts = PARTS.captures(&decoded)?;
    Some((parts[1].to_owned(), parts[2].to_owned()))
}

/// Reads one header's credentials, and strips the header when `hide_credentials` is set.
fn retrieve(
    ctx: &mut Ctx,
    conf: &BasicAuthConf,
    header: &'static str,
    value: Option<&str>,
) -> Option<(String, String)> {
    let found = value.and_then(parse_authorization);
    if conf.hide_credentials {
        ctx.headers.remove(header);
    }
    found
}

/// Kong's `do_authentication`; `Err` is a 401 "Unauthorized".
fn authenticate(plugins: &Plugins, conf: &BasicAuthConf, ctx: &mut Ctx) -> Result<(), ()> {
    let authorization = header_first(&ctx.headers, "authorization");
    let proxy_authorization = header_first(&ctx.headers, "proxy-authorization");
    if authorization.is_none() && proxy_authorization.is_none() {
        return Err(());
    }
    let data = plugins.ws_data(&ctx.ws_id);
    let mut found = None;
    if let Some((username, password)) = retrieve(
        ctx,
        conf,
        "proxy-authorization",
        proxy_authorization.as_deref(),
    ) && let Some(credential) = data.basicauth.get(&username)
    {
        found = Some((credential, password));
    }
    if found.is_none() {
        let (username, password) =
            retrieve(ctx, conf, "authorization", authorization.as_deref()).ok_or(())?;
        found = data
            .basicauth
            .get(&username)
            .map(|credential| (credential, password));
    }
    let (credential, password) = found.ok_or(())?;
    if hash_password(&credential.credential.consumer_id, &password) != credential.password_hash {
        return Err(());
    }
    let credential = credential.credential.clone();
    let Some(consumer) = credential_consumer(plugins, ctx, &credential) else {
        tracing::error!(credential = %credential.id, "basic-auth: the credential's consumer does not exist");
        return Err(());
    };
    set_consumer(ctx, consumer, Some(credential));
    Ok(())
}

/// The access phase.
pub(super) fn access(
    plugins: &Plugins,
    conf: &BasicAuthConf,
    ctx: &mut Ctx,
) -> Option<Response<Full<Bytes>>> {
    if conf.anonymous.is_some() && ctx.credential.is_some() {
        return None;
    }
    if authenticate(plugins, conf, ctx).is_ok() {
        return None;
    }
    match &conf.anonymous {
        Some(anonymous) => set_anonymous(plugins, ctx, anonymous),
        None => Some(error_response(
            401,
            "Unauthorized",
            &[("www-authenticate", conf.www_authenticate.clone())],
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The header parsing of `access.lua`'s `retrieve_credentials`.
    #[test]
    fn parses_authorization_like_kong() {
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        assert_eq!(
            parse_authorization(&format!("Basic {}", enc("bob:secret"))),
            Some(("bob".into(), "secret".into()))
        );
        assert_eq!(
            parse_authorization(&format!("basic {}", enc("bob:a:b"))),
            Some(("bob".into(), "a:b".into()))
        );
        assert_eq!(
            parse_authorization(&format!("Basic {}", enc("bob:"))),
            Some(("bob".into(), "".into()))
        );
        assert_eq!(parse_authorization(&format!("Basic {}", enc("bob"))), None);
        assert_eq!(parse_authorization(&format!("Basic {}", enc(":x"))), None);
        assert_eq!(parse_authorization("Bearer abc"), None);
        assert_eq!(parse_authorization("Basic !!!"), None);
        // Unpadded base64 is accepted, as ngx.decode_base64 does.
        assert_eq!(
            parse_authorization("Basic Ym9iOng"),
            Some(("bob".into(), "x".into()))
        );
    }

    /// The stored hash of `crypto.lua`: sha1 hex of password .. consumer_id.
    #[test]
    fn hashes_like_kong() {
        let mut d = Sha1::new();
        d.update(b"secretc1");
        assert_eq!(hash_password("c1", "secret"), hex::encode(d.finalize()));
        assert_eq!(hash_password("c1", "secret").len(), 40);
    }
}
