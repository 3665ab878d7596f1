//! The client side of a cluster link: TCP then TLS to a control plane, and the WebSocket
//! upgrade to `/v2/outlet` with subprotocol `kong.meta.v1`. Every step is bounded by a
//! timeout.

use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::tls::ClusterTls;
use crate::proto::hello::{SUBPROTOCOL, V2_PATH};

/// Why `/v2/outlet` could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The control plane has no `/v2/outlet` (it answered the upgrade with an HTTP status) or
    /// did not accept `kong.meta.v1`: it does not speak sync v2 at all, so a data plane may
    /// fall back to v1 (Kong's DP retries v2 forever instead).
    #[error("{0}")]
    Refused(String),
    /// Anything else (connect, TLS, timeouts, a broken upgrade): try again later.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// TCP then TLS to `cp` (`host:port`), each step bounded by `timeout`.
pub async fn connect_tls(
    tls: &ClusterTls,
    cp: &str,
    timeout: Duration,
) -> anyhow::Result<TlsStream<TcpStream>> {
    let (host, _port) = cp.rsplit_once(':').context("host:port")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::time::timeout(timeout, TcpStream::connect(cp))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))?
        .with_context(|| format!("connecting to {cp}"))?;
    let _ = tcp.set_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    tokio::time::timeout(timeout, connector.connect(tls.server_name_for(host), tcp))
        .await
        .map_err(|_| anyhow::anyhow!("TLS handshake timed out"))?
        .context("TLS handshake")
}

/// Connects to `cp` and upgrades to `/v2/outlet`, requiring the `kong.meta.v1` subprotocol.
pub async fn open_v2(
    tls: &ClusterTls,
    cp: &str,
    ws_config: WebSocketConfig,
    timeout: Duration,
) -> Result<WebSocketStream<TlsStream<TcpStream>>, OpenError> {
    let stream = connect_tls(tls, cp, timeout).await?;
    let request = {
        use tungstenite::client::IntoClientRequest as _;
        let mut r = format!("wss://{cp}{V2_PATH}")
            .into_client_request()
            .map_err(anyhow::Error::new)?;
        r.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            tungstenite::http::HeaderValue::from_static(SUBPROTOCOL),
        );
        r
    };
    let (ws, resp) = tokio::time::timeout(
        timeout,
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config)),
    )
    .await
    .map_err(|_| anyhow::anyhow!("WebSocket handshake timed out"))?
    .map_err(|e| match e {
        tungstenite::Error::Http(r) => OpenError::Refused(format!(
            "{V2_PATH} refused the upgrade: HTTP {}",
            r.status()
        )),
        e => OpenError::Failed(anyhow::Error::new(e).context("WebSocket handshake")),
    })?;
    let proto = resp
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if proto != Some(SUBPROTOCOL) {
        return Err(OpenError::Refused(format!(
            "the control plane did not accept subprotocol {SUBPROTOCOL}"
        )));
    }
    Ok(ws)
}
