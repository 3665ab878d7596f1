//! Kong's v1 configuration hash (`kong/clustering/config_helper.lua`, `calculate_config_hash`),
//! quirks included, so a Kong data plane and ours agree with the control plane on "same config".
//!
//! A value is written canonically into a buffer and the buffer's md5 (lower hex) is the hash:
//!
//! - `null` → `/null/`; strings raw (no escaping); numbers as Lua's `%.14g`; booleans as words;
//! - an empty object or array → `{}`;
//! - an array of 1 to 5 elements → the elements joined by `;`; of 6 or more → every element
//!   followed by `;` (a trailing `;`);
//! - an object → `key:value;` for every key, keys in byte order;
//! - before each value is written, a buffer over 1,000,000 bytes is replaced by the raw 16-byte
//!   md5 of its contents.
//!
//! A configuration table is hashed per group: `routes`, `services`, `plugins`, `upstreams` and
//! `targets` each on its own (a missing group gives 32 zeros), then the rest of the table (those
//! five keys removed); the configuration hash is the md5 of the six hex strings concatenated.

use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Kong's `DECLARATIVE_EMPTY_CONFIG_HASH`.
pub const EMPTY_HASH: &str = "00000000000000000000000000000000";

/// The groups hashed on their own, in the order their hashes are concatenated.
pub const GROUPS: [&str; 5] = ["routes", "services", "plugins", "upstreams", "targets"];

/// Past this many bytes the buffer collapses to its raw md5.
const COLLAPSE_AT: usize = 1_000_000;

/// The per-group hashes of a reconfigure message (`hashes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashes {
    pub config: String,
    pub routes: String,
    pub services: String,
    pub plugins: String,
    pub upstreams: String,
    pub targets: String,
}

impl Hashes {
    /// From the configuration hash and the five group hashes (in [`GROUPS`] order).
    pub fn new(config: String, groups: [String; 5]) -> Hashes {
        let [routes, services, plugins, upstreams, targets] = groups;
        Hashes {
            config,
            routes,
            services,
            plugins,
            upstreams,
            targets,
        }
    }
}

/// Kong's canonical writer: the buffer of one `calculate_hash` call.
#[derive(Debug, Default)]
pub struct Canon {
    buf: Vec<u8>,
}

impl Canon {
    pub fn new() -> Canon {
        Canon::default()
    }

    /// What `to_sorted_string` does first: a buffer past 1 MB becomes its raw md5.
    fn collapse(&mut self) {
        if self.buf.len() > COLLAPSE_AT {
            let digest = Md5::digest(&self.buf);
            self.buf.clear();
            self.buf.extend_from_slice(&digest);
        }
    }

    /// Writes raw bytes (separators and keys; no collapse check, as Kong's `o:put`).
    pub fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Kong's `to_sorted_string(value)`.
    pub fn value(&mut self, v: &Value) {
        self.collapse();
        match v {
            Value::Null => self.put(b"/null/"),
            Value::Bool(b) => self.put(if *b { b"true" } else { b"false" }),
            Value::Number(n) => {
                let s = lua_number(n.as_f64().unwrap_or(0.0));
                self.put(s.as_bytes());
            }
            Value::String(s) => self.put(s.as_bytes()),
            Value::Array(items) => {
                let n = items.len();
                if n == 0 {
                    self.put(b"{}");
                    return;
                }
                for (i, item) in items.iter().enumerate() {
                    self.element(i, item);
                }
                self.end_array(n);
            }
            Value::Object(map) => {
                if map.is_empty() {
                    self.put(b"{}");
                    return;
                }
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
                for k in keys {
                    self.key(k);
                    self.value(&map[k.as_str()]);
                    self.put(b";");
                }
            }
        }
    }

    /// Element `i` of a non-empty array being written one element at a time: the elements are
    /// `;`-separated ...
    pub fn element(&mut self, i: usize, v: &Value) {
        if i > 0 {
            self.put(b";");
        }
        self.value(v);
    }

    /// ... and an array of six or more gets a trailing `;` (Kong's unrolled loop for 1–5).
    pub fn end_array(&mut self, n: usize) {
        if n >= 6 {
            self.put(b";");
        }
    }

    /// `key:` of an object entry (the value and its `;` follow).
    pub fn key(&mut self, k: &str) {
        self.put(k.as_bytes());
        self.put(b":");
    }

    /// The collapse check Kong makes before visiting a value the caller writes piecewise (an
    /// array written with [`Canon::element`]).
    pub fn begin_value(&mut self) {
        self.collapse();
    }

    /// md5 of the buffer, lower hex.
    pub fn finish(self) -> String {
        hex::encode(Md5::digest(&self.buf))
    }
}

/// `calculate_hash`: 32 zeros for a missing value, else md5 of its canonical form.
pub fn hash_value(v: Option<&Value>) -> String {
    match v {
        None => EMPTY_HASH.to_owned(),
        Some(v) => {
            let mut c = Canon::new();
            c.value(v);
            c.finish()
        }
    }
}

/// md5 of the concatenated group hashes and the rest's hash.
pub fn combine(groups: &[String; 5], rest: &str) -> String {
    let mut h = Md5::new();
    for g in groups {
        h.update(g.as_bytes());
    }
    h.update(rest.as_bytes());
    hex::encode(h.finalize())
}

/// Kong's `calculate_config_hash`: the hash and, for a table, the group hashes.
pub fn config_hash(config: &Value) -> (String, Option<Hashes>) {
    match config {
        Value::Object(map) => {
            let groups = GROUPS.map(|g| hash_value(map.get(g)));
            let mut rest = map.clone();
            for g in GROUPS {
                rest.remove(g);
            }
            let rest = hash_value(Some(&Value::Object(rest)));
            let config = combine(&groups, &rest);
            (config.clone(), Some(Hashes::new(config, groups)))
        }
        Value::Array(_) => {
            // A Lua array is a table too: no groups, the whole array is the rest.
            let groups = GROUPS.map(|_| EMPTY_HASH.to_owned());
            let rest = hash_value(Some(config));
            let config = combine(&groups, &rest);
            (config.clone(), Some(Hashes::new(config, groups)))
        }
        other => (hash_value(Some(other)), None),
    }
}

/// A number as LuaJIT writes it (`%.14g`).
pub fn lua_number(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    if x.is_nan() {
        return "nan".to_owned();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    const P: i32 = 14;
    // Scientific form rounded to P significant digits tells the exponent after rounding.
    let sci = format!("{:.*e}", (P - 1) as usize, x);
    let (mantissa, exp) = sci.split_once('e').expect("an exponent");
    let exp: i32 = exp.parse().expect("a number");
    if !(-4..P).contains(&exp) {
        let mantissa = trim_zeros(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let fixed = format!("{:.*}", (P - 1 - exp) as usize, x);
        trim_zeros(&fixed).to_owned()
    }
}

/// `%g` drops trailing zeros of the fraction, and the point when nothing is left.
fn trim_zeros(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hash(v: Value) -> String {
        config_hash(&v).0
    }

    /// Kong's `spec/01-unit/19-hybrid/02-clustering_spec.lua`.
    #[test]
    fn kong_scalar_vectors() {
        assert_eq!(hash(Value::Null), "5bf07a8b7343015026657d1108d8206e");
        assert_eq!(hash(json!(10)), "d3d9446802a44259755d38e6d163e820");
        assert_eq!(hash(json!(0.9)), "a894124cc6d5c5c71afe060d5dde0762");
        assert_eq!(hash(json!("")), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(hash(json!("hello")), "5d41402abc4b2a76b9719d911017c592");
        assert_eq!(hash(json!(false)), "68934a3e9455fa72420237eb05902327");
        assert_eq!(hash(json!(true)), "b326b5062b2f0e69046810717534cb09");
        assert_eq!(hash_value(None), EMPTY_HASH);
    }

    #[test]
    fn kong_empty_table_vector() {
        let (h, hashes) = config_hash(&json!({}));
        assert_eq!(h, "2da3c26e4dbd6dd6ea3ab60a3dd7fb3e");
        let hashes = hashes.unwrap();
        assert_eq!(hashes.config, h);
        for g in [
            &hashes.routes,
            &hashes.services,
            &hashes.plugins,
            &hashes.upstreams,
            &hashes.targets,
        ] {
            assert_eq!(g, EMPTY_HASH);
        }
    }

    #[test]
    fn kong_granular_vectors() {
        let (h, hashes) = config_hash(&json!({"routes": [], "services": [], "plugins": []}));
        assert_eq!(h, "81aac97a81ad03c0cf0b36663806488e");
        let hashes = hashes.unwrap();
        assert_eq!(hashes.routes, "99914b932bd37a50b983c5e7c90ae93b");
        assert_eq!(hashes.services, "99914b932bd37a50b983c5e7c90ae93b");
        assert_eq!(hashes.plugins, "99914b932bd37a50b983c5e7c90ae93b");
        assert_eq!(hashes.upstreams, EMPTY_HASH);
        assert_eq!(hashes.targets, EMPTY_HASH);

        let (h, hashes) = config_hash(&json!({"upstreams": [], "targets": []}));
        assert_eq!(h, "4d60dd9998ea4314039da5ca2f1db96f");
        let hashes = hashes.unwrap();
        assert_eq!(hashes.upstreams, "99914b932bd37a50b983c5e7c90ae93b");
        assert_eq!(hashes.targets, "99914b932bd37a50b983c5e7c90ae93b");
        assert_eq!(hashes.routes, EMPTY_HASH);
    }

    #[test]
    fn kong_complex_table_vector() {
        let six = json!(["v1", "v2", "v3", "v4", "v5", "v6"]);
        let consumers: Vec<Value> = (1..=1000)
            .map(|i| json!({ "username": format!("user-{i}") }))
            .collect();
        let value = json!({
            "plugins": [
                { "name": "0", "config": { "param": "value" } },
                { "name": "1", "config": { "param": six } },
                { "name": "2", "config": { "param": ["v1", "v2", "v3", "v4", "v5"] } },
                { "name": "3", "config": { "param": ["v1", "v2", "v3", "v4"] } },
                { "name": "4", "config": { "param": ["v1", "v2", "v3"] } },
                { "name": "5", "config": { "param": ["v1", "v2"] } },
                { "name": "6", "config": { "param": ["v1"] } },
                { "name": "7", "config": { "param": {} } },
                { "name": "8", "config": { "param": "value", "array": six } },
                { "name": "9", "config": {
                    "bool1": true, "bool2": false, "number": 1, "double": 1.1, "empty": {},
                    "null": null, "string": "test", "hash": { "k": "v" }, "array": six } },
            ],
            "consumers": consumers,
        });
        assert_eq!(hash(value), "675ff4b6b1c8cefa5198284110786ad0");
    }

    #[test]
    fn arrays_of_six_or_more_get_a_trailing_separator() {
        let md5 = |s: &str| hex::encode(Md5::digest(s.as_bytes()));
        assert_eq!(hash(json!(["a", "b", "c", "d", "e"])), {
            let rest = md5("a;b;c;d;e");
            combine(&GROUPS.map(|_| EMPTY_HASH.to_owned()), &rest)
        });
        assert_eq!(hash_value(Some(&json!(["a"]))), md5("a"));
        assert_eq!(
            hash_value(Some(&json!(["a", "b", "c", "d", "e"]))),
            md5("a;b;c;d;e")
        );
        assert_eq!(
            hash_value(Some(&json!(["a", "b", "c", "d", "e", "f"]))),
            md5("a;b;c;d;e;f;")
        );
        assert_eq!(
            hash_value(Some(&json!({"b": [1, 2], "a": null, "c": {}}))),
            md5("a:/null/;b:1;2;c:{};")
        );
    }

    #[test]
    fn the_buffer_collapses_to_a_raw_md5_past_one_megabyte() {
        // `big;` is 1,000,002 bytes: before `tail` is visited the buffer (separator included)
        // is over the limit and becomes its raw md5.
        let big = "x".repeat(1_000_001);
        let v = json!([big, "tail"]);
        let mut expect = Md5::digest(format!("{big};").as_bytes()).to_vec();
        expect.extend_from_slice(b"tail");
        assert_eq!(hash_value(Some(&v)), hex::encode(Md5::digest(&expect)));
        // At exactly 1,000,000 bytes nothing collapses.
        let edge = "x".repeat(999_999);
        let v = json!([edge, "tail"]);
        assert_eq!(
            hash_value(Some(&v)),
            hex::encode(Md5::digest(format!("{edge};tail").as_bytes()))
        );
    }

    #[test]
    fn numbers_are_written_as_lua_does() {
        assert_eq!(lua_number(10.0), "10");
        assert_eq!(lua_number(0.9), "0.9");
        assert_eq!(lua_number(1.1), "1.1");
        assert_eq!(lua_number(-3.0), "-3");
        assert_eq!(lua_number(60000.0), "60000");
        assert_eq!(lua_number(1700000000.0), "1700000000");
        assert_eq!(lua_number(1e14), "1e+14");
        assert_eq!(lua_number(99999999999999.0), "99999999999999");
        assert_eq!(lua_number(123456789012345.0), "1.2345678901234e+14");
        assert_eq!(lua_number(0.0001), "0.0001");
        assert_eq!(lua_number(0.00001), "1e-05");
        assert_eq!(lua_number(1.0 / 3.0), "0.33333333333333");
        assert_eq!(lua_number(0.1 + 0.2), "0.3");
    }
}
