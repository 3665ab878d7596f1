//! `/metrics` on both planes, scraped through the real listeners: the Admin API's (behind its
//! token) and the data plane's status listener. The exposition text is parsed into samples,
//! and the values must move with what the planes do.

use std::collections::BTreeMap;
use std::time::Duration;

use deltaplane::dp::SyncMode;
use reqwest::StatusCode;
use serde_json::json;

use crate::harness::{TestCp, TestDb, TestDp};

const TOKEN: &str = "m3trics";

/// The samples of one scrape: `name{k="v",…}` (labels sorted) → value.
#[derive(Debug)]
struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// Parses the Prometheus text format: comment lines skipped, every other line one sample.
    fn parse(text: &str) -> Scrape {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line.rsplit_once(' ').expect("a sample line has a value");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            };
            let key = match series.split_once('{') {
                None => series.to_owned(),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("labels end with }");
                    format!("{name}{{{}}}", sorted_labels(body).join(","))
                }
            };
            assert!(
                samples.insert(key.clone(), value).is_none(),
                "duplicate series {key}"
            );
        }
        Scrape(samples)
    }

    /// The value of `series` (labels in any order), if present.
    fn get(&self, series: &str) -> Option<f64> {
        let key = match series.split_once('{') {
            None => series.to_owned(),
            Some((name, rest)) => format!(
                "{name}{{{}}}",
                sorted_labels(rest.strip_suffix('}').unwrap()).join(",")
            ),
        };
        self.0.get(&key).copied()
    }

    #[track_caller]
    fn value(&self, series: &str) -> f64 {
        self.get(series)
            .unwrap_or_else(|| panic!("no series {series} in the scrape:\n{:#?}", self.0))
    }

    /// Series of metric `name` whose labels include `label` (`k="v"`).
    fn with_label(&self, name: &str, label: &str) -> Vec<(&str, f64)> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{")) && k.contains(label))
            .map(|(k, v)| (k.as_str(), *v))
            .collect()
    }
}

/// `k="v"` pairs of a label body, split on the commas between pairs (values may hold commas).
fn sorted_labels(body: &str) -> Vec<String> {
    let mut pairs = Vec::new();
    let mut cur = String::new();
    let mut in_value = false;
    let mut escaped = false;
    for c in body.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_value => escaped = true,
            '"' => in_value = !in_value,
            ',' if !in_value => {
                pairs.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    if !cur.is_empty() {
        pairs.push(cur);
    }
    pairs.sort();
    pairs
}

async fn get(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    accept: Option<&str>,
) -> reqwest::Response {
    let mut req = client.get(url);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(a) = accept {
        req = req.header(reqwest::header::ACCEPT, a);
    }
    req.send().await.expect("scrape sent")
}

/// Scrapes `url` and parses it (Prometheus text format, checked by its content type).
async fn scrape(client: &reqwest::Client, url: &str, token: Option<&str>) -> Scrape {
    let r = get(client, url, token, None).await;
    assert_eq!(r.status(), StatusCode::OK, "{url}");
    let ct = r.headers()[reqwest::header::CONTENT_TYPE]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(ct, "text/plain; version=0.0.4; charset=utf-8");
    Scrape::parse(&r.text().await.unwrap())
}

/// Scrapes until `ok` holds; panics with the last scrape after `secs`.
async fn scrape_until(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    secs: u64,
    ok: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let s = scrape(client, url, token).await;
        if ok(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {secs}s; last scrape:\n{:#?}",
            s.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn token_cp() -> TestCp {
    let db = TestDb::sqlite();
    let mut cfg = db.cp_config();
    cfg.admin_token = Some(TOKEN.into());
    TestCp::start_with(db, cfg).await
}

async fn create_service(cp: &TestCp, name: &str) {
    let r = cp
        .client
        .post(format!("{}/services", cp.base))
        .bearer_auth(TOKEN)
        .json(&json!({"name": name, "url": "http://example.com"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_metrics_need_the_token_and_follow_writes_and_data_planes() {
    let cp = token_cp().await;
    let url = format!("{}/metrics", cp.base);
    let c = &cp.client;
    assert_eq!(
        get(c, &url, None, None).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        get(c, &url, Some("wrong"), None).await.status(),
        StatusCode::UNAUTHORIZED
    );

    let before = scrape(c, &url, Some(TOKEN)).await;
    let (head, _) = cp.head().await;
    assert_eq!(before.value("deltaplane_head_version"), head as f64);
    assert_eq!(before.value("kong_datastore_reachable"), 1.0);
    let node = &cp.running().node_id;
    assert_eq!(
        before.value(&format!(
            "kong_node_info{{node_id=\"{node}\",version=\"{}\"}}",
            cp.db.cp_config().kong_compat_version
        )),
        1.0
    );
    for state in ["in_sync", "behind", "failing", "incompatible"] {
        assert_eq!(
            before.value(&format!(
                "deltaplane_data_planes_connected{{protocol=\"v2\",state=\"{state}\"}}"
            )),
            0.0
        );
    }
    // Listed with the Admin API's paths, as Kong lists its prometheus plugin's.
    let r = get(c, &format!("{}/endpoints", cp.base), Some(TOKEN), None).await;
    let listed: serde_json::Value = r.json().await.unwrap();
    assert!(
        listed["data"]
            .as_array()
            .unwrap()
            .contains(&json!("/metrics")),
        "{listed}"
    );
    let tls_refused = "deltaplane_handshakes_refused_total{reason=\"tls\"}";
    assert_eq!(before.value(tls_refused), 0.0);

    create_service(&cp, "one").await;
    let after = scrape(c, &url, Some(TOKEN)).await;
    let (head, _) = cp.head().await;
    assert!(head > before.value("deltaplane_head_version") as i64);
    assert_eq!(after.value("deltaplane_head_version"), head as f64);

    // A data plane connects and catches up: counted as connected and in sync, listed with
    // Kong's per-data-plane gauges.
    let dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let in_sync = "deltaplane_data_planes_connected{protocol=\"v2\",state=\"in_sync\"}";
    let s = scrape_until(c, &url, Some(TOKEN), 20, |s| s.get(in_sync) == Some(1.0)).await;
    let dp_node = &dp.shared().node_id;
    let seen = s.with_label(
        "kong_data_plane_last_seen",
        &format!("node_id=\"{dp_node}\""),
    );
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!((seen[0].1 - now_secs()).abs() < 60.0, "{seen:?}");
    let compatible = s.with_label(
        "kong_data_plane_version_compatible",
        &format!("node_id=\"{dp_node}\""),
    );
    assert_eq!(compatible.len(), 1, "{compatible:?}");
    assert_eq!(compatible[0].1, 1.0);
    // Over sync v2 the config hash is a version string, not a number: no sample, as Kong.
    assert!(
        s.with_label(
            "kong_data_plane_config_hash",
            &format!("node_id=\"{dp_node}\"")
        )
        .is_empty()
    );

    // A connection without TLS is refused in the handshake, and counted.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut tcp = tokio::net::TcpStream::connect(cp.running().cluster_addr)
            .await
            .unwrap();
        tcp.write_all(b"GET /v2/outlet HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let _ = tcp.shutdown().await;
    }
    scrape_until(c, &url, Some(TOKEN), 10, |s| {
        s.get(tls_refused) == Some(1.0)
    })
    .await;
    cp.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_metrics_follow_the_applied_version() {
    let cp = token_cp().await;
    create_service(&cp, "one").await;
    let dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let c = reqwest::Client::new();
    let url = format!("http://{}/metrics", dp.dp.as_ref().unwrap().status_addr);
    let (head, _) = cp.head().await;
    let s = scrape(&c, &url, None).await;
    assert_eq!(s.value("deltaplane_applied_version"), head as f64);
    assert_eq!(s.value("kong_control_plane_connected"), 1.0);
    assert_eq!(s.value("kong_datastore_reachable"), 1.0);
    assert!(s.value("deltaplane_full_syncs_total") >= 1.0);
    // The per-run certificate is valid now and expires later.
    assert!(s.value("kong_data_plane_cluster_cert_expiry_timestamp") > now_secs());
    let node = &dp.shared().node_id;
    assert_eq!(
        s.with_label("kong_node_info", &format!("node_id=\"{node}\""))
            .len(),
        1
    );

    create_service(&cp, "two").await;
    let (head2, _) = cp.head().await;
    assert!(head2 > head);
    dp.wait_version(head2, 20).await;
    let s = scrape(&c, &url, None).await;
    assert_eq!(s.value("deltaplane_applied_version"), head2 as f64);

    // OpenMetrics when the scraper asks for it (Prometheus does), ending with `# EOF`.
    let r = get(
        &c,
        &url,
        None,
        Some("application/openmetrics-text;version=1.0.0"),
    )
    .await;
    assert_eq!(
        r.headers()[reqwest::header::CONTENT_TYPE],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = r.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains(&format!("\ndeltaplane_applied_version {head2}\n")));
    cp.shutdown().await;
}

/// Sync v1, whose sessions this module's owners instrument end to end: a push is a full sync
/// in gzip bytes on the control plane, and an apply with its durations on the data plane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_pushes_and_applies_are_measured() {
    let cp = token_cp().await;
    create_service(&cp, "one").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = cp.dp_config(dir.path());
    cfg.sync = SyncMode::V1;
    let dp = TestDp::start(cfg, dir).await;
    dp.converge(&cp, 20).await;

    let cp_url = format!("{}/metrics", cp.base);
    let c = &cp.client;
    let s = scrape_until(c, &cp_url, Some(TOKEN), 20, |s| {
        s.get("deltaplane_data_planes_connected{protocol=\"v1\",state=\"in_sync\"}") == Some(1.0)
    })
    .await;
    assert!(s.value("deltaplane_full_syncs_total{protocol=\"v1\"}") >= 1.0);
    assert!(s.value("deltaplane_sent_bytes_total{encoding=\"gzip-v1\"}") > 0.0);
    assert!(s.value("deltaplane_v1_exports_total") >= 1.0);
    // A v1 data plane reports Kong's md5 config hash: a number here, as Kong's exporter.
    let node = &dp.shared().node_id;
    let hash = s.with_label(
        "kong_data_plane_config_hash",
        &format!("node_id=\"{node}\""),
    );
    assert_eq!(hash.len(), 1, "{hash:?}");
    assert!(hash[0].1 > 0.0);

    let dp_url = format!("http://{}/metrics", dp.dp.as_ref().unwrap().status_addr);
    let before = scrape(c, &dp_url, None).await;
    let applies = "deltaplane_apply_duration_seconds_count{kind=\"full\"}";
    let learned = "deltaplane_version_learned_to_applied_seconds_count";
    assert!(before.value(applies) >= 1.0);
    assert!(before.value(learned) >= 1.0);
    create_service(&cp, "two").await;
    dp.converge(&cp, 20).await;
    let after = scrape(c, &dp_url, None).await;
    assert!(after.value(applies) > before.value(applies));
    assert!(after.value(learned) > before.value(learned));
    assert!(
        after.value("deltaplane_apply_duration_seconds_sum{kind=\"full\"}")
            > before.value("deltaplane_apply_duration_seconds_sum{kind=\"full\"}")
    );
    cp.shutdown().await;
}

/// Sync v2 with pushes: the control plane counts pushed versions and the bytes it sent; the
/// data plane measures each pushed apply and the time from learning of a version to applying.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v2_pushes_and_applies_are_measured() {
    let cp = token_cp().await;
    create_service(&cp, "one").await;
    let dp = cp.start_dp().await;
    dp.converge(&cp, 20).await;
    let c = &cp.client;
    let cp_url = format!("{}/metrics", cp.base);
    let dp_url = format!("http://{}/metrics", dp.dp.as_ref().unwrap().status_addr);
    let pushed = "deltaplane_delta_messages_total{how=\"pushed\"}";
    let applies = "deltaplane_apply_duration_seconds_count{kind=\"incremental\"}";
    let learned = "deltaplane_version_learned_to_applied_seconds_count";
    let cp_before = scrape(c, &cp_url, Some(TOKEN)).await;
    let dp_before = scrape(c, &dp_url, None).await;
    for i in 0..5 {
        create_service(&cp, &format!("pushed{i}")).await;
        let (v, _) = cp.head().await;
        dp.wait_version(v, 20).await;
    }
    dp.converge(&cp, 20).await;
    let cp_after = scrape(c, &cp_url, Some(TOKEN)).await;
    let dp_after = scrape(c, &dp_url, None).await;
    assert!(
        cp_after.value(pushed) >= cp_before.value(pushed) + 3.0,
        "{} → {}",
        cp_before.value(pushed),
        cp_after.value(pushed)
    );
    assert!(
        cp_after.value("deltaplane_sent_bytes_total{encoding=\"zstd\"}")
            > cp_before.value("deltaplane_sent_bytes_total{encoding=\"zstd\"}")
    );
    assert!(dp_after.value(applies) >= dp_before.value(applies) + 3.0);
    assert!(dp_after.value(learned) >= dp_before.value(learned) + 3.0);
    let written = "deltaplane_fan_out_written_seconds_count";
    assert!(
        cp_after.value(written) >= cp_before.value(written) + 3.0,
        "{} → {}",
        cp_before.value(written),
        cp_after.value(written)
    );
    cp.shutdown().await;
}
