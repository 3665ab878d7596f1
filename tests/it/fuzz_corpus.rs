//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) through the same target bodies
//! the fuzzers run, so CI checks them on stable Rust without a fuzzer.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    let mut failed = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        if std::panic::catch_unwind(|| f(&data)).is_err() {
            failed.push(path.display().to_string());
        }
        n += 1;
    }
    assert!(n > 0, "{target}: empty corpus");
    assert!(failed.is_empty(), "{target}: panicked on {failed:#?}");
}

#[test]
fn admin_entity_corpus() {
    replay("admin_entity", deltaplane::fuzzing::admin_entity);
}

#[test]
fn state_hash_corpus() {
    replay("state_hash", deltaplane::fuzzing::state_hash);
}

#[test]
fn delta_apply_corpus() {
    replay("delta_apply", deltaplane::fuzzing::delta_apply);
}

#[test]
fn wire_frame_corpus() {
    replay("wire_frame", deltaplane::fuzzing::wire_frame);
}

/// The gzip (sync v1) seeds of `wire_frame` do what their names say, so the replay above runs
/// the reconfigure reader and the config-table conversion, and the cap on inflating.
#[test]
fn wire_frame_gzip_seeds_reach_their_paths() {
    use deltaplane::proto::v1::{self, Received};
    let read = |name: &str| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus/wire_frame")
            .join(name);
        let data = std::fs::read(path).unwrap();
        // Byte 0: lane 3 (gzip) or 4 (all), and the cap.
        assert!(matches!(data[0] % 5, 3 | 4), "{name}: not a gzip lane");
        let cap = [64, 4 << 10, 1 << 20][(data[0] / 5) as usize % 3];
        (data[1..].to_vec(), cap)
    };
    let seed = |name: &str| {
        let (frame, cap) = read(name);
        (v1::gunzip(&frame, cap), cap)
    };
    let inflated = |name: &str| match name {
        // The lane also hands the frame itself to the reader.
        "v1-reconfigure-inflated" => Ok(read(name).0),
        _ => seed(name).0,
    };
    // (seed, entities: workspace, service, route, plugin)
    for (name, n) in [
        ("gzip-reconfigure", 4),
        ("gzip-reconfigure-kong", 4),
        ("v1-reconfigure-inflated", 3),
    ] {
        let raw = inflated(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let Ok(Received::Reconfigure(msg)) = v1::read_message(&raw) else {
            panic!("{name}: not a reconfigure message");
        };
        let Some(serde_json::Value::Object(table)) = msg.config_table else {
            panic!("{name}: no config_table");
        };
        let deltas = v1::export::deltas(deltaplane::schema::Registry::builtin(), table, 3)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(deltas.len(), n, "{name}: {deltas:?}");
    }
    let raw = seed("gzip-not-reconfigure").0.unwrap();
    assert!(matches!(v1::read_message(&raw), Ok(Received::Other(_))));
    for name in [
        "gzip-reconfigure-over-small-cap",
        "gzip-bomb-4k",
        "gzip-bomb-1m",
    ] {
        let (r, cap) = seed(name);
        assert_eq!(
            r.unwrap_err(),
            format!("the message inflates to more than {cap} bytes"),
            "{name}"
        );
    }
    assert!(seed("gzip-truncated").0.unwrap_err().starts_with("gzip: "));
}

// --- bugs the fuzzers found (inputs in `fuzz/regressions/<target>/`) ---

mod found {
    use std::sync::Arc;

    use deltaplane::dp::store::{ApplyKind, DpStore, DpStoreOptions};
    use deltaplane::proto::Delta;
    use deltaplane::schema::Registry;
    use serde_json::{Value, json};

    fn open(dir: &tempfile::TempDir) -> DpStore {
        let opts = DpStoreOptions {
            cache_size: 1 << 20,
            durable: false,
        };
        DpStore::open(
            &dir.path().join("dp.redb"),
            Arc::clone(Registry::builtin()),
            opts,
        )
        .unwrap()
    }

    fn service(n: u8, name: &str) -> Value {
        json!({
            "ca_certificates": null, "client_certificate": null, "connect_timeout": 60000,
            "created_at": 1_700_000_000, "enabled": true, "host": "svc.example",
            "id": format!("00000001-0000-4000-8000-00000000000{n}"), "name": name, "path": null,
            "port": 80, "protocol": "http", "read_timeout": 60000, "retries": 5, "tags": null,
            "tls_verify": null, "tls_verify_depth": null, "updated_at": 1_700_000_000,
            "write_timeout": 60000
        })
    }

    fn upsert(version: i64, entity: Value) -> Delta {
        Delta {
            entity_type: "services".into(),
            id: entity["id"].as_str().unwrap().into(),
            ws_id: "0a0a0a0a-0000-4000-8000-00000000ffff".into(),
            version,
            entity: Some(entity),
        }
    }

    fn replay(name: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/regressions/delta_apply")
            .join(name);
        deltaplane::fuzzing::delta_apply(&std::fs::read(path).unwrap());
    }

    /// `dp::store` accepts a batch that leaves two services named `s-a` in one workspace:
    /// A holds `s-a`; in one batch B takes `s-a` (a collision B/A is recorded, the key row
    /// points at B), B renames itself to `s-b` (B owns the row, so it is removed), C takes
    /// `s-a` (no row, no collision). At commit the B/A collision resolves to A and C's
    /// duplicate goes unseen; the key row then points at A.
    #[test]
    fn dp_store_unique_key_handed_to_a_third_entity() {
        let dir = tempfile::tempdir().unwrap();
        let dp = open(&dir);
        let inc = |expect_from| ApplyKind::Incremental {
            expect_from,
            latest: None,
        };
        dp.apply(inc(0), [upsert(1, service(0, "s-a"))]).unwrap();
        let res = dp.apply(
            inc(1),
            [
                upsert(2, service(1, "s-a")),
                upsert(2, service(1, "s-b")),
                upsert(2, service(2, "s-a")),
            ],
        );
        assert!(
            res.is_err(),
            "two services named s-a were accepted: {res:?}"
        );
        replay("unique-key-handed-to-a-third-entity");
    }
}

/// `state_hash` (fuzzer crash, `fuzz/regressions/state_hash/float-does-not-round-trip`):
/// serde_json parsed long floats with best-effort precision (its `float_roundtrip` feature was
/// off, now on), so `parse(to_string(parse(text)))` can differ from `parse(text)`. The state hash is
/// over the serialised entity: a CP that hashes the entity it parsed and a DP that hashes what
/// it parsed from the CP's text can disagree on the same configuration.
#[test]
fn state_hash_float_does_not_round_trip() {
    let text =
        "999955555555555555555555555555555555555555555555555555555555555555555555555555555555559";
    let parsed: serde_json::Value = serde_json::from_str(text).unwrap();
    let again: serde_json::Value = serde_json::from_str(&parsed.to_string()).unwrap();
    let hash = |v: &serde_json::Value| {
        deltaplane::cp::store::StateHash::of_entity(
            "services",
            "ws",
            "id",
            &serde_json::json!({"n": v}),
        )
    };
    assert_eq!(hash(&parsed), hash(&again), "{parsed} re-read as {again}");
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions/state_hash/float-does-not-round-trip");
    deltaplane::fuzzing::state_hash(&std::fs::read(path).unwrap());
}
