//! The `wire_frame` target: frame decoders, JSON-RPC, the hello, `get_delta` answers and sync
//! v1 messages, as the peers read them.

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::proto::Delta;
use crate::proto::codec::{self, CodecError, Encoding};
use crate::proto::hello::{HELLO_METHOD, Hello, HelloResult};
use crate::proto::jsonrpc::{self, Incoming, Message, RpcError};
use crate::proto::v1;
use crate::proto::v2::for_each_delta;
use crate::schema::Registry;

/// Arbitrary bytes through each frame decoder and the JSON-RPC parser, as the peer runs them:
/// nothing panics, a decoded frame never exceeds the decompressed-size cap (bombs are refused
/// by `TooLarge` before allocating), decoding inverts encoding, every error we would send back
/// parses as the error it is, responses keep their ids, hello messages and `get_delta` answers
/// read back as they were written. The gzip lane is a sync v1 message as the v1 data plane
/// reads it (`v1::gunzip` under the cap, `v1::read_message`, `v1::export::deltas`).
///
/// Byte 0: `% 5` picks plain JSON (the hello and JSON-RPC), snappy, zstd, gzip, or all four;
/// `/ 5 % 3` picks the cap (64 B, 4 KiB, 1 MiB).
pub fn wire_frame(data: &[u8]) {
    let Some((&selector, frame)) = data.split_first() else {
        return;
    };
    let cap = [64, 4 << 10, 1 << 20][(selector / 5) as usize % 3];
    match selector % 5 {
        0 => plain(frame),
        1 => decoded(Encoding::SnappyFramed, frame, cap),
        2 => decoded(Encoding::Zstd, frame, cap),
        3 => gunzipped(frame, cap),
        _ => {
            plain(frame);
            decoded(Encoding::SnappyFramed, frame, cap);
            decoded(Encoding::Zstd, frame, cap);
            gunzipped(frame, cap);
        }
    }
}

fn plain(frame: &[u8]) {
    hello(frame);
    rpc(frame);
}

fn decoded(encoding: Encoding, frame: &[u8], cap: usize) {
    match codec::decode(encoding, frame, cap) {
        Ok(json) => {
            assert!(
                json.len() <= cap,
                "{encoding}: {} bytes over the cap {cap}",
                json.len()
            );
            let again = codec::decode(encoding, &codec::encode(encoding, &json), cap)
                .unwrap_or_else(|e| panic!("{encoding}: our own frame of {json:?}: {e}"));
            assert_eq!(again, json, "{encoding}: decode(encode(x)) == x");
            plain(&json);
        }
        Err(CodecError::TooLarge { size, limit }) => {
            assert_eq!(limit, cap, "{encoding}: the limit is the cap");
            assert!(
                size > cap as u64,
                "{encoding}: TooLarge of {size} under the cap {cap}"
            );
        }
        Err(CodecError::Corrupt { encoding: name, .. }) => assert_eq!(name, encoding.name()),
        Err(e) => panic!("{encoding}: decoding fails with {e}"),
    }
}

/// A sync v1 message (`/v1/outlet`, gzip) as the data plane reads it: never more than the cap
/// (a bomb is refused while inflating), gunzip(gzip(x)) = x, then the reconfigure message.
///
/// gzip's CRC-32 makes nearly every mutation of a compressed message fail before the reader,
/// so the frame (within the cap) also goes to the reader as if it were the inflated message.
fn gunzipped(frame: &[u8], cap: usize) {
    if frame.len() <= cap {
        v1_message(frame);
    }
    match v1::gunzip(frame, cap) {
        Ok(raw) => {
            assert!(
                raw.len() <= cap,
                "gzip: {} bytes over the cap {cap}",
                raw.len()
            );
            let again = v1::gunzip(&v1::gzip(&raw).expect("gzip in memory"), cap)
                .unwrap_or_else(|e| panic!("gzip: our own message of {raw:?}: {e}"));
            assert_eq!(again, raw, "gzip: gunzip(gzip(x)) == x");
            v1_message(&raw);
        }
        Err(e) => assert!(
            e.starts_with("gzip: ")
                || e == format!("the message inflates to more than {cap} bytes"),
            "gzip: unexpected error {e:?}"
        ),
    }
}

/// An inflated v1 message as `dp::v1::apply_message` reads it before touching the store: a
/// reconfigure has a 32-character hash, and its `config_table` becomes deltas of known types,
/// parents first, each entity an object keyed by the delta's id with its `ws_id` moved out,
/// reading back the same from the v2 wire form.
fn v1_message(raw: &[u8]) {
    let Ok(v1::Received::Reconfigure(msg)) = v1::read_message(raw) else {
        return;
    };
    assert_eq!(msg.config_hash.len(), 32, "config_hash length");
    let Some(Value::Object(table)) = msg.config_table else {
        return;
    };
    let registry = Registry::builtin();
    let version = msg.version.unwrap_or(1);
    let Ok(deltas) = v1::export::deltas(registry, table, version) else {
        return;
    };
    let order: Vec<&str> = registry.entities().map(|s| s.name.as_str()).collect();
    let mut last = 0;
    for d in deltas {
        let at = order
            .iter()
            .position(|t| *t == d.entity_type)
            .unwrap_or_else(|| panic!("v1: a delta of unknown type {}", d.entity_type));
        assert!(at >= last, "v1: {} after a child type", d.entity_type);
        last = at;
        assert_eq!(d.version, version, "v1: the message's version");
        let schema = registry.get(&d.entity_type).expect("a known type");
        let entity = d
            .entity
            .as_ref()
            .and_then(Value::as_object)
            .expect("an entity");
        assert_eq!(
            entity.get(&schema.primary_key).and_then(Value::as_str),
            Some(d.id.as_str()),
            "v1: the delta's id is the entity's"
        );
        assert!(!entity.contains_key("ws_id"), "v1: ws_id moved out");
        if d.version > 0 {
            assert_eq!(
                Delta::from_wire(d.to_wire()).as_ref(),
                Ok(&d),
                "v1 delta wire round trip"
            );
        }
    }
}

/// The hello as the CP reads it (`hello::parse_hello`, private: the same steps here) and the
/// DP reads the answer.
fn hello(frame: &[u8]) {
    let Ok(Incoming::Single(message)) = jsonrpc::parse(frame, 1) else {
        return;
    };
    match message {
        Message::Request(request) if request.method == HELLO_METHOD && request.id.is_some() => {
            let params = request.params_value();
            let Some(info) = params.as_array().and_then(|p| p.first()) else {
                return;
            };
            if let Ok(h) = Hello::deserialize(info) {
                let _ = codec::choose(&h.rpc_frame_encodings);
                let text = serde_json::to_vec(&h).expect("a Hello serialises");
                let back: Hello = serde_json::from_slice(&text).expect("a Hello reads back");
                assert_eq!(back, h, "hello round trip");
            }
        }
        Message::Response(response) => {
            if let Ok(raw) = &response.result
                && let Ok(r) = serde_json::from_str::<HelloResult>(raw.get())
            {
                let _ = r.encoding();
                let text = serde_json::to_vec(&r).expect("a HelloResult serialises");
                let back: HelloResult =
                    serde_json::from_slice(&text).expect("a HelloResult reads back");
                assert_eq!(back, r, "hello result round trip");
            }
        }
        _ => {}
    }
}

/// One decoded frame as the peer dispatches it.
fn rpc(frame: &[u8]) {
    match jsonrpc::parse(frame, jsonrpc::DEFAULT_MAX_BATCH) {
        Err(e) => {
            assert!(
                [RpcError::PARSE_ERROR, RpcError::INVALID_REQUEST].contains(&e.code),
                "frame-level error {e:?}"
            );
            assert_reply_reads_back(None, &e);
        }
        Ok(Incoming::Single(m)) => message(m),
        Ok(Incoming::Batch(ms)) => {
            assert!(!ms.is_empty() && ms.len() <= jsonrpc::DEFAULT_MAX_BATCH);
            ms.into_iter().for_each(message);
        }
    }
}

fn message(m: Message) {
    match m {
        Message::Request(request) => {
            let _ = jsonrpc::capability(&request.method);
            if let Some(id) = request.id.filter(|id| !id.is_null()) {
                let reply = jsonrpc::result(&id, &Value::Null);
                match jsonrpc::parse(&reply, 1) {
                    Ok(Incoming::Single(Message::Response(r))) => {
                        assert_eq!(r.id, id, "a reply keeps the request's id");
                        assert!(r.result.as_ref().is_ok_and(|raw| jsonrpc::is_falsy(raw)));
                    }
                    other => panic!("our reply to {id} reads as {other:?}"),
                }
            }
        }
        Message::Response(response) => match &response.result {
            Ok(raw) => {
                response
                    .to_value()
                    .unwrap_or_else(|e| panic!("a parsed result is JSON: {e:?}"));
                get_delta_answer(raw);
            }
            Err(e) => assert_reply_reads_back(Some(&response.id), e),
        },
        Message::ErrorReport(_) => {}
        Message::Invalid { id, error } => {
            assert_eq!(error.code, RpcError::INVALID_REQUEST);
            assert_reply_reads_back(id.as_ref(), &error);
        }
    }
}

/// `jsonrpc::error(id, e)` parses back as `e`: addressed to `id` when it is a usable id,
/// else as an id-less error report.
fn assert_reply_reads_back(id: Option<&Value>, e: &RpcError) {
    let reply = jsonrpc::error(id, e);
    let back = match jsonrpc::parse(&reply, 1) {
        Ok(Incoming::Single(Message::Response(r))) => {
            assert_eq!(Some(&r.id), id, "the error reply keeps its id");
            r.result.expect_err("an error reply")
        }
        Ok(Incoming::Single(Message::ErrorReport(back))) => {
            assert!(id.is_none_or(Value::is_null), "error report for id {id:?}");
            back
        }
        other => panic!("our error reply {e:?} reads as {other:?}"),
    };
    assert_eq!((back.code, &back.message), (e.code, &e.message));
}

/// A `get_delta` answer as the DP reads it: each delta that reads, reads back the same from
/// its wire form.
fn get_delta_answer(raw: &RawValue) {
    #[derive(Deserialize)]
    struct Outer<'a> {
        #[serde(borrow)]
        default: Option<&'a RawValue>,
    }
    let Ok(Outer { default: Some(ns) }) = serde_json::from_str::<Outer<'_>>(raw.get()) else {
        return;
    };
    let _ = for_each_delta(ns.get(), |v| {
        if let Ok(d) = Delta::from_wire(v)
            && d.version > 0
        {
            assert_eq!(
                Delta::from_wire(d.to_wire()).as_ref(),
                Ok(&d),
                "delta wire round trip"
            );
        }
        Ok(())
    });
}
