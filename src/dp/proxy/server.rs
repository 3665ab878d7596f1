//! The proxy listeners and the request path: route, run the plugins, pick a target, forward,
//! pass the response back (Kong's `kong/runloop/handler.lua` phases, in one async function).
//!
//! A request is served entirely by the [`Gateway`] that was current when it arrived: it
//! holds that `Arc` until its response body ends, whatever is swapped in meanwhile.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::balancer::{HashInput, Outcome, Resolver};
use super::errors::{self, Source};
use super::gateway::{Gateway, Service};
use super::ipnet::IpNet;
use super::plugins::{Ctx, LogEntry, PluginMessage, ResponseSource};
use super::router::{self, Route};
use super::upstream::{self, BoxError, ConnectError, OutBody, PoolKey, ProxyBody, SendError};

/// What the proxy answers in `Via` and `Server` (Kong says `kong/<version>`; we say who we
/// are, see the README's deviations).
pub const SERVER_TOKEN: &str = concat!("deltaplane/", env!("CARGO_PKG_VERSION"));

/// Request bodies are buffered (`request_buffering`, Kong's default) up to this size; a
/// larger body answers 413 (Kong's `client_max_body_size` is unlimited by default but
/// nginx spools to disk; we hold bodies in memory, so we bound them).
pub const MAX_BUFFERED_REQUEST: usize = 64 * 1024 * 1024;

/// `response_buffering` buffers a response whose announced length is at most this; longer
/// or unannounced ones stream (nginx spools large responses to disk instead).
pub const MAX_BUFFERED_RESPONSE: usize = 1024 * 1024;

/// Request counts by status class and upstream latency, for `/metrics`.
#[derive(Debug)]
pub struct ProxyStats {
    /// Responses by status class: 1xx … 5xx.
    pub by_class: [AtomicU64; 5],
    /// Upstream latency (connect to response header), as a histogram.
    pub upstream_latency: prometheus_client::metrics::histogram::Histogram,
}

impl ProxyStats {
    fn new() -> ProxyStats {
        ProxyStats {
            by_class: Default::default(),
            upstream_latency: prometheus_client::metrics::histogram::Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ]),
        }
    }

    fn count(&self, status: StatusCode) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].fetch_add(1, Ordering::Relaxed);
    }
}

/// The proxy's state shared by its listeners and the configuration task.
pub struct Proxy {
    gateway: ArcSwap<Gateway>,
    client: Arc<upstream::Client>,
    resolver: Arc<Resolver>,
    trusted: Vec<IpNet>,
    pub stats: ProxyStats,
}

impl Proxy {
    pub fn new(initial: Gateway, trusted: Vec<IpNet>) -> Arc<Proxy> {
        Arc::new(Proxy {
            gateway: ArcSwap::from_pointee(initial),
            client: upstream::Client::new(),
            resolver: Arc::new(Resolver::new()),
            trusted,
            stats: ProxyStats::new(),
        })
    }

    /// The configuration being served.
    pub fn current(&self) -> Arc<Gateway> {
        self.gateway.load_full()
    }

    /// Serves `next` to every request that arrives from now on.
    pub fn swap(&self, next: Arc<Gateway>) {
        self.gateway.store(next);
    }

    /// The process's DNS resolver (shared with the balancers).
    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }
}

/// One accepted client connection, as the request path needs it, with the forwarding
/// header values that are the same for each of its requests.
#[derive(Debug)]
struct Downstream {
    remote: SocketAddr,
    local_port: u16,
    tls: bool,
    sni: Option<Arc<str>>,
    /// Whether the client's address is in `trusted_ips` (its X-Forwarded-* are kept).
    trusted: bool,
    /// The client's address as a header value (X-Real-IP; X-Forwarded-For when untrusted).
    remote_ip: HeaderValue,
    /// The listener's port as a header value (X-Forwarded-Port when Host has no port).
    local_port_value: HeaderValue,
}

impl Downstream {
    fn new(
        proxy: &Proxy,
        remote: SocketAddr,
        local_port: u16,
        tls: bool,
        sni: Option<Arc<str>>,
    ) -> Arc<Downstream> {
        let ip = remote.ip();
        Arc::new(Downstream {
            remote,
            local_port,
            tls,
            sni,
            trusted: proxy.trusted.iter().any(|n| n.contains(ip)),
            remote_ip: HeaderValue::from_str(&ip.to_string())
                .expect("an IP address is a valid header value"),
            local_port_value: HeaderValue::from(local_port),
        })
    }
}

/// Serves plain HTTP (HTTP/1.1, and HTTP/2 with prior knowledge) on `listener` until
/// `shutdown`; connections in flight finish their requests.
pub async fn serve(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let local_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|s| *s) => break,
        };
        let (tcp, remote) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let proxy = proxy.clone();
        let acceptor = tls.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                None => {
                    let down = Downstream::new(&proxy, remote, local_port, false, None);
                    let svc = service_fn(move |req| handle(proxy.clone(), down.clone(), req));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), svc);
                    let _ = watcher.watch(conn).await;
                }
                Some(acceptor) => {
                    let accepted =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                    let Ok(Ok(stream)) = accepted else { return };
                    let sni = stream.get_ref().1.server_name().map(Arc::from);
                    let down = Downstream::new(&proxy, remote, local_port, true, sni);
                    let svc = service_fn(move |req| handle(proxy.clone(), down.clone(), req));
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    let _ = watcher.watch(conn).await;
                }
            }
        });
    }
    drop(listener);
    // Requests in flight get a moment to finish.
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

type Answer = Response<ProxyBody>;

fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| -> BoxError { match never {} })
        .boxed()
}

/// The future of one request, boxed once: hyper's dispatcher moves the future it is given,
/// and the request path's state machine is several kilobytes.
type Handling = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Answer, std::convert::Infallible>> + Send>,
>;

fn handle(proxy: Arc<Proxy>, down: Arc<Downstream>, req: Request<Incoming>) -> Handling {
    Box::pin(async move {
        let started = Instant::now();
        let gateway = proxy.current();
        let request_id = RequestId::new();
        let mut res = route_and_forward(&proxy, &gateway, &down, req, started, &request_id).await;
        proxy.stats.count(res.status());
        res.headers_mut()
            .insert(X_KONG_REQUEST_ID, request_id.value.clone());
        Ok(res)
    })
}

const X_KONG_REQUEST_ID: HeaderName = HeaderName::from_static("x-kong-request-id");
const X_KONG_UPSTREAM_LATENCY: HeaderName = HeaderName::from_static("x-kong-upstream-latency");
const X_KONG_PROXY_LATENCY: HeaderName = HeaderName::from_static("x-kong-proxy-latency");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PATH: HeaderName = HeaderName::from_static("x-forwarded-path");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Kong's `$kong_request_id`: nginx's `$request_id`, 16 random bytes in hex.
struct RequestId {
    text: [u8; 32],
    /// The same, as the header value sent upstream and to the client.
    value: HeaderValue,
}

impl RequestId {
    fn new() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0u8; 32];
        for (i, b) in rand::random::<[u8; 16]>().into_iter().enumerate() {
            text[2 * i] = HEX[usize::from(b >> 4)];
            text[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        let value = HeaderValue::from_bytes(&text).expect("hex digits are a valid header value");
        RequestId { text, value }
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text).expect("hex digits are ASCII")
    }
}

fn error(
    status: StatusCode,
    message: &str,
    headers: &HeaderMap,
    source: Source,
    request_id: &str,
) -> Answer {
    error_as(
        status,
        message,
        errors::format_for(headers, source),
        request_id,
    )
}

fn error_as(status: StatusCode, message: &str, format: errors::Format, request_id: &str) -> Answer {
    let mut res = Response::new(full(errors::body(format, message, request_id)));
    *res.status_mut() = status;
    let h = res.headers_mut();
    if let Some(ct) = format.content_type() {
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    }
    h.insert(header::SERVER, HeaderValue::from_static(SERVER_TOKEN));
    res
}

async fn route_and_forward(
    proxy: &Arc<Proxy>,
    gateway: &Arc<Gateway>,
    down: &Downstream,
    req: Request<Incoming>,
    started: Instant,
    request_id: &RequestId,
) -> Answer {
    let request_id_str = request_id.as_str();
    let (parts, body) = req.into_parts();
    let host_from_header = parts
        .headers
        .get(header::HOST)
        .filter(|h| h.to_str().is_ok());
    let host_header = match host_from_header {
        Some(h) => h.to_str().unwrap_or_default().to_owned(),
        None => parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default(),
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let facts = router::Request {
        method: parts.method.as_str(),
        host: &host_header,
        listener_port: down.local_port,
        path: &path_and_query,
        headers: &parts.headers,
        sni: down.sni.as_deref(),
    };
    let Some(found) = gateway.router.find(&facts) else {
        return error(
            StatusCode::NOT_FOUND,
            "no Route matched with those values",
            &parts.headers,
            Source::Runloop,
            request_id_str,
        );
    };
    let route = found.route.clone();
    let matched_path = found.matched_path.clone();
    let normalized_path = found.path.clone();
    let captures = captures_of(&found);

    // X-Forwarded-* as received, only from trusted addresses (`trusted_ips`); the values
    // that are the same for every request of the connection are computed once per
    // connection (`Downstream`).
    let trusted = down.trusted;
    let (host_only, host_port) = split_host_port(&host_header);
    let incoming = |name: &HeaderName| {
        trusted
            .then(|| parts.headers.get(name).filter(|v| v.to_str().is_ok()))
            .flatten()
            .cloned()
    };
    let forwarded_proto = incoming(&X_FORWARDED_PROTO)
        .unwrap_or_else(|| HeaderValue::from_static(if down.tls { "https" } else { "http" }));
    let forwarded_host = incoming(&X_FORWARDED_HOST).or_else(|| match host_from_header {
        // The Host header as it came, when it has no port: no copy.
        Some(h) if host_only.len() == host_header.len() => Some(h.clone()),
        _ => HeaderValue::from_str(host_only).ok(),
    });
    let forwarded_port = incoming(&X_FORWARDED_PORT).unwrap_or_else(|| match host_port {
        Some(p) => HeaderValue::from(p),
        None => down.local_port_value.clone(),
    });
    let forwarded_path = incoming(&X_FORWARDED_PATH)
        .or_else(|| HeaderValue::from_str(path_and_query.split('?').next().unwrap_or("/")).ok());
    let forwarded_prefix = incoming(&X_FORWARDED_PREFIX).or_else(|| {
        matched_path
            .as_deref()
            .filter(|p| *p != "/")
            .and_then(|p| HeaderValue::from_str(p).ok())
    });

    // An https-only route over http (`kong/runloop/handler.lua`).
    let protocols = &route.protocols;
    if protocols.iter().any(|p| p == "https")
        && !protocols.iter().any(|p| p == "http")
        && forwarded_proto.as_bytes() != b"https"
    {
        let code = route.https_redirect_status_code;
        if matches!(code, 301 | 302 | 307 | 308) {
            let mut res = Response::new(full(Bytes::new()));
            *res.status_mut() = StatusCode::from_u16(code).expect("a redirect code");
            let forwarded_host = forwarded_host
                .as_ref()
                .and_then(|h| h.to_str().ok())
                .unwrap_or(host_only);
            if let Ok(v) =
                HeaderValue::from_str(&format!("https://{forwarded_host}{path_and_query}"))
            {
                res.headers_mut().insert(header::LOCATION, v);
            }
            return res;
        }
        let mut res = error(
            StatusCode::UPGRADE_REQUIRED,
            "Please use HTTPS protocol",
            &parts.headers,
            Source::Runloop,
            request_id_str,
        );
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        res.headers_mut().insert(
            header::UPGRADE,
            HeaderValue::from_static("TLS/1.2, HTTP/1.1"),
        );
        return res;
    }

    let Some(service) = route
        .service_id
        .as_ref()
        .and_then(|id| gateway.services.get(id))
        .cloned()
    else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Service found with those values",
            &parts.headers,
            Source::Runloop,
            request_id_str,
        );
    };

    // The plugins' access phase.
    let (raw_path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (path_and_query.clone(), None),
    };
    let plugins = gateway.plugins.clone();
    let no_plugins = plugins.is_empty();
    // Without plugins, the context carries only what the balancer's hash reads.
    let mut ctx = Ctx::new(
        if no_plugins {
            String::new()
        } else {
            service.ws_id.clone()
        },
        down.remote.ip(),
        parts.method.clone(),
        raw_path,
    );
    ctx.query = query;
    ctx.headers = parts.headers;
    ctx.tls = down.tls;
    // The body, for a plugin that reads it (key-auth's key_in_body); left in its slot
    // (and streamed) when none does.
    let mut body = Some(body);
    let slot = if no_plugins {
        None
    } else {
        ctx.route_id = Some(route.id.clone());
        ctx.route_name = route.name.clone();
        ctx.service_id = Some(service.id.clone());
        ctx.service_name = service.name.clone();
        ctx.service_host = Some(service.host.clone());
        ctx.workspace_name = gateway.workspace_name(&service.ws_id).to_owned();
        let slot = Arc::new(std::sync::Mutex::new(body.take()));
        let source = slot.clone();
        ctx.set_body_source(Box::pin(async move {
            let body = source.lock().expect("body slot").take()?;
            http_body_util::Limited::new(body, MAX_BUFFERED_REQUEST)
                .collect()
                .await
                .ok()
                .map(|c| c.to_bytes())
        }));
        Some(slot)
    };
    if let Some(res) = plugins.access(&mut ctx).await {
        let (mut rp, body) = res.into_parts();
        let body = match rp.extensions.get::<PluginMessage>() {
            // `kong.response.error`: the body follows the request's Accept.
            Some(PluginMessage(message)) => {
                let format = errors::format_for(&ctx.headers, Source::Runloop);
                if let Some(ct) = format.content_type() {
                    rp.headers
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                }
                rp.headers.remove(header::CONTENT_LENGTH);
                Bytes::from(errors::body(format, message, request_id_str))
            }
            None => body.into_inner().unwrap_or_default(),
        };
        plugins.response(&ctx, rp.status, &mut rp.headers);
        plugins.log(
            &ctx,
            &LogEntry {
                status: rp.status.as_u16(),
                source: ResponseSource::Kong,
                request_bytes: 0,
                response_bytes: body.len() as u64,
                latency_total: started.elapsed(),
                latency_upstream: None,
                latency_kong: started.elapsed(),
                upstream_target: None,
            },
        );
        return Response::from_parts(rp, full(body));
    }
    let body: Option<Incoming> = match slot {
        Some(slot) => slot.lock().expect("body slot").take(),
        None => body,
    };
    let replaced = match (ctx.new_body.take(), ctx.read_body()) {
        (Some(b), _) => Some(b),
        (None, Some(read)) => Some(read.unwrap_or_default()),
        (None, None) => None,
    };

    // The upstream request.
    let mut upstream_path = escape_path(&router::upstream_path_v0(
        service.path.as_deref(),
        &normalized_path,
        matched_path.as_deref(),
        route.strip_path,
    ))
    .into_owned();
    if let Some(q) = &ctx.query {
        upstream_path.push('?');
        upstream_path.push_str(q);
    }
    let mut headers = std::mem::take(&mut ctx.headers);
    strip_hop_by_hop(&mut headers);
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => HeaderValue::from_str(&format!("{prev}, {}", down.remote.ip()))
            .unwrap_or_else(|_| down.remote_ip.clone()),
        _ => down.remote_ip.clone(),
    };
    headers.insert(X_FORWARDED_FOR, xff);
    headers.insert(X_FORWARDED_PROTO, forwarded_proto);
    if let Some(v) = forwarded_host {
        headers.insert(X_FORWARDED_HOST, v);
    }
    headers.insert(X_FORWARDED_PORT, forwarded_port);
    if let Some(v) = forwarded_path {
        headers.insert(X_FORWARDED_PATH, v);
    }
    match forwarded_prefix {
        Some(p) => {
            headers.insert(X_FORWARDED_PREFIX, p);
        }
        None => {
            headers.remove(&X_FORWARDED_PREFIX);
        }
    }
    headers.insert(X_REAL_IP, down.remote_ip.clone());
    match headers.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            let via = format!("{prev}, {} {SERVER_TOKEN}", via_version(parts.version));
            set(&mut headers, header::VIA, &via);
        }
        None => {
            headers.insert(header::VIA, via_value(parts.version));
        }
    }
    headers.insert(X_KONG_REQUEST_ID, request_id.value.clone());

    let body: OutBody = match (replaced, body) {
        (Some(b), _) => {
            headers.remove(header::CONTENT_LENGTH);
            OutBody::Full(b)
        }
        // Nothing to read (a GET): no buffer to fill.
        (None, Some(body)) if hyper::body::Body::is_end_stream(&body) => {
            OutBody::Full(Bytes::new())
        }
        (None, Some(body)) if route.request_buffering => {
            match http_body_util::Limited::new(body, MAX_BUFFERED_REQUEST)
                .collect()
                .await
            {
                Ok(c) => OutBody::Full(c.to_bytes()),
                Err(e) => {
                    let too_large = e.is::<http_body_util::LengthLimitError>();
                    let status = if too_large {
                        StatusCode::PAYLOAD_TOO_LARGE
                    } else {
                        StatusCode::BAD_REQUEST
                    };
                    return error(
                        status,
                        &errors::proxying_message(status),
                        &headers,
                        Source::Proxying,
                        request_id_str,
                    );
                }
            }
        }
        (None, Some(body)) => {
            OutBody::Stream(body.map_err(|e| -> BoxError { Box::new(e) }).boxed())
        }
        (None, None) => OutBody::Full(Bytes::new()),
    };

    let attempt = Attempt {
        proxy,
        gateway,
        service: &service,
        route: &route,
        method: parts.method,
        version: parts.version,
        path: upstream_path,
        headers,
        host_header: &host_header,
        ctx: &ctx,
        captures: &captures,
        request_id: request_id_str,
    };
    let (mut res, upstream_latency, answered, target) = match attempt.run(body).await {
        Ok(x) => x,
        Err(answer) => {
            let mut res = answer;
            let status = res.status();
            plugins.response(&ctx, status, res.headers_mut());
            plugins.log(
                &ctx,
                &LogEntry {
                    status: status.as_u16(),
                    source: ResponseSource::Error,
                    request_bytes: 0,
                    response_bytes: 0,
                    latency_total: started.elapsed(),
                    latency_upstream: None,
                    latency_kong: started.elapsed(),
                    upstream_target: None,
                },
            );
            return res;
        }
    };
    let status = res.status();
    let version = res.version();
    let h = res.headers_mut();
    match h.get(header::VIA).and_then(|v| v.to_str().ok()) {
        Some(prev) => {
            let via = format!("{prev}, {} {SERVER_TOKEN}", via_version(version));
            set(h, header::VIA, &via);
        }
        None => {
            h.insert(header::VIA, via_value(version));
        }
    }
    let kong_latency = answered
        .saturating_duration_since(started)
        .saturating_sub(upstream_latency);
    h.insert(
        X_KONG_UPSTREAM_LATENCY,
        HeaderValue::from(millis(upstream_latency)),
    );
    h.insert(
        X_KONG_PROXY_LATENCY,
        HeaderValue::from(millis(kong_latency)),
    );
    if no_plugins {
        // No header filter or log phase to run: the body goes out as it is.
        return res;
    }
    plugins.response(&ctx, status, h);
    let log = LogEntry {
        status: status.as_u16(),
        source: ResponseSource::Service,
        request_bytes: 0,
        response_bytes: 0,
        latency_total: started.elapsed(),
        latency_upstream: Some(upstream_latency),
        latency_kong: kong_latency,
        upstream_target: Some(target.to_string()),
    };
    // The log phase runs when the body has been passed on (or dropped).
    let (rp, body) = res.into_parts();
    let done = move |bytes: u64| {
        let mut log = log;
        log.response_bytes = bytes;
        log.latency_total = started.elapsed();
        plugins.log(&ctx, &log);
    };
    Response::from_parts(rp, LoggedBody::new(body, Box::new(done)).boxed())
}

/// Whole milliseconds, as Kong's latency headers.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One request's tries at the upstream (1 + the service's `retries` on connect failures).
struct Attempt<'a> {
    proxy: &'a Arc<Proxy>,
    gateway: &'a Arc<Gateway>,
    service: &'a Service,
    route: &'a Route,
    method: Method,
    version: Version,
    path: String,
    headers: HeaderMap,
    host_header: &'a str,
    ctx: &'a Ctx,
    captures: &'a [(String, String)],
    request_id: &'a str,
}

impl Attempt<'_> {
    /// The response, the upstream latency, when the response was ready to pass on, and the
    /// target that answered; or the error answer.
    async fn run(
        mut self,
        body: OutBody,
    ) -> Result<(Answer, Duration, Instant, SocketAddr), Answer> {
        let service = self.service;
        // The headers move into the one request sent (retries happen before it is built).
        let mut headers = Some(std::mem::take(&mut self.headers));
        let format = errors::format_for(headers.as_ref().expect("set"), Source::Proxying);
        let request_id = self.request_id;
        let fail =
            |status: StatusCode, message: &str| error_as(status, message, format, request_id);
        let upstream = self.gateway.balancers.get(&service.ws_id, &service.host);
        let captures = |name: &str| {
            self.captures
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let hash_key = upstream.as_ref().map(|u| {
            u.hash_key(&HashInput {
                consumer_id: self.ctx.consumer.as_ref().map(|c| c.id.as_str()),
                client_ip: self.ctx.client_ip,
                headers: headers.as_ref().expect("not sent yet"),
                path: &self.ctx.path,
                query: self.ctx.query.as_deref(),
                captures: &captures,
            })
        });
        let key = hash_key.as_ref().and_then(|k| k.key.clone());
        let tls = matches!(service.protocol.as_str(), "https" | "grpcs");
        let h2 = matches!(service.protocol.as_str(), "grpc" | "grpcs");
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut body = Some(body);
        let attempts = 1 + service.retries;
        let mut last_timeout = false;
        for _ in 0..attempts {
            // Pick a target.
            let (addr, target_host, target_port, pick) = match &upstream {
                Some(u) => match u.pick(key.as_deref(), &tried).await {
                    // The upstream's host_header, else the target's name
                    // (`kong/runloop/balancer/init.lua`).
                    Ok(p) => (
                        p.addr,
                        u.host_header().unwrap_or(&p.host).to_owned(),
                        p.port,
                        Some(p),
                    ),
                    Err(e) => {
                        return Err(fail(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()));
                    }
                },
                None => match self
                    .proxy
                    .resolver
                    .resolve(&service.host, service.port)
                    .await
                {
                    Ok(addrs) if !addrs.is_empty() => {
                        let addr = addrs
                            .iter()
                            .find(|a| !tried.contains(a))
                            .copied()
                            .unwrap_or(addrs[tried.len() % addrs.len()]);
                        (addr, service.host.clone(), service.port, None)
                    }
                    Ok(_) | Err(_) => {
                        return Err(fail(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "name resolution failed",
                        ));
                    }
                },
            };
            tried.push(addr);
            let pool_key = PoolKey {
                addr,
                tls: tls.then(|| target_host.clone()),
                h2,
            };
            let t0 = Instant::now();
            let conn = match self
                .proxy
                .client
                .connect(&pool_key, service.connect_timeout)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    last_timeout = matches!(e, ConnectError::Timeout);
                    tracing::debug!(%addr, error = %e, "upstream connect failed");
                    if let Some(p) = pick {
                        p.report(if last_timeout {
                            Outcome::Timeout
                        } else {
                            Outcome::TcpError
                        });
                    }
                    continue;
                }
            };
            // The Host header (`kong/runloop/balancer/init.lua`, set_host_header).
            let host_value = if self.route.preserve_host {
                self.host_header.to_owned()
            } else {
                let default_port = match service.protocol.as_str() {
                    "http" | "grpc" => 80,
                    _ => 443,
                };
                if target_port == default_port {
                    target_host.clone()
                } else {
                    format!("{target_host}:{target_port}")
                }
            };
            let uri: Uri = if h2 {
                let scheme = if tls { "https" } else { "http" };
                match format!("{scheme}://{host_value}{}", self.path).parse() {
                    Ok(u) => u,
                    Err(_) => return Err(fail(StatusCode::BAD_REQUEST, "Bad request")),
                }
            } else {
                match self.path.parse() {
                    Ok(u) => u,
                    Err(_) => return Err(fail(StatusCode::BAD_REQUEST, "Bad request")),
                }
            };
            let mut req = Request::new(body.take().expect("the body is sent once"));
            *req.method_mut() = self.method.clone();
            *req.uri_mut() = uri;
            *req.version_mut() = if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            *req.headers_mut() = headers.take().expect("one request is built");
            if let Ok(v) = HeaderValue::from_str(&host_value) {
                req.headers_mut().insert(header::HOST, v);
            }
            let _ = self.version;
            // nginx's proxy_read_timeout runs once the request is sent; a buffered body is
            // sent at once, a streamed one may take up to write_timeout between writes.
            let timeout = if self.route.request_buffering {
                service.read_timeout
            } else {
                service.read_timeout + service.write_timeout
            };
            match self
                .proxy
                .client
                .send(conn, req, timeout, service.connect_timeout)
                .await
            {
                Ok(res) => {
                    let mut answered = Instant::now();
                    let latency = answered.saturating_duration_since(t0);
                    self.proxy
                        .stats
                        .upstream_latency
                        .observe(latency.as_secs_f64());
                    if let Some(p) = pick {
                        p.report(Outcome::Response {
                            status: res.status().as_u16(),
                            latency,
                        });
                    }
                    let (mut parts, ubody) = res.into_parts();
                    strip_hop_by_hop(&mut parts.headers);
                    if let Some(cookie) = hash_key.as_ref().and_then(|k| k.cookie.as_ref())
                        && let Ok(v) = HeaderValue::from_str(&cookie.set_cookie())
                    {
                        parts.headers.append(header::SET_COOKIE, v);
                    }
                    let body: ProxyBody = if self.route.response_buffering
                        && parts
                            .headers
                            .get(header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                            .is_some_and(|n| n <= MAX_BUFFERED_RESPONSE)
                    {
                        match ubody.collect_up_to(MAX_BUFFERED_RESPONSE).await {
                            Ok(Some(b)) => {
                                answered = Instant::now();
                                full(b)
                            }
                            _ => {
                                return Err(fail(
                                    StatusCode::BAD_GATEWAY,
                                    &errors::proxying_message(StatusCode::BAD_GATEWAY),
                                ));
                            }
                        }
                    } else {
                        ubody.boxed()
                    };
                    return Ok((Response::from_parts(parts, body), latency, answered, addr));
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "upstream request failed");
                    let timed_out = matches!(
                        e,
                        SendError::Timeout | SendError::Reconnect(ConnectError::Timeout)
                    );
                    if let Some(p) = pick {
                        p.report(if timed_out {
                            Outcome::Timeout
                        } else {
                            Outcome::TcpError
                        });
                    }
                    // The request (and its body) is gone: no retry after sending.
                    let status = if timed_out {
                        StatusCode::GATEWAY_TIMEOUT
                    } else {
                        StatusCode::BAD_GATEWAY
                    };
                    return Err(fail(status, &errors::proxying_message(status)));
                }
            }
        }
        let status = if last_timeout {
            StatusCode::GATEWAY_TIMEOUT
        } else {
            StatusCode::BAD_GATEWAY
        };
        Err(fail(status, &errors::proxying_message(status)))
    }
}

/// The route's regex captures by name, and by index as `"0"`, `"1"`, … (Kong's
/// `uri_captures`, which `hash_on = uri_capture` reads).
fn captures_of(m: &router::Match<'_>) -> Vec<(String, String)> {
    let Some(c) = &m.captures else {
        return Vec::new();
    };
    c.unnamed
        .iter()
        .map(|(i, v)| (i.to_string(), v.clone()))
        .chain(c.named.iter().map(|(n, v)| (n.clone(), v.clone())))
        .collect()
}

/// Kong's `kong.tools.uri.escape` of the upstream path (`kong/tools/uri.lua`): every byte
/// outside the reserved and unreserved characters (and `%`) is percent-encoded; the path the
/// router matched is decoded, so this is where it is encoded again for the upstream.
fn escape_path(path: &str) -> std::borrow::Cow<'_, str> {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b"!#$&'()*+,/:;=?@[]-_.~%".contains(&b);
    if path.bytes().all(keep) {
        return std::borrow::Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for b in path.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// `Via` for a hop of HTTP version `v` with nothing before it, without formatting.
fn via_value(v: Version) -> HeaderValue {
    HeaderValue::from_static(match v {
        Version::HTTP_10 => concat!("1.0 deltaplane/", env!("CARGO_PKG_VERSION")),
        Version::HTTP_2 => concat!("2 deltaplane/", env!("CARGO_PKG_VERSION")),
        Version::HTTP_3 => concat!("3 deltaplane/", env!("CARGO_PKG_VERSION")),
        _ => concat!("1.1 deltaplane/", env!("CARGO_PKG_VERSION")),
    })
}

fn via_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "1.0",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
fn split_host_port(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            return (h, p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
        return (host, None);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1, and those `Connection` names), as nginx
/// does when proxying.
///
/// One pass over the names finds them; the map is changed only when there is one (most
/// requests and responses carry none).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|n| is_hop_by_hop(n))
        .cloned()
        .collect();
    for n in present {
        headers.remove(n);
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers removed whatever `Connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::TRAILER
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// A body that calls `done` with the bytes passed on once it ends or is dropped.
struct LoggedBody {
    inner: ProxyBody,
    bytes: u64,
    done: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl LoggedBody {
    fn new(inner: ProxyBody, done: Box<dyn FnOnce(u64) + Send + Sync>) -> LoggedBody {
        LoggedBody {
            inner,
            bytes: 0,
            done: Some(done),
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            std::task::Poll::Ready(None) | std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(done) = this.done.take() {
                    done(this.bytes);
                }
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kong/tools/uri.lua` escape: reserved and unreserved characters stay, others are
    /// percent-encoded.
    #[test]
    fn upstream_paths_are_escaped_as_kong() {
        assert_eq!(escape_path("/a/b-c_d.e~f"), "/a/b-c_d.e~f");
        assert_eq!(escape_path("/a b"), "/a%20b");
        assert_eq!(escape_path("/é"), "/%C3%A9");
        assert_eq!(
            escape_path("/x;y=1,z@h:p!$&'()*+[]"),
            "/x;y=1,z@h:p!$&'()*+[]"
        );
        assert_eq!(escape_path("/q\"<>"), "/q%22%3C%3E");
    }

    #[test]
    fn host_and_port_split() {
        assert_eq!(split_host_port("example.com"), ("example.com", None));
        assert_eq!(
            split_host_port("example.com:8000"),
            ("example.com", Some(8000))
        );
        assert_eq!(split_host_port("[::1]:8443"), ("::1", Some(8443)));
        assert_eq!(split_host_port("[::1]"), ("::1", None));
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
