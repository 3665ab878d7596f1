//! Kong's sync v1 (`/v1/outlet`): what both planes share — the configuration hash
//! ([`hash`]), the `config_table` export and its inverse ([`export`]), and the reconfigure
//! message (gzip-compressed JSON).
//!
//! Nothing here knows about sockets or databases; `cp::v1` and `dp::v1` speak the protocol.

pub mod export;
pub mod hash;

use std::io::{Read as _, Write as _};

use serde_json::Value;

/// The message type of a configuration push.
pub const RECONFIGURE: &str = "reconfigure";
/// The message type of the data plane's first frame.
pub const BASIC_INFO: &str = "basic_info";
/// The path of the v1 endpoint.
pub const PATH: &str = "/v1/outlet";

/// A data plane's first message: `{"type":"basic_info","plugins":[{name, version}…],
/// "labels":{…},"process_conf":{…}}` (Kong's `clustering/data_plane.lua`). `plugins` are
/// (name, version) pairs, sent sorted by lower-case name; `labels` are `key:value` items.
/// The `basic_info` member by which a deltaplane data plane asks for [`withheld_notice`]s
/// (Kong's control plane ignores members it does not know; a Kong data plane never sends it,
/// so it never gets a text frame).
pub const NOTICES: &str = "deltaplane_notices";

/// The `type` of a withheld notice.
const WITHHELD: &str = "deltaplane_withheld";

/// A text frame telling a deltaplane data plane why the control plane withholds the
/// configuration (Kong's v1 control plane just sends nothing, so its data plane cannot show
/// why).
pub fn withheld_notice(message: &str) -> String {
    serde_json::json!({"type": WITHHELD, "message": message}).to_string()
}

/// Reads a [`withheld_notice`]: its message.
pub fn read_withheld_notice(text: &str) -> Option<String> {
    let v: Value = serde_json::from_str(text).ok()?;
    if v.get("type")?.as_str()? != WITHHELD {
        return None;
    }
    Some(v.get("message")?.as_str()?.to_owned())
}

pub fn basic_info(plugins: &[(String, String)], labels: &[String], max_payload: usize) -> Value {
    let mut plugins = plugins.to_vec();
    plugins.sort_by_key(|(n, _)| n.to_lowercase());
    let labels = super::hello::labels_map(labels.iter().map(String::as_str));
    serde_json::json!({
        "type": BASIC_INFO,
        "plugins": plugins
            .into_iter()
            .map(|(name, version)| serde_json::json!({"name": name, "version": version}))
            .collect::<Vec<_>>(),
        "labels": labels,
        NOTICES: true,
        "process_conf": {
            "role": "data_plane",
            "cluster_max_payload": max_payload,
        },
    })
}

/// A reconfigure message, gzip-compressed: `{type, timestamp, config_table, config_hash,
/// hashes}` plus, for deltaplane data planes (Kong ignores unknown fields),
/// `deltaplane_version` and `deltaplane_epoch`: the change-log version and epoch the
/// configuration is the state of.
pub fn reconfigure_gzip(
    export: &export::Export,
    timestamp: f64,
    version: i64,
    epoch: &str,
) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(export.table.len() / 8 + 256),
        flate2::Compression::default(),
    );
    // The big field goes first so nothing is copied to build the envelope.
    gz.write_all(br#"{"config_table":"#)?;
    gz.write_all(&export.table)?;
    let tail = serde_json::json!({
        "config_hash": export.config_hash,
        "hashes": export.hashes,
        "timestamp": timestamp,
        "type": RECONFIGURE,
        "deltaplane_version": version,
        "deltaplane_epoch": epoch,
    });
    let tail = tail.to_string();
    gz.write_all(b",")?;
    gz.write_all(&tail.as_bytes()[1..])?;
    gz.finish()
}

/// Inflates a gzip message, refusing more than `max` bytes (checked while inflating).
pub fn gunzip(bytes: &[u8], max: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(max as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip: {e}"))?;
    if out.len() > max {
        return Err(format!("the message inflates to more than {max} bytes"));
    }
    Ok(out)
}

/// A data plane's reading of an inflated message (see [`read_message`]).
#[derive(Debug)]
pub enum Received {
    /// Not a reconfigure message: the description of its `type`, for the log.
    Other(String),
    Reconfigure(Reconfigure),
}

/// The fields of a reconfigure message a data plane acts on.
#[derive(Debug)]
pub struct Reconfigure {
    /// Kong's `config_hash`: 32 characters.
    pub config_hash: String,
    /// `deltaplane_version` / `deltaplane_epoch` (deltaplane control planes only).
    pub version: Option<i64>,
    pub epoch: Option<String>,
    /// `config_table` as sent, unchecked: a data plane that already holds this hash never
    /// reads it ([`export::deltas`] does).
    pub config_table: Option<serde_json::Value>,
}

/// Reads an inflated v1 message: JSON, an object, and for a `reconfigure` a 32-character
/// `config_hash`.
pub fn read_message(raw: &[u8]) -> Result<Received, String> {
    use serde_json::Value;
    let msg: Value = serde_json::from_slice(raw).map_err(|e| format!("reconfigure: {e}"))?;
    let Value::Object(mut msg) = msg else {
        return Err("reconfigure: not an object".into());
    };
    if msg.get("type").and_then(Value::as_str) != Some(RECONFIGURE) {
        return Ok(Received::Other(format!("{:?}", msg.get("type"))));
    }
    let config_hash = match msg.get("config_hash") {
        Some(Value::String(h)) if h.len() == 32 => h.clone(),
        _ => return Err("reconfigure: config_hash must be a 32-character string".into()),
    };
    Ok(Received::Reconfigure(Reconfigure {
        config_hash,
        version: msg.get("deltaplane_version").and_then(Value::as_i64),
        epoch: msg
            .get("deltaplane_epoch")
            .and_then(Value::as_str)
            .map(str::to_owned),
        config_table: msg.remove("config_table"),
    }))
}

/// Compresses `bytes` with gzip.
pub fn gzip(bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(bytes.len() / 8 + 64),
        flate2::Compression::default(),
    );
    gz.write_all(bytes)?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Registry;
    use serde_json::{Value, json};

    #[test]
    fn a_reconfigure_message_round_trips() {
        let r = Registry::builtin();
        let mut b = export::ExportBuilder::new();
        b.push(r, "workspaces", "w", json!({"id": "w", "name": "default"}));
        b.push(r, "services", "w", json!({"id": "s", "host": "h"}));
        let e = b.finish();
        let gz = reconfigure_gzip(&e, 1.5, 9, "ep").unwrap();
        let msg: Value = serde_json::from_slice(&gunzip(&gz, 1 << 20).unwrap()).unwrap();
        assert_eq!(msg["type"], "reconfigure");
        assert_eq!(msg["config_hash"], e.config_hash.as_str());
        assert_eq!(msg["hashes"]["config"], e.config_hash.as_str());
        assert_eq!(msg["hashes"]["services"], e.hashes.services.as_str());
        assert_eq!(msg["config_table"]["services"][0]["ws_id"], "w");
        assert_eq!(msg["deltaplane_version"], 9);
        assert_eq!(msg["deltaplane_epoch"], "ep");
        assert_eq!(msg["timestamp"], 1.5);
        assert!(gunzip(&gz, 10).unwrap_err().contains("more than"));
    }
}
