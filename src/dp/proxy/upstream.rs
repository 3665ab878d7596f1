//! Connections to upstream servers: connect with a timeout (the part a retry may repeat),
//! keep-alive pools per (address, TLS name, protocol), and response bodies that return
//! their connection to the pool when read to the end.
//!
//! HTTP/1.1 is driven inline, in the task of the request that uses the connection (as nginx
//! drives its upstream from the request's event handlers): the request head goes out in one
//! write (with a small buffered body), the response head is parsed with `httparse`, and the
//! response body is read from the connection by the downstream's task through
//! [`UpstreamBody`]. There is no connection task and no channel between the request and its
//! connection. HTTP/2 (gRPC services) goes through hyper's client, one connection per key
//! shared by its requests.
//!
//! Pools are keyed by the address actually connected to, not by configuration, so they
//! survive a configuration swap unless the target itself changed. Like Kong's defaults
//! (`upstream_keepalive_pool_size` 512, `upstream_keepalive_max_requests` 10,000,
//! `upstream_keepalive_idle_timeout` 60 s), at most [`POOL_SIZE`] idle HTTP/1.1 connections
//! are kept per key, each for at most [`MAX_REQUESTS`] requests and [`IDLE_TIMEOUT`] idle. A
//! connection goes back to its pool only when its response body was read exactly to its end;
//! a body dropped early, a close-delimited body, `Connection: close` or HTTP/1.0 close it.
//! A pooled connection the upstream closed meanwhile is found at checkout (or by a sweep of
//! the pools) without a system call in the common case; a request that fails on a reused
//! connection before any byte of the response arrived is sent again on a new connection,
//! once, when its body can be sent again (nginx does the same for cached connections).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::router::FxHasher;
use super::tls::AcceptAnyCert;

/// The error type of bodies the proxy sends.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy passes it on.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Idle connections kept per pool key.
pub const POOL_SIZE: usize = 512;
/// Requests one upstream connection serves before it is closed.
pub const MAX_REQUESTS: u32 = 10_000;
/// How long an idle upstream connection is kept.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest response head accepted (hyper's client reads up to ~400 KiB; nginx's
/// `proxy_buffer_size` is one page, 4 or 8 KiB).
const MAX_HEAD: usize = 64 * 1024;
/// Headers in a response head at most (hyper's default).
const MAX_HEADERS: usize = 100;
/// A buffered request body up to this size goes out in the same write as the head.
const COALESCE_BODY: usize = 16 * 1024;
/// What a read asks of the socket at least.
const READ_CHUNK: usize = 16 * 1024;
/// The pools are swept of expired and closed connections at most this often.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Which pool a connection belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub addr: SocketAddr,
    /// The TLS server name, `None` for plain TCP.
    pub tls: Option<String>,
    /// HTTP/2 (gRPC services) rather than HTTP/1.1.
    pub h2: bool,
}

/// Why a connection could not be made; the attempt may be retried elsewhere.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out")]
    Timeout,
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
}

/// Why a request on a connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No response header within the read timeout.
    #[error("timed out waiting for the upstream's response")]
    Timeout,
    #[error("upstream request failed: {0}")]
    Hyper(#[from] hyper::Error),
    /// Writing the request or reading the response failed.
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    /// The response is not HTTP/1.x as a proxy can pass it on.
    #[error("invalid upstream response: {0}")]
    Invalid(&'static str),
    /// The request body failed while it was being sent.
    #[error("request body failed: {0}")]
    Body(BoxError),
    /// A reused connection failed and a new one could not be made.
    #[error("reconnecting after a stale keep-alive connection: {0}")]
    Reconnect(ConnectError),
}

/// A request body as the proxy sends it upstream.
pub enum OutBody {
    /// Bytes in hand (buffered, replaced by a plugin, or empty): sent with
    /// `Content-Length`, and sendable again on a new connection.
    Full(Bytes),
    /// The downstream's body, streamed as it arrives.
    Stream(ProxyBody),
}

/// A connection checked out for one request.
pub struct Conn {
    key: PoolKey,
    inner: ConnInner,
    /// Whether this connection came from the pool (a failure on it before any response
    /// may be a stale keep-alive; [`Client::send`] then tries a new one).
    pub reused: bool,
}

enum ConnInner {
    H1(H1Conn),
    H2(http2::SendRequest<ProxyBody>),
}

/// An HTTP/1.1 connection, driven by whichever task holds it.
struct H1Conn {
    io: Io,
    /// Bytes read and not yet consumed (empty between exchanges).
    read: BytesMut,
    /// The request head being written; kept for its allocation.
    write: Vec<u8>,
    /// Requests sent on this connection.
    served: u32,
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

struct Idle {
    conn: H1Conn,
    since: Instant,
}

/// Pool maps hash with FxHash: looked up twice per request, keyed by addresses.
type FxBuild = std::hash::BuildHasherDefault<FxHasher>;

struct Pools {
    h1: HashMap<PoolKey, Vec<Idle>, FxBuild>,
    h2: HashMap<PoolKey, http2::SendRequest<ProxyBody>, FxBuild>,
    swept: Instant,
}

/// Every upstream connection of the proxy, shared by all configurations.
pub struct Client {
    pools: Mutex<Pools>,
    /// TLS offering `http/1.1` by ALPN, and `h2` for HTTP/2 pools.
    tls_h1: tokio_rustls::TlsConnector,
    tls_h2: tokio_rustls::TlsConnector,
}

// === impl Client ===

impl Client {
    pub fn new() -> Arc<Client> {
        let connector = |alpn: &[u8]| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert::new()))
                .with_no_client_auth();
            config.alpn_protocols = vec![alpn.to_vec()];
            tokio_rustls::TlsConnector::from(Arc::new(config))
        };
        Arc::new(Client {
            pools: Mutex::new(Pools {
                h1: HashMap::default(),
                h2: HashMap::default(),
                swept: Instant::now(),
            }),
            tls_h1: connector(b"http/1.1"),
            tls_h2: connector(b"h2"),
        })
    }

    /// A connection to `key`: an idle pooled one when there is one, else a new one made
    /// within `timeout`.
    pub async fn connect(&self, key: &PoolKey, timeout: Duration) -> Result<Conn, ConnectError> {
        if let Some(conn) = self.checkout(key) {
            return Ok(conn);
        }
        self.open_within(key, timeout).await
    }

    async fn open_within(&self, key: &PoolKey, timeout: Duration) -> Result<Conn, ConnectError> {
        tokio::time::timeout(timeout, self.open(key))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    fn checkout(&self, key: &PoolKey) -> Option<Conn> {
        if key.h2 {
            let mut pools = self.pools.lock().expect("pool lock");
            let sender = pools.h2.get(key)?;
            if sender.is_closed() {
                pools.h2.remove(key);
                return None;
            }
            return Some(Conn {
                key: key.clone(),
                inner: ConnInner::H2(sender.clone()),
                reused: true,
            });
        }
        loop {
            let idle = {
                let mut pools = self.pools.lock().expect("pool lock");
                let list = pools.h1.get_mut(key)?;
                let idle = list.pop();
                if list.is_empty() {
                    pools.h1.remove(key);
                }
                idle?
            };
            let Idle { mut conn, since } = idle;
            if since.elapsed() > IDLE_TIMEOUT || !conn.is_idle_alive() {
                continue;
            }
            return Some(Conn {
                key: key.clone(),
                inner: ConnInner::H1(conn),
                reused: true,
            });
        }
    }

    async fn open(&self, key: &PoolKey) -> Result<Conn, ConnectError> {
        let tcp = TcpStream::connect(key.addr).await?;
        let _ = tcp.set_nodelay(true);
        let io = match &key.tls {
            None => Io::Plain(tcp),
            Some(name) => {
                let server_name = ServerName::try_from(name.clone())
                    .unwrap_or_else(|_| ServerName::from(key.addr.ip()));
                let connector = if key.h2 { &self.tls_h2 } else { &self.tls_h1 };
                let tls = connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                Io::Tls(Box::new(tls))
            }
        };
        let inner = if key.h2 {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            self.pools
                .lock()
                .expect("pool lock")
                .h2
                .insert(key.clone(), sender.clone());
            ConnInner::H2(sender)
        } else {
            ConnInner::H1(H1Conn {
                io,
                read: BytesMut::new(),
                write: Vec::new(),
                served: 0,
            })
        };
        Ok(Conn {
            key: key.clone(),
            inner,
            reused: false,
        })
    }

    /// Sends `req` on `conn` and waits for the response header within `read_timeout`. The
    /// response body gives the connection back to the pool when read to its end, and fails
    /// when no data arrives for `read_timeout` between reads.
    ///
    /// A request that fails on a reused HTTP/1.1 connection before any of its response
    /// arrived (the upstream closed the idle connection) is sent once more on a new
    /// connection made within `connect_timeout`, when its body can be sent again.
    pub async fn send(
        self: &Arc<Client>,
        conn: Conn,
        req: Request<OutBody>,
        read_timeout: Duration,
        connect_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let Conn {
            key,
            inner,
            mut reused,
        } = conn;
        let mut h1 = match inner {
            ConnInner::H2(sender) => return send_h2(sender, req, read_timeout).await,
            ConnInner::H1(h1) => h1,
        };
        let (parts, mut body) = req.into_parts();
        let head_only = parts.method == Method::HEAD;
        loop {
            let exchanged = tokio::time::timeout(
                read_timeout,
                h1.exchange(&parts.method, &parts.uri, &parts.headers, &mut body),
            )
            .await;
            let head = match exchanged {
                Err(_) => return Err(SendError::Timeout),
                Ok(Ok(head)) => head,
                Ok(Err(failed)) if reused && failed.before_response => {
                    tracing::debug!(addr = %key.addr, error = %failed.error,
                        "stale keep-alive connection, sending again on a new one");
                    h1 = match self.open_within(&key, connect_timeout).await {
                        Ok(Conn {
                            inner: ConnInner::H1(h1),
                            ..
                        }) => h1,
                        Ok(_) => unreachable!("an HTTP/1.1 key opens an HTTP/1.1 connection"),
                        Err(e) => return Err(SendError::Reconnect(e)),
                    };
                    reused = false;
                    continue;
                }
                Ok(Err(failed)) => return Err(failed.error),
            };
            h1.served += 1;
            return Ok(self.respond(key, h1, head, head_only, read_timeout));
        }
    }

    /// The response for a parsed head, its body reading from `h1`.
    fn respond(
        self: &Arc<Client>,
        key: PoolKey,
        h1: H1Conn,
        head: ResponseHead,
        head_only: bool,
        read_timeout: Duration,
    ) -> Response<UpstreamBody> {
        let ResponseHead {
            parts,
            framing,
            keep_alive,
        } = head;
        let framing = if head_only
            || parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else {
            framing
        };
        let reusable = keep_alive
            && h1.served < MAX_REQUESTS
            && parts.status != StatusCode::SWITCHING_PROTOCOLS
            && !matches!(framing, Framing::Close);
        let mut body = H1Body {
            conn: Some(h1),
            framing,
            give_back: reusable.then(|| (self.clone(), key)),
            trailers: None,
        };
        // An empty body is over before anyone reads it: hyper does not poll a body that
        // says it has ended, so the connection goes back now.
        if matches!(body.framing, Framing::Length(0)) {
            body.framing = Framing::Done;
            body.finish();
        }
        Response::from_parts(
            parts,
            UpstreamBody {
                inner: Inner::H1(body),
                read_timeout,
                idle: None,
            },
        )
    }

    fn give_back(&self, key: PoolKey, conn: H1Conn) {
        let now = Instant::now();
        let mut pools = self.pools.lock().expect("pool lock");
        let list = pools.h1.entry(key).or_default();
        if list.len() < POOL_SIZE {
            list.push(Idle { conn, since: now });
        }
        if now.duration_since(pools.swept) < SWEEP_EVERY {
            return;
        }
        // Every few seconds, close what expired or what the upstream closed, so that a
        // pool nobody checks out from does not keep its sockets (at most one non-blocking
        // read per connection the reactor saw become readable).
        pools.swept = now;
        pools.h1.retain(|_, list| {
            list.retain_mut(|idle| {
                now.duration_since(idle.since) <= IDLE_TIMEOUT && idle.conn.is_idle_alive()
            });
            !list.is_empty()
        });
    }
}

async fn send_h2(
    mut sender: http2::SendRequest<ProxyBody>,
    req: Request<OutBody>,
    read_timeout: Duration,
) -> Result<Response<UpstreamBody>, SendError> {
    let req = req.map(|body| match body {
        OutBody::Full(b) => http_body_util::Full::new(b)
            .map_err(|never| -> BoxError { match never {} })
            .boxed(),
        OutBody::Stream(s) => s,
    });
    let res = tokio::time::timeout(read_timeout, sender.send_request(req))
        .await
        .map_err(|_| SendError::Timeout)??;
    Ok(res.map(|body| UpstreamBody {
        inner: Inner::H2(body),
        read_timeout,
        idle: None,
    }))
}

// === impl H1Conn ===

/// A parsed response head and how its body is delimited.
struct ResponseHead {
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
}

/// How a response body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    /// Chunked, in this state.
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    /// Read to its end.
    Done,
}

#[derive(Debug, Clone, Copy)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// In a chunk's data, this many bytes left.
    Data(u64),
    /// After a chunk's data, at its CRLF.
    DataEnd,
    /// After the last chunk, at the trailer section.
    Trailers,
}

/// How a request body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sending {
    /// No body.
    Nothing,
    /// `Content-Length` bytes.
    Length,
    /// Chunked.
    Chunked,
}

/// An exchange that failed, and whether it failed before any of the response arrived
/// with the request still sendable again.
struct Failed {
    error: SendError,
    before_response: bool,
}

impl H1Conn {
    /// Writes the request and reads the response head.
    async fn exchange(
        &mut self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &mut OutBody,
    ) -> Result<ResponseHead, Failed> {
        let fail = |error: SendError, before_response: bool| Failed {
            error,
            before_response,
        };
        // A streamed body is sendable again only until its first frame is taken.
        let mut body_taken = false;
        let sending = self.encode_head(method, uri, headers, body);
        let written: io::Result<()> = async {
            match body {
                OutBody::Full(bytes) if bytes.len() <= COALESCE_BODY => {
                    self.write.extend_from_slice(bytes);
                    self.io.write_all(&self.write).await?;
                }
                OutBody::Full(bytes) => {
                    self.io.write_all(&self.write).await?;
                    self.io.write_all(bytes).await?;
                }
                OutBody::Stream(_) => {
                    self.io.write_all(&self.write).await?;
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = written {
            return Err(fail(e.into(), true));
        }
        if let OutBody::Stream(stream) = body
            && sending != Sending::Nothing
        {
            body_taken = true;
            self.write_stream(stream, sending == Sending::Chunked)
                .await
                .map_err(|e| fail(e, false))?;
        }
        if let Err(e) = self.io.flush().await {
            return Err(fail(e.into(), !body_taken));
        }
        // Once the request is out, only an idempotent one is sent again (nginx's
        // `proxy_next_upstream` leaves POST, LOCK and PATCH alone once sent).
        let idempotent = !matches!(method.as_str(), "POST" | "PATCH" | "LOCK");
        self.read_head()
            .await
            .map_err(|(error, nothing_read)| fail(error, nothing_read && !body_taken && idempotent))
    }

    /// Encodes the request head into `self.write`; how the body goes.
    fn encode_head(
        &mut self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: &OutBody,
    ) -> Sending {
        let w = &mut self.write;
        w.clear();
        w.extend_from_slice(method.as_str().as_bytes());
        w.push(b' ');
        w.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        w.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in headers {
            if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
                continue;
            }
            w.extend_from_slice(name.as_str().as_bytes());
            w.extend_from_slice(b": ");
            w.extend_from_slice(value.as_bytes());
            w.extend_from_slice(b"\r\n");
        }
        // Framing as hyper's client decides it (`proto/h1/role.rs`, `set_length`): a body
        // in hand has its length; a streamed one keeps the length it announced, else goes
        // chunked, except for GET, HEAD and CONNECT, which then send none.
        let announced = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let sending = match body {
            OutBody::Full(bytes) if bytes.is_empty() => {
                if announced == Some(0) {
                    w.extend_from_slice(b"content-length: 0\r\n");
                }
                Sending::Nothing
            }
            OutBody::Full(bytes) => {
                write_content_length(w, bytes.len() as u64);
                Sending::Length
            }
            OutBody::Stream(stream) => match announced.or(stream.size_hint().exact()) {
                Some(n) => {
                    write_content_length(w, n);
                    Sending::Length
                }
                None if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) => {
                    Sending::Nothing
                }
                None => {
                    w.extend_from_slice(b"transfer-encoding: chunked\r\n");
                    Sending::Chunked
                }
            },
        };
        w.extend_from_slice(b"\r\n");
        sending
    }

    /// Streams a request body after its head.
    async fn write_stream(
        &mut self,
        stream: &mut ProxyBody,
        chunked: bool,
    ) -> Result<(), SendError> {
        while let Some(frame) = stream.frame().await {
            let frame = frame.map_err(SendError::Body)?;
            let Ok(data) = frame.into_data() else {
                continue; // Trailers are not passed on.
            };
            if data.is_empty() {
                continue;
            }
            if chunked {
                let size = format!("{:x}\r\n", data.len());
                self.io.write_all(size.as_bytes()).await?;
                self.io.write_all(&data).await?;
                self.io.write_all(b"\r\n").await?;
            } else {
                self.io.write_all(&data).await?;
            }
        }
        if chunked {
            self.io.write_all(b"0\r\n\r\n").await?;
        }
        Ok(())
    }

    /// Reads the response head (skipping interim 1xx responses other than 101). The error
    /// says whether nothing at all was read.
    async fn read_head(&mut self) -> Result<ResponseHead, (SendError, bool)> {
        let mut nothing_read = true;
        loop {
            if !self.read.is_empty() {
                nothing_read = false;
                match parse_head(&mut self.read) {
                    Ok(Some(head))
                        if head.parts.status.is_informational()
                            && head.parts.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue;
                    }
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) if self.read.len() >= MAX_HEAD => {
                        return Err((SendError::Invalid("response head too large"), false));
                    }
                    Ok(None) => {}
                    Err(e) => return Err((e, false)),
                }
            }
            let n = std::future::poll_fn(|cx| self.poll_fill(cx))
                .await
                .map_err(|e| (e.into(), nothing_read))?;
            if n == 0 {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a response",
                );
                return Err((e.into(), nothing_read));
            }
        }
    }

    /// Reads what the socket has into `self.read`; `Ok(0)` at EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        let spare = self.read.spare_capacity_mut();
        let mut buf = ReadBuf::uninit(spare);
        let start = buf.filled().as_ptr();
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        // The reader must fill the buffer it was given, not swap in another.
        assert_eq!(
            start,
            buf.filled().as_ptr(),
            "the read filled another buffer"
        );
        let n = buf.filled().len();
        let len = self.read.len();
        // SAFETY: the read above initialised the first `n` bytes of the spare capacity
        // (`ReadBuf::filled`, checked to be that very memory), as tokio-util's
        // `poll_read_buf` relies on too.
        unsafe { self.read.set_len(len + n) };
        Poll::Ready(Ok(n))
    }

    /// Whether an idle connection can take a request: nothing arrived on it since it went
    /// idle (no system call unless the socket was signalled readable), or what arrived was
    /// TLS housekeeping (a session ticket) rather than a close or stray bytes.
    fn is_idle_alive(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let tcp = match &self.io {
            Io::Plain(tcp) => tcp,
            Io::Tls(tls) => tls.get_ref().0,
        };
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => return true,
            Poll::Ready(Err(_)) => return false,
            Poll::Ready(Ok(())) => {}
        }
        let mut scratch = [0u8; 64];
        let mut buf = ReadBuf::new(&mut scratch);
        // Pending: readiness was stale, or TLS consumed housekeeping records; anything else
        // (EOF, stray bytes, an error) ends the connection.
        Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }
}

fn write_content_length(w: &mut Vec<u8>, mut n: u64) {
    w.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    w.extend_from_slice(&digits[i..]);
    w.extend_from_slice(b"\r\n");
}

/// Parses a response head at the start of `read`, taking it out of the buffer; `None`
/// when it is not complete yet.
fn parse_head(read: &mut BytesMut) -> Result<Option<ResponseHead>, SendError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut slots);
    let len = match res.parse(read) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(SendError::Invalid("too many response headers"));
        }
        Err(_) => return Err(SendError::Invalid("malformed response head")),
    };
    let status = res
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(SendError::Invalid("bad status code"))?;
    let version = match res.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let reason = res
        .reason
        .filter(|r| Some(*r) != status.canonical_reason() && !r.is_empty())
        .map(|r| Bytes::copy_from_slice(r.as_bytes()));
    // Header names and values as offsets, so that values can share the head's bytes.
    let base = read.as_ptr() as usize;
    let mut spans = [((0usize, 0usize), (0usize, 0usize)); MAX_HEADERS];
    let n_headers = res.headers.len();
    for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = ((name, name + h.name.len()), (value, value + h.value.len()));
    }
    let head = read.split_to(len).freeze();
    let mut headers = HeaderMap::with_capacity(n_headers);
    let mut keep_alive = version == Version::HTTP_11;
    let mut chunked = false;
    let mut transfer_encoded = false;
    let mut length: Option<u64> = None;
    for &((n0, n1), (v0, v1)) in &spans[..n_headers] {
        let name = HeaderName::from_bytes(&head[n0..n1])
            .map_err(|_| SendError::Invalid("bad header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(v0..v1))
            .map_err(|_| SendError::Invalid("bad header value"))?;
        if name == header::CONNECTION {
            if has_token(&value, "close") {
                keep_alive = false;
            }
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoded = true;
            // Chunked only when it is the last coding (RFC 9112 §6.3).
            chunked = value
                .to_str()
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if name == header::CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(SendError::Invalid("bad content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(SendError::Invalid("conflicting content-length"));
            }
            length = Some(n);
        }
        headers.append(name, value);
    }
    if version == Version::HTTP_10 {
        // HTTP/1.0 closes unless it says otherwise; we close it either way.
        keep_alive = false;
    }
    if transfer_encoded && length.is_some() {
        // Both framings: Transfer-Encoding wins, the Content-Length is not passed on (the
        // client would frame the decoded body by it), and the connection is not reused
        // (RFC 9112 §6.3: a possible response-splitting attempt; close after it).
        headers.remove(header::CONTENT_LENGTH);
        keep_alive = false;
    }
    let framing = if transfer_encoded {
        if chunked {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    if let Some(reason) = reason
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(reason)
    {
        parts.extensions.insert(reason);
    }
    Ok(Some(ResponseHead {
        parts,
        framing,
        keep_alive,
    }))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

// === impl UpstreamBody ===

/// An upstream response body: gives its connection back at the end, and enforces the
/// read timeout between reads.
pub struct UpstreamBody {
    inner: Inner,
    read_timeout: Duration,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
}

// HTTP/1.1 is the common case; boxing it would cost an allocation per response.
#[allow(clippy::large_enum_variant)]
enum Inner {
    H1(H1Body),
    H2(Incoming),
}

/// A response body read from an inline HTTP/1.1 connection.
struct H1Body {
    /// `None` once the body ended (or failed).
    conn: Option<H1Conn>,
    framing: Framing,
    /// Where the connection goes at a clean end, `None` when it is not reusable.
    give_back: Option<(Arc<Client>, PoolKey)>,
    /// Trailers parsed at the end of a chunked body, to pass on as the last frame.
    trailers: Option<HeaderMap>,
}

/// The upstream sent nothing for the read timeout in the middle of a body.
#[derive(Debug, thiserror::Error)]
#[error("upstream read timed out")]
pub struct ReadTimeout;

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::H1(body) => body.poll_frame(cx),
            Inner::H2(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|e| -> BoxError { Box::new(e) }),
        };
        match polled {
            Poll::Ready(frame) => {
                this.idle = None;
                if let (Some(Err(_)), Inner::H1(body)) = (&frame, &mut this.inner) {
                    body.fail();
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                let sleep = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(sleep.as_mut().poll(cx));
                if let Inner::H1(body) = &mut this.inner {
                    body.fail();
                }
                Poll::Ready(Some(Err(Box::new(ReadTimeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(body) => matches!(body.framing, Framing::Done) && body.trailers.is_none(),
            Inner::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(body) => match body.framing {
                Framing::Length(n) => SizeHint::with_exact(n),
                Framing::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
            Inner::H2(body) => body.size_hint(),
        }
    }
}

impl UpstreamBody {
    /// The whole body (for `response_buffering`), up to `limit` bytes.
    pub async fn collect_up_to(self, limit: usize) -> Result<Option<Bytes>, BoxError> {
        if self.size_hint().lower() as usize > limit {
            return Ok(None);
        }
        let collected = self.collect().await?.to_bytes();
        Ok(Some(collected))
    }
}

impl H1Body {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let Some(trailers) = self.trailers.take() {
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.framing {
                Framing::Done => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    continue;
                }
                Framing::Length(left) => {
                    if conn.read.is_empty() {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(eof_in_body())));
                        }
                        continue;
                    }
                    let take = (*left).min(conn.read.len() as u64) as usize;
                    let data = conn.read.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        // The last bytes: hyper may not poll again once the body says it
                        // has ended, so the connection goes back now.
                        self.framing = Framing::Done;
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close => {
                    if conn.read.is_empty() {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            self.framing = Framing::Done;
                        }
                        continue;
                    }
                    let data = conn.read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match chunk_step(state, &mut conn.read)? {
                    Step::Data(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Step::Again => continue,
                    Step::End(trailers) => {
                        self.framing = Framing::Done;
                        if !trailers.is_empty() {
                            self.trailers = Some(trailers);
                        }
                        self.finish();
                        continue;
                    }
                    Step::NeedMore => {
                        if ready!(conn.poll_fill(cx))? == 0 {
                            return Poll::Ready(Some(Err(eof_in_body())));
                        }
                    }
                },
            }
        }
    }

    /// The body ended: the connection goes back to its pool if it may and nothing beyond
    /// the body was received; else it is closed.
    fn finish(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if let Some((client, key)) = self.give_back.take()
            && conn.read.is_empty()
        {
            client.give_back(key, conn);
        }
    }

    /// The body failed: the connection is closed.
    fn fail(&mut self) {
        self.conn = None;
        self.give_back = None;
        self.framing = Framing::Done;
    }
}

fn eof_in_body() -> BoxError {
    Box::new(io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "upstream closed the connection in the middle of the body",
    ))
}

/// One step of chunked decoding over the bytes read so far.
enum Step {
    Data(Bytes),
    /// The state moved; decode on.
    Again,
    /// The last chunk and the trailer section were read.
    End(HeaderMap),
    NeedMore,
}

/// A chunk-size line is at most this long (hyper allows extensions up to 16 KiB in total;
/// nginx fails a line longer than its buffer).
const MAX_CHUNK_LINE: usize = 4096;

fn chunk_step(state: &mut Chunk, read: &mut BytesMut) -> Result<Step, BoxError> {
    let invalid = |what: &'static str| -> BoxError { Box::new(SendError::Invalid(what)) };
    match state {
        Chunk::Size => {
            let Some(end) = read.iter().position(|&b| b == b'\n') else {
                if read.len() > MAX_CHUNK_LINE {
                    return Err(invalid("chunk size line too long"));
                }
                return Ok(Step::NeedMore);
            };
            let line = read[..end]
                .strip_suffix(b"\r")
                .ok_or_else(|| invalid("chunk size line without CR"))?;
            let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
            let digits = digits.trim_ascii();
            if digits.is_empty() || digits.len() > 16 {
                return Err(invalid("bad chunk size"));
            }
            let mut size: u64 = 0;
            for &d in digits {
                let v = (d as char)
                    .to_digit(16)
                    .ok_or_else(|| invalid("bad chunk size"))?;
                size = (size << 4) | u64::from(v);
            }
            read.advance(end + 1);
            *state = if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            };
            Ok(Step::Again)
        }
        Chunk::Data(left) => {
            if read.is_empty() {
                return Ok(Step::NeedMore);
            }
            let take = (*left).min(read.len() as u64) as usize;
            let data = read.split_to(take).freeze();
            *left -= take as u64;
            if *left == 0 {
                *state = Chunk::DataEnd;
            }
            Ok(Step::Data(data))
        }
        Chunk::DataEnd => {
            if read.len() < 2 {
                return Ok(Step::NeedMore);
            }
            if &read[..2] != b"\r\n" {
                return Err(invalid("chunk data without CRLF"));
            }
            read.advance(2);
            *state = Chunk::Size;
            Ok(Step::Again)
        }
        Chunk::Trailers => {
            let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
            match httparse::parse_headers(read, &mut slots) {
                Ok(httparse::Status::Complete((len, parsed))) => {
                    let mut trailers = HeaderMap::new();
                    for h in parsed.iter() {
                        if let (Ok(n), Ok(v)) = (
                            HeaderName::from_bytes(h.name.as_bytes()),
                            HeaderValue::from_bytes(h.value),
                        ) {
                            trailers.append(n, v);
                        }
                    }
                    read.advance(len);
                    Ok(Step::End(trailers))
                }
                Ok(httparse::Status::Partial) if read.len() > MAX_HEAD => {
                    Err(invalid("trailer section too large"))
                }
                Ok(httparse::Status::Partial) => Ok(Step::NeedMore),
                Err(_) => Err(invalid("malformed trailer section")),
            }
        }
    }
}

// === impl Io ===

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The inline HTTP/1.1 client against scripted upstreams: framing both ways, reuse,
    //! stale connections, interim responses, timeouts.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    use super::*;

    /// One scripted answer: written in pieces (with a pause between), then the connection
    /// is closed or kept.
    struct Answer {
        pieces: Vec<&'static [u8]>,
        close: bool,
    }

    fn answer(pieces: &[&'static [u8]]) -> Answer {
        Answer {
            pieces: pieces.to_vec(),
            close: false,
        }
    }

    fn closing(pieces: &[&'static [u8]]) -> Answer {
        Answer {
            pieces: pieces.to_vec(),
            close: true,
        }
    }

    /// An upstream that answers requests with `answers` in order, across connections,
    /// recording each request as received.
    struct Upstream {
        key: PoolKey,
        accepts: Arc<AtomicUsize>,
        requests: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    async fn upstream(answers: Vec<Answer>) -> Upstream {
        serve(answers, None).await
    }

    /// The same over TLS, with the proxy's generated default certificate.
    async fn tls_upstream(answers: Vec<Answer>) -> Upstream {
        let certificates = Arc::new(super::super::tls::Certificates::new(&[], &[]).0);
        let resolver = super::super::tls::SniResolver::new(
            Arc::new(move || certificates.clone()),
            super::super::tls::default_certificate().unwrap(),
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        let mut up = serve(
            answers,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await;
        up.key.tls = Some("localhost".to_owned());
        up
    }

    async fn serve(answers: Vec<Answer>, tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
        let (a, r) = (accepts.clone(), requests.clone());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (answers, requests, tls) = (answers.clone(), r.clone(), tls.clone());
                tokio::spawn(async move {
                    let mut tcp: Pin<Box<dyn Duplex>> = match tls {
                        None => Box::pin(tcp),
                        Some(acceptor) => Box::pin(acceptor.accept(tcp).await.unwrap()),
                    };
                    let mut buf = Vec::new();
                    loop {
                        let Some(request) = read_request(&mut tcp, &mut buf).await else {
                            return;
                        };
                        requests.lock().unwrap().push(request);
                        let Some(answer) = answers.lock().unwrap().pop_front() else {
                            return;
                        };
                        for (i, piece) in answer.pieces.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            if tcp.write_all(piece).await.is_err() {
                                return;
                            }
                        }
                        if answer.close {
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            key: PoolKey {
                addr,
                tls: None,
                h2: false,
            },
            accepts,
            requests,
        }
    }

    trait Duplex: AsyncRead + AsyncWrite + Send {}
    impl<T: AsyncRead + AsyncWrite + Send> Duplex for T {}

    /// Reads one request (head, and a body by Content-Length or chunked) from `tcp`.
    async fn read_request(tcp: &mut Pin<Box<dyn Duplex>>, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        loop {
            if let Some(end) = find(buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map(|n| n.trim().parse::<usize>().unwrap());
                let total = if head.contains("transfer-encoding: chunked") {
                    find(&buf[end..], b"0\r\n\r\n").map(|i| end + i + 5)
                } else {
                    Some(end + 4 + length.unwrap_or(0))
                };
                if let Some(total) = total
                    && buf.len() >= total
                {
                    return Some(buf.drain(..total).collect());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = tcp.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }

    fn get(path: &str) -> Request<OutBody> {
        request(Method::GET, path, OutBody::Full(Bytes::new()))
    }

    fn request(method: Method, path: &str, body: OutBody) -> Request<OutBody> {
        Request::builder()
            .method(method)
            .uri(path)
            .header("host", "up.test")
            .body(body)
            .unwrap()
    }

    const SECOND: Duration = Duration::from_secs(1);

    /// Sends `req` on a connection from the pool or a new one; the response's head and
    /// whole body (with trailers), and whether the connection was reused.
    async fn exchange(
        client: &Arc<Client>,
        up: &Upstream,
        req: Request<OutBody>,
    ) -> Result<(http::response::Parts, Bytes, Option<HeaderMap>, bool), BoxError> {
        let conn = client.connect(&up.key, SECOND).await?;
        let reused = conn.reused;
        let res = client.send(conn, req, SECOND, SECOND).await?;
        let (parts, body) = res.into_parts();
        let collected = body.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((parts, collected.to_bytes(), trailers, reused))
    }

    #[tokio::test]
    async fn content_length_bodies_reuse_the_connection() {
        let up = upstream(vec![
            answer(&[
                b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: 1\r\n\r\nhel",
                b"lo",
            ]),
            answer(&[b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"]),
        ])
        .await;
        let client = Client::new();
        let (parts, body, _, reused) = exchange(&client, &up, get("/a?b=1")).await.unwrap();
        assert_eq!(parts.status, StatusCode::OK);
        assert_eq!(parts.headers["x-a"], "1");
        assert_eq!(body, "hello");
        assert!(!reused);
        let (parts, body, _, reused) = exchange(&client, &up, get("/c")).await.unwrap();
        assert_eq!(
            (parts.status, &body[..], reused),
            (StatusCode::CREATED, &b"ok"[..], true)
        );
        assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
        let requests = up.requests.lock().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&requests[0]),
            "GET /a?b=1 HTTP/1.1\r\nhost: up.test\r\n\r\n"
        );
    }

    /// Over TLS (with the TLS 1.3 session tickets the server sends after the handshake
    /// arriving on the idle connection).
    #[tokio::test]
    async fn tls_connections_are_reused() {
        let up = tls_upstream(vec![
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo"]),
            closing(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nthree"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfour"]),
        ])
        .await;
        let client = Client::new();
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (_, body, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
            seen.push((String::from_utf8_lossy(&body).into_owned(), reused));
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let reused: Vec<bool> = seen.iter().map(|(_, r)| *r).collect();
        let bodies: Vec<&str> = seen.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(bodies, ["one", "two", "three", "four"]);
        assert_eq!(reused, [false, true, true, false]);
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn chunked_bodies_are_decoded_with_their_trailers() {
        let up = upstream(vec![
            answer(&[
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhel",
                b"lo\r\n",
                b"A\r\n, chunked!\r\n0\r\nx-t: done\r\n\r\n",
            ]),
            answer(&[b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"]),
        ])
        .await;
        let client = Client::new();
        let (_, body, trailers, _) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(body, "hello, chunked!");
        assert_eq!(trailers.unwrap()["x-t"], "done");
        let (_, body, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!((&body[..], reused), (&b""[..], true));
    }

    #[tokio::test]
    async fn close_delimited_bodies_end_at_eof_and_are_not_reused() {
        let up = upstream(vec![
            closing(&[b"HTTP/1.1 200 OK\r\n\r\nuntil ", b"the end"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"]),
            answer(&[b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\nx"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]),
        ])
        .await;
        let client = Client::new();
        let (_, body, _, _) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(body, "until the end");
        // `Connection: close` and HTTP/1.0 are not reused either.
        for _ in 0..3 {
            let (_, _, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
            assert!(!reused);
        }
        assert_eq!(up.accepts.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn transfer_encoding_overrides_content_length_and_closes() {
        let up = upstream(vec![
            answer(&[
                b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
                b"5\r\nhello\r\n0\r\n\r\n",
            ]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]),
        ])
        .await;
        let client = Client::new();
        let (parts, body, _, _) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(body, "hello");
        assert!(parts.headers.get(header::CONTENT_LENGTH).is_none());
        let (_, body, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(body, "ok");
        assert!(
            !reused,
            "a response with both framings closes its connection"
        );
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn responses_without_a_body_do_not_read_one() {
        let up = upstream(vec![
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"]),
            answer(&[b"HTTP/1.1 204 No Content\r\n\r\n"]),
            answer(&[b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n"]),
            answer(&[
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            ]),
        ])
        .await;
        let client = Client::new();
        let head = request(Method::HEAD, "/", OutBody::Full(Bytes::new()));
        let (parts, body, _, _) = exchange(&client, &up, head).await.unwrap();
        assert_eq!(
            (parts.headers["content-length"].as_bytes(), &body[..]),
            (&b"100"[..], &b""[..])
        );
        for status in [204, 304] {
            let (parts, body, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
            assert_eq!(
                (parts.status.as_u16(), &body[..], reused),
                (status, &b""[..], true)
            );
        }
        // An interim 100 is skipped.
        let (parts, body, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(
            (parts.status.as_u16(), &body[..], reused),
            (200, &b"hi"[..], true)
        );
        assert_eq!(up.accepts.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn request_bodies_are_framed_as_hyper_frames_them() {
        let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let up = upstream(vec![answer(&[ok]), answer(&[ok]), answer(&[ok])]).await;
        let client = Client::new();
        let full = request(
            Method::POST,
            "/f",
            OutBody::Full(Bytes::from_static(b"abc")),
        );
        exchange(&client, &up, full).await.unwrap();
        // A stream of unknown length goes chunked.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"hello "))))
            .unwrap();
        tx.unbounded_send(Ok(Frame::data(Bytes::from_static(b"world"))))
            .unwrap();
        drop(tx);
        let stream = http_body_util::StreamBody::new(rx).boxed();
        let streamed = request(Method::PUT, "/s", OutBody::Stream(stream));
        exchange(&client, &up, streamed).await.unwrap();
        // A GET whose length is unknown sends none.
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Frame<Bytes>, BoxError>>();
        drop(tx);
        let stream = http_body_util::StreamBody::new(rx).boxed();
        exchange(
            &client,
            &up,
            request(Method::GET, "/g", OutBody::Stream(stream)),
        )
        .await
        .unwrap();
        let requests: Vec<String> = up
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        assert_eq!(
            requests,
            [
                "POST /f HTTP/1.1\r\nhost: up.test\r\ncontent-length: 3\r\n\r\nabc",
                "PUT /s HTTP/1.1\r\nhost: up.test\r\ntransfer-encoding: chunked\r\n\r\n\
                 6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
                "GET /g HTTP/1.1\r\nhost: up.test\r\n\r\n",
            ]
        );
    }

    /// The upstream closed a pooled connection without saying so: the request goes out
    /// again on a new one (found closed at checkout, or failing on it).
    #[tokio::test]
    async fn a_stale_pooled_connection_is_replaced() {
        let up = upstream(vec![
            closing(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb"]),
        ])
        .await;
        let client = Client::new();
        let (_, body, _, _) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(body, "a");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let (_, body, _, _) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!(body, "b");
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
    }

    /// Whether or not the close was seen, a request that fails on a reused connection
    /// before any response is sent again on a new one.
    #[tokio::test]
    async fn a_request_failing_on_a_reused_connection_is_sent_again() {
        let up = upstream(vec![
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"]),
            // The second request on the first connection gets nothing: closed.
            closing(&[]),
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nc"]),
        ])
        .await;
        let client = Client::new();
        exchange(&client, &up, get("/")).await.unwrap();
        let (_, body, _, reused) = exchange(&client, &up, get("/")).await.unwrap();
        assert_eq!((&body[..], reused), (&b"c"[..], true));
        assert_eq!(up.accepts.load(Ordering::SeqCst), 2);
        assert_eq!(up.requests.lock().unwrap().len(), 3);
    }

    /// A pooled connection the upstream closed is dropped by the next sweep, whichever
    /// pool the connection that triggers it goes back to.
    #[tokio::test]
    async fn sweeps_close_what_upstreams_closed() {
        let closed = upstream(vec![closing(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ])])
        .await;
        let open = upstream(vec![answer(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        ])])
        .await;
        let client = Client::new();
        exchange(&client, &closed, get("/")).await.unwrap();
        assert!(client.pools.lock().unwrap().h1.contains_key(&closed.key));
        tokio::time::sleep(Duration::from_millis(50)).await;
        let due = Instant::now().checked_sub(SWEEP_EVERY).unwrap();
        client.pools.lock().unwrap().swept = due;
        exchange(&client, &open, get("/")).await.unwrap();
        let pools = client.pools.lock().unwrap();
        assert!(!pools.h1.contains_key(&closed.key));
        assert_eq!(pools.h1[&open.key].len(), 1);
    }

    #[tokio::test]
    async fn a_post_is_not_sent_twice() {
        let up = upstream(vec![
            answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na"]),
            closing(&[]),
        ])
        .await;
        let client = Client::new();
        exchange(&client, &up, get("/")).await.unwrap();
        let post = request(Method::POST, "/", OutBody::Full(Bytes::from_static(b"x")));
        let err = exchange(&client, &up, post).await.unwrap_err();
        assert!(
            err.to_string().contains("closed before a response"),
            "{err}"
        );
        assert_eq!(up.requests.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_body_that_stalls_times_out_and_is_not_reused() {
        let up = upstream(vec![answer(&[
            b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc",
        ])])
        .await;
        let client = Client::new();
        let conn = client.connect(&up.key, SECOND).await.unwrap();
        let res = client
            .send(conn, get("/"), Duration::from_millis(100), SECOND)
            .await
            .unwrap();
        let err = res.into_body().collect().await.unwrap_err();
        assert!(err.is::<ReadTimeout>(), "{err}");
        assert!(client.pools.lock().unwrap().h1.is_empty());
    }

    #[tokio::test]
    async fn malformed_responses_are_errors() {
        for bad in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"[..],
            b"NOT HTTP\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        ] {
            let up = upstream(vec![answer(&[bad])]).await;
            let client = Client::new();
            assert!(exchange(&client, &up, get("/")).await.is_err(), "{bad:?}");
        }
    }
}
