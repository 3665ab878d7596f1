//! A raw cluster peer for tests: TLS → WebSocket `/v2/outlet` → hand-built frames, so a test can
//! speak to a control plane exactly as a Kong data plane (or a broken one) would, and read
//! every frame the other side sends. The same wrapper serves the server side of a fake
//! control plane (`RawPeer<ServerTls>`).

use std::sync::Arc;
use std::time::Duration;

use deltaplane::net::tls::{ClusterTls, TlsSettings};
use deltaplane::proto::codec::{self, Encoding};
use futures::{SinkExt, StreamExt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::harness::TestCp;

/// Every single wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(5);

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;
pub type ServerTls = tokio_rustls::server::TlsStream<TcpStream>;

/// Kong 3.10's hello capabilities and encodings.
pub const KONG_CAPS: &[&str] = &["kong.sync.v2"];
pub const KONG_ENCODINGS: &[&str] = &["x-snappy-framed"];

/// One side of a `/v2/outlet` connection, driven by hand.
pub struct RawPeer<S = ClientTls> {
    pub ws: WebSocketStream<S>,
    /// `None` until the hello chose one: frames are sent and read as they are.
    pub encoding: Option<Encoding>,
    /// Every decoded JSON message received, in order.
    pub received: Vec<Value>,
}

/// What came next on the connection.
#[derive(Debug)]
pub enum Next {
    Frame(Message),
    /// The stream ended (or failed, with the error) without a close frame.
    End(#[allow(dead_code)] /* shown by `Debug` in failures */ Option<String>),
}

/// The Kong 3.10 hello request (frame 1 of §4.5), plain JSON.
pub fn hello_frame(caps: &[&str], encodings: &[&str]) -> Vec<u8> {
    hello_frame_with(
        caps,
        encodings,
        json!({"role": "data_plane", "cluster_dp_labels": ["env:test"]}),
    )
}

/// The Kong 3.10 hello request with `kong_conf` given.
pub fn hello_frame_with(caps: &[&str], encodings: &[&str], kong_conf: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "jsonrpc": "2.0",
        "method": "kong.meta.v1.hello",
        "id": 1,
        "params": [{
            "rpc_capabilities": caps,
            "rpc_frame_encodings": encodings,
            "kong_version": "3.10.0",
            "kong_hostname": "kong-dp-a",
            "kong_node_id": uuid::Uuid::new_v4().to_string(),
            "kong_conf": kong_conf,
        }],
    }))
    .unwrap()
}

/// `kong.sync.v2.get_delta` as a call (`Some(id)`) or a status notification (`None`).
pub fn get_delta(id: Option<u64>, version: &str) -> Value {
    let mut v = json!({
        "jsonrpc": "2.0",
        "method": "kong.sync.v2.get_delta",
        "params": [{"default": {"version": version}}],
    });
    if let Some(id) = id {
        v["id"] = json!(id);
    }
    v
}

/// The shared-mode TLS material of a control plane's dev certificate.
pub fn shared_tls(crt: &str, key: &str) -> ClusterTls {
    ClusterTls::load(&TlsSettings::shared(crt, key)).expect("load the shared certificate")
}

/// TCP + TLS to the control plane with its own dev certificate (`ClusterTls::connect`).
pub async fn tls_to(cp: &TestCp) -> ClientTls {
    let (addr, crt, key) = cp.cluster_target();
    let tls = shared_tls(&crt, &key);
    let tcp = tokio::time::timeout(WAIT, TcpStream::connect(&addr))
        .await
        .expect("connect in time")
        .expect("connect");
    tokio::time::timeout(WAIT, tls.connect(tcp, "127.0.0.1"))
        .await
        .expect("TLS in time")
        .expect("TLS handshake")
}

/// A client configuration that trusts any server and presents `cert` (PEM cert, PEM key), or
/// no certificate at all: for checking what the control plane refuses.
pub fn any_server_client(cert: Option<(&str, &str)>) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    let mut cfg = match cert {
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// TCP + TLS + upgrade with `client`; `Err` with the reason when any step fails.
pub async fn try_connect_with(
    addr: &str,
    client: Arc<rustls::ClientConfig>,
) -> Result<RawPeer, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let name = ServerName::try_from("kong_clustering").unwrap();
    let tls = tokio::time::timeout(
        WAIT,
        tokio_rustls::TlsConnector::from(client).connect(name, tcp),
    )
    .await
    .map_err(|_| "TLS handshake timed out".to_owned())?
    .map_err(|e| format!("TLS: {e}"))?;
    // In TLS 1.3 the server checks the client certificate after the client is done, so a
    // refusal shows here, on the first read.
    let ws = tokio::time::timeout(WAIT, upgrade(tls, "/v2/outlet", Some("kong.meta.v1")))
        .await
        .map_err(|_| "upgrade timed out".to_owned())?
        .map_err(|e| format!("upgrade: {e}"))?;
    Ok(RawPeer::new(ws))
}

/// The WebSocket upgrade on an established TLS stream.
pub async fn upgrade(
    tls: ClientTls,
    path: &str,
    subprotocol: Option<&str>,
) -> Result<WebSocketStream<ClientTls>, tungstenite::Error> {
    let mut req = format!("wss://127.0.0.1{path}").into_client_request()?;
    if let Some(p) = subprotocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(256 << 20))
        .max_frame_size(Some(256 << 20));
    let (ws, resp) = tokio_tungstenite::client_async_with_config(req, tls, Some(cfg)).await?;
    if let Some(p) = subprotocol {
        assert_eq!(
            resp.headers().get("Sec-WebSocket-Protocol"),
            Some(&HeaderValue::from_str(p).unwrap()),
            "the control plane must answer with the subprotocol"
        );
    }
    Ok(ws)
}

// === impl RawPeer ===

impl RawPeer<ClientTls> {
    /// Connected and upgraded to a control plane, before the hello.
    pub async fn connect(cp: &TestCp) -> RawPeer {
        let tls = tls_to(cp).await;
        let ws = tokio::time::timeout(WAIT, upgrade(tls, "/v2/outlet", Some("kong.meta.v1")))
            .await
            .expect("upgrade in time")
            .expect("upgrade");
        RawPeer::new(ws)
    }

    /// Connected, with a successful hello announcing `caps` and offering `encodings`.
    pub async fn after_hello(cp: &TestCp, caps: &[&str], encodings: &[&str]) -> RawPeer {
        let mut peer = RawPeer::connect(cp).await;
        let answer = peer.hello(caps, encodings).await;
        assert!(answer.get("result").is_some(), "hello refused: {answer}");
        peer
    }

    /// Sends the hello and reads the plain-JSON answer; adopts the chosen encoding.
    pub async fn hello(&mut self, caps: &[&str], encodings: &[&str]) -> Value {
        self.send_hello(hello_frame(caps, encodings)).await
    }

    /// [`RawPeer::hello`] with the data plane's `kong_conf` given.
    pub async fn hello_with(&mut self, caps: &[&str], encodings: &[&str], conf: Value) -> Value {
        self.send_hello(hello_frame_with(caps, encodings, conf))
            .await
    }

    async fn send_hello(&mut self, frame: Vec<u8>) -> Value {
        self.send_raw(frame).await;
        let bytes = self.next_binary().await;
        let answer: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("the hello answer must be plain JSON: {e}: {bytes:?}");
        });
        if let Some(name) = answer["result"]["rpc_frame_encoding"].as_str() {
            self.encoding = Some(Encoding::from_name(name).expect("a known encoding"));
        }
        answer
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawPeer<S> {
    pub fn new(ws: WebSocketStream<S>) -> RawPeer<S> {
        RawPeer {
            ws,
            encoding: None,
            received: Vec::new(),
        }
    }

    pub async fn send_message(&mut self, message: Message) {
        tokio::time::timeout(WAIT, self.ws.send(message))
            .await
            .expect("send in time")
            .expect("send");
    }

    /// One binary frame holding exactly `bytes`.
    pub async fn send_raw(&mut self, bytes: impl Into<Vec<u8>>) {
        let bytes: Vec<u8> = bytes.into();
        self.send_message(Message::binary(bytes)).await;
    }

    /// One binary frame holding `json` in the negotiated encoding.
    pub async fn send_bytes(&mut self, json: &[u8]) {
        let frame = match self.encoding {
            Some(enc) => codec::encode(enc, json),
            None => json.to_vec(),
        };
        self.send_raw(frame).await;
    }

    pub async fn send(&mut self, json: &Value) {
        self.send_bytes(&serde_json::to_vec(json).unwrap()).await;
    }

    /// The next data or close frame within [`WAIT`] (pings and pongs are skipped;
    /// tungstenite answers pings).
    pub async fn next(&mut self) -> Next {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let item = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("nothing received in time");
            match item {
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(message)) => return Next::Frame(message),
                Some(Err(e)) => return Next::End(Some(e.to_string())),
                None => return Next::End(None),
            }
        }
    }

    /// The payload of the next binary frame, as it came.
    pub async fn next_binary(&mut self) -> Vec<u8> {
        match self.next().await {
            Next::Frame(Message::Binary(b)) => b.to_vec(),
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }

    /// The next message, decoded (raw Snappy / zstd) but not parsed.
    pub async fn next_decoded(&mut self) -> Vec<u8> {
        let frame = self.next_binary().await;
        match self.encoding {
            Some(enc) => codec::decode(enc, &frame, 256 << 20)
                .unwrap_or_else(|e| panic!("a frame that is not valid {enc}: {e}")),
            None => frame,
        }
    }

    /// The next message, decoded and parsed.
    pub async fn next_json(&mut self) -> Value {
        let bytes = self.next_decoded().await;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "not JSON: {e}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            )
        });
        self.received.push(v.clone());
        v
    }

    /// Like [`RawPeer::next_json`], but answers the other side's `notify_new_version` calls
    /// with `true` and skips them, as a Kong data plane would. Returns the decoded bytes too.
    pub async fn next_answer(&mut self) -> (Value, Vec<u8>) {
        loop {
            let bytes = self.next_decoded().await;
            let v: Value = serde_json::from_slice(&bytes).expect("JSON");
            self.received.push(v.clone());
            if v["method"] == "kong.sync.v2.notify_new_version" {
                let id = v["id"].clone();
                self.send(&json!({"jsonrpc": "2.0", "id": id, "result": true}))
                    .await;
                continue;
            }
            return (v, bytes);
        }
    }

    /// Sends a call and returns the next message that is not a `notify_new_version`, which
    /// must be its response.
    pub async fn call(&mut self, request: &Value) -> Value {
        self.send(request).await;
        let (v, _) = self.next_answer().await;
        assert_eq!(v["id"], request["id"], "not the response to {request}: {v}");
        v
    }

    /// The next frame must be a close frame; returns its code (`None`: no code).
    pub async fn expect_close(&mut self) -> Option<u16> {
        match self.next().await {
            Next::Frame(Message::Close(frame)) => frame.map(|f| f.code.into()),
            Next::Frame(Message::Binary(b)) => {
                let text = match self.encoding {
                    Some(enc) => codec::decode(enc, &b, 1 << 20).unwrap_or_default(),
                    None => b.to_vec(),
                };
                panic!(
                    "expected a close frame, got a message: {}",
                    String::from_utf8_lossy(&text)
                )
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

/// Trusts any server certificate (handshake signatures are still checked).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
