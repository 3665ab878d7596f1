//! The sync vocabulary shared by control and data plane: Kong's `v02_` version strings and the
//! delta shape of `kong.sync.v2.get_delta`.
//!
//! Nothing here knows about sockets, frames or databases.

use serde_json::{Map, Value};

/// Kong's capability for incremental sync.
pub const CAP_KONG_SYNC_V2: &str = "kong.sync.v2";
/// Our extensions (paged transfers), only ever called on a peer that announced them.
pub const CAP_DELTAPLANE_SYNC_V1: &str = "deltaplane.sync.v1";

/// The data plane's `sync_status` when the configuration uses a plugin it lacks; the control
/// plane then withholds the configuration.
pub const PLUGIN_SET_INCOMPATIBLE: &str = "plugin_set_incompatible";
/// The data plane's `sync_status` when it runs a plugin of another major or a newer minor
/// version than the control plane; the control plane then withholds the configuration.
pub const PLUGIN_VERSION_INCOMPATIBLE: &str = "plugin_version_incompatible";

/// Whether a `get_delta` error message is the control plane withholding the configuration
/// (the message starts with the data plane's `sync_status`) rather than failing.
pub fn is_withheld(message: &str) -> bool {
    [PLUGIN_SET_INCOMPATIBLE, PLUGIN_VERSION_INCOMPATIBLE]
        .iter()
        .any(|status| {
            message
                .strip_prefix(status)
                .is_some_and(|rest| rest.starts_with(':'))
        })
}

/// The version string of "no configuration": 32 zeros (Kong's `DECLARATIVE_EMPTY_CONFIG_HASH`).
pub const EMPTY_VERSION: &str = "00000000000000000000000000000000";

/// `v02_` + 28 lowercase hex digits; version 0 is [`EMPTY_VERSION`].
pub fn version_string(v: i64) -> String {
    if v <= 0 {
        EMPTY_VERSION.to_owned()
    } else {
        format!("v02_{v:028x}")
    }
}

/// Parses a version string. 32 zeros (or any 32-character v1 hash) is version 0; anything that
/// is not a valid `v02_` string, or does not fit an i64, is `None`.
pub fn parse_version(s: &str) -> Option<i64> {
    if s.len() != 32 {
        return None;
    }
    match s.strip_prefix("v02_") {
        Some(hex) => {
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let v = u128::from_str_radix(hex, 16).ok()?;
            i64::try_from(v).ok()
        }
        // A v1 md5 hash or the empty hash: the DP has no v2 version.
        None if s.bytes().all(|b| b.is_ascii_hexdigit()) => Some(0),
        None => None,
    }
}

/// One change of one entity, in Kong's shape: `{type, entity, pk, ws_id, version}`.
/// A delete has `entity: None`.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    pub entity_type: String,
    /// The primary key value (`id`) of the entity.
    pub id: String,
    pub ws_id: String,
    pub version: i64,
    pub entity: Option<Value>,
}

/// Why a wire delta could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid delta: {0}")]
pub struct DeltaError(pub String);

impl Delta {
    /// Kong's wire form. Deletes carry `entity: null` and `pk`; upserts carry `entity` (Kong
    /// DPs find the key in the entity) and `pk` too, which Kong ignores.
    pub fn to_wire(&self) -> Value {
        let mut m = Map::new();
        m.insert("type".into(), Value::String(self.entity_type.clone()));
        m.insert("pk".into(), serde_json::json!({ "id": self.id }));
        m.insert("ws_id".into(), Value::String(self.ws_id.clone()));
        m.insert(
            "version".into(),
            Value::String(version_string(self.version)),
        );
        m.insert("entity".into(), self.entity.clone().unwrap_or(Value::Null));
        Value::Object(m)
    }

    /// Reads a wire delta leniently, as Kong's DP does: `entity` null or absent is a delete,
    /// the workspace comes from `ws_id` or else the entity's `ws_id`, the key from `pk.id` or
    /// else the entity's `id`.
    pub fn from_wire(v: Value) -> Result<Delta, DeltaError> {
        let Value::Object(mut m) = v else {
            return Err(DeltaError("a delta must be an object".into()));
        };
        let entity_type = match m.remove("type") {
            Some(Value::String(s)) if !s.is_empty() => s,
            _ => return Err(DeltaError("'type' must be a non-empty string".into())),
        };
        let version = match m.get("version") {
            Some(Value::String(s)) => parse_version(s)
                .ok_or_else(|| DeltaError(format!("'version' is not a valid version: {s}")))?,
            // 3.9-era peers sent numbers.
            Some(Value::Number(n)) => n
                .as_i64()
                .ok_or_else(|| DeltaError("'version' is not an integer".into()))?,
            _ => return Err(DeltaError("'version' must be a version string".into())),
        };
        let entity = match m.remove("entity") {
            None | Some(Value::Null) => None,
            Some(e @ Value::Object(_)) => Some(e),
            Some(_) => return Err(DeltaError("'entity' must be an object or null".into())),
        };
        let ws_id = match (m.get("ws_id"), entity.as_ref().and_then(|e| e.get("ws_id"))) {
            (Some(Value::String(s)), _) | (_, Some(Value::String(s))) => s.clone(),
            _ => return Err(DeltaError("workspace id not found".into())),
        };
        let id = match (
            m.get("pk").and_then(|pk| pk.get("id")),
            entity.as_ref().and_then(|e| e.get("id")),
        ) {
            (_, Some(Value::String(s))) | (Some(Value::String(s)), _) => s.clone(),
            _ => return Err(DeltaError("primary key 'id' not found".into())),
        };
        Ok(Delta {
            entity_type,
            id,
            ws_id,
            version,
            entity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn withheld_messages_are_told_apart() {
        assert!(is_withheld(
            "plugin_set_incompatible: uses plugins: rate-limiting"
        ));
        assert!(is_withheld(
            "plugin_version_incompatible: the data plane runs x 3.11.0"
        ));
        assert!(!is_withheld("plugin_set_incompatible"));
        assert!(!is_withheld("database unavailable: timed out"));
    }

    #[test]
    fn version_strings_round_trip() {
        assert_eq!(version_string(10), "v02_000000000000000000000000000a");
        assert_eq!(version_string(0), EMPTY_VERSION);
        assert_eq!(parse_version("v02_000000000000000000000000000a"), Some(10));
        assert_eq!(parse_version(EMPTY_VERSION), Some(0));
        assert_eq!(parse_version(&version_string(i64::MAX)), Some(i64::MAX));
        assert_eq!(parse_version("v02_ffffffffffffffffffffffffffff"), None);
        assert_eq!(parse_version("v02_00000000000000000000000000zz"), None);
        assert_eq!(parse_version("v02_0a"), None);
        // Fixed width keeps string order equal to numeric order, as Kong compares them.
        assert!(version_string(9) < version_string(10));
        assert!(EMPTY_VERSION < version_string(1).as_str());
    }

    #[test]
    fn deltas_read_leniently() {
        let d = Delta::from_wire(serde_json::json!({
            "type": "routes", "pk": {"id": "r1"}, "ws_id": "w", "version": "v02_0000000000000000000000000003"
        }))
        .unwrap();
        assert_eq!(d.entity, None);
        assert_eq!((d.id.as_str(), d.version), ("r1", 3));
        let d = Delta::from_wire(serde_json::json!({
            "type": "services", "entity": {"id": "s1", "ws_id": "w2"}, "version": "v02_0000000000000000000000000004"
        }))
        .unwrap();
        assert_eq!((d.id.as_str(), d.ws_id.as_str()), ("s1", "w2"));
        assert!(Delta::from_wire(serde_json::json!({"type": "services", "entity": {"id": "s"}, "version": "v02_0000000000000000000000000004"})).is_err());
        let back = Delta::from_wire(d.to_wire()).unwrap();
        assert_eq!(back, d);
    }
}
