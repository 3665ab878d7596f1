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

/// What to do about a failed connection, when the cause is one we recognise: nothing
/// listening, a port that does not speak TLS (the Admin API's, say), or a certificate the
/// other side does not accept.
pub fn hint(err: &anyhow::Error, cp: &str) -> Option<String> {
    use rustls::{AlertDescription, Error as Tls};
    for cause in err.chain() {
        let io = cause.downcast_ref::<std::io::Error>();
        if io.is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused) {
            return Some(format!(
                "nothing listens at {cp}: is the control plane running, and is this its cluster \
                 listener (--cluster-listen, 127.0.0.1:8005 by default)?"
            ));
        }
        // tokio-rustls reports rustls errors inside an io::Error.
        let tls = io
            .and_then(|io| io.get_ref()?.downcast_ref::<Tls>())
            .or_else(|| cause.downcast_ref::<Tls>());
        match tls {
            Some(Tls::InvalidMessage(rustls::InvalidMessage::InvalidContentType)) => {
                return Some(format!(
                    "{cp} does not speak TLS: this is not a cluster listener (an Admin API or \
                     status port?); the control plane's cluster port is 8005 by default"
                ));
            }
            Some(
                Tls::InvalidCertificate(_)
                | Tls::AlertReceived(
                    AlertDescription::BadCertificate
                    | AlertDescription::UnknownCA
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::UnsupportedCertificate
                    | AlertDescription::CertificateExpired
                    | AlertDescription::CertificateRequired
                    | AlertDescription::AccessDenied,
                ),
            ) => {
                return Some(
                    "the certificates do not match: in shared mode the data plane needs the \
                     control plane's own cluster.crt and cluster.key (--cluster-cert, \
                     --cluster-cert-key); in pki mode a certificate signed by the CA \
                     (--cluster-ca-cert)"
                        .to_owned(),
                );
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_cause() {
        let refused =
            anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                .context("connecting to 127.0.0.1:8001");
        assert!(
            hint(&refused, "127.0.0.1:8001")
                .unwrap()
                .contains("nothing listens")
        );
        let plain = anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        ))
        .context("TLS handshake");
        assert!(
            hint(&plain, "h:8001")
                .unwrap()
                .contains("does not speak TLS")
        );
        let cert = anyhow::Error::new(std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::BadCertificate,
        )));
        assert!(hint(&cert, "h:8005").unwrap().contains("cluster.crt"));
        assert_eq!(hint(&anyhow::anyhow!("something else"), "h:1"), None);
    }
}
