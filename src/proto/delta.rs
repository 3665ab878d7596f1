//! One change of one entity: the delta shape of `kong.sync.v2.get_delta`, and its lenient reader.

use serde_json::{Map, Value};

use super::version::{parse_version, version_string};

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
