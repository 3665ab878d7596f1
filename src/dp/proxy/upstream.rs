//! Connections to upstream servers: connect with a timeout (the part a retry may repeat),
//! keep-alive pools per (address, TLS name, protocol), and response bodies that return
//! their connection to the pool when read to the end.
//!
//! Pools are keyed by the address actually connected to, not by configuration, so they
//! survive a configuration swap unless the target itself changed. Like Kong's defaults
//! (`upstream_keepalive_pool_size` 512, `upstream_keepalive_max_requests` 10,000,
//! `upstream_keepalive_idle_timeout` 60 s), at most [`POOL_SIZE`] idle HTTP/1.1 connections
//! are kept per key, each for at most [`MAX_REQUESTS`] requests and [`IDLE_TIMEOUT`] idle.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
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
    Io(#[from] std::io::Error),
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
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
}

enum Sender {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

/// A connection checked out for one request.
pub struct Conn {
    key: PoolKey,
    sender: Sender,
    served: u32,
    /// Whether this connection came from the pool (a failure on it before any response
    /// may be a stale keep-alive: the caller may retry on a fresh one).
    pub reused: bool,
}

struct Idle {
    sender: http1::SendRequest<ProxyBody>,
    served: u32,
    since: Instant,
}

/// Pool maps hash with FxHash: looked up twice per request, keyed by addresses.
type FxBuild = std::hash::BuildHasherDefault<FxHasher>;

#[derive(Default)]
struct Pools {
    h1: HashMap<PoolKey, Vec<Idle>, FxBuild>,
    h2: HashMap<PoolKey, http2::SendRequest<ProxyBody>, FxBuild>,
}

/// Every upstream connection of the proxy, shared by all configurations.
pub struct Client {
    pools: Mutex<Pools>,
    /// TLS offering `http/1.1` by ALPN, and `h2` for HTTP/2 pools.
    tls_h1: tokio_rustls::TlsConnector,
    tls_h2: tokio_rustls::TlsConnector,
}

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
            pools: Mutex::new(Pools::default()),
            tls_h1: connector(b"http/1.1"),
            tls_h2: connector(b"h2"),
        })
    }

    /// A connection to `key`: an idle pooled one when there is one, else a new one made
    /// within `timeout`.
    pub async fn connect(&self, key: &PoolKey, timeout: Duration) -> Result<Conn, ConnectError> {
        if let Some(conn) = self.checkout(key).await {
            return Ok(conn);
        }
        tokio::time::timeout(timeout, self.open(key))
            .await
            .map_err(|_| ConnectError::Timeout)?
    }

    async fn checkout(&self, key: &PoolKey) -> Option<Conn> {
        if key.h2 {
            let sender = self.pools.lock().expect("pool lock").h2.get(key).cloned()?;
            if sender.is_closed() {
                self.pools.lock().expect("pool lock").h2.remove(key);
                return None;
            }
            return Some(Conn {
                key: key.clone(),
                sender: Sender::H2(sender),
                served: 0,
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
            if idle.since.elapsed() > IDLE_TIMEOUT || idle.sender.is_closed() {
                continue;
            }
            let mut sender = idle.sender;
            // Returned at the end of a response body, the connection may take a moment
            // to be ready for the next request; a closed one fails here.
            if sender.ready().await.is_err() {
                continue;
            }
            return Some(Conn {
                key: key.clone(),
                sender: Sender::H1(sender),
                served: idle.served,
                reused: true,
            });
        }
    }

    async fn open(&self, key: &PoolKey) -> Result<Conn, ConnectError> {
        let tcp = TcpStream::connect(key.addr).await?;
        let _ = tcp.set_nodelay(true);
        let sender = match &key.tls {
            None => handshake(key.h2, tcp).await?,
            Some(name) => {
                let server_name = ServerName::try_from(name.clone())
                    .unwrap_or_else(|_| ServerName::from(key.addr.ip()));
                let connector = if key.h2 { &self.tls_h2 } else { &self.tls_h1 };
                let tls = connector
                    .connect(server_name, tcp)
                    .await
                    .map_err(ConnectError::Tls)?;
                handshake(key.h2, tls).await?
            }
        };
        if let Sender::H2(s) = &sender {
            self.pools
                .lock()
                .expect("pool lock")
                .h2
                .insert(key.clone(), s.clone());
        }
        Ok(Conn {
            key: key.clone(),
            sender,
            served: 0,
            reused: false,
        })
    }

    /// Sends `req` on `conn` and waits for the response header within `read_timeout`. The
    /// response body gives the connection back to the pool when read to its end, and fails
    /// when no data arrives for `read_timeout` between reads.
    pub async fn send(
        self: &Arc<Client>,
        mut conn: Conn,
        req: Request<ProxyBody>,
        read_timeout: Duration,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let fut = match &mut conn.sender {
            Sender::H1(s) => futures::future::Either::Left(s.send_request(req)),
            Sender::H2(s) => futures::future::Either::Right(s.send_request(req)),
        };
        let res = tokio::time::timeout(read_timeout, fut)
            .await
            .map_err(|_| SendError::Timeout)??;
        conn.served += 1;
        let keep = match &conn.sender {
            Sender::H1(_) => conn.served < MAX_REQUESTS && keeps_alive(&res),
            Sender::H2(_) => false,
        };
        let (parts, body) = res.into_parts();
        let give_back = match conn.sender {
            Sender::H1(sender) if keep => Some((self.clone(), conn.key, sender, conn.served)),
            _ => None,
        };
        Ok(Response::from_parts(
            parts,
            UpstreamBody {
                inner: body,
                give_back,
                read_timeout,
                idle: None,
            },
        ))
    }

    fn give_back(&self, key: PoolKey, sender: http1::SendRequest<ProxyBody>, served: u32) {
        let mut pools = self.pools.lock().expect("pool lock");
        let list = pools.h1.entry(key).or_default();
        if list.len() < POOL_SIZE {
            list.push(Idle {
                sender,
                served,
                since: Instant::now(),
            });
        }
    }
}

async fn handshake<T>(h2: bool, io: T) -> Result<Sender, ConnectError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H2(sender))
    } else {
        let (sender, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(ConnectError::Handshake)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Sender::H1(sender))
    }
}

fn keeps_alive<B>(res: &Response<B>) -> bool {
    if res.version() == http::Version::HTTP_10 {
        return false;
    }
    !res.headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
        })
}

/// An upstream response body: gives its connection back at the end, and enforces the
/// read timeout between reads.
pub struct UpstreamBody {
    inner: Incoming,
    give_back: Option<(Arc<Client>, PoolKey, http1::SendRequest<ProxyBody>, u32)>,
    read_timeout: Duration,
    idle: Option<Pin<Box<tokio::time::Sleep>>>,
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
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.idle = None;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.give_back = None;
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Ready(None) => {
                if let Some((client, key, sender, served)) = this.give_back.take() {
                    client.give_back(key, sender, served);
                }
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timeout = this.read_timeout;
                let sleep = this
                    .idle
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                ready!(sleep.as_mut().poll(cx));
                this.give_back = None;
                Poll::Ready(Some(Err(Box::new(ReadTimeout))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
