//! The layering ARCHITECTURE.md draws, checked on the source text: the planes are siblings, the
//! protocol layer does no I/O, and the shared layers know neither plane. A line that breaks a
//! rule fails the test with its file and line. Comment lines are not code and are skipped.
//! (`.ci/run` also checks that the data plane builds without the control plane's crates.)

use std::path::{Path, PathBuf};

use regex::Regex;

/// (directory or file under `src/`, what it must not name, why).
const RULES: &[(&str, &str, &str)] = &[
    (
        "dp",
        r"\bcp::|\bsqlx\b",
        "the data plane never names the control plane or its SQL store",
    ),
    (
        "cp",
        r"\bdp::|\bredb\b",
        "the control plane never names the data plane or redb",
    ),
    (
        "proto",
        r"\btokio\b|\bsqlx\b|\bredb\b|\baxum\b|\bhyper\b|\bjsonrpsee\b|crate::(net|cp|dp|settings|node)\b",
        "the protocol layer does no I/O and knows no runtime or plane",
    ),
    (
        "schema",
        r"\btokio\b|\bsqlx\b|\bredb\b|\baxum\b|crate::(net|cp|dp|proto)\b",
        "the schema does no I/O and knows neither the wire nor a store",
    ),
    (
        "declarative",
        r"\btokio\b|\bsqlx\b|\bredb\b|\baxum\b|\bhyper\b|crate::(net|cp|dp|settings|node)\b",
        "declarative files are text in, entities out: no I/O, no plane",
    ),
    (
        "net",
        r"\bcp::|\bdp::|\bsqlx\b|\bredb\b",
        "the shared runtime pieces know neither plane",
    ),
    (
        "settings.rs",
        r"\bcp::|\bdp::|\bsqlx\b|\bredb\b",
        "shared settings know neither plane",
    ),
    (
        "dp/proxy/router",
        r"\btokio\b|\bhyper\b|\bredb\b|\bstore::",
        "the router does no I/O and never reads the store",
    ),
    (
        "dp/proxy/server.rs",
        r"\bredb\b|\bstore::",
        "the request path never reads the store: a request sees only its Gateway",
    ),
    (
        "dp/proxy/upstream.rs",
        r"\bredb\b|\bstore::",
        "the request path never reads the store: a request sees only its Gateway",
    ),
    (
        "dp/proxy/plugins",
        r"\bredb\b|\bstore::",
        "plugins see entities handed to them, never the store",
    ),
    (
        "dp/proxy/balancer",
        r"\bredb\b|\bstore::",
        "balancers see entities handed to them, never the store",
    ),
    (
        "uri.rs",
        r"\btokio\b|\bsqlx\b|\bredb\b|\bhyper\b|crate::(net|cp|dp|proto|declarative)\b",
        "Kong's URI tools are pure functions",
    ),
    (
        "node.rs",
        r"\bcp::|\bdp::|\bsqlx\b|\bredb\b",
        "node helpers know neither plane",
    ),
];

/// Outside its own directory, a plane is named only by its binary (and the fuzz targets, which
/// drive the data plane's store).
const SIBLINGS: &[(&str, &str, &[&str])] = &[
    ("cp", r"\bcp::", &["bin/deltaplane-cp.rs"]),
    ("dp", r"\bdp::", &["bin/deltaplane-dp.rs", "fuzzing"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.to_owned());
        }
        return;
    }
    for entry in std::fs::read_dir(path).expect("readable source directory") {
        rust_files(&entry.expect("directory entry").path(), out);
    }
}

/// Lines of code (comment lines skipped) matching `pattern`, as `file:line: text`.
fn offenders(files: &[PathBuf], pattern: &Regex) -> Vec<String> {
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).expect("readable source file");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            if pattern.is_match(code) {
                let rel = file.strip_prefix(src()).unwrap_or(file);
                found.push(format!("src/{}:{}: {}", rel.display(), n + 1, code));
            }
        }
    }
    found
}

#[test]
fn layers_name_only_what_they_may() {
    let mut broken = Vec::new();
    for (place, pattern, why) in RULES {
        let mut files = Vec::new();
        let path = src().join(place);
        assert!(
            path.exists(),
            "src/{place} is missing: update the layering rules"
        );
        rust_files(&path, &mut files);
        for line in offenders(&files, &Regex::new(pattern).unwrap()) {
            broken.push(format!("{line}\n    ({why})"));
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

#[test]
fn planes_are_siblings() {
    let mut all = Vec::new();
    rust_files(&src(), &mut all);
    let mut broken = Vec::new();
    for (plane, pattern, allowed) in SIBLINGS {
        let outside: Vec<PathBuf> = all
            .iter()
            .filter(|f| {
                let rel = f.strip_prefix(src()).unwrap();
                !rel.starts_with(plane) && !allowed.iter().any(|a| rel.starts_with(a))
            })
            .cloned()
            .collect();
        for line in offenders(&outside, &Regex::new(pattern).unwrap()) {
            broken.push(format!("{line}\n    (only {plane}/ names {plane}::)"));
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

/// The checks can fail: a planted offender is found.
#[test]
fn the_check_finds_a_planted_offender() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("x.rs");
    std::fs::write(
        &file,
        "// a comment naming crate::cp::store is fine\nuse crate::cp::store::Store;\n",
    )
    .unwrap();
    let found = offenders(&[file], &Regex::new(RULES[0].1).unwrap());
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(found[0].ends_with("use crate::cp::store::Store;"));
}
