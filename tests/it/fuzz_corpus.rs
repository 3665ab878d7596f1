//! Replays the checked-in fuzz corpora (`fuzz/corpus/<target>/`) through the same target bodies
//! the fuzzers run, so CI checks them on stable Rust without a fuzzer.

use std::path::Path;

fn replay(target: &str, f: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| f(&data));
        assert!(result.is_ok(), "{target}: {} panicked", path.display());
        n += 1;
    }
    assert!(n > 0, "{target}: empty corpus");
}

#[test]
fn admin_entity_corpus() {
    replay("admin_entity", deltaplane::fuzzing::admin_entity);
}

#[test]
fn state_hash_corpus() {
    replay("state_hash", deltaplane::fuzzing::state_hash);
}
