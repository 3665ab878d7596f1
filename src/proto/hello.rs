//! The `kong.meta.v1.hello` that opens every `/v2/outlet` connection (Kong's `manager.lua`
//! `_meta_call` / `_handle_meta_call`): the messages, their frames, and what a hello says
//! about its sender. The exchange over a socket is `net::hello`.
//!
//! The data plane sends its capabilities, offered frame encodings and identity as a plain-JSON
//! binary frame with id 1; the control plane answers with its own capabilities and the chosen
//! encoding, also uncompressed.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::codec::Encoding;
use super::jsonrpc;

/// The method name of the hello.
pub const HELLO_METHOD: &str = "kong.meta.v1.hello";
/// The WebSocket subprotocol both sides require (`Sec-WebSocket-Protocol`).
pub const SUBPROTOCOL: &str = "kong.meta.v1";
/// The fixed id of the hello request.
pub const HELLO_ID: u64 = 1;
/// The path of the sync v2 (JSON-RPC) endpoint.
pub const V2_PATH: &str = "/v2/outlet";

/// The data plane's hello (`params[0]`). Field order is Kong's, so serialising gives the same
/// key order as a Kong DP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    #[serde(deserialize_with = "string_list")]
    pub rpc_capabilities: Vec<String>,
    #[serde(deserialize_with = "string_list")]
    pub rpc_frame_encodings: Vec<String>,
    pub kong_version: String,
    pub kong_hostname: String,
    pub kong_node_id: String,
    /// The DP's configuration with secrets masked; always an object. A Kong CP only reads
    /// `cluster_dp_labels` from it.
    #[serde(deserialize_with = "object")]
    pub kong_conf: Value,
}

/// The control plane's answer (`result`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloResult {
    #[serde(deserialize_with = "string_list")]
    pub rpc_capabilities: Vec<String>,
    pub rpc_frame_encoding: String,
    /// Further members of the result object (for example `"epoch"`), serialised after the two
    /// fields above. A Kong DP ignores them.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl HelloResult {
    /// The chosen encoding, if it is one we know.
    pub fn encoding(&self) -> Option<Encoding> {
        Encoding::from_name(&self.rpc_frame_encoding)
    }
}

impl Hello {
    /// The plugins the data plane announced in `kong_conf.plugins` (name → version); `None`
    /// when it did not say (then it runs every plugin the control plane knows).
    pub fn plugins(&self) -> Option<HashMap<String, Option<String>>> {
        plugins_of(&self.kong_conf)
    }

    /// `kong_conf.cluster_max_payload`: the largest frame the data plane takes (Kong's DPs
    /// and ours announce it); values below 4 KiB are read as 4 KiB.
    pub fn max_payload(&self) -> Option<usize> {
        max_payload_of(&self.kong_conf)
    }

    /// `kong_conf.cluster_dp_labels` (`["key:value", ...]`) as an object.
    pub fn labels(&self) -> Value {
        let items = self
            .kong_conf
            .get("cluster_dp_labels")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str);
        Value::Object(labels_map(items))
    }
}

/// The `kong_conf` a data plane sends: its role, labels, payload limit and the plugins it runs
/// as `{name, version}` objects (what a control plane checks its configuration against).
pub fn data_plane_conf(
    labels: &[String],
    max_payload: usize,
    plugins: &[(String, String)],
) -> Value {
    serde_json::json!({
        "role": "data_plane",
        "cluster_dp_labels": labels,
        "cluster_max_payload": max_payload,
        "plugins": plugins
            .iter()
            .map(|(name, version)| serde_json::json!({"name": name, "version": version}))
            .collect::<Vec<_>>(),
    })
}

/// `key:value` labels (Kong's `cluster_dp_labels`) as an object; items without `:` are skipped.
pub fn labels_map<'a>(items: impl IntoIterator<Item = &'a str>) -> Map<String, Value> {
    items
        .into_iter()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
        .collect()
}

/// `cluster_max_payload` of a configuration object (a hello's `kong_conf`, a v1
/// `basic_info`'s `process_conf`), at least 4 KiB.
pub fn max_payload_of(conf: &Value) -> Option<usize> {
    let n = conf.get("cluster_max_payload")?.as_f64()?;
    (n.is_finite() && n > 0.0).then(|| (n as usize).max(4096))
}

/// A `plugins` list (in a hello's `kong_conf` or a v1 `basic_info`): names, or `{name,
/// version}` objects; `None` when absent. A Kong node's raw configuration says `bundled` for
/// the plugins bundled with Kong (`schema::BUNDLED_PLUGINS`, version unknown) and `off` for
/// none, next to the names of custom plugins (Kong's `conf_loader`); both are read so.
pub fn plugins_of(v: &Value) -> Option<HashMap<String, Option<String>>> {
    let items = v.get("plugins")?.as_array()?;
    let mut plugins = HashMap::new();
    for p in items {
        match p {
            Value::String(name) if name == "bundled" => {
                for b in crate::schema::BUNDLED_PLUGINS {
                    plugins.entry(b.to_owned()).or_insert(None);
                }
            }
            Value::String(name) if name == "off" => {}
            Value::String(name) => {
                plugins.insert(name.clone(), None);
            }
            Value::Object(o) => {
                if let Some(name) = o.get("name").and_then(Value::as_str) {
                    let version = o.get("version").and_then(Value::as_str).map(str::to_owned);
                    plugins.insert(name.to_owned(), version);
                }
            }
            _ => {}
        }
    }
    Some(plugins)
}

impl HelloResult {
    /// The control plane's answer: its capabilities, the chosen encoding, and (ours) its
    /// change-log epoch and node id.
    pub fn from_control_plane(
        capabilities: Vec<String>,
        encoding: Encoding,
        epoch: String,
        node_id: String,
    ) -> HelloResult {
        let mut extra = Map::new();
        extra.insert("epoch".into(), Value::String(epoch));
        extra.insert("node_id".into(), Value::String(node_id));
        HelloResult {
            rpc_capabilities: capabilities,
            rpc_frame_encoding: encoding.name().to_owned(),
            extra,
        }
    }

    /// The control plane's change-log epoch (deltaplane control planes only).
    pub fn epoch(&self) -> Option<&str> {
        self.extra.get("epoch").and_then(Value::as_str)
    }

    /// Whether the answer offers a capability.
    pub fn offers(&self, capability: &str) -> bool {
        self.rpc_capabilities.iter().any(|c| c == capability)
    }
}

/// The hello request frame, with Kong's key order.
pub fn hello_request(hello: &Hello) -> Vec<u8> {
    #[derive(Serialize)]
    struct HelloRequest<'a> {
        jsonrpc: &'static str,
        method: &'static str,
        id: u64,
        params: [&'a Hello; 1],
    }
    // `Hello` holds strings, string lists and a `Value`: serialising it cannot fail.
    serde_json::to_vec(&HelloRequest {
        jsonrpc: jsonrpc::JSONRPC_VERSION,
        method: HELLO_METHOD,
        id: HELLO_ID,
        params: [hello],
    })
    .expect("a Hello always serialises")
}

/// Reads a hello request: `(id, params[0])`, with Kong's type assertions.
pub fn parse_hello(frame: &[u8]) -> Result<(Value, Hello), String> {
    let request = match jsonrpc::parse(frame, 1) {
        Ok(jsonrpc::Incoming::Single(jsonrpc::Message::Request(request))) => request,
        _ => return Err("the first message must be a hello request".to_owned()),
    };
    if request.method != HELLO_METHOD {
        return Err(format!("expected {HELLO_METHOD}, got {}", request.method));
    }
    let params = request.params_value();
    let Some(id) = request.id else {
        return Err("the hello must have an id".to_owned());
    };
    let Some(info) = params.as_array().and_then(|params| params.first()) else {
        return Err("the hello params must be an array holding one object".to_owned());
    };
    let hello = Hello::deserialize(info).map_err(|err| format!("invalid hello: {err}"))?;
    Ok((id, hello))
}

/// A list of strings. Lua's cjson encodes an empty table as `{}`, so an empty object is
/// accepted as the empty list.
fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item {
                Value::String(s) => Ok(s),
                other => Err(D::Error::custom(format!(
                    "expected a list of strings, found {other}"
                ))),
            })
            .collect(),
        Value::Object(map) if map.is_empty() => Ok(Vec::new()),
        other => Err(D::Error::custom(format!(
            "expected a list of strings, found {other}"
        ))),
    }
}

fn object<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
    use serde::de::Error;
    match Value::deserialize(d)? {
        value @ Value::Object(_) => Ok(value),
        other => Err(D::Error::custom(format!(
            "expected an object, found {other}"
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use serde_json::json;
    use serde_json::value::RawValue;

    use super::*;

    pub(crate) fn kong_hello() -> Hello {
        Hello {
            rpc_capabilities: vec!["kong.sync.v2".into()],
            rpc_frame_encodings: vec!["x-snappy-framed".into()],
            kong_version: "3.10.0".into(),
            kong_hostname: "dp-a".into(),
            kong_node_id: "6f0c8f2e-6a57-4b2e-9d1f-0a3c2b1d4e5f".into(),
            kong_conf: json!({"cluster_dp_labels": ["env:prod"]}),
        }
    }

    pub(crate) fn kong_result() -> HelloResult {
        HelloResult {
            rpc_capabilities: vec!["kong.sync.v2".into()],
            rpc_frame_encoding: "x-snappy-framed".into(),
            extra: Map::new(),
        }
    }

    pub(crate) const FRAME_1: &str = r#"{"jsonrpc":"2.0","method":"kong.meta.v1.hello","id":1,"params":[{"rpc_capabilities":["kong.sync.v2"],"rpc_frame_encodings":["x-snappy-framed"],"kong_version":"3.10.0","kong_hostname":"dp-a","kong_node_id":"6f0c8f2e-6a57-4b2e-9d1f-0a3c2b1d4e5f","kong_conf":{"cluster_dp_labels":["env:prod"]}}]}"#;
    const FRAME_2: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"rpc_capabilities":["kong.sync.v2"],"rpc_frame_encoding":"x-snappy-framed"}}"#;

    /// Kong's §4.5 frames 1 and 2 (with a concrete node id and a one-key `kong_conf`, so that
    /// key order inside `kong_conf` cannot differ): we produce them byte for byte, and parse
    /// them back to the same values.
    #[test]
    fn kong_example_frames_are_byte_exact() {
        assert_eq!(
            String::from_utf8(hello_request(&kong_hello())).unwrap(),
            FRAME_1
        );
        assert_eq!(
            parse_hello(FRAME_1.as_bytes()).unwrap(),
            (json!(1), kong_hello())
        );

        let raw = RawValue::from_string(serde_json::to_string(&kong_result()).unwrap()).unwrap();
        assert_eq!(
            String::from_utf8(jsonrpc::result_raw(&json!(1), &raw)).unwrap(),
            FRAME_2
        );
        let v: Value = serde_json::from_str(FRAME_2).unwrap();
        let parsed: HelloResult = serde_json::from_value(v["result"].clone()).unwrap();
        assert_eq!(parsed, kong_result());
    }

    /// A Kong node's `kong_conf.plugins` is its raw `plugins` setting (Kong's
    /// `kong/conf_loader/init.lua`): `bundled` stands for every bundled plugin.
    #[test]
    fn bundled_and_off_are_read_as_kong_reads_them() {
        let plugins = plugins_of(&json!({"plugins": ["bundled", "my-plugin"]})).unwrap();
        assert_eq!(plugins.len(), 46);
        assert_eq!(plugins.get("key-auth"), Some(&None));
        assert!(plugins.contains_key("my-plugin") && !plugins.contains_key("bundled"));
        assert!(plugins_of(&json!({"plugins": ["off"]})).unwrap().is_empty());
        let named = plugins_of(&json!({"plugins": [{"name": "cors", "version": "3.9.1"}]}));
        assert_eq!(named.unwrap()["cors"].as_deref(), Some("3.9.1"));
        assert_eq!(plugins_of(&json!({})), None);
    }

    #[test]
    fn extra_result_fields_are_flattened_after_kongs() {
        let mut result = kong_result();
        result.extra.insert("epoch".into(), json!(7));
        assert_eq!(
            serde_json::to_string(&result).unwrap(),
            r#"{"rpc_capabilities":["kong.sync.v2"],"rpc_frame_encoding":"x-snappy-framed","epoch":7}"#
        );
        let parsed: HelloResult = serde_json::from_str(
            r#"{"epoch":7,"rpc_frame_encoding":"x-zstd","rpc_capabilities":{}}"#,
        )
        .unwrap();
        assert_eq!(parsed.rpc_capabilities, Vec::<String>::new());
        assert_eq!(parsed.encoding(), Some(Encoding::Zstd));
        assert_eq!(parsed.extra.get("epoch"), Some(&json!(7)));
    }

    #[test]
    fn hello_type_assertions() {
        let base = serde_json::to_value(kong_hello()).unwrap();
        let frame = |info: Value| {
            serde_json::to_vec(
                &json!({"jsonrpc":"2.0","method":HELLO_METHOD,"id":1,"params":[info]}),
            )
            .unwrap()
        };
        // Lua's empty table.
        let mut info = base.clone();
        info["rpc_capabilities"] = json!({});
        assert_eq!(
            parse_hello(&frame(info)).unwrap().1.rpc_capabilities.len(),
            0
        );

        for (field, bad) in [
            ("rpc_capabilities", json!("kong.sync.v2")),
            ("rpc_capabilities", json!([1])),
            ("rpc_frame_encodings", json!({"a": 1})),
            ("kong_version", json!(3.10)),
            ("kong_hostname", Value::Null),
            ("kong_node_id", json!(["x"])),
            ("kong_conf", json!("x")),
        ] {
            let mut info = base.clone();
            info[field] = bad;
            assert!(parse_hello(&frame(info)).is_err(), "{field}");
        }
        let mut info = base.clone();
        info.as_object_mut().unwrap().remove("kong_conf");
        assert!(parse_hello(&frame(info)).is_err());
        assert!(
            parse_hello(br#"{"jsonrpc":"2.0","method":"kong.meta.v1.hello","id":1,"params":{}}"#)
                .is_err()
        );
        assert!(
            parse_hello(br#"{"jsonrpc":"2.0","method":"kong.meta.v1.hello","params":[{}]}"#)
                .is_err()
        );
    }
}
