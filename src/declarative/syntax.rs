//! Text to `serde_json::Value` and back: JSON through serde_json, YAML through yaml-rust2's
//! event parser with scalars resolved as Kong's lyaml resolves them, and a small block-style
//! YAML emitter.
//!
//! YAML 1.1 vs 1.2: Kong reads files with lyaml (libyaml, YAML 1.1 implicit types). We follow
//! it for plain scalars: `~`, `null`, `Null`, `NULL` and the empty scalar are null;
//! `true/false`, `yes/no`, `on/off` (lower, Capitalised or UPPER case) are booleans (YAML 1.2
//! has only `true/false`); decimal, `0x` hexadecimal, `0o` and leading-`0` octal, `0b` binary
//! integers (`_` separators allowed); floats including `.inf`/`.nan`. Sexagesimal numbers
//! (`1:30`) stay strings (YAML 1.2 behaviour): they are rare and lyaml reads them as numbers
//! only in some versions. Quoted and block scalars are always strings; `!!str`, `!!int`,
//! `!!float`, `!!bool`, `!!null` tags are honoured.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::Error;

/// The hidden key under which the reader records an entity's 1-based source line. It cannot
/// come from a file: keys starting with NUL are refused by [`load`].
pub(crate) const LINE_KEY: &str = "\u{0}line";

/// Receives a file's top-level entities one at a time, while the file is read, so a large
/// file is never one tree in memory.
pub(crate) trait Sink {
    /// The top-level `_format_version` (`None`: the file has none). Called once, before the
    /// first [`Sink::entity`]: entities that come before it in the file are held until it is
    /// known (Kong's and decK's writers put it first).
    fn format_version(&mut self, v: Option<&Value>);
    /// The next element of the top-level list `key` (an entity type's name), as read.
    fn entity(&mut self, key: &str, v: Value);
    /// Forget everything received: the text is read again another way (JSON that turned out
    /// to be YAML).
    fn reset(&mut self);
}

/// Parses `text` (JSON when it starts with `{`, else YAML). Entity mappings (elements of a
/// sequence under a key in `entity_keys`, at the top level or inside another entity) get
/// their source line under [`LINE_KEY`] (YAML only).
pub(crate) fn load(text: &str, entity_keys: &HashSet<&str>) -> Result<Value, Error> {
    load_inner(text, entity_keys, None)
}

/// [`load`], handing each element of a top-level entity list to `sink` as soon as it is read
/// instead of keeping it: such a list stays in the returned tree as an empty array. A key
/// given twice at the top level is refused (its first list has been handed over already).
pub(crate) fn load_streaming(
    text: &str,
    entity_keys: &HashSet<&str>,
    sink: &mut dyn Sink,
) -> Result<Value, Error> {
    load_inner(text, entity_keys, Some(sink))
}

fn load_inner(
    text: &str,
    entity_keys: &HashSet<&str>,
    mut sink: Option<&mut dyn Sink>,
) -> Result<Value, Error> {
    let trimmed = text.trim_start_matches(['\u{feff}', ' ', '\t', '\r', '\n']);
    if trimmed.starts_with('{') {
        let json = match sink.as_deref_mut() {
            None => serde_json::from_str::<Value>(trimmed),
            Some(sink) => json::load(trimmed, entity_keys, sink),
        };
        match json {
            Ok(v) => return Ok(v),
            Err(json_err) => {
                // Kong tries cjson, then lyaml: a file that is YAML after all is accepted.
                if let Some(sink) = sink.as_deref_mut() {
                    sink.reset();
                }
                let again = sink.as_mut().map(|s| &mut **s as &mut dyn Sink);
                if let Ok(v) = load_yaml(text, entity_keys, again) {
                    return Ok(v);
                }
                return Err(Error::Syntax {
                    message: format!(
                        "failed parsing declarative configuration: {}",
                        strip_position(&json_err.to_string())
                    ),
                    line: Some(json_err.line() + leading_lines(text, trimmed)),
                    column: Some(json_err.column()),
                });
            }
        }
    }
    load_yaml(text, entity_keys, sink)
}

/// Lines before the first non-blank character (the JSON parser counts from there).
fn leading_lines(text: &str, trimmed: &str) -> usize {
    text[..text.len() - trimmed.len()]
        .bytes()
        .filter(|&b| b == b'\n')
        .count()
}

fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

fn load_yaml(
    text: &str,
    entity_keys: &HashSet<&str>,
    sink: Option<&mut dyn Sink>,
) -> Result<Value, Error> {
    let mut builder = Builder {
        entity_keys,
        stack: Vec::new(),
        anchors: HashMap::new(),
        root: None,
        error: None,
        stream: sink.map(Stream::new),
    };
    let mut parser = Parser::new_from_str(text);
    if let Err(e) = parser.load(&mut builder, false) {
        let m = e.marker();
        return Err(Error::Syntax {
            message: format!("failed parsing declarative configuration: {}", e.info()),
            line: Some(m.line()),
            column: Some(m.col() + 1),
        });
    }
    if let Some((message, mark)) = builder.error {
        return Err(Error::Syntax {
            message: format!("failed parsing declarative configuration: {message}"),
            line: Some(mark.line()),
            column: Some(mark.col() + 1),
        });
    }
    Ok(builder.root.unwrap_or(Value::Null))
}

enum Frame {
    Map {
        map: Map<String, Value>,
        key: Option<String>,
        /// The root or an entity: its sequences under entity type keys hold entities.
        entity_like: bool,
        anchor: usize,
        mark: Marker,
    },
    Seq {
        items: Vec<Value>,
        entity_list: bool,
        /// A top-level entity list whose elements go to the sink.
        streamed: bool,
        anchor: usize,
    },
}

/// Hands top-level entities to a [`Sink`], holding them until `_format_version` is known.
pub(crate) struct Stream<'s> {
    sink: &'s mut dyn Sink,
    format_known: bool,
    held: Vec<(String, Value)>,
    /// Top-level keys seen so far.
    keys: HashSet<String>,
}

impl<'s> Stream<'s> {
    pub(crate) fn new(sink: &'s mut dyn Sink) -> Stream<'s> {
        Stream {
            sink,
            format_known: false,
            held: Vec::new(),
            keys: HashSet::new(),
        }
    }

    fn entity(&mut self, key: &str, v: Value) {
        if self.format_known {
            self.sink.entity(key, v);
        } else {
            self.held.push((key.to_owned(), v));
        }
    }

    fn format_version(&mut self, v: Option<&Value>) {
        if self.format_known {
            return;
        }
        self.format_known = true;
        self.sink.format_version(v);
        for (key, v) in std::mem::take(&mut self.held) {
            self.sink.entity(&key, v);
        }
    }

    /// A top-level key: `Err` when it was given already.
    fn key(&mut self, key: &str) -> Result<(), String> {
        if self.keys.insert(key.to_owned()) {
            Ok(())
        } else {
            Err(format!("duplicate top-level key '{key}'"))
        }
    }

    /// The top-level value of `key` was read.
    fn top_value(&mut self, key: &str, v: &Value) {
        if key == "_format_version" {
            self.format_version(Some(v));
        }
    }

    /// The end of the file.
    fn finish(&mut self) {
        self.format_version(None);
    }
}

struct Builder<'a, 's> {
    entity_keys: &'a HashSet<&'a str>,
    stack: Vec<Frame>,
    anchors: HashMap<usize, Value>,
    root: Option<Value>,
    error: Option<(String, Marker)>,
    stream: Option<Stream<'s>>,
}

impl Builder<'_, '_> {
    fn push_value(&mut self, v: Value, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        let depth = self.stack.len();
        if let Some(Frame::Seq { streamed: true, .. }) = self.stack.last() {
            let Some(Frame::Map { key: Some(k), .. }) = self.stack.first() else {
                unreachable!("a streamed list is a value of the root mapping");
            };
            if let Some(stream) = &mut self.stream {
                stream.entity(k, v);
            }
            return;
        }
        match self.stack.last_mut() {
            None => {
                self.root = Some(v);
                if let Some(stream) = &mut self.stream {
                    stream.finish();
                }
            }
            Some(Frame::Seq { items, .. }) => items.push(v),
            Some(Frame::Map { map, key, .. }) => match key.take() {
                None => {
                    let k = match v {
                        Value::String(s) => s,
                        Value::Null => String::new(),
                        Value::Bool(b) => b.to_string(),
                        Value::Number(n) => n.to_string(),
                        _ => {
                            self.error = Some(("mapping keys must be scalars".into(), mark));
                            return;
                        }
                    };
                    if k.starts_with('\u{0}') {
                        self.error = Some(("mapping keys cannot start with NUL".into(), mark));
                        return;
                    }
                    if depth == 1
                        && let Some(stream) = &mut self.stream
                        && let Err(e) = stream.key(&k)
                    {
                        self.error = Some((e, mark));
                        return;
                    }
                    *key = Some(k);
                }
                Some(k) => {
                    if depth == 1
                        && let Some(stream) = &mut self.stream
                    {
                        stream.top_value(&k, &v);
                    }
                    map.insert(k, v);
                }
            },
        }
    }

    /// Whether a mapping starting now is an entity.
    fn next_is_entity(&self) -> bool {
        matches!(
            self.stack.last(),
            Some(Frame::Seq {
                entity_list: true,
                ..
            })
        )
    }

    /// Whether a sequence starting now holds entities.
    fn next_is_entity_list(&self) -> bool {
        match self.stack.last() {
            Some(Frame::Map {
                key: Some(k),
                entity_like: true,
                ..
            }) => self.entity_keys.contains(k.as_str()),
            _ => false,
        }
    }
}

impl MarkedEventReceiver for Builder<'_, '_> {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_some() {
            return;
        }
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let v = resolve_scalar(text, style, tag.as_ref());
                let v = match v {
                    Ok(v) => v,
                    Err(msg) => {
                        self.error = Some((msg, mark));
                        return;
                    }
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, v.clone());
                }
                self.push_value(v, mark);
            }
            Event::SequenceStart(anchor, _) => {
                let entity_list = self.next_is_entity_list();
                // An anchored list is kept whole: an alias may repeat it.
                let streamed =
                    entity_list && self.stack.len() == 1 && self.stream.is_some() && anchor == 0;
                self.stack.push(Frame::Seq {
                    items: Vec::new(),
                    entity_list,
                    streamed,
                    anchor,
                });
            }
            Event::MappingStart(anchor, _) => {
                let entity = self.next_is_entity();
                let mut map = Map::new();
                if entity {
                    map.insert(LINE_KEY.into(), Value::from(mark.line()));
                }
                self.stack.push(Frame::Map {
                    map,
                    key: None,
                    entity_like: entity || self.stack.is_empty(),
                    anchor,
                    mark,
                });
            }
            Event::SequenceEnd => {
                if let Some(Frame::Seq { items, anchor, .. }) = self.stack.pop() {
                    let v = Value::Array(items);
                    if anchor > 0 {
                        self.anchors.insert(anchor, v.clone());
                    }
                    self.push_value(v, mark);
                }
            }
            Event::MappingEnd => {
                if let Some(Frame::Map {
                    map,
                    anchor,
                    mark: start,
                    ..
                }) = self.stack.pop()
                {
                    let v = Value::Object(map);
                    if anchor > 0 {
                        self.anchors.insert(anchor, v.clone());
                    }
                    self.push_value(v, start);
                }
            }
            Event::Alias(id) => match self.anchors.get(&id) {
                Some(v) => {
                    let mut v = v.clone();
                    // An aliased entity is declared again at the alias: its line is here.
                    if let Value::Object(m) = &mut v {
                        m.remove(LINE_KEY);
                        if self.next_is_entity() {
                            m.insert(LINE_KEY.into(), Value::from(mark.line()));
                        }
                    }
                    self.push_value(v, mark);
                }
                None => self.error = Some(("unknown anchor".into(), mark)),
            },
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
    }
}

fn resolve_scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, String> {
    if let Some(tag) = tag {
        if tag.handle == "!!" || tag.handle == "tag:yaml.org,2002:" {
            let explicit = match tag.suffix.as_str() {
                "str" => Some(Value::String(text.clone())),
                "null" => Some(Value::Null),
                "bool" => bool_of(&text).map(Value::Bool),
                "int" => int_of(&text).map(Value::from),
                "float" => float_of(&text)
                    .or_else(|| int_of(&text).map(|i| i as f64))
                    .map(|f| {
                        Number::from_f64(f)
                            .map(Value::Number)
                            .unwrap_or(Value::Null)
                    }),
                _ => None,
            };
            return explicit.ok_or_else(|| format!("invalid value for tag !!{}", tag.suffix));
        }
        return Ok(Value::String(text));
    }
    if style != TScalarStyle::Plain {
        return Ok(Value::String(text));
    }
    Ok(plain_scalar(text))
}

/// lyaml's implicit resolution of a plain scalar (YAML 1.1).
pub(crate) fn plain_scalar(text: String) -> Value {
    if is_null(&text) {
        return Value::Null;
    }
    if let Some(b) = bool_of(&text) {
        return Value::Bool(b);
    }
    if let Some(i) = int_of(&text) {
        return Value::from(i);
    }
    if let Some(f) = float_of(&text)
        && let Some(n) = Number::from_f64(f)
    {
        return Value::Number(n);
    }
    Value::String(text)
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

fn bool_of(s: &str) -> Option<bool> {
    match s {
        "true" | "True" | "TRUE" | "yes" | "Yes" | "YES" | "on" | "On" | "ON" => Some(true),
        "false" | "False" | "FALSE" | "no" | "No" | "NO" | "off" | "Off" | "OFF" => Some(false),
        _ => None,
    }
}

fn int_of(s: &str) -> Option<i64> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    if body.is_empty() || body.starts_with('_') {
        return None;
    }
    let digits: String = body.chars().filter(|&c| c != '_').collect();
    let (radix, digits) = if let Some(h) = digits.strip_prefix("0x") {
        (16, h.to_owned())
    } else if let Some(o) = digits.strip_prefix("0o") {
        (8, o.to_owned())
    } else if let Some(b) = digits.strip_prefix("0b") {
        (2, b.to_owned())
    } else if digits.len() > 1 && digits.starts_with('0') {
        (8, digits[1..].to_owned())
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let v = i64::from_str_radix(&digits, radix).ok()?;
    Some(if neg { -v } else { v })
}

fn float_of(s: &str) -> Option<f64> {
    match s {
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" => return Some(f64::INFINITY),
        "-.inf" | "-.Inf" | "-.INF" => return Some(f64::NEG_INFINITY),
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let b = s.as_bytes();
    // [-+]?([0-9][0-9_]*)?\.[0-9.]*([eE][-+][0-9]+)? (YAML 1.1), and 1e3 forms.
    let body = s.trim_start_matches(['-', '+']);
    if body.is_empty() || !b.iter().any(u8::is_ascii_digit) {
        return None;
    }
    if !body
        .bytes()
        .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'_' | b'e' | b'E' | b'-' | b'+'))
    {
        return None;
    }
    if !body.as_bytes()[0].is_ascii_digit() && body.as_bytes()[0] != b'.' {
        return None;
    }
    let cleaned: String = s.chars().filter(|&c| c != '_').collect();
    cleaned.parse::<f64>().ok().filter(|f| f.is_finite())
}

/// A mapping's entries, each line at `indent`.
pub(crate) fn emit_map(out: &mut String, m: &Map<String, Value>, indent: usize) {
    let mut first = true;
    for (k, v) in m {
        if !first {
            push_indent(out, indent);
        }
        first = false;
        emit_entry(out, k, v, indent);
    }
}

/// One `key: value` entry; the cursor is already at `indent`.
pub(crate) fn emit_entry(out: &mut String, k: &str, v: &Value, indent: usize) {
    emit_string(out, k);
    out.push(':');
    match v {
        Value::Object(m) if !m.is_empty() => {
            out.push('\n');
            push_indent(out, indent + 2);
            emit_map(out, m, indent + 2);
        }
        Value::Array(a) if !a.is_empty() => {
            out.push('\n');
            emit_seq(out, a, indent);
        }
        other => {
            out.push(' ');
            emit_inline(out, other);
            out.push('\n');
        }
    }
}

/// A sequence's items, each `- ` at `indent` (sequences in mappings are not indented, as
/// libyaml writes them).
pub(crate) fn emit_seq(out: &mut String, a: &[Value], indent: usize) {
    for item in a {
        push_indent(out, indent);
        out.push_str("- ");
        match item {
            Value::Object(m) if !m.is_empty() => emit_map(out, m, indent + 2),
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                emit_seq(out, inner, indent + 2);
            }
            other => {
                emit_inline(out, other);
                out.push('\n');
            }
        }
    }
}

pub(crate) fn push_indent(out: &mut String, indent: usize) {
    for _ in 0..indent {
        out.push(' ');
    }
}

fn emit_inline(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => emit_string(out, s),
        Value::Array(a) if a.is_empty() => out.push_str("[]"),
        Value::Object(m) if m.is_empty() => out.push_str("{}"),
        // Not reached by the block emitter; a flow form keeps it valid anyway.
        other => out.push_str(&serde_json::to_string(other).expect("a JSON value serialises")),
    }
}

/// A string plain when it reads back as the same string, else double-quoted (JSON escapes
/// are valid YAML double-quoted escapes).
pub(crate) fn emit_string(out: &mut String, s: &str) {
    if plain_ok(s) {
        out.push_str(s);
    } else {
        out.push_str(&serde_json::to_string(s).expect("a string serialises"));
    }
}

fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if first.is_whitespace()
        || s.ends_with(char::is_whitespace)
        || "-?:,[]{}#&*!|>'\"%@`~".contains(first)
        || s.contains(": ")
        || s.contains(" #")
        || s.ends_with(':')
        || s.chars().any(|c| c.is_control() || c == '\u{feff}')
    {
        return false;
    }
    matches!(plain_scalar(s.to_owned()), Value::String(_)) && !looks_numeric(s)
}

/// Strings a YAML 1.2 or sexagesimal-aware reader could take for a number.
fn looks_numeric(s: &str) -> bool {
    let b = s.trim_start_matches(['-', '+']);
    b.starts_with(|c: char| c.is_ascii_digit() || c == '.')
        && b.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '+' | '-'))
        && b.chars().filter(|c| c.is_ascii_alphabetic()).all(
            |c| matches!(c, 'e' | 'E' | 'x' | 'X' | 'o' | 'b' | 'a'..='f' | 'A'..='F' | 'n' | 'i'),
        )
}

/// JSON read with serde_json, top-level entity lists handed to a [`Sink`] element by element.
mod json {
    use std::collections::HashSet;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    use super::{Sink, Stream};

    pub(super) fn load(
        text: &str,
        entity_keys: &HashSet<&str>,
        sink: &mut dyn Sink,
    ) -> Result<Value, serde_json::Error> {
        let mut stream = Stream::new(sink);
        let mut de = serde_json::Deserializer::from_str(text);
        let root = Root {
            entity_keys,
            stream: &mut stream,
        }
        .deserialize(&mut de)?;
        de.end()?;
        stream.finish();
        Ok(root)
    }

    struct Root<'a, 's> {
        entity_keys: &'a HashSet<&'a str>,
        stream: &'a mut Stream<'s>,
    }

    impl<'de> DeserializeSeed<'de> for Root<'_, '_> {
        type Value = Value;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Root<'_, '_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                self.stream.key(&key).map_err(de::Error::custom)?;
                let v = if self.entity_keys.contains(key.as_str()) {
                    map.next_value_seed(List {
                        key: &key,
                        stream: self.stream,
                    })?
                } else {
                    map.next_value::<Value>()?
                };
                self.stream.top_value(&key, &v);
                out.insert(key, v);
            }
            Ok(Value::Object(out))
        }
    }

    /// A top-level entity list: its elements go to the sink and it reads as `[]`. Any other
    /// value is kept as it is, for the reader to refuse.
    struct List<'a, 's> {
        key: &'a str,
        stream: &'a mut Stream<'s>,
    }

    impl<'de> DeserializeSeed<'de> for List<'_, '_> {
        type Value = Value;

        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for List<'_, '_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            while let Some(v) = seq.next_element::<Value>()? {
                self.stream.entity(self.key, v);
            }
            Ok(Value::Array(Vec::new()))
        }

        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Value, A::Error> {
            serde::Deserialize::deserialize(de::value::MapAccessDeserializer::new(map))
        }

        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }

        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }

        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }

        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Value::from(v))
        }

        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }

        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }

        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_none<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
    }
}
