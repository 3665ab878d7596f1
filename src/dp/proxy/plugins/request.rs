//! One request as the plugins see it ([`Ctx`]), its log record ([`LogEntry`]), and the
//! responses plugins answer with.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;

use super::table::PluginInstance;

/// A consumer, as the auth plugins identify it (Kong's `consumers` entity, the fields the
/// plugins use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Consumer {
    /// The consumer's id.
    pub id: String,
    /// The consumer's username, if set.
    pub username: Option<String>,
    /// The consumer's custom_id, if set.
    pub custom_id: Option<String>,
}

/// The credential an auth plugin authenticated the request with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    /// The credential entity's id (rate-limiting's `limit_by = credential` uses it).
    pub id: String,
    /// The id of the consumer owning the credential.
    pub consumer_id: String,
    /// The value of `X-Credential-Identifier`: the credential id for key-auth, the username
    /// for basic-auth, the key for jwt.
    pub identifier: String,
}

/// The request body, read on demand: a future the proxy provides that reads it once.
pub type BodyFuture = Pin<Box<dyn Future<Output = Option<Bytes>> + Send>>;

/// Who produced the response the log phase sees (Kong's `kong.response.get_source()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseSource {
    /// The upstream service answered.
    Service,
    /// Kong itself (a plugin, the router, the balancer) answered.
    Kong,
    /// An error happened while proxying (Kong labels these `kong` too).
    Error,
}

/// The message of a plugin's `{"message": "..."}` answer, attached to the response as an
/// extension: the proxy re-renders the body by the request's `Accept`, as Kong's
/// `kong.response.error` does. Answers without it (jwt claim errors, cors preflight) are
/// Kong's `kong.response.exit` and go out as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginMessage(pub String);

/// One request as the plugins see and change it.
///
/// The proxy fills the inputs (see [`Ctx::new`] and the public fields); the access phase
/// changes `headers` (the request headers to send upstream), `query` and `new_body`, and sets
/// `consumer`, `credential` and `authenticated_groups`.
pub struct Ctx {
    /// The matched route's id.
    pub route_id: Option<String>,
    /// The matched route's name (prometheus labels it, or the id).
    pub route_name: Option<String>,
    /// The route's service id.
    pub service_id: Option<String>,
    /// The service's name (prometheus labels it, or the host).
    pub service_name: Option<String>,
    /// The service's host (prometheus' label when the service has no name).
    pub service_host: Option<String>,
    /// The workspace id of the route (plugins, consumers and credentials are looked up in it).
    pub ws_id: String,
    /// The workspace's name (prometheus' `workspace` label); Kong's default is `default`.
    pub workspace_name: String,
    /// The client address (Kong's `ngx.var.remote_addr`, after trusted forwarding).
    pub client_ip: IpAddr,
    /// The request method.
    pub method: Method,
    /// The request path, without the query string (rate-limiting's `limit_by = path`).
    pub path: String,
    /// The raw query string (no `?`); key-auth's `hide_credentials` rewrites it.
    pub query: Option<String>,
    /// The request headers; plugins set and remove the ones to send upstream.
    pub headers: HeaderMap,
    /// Whether the request came over TLS.
    pub tls: bool,
    /// Reads the request body once, when a plugin needs it (key-auth's `key_in_body`); set
    /// with [`Ctx::set_body_source`]. In a mutex only so that `Ctx` is `Sync` with a future
    /// that is only `Send` (it is never locked: `&mut self` reaches it).
    body_source: std::sync::Mutex<Option<BodyFuture>>,
    /// The body once read (by [`Ctx::body`]).
    body: Option<Option<Bytes>>,
    /// The body to send upstream instead of the original one, when a plugin changed it.
    pub new_body: Option<Bytes>,
    /// The authenticated (or anonymous) consumer.
    pub consumer: Option<Arc<Consumer>>,
    /// The credential the consumer authenticated with (`None` for an anonymous consumer).
    pub credential: Option<Credential>,
    /// Groups an earlier component authenticated the request with (acl reads them).
    pub authenticated_groups: Option<Vec<String>>,
    /// The cors config collected in the access phase, for the response phase.
    pub(super) cors: Option<Arc<PluginInstance>>,
    /// Whether cors answered or delegated a preflight (no cors response headers then).
    pub(super) cors_skip: bool,
    /// The prometheus config collected in the access phase, for the log phase.
    pub(super) prometheus: Option<Arc<PluginInstance>>,
    /// The rate-limiting headers to set on the response, in the order stored.
    pub(super) rate_limit_headers: Vec<(HeaderName, String)>,
}

impl Ctx {
    /// A context for one request with no route, service, consumer or body source; the proxy
    /// sets the public fields it knows.
    pub fn new(
        ws_id: impl Into<String>,
        client_ip: IpAddr,
        method: Method,
        path: impl Into<String>,
    ) -> Ctx {
        Ctx {
            route_id: None,
            route_name: None,
            service_id: None,
            service_name: None,
            service_host: None,
            ws_id: ws_id.into(),
            workspace_name: "default".to_owned(),
            client_ip,
            method,
            path: path.into(),
            query: None,
            headers: HeaderMap::new(),
            tls: false,
            body_source: std::sync::Mutex::new(None),
            body: None,
            new_body: None,
            consumer: None,
            credential: None,
            authenticated_groups: None,
            cors: None,
            cors_skip: false,
            prometheus: None,
            rate_limit_headers: Vec::new(),
        }
    }

    /// Gives the future that reads the request body; plugins await it at most once, and only
    /// when their config asks for the body. The proxy then sends `new_body` if a plugin set
    /// it, else the body that future read (see [`Ctx::read_body`]), else the original stream.
    pub fn set_body_source(&mut self, source: BodyFuture) {
        *self
            .body_source
            .get_mut()
            .unwrap_or_else(|e| e.into_inner()) = Some(source);
    }

    /// The body a plugin read, if one did (`Some(None)`: read, but there was none or reading
    /// failed); the proxy forwards it instead of the (consumed) stream.
    pub fn read_body(&self) -> Option<Option<Bytes>> {
        self.body.clone()
    }

    /// The request body, read from the body source on the first call and kept.
    pub async fn body(&mut self) -> Option<Bytes> {
        if self.body.is_none() {
            let source = self
                .body_source
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            let read = match source {
                Some(source) => source.await,
                None => None,
            };
            self.body = Some(read);
        }
        self.body.clone().flatten()
    }

    /// Sets a request header to send upstream (Kong's `kong.service.request.set_header`).
    pub(super) fn set_header(&mut self, name: &'static str, value: &str) {
        match HeaderValue::from_str(value) {
            Ok(value) => {
                self.headers.insert(HeaderName::from_static(name), value);
            }
            Err(_) => {
                tracing::warn!(
                    header = name,
                    "plugin header value is not a valid header value"
                );
                self.headers.remove(name);
            }
        }
    }
}

/// What the log phase knows about a finished request.
#[derive(Clone, Debug)]
pub struct LogEntry {
    /// The status sent to the client.
    pub status: u16,
    /// Who produced the response.
    pub source: ResponseSource,
    /// The request's size in bytes (Kong: `request_length`).
    pub request_bytes: u64,
    /// The bytes sent to the client (Kong: `bytes_sent`).
    pub response_bytes: u64,
    /// The whole request's latency (Kong: `latencies.request`).
    pub latency_total: Duration,
    /// The upstream's latency, if the request was proxied (Kong: `latencies.proxy`).
    pub latency_upstream: Option<Duration>,
    /// The latency Kong added (Kong: `latencies.kong`).
    pub latency_kong: Duration,
    /// The upstream target (`host:port`) that answered, if any.
    pub upstream_target: Option<String>,
}

/// Kong's `kong.response.error(status, message, headers)`: a JSON `{"message"}` body that the
/// proxy may re-render by `Accept` (the message is attached as [`PluginMessage`]).
pub(super) fn error_response(
    status: u16,
    message: &str,
    headers: &[(&'static str, String)],
) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "message": message });
    let mut response = json_response(status, &body, headers);
    response
        .extensions_mut()
        .insert(PluginMessage(message.to_owned()));
    response
}

/// Kong's `kong.response.exit(status, table, headers)`: a JSON body sent as it is.
pub(super) fn json_response(
    status: u16,
    body: &serde_json::Value,
    headers: &[(&'static str, String)],
) -> Response<Full<Bytes>> {
    let bytes = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
    let mut response = Response::new(Full::new(bytes));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    response
}

/// Kong's "An unexpected error occurred" answer, when a handler throws (the plugins
/// iterator turns a Lua error into this 500).
pub(super) fn unexpected_error() -> Response<Full<Bytes>> {
    error_response(500, "An unexpected error occurred", &[])
}
