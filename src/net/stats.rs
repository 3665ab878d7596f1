//! What both planes' `/metrics` share: the transport counters ([`LinkStats`]: bytes written
//! per frame encoding, frames refused by reason; plain atomics, one set per plane shared by
//! all its connections, so counting costs one relaxed add), and the exposition
//! ([`exposition`]: the Prometheus text format, or OpenMetrics when the scraper asks for it).

use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::proto::codec::Encoding;

/// Why a received frame was refused (answered with an error or closing the connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// Over the payload limit, compressed or decompressed (close 1009).
    TooLarge,
    /// Does not decompress, or is not JSON (-32700).
    Undecodable,
    /// JSON that is not a valid JSON-RPC message or batch.
    InvalidRpc,
    /// A frame kind the protocol does not use (text frames on `/v2/outlet`, 1003; anything
    /// but a ping on `/v1/outlet`).
    UnsupportedFrame,
    /// Breaks the protocol otherwise (a second hello, a WebSocket protocol error, a v1 ping
    /// without a 32-character hash).
    Protocol,
}

impl Refusal {
    pub const ALL: [Refusal; 5] = [
        Refusal::TooLarge,
        Refusal::Undecodable,
        Refusal::InvalidRpc,
        Refusal::UnsupportedFrame,
        Refusal::Protocol,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::TooLarge => "too_large",
            Refusal::Undecodable => "undecodable",
            Refusal::InvalidRpc => "invalid_rpc",
            Refusal::UnsupportedFrame => "unsupported_frame",
            Refusal::Protocol => "protocol",
        }
    }
}

/// The frame encodings counted, in [`LinkStats`] slot order.
pub const ENCODINGS: [Encoding; 2] = [Encoding::Zstd, Encoding::SnappyFramed];

fn slot(e: Encoding) -> usize {
    match e {
        Encoding::Zstd => 0,
        Encoding::SnappyFramed => 1,
    }
}

/// Counters of one plane's JSON-RPC connections.
#[derive(Debug, Default)]
pub struct LinkStats {
    sent_bytes: [AtomicU64; ENCODINGS.len()],
    refused: [AtomicU64; Refusal::ALL.len()],
}

impl LinkStats {
    /// A frame of `bytes` (as encoded) was written to a socket.
    pub fn sent(&self, encoding: Encoding, bytes: usize) {
        self.sent_bytes[slot(encoding)].fetch_add(bytes as u64, Ordering::Relaxed);
    }

    /// A received frame was refused.
    pub fn refused(&self, why: Refusal) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn sent_bytes(&self, encoding: Encoding) -> u64 {
        self.sent_bytes[slot(encoding)].load(Ordering::Relaxed)
    }

    pub fn refused_count(&self, why: Refusal) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }
}

/// The refusal a WebSocket read error stands for, if it is one (not a transport failure).
pub fn refusal_of(err: &tokio_tungstenite::tungstenite::Error) -> Option<Refusal> {
    use tokio_tungstenite::tungstenite::Error;
    match err {
        Error::Capacity(_) => Some(Refusal::TooLarge),
        Error::Protocol(_) | Error::Utf8(_) => Some(Refusal::Protocol),
        _ => None,
    }
}

/// A label set of one pair, as most of our families have (`{reason="tls"}`).
pub type Label = [(&'static str, &'static str); 1];

/// The label value of a frame encoding in `deltaplane_sent_bytes_total{encoding}`.
pub fn encoding_label(e: Encoding) -> &'static str {
    match e {
        Encoding::Zstd => "zstd",
        Encoding::SnappyFramed => "snappy",
    }
}

impl LinkStats {
    /// Registers `deltaplane_sent_bytes_total{encoding}` (these counts plus `extra_sent`:
    /// other encodings, e.g. sync v1's gzip) and `deltaplane_frames_refused_total{reason}` into
    /// a scrape's registry.
    pub fn register(&self, registry: &mut Registry, extra_sent: &[(&'static str, u64)]) {
        let sent = Family::<Label, Counter>::default();
        for e in ENCODINGS {
            sent.get_or_create(&[("encoding", encoding_label(e))])
                .inc_by(self.sent_bytes(e));
        }
        for (label, n) in extra_sent {
            sent.get_or_create(&[("encoding", label)]).inc_by(*n);
        }
        registry.register(
            "deltaplane_sent_bytes",
            "Bytes of cluster frames written to data-plane or control-plane sockets, by frame \
             encoding (zstd, snappy: sync v2 frames as encoded; gzip-v1: sync v1 pushes)",
            sent,
        );
        let refused = Family::<Label, Counter>::default();
        for r in Refusal::ALL {
            refused
                .get_or_create(&[("reason", r.as_str())])
                .inc_by(self.refused_count(r));
        }
        registry.register(
            "deltaplane_frames_refused",
            "Frames received from a peer and refused, by reason (too_large, undecodable, \
             invalid_rpc, unsupported_frame, protocol)",
            refused,
        );
    }
}

/// The OpenMetrics text format's media type.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header asks for OpenMetrics (Prometheus's scrapers list it first; a
/// client that names only `text/plain` or nothing gets the Prometheus text format).
fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default();
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        })
}

/// The `/metrics` response for `registries`, encoded by `prometheus-client`: OpenMetrics 1.0.0
/// when the request's `Accept` names it, else the Prometheus text format 0.0.4.
pub fn exposition(headers: &HeaderMap, registries: &[&Registry]) -> Response {
    let openmetrics = wants_openmetrics(headers);
    let mut body = String::new();
    let encoded = registries.iter().try_for_each(|r| {
        if openmetrics {
            prometheus_client::encoding::text::encode_registry(&mut body, r)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut body, r)
        }
    });
    let encoded = encoded.and_then(|()| {
        if openmetrics {
            prometheus_client::encoding::text::encode_eof(&mut body)
        } else {
            Ok(())
        }
    });
    if let Err(e) = encoded {
        tracing::error!(cause = %e, "encoding metrics failed");
        return axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let content_type = if openmetrics {
        OPENMETRICS_CONTENT_TYPE
    } else {
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE
    };
    (
        [(header::CONTENT_TYPE, HeaderValue::from_static(content_type))],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_land_in_their_own_slot() {
        let s = LinkStats::default();
        s.sent(Encoding::Zstd, 10);
        s.sent(Encoding::Zstd, 5);
        s.sent(Encoding::SnappyFramed, 7);
        s.refused(Refusal::Protocol);
        assert_eq!(s.sent_bytes(Encoding::Zstd), 15);
        assert_eq!(s.sent_bytes(Encoding::SnappyFramed), 7);
        for r in Refusal::ALL {
            assert_eq!(
                s.refused_count(r),
                u64::from(r == Refusal::Protocol),
                "{r:?}"
            );
        }
    }

    #[test]
    fn openmetrics_only_when_asked() {
        let ask = |accept: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ACCEPT, HeaderValue::from_str(accept).unwrap());
            wants_openmetrics(&h)
        };
        assert!(!wants_openmetrics(&HeaderMap::new()));
        assert!(!ask("text/plain;version=0.0.4"));
        assert!(!ask("*/*"));
        assert!(ask(
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.2"
        ));
        assert!(!ask("application/openmetrics-text;q=0, text/plain"));
    }

    #[tokio::test]
    async fn both_formats_encode_the_same_families() {
        let stats = LinkStats::default();
        stats.sent(Encoding::SnappyFramed, 3);
        let mut r = Registry::default();
        stats.refused(Refusal::TooLarge);
        stats.refused(Refusal::TooLarge);
        stats.register(&mut r, &[("gzip-v1", 4)]);
        let body = async |accept: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(a) = accept {
                h.insert(header::ACCEPT, HeaderValue::from_str(a).unwrap());
            }
            let resp = exposition(&h, &[&r]);
            let ct = resp.headers()[header::CONTENT_TYPE]
                .to_str()
                .unwrap()
                .to_owned();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (ct, String::from_utf8(body.to_vec()).unwrap())
        };
        let (ct, text) = body(None).await;
        assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
        assert!(
            text.contains("deltaplane_sent_bytes_total{encoding=\"snappy\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("deltaplane_sent_bytes_total{encoding=\"gzip-v1\"} 4\n"),
            "{text}"
        );
        assert!(
            text.contains("deltaplane_frames_refused_total{reason=\"too_large\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE deltaplane_sent_bytes_total counter\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let (ct, text) = body(Some("application/openmetrics-text; version=1.0.0")).await;
        assert_eq!(ct, OPENMETRICS_CONTENT_TYPE);
        assert!(
            text.contains("# TYPE deltaplane_sent_bytes counter\n"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
