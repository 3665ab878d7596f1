//! The `kong.meta.v1.hello` exchange over a WebSocket: the data plane sends its hello and
//! waits for the answer; the control plane reads it, decides, and answers or closes with 1002.
//! The messages themselves are `proto::hello`; everything after the hello goes through
//! [`crate::net::peer`].

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
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
