//! JSON-RPC 2.0 messages as Kong's `kong/clustering/rpc` speaks them: positional `params`
//! arrays, ids omitted (not `null`) when unknown, batches of up to a cap.
//!
//! Parsing turns one decoded frame into an [`Incoming`]; every element is classified as a
//! request, a response, an id-less error report, or an invalid element that the peer answers
//! with -32600. Nothing here does IO.
//!
//! A response keeps its `result` as raw JSON text ([`RawValue`]), so a data plane can parse a
//! multi-megabyte snapshot straight into its own types without building a [`Value`] tree.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// The only protocol version we speak.
pub const JSONRPC_VERSION: &str = "2.0";

/// Default cap on the number of elements in one batch.
pub const DEFAULT_MAX_BATCH: usize = 100;

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Serialize, thiserror::Error)]
#[error("JSON-RPC error {code}: {message}")]
pub struct RpcError {
    pub code: i64,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

/// One decoded frame: a single message or a batch.
#[derive(Debug)]
pub enum Incoming {
    Single(Message),
    Batch(Vec<Message>),
}

/// One element of a frame.
#[derive(Debug)]
pub enum Message {
    /// A call (`id` present) or a notification (`id` absent).
    Request(Request),
    /// An answer to one of our calls.
    Response(Response),
    /// An error without `id` or `method`: the peer reports that something we sent was bad.
    /// Kong logs these and drops them.
    ErrorReport(RpcError),
    /// Not a valid message. The receiver answers with `error`, addressed to `id` when the
    /// element was a request with a usable id, else with the id omitted.
    Invalid { id: Option<Value>, error: RpcError },
}

/// A call or notification.
#[derive(Debug, Clone)]
pub struct Request {
    /// `None` for a notification. A string, a number or `null` otherwise.
    pub id: Option<Value>,
    pub method: String,
    /// As sent, as JSON text (a large argument is parsed only by whoever needs it); an absent
    /// `params` is an empty array. Kong sends positional arrays only, and the peer answers
    /// anything else with -32602.
    pub params: Box<RawValue>,
}

impl Request {
    /// The params as a [`Value`] tree.
    pub fn params_value(&self) -> Value {
        serde_json::from_str(self.params.get()).expect("params were parsed as JSON")
    }

    /// Whether the params are an array (Kong's positional arguments).
    pub fn params_are_array(&self) -> bool {
        self.params.get().trim_start().starts_with('[')
    }
}

/// A response to a call.
#[derive(Debug)]
pub struct Response {
    pub id: Value,
    /// The `result` as raw JSON text, or the `error` object.
    pub result: Result<Box<RawValue>, RpcError>,
}

/// Parses one decoded frame.
///
/// `Err` is a frame-level failure that the peer answers with that error and no id:
/// -32700 for text that is not JSON, -32600 for an empty or over-cap batch.
pub fn parse(frame: &[u8], max_batch: usize) -> Result<Incoming, RpcError> {
    let is_batch = frame
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'[');
    if !is_batch {
        return parse_element(frame).map(Incoming::Single);
    }
    let elements: Vec<&RawValue> =
        serde_json::from_slice(frame).map_err(|_| RpcError::parse_error())?;
    if elements.is_empty() {
        return Err(RpcError::invalid_request().with_message("empty batch array"));
    }
    if elements.len() > max_batch {
        return Err(RpcError::invalid_request().with_message(format!(
            "batch of {} elements exceeds the limit of {max_batch}",
            elements.len()
        )));
    }
    let messages = elements
        .into_iter()
        .map(|element| {
            // The whole array parsed, so an element can only fail by not being an object.
            parse_element(element.get().as_bytes())
                .unwrap_or_else(|error| Message::Invalid { id: None, error })
        })
        .collect();
    Ok(Incoming::Batch(messages))
}

/// A call: `{"jsonrpc":"2.0","method":M,"id":N,"params":P}`.
pub fn request(id: u64, method: &str, params: &Value) -> Vec<u8> {
    to_bytes(&RequestOut {
        jsonrpc: JSONRPC_VERSION,
        method,
        id: Some(id),
        params,
    })
}

/// A notification: a request without `id`.
pub fn notification(method: &str, params: &Value) -> Vec<u8> {
    to_bytes(&RequestOut {
        jsonrpc: JSONRPC_VERSION,
        method,
        id: None,
        params,
    })
}

/// A successful response.
pub fn result(id: &Value, result: &Value) -> Vec<u8> {
    to_bytes(&ResultOut {
        jsonrpc: JSONRPC_VERSION,
        id,
        result,
    })
}

/// A successful response whose result is already serialised.
pub fn result_raw(id: &Value, result: &RawValue) -> Vec<u8> {
    to_bytes(&ResultOut {
        jsonrpc: JSONRPC_VERSION,
        id,
        result,
    })
}

/// A success response whose `result` is JSON text this program wrote itself (a `get_delta`
/// answer or a page: megabytes of stored entity text), not parsed again to be checked: the
/// same bytes as [`result_raw`] for the same text. Debug builds do check it.
pub fn result_text(id: &Value, text: &str) -> Vec<u8> {
    debug_assert!(
        serde_json::from_str::<&RawValue>(text).is_ok(),
        "result_text: not one JSON value"
    );
    let mut out = Vec::with_capacity(text.len() + 40);
    out.extend_from_slice(b"{\"jsonrpc\":\"");
    out.extend_from_slice(JSONRPC_VERSION.as_bytes());
    out.extend_from_slice(b"\",\"id\":");
    serde_json::to_writer(&mut out, id).expect("a Value serialises");
    out.extend_from_slice(b",\"result\":");
    out.extend_from_slice(text.as_bytes());
    out.push(b'}');
    out
}

/// An error response; `id: None` omits the field (Kong never sends `"id":null`).
pub fn error(id: Option<&Value>, error: &RpcError) -> Vec<u8> {
    to_bytes(&ErrorOut {
        jsonrpc: JSONRPC_VERSION,
        id,
        error,
    })
}

/// Joins serialised messages into one batch array.
pub fn batch(messages: &[Vec<u8>]) -> Vec<u8> {
    let len = messages.iter().map(|m| m.len() + 1).sum::<usize>() + 1;
    let mut res = Vec::with_capacity(len);
    res.push(b'[');
    for (idx, message) in messages.iter().enumerate() {
        if idx > 0 {
            res.push(b',');
        }
        res.extend_from_slice(message);
    }
    res.push(b']');
    res
}

/// The capability of a method: its name without the last dot segment
/// (`kong.sync.v2.get_delta` → `kong.sync.v2`). `None` for a name without a dot.
pub fn capability(method: &str) -> Option<&str> {
    method.rsplit_once('.').map(|(cap, _)| cap)
}

/// Whether a result is one Kong's caller treats as a failure: `null` or `false`.
pub fn is_falsy(result: &RawValue) -> bool {
    is_falsy_text(result.get())
}

/// [`is_falsy`] of JSON text.
pub fn is_falsy_text(result: &str) -> bool {
    matches!(result.trim(), "null" | "false")
}

// === impl RpcError ===

impl RpcError {
    pub const PARSE_ERROR: i64 = -32700;
    pub const INVALID_REQUEST: i64 = -32600;
    pub const METHOD_NOT_FOUND: i64 = -32601;
    pub const INVALID_PARAMS: i64 = -32602;
    pub const INTERNAL_ERROR: i64 = -32603;
    pub const SERVER_ERROR: i64 = -32000;

    /// An error with an explicit message.
    pub fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// An error with Kong's default message for `code` (`json_rpc_v2.lua`).
    pub fn of(code: i64) -> RpcError {
        RpcError::new(code, default_message(code))
    }

    pub fn parse_error() -> RpcError {
        RpcError::of(RpcError::PARSE_ERROR)
    }
    pub fn invalid_request() -> RpcError {
        RpcError::of(RpcError::INVALID_REQUEST)
    }
    pub fn method_not_found() -> RpcError {
        RpcError::of(RpcError::METHOD_NOT_FOUND)
    }
    pub fn invalid_params() -> RpcError {
        RpcError::of(RpcError::INVALID_PARAMS)
    }
    pub fn internal_error() -> RpcError {
        RpcError::of(RpcError::INTERNAL_ERROR)
    }
    /// What Kong sends when a callback returns `nil, err`: -32000, with `err` as the message
    /// (set it with [`RpcError::with_message`]).
    pub fn server_error() -> RpcError {
        RpcError::of(RpcError::SERVER_ERROR)
    }

    /// Replaces the default message.
    pub fn with_message(mut self, message: impl Into<String>) -> RpcError {
        self.message = message.into();
        self
    }

    pub fn with_data(mut self, data: Value) -> RpcError {
        self.data = Some(data);
        self
    }

    /// Reads an `error` member. A missing or non-string `message` falls back to the default.
    fn from_wire(value: Value) -> Option<RpcError> {
        let Value::Object(mut map) = value else {
            return None;
        };
        let code = map.get("code")?.as_i64()?;
        let message = match map.remove("message") {
            Some(Value::String(message)) => message,
            _ => default_message(code).to_owned(),
        };
        Some(RpcError {
            code,
            message,
            data: map.remove("data"),
        })
    }
}

fn default_message(code: i64) -> &'static str {
    match code {
        RpcError::PARSE_ERROR => "Parse error",
        RpcError::INVALID_REQUEST => "Invalid Request",
        RpcError::METHOD_NOT_FOUND => "Method not found",
        RpcError::INVALID_PARAMS => "Invalid params",
        RpcError::INTERNAL_ERROR => "Internal error",
        _ => "Server error",
    }
}

// === impl Response ===

impl Response {
    /// The result as a [`Value`] (a copy), or the error.
    pub fn to_value(&self) -> Result<Value, RpcError> {
        match &self.result {
            Ok(raw) => serde_json::from_str(raw.get())
                .map_err(|err| RpcError::internal_error().with_message(err.to_string())),
            Err(err) => Err(err.clone()),
        }
    }
}

// === parsing ===

/// The members we look at. Every field distinguishes "absent" (`None`) from `null`
/// (`Some(Value::Null)`), which serde's `Option` alone would merge.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default, deserialize_with = "present")]
    jsonrpc: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    method: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    id: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    params: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    result: Option<Box<RawValue>>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Value>,
}

fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn parse_element(text: &[u8]) -> Result<Message, RpcError> {
    let envelope: Envelope = match serde_json::from_slice(text) {
        Ok(envelope) => envelope,
        Err(err) if err.classify() == serde_json::error::Category::Data => {
            return Ok(Message::Invalid {
                id: None,
                error: RpcError::invalid_request().with_message("not a valid object"),
            });
        }
        Err(_) => return Err(RpcError::parse_error()),
    };
    Ok(classify(envelope))
}

fn classify(envelope: Envelope) -> Message {
    let invalid = |id: Option<Value>, message: &str| Message::Invalid {
        id,
        error: RpcError::invalid_request().with_message(message),
    };
    let version_ok = envelope.jsonrpc.as_ref().and_then(Value::as_str) == Some(JSONRPC_VERSION);

    if let Some(method) = envelope.method {
        // A request: its id (if usable) is the peer's, so an error can be addressed to it.
        let id = match envelope.id {
            None => None,
            Some(id @ (Value::Null | Value::Number(_) | Value::String(_))) => Some(id),
            Some(_) => return invalid(None, "id must be a string, a number or null"),
        };
        if !version_ok {
            return invalid(id, "jsonrpc must be \"2.0\"");
        }
        let Value::String(method) = method else {
            return invalid(id, "method must be a string");
        };
        return Message::Request(Request {
            id,
            method,
            params: envelope
                .params
                .unwrap_or_else(|| RawValue::from_string("[]".to_owned()).expect("valid JSON")),
        });
    }

    // Not a request. Its id, if any, names one of *our* calls, so errors about it are never
    // addressed to it: that would look like a response to one of the peer's calls.
    if !version_ok {
        return invalid(None, "jsonrpc must be \"2.0\"");
    }
    let id = envelope.id.filter(|id| !id.is_null());
    match (id, envelope.result, envelope.error) {
        (Some(id), Some(result), None) => Message::Response(Response {
            id,
            result: Ok(result),
        }),
        (Some(id), None, Some(error)) => match RpcError::from_wire(error) {
            Some(error) => Message::Response(Response {
                id,
                result: Err(error),
            }),
            None => invalid(None, "error must be an object with an integer code"),
        },
        (Some(_), _, _) => invalid(None, "a response needs exactly one of result and error"),
        (None, None, Some(error)) => match RpcError::from_wire(error) {
            Some(error) => Message::ErrorReport(error),
            None => invalid(None, "error must be an object with an integer code"),
        },
        (None, _, _) => invalid(None, "not a valid request"),
    }
}

// === serialising ===

#[derive(Serialize)]
struct RequestOut<'a> {
    jsonrpc: &'static str,
    method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    params: &'a Value,
}

#[derive(Serialize)]
struct ResultOut<'a, R: ?Sized> {
    jsonrpc: &'static str,
    id: &'a Value,
    result: &'a R,
}

#[derive(Serialize)]
struct ErrorOut<'a> {
    jsonrpc: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a Value>,
    error: &'a RpcError,
}

/// Serialises one of the `*Out` envelopes above.
fn to_bytes(message: &impl Serialize) -> Vec<u8> {
    // The envelopes hold only strings, integers, `Value`s and `RawValue`s. serde_json fails
    // only on non-string map keys (a `Value` cannot have them) or a failing writer (a `Vec`
    // does not fail), so this cannot panic.
    serde_json::to_vec(message).expect("JSON-RPC envelopes always serialise")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn result_text_writes_what_result_raw_writes() {
        for id in [json!(7), json!("a\"b"), Value::Null] {
            for text in [r#"{"deltas":[],"x":"\u00e9"}"#, "true", "[1,2]"] {
                let raw = RawValue::from_string(text.to_owned()).unwrap();
                assert_eq!(result_text(&id, text), result_raw(&id, &raw), "{id} {text}");
            }
        }
    }

    #[track_caller]
    fn single(frame: &str) -> Message {
        match parse(frame.as_bytes(), DEFAULT_MAX_BATCH) {
            Ok(Incoming::Single(message)) => message,
            other => panic!("expected a single message, got {other:?}"),
        }
    }

    #[track_caller]
    fn invalid(message: Message) -> (Option<Value>, String) {
        match message {
            Message::Invalid { id, error } => {
                assert_eq!(error.code, -32600);
                (id, error.message)
            }
            other => panic!("expected an invalid element, got {other:?}"),
        }
    }

    #[test]
    fn error_codes_and_default_messages() {
        let cases = [
            (RpcError::parse_error(), -32700, "Parse error"),
            (RpcError::invalid_request(), -32600, "Invalid Request"),
            (RpcError::method_not_found(), -32601, "Method not found"),
            (RpcError::invalid_params(), -32602, "Invalid params"),
            (RpcError::internal_error(), -32603, "Internal error"),
            (RpcError::server_error(), -32000, "Server error"),
            (RpcError::of(-32099), -32099, "Server error"),
            (
                RpcError::server_error().with_message("boom"),
                -32000,
                "boom",
            ),
        ];
        for (err, code, message) in cases {
            assert_eq!(
                (err.code, err.message.as_str(), err.data),
                (code, message, None)
            );
        }
    }

    #[test]
    fn kong_example_frames_serialise_byte_exact() {
        // §4.5 frames 3, 5, 6 and 7. Inner objects have one key each, so sorted-key
        // `Value` serialisation matches Kong's text exactly.
        let params = json!([{"default": {"version": "v02_0000000000000000000000000007"}}]);
        assert_eq!(
            String::from_utf8(request(0, "kong.sync.v2.get_delta", &params)).unwrap(),
            r#"{"jsonrpc":"2.0","method":"kong.sync.v2.get_delta","id":0,"params":[{"default":{"version":"v02_0000000000000000000000000007"}}]}"#
        );
        let params = json!([{"default": {"new_version": "v02_000000000000000000000000000a"}}]);
        assert_eq!(
            String::from_utf8(request(0, "kong.sync.v2.notify_new_version", &params)).unwrap(),
            r#"{"jsonrpc":"2.0","method":"kong.sync.v2.notify_new_version","id":0,"params":[{"default":{"new_version":"v02_000000000000000000000000000a"}}]}"#
        );
        assert_eq!(
            String::from_utf8(result(&json!(0), &json!(true))).unwrap(),
            r#"{"jsonrpc":"2.0","id":0,"result":true}"#
        );
        let params = json!([{"default": {"version": "v02_000000000000000000000000000a"}}]);
        assert_eq!(
            String::from_utf8(notification("kong.sync.v2.get_delta", &params)).unwrap(),
            r#"{"jsonrpc":"2.0","method":"kong.sync.v2.get_delta","params":[{"default":{"version":"v02_000000000000000000000000000a"}}]}"#
        );
    }

    #[test]
    fn errors_omit_unknown_ids() {
        assert_eq!(
            String::from_utf8(error(None, &RpcError::parse_error())).unwrap(),
            r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"}}"#
        );
        let err = RpcError::server_error()
            .with_message("boom")
            .with_data(json!({"x": 1}));
        assert_eq!(
            String::from_utf8(error(Some(&json!(7)), &err)).unwrap(),
            r#"{"jsonrpc":"2.0","id":7,"error":{"code":-32000,"message":"boom","data":{"x":1}}}"#
        );
    }

    #[test]
    fn parses_requests_and_notifications() {
        let Message::Request(req) = single(
            r#"{"jsonrpc":"2.0","method":"kong.sync.v2.get_delta","id":0,"params":[{"default":{}}]}"#,
        ) else {
            panic!()
        };
        assert_eq!(req.id, Some(json!(0)));
        assert_eq!(req.method, "kong.sync.v2.get_delta");
        assert_eq!(req.params_value(), json!([{"default": {}}]));

        let Message::Request(req) = single(r#" {"jsonrpc":"2.0","method":"a.b"}"#) else {
            panic!()
        };
        assert_eq!((req.id.clone(), req.params_value()), (None, json!([])));

        // `"id": null` is a call with a null id, not a notification.
        let Message::Request(req) = single(r#"{"jsonrpc":"2.0","method":"a.b","id":null}"#) else {
            panic!()
        };
        assert_eq!(req.id, Some(Value::Null));

        // Params are passed through as sent; the peer rejects non-arrays with -32602.
        let Message::Request(req) = single(r#"{"jsonrpc":"2.0","method":"a.b","params":{}}"#)
        else {
            panic!()
        };
        assert_eq!(req.params_value(), json!({}));
    }

    #[test]
    fn parses_responses_keeping_raw_results() {
        let Message::Response(res) =
            single(r#"{"jsonrpc":"2.0","id":3,"result": {"b":1,"a":[2]} }"#)
        else {
            panic!()
        };
        assert_eq!(res.id, json!(3));
        // The text is kept as sent, key order included.
        assert_eq!(res.result.as_ref().unwrap().get(), r#"{"b":1,"a":[2]}"#);
        assert_eq!(res.to_value().unwrap(), json!({"a": [2], "b": 1}));

        let Message::Response(res) = single(r#"{"jsonrpc":"2.0","id":"x","result":null}"#) else {
            panic!()
        };
        assert!(is_falsy(res.result.as_ref().unwrap()));

        let Message::Response(res) = single(
            r#"{"jsonrpc":"2.0","id":4,"error":{"code":-32000,"message":"nope","data":[1]}}"#,
        ) else {
            panic!()
        };
        assert_eq!(
            res.result.unwrap_err(),
            RpcError::new(-32000, "nope").with_data(json!([1]))
        );

        // A missing message takes the default.
        let Message::Response(res) = single(r#"{"jsonrpc":"2.0","id":4,"error":{"code":-32601}}"#)
        else {
            panic!()
        };
        assert_eq!(res.result.unwrap_err(), RpcError::method_not_found());
    }

    #[test]
    fn falsy_results() {
        for (text, falsy) in [
            ("null", true),
            ("false", true),
            ("true", false),
            ("0", false),
            ("{}", false),
            ("\"\"", false),
        ] {
            let raw = RawValue::from_string(text.to_owned()).unwrap();
            assert_eq!(is_falsy(&raw), falsy, "{text}");
        }
    }

    #[test]
    fn parses_error_reports() {
        for frame in [
            r#"{"jsonrpc":"2.0","error":{"code":-32700,"message":"Parse error"}}"#,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#,
        ] {
            let Message::ErrorReport(err) = single(frame) else {
                panic!("{frame}")
            };
            assert_eq!(err, RpcError::parse_error());
        }
    }

    #[test]
    fn invalid_elements() {
        // Requests keep their id so the error reaches the caller.
        let (id, msg) = invalid(single(r#"{"jsonrpc":"1.0","method":"a.b","id":5}"#));
        assert_eq!(
            (id, msg.as_str()),
            (Some(json!(5)), "jsonrpc must be \"2.0\"")
        );
        let (id, _) = invalid(single(r#"{"method":"a.b","id":5}"#));
        assert_eq!(id, Some(json!(5)));
        let (id, msg) = invalid(single(r#"{"jsonrpc":"2.0","method":7,"id":"k"}"#));
        assert_eq!(
            (id, msg.as_str()),
            (Some(json!("k")), "method must be a string")
        );
        let (id, _) = invalid(single(r#"{"jsonrpc":"2.0","method":"a.b","id":[1]}"#));
        assert_eq!(id, None);

        // Anything else is answered without id.
        for frame in [
            r#"{"jsonrpc":"2.0","id":5,"result":1,"error":{"code":1}}"#,
            r#"{"jsonrpc":"2.0","id":5}"#,
            r#"{"jsonrpc":"2.0","id":5,"error":"bad"}"#,
            r#"{"id":5,"result":1}"#,
            r#"{"jsonrpc":"2.0"}"#,
            r#"{"jsonrpc":"2.0","error":{"message":"no code"}}"#,
            r#"{}"#,
        ] {
            assert_eq!(invalid(single(frame)).0, None, "{frame}");
        }
        for frame in ["5", r#""text""#, "null", "true"] {
            assert_eq!(
                invalid(single(frame)),
                (None, "not a valid object".to_owned()),
                "{frame}"
            );
        }
    }

    #[test]
    fn unparseable_frames_are_parse_errors() {
        for frame in [
            "",
            "{",
            r#"{"jsonrpc":"2.0","method":"a.b""#,
            "[{}",
            "[1,]",
            "\u{1}",
        ] {
            assert_eq!(
                parse(frame.as_bytes(), DEFAULT_MAX_BATCH).unwrap_err(),
                RpcError::parse_error(),
                "{frame:?}"
            );
        }
    }

    #[test]
    fn batches() {
        let frame = r#"[
            {"jsonrpc":"2.0","method":"a.b","id":1,"params":[1]},
            {"jsonrpc":"2.0","method":"a.c","params":[]},
            5,
            {"jsonrpc":"2.0","id":9,"result":true},
            {"jsonrpc":"2.0","error":{"code":-32601,"message":"Method not found"}}
        ]"#;
        let Ok(Incoming::Batch(messages)) = parse(frame.as_bytes(), DEFAULT_MAX_BATCH) else {
            panic!()
        };
        assert_eq!(messages.len(), 5);
        assert!(matches!(&messages[0], Message::Request(r) if r.id == Some(json!(1))));
        assert!(matches!(&messages[1], Message::Request(r) if r.id.is_none()));
        assert!(
            matches!(&messages[2], Message::Invalid { id: None, error } if error.message == "not a valid object")
        );
        assert!(matches!(&messages[3], Message::Response(r) if r.id == json!(9)));
        assert!(matches!(&messages[4], Message::ErrorReport(_)));

        assert_eq!(
            parse(b" [ ] ", DEFAULT_MAX_BATCH).unwrap_err(),
            RpcError::new(-32600, "empty batch array")
        );
        let three = br#"[{"jsonrpc":"2.0","method":"a.b"},{"jsonrpc":"2.0","method":"a.b"},{"jsonrpc":"2.0","method":"a.b"}]"#;
        assert!(matches!(parse(three, 3), Ok(Incoming::Batch(m)) if m.len() == 3));
        assert_eq!(parse(three, 2).unwrap_err().code, -32600);
    }

    #[test]
    fn batch_serialisation() {
        let parts = vec![
            result(&json!(1), &json!("a")),
            error(Some(&json!(2)), &RpcError::method_not_found()),
        ];
        let bytes = batch(&parts);
        let value: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            value,
            json!([
                {"jsonrpc": "2.0", "id": 1, "result": "a"},
                {"jsonrpc": "2.0", "id": 2, "error": {"code": -32601, "message": "Method not found"}},
            ])
        );
        let raw = RawValue::from_string(r#"{"z":1,"a":2}"#.to_owned()).unwrap();
        assert_eq!(
            String::from_utf8(result_raw(&json!(3), &raw)).unwrap(),
            r#"{"jsonrpc":"2.0","id":3,"result":{"z":1,"a":2}}"#
        );
    }

    #[test]
    fn capabilities_split_at_the_last_dot() {
        assert_eq!(capability("kong.sync.v2.get_delta"), Some("kong.sync.v2"));
        assert_eq!(capability("kong.meta.v1.hello"), Some("kong.meta.v1"));
        assert_eq!(capability("a.b"), Some("a"));
        assert_eq!(capability("nodot"), None);
    }
}
