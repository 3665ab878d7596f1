//! Local upstream servers for the proxy tests, on port 0.
//!
//! The echo server answers every request with JSON describing it (method, path with query,
//! headers, body length, which server answered), and takes orders from the path:
//! `/status/<code>` answers that status, `/delay/<ms>` waits before answering,
//! `/stall-body` sends its header and then nothing.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

/// A running echo server.
pub struct Echo {
    pub addr: SocketAddr,
    #[allow(dead_code)]
    pub name: String,
    /// Requests served.
    pub hits: Arc<AtomicU64>,
    /// TCP connections accepted.
    pub connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    pub async fn start(name: &str) -> Echo {
        Echo::start_on(0, name).await
    }

    /// An echo server on a chosen port of 127.0.0.1 (0: any).
    pub async fn start_on(port: u16, name: &str) -> Echo {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (h, c, n) = (hits.clone(), connections.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::Relaxed);
                let (h, n) = (h.clone(), n.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, n.clone(), h.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Echo {
            addr,
            name: name.to_owned(),
            hits,
            connections,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    req: Request<Incoming>,
    name: String,
    hits: Arc<AtomicU64>,
) -> Result<Response<Body>, Infallible> {
    hits.fetch_add(1, Ordering::Relaxed);
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let mut status = 200;
    for seg in path.split('?').next().unwrap_or("").split('/') {
        if let Some(ms) = seg.strip_prefix("delay=") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        }
        if let Some(code) = seg.strip_prefix("status=") {
            status = code.parse().unwrap_or(200);
        }
    }
    let method = req.method().to_string();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or(""))))
        .collect();
    if path.contains("stall-body") {
        let stream = futures::stream::once(async {
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"{")))
        })
        .chain(futures::stream::pending());
        return Ok(Response::builder()
            .header("content-type", "application/json")
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap());
    }
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let body_len = body.as_ref().map_or(0, |b| b.len());
    let out = json!({
        "server": name,
        "method": method,
        "path": path,
        "headers": headers,
        "body_len": body_len,
    });
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-echo-server", name)
        .body(Full::new(Bytes::from(out.to_string())).boxed())
        .unwrap())
}

use futures::StreamExt as _;
