//! The request path before matching (query stripped, normalised) and the upstream path after.
//!
//! Normalisation follows `kong/tools/uri.lua` (`normalize(uri, merge_slashes = true)`) as
//! `kong/router/utils.lua` (`strip_uri_args`) calls it; the upstream path follows
//! `get_upstream_uri_v0` and `sanitize_uri_postfix` in `kong/router/utils.lua`, driven by
//! `set_upstream_uri` in `kong/router/atc.lua`.

use std::borrow::Cow;

/// Kong's path normalisation before matching, with the query stripped first.
///
/// The query starts at the first `?` after the first byte (`strip_uri_args`). Then
/// `kong/tools/uri.lua` `normalize` percent-decodes every triplet except reserved characters
/// (`!*'();:@&=+$,/?%#[]`, whose triplets are upper-cased instead), removes dot segments
/// (RFC 3986) and merges repeated slashes. Bytes that decode to invalid UTF-8 are replaced
/// (lossy) here; the router itself answers no match for such a path, as Kong does.
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    match crate::uri::normalize(strip_query(raw)) {
        Cow::Borrowed(b) => String::from_utf8_lossy(b),
        Cow::Owned(v) => Cow::Owned(String::from_utf8_lossy(&v).into_owned()),
    }
}

/// The normalised path for matching, or `None` when decoding produced invalid UTF-8.
///
/// Kong's router then fails with "invalid utf-8 sequence" and answers 404
/// (`spec/01-unit/08-router_spec.lua`, "gracefully handles invalid utf-8 sequences").
pub(crate) fn normalize_for_match(raw: &str) -> Option<Cow<'_, str>> {
    match crate::uri::normalize(strip_query(raw)) {
        Cow::Borrowed(b) => std::str::from_utf8(b).ok().map(Cow::Borrowed),
        Cow::Owned(v) => String::from_utf8(v).ok().map(Cow::Owned),
    }
}

/// The upstream request path as Kong's `path_handling = "v0"` computes it.
///
/// `service_path` is the service's path (`None` = `/`); `request_path` is the normalised
/// request path without its query (Kong's `set_upstream_uri` receives the output of
/// `strip_uri_args`, not the raw path); `matched_path` is the route path that matched (the
/// prefix, or the whole regex match), used only when `strip_path` is true. The caller
/// appends the query string. See `get_upstream_uri_v0` in `kong/router/utils.lua`.
pub fn upstream_path_v0(
    service_path: Option<&str>,
    request_path: &str,
    matched_path: Option<&str>,
    strip_path: bool,
) -> String {
    let base = service_path.unwrap_or("/");
    let prefix = if strip_path { matched_path } else { None }.unwrap_or("/");
    // Kong takes the bytes after the prefix's length (`req_uri:sub(#request_prefix + 1)`).
    let rest = request_path.as_bytes().get(prefix.len()..).unwrap_or(b"");
    let rest = String::from_utf8_lossy(rest);
    let postfix = sanitize_postfix(&rest);
    let req_ends_with_slash = request_path.ends_with('/');

    if let Some(base_no_slash) = base.strip_suffix('/') {
        if !strip_path {
            // Keep the incoming path, after the base, without its first slash.
            let tail = request_path.get(1..).unwrap_or("");
            return format!("{base}{tail}");
        }
        if postfix.is_empty() {
            if base == "/" || req_ends_with_slash {
                return base.to_string();
            }
            return base_no_slash.to_string();
        }
        if postfix.starts_with('/') {
            return format!("{base_no_slash}{postfix}");
        }
        return format!("{base}{postfix}");
    }

    if strip_path {
        if postfix.is_empty() {
            if request_path.len() > 1 && req_ends_with_slash {
                return format!("{base}/");
            }
            return base.to_string();
        }
        if postfix.starts_with('/') {
            return format!("{base}{postfix}");
        }
        return format!("{base}/{postfix}");
    }

    if request_path == "/" {
        return base.to_string();
    }
    format!("{base}{request_path}")
}

/// Kong's `sanitize_uri_postfix`: drops a leading `.`/`..` segment left after the prefix.
fn sanitize_postfix(postfix: &str) -> &str {
    if postfix == "." || postfix == ".." {
        return "";
    }
    if let Some(rest) = postfix.strip_prefix("./") {
        return rest;
    }
    if let Some(rest) = postfix.strip_prefix("../") {
        return rest;
    }
    postfix
}

/// Cuts the query: Kong searches `?` from the second byte on.
fn strip_query(raw: &str) -> &str {
    match raw.as_bytes().iter().skip(1).position(|&b| b == b'?') {
        Some(idx) => &raw[..idx + 1],
        None => raw,
    }
}
