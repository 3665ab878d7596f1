//! The state hash: an order-independent digest of a whole entity set.
//!
//! It is the sum, modulo 2^256, of SHA-256 over `type \0 ws_id \0 pk \0 canonical JSON` of every
//! entity. Adding and removing an entity are O(1), so the control plane keeps it up to date inside
//! each write transaction, and a data plane computes the same value over what it stores: equal
//! hashes at the same version mean equal configurations.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StateHash([u8; 32]);

impl StateHash {
    pub const ZERO: StateHash = StateHash([0; 32]);

    /// The digest of one entity. `entity` must be the stored form; key order does not matter
    /// because `serde_json::Value` objects serialise with sorted keys.
    pub fn of_entity(entity_type: &str, ws_id: &str, pk: &str, entity: &Value) -> StateHash {
        let canonical = serde_json::to_vec(entity).expect("a JSON value serialises");
        StateHash::of_entity_bytes(entity_type, ws_id, pk, &canonical)
    }

    /// The digest of one entity from its canonical JSON: the exact bytes
    /// `serde_json::to_vec` writes for the stored form (sorted keys, no whitespace). Equal to
    /// [`StateHash::of_entity`] of the parsed value, without serialising it again; other
    /// spellings of the same JSON (key order, spaces, escapes) give another digest.
    pub fn of_entity_bytes(
        entity_type: &str,
        ws_id: &str,
        pk: &str,
        canonical_json: &[u8],
    ) -> StateHash {
        let mut h = Sha256::new();
        h.update(entity_type.as_bytes());
        h.update([0]);
        h.update(ws_id.as_bytes());
        h.update([0]);
        h.update(pk.as_bytes());
        h.update([0]);
        h.update(canonical_json);
        StateHash(h.finalize().into())
    }

    /// Adds `other` (mod 2^256, big-endian).
    pub fn add(&mut self, other: &StateHash) {
        let mut carry = 0u16;
        for i in (0..32).rev() {
            let s = self.0[i] as u16 + other.0[i] as u16 + carry;
            self.0[i] = s as u8;
            carry = s >> 8;
        }
    }

    /// Subtracts `other` (mod 2^256, big-endian).
    pub fn sub(&mut self, other: &StateHash) {
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let mut d = self.0[i] as i16 - other.0[i] as i16 - borrow;
            borrow = if d < 0 {
                d += 256;
                1
            } else {
                0
            };
            self.0[i] = d as u8;
        }
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<StateHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(StateHash(out))
    }
}

impl fmt::Debug for StateHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateHash({})", self.to_hex())
    }
}

impl fmt::Display for StateHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn order_independent_and_reversible() {
        let a = StateHash::of_entity("services", "w", "1", &json!({"b": 1, "a": [1, 2]}));
        let b = StateHash::of_entity("routes", "w", "2", &json!({"x": null}));
        let mut one = StateHash::ZERO;
        one.add(&a);
        one.add(&b);
        let mut two = StateHash::ZERO;
        two.add(&b);
        two.add(&a);
        assert_eq!(one, two);
        assert_ne!(one, StateHash::ZERO);
        two.sub(&a);
        two.sub(&b);
        assert_eq!(two, StateHash::ZERO);
        let parsed: Value = serde_json::from_str(r#"{"a":[1,2],"b":1}"#).unwrap();
        assert_eq!(a, StateHash::of_entity("services", "w", "1", &parsed));
        assert_eq!(StateHash::from_hex(&one.to_hex()), Some(one));
    }

    /// `of_entity_bytes` over the canonical bytes is `of_entity` over the value, for entities
    /// with nesting, escapes, non-ASCII text, numbers of every kind and nulls; and it is not
    /// fooled into equality by a non-canonical spelling.
    #[test]
    fn bytes_digest_equals_value_digest() {
        let entities = [
            json!({}),
            json!({"id": "1", "z": null, "a": {"y": [1, -2, 3.5, 1e300], "b": true}}),
            json!({"name": "caf\u{e9} \"quoted\" \\ \n\t\u{1}", "tags": ["\u{1f600}", "</x>"]}),
            json!({"port": 8443, "big": u64::MAX, "neg": i64::MIN, "f": 0.1, "e": []}),
            json!({"nested": {"deeper": {"deepest": [{"k": "v"}, null, [[]]]}}}),
        ];
        for e in &entities {
            let canonical = serde_json::to_vec(e).unwrap();
            assert_eq!(
                StateHash::of_entity_bytes("services", "ws", "pk", &canonical),
                StateHash::of_entity("services", "ws", "pk", e),
                "{e}"
            );
            // Parsing the canonical bytes back gives the same value, hence the same digest.
            let back: Value = serde_json::from_slice(&canonical).unwrap();
            assert_eq!(
                StateHash::of_entity("services", "ws", "pk", &back),
                StateHash::of_entity_bytes("services", "ws", "pk", &canonical)
            );
        }
        // Pinned independently of both functions (Python's hashlib over the documented
        // preimage), so neither can drift from the CP's format.
        let pinned = "525f6195dc0e180e93c2186e95b362910830c91cfa3a987e78cb18959e2c75a7";
        assert_eq!(
            StateHash::of_entity("services", "w", "1", &json!({"b": 1, "a": [1, 2]})).to_hex(),
            pinned
        );
        assert_eq!(
            StateHash::of_entity_bytes("services", "w", "1", br#"{"a":[1,2],"b":1}"#).to_hex(),
            pinned
        );
        // Type, workspace and key are part of the digest.
        let c = br#"{"a":1}"#;
        let base = StateHash::of_entity_bytes("services", "ws", "pk", c);
        assert_ne!(base, StateHash::of_entity_bytes("routes", "ws", "pk", c));
        assert_ne!(base, StateHash::of_entity_bytes("services", "ws2", "pk", c));
        assert_ne!(base, StateHash::of_entity_bytes("services", "ws", "pk2", c));
        // The same JSON spelled another way is another digest: callers pass canonical bytes.
        let e = json!({"a": 1, "b": 2});
        assert_ne!(
            StateHash::of_entity_bytes("services", "ws", "pk", br#"{"b":2,"a":1}"#),
            StateHash::of_entity("services", "ws", "pk", &e)
        );
        assert_ne!(
            StateHash::of_entity_bytes("services", "ws", "pk", br#"{"a": 1, "b": 2}"#),
            StateHash::of_entity("services", "ws", "pk", &e)
        );
    }

    #[test]
    fn carries_and_borrows_wrap() {
        let max = StateHash([0xff; 32]);
        let mut one = StateHash::ZERO;
        one.0[31] = 1;
        let mut x = max;
        x.add(&one);
        assert_eq!(x, StateHash::ZERO);
        x.sub(&one);
        assert_eq!(x, max);
    }
}
