//! `kong.sync.v2` (Kong's incremental sync) and our `deltaplane.sync.v1` extension, typed:
//! method names, params and results as both planes send and read them.
//!
//! Params are small and go through `serde_json::Value`. A `get_delta` answer can hold a whole
//! configuration, so it is never a `Value` tree on either side: the control plane writes it
//! as JSON text straight from stored entity text ([`DeltaText`], [`write_answer`],
//! [`write_page`]) and the data plane reads its header ([`read_answer`]) and then streams the
//! deltas one at a time ([`for_each_delta`]).
//!
//! Kong's source: `kong/clustering/services/sync/rpc.lua` (both sides of `get_delta` and
//! `notify_new_version`) and `kong/clustering/services/sync/validate.lua`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Value, json};

use super::jsonrpc::RpcError;
use super::version::{Version, version_string};

/// The data plane asks for the deltas after its version (also sent as a notification: a
/// status report).
pub const GET_DELTA: &str = "kong.sync.v2.get_delta";
/// The control plane announces a new head.
pub const NOTIFY_NEW_VERSION: &str = "kong.sync.v2.notify_new_version";
/// The data plane reports deltas it rejected.
pub const NOTIFY_VALIDATION_ERROR: &str = "kong.sync.v2.notify_validation_error";
/// One page of a paged transfer (ours; only called on a peer that announced
/// [`super::CAP_DELTAPLANE_SYNC_V1`]).
pub const GET_PAGE: &str = "deltaplane.sync.v1.get_page";
/// The control plane's pushed version (a notification; see [`Push`]).
pub const PUSH_DELTAS: &str = "deltaplane.push.v1.deltas";

/// The version a data plane reports in `notify_validation_error` when the rejected answer
/// named none (Kong's DP sends the same placeholder).
const NO_LATEST_VERSION: &str = "v02_deltas_have_no_latest_version_field";

// === params ===

/// `get_delta` params: `[{"default": {"version": "v02_…", "state_hash": "…"}}]`. The same
/// params sent as a notification are a status report (the data plane now holds `version`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetDelta {
    /// The data plane's version; `None` when the string is missing or not a version (the
    /// control plane then sends a full sync).
    pub version: Option<Version>,
    /// The state hash at `version`: 64 hex digits, deltaplane data planes only. Anything
    /// else is read as absent.
    pub state_hash: Option<String>,
}

impl GetDelta {
    pub fn new(version: Version, state_hash: Option<String>) -> GetDelta {
        GetDelta {
            version: Some(version),
            state_hash,
        }
    }

    pub fn to_params(&self) -> Value {
        let mut ns = json!({ "version": self.version.unwrap_or_default().wire() });
        if let Some(h) = &self.state_hash {
            ns["state_hash"] = h.clone().into();
        }
        json!([{ "default": ns }])
    }

    /// Reads the params as Kong's control plane does: `params[0]` must be an object, with a
    /// `default` namespace.
    pub fn from_params(params: &Value) -> Result<GetDelta, RpcError> {
        let ns = default_namespace(first_param(params)?)?;
        Ok(GetDelta {
            version: ns
                .get("version")
                .and_then(Value::as_str)
                .and_then(Version::parse),
            state_hash: ns
                .get("state_hash")
                .and_then(Value::as_str)
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .map(str::to_owned),
        })
    }
}

/// `notify_new_version` params: `[{"default": {"new_version": "v02_…"}}]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotifyNewVersion {
    pub new_version: Version,
}

impl NotifyNewVersion {
    pub fn to_params(&self) -> Value {
        json!([{ "default": { "new_version": self.new_version.wire() } }])
    }

    /// Reads the params with the errors Kong's data plane answers.
    pub fn from_params(params: &Value) -> Result<NotifyNewVersion, RpcError> {
        let ns = params
            .get(0)
            .and_then(|p| p.get("default"))
            .ok_or_else(no_default_namespace)?;
        let v = ns
            .get("new_version")
            .and_then(Value::as_str)
            .ok_or_else(|| {
                RpcError::server_error().with_message("'new_version' key does not exist")
            })?;
        let new_version = Version::parse(v).ok_or_else(|| {
            RpcError::server_error().with_message(format!("'new_version' is not a version: {v}"))
        })?;
        Ok(NotifyNewVersion { new_version })
    }
}

/// `notify_validation_error` params: `[{"version": "v02_…", "error": {…}}]`, the error in
/// Kong's `err_t` shape (code 21, "sync deltas parse failure").
#[derive(Debug, Clone, PartialEq)]
pub struct NotifyValidationError {
    /// The version the rejected answer led to, when it named one.
    pub version: Option<Version>,
    pub message: String,
    /// Errors by entity, nested as Kong nests them.
    pub fields: Value,
    /// Kong's `flattened_errors`: one item per rejected entity.
    pub flattened_errors: Vec<Value>,
}

impl NotifyValidationError {
    pub fn to_params(&self) -> Value {
        let error = json!({
            "code": 21,
            "name": "sync deltas parse failure",
            "source": "deltaplane.dp.store",
            "message": self.message,
            "fields": self.fields,
            "flattened_errors": self.flattened_errors,
        });
        let version = self
            .version
            .map(Version::wire)
            .unwrap_or_else(|| NO_LATEST_VERSION.into());
        json!([{ "version": version, "error": error }])
    }

    /// Reads the params leniently (it is a report): a missing message reads as
    /// "validation error".
    pub fn from_params(params: &Value) -> Result<NotifyValidationError, RpcError> {
        let p = first_param(params)?;
        let error = p.get("error");
        Ok(NotifyValidationError {
            version: p
                .get("version")
                .and_then(Value::as_str)
                .and_then(Version::parse),
            message: error
                .and_then(|e| e.get("message"))
                .and_then(Value::as_str)
                .unwrap_or("validation error")
                .to_owned(),
            fields: error
                .and_then(|e| e.get("fields"))
                .cloned()
                .unwrap_or_else(|| json!({})),
            flattened_errors: error
                .and_then(|e| e.get("flattened_errors"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// `deltaplane.sync.v1.get_page` params: `[{"id": "…", "page": n}]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetPage {
    pub id: String,
    pub page: u64,
}

impl GetPage {
    pub fn to_params(&self) -> Value {
        json!([{ "id": self.id, "page": self.page }])
    }

    pub fn from_params(params: &Value) -> Result<GetPage, RpcError> {
        let p = first_param(params)?;
        let id = p
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| RpcError::invalid_params().with_message("'id' must be a string"))?;
        let page = p
            .get("page")
            .and_then(Value::as_u64)
            .ok_or_else(|| RpcError::invalid_params().with_message("'page' must be a number"))?;
        Ok(GetPage {
            id: id.to_owned(),
            page,
        })
    }
}

/// `params[0]`, which must be an object.
fn first_param(params: &Value) -> Result<&Value, RpcError> {
    params
        .get(0)
        .filter(|p| p.is_object())
        .ok_or_else(|| RpcError::invalid_params().with_message("params must be [ { ... } ]"))
}

fn default_namespace(p: &Value) -> Result<&Value, RpcError> {
    p.get("default").ok_or_else(no_default_namespace)
}

fn no_default_namespace() -> RpcError {
    RpcError::server_error().with_message("default namespace does not exist inside params")
}

// === the answer, written ===

/// One delta as the control plane stores it: the entity is canonical JSON text, not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDelta<'a> {
    pub version: i64,
    pub entity_type: &'a str,
    pub id: &'a str,
    pub ws_id: &'a str,
    /// `None` for a delete.
    pub entity: Option<&'a str>,
}

/// Deltas serialised back to back (comma-separated, no brackets), with where each one starts,
/// so that an answer or a page is a slice of it.
#[derive(Debug, Default)]
pub struct DeltaText {
    bytes: Vec<u8>,
    starts: Vec<usize>,
}

impl DeltaText {
    pub fn new() -> DeltaText {
        DeltaText::default()
    }

    /// Appends one delta in Kong's wire shape: `{"entity":…,"pk":{"id":…},"type":…,
    /// "version":…,"ws_id":…}` (keys in the order serde_json writes a `Value`).
    pub fn push(&mut self, d: &RawDelta<'_>) {
        if !self.starts.is_empty() {
            self.bytes.push(b',');
        }
        self.starts.push(self.bytes.len());
        let out = &mut self.bytes;
        out.extend_from_slice(b"{\"entity\":");
        match d.entity {
            Some(text) => out.extend_from_slice(text.as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"pk\":{\"id\":");
        serde_json::to_writer(&mut *out, d.id).expect("string serialises");
        out.extend_from_slice(b"},\"type\":");
        serde_json::to_writer(&mut *out, d.entity_type).expect("string serialises");
        out.extend_from_slice(b",\"version\":\"");
        out.extend_from_slice(version_string(d.version).as_bytes());
        out.extend_from_slice(b"\",\"ws_id\":");
        serde_json::to_writer(&mut *out, d.ws_id).expect("string serialises");
        out.push(b'}');
    }

    /// Gives back the growth slack (up to half of a large version's text) once no more
    /// deltas will be pushed.
    pub fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.starts.shrink_to_fit();
    }

    /// The number of deltas.
    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// The size of all deltas, in bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// Bytes of deltas `from..to`, comma-separated.
    pub fn slice(&self, from: usize, to: usize) -> &[u8] {
        if from >= to {
            return &[];
        }
        let start = self.starts[from];
        &self.bytes[start..self.end_of(to - 1)]
    }

    /// Keeps the first `n` deltas.
    pub fn truncate(&mut self, n: usize) {
        if n < self.starts.len() {
            let end = self.end_of(n.saturating_sub(1));
            self.starts.truncate(n);
            self.bytes.truncate(if n == 0 { 0 } else { end });
        }
    }

    /// Cuts the deltas into pages of at most `page_bytes` each (a single delta larger than
    /// that gets a page of its own). Returns the delta index ranges.
    pub fn pages(&self, page_bytes: usize) -> Vec<(usize, usize)> {
        let mut pages = Vec::new();
        let mut from = 0;
        while from < self.starts.len() {
            let mut to = from + 1;
            while to < self.starts.len() && self.end_of(to) - self.starts[from] <= page_bytes {
                to += 1;
            }
            pages.push((from, to));
            from = to;
        }
        pages
    }

    /// Where delta `i` ends (exclusive).
    fn end_of(&self, i: usize) -> usize {
        if i + 1 < self.starts.len() {
            self.starts[i + 1] - 1 // the comma before delta i + 1
        } else {
            self.bytes.len()
        }
    }
}

/// A paged transfer as an answer announces it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TransferRef {
    pub id: String,
    pub pages: usize,
}

/// What a `get_delta` answer says besides its deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerHead<'a> {
    pub full_sync: bool,
    /// The version the deltas lead to.
    pub latest_version: Version,
    /// The answer is larger than a frame: its deltas come in pages.
    pub transfer: Option<(&'a str, usize)>,
    /// The control plane's head when it answered; only for a peer that announced
    /// [`super::CAP_DELTAPLANE_SYNC_V1`], so it can tell a cut answer from a complete one.
    pub head: Option<Version>,
}

/// The `get_delta` result: `{"default":{"deltaplane_head":…,"deltas":[…],
/// "deltaplane_transfer":…,"full_sync":…,"latest_version":…}}`; `deltas` is comma-separated
/// delta text ([`DeltaText::slice`]).
pub fn write_answer(deltas: &[u8], a: &AnswerHead<'_>) -> String {
    let mut out = Vec::with_capacity(deltas.len() + 200);
    out.extend_from_slice(b"{\"default\":{");
    if let Some(head) = a.head {
        out.extend_from_slice(b"\"deltaplane_head\":\"");
        out.extend_from_slice(head.wire().as_bytes());
        out.extend_from_slice(b"\",");
    }
    out.extend_from_slice(b"\"deltas\":[");
    out.extend_from_slice(deltas);
    out.extend_from_slice(b"],");
    if let Some((id, pages)) = a.transfer {
        out.extend_from_slice(b"\"deltaplane_transfer\":");
        out.extend_from_slice(json!({ "id": id, "pages": pages }).to_string().as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(if a.full_sync {
        b"\"full_sync\":true,"
    } else {
        b"\"full_sync\":false,"
    });
    out.extend_from_slice(b"\"latest_version\":\"");
    out.extend_from_slice(a.latest_version.wire().as_bytes());
    out.extend_from_slice(b"\"}}");
    String::from_utf8(out).expect("built from UTF-8 pieces")
}

/// Page `page` of transfer `id` (the `get_page` result):
/// `{"deltas":[…],"full_sync":…,"id":…,"page":…,"pages":…,"version":…}`.
pub fn write_page(
    deltas: &[u8],
    full_sync: bool,
    id: &str,
    page: usize,
    pages: usize,
    version: Version,
) -> String {
    let mut out = Vec::with_capacity(deltas.len() + 200);
    out.extend_from_slice(b"{\"deltas\":[");
    out.extend_from_slice(deltas);
    out.extend_from_slice(b"],\"full_sync\":");
    out.extend_from_slice(if full_sync { b"true" } else { b"false" });
    out.extend_from_slice(b",\"id\":");
    serde_json::to_writer(&mut out, id).expect("string serialises");
    out.extend_from_slice(format!(",\"page\":{page},\"pages\":{pages}").as_bytes());
    out.extend_from_slice(b",\"version\":\"");
    out.extend_from_slice(version.wire().as_bytes());
    out.extend_from_slice(b"\"}");
    String::from_utf8(out).expect("built from UTF-8 pieces")
}

// === pushed deltas ===

/// A version pushed to the data plane with the notification: `{"after":…,"epoch":…,
/// "answer":<a get_delta result>}` as the one element of `params`. A notification carries no
/// id, so one encoded frame serves every data plane that holds `after`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push<'a> {
    /// The version the answer's deltas continue. A data plane holding it applies them all; one
    /// holding a later version below `latest_version` (a push built from a status report it
    /// had already overtaken) applies those above its own, the rest being the same change
    /// log's.
    pub after: Version,
    /// The control plane's epoch (its hello's): the change log the versions belong to.
    pub epoch: &'a str,
    /// The `get_delta` result's JSON text (read it with [`read_answer`]).
    pub answer: &'a str,
}

/// The whole `deltaplane.push.v1.deltas` notification message for `answer` (a
/// [`write_answer`] text), ready to encode.
pub fn write_push(after: Version, epoch: &str, answer: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(answer.len() + 160);
    out.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"method\":\"");
    out.extend_from_slice(PUSH_DELTAS.as_bytes());
    out.extend_from_slice(b"\",\"params\":[{\"after\":\"");
    out.extend_from_slice(after.wire().as_bytes());
    out.extend_from_slice(b"\",\"epoch\":");
    serde_json::to_writer(&mut out, epoch).expect("string serialises");
    out.extend_from_slice(b",\"answer\":");
    out.extend_from_slice(answer.as_bytes());
    out.extend_from_slice(b"}]}");
    out
}

/// Reads the `params` of a push (the JSON array text) without parsing the answer's deltas.
pub fn read_push(params: &str) -> Result<Push<'_>, String> {
    #[derive(Deserialize)]
    struct Wire<'a> {
        after: &'a str,
        epoch: &'a str,
        #[serde(borrow)]
        answer: &'a RawValue,
    }
    let (w,): (Wire<'_>,) = serde_json::from_str(params).map_err(|e| format!("push: {e}"))?;
    let after = Version::parse(w.after)
        .ok_or_else(|| format!("push: after is not a version: {}", w.after))?;
    Ok(Push {
        after,
        epoch: w.epoch,
        answer: w.answer.get(),
    })
}

// === the answer, read ===

/// Why an answer could not be read (the data plane rejects it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("get_delta answer: {0}")]
    Json(String),
    #[error("default namespace does not exist in the answer")]
    NoDefaultNamespace,
    /// Neither deltas nor a transfer (Kong's DP refuses a null `deltas`).
    #[error("sync get_delta error: deltas is null")]
    DeltasNull,
    #[error("latest_version is not a version: {0}")]
    BadLatestVersion(String),
}

/// A `get_delta` answer's header, read without touching its deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<'a> {
    /// `full_sync`, or Kong's legacy `wipe`.
    pub full_sync: bool,
    pub latest_version: Option<Version>,
    pub transfer: Option<TransferRef>,
    pub head: Option<Version>,
    /// The `default` namespace's JSON text: stream its deltas with [`for_each_delta`].
    pub namespace: &'a str,
}

/// Reads an answer's header, leniently as Kong's DP does (a missing `full_sync` is false, Kong's
/// `{}` is an empty `deltas`, an unreadable `deltaplane_head` is ignored).
pub fn read_answer(text: &str) -> Result<Answer<'_>, AnswerError> {
    #[derive(Deserialize)]
    struct Header {
        #[serde(default)]
        full_sync: Option<bool>,
        #[serde(default)]
        wipe: Option<bool>,
        #[serde(default)]
        latest_version: Option<String>,
        #[serde(default)]
        deltaplane_transfer: Option<TransferRef>,
        #[serde(default)]
        deltaplane_head: Option<String>,
        #[serde(default)]
        deltas: Option<IgnoredAny>,
    }
    let namespace = default_of(text)
        .map_err(|e| AnswerError::Json(e.to_string()))?
        .ok_or(AnswerError::NoDefaultNamespace)?;
    let h: Header =
        serde_json::from_str(namespace).map_err(|e| AnswerError::Json(e.to_string()))?;
    if h.deltas.is_none() && h.deltaplane_transfer.is_none() {
        return Err(AnswerError::DeltasNull);
    }
    let latest_version = match h.latest_version {
        Some(s) => Some(Version::parse(&s).ok_or(AnswerError::BadLatestVersion(s))?),
        None => None,
    };
    Ok(Answer {
        full_sync: h.full_sync.or(h.wipe).unwrap_or(false),
        latest_version,
        transfer: h.deltaplane_transfer,
        head: h.deltaplane_head.as_deref().and_then(Version::parse),
        namespace,
    })
}

/// The `default` namespace of an answer, without reading its header.
pub fn answer_namespace(text: &str) -> Result<&str, String> {
    default_of(text)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "default namespace does not exist".to_owned())
}

/// The text of an answer's `default` member, if it has one.
fn default_of(text: &str) -> Result<Option<&str>, serde_json::Error> {
    #[derive(Deserialize)]
    struct Outer<'a> {
        #[serde(borrow)]
        default: Option<&'a RawValue>,
    }
    let outer: Outer<'_> = serde_json::from_str(text)?;
    Ok(outer.default.map(RawValue::get))
}

/// Calls `f` with each element of the `deltas` field of `ns_json` (an object: an answer's
/// namespace or a page), one at a time; the array is never held as a whole. Kong's empty `{}`
/// counts as no deltas. An error from `f` stops the parse and is returned.
pub fn for_each_delta(
    ns_json: &str,
    f: impl FnMut(Value) -> Result<(), String>,
) -> Result<(), String> {
    let mut de = serde_json::Deserializer::from_str(ns_json);
    NsSeed { f }
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())
}

struct NsSeed<F> {
    f: F,
}

impl<'de, F: FnMut(Value) -> Result<(), String>> DeserializeSeed<'de> for NsSeed<F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, F: FnMut(Value) -> Result<(), String>> Visitor<'de> for NsSeed<F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object with a deltas array")
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if key == "deltas" {
                map.next_value_seed(DeltasSeed { f: &mut self.f })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct DeltasSeed<'f, F> {
    f: &'f mut F,
}

impl<'de, F: FnMut(Value) -> Result<(), String>> DeserializeSeed<'de> for DeltasSeed<'_, F> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, F: FnMut(Value) -> Result<(), String>> Visitor<'de> for DeltasSeed<'_, F> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an array of deltas (or Kong's {} for none)")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(v) = seq.next_element::<Value>()? {
            (self.f)(v).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // Lua's cjson encodes an empty table as {}.
        if map.next_key::<IgnoredAny>()?.is_some() {
            return Err(serde::de::Error::custom("deltas must be an array"));
        }
        Ok(())
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Err(E::custom("sync get_delta error: deltas is null"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn push_round_trips_and_is_one_notification() {
        let answer = write_answer(
            br#"{"type":"services","id":"a","ws_id":"w","entity":null,"version":"v02_0000000000000000000000000008"}"#,
            &AnswerHead {
                latest_version: Version::new(8),
                head: Some(Version::new(8)),
                ..AnswerHead::default()
            },
        );
        let msg = write_push(Version::new(7), "e-1", &answer);
        let parsed: Value = serde_json::from_slice(&msg).unwrap();
        assert_eq!(parsed["method"], PUSH_DELTAS);
        assert!(parsed.get("id").is_none(), "a push is a notification");
        let params = serde_json::to_string(&parsed["params"]).unwrap();
        let push = read_push(&params).unwrap();
        assert_eq!((push.after, push.epoch), (Version::new(7), "e-1"));
        let a = read_answer(push.answer).unwrap();
        assert_eq!(a.latest_version, Some(Version::new(8)));
        assert!(read_push(r#"[{"after":"x","epoch":"e","answer":{}}]"#).is_err());
        assert!(read_push(r#"[]"#).is_err());
    }

    use super::*;

    fn change<'a>(v: i64, id: &'a str) -> RawDelta<'a> {
        RawDelta {
            version: v,
            entity_type: "services",
            id,
            ws_id: "ws",
            entity: Some("{\"id\":\"x\"}"),
        }
    }

    #[test]
    fn delta_text_parses_and_pages() {
        let mut s = DeltaText::new();
        let ids: Vec<String> = (0..10).map(|i| format!("id-{i}")).collect();
        for id in &ids {
            s.push(&change(3, id));
        }
        let head = AnswerHead {
            full_sync: true,
            latest_version: Version::new(3),
            ..AnswerHead::default()
        };
        let all: Value = serde_json::from_str(&write_answer(s.slice(0, s.len()), &head)).unwrap();
        let deltas = all["default"]["deltas"].as_array().unwrap();
        assert_eq!(deltas.len(), 10);
        assert_eq!(deltas[4]["pk"]["id"], "id-4");
        assert_eq!(deltas[4]["version"], "v02_0000000000000000000000000003");
        let one = s.slice(0, 1).len();
        let pages = s.pages(one * 3 + 2);
        assert_eq!(pages, vec![(0, 3), (3, 6), (6, 9), (9, 10)]);
        for (from, to) in pages {
            let text = format!("[{}]", String::from_utf8_lossy(s.slice(from, to)));
            let v: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v.as_array().unwrap().len(), to - from);
        }
        // A budget smaller than one delta still makes progress.
        assert_eq!(s.pages(1).len(), 10);
        s.truncate(4);
        assert_eq!(s.len(), 4);
        assert_eq!(s.byte_len(), s.slice(0, 4).len());
        s.truncate(0);
        assert!(s.is_empty() && s.byte_len() == 0);
    }

    /// The answer as a Kong data plane reads it, and as ours does: the same text both ways.
    #[test]
    fn answers_round_trip_through_the_reader() {
        let mut s = DeltaText::new();
        s.push(&change(7, "a"));
        s.push(&RawDelta {
            entity: None,
            ..change(8, "b")
        });
        let text = write_answer(
            s.slice(0, 2),
            &AnswerHead {
                full_sync: false,
                latest_version: Version::new(8),
                transfer: None,
                head: Some(Version::new(9)),
            },
        );
        assert!(text.starts_with(r#"{"default":{"deltaplane_head":"v02_0000000000000000000000000009","deltas":[{"entity":{"id":"x"},"pk":{"id":"a"},"type":"services","version":"v02_0000000000000000000000000007","ws_id":"ws"}"#));
        assert!(text.ends_with(
            r#""full_sync":false,"latest_version":"v02_0000000000000000000000000008"}}"#
        ));
        let a = read_answer(&text).unwrap();
        assert_eq!(
            (a.full_sync, a.latest_version, a.head),
            (false, Some(Version::new(8)), Some(Version::new(9)))
        );
        let mut seen = Vec::new();
        for_each_delta(a.namespace, |d| {
            seen.push(crate::proto::Delta::from_wire(d).map_err(|e| e.to_string())?);
            Ok(())
        })
        .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].entity, None);

        let paged = write_answer(
            &[],
            &AnswerHead {
                full_sync: true,
                latest_version: Version::new(8),
                transfer: Some(("t-1", 3)),
                head: None,
            },
        );
        let a = read_answer(&paged).unwrap();
        assert_eq!(
            a.transfer,
            Some(TransferRef {
                id: "t-1".into(),
                pages: 3
            })
        );
        let page = write_page(s.slice(1, 2), true, "t-1", 2, 3, Version::new(8));
        assert_eq!(
            page,
            r#"{"deltas":[{"entity":null,"pk":{"id":"b"},"type":"services","version":"v02_0000000000000000000000000008","ws_id":"ws"}],"full_sync":true,"id":"t-1","page":2,"pages":3,"version":"v02_0000000000000000000000000008"}"#
        );
    }

    #[test]
    fn kong_answers_read_leniently() {
        // Kong 3.10's CP: no head, `{}` for no deltas.
        let a = read_answer(r#"{"default":{"deltas":{},"full_sync":false,"latest_version":"v02_0000000000000000000000000002"}}"#).unwrap();
        assert_eq!(a.latest_version, Some(Version::new(2)));
        assert_eq!(
            for_each_delta(a.namespace, |_| Err("none expected".into())),
            Ok(())
        );
        let a = read_answer(r#"{"default":{"deltas":[],"wipe":true}}"#).unwrap();
        assert!(a.full_sync && a.latest_version.is_none());
        assert_eq!(
            read_answer(r#"{"default":{"full_sync":true}}"#),
            Err(AnswerError::DeltasNull)
        );
        assert_eq!(
            read_answer(r#"{"other":{}}"#),
            Err(AnswerError::NoDefaultNamespace)
        );
        assert!(matches!(
            read_answer(r#"{"default":{"deltas":[],"latest_version":"v3"}}"#),
            Err(AnswerError::BadLatestVersion(_))
        ));
        assert!(for_each_delta(r#"{"deltas":null}"#, |_| Ok(())).is_err());
        assert!(for_each_delta(r#"{"deltas":{"a":1}}"#, |_| Ok(())).is_err());
    }

    #[test]
    fn params_round_trip_and_refuse_what_kong_refuses() {
        let g = GetDelta::new(Version::new(5), Some("ab".repeat(32)));
        assert_eq!(GetDelta::from_params(&g.to_params()).unwrap(), g);
        // Not 64 hex digits: read as absent.
        let short = json!([{"default": {"version": "v02_0000000000000000000000000005", "state_hash": "ab"}}]);
        assert_eq!(GetDelta::from_params(&short).unwrap().state_hash, None);
        let bad = json!([{"default": {"version": "nope"}}]);
        assert_eq!(GetDelta::from_params(&bad).unwrap().version, None);
        let e = GetDelta::from_params(&json!([{}])).unwrap_err();
        assert_eq!(e.code, RpcError::SERVER_ERROR);
        assert_eq!(e.message, "default namespace does not exist inside params");
        let e = GetDelta::from_params(&json!({})).unwrap_err();
        assert_eq!(e.message, "params must be [ { ... } ]");

        let n = NotifyNewVersion {
            new_version: Version::new(12),
        };
        assert_eq!(NotifyNewVersion::from_params(&n.to_params()).unwrap(), n);
        let e = NotifyNewVersion::from_params(&json!([{"default": {}}])).unwrap_err();
        assert_eq!(e.message, "'new_version' key does not exist");

        let v = NotifyValidationError {
            version: None,
            message: "bad".into(),
            fields: json!({"services": {}}),
            flattened_errors: vec![json!({"entity_type": "services"})],
        };
        let params = v.to_params();
        assert_eq!(params[0]["version"], NO_LATEST_VERSION);
        assert_eq!(params[0]["error"]["code"], 21);
        assert_eq!(NotifyValidationError::from_params(&params).unwrap(), v);

        let p = GetPage {
            id: "t".into(),
            page: 4,
        };
        assert_eq!(GetPage::from_params(&p.to_params()).unwrap(), p);
        let e = GetPage::from_params(&json!([{"id": 1, "page": 0}])).unwrap_err();
        assert_eq!(e.code, RpcError::INVALID_PARAMS);
    }
}
