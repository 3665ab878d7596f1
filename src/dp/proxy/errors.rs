//! Responses the proxy makes itself, in Kong's shapes.
//!
//! Kong renders an error body from one template per format (`kong/tools/http.lua`,
//! `ERROR_TEMPLATES`), chosen from the request's `Accept` header by quality
//! (`get_response_type`). Errors raised by the runloop and plugins
//! (`kong.response.error`, `kong/pdk/response.lua`: no route, 426, plugin refusals) look at
//! `Accept` only; errors nginx raises while proxying (`kong/error_handlers.lua`: 502, 503,
//! 504) fall back to the request's `Content-Type` when there is no `Accept`. Without either,
//! Kong's `error_default_type` (`text/plain`) applies to the latter and JSON to the former.

use http::StatusCode;
use http::header::{ACCEPT, CONTENT_TYPE, HeaderMap};

/// A body format Kong renders errors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Html,
    Xml,
    Plain,
    /// `application/grpc`: the JSON body, without a content type (Kong leaves it to the
    /// gRPC status headers).
    Grpc,
}

impl Format {
    /// The `Content-Type` of a body in this format (none for gRPC).
    pub fn content_type(self) -> Option<&'static str> {
        match self {
            Format::Json => Some("application/json; charset=utf-8"),
            Format::Html => Some("text/html; charset=utf-8"),
            Format::Xml => Some("application/xml; charset=utf-8"),
            Format::Plain => Some("text/plain; charset=utf-8"),
            Format::Grpc => None,
        }
    }
}

/// Which headers choose the format (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `kong.response.error`: `Accept`, else JSON.
    Runloop,
    /// `kong/error_handlers.lua`: `Accept`, else `Content-Type`, else plain text.
    Proxying,
}

/// The message Kong's error handler gives each status it renders.
pub fn proxying_message(status: StatusCode) -> String {
    match status.as_u16() {
        400 => "Bad request".into(),
        404 => "Not found".into(),
        405 => "Method not allowed".into(),
        408 => "Request timeout".into(),
        411 => "Length required".into(),
        412 => "Precondition failed".into(),
        413 => "Payload too large".into(),
        414 => "URI too long".into(),
        417 => "Expectation failed".into(),
        500 => "An unexpected error occurred".into(),
        502 => "An invalid response was received from the upstream server".into(),
        503 => "The upstream server is currently unavailable".into(),
        504 => "The upstream server is timing out".into(),
        s => format!("The upstream server responded with {s}"),
    }
}

/// The format for a request's headers.
pub fn format_for(headers: &HeaderMap, source: Source) -> Format {
    let accept = header_str(headers, ACCEPT);
    let chosen = match (accept, source) {
        (Some(a), _) => a,
        (None, Source::Proxying) => match header_str(headers, CONTENT_TYPE) {
            Some(ct) => ct,
            None => return Format::Plain,
        },
        (None, Source::Runloop) => return Format::Json,
    };
    if chosen.starts_with("application/grpc") {
        return Format::Grpc;
    }
    response_type(chosen)
}

fn header_str(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    let v = headers.get(name)?.to_str().ok()?;
    (!v.trim().is_empty()).then_some(v)
}

/// Kong's `get_response_type`: the media type with the highest quality that Kong knows
/// (the first of equal quality), JSON when none.
fn response_type(accept: &str) -> Format {
    let mut best = Format::Json;
    let mut best_q = 0.0f64;
    for value in accept.split(',') {
        let mut parts = value.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        if !media.contains('/') {
            continue;
        }
        let mut q = 1.0;
        for p in parts {
            if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                q = v.trim().parse().unwrap_or(0.0);
            }
        }
        if q > best_q {
            best_q = q;
            if let Some(f) = mime_format(&media) {
                best = f;
            }
        }
    }
    best
}

/// Kong's `get_mime_type` for one media type (`type/*` by its type, `*/*` the default).
fn mime_format(media: &str) -> Option<Format> {
    let (ty, sub) = media.split_once('/')?;
    if sub == "*" {
        return match ty {
            "*" | "application" => Some(Format::Json),
            "text" => Some(Format::Plain),
            _ => None,
        };
    }
    match media {
        "application/json" => Some(Format::Json),
        "text/html" => Some(Format::Html),
        "application/xml" => Some(Format::Xml),
        "text/plain" => Some(Format::Plain),
        "application/grpc" => Some(Format::Grpc),
        _ => None,
    }
}

/// The body of an error in a format, with the request id (Kong's templates, byte for byte).
pub fn body(format: Format, message: &str, request_id: &str) -> String {
    match format {
        Format::Json => {
            let m = serde_json::to_string(message).unwrap_or_default();
            format!("{{\n  \"message\":{m},\n  \"request_id\":\"{request_id}\"\n}}")
        }
        Format::Html => format!(
            "<!doctype html>\n<html>\n  <head>\n    <meta charset=\"utf-8\">\n    \
             <title>Error</title>\n  </head>\n  <body>\n    <h1>Error</h1>\n    \
             <p>{}.</p>\n    <p>request_id: {request_id}</p>\n  </body>\n</html>\n",
            escape_markup(message)
        ),
        Format::Xml => format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<error>\n  <message>{}</message>\n  \
             <requestid>{request_id}</requestid>\n</error>\n",
            escape_markup(message)
        ),
        Format::Plain => format!("{message}\nrequest_id: {request_id}\n"),
        Format::Grpc => serde_json::json!({ "message": message }).to_string(),
    }
}

fn escape_markup(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                http::HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// `spec/02-integration/05-proxy/13-error_handlers_spec.lua` and
    /// `spec/01-unit/05-utils_spec.lua` (get_response_type): the format per Accept.
    #[test]
    fn format_follows_accept_then_content_type() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Source, Format);
        let cases: &[Case] = &[
            (&[], Source::Runloop, Format::Json),
            (&[], Source::Proxying, Format::Plain),
            (&[("accept", "text/html")], Source::Runloop, Format::Html),
            (
                &[("accept", "application/xml")],
                Source::Proxying,
                Format::Xml,
            ),
            (&[("accept", "text/plain")], Source::Runloop, Format::Plain),
            (&[("accept", "*/*")], Source::Runloop, Format::Json),
            (&[("accept", "text/*")], Source::Runloop, Format::Plain),
            (&[("accept", "image/png")], Source::Runloop, Format::Json),
            (
                &[("accept", "text/html;q=0.3, application/xml;q=0.9")],
                Source::Runloop,
                Format::Xml,
            ),
            (
                &[("accept", "text/html, application/xml")],
                Source::Runloop,
                Format::Html,
            ),
            (
                &[("content-type", "text/html")],
                Source::Proxying,
                Format::Html,
            ),
            (
                &[("content-type", "text/html")],
                Source::Runloop,
                Format::Json,
            ),
            (
                &[("content-type", "application/json; charset=utf-8")],
                Source::Proxying,
                Format::Json,
            ),
            (
                &[("accept", "application/grpc")],
                Source::Proxying,
                Format::Grpc,
            ),
        ];
        for (h, source, want) in cases {
            assert_eq!(format_for(&headers(h), *source), *want, "{h:?} {source:?}");
        }
    }

    #[test]
    fn bodies_are_kongs_templates() {
        assert_eq!(
            body(Format::Json, "no Route matched with those values", "abc"),
            "{\n  \"message\":\"no Route matched with those values\",\n  \"request_id\":\"abc\"\n}"
        );
        assert_eq!(
            body(Format::Plain, "The upstream server is timing out", "r1"),
            "The upstream server is timing out\nrequest_id: r1\n"
        );
        assert!(body(Format::Html, "a <b>", "r").contains("<p>a &lt;b&gt;.</p>"));
        assert!(body(Format::Xml, "m", "r").contains("<requestid>r</requestid>"));
        assert_eq!(
            proxying_message(StatusCode::from_u16(599).unwrap()),
            "The upstream server responded with 599"
        );
    }
}
