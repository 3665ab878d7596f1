//! The traditional_compatible router at 10,000 routes: full build, one-route update and
//! `find` (hits of each kind and misses), against the targets of issue 12 (build ≤ 200 ms,
//! update ≤ 1 ms, find p99 ≤ 5 µs).
//!
//! `cargo bench --bench router`. The mix is 60% host + prefix path (two routes per host),
//! 25% prefix path only, 15% regex path (`~/regex/<i>/items/(?<id>\d+)$`). Before criterion
//! runs, one pass prints the figures (median build, update p50/p99, find p50/p99 per request
//! kind); `cargo bench --bench router -- none` skips criterion's runs.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group};
use deltaplane::dp::proxy::router::{Request, Route, Router};
use http::HeaderMap;
use serde_json::{Value, json};

const N_ROUTES: usize = 10_000;

fn uuid(kind: u32, i: usize) -> String {
    format!("{kind:08x}-0000-4000-8000-{i:012x}")
}

/// Route `i` of the mix, as the DP store holds it.
fn entity(i: usize, variant: usize) -> Value {
    let base = json!({
        "id": uuid(7, i),
        "name": format!("route-{i}"),
        "protocols": ["http", "https"],
        "methods": null, "hosts": null, "paths": null, "headers": null, "snis": null,
        "sources": null, "destinations": null,
        "strip_path": true, "preserve_host": false, "path_handling": "v0",
        "regex_priority": 0, "https_redirect_status_code": 426,
        "request_buffering": true, "response_buffering": true,
        "service": {"id": uuid(1, i % 500)},
        "ws_id": "0c5d5a1e-0000-4000-8000-000000000000",
    });
    let mut v = base;
    match i % 20 {
        0..=11 => {
            v["hosts"] = json!([format!("h{}.example.com", i / 2)]);
            v["paths"] = json!([format!("/api/r{i}/v{variant}")]);
        }
        12..=16 => v["paths"] = json!([format!("/prefix/{i}/v{variant}")]),
        _ => v["paths"] = json!([format!("~/regex/{i}/items{variant}/(?<id>\\d+)$")]),
    }
    v
}

fn routes() -> Vec<Arc<Route>> {
    (0..N_ROUTES)
        .map(|i| Arc::new(Route::from_entity(&entity(i, 0)).expect("route parses")))
        .collect()
}

/// Requests of each kind: (label, host, path, expected to match).
fn requests() -> Vec<(&'static str, String, String, bool)> {
    let mut out = Vec::new();
    for i in (0..N_ROUTES).step_by(37) {
        match i % 20 {
            0..=11 => out.push((
                "host+prefix",
                format!("h{}.example.com", i / 2),
                format!("/api/r{i}/v0/x"),
                true,
            )),
            12..=16 => out.push((
                "prefix",
                "unknown.example.org".to_string(),
                format!("/prefix/{i}/v0/y"),
                true,
            )),
            _ => out.push((
                "regex",
                "unknown.example.org".to_string(),
                format!("/regex/{i}/items0/12345"),
                true,
            )),
        }
        out.push((
            "miss",
            format!("h{}.example.com", i / 2),
            format!("/nothing/{i}/here"),
            false,
        ));
        out.push((
            "miss",
            "nohost.example.net".to_string(),
            format!("/regex/{i}/items0/abc"),
            false,
        ));
    }
    out
}

fn plain_request<'a>(path: &'a str, headers: &'a HeaderMap) -> Request<'a> {
    Request {
        method: "GET",
        host: "unknown.example.org",
        listener_port: 8000,
        path,
        headers,
        sni: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn figures() {
    let all = routes();
    let mut builds = Vec::new();
    let mut router = Router::new([]).0;
    for _ in 0..5 {
        let started = Instant::now();
        let (built, errors) = Router::new(all.iter().cloned());
        builds.push(started.elapsed());
        assert!(errors.is_empty());
        router = built;
    }
    builds.sort();
    println!(
        "router: {} routes, full build median {:?} (min {:?})",
        router.len(),
        builds[2],
        builds[0]
    );

    let mut updates = Vec::new();
    let mut current = router.clone();
    for step in 0..2000 {
        let i = (step * 7919) % N_ROUTES;
        let changed = Arc::new(Route::from_entity(&entity(i, step % 3)).expect("route parses"));
        let started = Instant::now();
        let (next, errors) = current.update(&[], [changed]);
        updates.push(started.elapsed());
        assert!(errors.is_empty());
        current = next;
    }
    updates.sort();
    println!(
        "router: one-route update p50 {:?} p99 {:?} max {:?}",
        percentile(&updates, 0.5),
        percentile(&updates, 0.99),
        updates[updates.len() - 1]
    );

    let headers = HeaderMap::new();
    let reqs = requests();
    let mut by_kind: std::collections::BTreeMap<&str, Vec<Duration>> = Default::default();
    // Round 0 warms up: a regex's first search on a thread allocates its lazy DFA cache
    // (tens of µs, once per regex and thread); it is reported apart.
    let mut first_use = Vec::new();
    for round in 0..51 {
        for (kind, host, path, want) in &reqs {
            let request = Request {
                method: "GET",
                host,
                listener_port: 8000,
                path,
                headers: &headers,
                sni: None,
            };
            let started = Instant::now();
            let found = black_box(router.find(black_box(&request)));
            let elapsed = started.elapsed();
            assert_eq!(found.is_some(), *want, "{kind} {host} {path}");
            if round == 0 {
                first_use.push(elapsed);
            } else {
                by_kind.entry(kind).or_default().push(elapsed);
            }
        }
    }
    first_use.sort();
    println!(
        "router: find first use (cold caches) p50 {:?} p99 {:?} max {:?}",
        percentile(&first_use, 0.5),
        percentile(&first_use, 0.99),
        first_use[first_use.len() - 1]
    );
    let mut all_finds = Vec::new();
    for (kind, mut times) in by_kind {
        times.sort();
        println!(
            "router: find {kind:<12} p50 {:?} p99 {:?} ({} samples)",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            times.len()
        );
        all_finds.extend(times);
    }
    all_finds.sort();
    println!(
        "router: find all          p50 {:?} p99 {:?}",
        percentile(&all_finds, 0.5),
        percentile(&all_finds, 0.99)
    );
}

/// The same mix with every regex under one literal (`~/api/v\\d+/r<i>/...`): the worst case
/// for the literal index, served by the bucket's `RegexSet` prefilter.
fn shared_literal_figures() {
    let all: Vec<Arc<Route>> = (0..N_ROUTES)
        .map(|i| {
            let mut v = entity(i, 0);
            if i % 20 >= 17 {
                v["paths"] = json!([format!("~/api/v\\d+/r{i}/(?<id>\\d+)$")]);
            }
            Arc::new(Route::from_entity(&v).expect("route parses"))
        })
        .collect();
    let started = Instant::now();
    let (router, errors) = Router::new(all.iter().cloned());
    assert!(errors.is_empty());
    println!(
        "router (shared regex literal): build {:?}",
        started.elapsed()
    );
    let headers = HeaderMap::new();
    let paths: Vec<(String, bool)> = (0..N_ROUTES)
        .step_by(37)
        .filter(|i| i % 20 >= 17)
        .flat_map(|i| {
            [
                (format!("/api/v2/r{i}/77"), true),
                (format!("/api/v2/r{i}/x"), false),
            ]
        })
        .collect();
    let started = Instant::now();
    assert!(router.find(&plain_request(&paths[0].0, &headers)).is_some());
    println!(
        "router (shared regex literal): first find (builds the RegexSet) {:?}",
        started.elapsed()
    );
    let mut times = Vec::new();
    for _ in 0..50 {
        for (path, want) in &paths {
            let r = plain_request(path, &headers);
            let started = Instant::now();
            let found = black_box(router.find(black_box(&r)));
            times.push(started.elapsed());
            assert_eq!(found.is_some(), *want, "{path}");
        }
    }
    times.sort();
    println!(
        "router (shared regex literal): find p50 {:?} p99 {:?}",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
}

fn benches(c: &mut Criterion) {
    let all = routes();
    let (router, _) = Router::new(all.iter().cloned());
    let mut group = c.benchmark_group("router");
    group.sample_size(10);
    group.bench_function("build_10k", |b| b.iter(|| Router::new(all.iter().cloned())));
    let changed = Arc::new(Route::from_entity(&entity(4242, 1)).expect("route parses"));
    group.bench_function("update_one_of_10k", |b| {
        b.iter(|| router.update(&[], [changed.clone()]))
    });
    let headers = HeaderMap::new();
    for (label, host, path) in [
        ("find_host_prefix", "h2100.example.com", "/api/r4200/v0/x"),
        (
            "find_regex",
            "unknown.example.org",
            "/regex/4218/items0/12345",
        ),
        ("find_miss", "nohost.example.net", "/nothing/here"),
    ] {
        let request = Request {
            method: "GET",
            host,
            listener_port: 8000,
            path,
            headers: &headers,
            sni: None,
        };
        group.bench_function(label, |b| {
            b.iter(|| router.find(black_box(&request)).is_some())
        });
    }
    group.finish();
}

criterion_group!(router_benches, benches);

fn main() {
    figures();
    shared_literal_figures();
    let skip = std::env::args().any(|a| a == "none");
    if !skip {
        router_benches();
        Criterion::default().configure_from_args().final_summary();
    }
}
