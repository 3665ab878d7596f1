//! key-auth (priority 1250): `kong/plugins/key-auth/handler.lua`.

use bytes::Bytes;
use http::{Method, Response};
use http_body_util::Full;
use serde_json::Value;

use super::auth::{credential_consumer, set_anonymous, set_consumer};
use super::request::{Ctx, error_response, unexpected_error};
use super::table::Plugins;
use super::util::{
    ArgValue, bool_or, clear_query_arg, header_key, header_values, opt_str, opt_str_list, query_arg,
};

/// key-auth's config.
pub(super) struct KeyAuthConf {
    /// Where to look for the key, in order.
    key_names: Vec<String>,
    /// Whether to strip the key before proxying.
    hide_credentials: bool,
    /// The anonymous consumer (id or username).
    anonymous: Option<String>,
    /// Look in the headers.
    key_in_header: bool,
    /// Look in the query string.
    key_in_query: bool,
    /// Look in the body.
    key_in_body: bool,
    /// Authenticate OPTIONS requests too.
    run_on_preflight: bool,
    /// The `WWW-Authenticate` value: `Key realm="<realm>"` or `Key`.
    www_authenticate: String,
}

impl KeyAuthConf {
    /// Parses the config (Kong's shape, defaults filled).
    pub(super) fn parse(conf: &Value) -> Result<KeyAuthConf, String> {
        let realm = opt_str(conf, "realm");
        Ok(KeyAuthConf {
            key_names: opt_str_list(conf, "key_names")?
                .unwrap_or_else(|| vec!["apikey".to_owned()]),
            hide_credentials: bool_or(conf, "hide_credentials", false),
            anonymous: opt_str(conf, "anonymous"),
            key_in_header: bool_or(conf, "key_in_header", true),
            key_in_query: bool_or(conf, "key_in_query", true),
            key_in_body: bool_or(conf, "key_in_body", false),
            run_on_preflight: bool_or(conf, "run_on_preflight", true),
            www_authenticate: match realm {
                Some(realm) => format!("Key realm=\"{realm}\""),
                None => "Key".to_owned(),
            },
        })
    }
}

/// A parsed request body, as Kong's `kong.request.get_body()` gives it.
enum Body {
    /// Not parsable (no or another content type, bad syntax): Kong's `EMPTY`.
    Empty,
    /// `application/x-www-form-urlencoded`: the raw pairs, in order.
    Form(Vec<(String, String)>),
    /// `application/json` object.
    Json(serde_json::Map<String, Value>),
}

impl Body {
    /// `body[name]`: a string key, a duplicate (table), or nothing usable.
    fn get(&self, name: &str) -> Option<ArgValue> {
        match self {
            Body::Empty => None,
            Body::Form(pairs) => {
                let mut values: Vec<ArgValue> = pairs
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| ArgValue::One(v.clone()))
                    .collect();
                match values.len() {
                    0 => None,
                    1 => values.pop(),
                    _ => Some(ArgValue::Many(values)),
                }
            }
            Body::Json(map) => match map.get(name)? {
                Value::String(s) => Some(ArgValue::One(s.clone())),
                Value::Array(_) | Value::Object(_) => Some(ArgValue::Many(Vec::new())),
                // A number or boolean is neither a string nor a table: ignored.
                _ => Some(ArgValue::Flag),
            },
        }
    }

    /// Removes `name` and re-encodes the body (Kong's `kong.service.request.set_body`).
    fn without(&self, name: &str) -> Option<Bytes> {
        match self {
            Body::Empty => None,
            Body::Form(pairs) => {
                let mut out = form_urlencoded::Serializer::new(String::new());
                for (k, v) in pairs.iter().filter(|(k, _)| k != name) {
                    out.append_pair(k, v);
                }
                Some(Bytes::from(out.finish()))
            }
            Body::Json(map) => {
                let mut map = map.clone();
                map.remove(name);
                serde_json::to_vec(&Value::Object(map))
                    .ok()
                    .map(Bytes::from)
            }
        }
    }
}

/// Reads and parses the body by its content type.
async fn read_body(ctx: &mut Ctx) -> Body {
    let content_type = ctx
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let Some(bytes) = ctx.body().await else {
        return Body::Empty;
    };
    if content_type.starts_with("application/x-www-form-urlencoded") {
        Body::Form(
            form_urlencoded::parse(&bytes)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    } else if content_type.starts_with("application/json") {
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Body::Json(map),
            _ => Body::Empty,
        }
    } else {
        tracing::info!("key-auth: cannot process request body of content type {content_type:?}");
        Body::Empty
    }
}

/// Why authentication failed: the status, message and `WWW-Authenticate`.
struct Failure {
    /// The status.
    status: u16,
    /// The message.
    message: &'static str,
}

/// Kong's `do_authentication`: finds the key, the credential and its consumer.
async fn authenticate(plugins: &Plugins, conf: &KeyAuthConf, ctx: &mut Ctx) -> Result<(), Failure> {
    let unauthorized = |message| Failure {
        status: 401,
        message,
    };
    let mut key: Option<String> = None;
    let mut body: Option<Body> = None;
    for name in &conf.key_names {
        let mut value: Option<ArgValue> = None;
        if conf.key_in_header {
            let mut values = header_values(&ctx.headers, name);
            value = match values.len() {
                0 => None,
                1 => values.pop().map(ArgValue::One),
                _ => Some(ArgValue::Many(
                    values.into_iter().map(ArgValue::One).collect(),
                )),
            };
        }
        if value.is_none() && conf.key_in_query {
            value = query_arg(ctx.query.as_deref(), name);
        }
        if value.is_none() && conf.key_in_body {
            if body.is_none() {
                body = Some(read_body(ctx).await);
            }
            value = body.as_ref().and_then(|b| b.get(name));
        }
        match value {
            Some(ArgValue::One(found)) => {
                if conf.hide_credentials {
                    clear_query_arg(&mut ctx.query, name);
                    ctx.headers.remove(header_key(name).as_str());
                    if conf.key_in_body {
                        if body.is_none() {
                            body = Some(read_body(ctx).await);
                        }
                        if let Some(new_body) = body.as_ref().and_then(|b| b.without(name)) {
                            ctx.new_body = Some(new_body);
                        }
                    }
                }
                key = Some(found);
                break;
            }
            Some(ArgValue::Many(_)) => return Err(unauthorized("Duplicate API key found")),
            Some(ArgValue::Flag) | None => {}
        }
    }
    let key = match key {
        Some(key) if !key.is_empty() => key,
        _ => return Err(unauthorized("No API key found in request")),
    };
    let now_ms = plugins.clock.now_ms();
    let Some(credential) = plugins
        .ws_data(&ctx.ws_id)
        .keyauth
        .get(&key)
        .filter(|k| k.expires_ms.is_none_or(|at| at > now_ms))
        .map(|k| k.credential.clone())
    else {
        return Err(unauthorized("Unauthorized"));
    };
    let Some(consumer) = credential_consumer(plugins, ctx, &credential) else {
        tracing::error!(credential = %credential.id, "key-auth: the credential's consumer does not exist");
        return Err(Failure {
            status: 500,
            message: "An unexpected error occurred",
        });
    };
    set_consumer(ctx, consumer, Some(credential));
    Ok(())
}

/// The access phase.
pub(super) async fn access(
    plugins: &Plugins,
    conf: &KeyAuthConf,
    ctx: &mut Ctx,
) -> Option<Response<Full<Bytes>>> {
    if !conf.run_on_preflight && ctx.method == Method::OPTIONS {
        return None;
    }
    match &conf.anonymous {
        Some(anonymous) => {
            // Logical OR: already authenticated by another plugin (a credential is set).
            if ctx.credential.is_some() {
                return None;
            }
            if authenticate(plugins, conf, ctx).await.is_err() {
                return set_anonymous(plugins, ctx, anonymous);
            }
            None
        }
        None => match authenticate(plugins, conf, ctx).await {
            Ok(()) => None,
            Err(failure) if failure.status == 500 => Some(unexpected_error()),
            Err(failure) => Some(error_response(
                failure.status,
                failure.message,
                &[("www-authenticate", conf.www_authenticate.clone())],
            )),
        },
    }
}
