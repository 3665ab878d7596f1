//! The etcd peer of the `latency` scenario: a real `etcd` process (single member, its own temp
//! data dir, default durability: the WAL is fsynced before a put is acknowledged), spoken to over
//! the JSON gRPC gateway that etcd 3.4+ serves on its client port (`/v3/kv/put`, and `/v3/watch`
//! streaming one JSON message per line), so the harness needs no gRPC stack.
//!
//! The gateway is part of the etcd process: every put and every watch stream crosses it, as a
//! loopback gRPC hop inside etcd. That costs etcd a little latency and CPU compared with a native
//! gRPC client, which is the conservative side for a comparison against deltaplane.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{AbortOnDrop, Procs, free_ports};

/// What one watcher saw: `(watcher, mod_revision, arrival)`, or its stream ending.
enum Watched {
    Created,
    Event(usize, i64, Instant),
    Closed(usize, String),
}

pub struct Etcd {
    pub pid: u32,
    base: String,
    /// Puts: one pooled keep-alive connection.
    http: reqwest::Client,
    prefix: String,
    watchers: usize,
    rx: Option<mpsc::UnboundedReceiver<Watched>>,
    _tasks: AbortOnDrop,
}

/// `etcd --version`'s first line, or why it cannot run.
pub fn probe(bin: &Path) -> Result<String, String> {
    match Command::new(bin).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()
            .unwrap_or("")
            .trim()
            .to_owned()),
        Ok(o) => Err(format!(
            "`{} --version` failed ({}): {}",
            bin.display(),
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run `{}`: {e}", bin.display())),
    }
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

/// The etcd range end of a prefix: the prefix with its last byte incremented.
fn prefix_end(prefix: &str) -> String {
    let mut b = prefix.as_bytes().to_vec();
    let last = b.last_mut().expect("non-empty prefix");
    *last += 1;
    B64.encode(b)
}

/// grpc-gateway writes int64 fields as JSON strings.
fn int64(v: &Value) -> Option<i64> {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or_else(|| v.as_i64())
}

impl Etcd {
    /// Starts etcd in `dir` on free loopback ports and waits for `/health`.
    pub async fn start(
        bin: &Path,
        procs: &mut Procs,
        dir: &Path,
        log: &Path,
    ) -> anyhow::Result<Etcd> {
        let ports = free_ports(2)?;
        let client = format!("http://127.0.0.1:{}", ports[0]);
        let peer = format!("http://127.0.0.1:{}", ports[1]);
        let mut cmd = Command::new(bin);
        cmd.args(["--name", "lt", "--data-dir"])
            .arg(dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("lt={peer}")])
            .args(["--initial-cluster-state", "new"]);
        // No ETCD_* setting from the caller's environment leaks in.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(k);
            }
        }
        let pid = procs.spawn("etcd", cmd, log)?;
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .http1_only()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            procs.check_alive()?;
            let healthy = match http.get(format!("{client}/health")).send().await {
                Ok(r) if r.status().is_success() => {
                    r.json::<Value>().await.is_ok_and(|v| v["health"] == "true")
                }
                _ => false,
            };
            if healthy {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "etcd did not become healthy in 60 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Etcd {
            pid,
            base: client,
            http,
            prefix: "/loadtest/".to_owned(),
            watchers: 0,
            rx: None,
            _tasks: AbortOnDrop(Vec::new()),
        })
    }

    /// Opens `n` watch streams on the key prefix, each on its own HTTP connection, and waits
    /// until etcd confirmed every one.
    pub async fn watch(&mut self, n: usize) -> anyhow::Result<()> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            // A client per watcher: one connection per stream, like one etcd client each.
            let http = reqwest::Client::builder()
                .tcp_nodelay(true)
                .http1_only()
                .build()?;
            let body = json!({"create_request": {
                "key": b64(&self.prefix),
                "range_end": prefix_end(&self.prefix),
            }});
            let url = format!("{}/v3/watch", self.base);
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                let why = match watch_stream(i, &http, &url, &body, &tx).await {
                    Ok(()) => "end of stream".to_owned(),
                    Err(e) => format!("{e:#}"),
                };
                let _ = tx.send(Watched::Closed(i, why));
            }));
        }
        drop(tx);
        self._tasks = AbortOnDrop(tasks);
        let mut created = 0;
        while created < n {
            match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                Ok(Some(Watched::Created)) => created += 1,
                Ok(Some(Watched::Event(..))) => {}
                Ok(Some(Watched::Closed(i, why))) => bail!("etcd watcher {i}: {why}"),
                Ok(None) | Err(_) => bail!("only {created} of {n} etcd watches created"),
            }
        }
        self.watchers = n;
        self.rx = Some(rx);
        Ok(())
    }

    /// One put of `key` (under the prefix) = `value`; returns the time from just before the
    /// put was sent to each watcher's event (in watcher order) and the put's own round trip.
    pub async fn put(
        &mut self,
        key: &str,
        value: &str,
        timeout: Duration,
    ) -> anyhow::Result<(Vec<Duration>, Duration)> {
        let body = json!({"key": b64(&format!("{}{key}", self.prefix)), "value": b64(value)});
        let url = format!("{}/v3/kv/put", self.base);
        let t0 = Instant::now();
        let r = self.http.post(&url).json(&body).send().await?;
        let status = r.status();
        let text = r.text().await?;
        let t_put = t0.elapsed();
        ensure!(status.is_success(), "etcd put answered {status}: {text}");
        let v: Value = serde_json::from_str(&text).context("etcd put answer")?;
        let rev = int64(&v["header"]["revision"]).context("etcd put answer: header.revision")?;
        let n = self.watchers;
        let rx = self.rx.as_mut().context("etcd: watch first")?;
        let mut arrived: Vec<Option<Duration>> = vec![None; n];
        let mut left = n;
        let deadline = tokio::time::Instant::now() + timeout;
        while left > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Watched::Event(i, r, at))) => {
                    ensure!(
                        r <= rev,
                        "etcd watcher {i} saw revision {r} after the put of {rev}: another writer?"
                    );
                    if r == rev && arrived[i].is_none() {
                        arrived[i] = Some(at.saturating_duration_since(t0));
                        left -= 1;
                    }
                }
                Ok(Some(Watched::Created)) => {}
                Ok(Some(Watched::Closed(i, why))) => bail!("etcd watcher {i}: {why}"),
                Ok(None) => bail!("all etcd watchers gone"),
                Err(_) => bail!(
                    "etcd revision {rev}: {left} of {n} watchers did not see it within {timeout:?}"
                ),
            }
        }
        Ok((arrived.into_iter().map(Option::unwrap).collect(), t_put))
    }
}

/// Reads one `/v3/watch` stream: newline-delimited `{"result": WatchResponse}` messages, each
/// stamped when its last chunk arrived.
async fn watch_stream(
    i: usize,
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    tx: &mpsc::UnboundedSender<Watched>,
) -> anyhow::Result<()> {
    let mut r = http.post(url).json(body).send().await?;
    ensure!(r.status().is_success(), "watch answered {}", r.status());
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = r.chunk().await? {
        let at = Instant::now();
        buf.extend_from_slice(&chunk);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let v: Value = serde_json::from_slice(&line).context("watch message")?;
            if let Some(e) = v.get("error") {
                bail!("watch error: {e}");
            }
            let res = &v["result"];
            if res["created"] == true {
                let _ = tx.send(Watched::Created);
            }
            if res["canceled"] == true {
                bail!("watch canceled: {res}");
            }
            if let Some(events) = res["events"].as_array() {
                for ev in events {
                    if let Some(rev) = int64(&ev["kv"]["mod_revision"]) {
                        let _ = tx.send(Watched::Event(i, rev, at));
                    }
                }
            }
        }
    }
    Ok(())
}
