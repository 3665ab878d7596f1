//! Tests of the balancer, after Kong's `spec/01-unit/09-balancer/` where noted.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

const WS: &str = "ws-1";

/// An upstream entity with Kong's defaults, `extra` merged on top.
fn upstream(id: &str, name: &str, extra: Value) -> Value {
    let mut entity = json!({
        "id": id, "name": name, "ws_id": WS, "algorithm": "round-robin",
        "hash_on": "none", "hash_fallback": "none", "hash_on_cookie_path": "/",
        "slots": 10000, "host_header": null, "tags": null, "use_srv_name": false,
    });
    if let (Value::Object(base), Value::Object(more)) = (&mut entity, extra) {
        base.extend(more);
    }
    entity
}

fn target(id: &str, upstream_id: &str, target: &str, weight: u64) -> Value {
    json!({"id": id, "upstream": {"id": upstream_id}, "target": target, "weight": weight, "ws_id": WS})
}

fn resolver() -> Arc<Resolver> {
    Arc::new(Resolver::new())
}

fn build(upstreams: &[Value], targets: &[Value], resolver: &Arc<Resolver>) -> Balancers {
    let (balancers, errors) = Balancers::new(upstreams, targets, None, resolver);
    assert!(errors.is_empty(), "{errors:?}");
    balancers
}

/// `n` IP targets 10.0.0.1..n on port 80, weight 100.
fn ip_targets(upstream_id: &str, n: u32) -> Vec<Value> {
    (1..=n)
        .map(|i| {
            target(
                &format!("t{i}"),
                upstream_id,
                &format!("10.0.0.{i}:80"),
                100,
            )
        })
        .collect()
}

async fn count_picks(
    up: &Arc<Upstream>,
    n: usize,
    key: Option<&str>,
) -> HashMap<SocketAddr, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        let pick = up.pick(key, &[]).await.expect("a peer");
        *counts.entry(pick.addr).or_default() += 1;
    }
    counts
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[tokio::test]
async fn round_robin_follows_weights_exactly_per_wheel_turn() {
    // Kong's wheel: weights 10, 20, 30 divided by their gcd give 6 slots.
    let r = resolver();
    let targets = [
        target("a", "u", "10.0.0.1:80", 10),
        target("b", "u", "10.0.0.2:80", 20),
        target("c", "u", "10.0.0.3:80", 30),
    ];
    let b = build(&[upstream("u", "svc", json!({}))], &targets, &r);
    let up = b.get(WS, "svc").unwrap();
    match &up.algo {
        Algo::RoundRobin { wheel, .. } => assert_eq!(wheel.len(), 6),
        other => panic!("{other:?}"),
    }
    let counts = count_picks(&up, 6000, None).await;
    assert_eq!(counts[&addr("10.0.0.1:80")], 1000);
    assert_eq!(counts[&addr("10.0.0.2:80")], 2000);
    assert_eq!(counts[&addr("10.0.0.3:80")], 3000);
}

#[tokio::test]
async fn weight_zero_targets_are_never_picked() {
    let r = resolver();
    let targets = [
        target("a", "u", "10.0.0.1:80", 0),
        target("b", "u", "10.0.0.2:80", 5),
    ];
    for algorithm in [
        "round-robin",
        "consistent-hashing",
        "least-connections",
        "latency",
    ] {
        let b = build(
            &[upstream("u", "svc", json!({"algorithm": algorithm}))],
            &targets,
            &r,
        );
        let up = b.get(WS, "svc").unwrap();
        for i in 0..200 {
            let key = format!("k{i}");
            let pick = up.pick(Some(&key), &[]).await.unwrap();
            assert_eq!(pick.addr, addr("10.0.0.2:80"), "{algorithm}");
        }
    }
    // Only weight 0: no peer.
    let b = build(&[upstream("u", "svc", json!({}))], &targets[..1], &r);
    let err = b.get(WS, "svc").unwrap().pick(None, &[]).await.unwrap_err();
    assert_eq!(err, BalancerError::NoPeer);
    assert_eq!(
        err.to_string(),
        "failure to get a peer from the ring-balancer"
    );
}

#[tokio::test]
async fn no_targets_is_no_peer() {
    let r = resolver();
    let b = build(&[upstream("u", "svc", json!({}))], &[], &r);
    let err = b.get(WS, "svc").unwrap().pick(None, &[]).await.unwrap_err();
    assert_eq!(err, BalancerError::NoPeer);
}

#[tokio::test]
async fn retries_go_to_another_target() {
    let r = resolver();
    for algorithm in [
        "round-robin",
        "consistent-hashing",
        "least-connections",
        "latency",
    ] {
        let b = build(
            &[upstream("u", "svc", json!({"algorithm": algorithm}))],
            &ip_targets("u", 3),
            &r,
        );
        let up = b.get(WS, "svc").unwrap();
        let first = up.pick(Some("key"), &[]).await.unwrap().addr;
        let second = up.pick(Some("key"), &[first]).await.unwrap().addr;
        assert_ne!(first, second, "{algorithm}");
        let third = up.pick(Some("key"), &[first, second]).await.unwrap().addr;
        assert!(third != first && third != second, "{algorithm}");
    }
}

fn hashing_upstream(extra: Value) -> Value {
    let mut extra = extra;
    extra["algorithm"] = json!("consistent-hashing");
    upstream("u", "svc", extra)
}

#[tokio::test]
async fn hashing_is_stable_and_moves_about_one_nth_when_a_target_is_added() {
    let r = resolver();
    let before = build(&[hashing_upstream(json!({}))], &ip_targets("u", 10), &r);
    let after = build(&[hashing_upstream(json!({}))], &ip_targets("u", 11), &r);
    let (before, after) = (
        before.get(WS, "svc").unwrap(),
        after.get(WS, "svc").unwrap(),
    );
    let n_keys = 10_000;
    let mut moved = 0;
    let mut to_new = 0;
    for i in 0..n_keys {
        let key = format!("client-{i}");
        let a = before.pick(Some(&key), &[]).await.unwrap().addr;
        // Same key, same target.
        assert_eq!(a, before.pick(Some(&key), &[]).await.unwrap().addr);
        let b = after.pick(Some(&key), &[]).await.unwrap().addr;
        if a != b {
            moved += 1;
            if b == addr("10.0.0.11:80") {
                to_new += 1;
            }
        }
    }
    let share = f64::from(moved) / f64::from(n_keys);
    // 1/11 ≈ 0.091. Nearly all moved keys go to the new target; a few move between old
    // ones because the new target's points, laid first in Kong's sorted order, push a
    // colliding old point to its next entry.
    assert!((0.05..0.14).contains(&share), "moved share {share}");
    assert!(
        f64::from(to_new) >= 0.85 * f64::from(moved),
        "{to_new} of {moved}"
    );
}

#[tokio::test]
async fn hashing_continuum_does_not_depend_on_entity_order() {
    let r = resolver();
    let mut targets = ip_targets("u", 5);
    let a = build(&[hashing_upstream(json!({}))], &targets, &r);
    targets.reverse();
    let b = build(&[hashing_upstream(json!({}))], &targets, &r);
    let (Algo::Hashing { continuum: ca }, Algo::Hashing { continuum: cb }) = (
        &a.get(WS, "svc").unwrap().algo,
        &b.get(WS, "svc").unwrap().algo,
    ) else {
        panic!("not hashing");
    };
    assert_eq!(ca, cb);
    // Kong: 160 points per target at equal weight, `slots` points in all.
    assert_eq!(ca.len(), 10_000);
    assert_eq!(ca.iter().filter(|&&p| p != NONE).count(), 5 * 160);
}

#[tokio::test]
async fn hashing_points_follow_weights_and_small_slots_round_up() {
    let r = resolver();
    let targets = [
        target("a", "u", "10.0.0.1:80", 300),
        target("b", "u", "10.0.0.2:80", 100),
    ];
    let b = build(&[hashing_upstream(json!({"slots": 100}))], &targets, &r);
    let Algo::Hashing { continuum } = &b.get(WS, "svc").unwrap().algo else {
        panic!()
    };
    // Below Kong's minimum continuum of 1000 points, 1000 are used.
    assert_eq!(continuum.len(), 1000);
    // floor(0.75 * 2 * 160) = 240 and floor(0.25 * 2 * 160) = 80.
    assert_eq!(continuum.iter().filter(|&&p| p == 0).count(), 240);
    assert_eq!(continuum.iter().filter(|&&p| p == 1).count(), 80);
    // The point of one entry is Kong's: xxhash32("<ip>::<port> <i>") % points.
    let first = (xxhash_rust::xxh32::xxh32(b"10.0.0.1::80 1", 0) % 1000) as usize;
    assert_eq!(continuum[first], 0);
}

fn input<'a>(
    headers: &'a http::HeaderMap,
    query: Option<&'a str>,
    consumer: Option<&'a str>,
    captures: &'a dyn Fn(&str) -> Option<String>,
) -> HashInput<'a> {
    HashInput {
        consumer_id: consumer,
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)),
        headers,
        path: "/a/b",
        query,
        captures,
    }
}

#[test]
fn hash_key_reads_each_input() {
    let r = resolver();
    let mut headers = http::HeaderMap::new();
    headers.append("x-user", "alice".parse().unwrap());
    headers.append("x-multi", "one".parse().unwrap());
    headers.append("x-multi", "two".parse().unwrap());
    headers.append("cookie", "a=1; sess=xyz".parse().unwrap());
    let captures = |name: &str| (name == "id" || name == "1").then(|| "42".to_owned());
    let req = input(
        &headers,
        Some("b=2&q=z&q=a&flag"),
        Some("consumer-1"),
        &captures,
    );
    let key = |extra: Value| {
        let b = build(&[hashing_upstream(extra)], &[], &r);
        b.get(WS, "svc").unwrap().hash_key(&req)
    };
    let plain = |k: &str| HashKey {
        key: Some(k.to_owned()),
        cookie: None,
    };
    assert_eq!(key(json!({})), HashKey::default());
    assert_eq!(key(json!({"hash_on": "consumer"})), plain("consumer-1"));
    assert_eq!(key(json!({"hash_on": "ip"})), plain("192.0.2.7"));
    assert_eq!(
        key(json!({"hash_on": "header", "hash_on_header": "X-User"})),
        plain("alice")
    );
    assert_eq!(
        key(json!({"hash_on": "header", "hash_on_header": "x-multi"})),
        plain("one, two")
    );
    assert_eq!(
        key(json!({"hash_on": "header", "hash_on_header": "x_user"})),
        plain("alice")
    );
    assert_eq!(
        key(json!({"hash_on": "cookie", "hash_on_cookie": "sess"})),
        plain("xyz")
    );
    assert_eq!(key(json!({"hash_on": "path"})), plain("/a/b"));
    assert_eq!(
        key(json!({"hash_on": "query_arg", "hash_on_query_arg": "b"})),
        plain("2")
    );
    // Several values: sorted, joined with ","; a bare argument is "true" (Kong's get_query_arg).
    assert_eq!(
        key(json!({"hash_on": "query_arg", "hash_on_query_arg": "q"})),
        plain("a,z")
    );
    assert_eq!(
        key(json!({"hash_on": "query_arg", "hash_on_query_arg": "flag"})),
        plain("true")
    );
    assert_eq!(
        key(json!({"hash_on": "uri_capture", "hash_on_uri_capture": "id"})),
        plain("42")
    );
}

#[test]
fn hash_key_falls_back_only_when_the_first_input_is_absent() {
    let r = resolver();
    let mut headers = http::HeaderMap::new();
    headers.append("x-empty", "".parse().unwrap());
    let captures = |_: &str| None;
    let anonymous = input(&headers, None, None, &captures);
    let key = |extra: Value, req: &HashInput<'_>| {
        let b = build(&[hashing_upstream(extra)], &[], &r);
        b.get(WS, "svc").unwrap().hash_key(req)
    };
    let fallback_ip = json!({"hash_on": "consumer", "hash_fallback": "ip"});
    assert_eq!(
        key(fallback_ip.clone(), &anonymous).key.as_deref(),
        Some("192.0.2.7")
    );
    let with_consumer = input(&headers, None, Some("c-9"), &captures);
    assert_eq!(key(fallback_ip, &with_consumer).key.as_deref(), Some("c-9"));
    // A missing header falls back to the fallback's own header field.
    let two_headers = json!({"hash_on": "header", "hash_on_header": "x-missing",
        "hash_fallback": "query_arg", "hash_fallback_query_arg": "k"});
    let with_query = input(&headers, Some("k=v"), None, &captures);
    assert_eq!(key(two_headers, &with_query).key.as_deref(), Some("v"));
    // Present but empty is present (Lua's "" is true): no fallback.
    let empty = json!({"hash_on": "header", "hash_on_header": "x-empty", "hash_fallback": "ip"});
    assert_eq!(key(empty, &anonymous).key.as_deref(), Some(""));
    // Both absent: no key.
    let both_absent = json!({"hash_on": "consumer", "hash_fallback": "query_arg", "hash_fallback_query_arg": "k"});
    assert_eq!(key(both_absent, &anonymous), HashKey::default());
}

#[test]
fn hash_cookie_is_created_when_absent() {
    let r = resolver();
    let headers = http::HeaderMap::new();
    let captures = |_: &str| None;
    let req = input(&headers, None, None, &captures);
    let b = build(
        &[hashing_upstream(
            json!({"hash_on": "cookie", "hash_on_cookie": "lb",
            "hash_on_cookie_path": "/shop"}),
        )],
        &[],
        &r,
    );
    let key = b.get(WS, "svc").unwrap().hash_key(&req);
    let cookie = key.cookie.expect("a cookie to set");
    assert_eq!(key.key.as_deref(), Some(cookie.value.as_str()));
    assert!(uuid::Uuid::parse_str(&cookie.value).is_ok());
    assert_eq!(
        cookie.set_cookie(),
        format!("lb={}; Path=/shop; Same-Site=Lax; HttpOnly", cookie.value)
    );
}

#[tokio::test]
async fn least_connections_prefers_the_less_loaded_by_weight() {
    let r = resolver();
    let targets = [
        target("a", "u", "10.0.0.1:80", 200),
        target("b", "u", "10.0.0.2:80", 100),
    ];
    let b = build(
        &[upstream(
            "u",
            "svc",
            json!({"algorithm": "least-connections"}),
        )],
        &targets,
        &r,
    );
    let up = b.get(WS, "svc").unwrap();
    // Held connections: the weight-200 target takes two for each of the other's.
    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(up.pick(None, &[]).await.unwrap());
    }
    let on_a = held
        .iter()
        .filter(|p| p.addr == addr("10.0.0.1:80"))
        .count();
    assert_eq!(on_a, 20);
    // Releasing the connections of `a` sends the next picks there.
    held.retain(|p| p.addr != addr("10.0.0.1:80"));
    let next = up.pick(None, &[]).await.unwrap();
    assert_eq!(next.addr, addr("10.0.0.1:80"));
    // A reported pick releases its connection too.
    let b_pick = held.pop().unwrap();
    b_pick.report(Outcome::Response {
        status: 200,
        latency: Duration::from_millis(1),
    });
    assert_eq!(up.targets[1].connections.load(Ordering::Relaxed), 9);
}

#[tokio::test]
async fn latency_prefers_the_faster_target() {
    let r = resolver();
    let b = build(
        &[upstream("u", "svc", json!({"algorithm": "latency"}))],
        &ip_targets("u", 2),
        &r,
    );
    let up = b.get(WS, "svc").unwrap();
    // Teach it: 10.0.0.1 is slow, 10.0.0.2 fast.
    for _ in 0..4 {
        for (target, ms) in [("10.0.0.1:80", 500), ("10.0.0.2:80", 5)] {
            let pick = up.pick(None, &[]).await.unwrap();
            let tried: Vec<SocketAddr> = if pick.addr == addr(target) {
                vec![]
            } else {
                vec![pick.addr]
            };
            drop(pick);
            let pick = up.pick(None, &tried).await.unwrap();
            assert_eq!(pick.addr, addr(target));
            pick.report(Outcome::Response {
                status: 200,
                latency: Duration::from_millis(ms),
            });
        }
    }
    let counts = count_picks(&up, 50, None).await;
    assert_eq!(counts.get(&addr("10.0.0.2:80")), Some(&50));
}

fn passive(http_failures: u64) -> Value {
    json!({"healthchecks": {
        "active": {"healthy": {"interval": 0, "successes": 0}, "unhealthy": {"interval": 0}},
        "passive": {
            "healthy": {"http_statuses": [200], "successes": 1},
            "unhealthy": {"http_statuses": [500, 503], "http_failures": http_failures,
                "tcp_failures": 1, "timeouts": 2},
        },
        "threshold": 0,
    }})
}

#[tokio::test]
async fn passive_checks_mark_a_target_down_and_it_stays_down() {
    let r = resolver();
    let b = build(&[upstream("u", "svc", passive(3))], &ip_targets("u", 2), &r);
    let up = b.get(WS, "svc").unwrap();
    let bad = addr("10.0.0.1:80");
    let mut failures = 0;
    while failures < 3 {
        let pick = up.pick(None, &[]).await.unwrap();
        if pick.addr == bad {
            failures += 1;
            pick.report(Outcome::Response {
                status: 500,
                latency: Duration::ZERO,
            });
        } else {
            pick.report(Outcome::Response {
                status: 200,
                latency: Duration::ZERO,
            });
        }
    }
    assert_eq!(
        up.target_health(),
        vec![
            ("10.0.0.1:80".to_owned(), false),
            ("10.0.0.2:80".to_owned(), true)
        ]
    );
    // Down it stays: passive checks never bring it back, and it gets no traffic.
    for _ in 0..100 {
        let pick = up.pick(None, &[]).await.unwrap();
        assert_ne!(pick.addr, bad);
        pick.report(Outcome::Response {
            status: 200,
            latency: Duration::ZERO,
        });
    }
    assert!(!up.target_health()[0].1);
    // TCP errors (threshold 1) take the other one down: no peer left.
    up.pick(None, &[]).await.unwrap().report(Outcome::TcpError);
    assert_eq!(up.pick(None, &[]).await.unwrap_err(), BalancerError::NoPeer);
}

#[tokio::test]
async fn reports_are_ignored_without_a_health_checker() {
    // Kong creates no health checker when every interval and unhealthy threshold is 0.
    let r = resolver();
    let b = build(&[upstream("u", "svc", json!({}))], &ip_targets("u", 1), &r);
    let up = b.get(WS, "svc").unwrap();
    for _ in 0..10 {
        up.pick(None, &[]).await.unwrap().report(Outcome::Response {
            status: 500,
            latency: Duration::ZERO,
        });
        up.pick(None, &[]).await.unwrap().report(Outcome::TcpError);
    }
    assert!(up.pick(None, &[]).await.is_ok());
}

#[tokio::test]
async fn health_threshold_makes_least_connections_give_up() {
    let r = resolver();
    let mut extra = passive(1);
    extra["algorithm"] = json!("least-connections");
    extra["healthchecks"]["threshold"] = json!(60);
    let b = build(&[upstream("u", "svc", extra)], &ip_targets("u", 2), &r);
    let up = b.get(WS, "svc").unwrap();
    up.pick(None, &[]).await.unwrap().report(Outcome::Response {
        status: 503,
        latency: Duration::ZERO,
    });
    // 50 % of the weight is healthy, not more than 60 %: the balancer is unhealthy.
    assert_eq!(up.pick(None, &[]).await.unwrap_err(), BalancerError::NoPeer);
}

/// A local HTTP server answering every connection with `status`; counts connections.
async fn http_server(status: Arc<AtomicUsize>, hits: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            hits.fetch_add(1, Ordering::SeqCst);
            let code = status.load(Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                let reply =
                    format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
                let _ = sock.write_all(reply.as_bytes()).await;
            });
        }
    });
    local
}

fn active(healthy_interval: f64, unhealthy_interval: f64) -> Value {
    json!({"healthchecks": {
        "active": {"type": "http", "http_path": "/status", "timeout": 1, "concurrency": 2,
            "healthy": {"interval": healthy_interval, "http_statuses": [200], "successes": 2},
            "unhealthy": {"interval": unhealthy_interval, "http_statuses": [500],
                "http_failures": 2, "tcp_failures": 1, "timeouts": 1}},
        "passive": {"healthy": {"successes": 0},
            "unhealthy": {"http_statuses": [500], "http_failures": 1}},
        "threshold": 0,
    }})
}

async fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn active_checks_bring_a_target_back_and_take_it_down() {
    let r = resolver();
    let status = Arc::new(AtomicUsize::new(200));
    let hits = Arc::new(AtomicUsize::new(0));
    let server = http_server(status.clone(), hits.clone()).await;
    let b = build(
        &[upstream("u", "svc", active(0.05, 0.05))],
        &[target("a", "u", &server.to_string(), 100)],
        &r,
    );
    let up = b.get(WS, "svc").unwrap();
    // A passive failure takes it down...
    up.pick(None, &[]).await.unwrap().report(Outcome::Response {
        status: 500,
        latency: Duration::ZERO,
    });
    assert_eq!(up.pick(None, &[]).await.unwrap_err(), BalancerError::NoPeer);
    // ...and two successful probes bring it back.
    assert!(
        wait_for(|| up.target_health()[0].1).await,
        "not brought back"
    );
    assert!(up.pick(None, &[]).await.is_ok());
    // Two failing probes take it down again.
    status.store(500, Ordering::SeqCst);
    assert!(
        wait_for(|| !up.target_health()[0].1).await,
        "not taken down"
    );
    assert!(hits.load(Ordering::SeqCst) >= 4);
}

#[tokio::test]
async fn active_tcp_check_counts_refused_connections() {
    let r = resolver();
    // A port with nothing listening: bind, note it, close.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut extra = active(0.05, 0.0);
    extra["healthchecks"]["active"]["type"] = json!("tcp");
    let b = build(
        &[upstream("u", "svc", extra)],
        &[target("a", "u", &closed.to_string(), 100)],
        &r,
    );
    let up = b.get(WS, "svc").unwrap();
    assert!(wait_for(|| !up.target_health()[0].1).await);
}

#[tokio::test]
async fn active_checks_stop_when_the_upstream_is_dropped() {
    let r = resolver();
    let hits = Arc::new(AtomicUsize::new(0));
    let server = http_server(Arc::new(AtomicUsize::new(200)), hits.clone()).await;
    let b = build(
        &[upstream("u", "svc", active(0.02, 0.02))],
        &[target("a", "u", &server.to_string(), 100)],
        &r,
    );
    assert!(wait_for(|| hits.load(Ordering::SeqCst) >= 2).await);
    drop(b);
    // A probe in flight at the drop may still land; none may start after it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_drop = hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(hits.load(Ordering::SeqCst), after_drop);
}

#[tokio::test]
async fn unchanged_upstreams_are_reused_and_changed_ones_keep_health() {
    let r = resolver();
    let ups = [
        upstream("u1", "one", passive(1)),
        upstream("u2", "two", passive(1)),
    ];
    let mut targets = ip_targets("u1", 2);
    targets.push(target("x", "u2", "10.0.1.1:80", 100));
    let first = build(&ups, &targets, &r);
    let one = first.get(WS, "one").unwrap();
    // Take 10.0.0.1 down.
    loop {
        let pick = one.pick(None, &[]).await.unwrap();
        if pick.addr == addr("10.0.0.1:80") {
            pick.report(Outcome::Response {
                status: 500,
                latency: Duration::ZERO,
            });
            break;
        }
    }
    let held = first.get(WS, "two").unwrap().pick(None, &[]).await.unwrap();

    // Same entities: the same Arcs.
    let (second, errors) = Balancers::new(&ups, &targets, Some(&first), &r);
    assert!(errors.is_empty());
    assert!(Arc::ptr_eq(&one, &second.get(WS, "one").unwrap()));
    let two = second.get(WS, "two").unwrap();
    assert!(Arc::ptr_eq(&first.get(WS, "two").unwrap(), &two));
    assert_eq!(two.targets[0].connections.load(Ordering::Relaxed), 1);
    drop(held);

    // A new target on `one`: a new upstream, the down target still down.
    targets.push(target("t3", "u1", "10.0.0.3:80", 100));
    let (third, errors) = Balancers::new(&ups, &targets, Some(&second), &r);
    assert!(errors.is_empty());
    let one_again = third.get(WS, "one").unwrap();
    assert!(!Arc::ptr_eq(&one, &one_again));
    assert!(Arc::ptr_eq(&two, &third.get(WS, "two").unwrap()));
    assert_eq!(
        one_again.target_health(),
        vec![
            ("10.0.0.1:80".to_owned(), false),
            ("10.0.0.2:80".to_owned(), true),
            ("10.0.0.3:80".to_owned(), true),
        ]
    );
}

#[test]
fn bad_entities_are_reported_and_left_out() {
    let r = resolver();
    let ups = [
        upstream("good", "good", json!({})),
        upstream("bad", "bad", json!({"algorithm": "random"})),
        upstream("dup", "good", json!({})),
        upstream("nohdr", "nohdr", json!({"hash_on": "header"})),
    ];
    let targets = [
        target("t1", "good", "10.0.0.1:80", 100),
        target("t2", "good", "10.0.0.1:notaport", 100),
        target("t3", "missing", "10.0.0.1:80", 100),
        target("t4", "good", "10.0.0.1:80", 100),
    ];
    let (b, errors) = Balancers::new(&ups, &targets, None, &r);
    let mut ids: Vec<&str> = errors.iter().map(|(id, _)| id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["bad", "dup", "nohdr", "t2", "t3", "t4"], "{errors:?}");
    assert_eq!(b.len(), 1);
    assert!(b.get(WS, "good").is_some());
    assert!(b.get("other-ws", "good").is_none());
}

#[test]
fn targets_split_like_kong() {
    use config::split_target;
    assert_eq!(
        split_target("example.com:8080").unwrap(),
        ("example.com".to_owned(), 8080)
    );
    assert_eq!(split_target("[::1]:81").unwrap(), ("::1".to_owned(), 81));
    assert_eq!(
        split_target("example.com").unwrap(),
        ("example.com".to_owned(), 8000)
    );
    assert!(split_target("example.com:99999").is_err());
}

#[tokio::test]
async fn host_name_targets_resolve_through_the_resolver() {
    let r = resolver();
    let b = build(
        &[upstream("u", "svc", json!({}))],
        &[target("a", "u", "localhost:8080", 100)],
        &r,
    );
    let pick = b.get(WS, "svc").unwrap().pick(None, &[]).await.unwrap();
    assert!(pick.addr.ip().is_loopback());
    assert_eq!(pick.addr.port(), 8080);
    assert_eq!((pick.host.as_str(), pick.port), ("localhost", 8080));
    // A name that does not resolve, alone: the resolution error.
    let b = build(
        &[upstream("u", "svc", json!({}))],
        &[target("a", "u", "does-not-exist.invalid:80", 100)],
        &r,
    );
    let err = b.get(WS, "svc").unwrap().pick(None, &[]).await.unwrap_err();
    assert!(matches!(err, BalancerError::NameResolution(_)), "{err:?}");
    assert_eq!(err.to_string(), "name resolution failed");
}

#[tokio::test]
async fn resolver_short_circuits_ip_literals_and_caches_names() {
    let r = Resolver::with_max_ttl(Duration::from_millis(100));
    assert_eq!(
        r.resolve("127.0.0.1", 80).await.unwrap(),
        vec![addr("127.0.0.1:80")]
    );
    assert_eq!(
        r.resolve("[::1]", 80).await.unwrap(),
        vec![addr("[::1]:80")]
    );
    assert_eq!(r.resolve("::1", 81).await.unwrap(), vec![addr("[::1]:81")]);
    assert_eq!(r.lookups(), 0);

    let first = r.resolve("localhost", 80).await.unwrap();
    assert!(first.iter().all(|a| a.ip().is_loopback() && a.port() == 80));
    assert_eq!(r.lookups(), 1);
    // Cached, whatever the port.
    assert_eq!(
        r.resolve("LOCALHOST", 443).await.unwrap().len(),
        first.len()
    );
    assert_eq!(r.lookups(), 1);
    assert!(r.cached("localhost", 80).is_some());
    // Expired after the (capped) TTL: looked up again.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(r.cached("localhost", 80).is_none());
    r.resolve("localhost", 80).await.unwrap();
    assert_eq!(r.lookups(), 2);
}

#[tokio::test]
async fn concurrent_lookups_of_one_name_are_shared() {
    let r = Arc::new(Resolver::new());
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let r = Arc::clone(&r);
            tokio::spawn(async move { r.resolve("localhost", 80).await })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap().is_ok());
    }
    assert_eq!(r.lookups(), 1);
}

#[test]
fn shared_types_are_send_and_sync_and_pick_is_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Balancers>();
    send_sync::<Upstream>();
    send_sync::<Resolver>();
    send_sync::<Pick>();
    let r = resolver();
    let b = build(&[upstream("u", "svc", json!({}))], &ip_targets("u", 1), &r);
    let up = b.get(WS, "svc").unwrap();
    send(&up.pick(None, &[]));
    send(&r.resolve("localhost", 80));
}

#[tokio::test]
async fn failed_lookups_are_remembered_briefly() {
    let r = Resolver::new();
    assert!(r.resolve("does-not-exist.invalid", 80).await.is_err());
    assert!(r.resolve("does-not-exist.invalid", 80).await.is_err());
    assert_eq!(r.lookups(), 1);
}

#[tokio::test]
async fn disabling_health_checks_clears_the_previous_state() {
    let r = resolver();
    let targets = ip_targets("u", 1);
    let first = build(&[upstream("u", "svc", passive(1))], &targets, &r);
    let up = first.get(WS, "svc").unwrap();
    up.pick(None, &[]).await.unwrap().report(Outcome::TcpError);
    assert!(up.pick(None, &[]).await.is_err());
    // Same checks, another entity field changed: still down.
    let mut changed = passive(1);
    changed["slots"] = json!(100);
    let (second, _) = Balancers::new(&[upstream("u", "svc", changed)], &targets, Some(&first), &r);
    assert!(
        second
            .get(WS, "svc")
            .unwrap()
            .pick(None, &[])
            .await
            .is_err()
    );
    // Health checks off: every target usable again.
    let (third, _) = Balancers::new(
        &[upstream("u", "svc", json!({}))],
        &targets,
        Some(&second),
        &r,
    );
    assert!(third.get(WS, "svc").unwrap().pick(None, &[]).await.is_ok());
}

#[tokio::test]
async fn ipv6_targets_keep_brackets_in_the_host() {
    let r = resolver();
    let b = build(
        &[upstream("u", "svc", json!({}))],
        &[target("a", "u", "[::1]:8080", 100)],
        &r,
    );
    let pick = b.get(WS, "svc").unwrap().pick(None, &[]).await.unwrap();
    assert_eq!(pick.addr, addr("[::1]:8080"));
    assert_eq!(pick.host, "[::1]");
}

/// Pick cost, printed; run with `cargo test --lib dp::proxy::balancer::tests::pick_cost --
/// --ignored --nocapture` (add `--release` for representative numbers).
#[tokio::test]
#[ignore]
async fn pick_cost() {
    let r = resolver();
    for algorithm in [
        "round-robin",
        "consistent-hashing",
        "least-connections",
        "latency",
    ] {
        let b = build(
            &[upstream("u", "svc", json!({"algorithm": algorithm}))],
            &ip_targets("u", 100),
            &r,
        );
        let up = b.get(WS, "svc").unwrap();
        let n = 200_000;
        let keys: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
        let start = std::time::Instant::now();
        for i in 0..n {
            let pick = up.pick(Some(&keys[i % keys.len()]), &[]).await.unwrap();
            std::hint::black_box(pick.addr);
        }
        let per_pick = start.elapsed() / n as u32;
        println!("{algorithm}: {per_pick:?} per pick (100 targets)");
    }
}

#[test]
fn continuum_hash_is_luaxxhash() {
    // luaxxhash's README (the library Kong's `consistent_hashing.lua` requires): its default
    // seed gives 1710037756 for this string.
    assert_eq!(
        xxhash_rust::xxh32::xxh32(b"Cats are interesting.", 0),
        1_710_037_756
    );
    assert_eq!(continuum_index("Cats are interesting.", 1000), 756);
}
