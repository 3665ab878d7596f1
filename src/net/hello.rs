//! The `kong.meta.v1.hello` exchange over a WebSocket: the data plane sends its hello and
//! waits for the answer; the control plane reads it, decides, and answers or closes with 1002.
//! The messages themselves are `proto::hello`; everything after the hello goes through
//! [`crate::net::peer`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{self, Message, protocol::frame::coding::CloseCode};

use crate::net::peer;
use crate::proto::codec::{self, Encoding};
use crate::proto::hello::{HELLO_ID, Hello, HelloResult, hello_request, parse_hello};
use crate::proto::jsonrpc::{self, RpcError};

/// Why a hello failed. Unless it is `Closed` or `WebSocket`, we have sent a close frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    #[error("no hello message within {0:?}")]
    Timeout(Duration),
    #[error("connection closed during the hello")]
    Closed,
    /// The peer broke the protocol; we closed with 1002 and this reason.
    #[error("hello protocol error: {0}")]
    Protocol(String),
    /// Server side: `decide` refused the peer. Client side: the peer answered with an error.
    #[error("hello rejected: {0}")]
    Rejected(String),
    #[error("hello transport error: {0}")]
    WebSocket(#[from] tungstenite::Error),
}

/// Data-plane side: sends `hello`, waits up to `timeout` for the answer, and checks that the
/// chosen encoding is one we offered.
pub async fn client_handshake<S>(
    ws: &mut WebSocketStream<S>,
    hello: &Hello,
    timeout: Duration,
) -> Result<HelloResult, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let res = match tokio::time::timeout(timeout, client_exchange(ws, hello)).await {
        Ok(res) => res,
        Err(_) => Err(HandshakeError::Timeout(timeout)),
    };
    fail_closed(ws, res, timeout).await
}

/// Control-plane side: waits up to `timeout` for the first frame, which must be a binary
/// frame holding a valid hello; asks `decide` for the answer (the CP picks the encoding with
/// [`codec::choose`]); sends it. Any failure closes the connection with 1002 and a reason.
pub async fn server_handshake<S>(
    ws: &mut WebSocketStream<S>,
    timeout: Duration,
    decide: impl FnOnce(&Hello) -> Result<HelloResult, String>,
) -> Result<(Hello, Encoding), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let res = server_exchange(ws, timeout, decide).await;
    fail_closed(ws, res, timeout).await
}

// === the control plane's gate ===

/// The control plane's stream under the WebSocket until the hello is read: it hands
/// tungstenite the upgrade request and then the first message, and not one byte more, so
/// that [`fresh_after_hello`] can put a new WebSocket on the stream without losing input.
///
/// Why (issue 11: memory per idle DP): tungstenite grows its read buffer to the largest
/// message read and keeps it for the connection's lifetime, and a Kong node's hello (its
/// whole configuration as `kong_conf`) is the largest message a control plane reads.
/// Reads are only ever cut shorter, never held back or buffered here, and from the first
/// read past the first message (a v1 connection's second message, say) everything passes.
#[derive(Debug)]
pub struct HelloGate<S> {
    io: S,
    at: Gate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// In the upgrade request: how much of its final `\r\n\r\n` the last bytes matched.
    Request { matched: u8 },
    /// In a frame header: its bytes so far.
    Header { bytes: [u8; 14], have: u8 },
    /// In a frame's payload: the bytes left, and whether the frame ends its message.
    Payload { left: u64, fin: bool },
    /// The first message was handed out, and nothing after it.
    Held,
    /// Everything passes: a fresh WebSocket took over, or a read went past the first message.
    Open,
}

impl<S> HelloGate<S> {
    pub fn new(io: S) -> HelloGate<S> {
        HelloGate {
            io,
            at: Gate::Request { matched: 0 },
        }
    }
}

impl Gate {
    /// At most this many bytes may be read now (`None`: any number).
    fn limit(&self) -> Option<u64> {
        match *self {
            // The request cannot end sooner than that.
            Gate::Request { matched } => Some(4 - u64::from(matched)),
            Gate::Header { bytes, have } => Some(u64::from(header_len(&bytes, have) - have)),
            Gate::Payload { left, .. } => Some(left),
            Gate::Held | Gate::Open => None,
        }
    }

    /// Follows bytes just read: never more than [`Gate::limit`], so all in one state.
    fn consume(&mut self, read: &[u8]) {
        match self {
            Gate::Payload { left, .. } => *left -= read.len() as u64,
            _ => read.iter().for_each(|&b| self.step(b)),
        }
        // A frame ends with its payload, or with its header when it has none.
        if let Gate::Payload { left: 0, fin } = *self {
            *self = if fin {
                Gate::Held
            } else {
                Gate::Header {
                    bytes: [0; 14],
                    have: 0,
                }
            };
        }
    }

    /// Follows one byte of the upgrade request or of a frame header.
    fn step(&mut self, b: u8) {
        match self {
            Gate::Request { matched } => {
                const END: &[u8; 4] = b"\r\n\r\n";
                *matched = if b == END[usize::from(*matched)] {
                    *matched + 1
                } else {
                    u8::from(b == b'\r')
                };
                if *matched == 4 {
                    *self = Gate::Header {
                        bytes: [0; 14],
                        have: 0,
                    };
                }
            }
            Gate::Header { bytes, have } => {
                bytes[usize::from(*have)] = b;
                *have += 1;
                if *have == header_len(bytes, *have) {
                    let len = match bytes[1] & 0x7f {
                        126 => u64::from(u16::from_be_bytes([bytes[2], bytes[3]])),
                        127 => u64::from_be_bytes(bytes[2..10].try_into().expect("8 bytes")),
                        len => u64::from(len),
                    };
                    *self = Gate::Payload {
                        left: len,
                        fin: bytes[0] & 0x80 != 0,
                    };
                }
            }
            Gate::Payload { .. } | Gate::Held | Gate::Open => {}
        }
    }
}

/// The length of a frame header whose first `have` bytes are in `bytes` (RFC 6455 §5.2):
/// 2 until the second byte is known.
fn header_len(bytes: &[u8; 14], have: u8) -> u8 {
    if have < 2 {
        return 2;
    }
    let extended = match bytes[1] & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if bytes[1] & 0x80 != 0 { 4 } else { 0 };
    2 + extended + mask
}

impl<S: AsyncRead + Unpin> AsyncRead for HelloGate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at == Gate::Held {
            // Asked past the first message: tungstenite may now hold input of its own.
            this.at = Gate::Open;
        }
        let Some(limit) = this.at.limit() else {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut part = buf.take(limit);
        let start = part.filled().as_ptr();
        ready!(Pin::new(&mut this.io).poll_read(cx, &mut part))?;
        assert_eq!(
            part.filled().as_ptr(),
            start,
            "the reader replaced the buffer"
        );
        let n = part.filled().len();
        this.at.consume(part.filled());
        // SAFETY: the inner reader initialised (filled) these `n` bytes of `buf`'s unfilled
        // part, the same memory `part` borrows (checked above).
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HelloGate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// After [`server_handshake`] on a gated stream: the same connection under a new WebSocket
/// (same configuration, fresh buffers), when the gate shows that tungstenite read nothing
/// past the hello; `ws` as it is otherwise. The hello's answer has been flushed by then.
pub async fn fresh_after_hello<S>(
    ws: WebSocketStream<HelloGate<S>>,
) -> WebSocketStream<HelloGate<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if ws.get_ref().at != Gate::Held {
        return ws;
    }
    let config = *ws.get_config();
    let mut io = ws.into_inner();
    io.at = Gate::Open;
    WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await
}

// === the exchanges ===

async fn client_exchange<S>(
    ws: &mut WebSocketStream<S>,
    hello: &Hello,
) -> Result<HelloResult, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.send(Message::binary(hello_request(hello))).await?;
    let frame = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(frame))) => break frame,
            // tungstenite answers pings itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Text(_))) => return Err(protocol("hello answer in a text frame")),
            Some(Ok(Message::Close(_))) | None => return Err(HandshakeError::Closed),
            Some(Ok(Message::Frame(_))) => continue,
            Some(Err(err)) => return Err(err.into()),
        }
    };
    let response = match jsonrpc::parse(&frame, 1) {
        Ok(jsonrpc::Incoming::Single(jsonrpc::Message::Response(response)))
            if response.id == HELLO_ID =>
        {
            response
        }
        _ => return Err(protocol("hello answer is not a response with id 1")),
    };
    let raw = response
        .result
        .map_err(|err| HandshakeError::Rejected(err.message))?;
    let result: HelloResult = serde_json::from_str(raw.get())
        .map_err(|err| protocol(&format!("invalid hello result: {err}")))?;
    let offered = hello
        .rpc_frame_encodings
        .contains(&result.rpc_frame_encoding);
    if !offered || result.encoding().is_none() {
        return Err(protocol(&format!(
            "peer chose encoding {:?}, which we did not offer",
            result.rpc_frame_encoding
        )));
    }
    Ok(result)
}

async fn server_exchange<S>(
    ws: &mut WebSocketStream<S>,
    timeout: Duration,
    decide: impl FnOnce(&Hello) -> Result<HelloResult, String>,
) -> Result<(Hello, Encoding), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = match tokio::time::timeout(timeout, ws.next()).await {
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
        Ok(Some(Ok(Message::Binary(frame)))) => frame,
        Ok(Some(Ok(Message::Close(_))) | None) => return Err(HandshakeError::Closed),
        Ok(Some(Ok(_))) => return Err(protocol("the first frame must be a binary hello")),
        Ok(Some(Err(err))) => return Err(err.into()),
    };
    let (id, hello) = parse_hello(&frame).map_err(|reason| protocol(&reason))?;
    if codec::choose(&hello.rpc_frame_encodings).is_none() {
        return Err(protocol("unknown encodings"));
    }
    let result = match decide(&hello) {
        Ok(result) => result,
        Err(reason) => {
            let error = RpcError::server_error().with_message(reason.clone());
            let frame = jsonrpc::error(Some(&id), &error);
            // Best effort: the close frame below carries the reason as well.
            let _ = tokio::time::timeout(timeout, ws.send(Message::binary(frame))).await;
            return Err(HandshakeError::Rejected(reason));
        }
    };
    let encoding = match result.encoding() {
        Some(encoding)
            if hello
                .rpc_frame_encodings
                .contains(&result.rpc_frame_encoding) =>
        {
            encoding
        }
        _ => {
            return Err(protocol(&format!(
                "chose encoding {:?}, which the peer did not offer",
                result.rpc_frame_encoding
            )));
        }
    };
    let text = serde_json::to_string(&result)
        .map_err(|err| protocol(&format!("cannot serialise hello result: {err}")))?;
    let raw = RawValue::from_string(text)
        .map_err(|err| protocol(&format!("cannot serialise hello result: {err}")))?;
    let frame = jsonrpc::result_raw(&id, &raw);
    match tokio::time::timeout(timeout, ws.send(Message::binary(frame))).await {
        Ok(res) => res?,
        Err(_) => return Err(HandshakeError::Timeout(timeout)),
    }
    Ok((hello, encoding))
}

fn protocol(reason: &str) -> HandshakeError {
    HandshakeError::Protocol(reason.to_owned())
}

/// On failure, tells the peer why (1002 with the reason) before returning the error.
async fn fail_closed<S, T>(
    ws: &mut WebSocketStream<S>,
    res: Result<T, HandshakeError>,
    timeout: Duration,
) -> Result<T, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let err = match res {
        Ok(value) => return Ok(value),
        Err(err) => err,
    };
    let reason = match &err {
        HandshakeError::Closed | HandshakeError::WebSocket(_) => return Err(err),
        HandshakeError::Timeout(_) => "hello timeout".to_owned(),
        HandshakeError::Protocol(reason) | HandshakeError::Rejected(reason) => reason.clone(),
    };
    tracing::debug!(cause = %err, "closing connection after failed hello");
    let frame = peer::close_frame(CloseCode::Protocol, &reason);
    // Best effort: the peer may already be gone.
    let _ = tokio::time::timeout(timeout, ws.close(Some(frame))).await;
    Err(err)
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    use serde_json::{Map, Value};

    use super::*;
    use crate::net::peer::tests::ws_pair;
    use crate::proto::hello::tests::{FRAME_1, kong_hello};

    const SHORT: Duration = Duration::from_millis(200);

    fn cp_decide(caps: &[&str]) -> impl FnOnce(&Hello) -> Result<HelloResult, String> {
        let caps: Vec<String> = caps.iter().map(|s| s.to_string()).collect();
        move |hello: &Hello| {
            let encoding = codec::choose(&hello.rpc_frame_encodings).ok_or("unknown encodings")?;
            Ok(HelloResult {
                rpc_capabilities: caps,
                rpc_frame_encoding: encoding.name().to_owned(),
                extra: Map::new(),
            })
        }
    }

    /// A client frame (masked) holding `payload`.
    fn masked_frame(payload: &[u8]) -> Vec<u8> {
        const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
        let mut frame = vec![0x82];
        match payload.len() {
            n @ 0..=125 => frame.push(0x80 | n as u8),
            n @ 126..=0xffff => {
                frame.push(0x80 | 126);
                frame.extend((n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend((n as u64).to_be_bytes());
            }
        }
        frame.extend(MASK);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        frame
    }

    /// The upgrade request, the hello and two more messages in one write, before any answer
    /// (the most a client can send ahead): the gate hands tungstenite the hello and nothing
    /// more, and the fresh WebSocket reads the rest, whatever the hello's length encoding
    /// and however the pipe cuts the bytes.
    #[tokio::test]
    async fn a_fresh_websocket_after_the_hello_loses_no_input() {
        let cfg = peer::PeerConfig::default();
        for pad in [0, 300, 70_000] {
            for pipe in [7, 256 * 1024] {
                let mut hello = kong_hello();
                hello.kong_conf = json!({"pad": "x".repeat(pad)});
                let mut input = b"GET /v2/outlet HTTP/1.1\r\nHost: localhost\r\n\
                    Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
                    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                    .to_vec();
                input.extend(masked_frame(&hello_request(&hello)));
                input.extend(masked_frame(b"second"));
                input.extend(masked_frame(&[7; 200]));
                let (dp, cp) = tokio::io::duplex(pipe);
                let client = tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let (mut r, mut w) = tokio::io::split(dp);
                    let _ = tokio::join!(w.write_all(&input), async {
                        let mut sink = Vec::new();
                        let _ = r.read_to_end(&mut sink).await;
                    });
                });
                let mut ws = tokio_tungstenite::accept_async_with_config(
                    HelloGate::new(cp),
                    Some(peer::ws_config(&cfg)),
                )
                .await
                .unwrap();
                let long = Duration::from_secs(10);
                let (seen, _) = server_handshake(&mut ws, long, cp_decide(&[]))
                    .await
                    .unwrap();
                assert_eq!(seen, hello, "pad {pad}, pipe {pipe}");
                assert_eq!(ws.get_ref().at, Gate::Held, "pad {pad}, pipe {pipe}");
                let mut ws = fresh_after_hello(ws).await;
                assert_eq!(ws.get_ref().at, Gate::Open);
                for expected in [b"second".to_vec(), vec![7; 200]] {
                    match tokio::time::timeout(long, ws.next()).await.unwrap() {
                        Some(Ok(Message::Binary(got))) => assert_eq!(got, expected),
                        other => panic!("pad {pad}, pipe {pipe}: {other:?}"),
                    }
                }
                drop(ws);
                client.await.unwrap();
            }
        }
    }

    /// A read past the first message opens the gate: the WebSocket is then kept as it is.
    #[tokio::test]
    async fn reading_past_the_first_message_keeps_the_websocket() {
        let cfg = peer::PeerConfig::default();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (dp, cp) = tokio::join!(
            tokio_tungstenite::client_async_with_config(
                "ws://localhost/v1/outlet",
                a,
                Some(peer::ws_config(&cfg))
            ),
            tokio_tungstenite::accept_async_with_config(
                HelloGate::new(b),
                Some(peer::ws_config(&cfg))
            ),
        );
        let (mut dp, mut cp) = (dp.unwrap().0, cp.unwrap());
        for n in 0..3u8 {
            dp.send(Message::binary(vec![n; 10])).await.unwrap();
            match cp.next().await {
                Some(Ok(Message::Binary(got))) => assert_eq!(got, vec![n; 10]),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(cp.get_ref().at, Gate::Open);
        let mut cp = fresh_after_hello(cp).await;
        dp.send(Message::binary(b"more".to_vec())).await.unwrap();
        match cp.next().await {
            Some(Ok(Message::Binary(got))) => assert_eq!(got, b"more".to_vec()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn handshake_picks_zstd_when_both_offer_it() {
        let (mut dp, mut cp) = ws_pair(&peer::PeerConfig::default()).await;
        let mut hello = kong_hello();
        hello.rpc_frame_encodings = vec!["x-snappy-framed".into(), "x-zstd".into()];
        let (client, server) = tokio::join!(
            client_handshake(&mut dp, &hello, SHORT),
            server_handshake(&mut cp, SHORT, cp_decide(&["kong.sync.v2"])),
        );
        let result = client.unwrap();
        assert_eq!(result.encoding(), Some(Encoding::Zstd));
        assert_eq!(result.rpc_capabilities, ["kong.sync.v2"]);
        let (seen, encoding) = server.unwrap();
        assert_eq!((seen, encoding), (hello, Encoding::Zstd));
    }

    #[tokio::test]
    async fn handshake_with_a_kong_dp_uses_snappy() {
        let (mut dp, mut cp) = ws_pair(&peer::PeerConfig::default()).await;
        let hello = kong_hello();
        let (client, server) = tokio::join!(
            client_handshake(&mut dp, &hello, SHORT),
            server_handshake(&mut cp, SHORT, cp_decide(&[])),
        );
        assert_eq!(client.unwrap().encoding(), Some(Encoding::SnappyFramed));
        assert_eq!(server.unwrap().1, Encoding::SnappyFramed);
    }

    /// Sends `first` as the first frame and returns the server's error and the close frame
    /// the client received.
    async fn server_rejects(first: Option<Message>) -> (HandshakeError, Option<CloseFrame>) {
        let (mut dp, mut cp) = ws_pair(&peer::PeerConfig::default()).await;
        if let Some(first) = first {
            dp.send(first).await.unwrap();
        }
        let err = server_handshake(&mut cp, SHORT, cp_decide(&[]))
            .await
            .unwrap_err();
        let close = loop {
            match dp.next().await {
                Some(Ok(Message::Close(close))) => break close,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        (err, close)
    }

    #[track_caller]
    fn assert_1002(close: Option<CloseFrame>, reason_part: &str) {
        let close = close.expect("a close frame with a code");
        assert_eq!(close.code, CloseCode::Protocol);
        assert!(
            close.reason.contains(reason_part),
            "{:?} should mention {reason_part:?}",
            close.reason
        );
    }

    #[tokio::test]
    async fn server_closes_1002_on_bad_first_frames() {
        let hello_with = |f: &dyn Fn(&mut Value)| {
            let mut v: Value = serde_json::from_str(FRAME_1).unwrap();
            f(&mut v);
            Message::binary(serde_json::to_vec(&v).unwrap())
        };
        let cases = [
            (Message::text(FRAME_1), "binary hello"),
            (Message::binary(&b"\x00garbage"[..]), "hello request"),
            (
                hello_with(&|v| v["method"] = json!("kong.sync.v2.get_delta")),
                "expected kong.meta.v1.hello",
            ),
            (
                hello_with(&|v| v["params"][0]["kong_version"] = json!(310)),
                "invalid hello",
            ),
            (
                hello_with(&|v| v["params"][0]["rpc_frame_encodings"] = json!(["gzip"])),
                "unknown encodings",
            ),
        ];
        for (first, reason) in cases {
            let (err, close) = server_rejects(Some(first)).await;
            assert!(matches!(err, HandshakeError::Protocol(_)), "{err}");
            assert_1002(close, reason);
        }
    }

    #[tokio::test]
    async fn server_times_out_waiting_for_the_hello() {
        let (err, close) = server_rejects(None).await;
        assert!(matches!(err, HandshakeError::Timeout(t) if t == SHORT));
        assert_1002(close, "hello timeout");
    }

    #[tokio::test]
    async fn refusal_by_decide_reaches_the_client() {
        let (mut dp, mut cp) = ws_pair(&peer::PeerConfig::default()).await;
        let hello = kong_hello();
        let (client, server) = tokio::join!(
            client_handshake(&mut dp, &hello, SHORT),
            server_handshake(&mut cp, SHORT, |_| Err("node not allowed".to_owned())),
        );
        assert!(matches!(server, Err(HandshakeError::Rejected(r)) if r == "node not allowed"));
        assert!(matches!(client, Err(HandshakeError::Rejected(r)) if r == "node not allowed"));
    }

    #[tokio::test]
    async fn client_refuses_an_encoding_it_did_not_offer() {
        let (mut dp, mut cp) = ws_pair(&peer::PeerConfig::default()).await;
        let hello = kong_hello();
        let (client, server) = tokio::join!(
            client_handshake(&mut dp, &hello, SHORT),
            server_handshake(&mut cp, SHORT, |_| {
                Ok(HelloResult {
                    rpc_capabilities: vec![],
                    rpc_frame_encoding: "x-zstd".into(),
                    extra: Map::new(),
                })
            }),
        );
        // Our server checks its own decision too.
        assert!(matches!(server, Err(HandshakeError::Protocol(_))));
        assert!(client.is_err());

        // A server that does not check: answer by hand.
        let (mut dp, mut cp) = ws_pair(&peer::PeerConfig::default()).await;
        let hello = kong_hello();
        let fake_cp = async {
            let _hello = cp.next().await;
            let answer = r#"{"jsonrpc":"2.0","id":1,"result":{"rpc_capabilities":[],"rpc_frame_encoding":"x-zstd"}}"#;
            cp.send(Message::binary(answer.as_bytes().to_vec()))
                .await
                .unwrap();
            cp.next().await
        };
        let (client, closed) = tokio::join!(client_handshake(&mut dp, &hello, SHORT), fake_cp);
        assert!(matches!(client, Err(HandshakeError::Protocol(r)) if r.contains("did not offer")));
        assert!(
            matches!(closed, Some(Ok(Message::Close(Some(f)))) if f.code == CloseCode::Protocol)
        );
    }

    #[tokio::test]
    async fn client_times_out_without_an_answer() {
        let (mut dp, _cp) = ws_pair(&peer::PeerConfig::default()).await;
        let hello = kong_hello();
        let err = client_handshake(&mut dp, &hello, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(err, HandshakeError::Timeout(_)));
    }
}
