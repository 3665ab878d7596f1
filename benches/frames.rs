//! Frame encode/decode throughput per encoding, on two realistic `get_delta` responses:
//! one ~1 KB entity, and a ~10 MB full sync of 10k ~1 KB entities.
//! `zstd-3` is level 3 on the same context type, for comparison with our level 1.
//!
//! `cargo bench --bench frames`; compressed sizes are printed once on stderr.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use deltaplane::proto::codec::{self, Encoding};
use deltaplane::proto::jsonrpc;
use deltaplane::proto::version_string;
use serde_json::{Value, json};

/// A deterministic pseudo-random hex string, so ids do not compress away.
fn hex(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from_digit((x % 16) as u32, 16).unwrap_or('0')
        })
        .collect()
}

fn uuid(seed: u64) -> String {
    let h = hex(seed, 32);
    format!(
        "{}-{}-4{}-8{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..]
    )
}

/// A Kong-like route with its service reference and nulls: ~1 KB of JSON.
fn entity(idx: u64) -> Value {
    json!({
        "id": uuid(idx),
        "name": format!("route-{idx}-{}", hex(idx + 7, 6)),
        "service": {"id": uuid(idx / 4 + 1_000_000)},
        "protocols": ["http", "https"],
        "methods": ["GET", "POST"],
        "hosts": [format!("api-{}.example.com", hex(idx + 11, 8))],
        "paths": [format!("/v1/{}/{}", hex(idx + 13, 6), idx)],
        "headers": {"x-tenant": [hex(idx + 17, 12)]},
        "https_redirect_status_code": 426,
        "regex_priority": 0,
        "strip_path": true,
        "preserve_host": false,
        "request_buffering": true,
        "response_buffering": true,
        "path_handling": "v0",
        "snis": null,
        "sources": null,
        "destinations": null,
        "tags": [format!("team-{}", idx % 17), format!("env-{}", hex(idx + 19, 4))],
        "created_at": 1_700_000_000 + idx,
        "updated_at": 1_700_000_000 + idx * 3,
        "description": format!("generated route {idx}, owner {}", hex(idx + 23, 24)),
        "ws_id": "0dc6f45b-8f8d-40d2-a504-473544ee190b",
    })
}

/// The JSON-RPC response of a full `get_delta` with `n` entities.
fn get_delta_response(n: u64) -> Vec<u8> {
    let version = version_string(10);
    let deltas: Vec<Value> = (0..n)
        .map(|idx| {
            json!({
                "type": "routes",
                "entity": entity(idx),
                "version": version,
                "ws_id": "0dc6f45b-8f8d-40d2-a504-473544ee190b",
            })
        })
        .collect();
    let result = json!({"default": {"full_sync": true, "deltas": deltas}});
    jsonrpc::result(&json!(0), &result)
}

#[derive(Clone, Copy)]
enum Codec {
    Ours(Encoding),
    ZstdLevel3,
}

impl Codec {
    fn name(self) -> &'static str {
        match self {
            Codec::Ours(encoding) => encoding.name(),
            Codec::ZstdLevel3 => "zstd-3",
        }
    }

    fn encode(self, json: &[u8], zstd3: &mut zstd::bulk::Compressor<'static>) -> Vec<u8> {
        match self {
            Codec::Ours(encoding) => codec::encode(encoding, json),
            Codec::ZstdLevel3 => zstd3.compress(json).unwrap(),
        }
    }

    fn decode(self, frame: &[u8]) -> Vec<u8> {
        let encoding = match self {
            Codec::Ours(encoding) => encoding,
            Codec::ZstdLevel3 => Encoding::Zstd,
        };
        codec::decode(encoding, frame, 64 << 20).unwrap()
    }
}

const CODECS: [Codec; 3] = [
    Codec::Ours(Encoding::SnappyFramed),
    Codec::Ours(Encoding::Zstd),
    Codec::ZstdLevel3,
];

fn frames(c: &mut Criterion) {
    let mut zstd3 = zstd::bulk::Compressor::new(3).unwrap();
    let cases = [
        ("get_delta_1_entity", get_delta_response(1)),
        ("full_sync_10k_entities", get_delta_response(10_000)),
    ];
    for (name, json) in &cases {
        for codec in CODECS {
            let frame = codec.encode(json, &mut zstd3);
            assert_eq!(&codec.decode(&frame), json);
            eprintln!(
                "{name}: {} bytes JSON, {}: {} bytes ({:.1}x)",
                json.len(),
                codec.name(),
                frame.len(),
                json.len() as f64 / frame.len() as f64
            );
        }
    }
    for (name, json) in &cases {
        let mut group = c.benchmark_group(format!("frames/{name}"));
        group.throughput(Throughput::Bytes(json.len() as u64));
        if json.len() > 1 << 20 {
            group.sample_size(10);
        }
        for codec in CODECS {
            group.bench_function(BenchmarkId::new("encode", codec.name()), |b| {
                b.iter(|| codec.encode(black_box(json), &mut zstd3))
            });
            let frame = codec.encode(json, &mut zstd3);
            group.bench_function(BenchmarkId::new("decode", codec.name()), |b| {
                b.iter(|| codec.decode(black_box(&frame)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, frames);
criterion_main!(benches);
