//! The consistent-hashing key of one request: `hash_on`, then `hash_fallback`
//! (`get_value_to_hash` in `kong/runloop/balancer/init.lua`).

use percent_encoding::percent_decode_str;

use super::config::HashOn;
use super::{HashCookie, HashInput};

/// The value of one hash input for a request, or `None` when the request lacks it. A
/// present but empty value counts as present (Kong tests Lua truthiness, and `""` is true).
/// The cookie input never misses: an absent cookie gets a fresh uuid, returned in the second
/// slot so the proxy sets it on the response.
pub(super) fn input_value(
    on: &HashOn,
    input: &HashInput<'_>,
    cookie_path: &str,
) -> (Option<String>, Option<HashCookie>) {
    match on {
        HashOn::None => (None, None),
        HashOn::Consumer => (input.consumer_id.map(str::to_owned), None),
        HashOn::Ip => (Some(input.client_ip.to_string()), None),
        HashOn::Header(name) => (header_value(input.headers, name), None),
        HashOn::Cookie(name) => match cookie_value(input.headers, name) {
            Some(value) => (Some(value), None),
            None => {
                let value = uuid::Uuid::new_v4().to_string();
                let cookie = HashCookie {
                    name: name.clone(),
                    value: value.clone(),
                    path: cookie_path.to_owned(),
                };
                (Some(value), Some(cookie))
            }
        },
        HashOn::Path => (Some(input.path.to_owned()), None),
        HashOn::QueryArg(name) => (input.query.and_then(|q| query_arg(q, name)), None),
        HashOn::UriCapture(name) => ((input.captures)(name), None),
    }
}

/// All values of a header joined with `", "`, as nginx's `$http_*` variables give them
/// since nginx 1.23 (Kong's comment in `get_value_to_hash`).
/// nginx names the variable with dashes as underscores, so a configured `x_user` also reads
/// the `x-user` header.
fn header_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() && name.contains('_') {
        values = headers.get_all(name.replace('_', "-")).iter().peekable();
    }
    values.peek()?;
    let joined: Vec<String> = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    Some(joined.join(", "))
}

/// The first cookie of that name in the `Cookie` headers (nginx's `$cookie_*`).
fn cookie_value(headers: &http::HeaderMap, name: &str) -> Option<String> {
    for header in headers.get_all(http::header::COOKIE) {
        let header = String::from_utf8_lossy(header.as_bytes());
        for pair in header.split(';') {
            if let Some((k, v)) = pair.trim().split_once('=')
                && k.trim() == name
            {
                return Some(v.trim().to_owned());
            }
        }
    }
    None
}

/// Decodes one query component: `+` is a space, then percent-decoding.
fn decode(part: &str) -> String {
    let spaced = part.replace('+', " ");
    percent_decode_str(&spaced).decode_utf8_lossy().into_owned()
}

/// A query argument as Kong normalises it (`get_query_arg` in `init.lua`): a bare `name`
/// (no `=`) is `"true"`, several values are sorted and joined with `,`.
fn query_arg(query: &str, name: &str) -> Option<String> {
    let mut values: Vec<String> = query
        .split('&')
        .filter(|piece| !piece.is_empty())
        .filter_map(|piece| {
            let (k, v) = match piece.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (piece, None),
            };
            (decode(k) == name).then(|| v.map_or_else(|| "true".to_owned(), decode))
        })
        .collect();
    match values.len() {
        0 => None,
        1 => values.pop(),
        _ => {
            values.sort();
            Some(values.join(","))
        }
    }
}
