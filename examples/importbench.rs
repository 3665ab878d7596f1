//! Declarative import at scale (issue 13): a file of burst.yml's shapes (services with a
//! route and an ip-restriction plugin, upstreams with a target) posted to a control plane's
//! `POST /config`, on the default SQLite store (`synchronous=FULL`).
//!
//! First the real `deltaplane-cp serve` binary, as a child process: the import time and its
//! peak RSS growth against the file's size (the child's VmHWM, reset through
//! `/proc/<pid>/clear_refs` just before the import; the client here is another process, so
//! none of its memory counts). Then, in this process: a no-op re-import, a data plane that
//! was stopped before the import catching up with a delta, not a full sync, and the import's
//! phases by live heap (a counting allocator).
//!
//! `cargo build --release --bins --example importbench && target/release/examples/importbench
//! [groups]` (5 entities per group; default 6000 groups = 30,000 entities). Linux only (reads
//! `/proc/<pid>/status`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use deltaplane::cp::{self, CpConfig};
use deltaplane::dp::{self, DpConfig};

/// Counts the live heap bytes and their peak, to attribute memory to the import's phases
/// (RSS alone also counts what the allocator keeps after a free).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System::alloc`'s.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The live heap now; resets the heap peak to it.
fn heap_mark() -> usize {
    let live = LIVE.load(Ordering::Relaxed);
    PEAK.store(live, Ordering::Relaxed);
    live
}

/// `(peak since the mark, live now)`, both above `base`, in MiB.
fn heap_since(base: usize) -> (f64, f64) {
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let live = LIVE.load(Ordering::Relaxed).saturating_sub(base);
    (mib(peak as u64), mib(live as u64))
}

/// `n` groups of five entities, spelled as burst.yml spells them (its service, route,
/// upstream, target and ip-restriction plugin fields).
fn generated_file(n: usize) -> String {
    let mut out = String::from("_format_version: \"1.1\"\nservices:\n");
    for i in 0..n {
        out.push_str(&format!(
            "- connect_timeout: 60000\n  host: svc-{i}.4test-any.svc\n  name: 4test-any.svc-{i}.80\n  \
             path: /\n  port: 80\n  protocol: http\n  read_timeout: 60000\n  retries: 5\n  \
             write_timeout: 60000\n  routes:\n  - hosts:\n    - svc-{i}.example.test\n    \
             name: 4test-any.svc-{i}-ingress.00\n    paths:\n    - /svc/{i}\n    \
             preserve_host: true\n    protocols:\n    - http\n    - https\n    \
             regex_priority: 0\n    strip_path: true\n    https_redirect_status_code: 426\n  \
             plugins:\n  - name: ip-restriction\n    config:\n      allow:\n      - 10.0.0.0/8\n      \
             - 192.168.0.0/16\n    protocols:\n    - http\n    - https\n"
        ));
    }
    out.push_str("upstreams:\n");
    for i in 0..n {
        out.push_str(&format!(
            "- name: svc-{i}.4test-any.80.svc\n  algorithm: round-robin\n  slots: 10000\n  \
             targets:\n  - target: 10.{}.{}.{}:80\n    weight: 100\n",
            i / 62500,
            (i / 250) % 250,
            i % 250
        ));
    }
    out
}

/// A `kB` field of `/proc/self/status`, in bytes.
fn status_kb(field: &str) -> u64 {
    proc_status_kb("self", field)
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn proc_status_kb(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets VmHWM to the current RSS (Linux ≥ 4.0).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Posts the file; returns the status, `_deltaplane` and the elapsed time. The answer is read
/// in chunks and only its tail kept, so the client's copy does not count as the CP's memory.
async fn post(
    client: &reqwest::Client,
    base: &str,
    file: &str,
) -> anyhow::Result<(u16, serde_json::Value, Duration)> {
    let started = Instant::now();
    let mut resp = client
        .post(format!("{base}/config"))
        .header("content-type", "application/x-yaml")
        .body(file.to_owned())
        .send()
        .await?;
    let status = resp.status().as_u16();
    let mut tail: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        tail.extend_from_slice(&chunk);
        if tail.len() > 64 * 1024 {
            tail.drain(..tail.len() - 4096);
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&tail);
    let summary = text
        .rfind("\"_deltaplane\":")
        .and_then(|i| {
            let s = &text[i + "\"_deltaplane\":".len()..];
            serde_json::from_str::<serde_json::Value>(s.strip_suffix('}')?).ok()
        })
        .unwrap_or_else(|| serde_json::Value::String(text.chars().take(500).collect()));
    Ok((status, summary, elapsed))
}

/// The import into the real `deltaplane-cp` binary (next to this example), a child process.
async fn binary(file: &str) -> anyhow::Result<()> {
    use std::io::BufRead;
    let exe = std::env::current_exe()?;
    let cp_bin = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("deltaplane-cp"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "deltaplane-cp not found next to this example: run `cargo build --release --bins --example importbench` first"
            )
        })?;
    let dir = tempfile::tempdir()?;
    let mut child = std::process::Command::new(&cp_bin)
        .args(["serve", "--data-dir"])
        .arg(dir.path())
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--cluster-listen",
            "127.0.0.1:0",
        ])
        .args(["--sqlite-synchronous", "full"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id().to_string();
    let stdout = child.stdout.take().expect("piped");
    let base = tokio::task::spawn_blocking(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if let Some(url) = line?.strip_prefix("deltaplane-cp: Admin API on ") {
                return Ok(url.trim().to_owned());
            }
        }
        anyhow::bail!("deltaplane-cp exited before listening")
    });
    let base = match tokio::time::timeout(Duration::from_secs(60), base).await {
        Ok(started) => started??,
        Err(_) => {
            let _ = child.kill();
            anyhow::bail!("deltaplane-cp did not listen within 60 s");
        }
    };
    let client = reqwest::Client::new();
    client
        .get(format!("{base}/"))
        .send()
        .await?
        .error_for_status()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let size = file.len() as u64;
    let rss_before = proc_status_kb(&pid, "VmRSS:");
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")?;
    let (status, summary, elapsed) = post(&client, &base, file).await?;
    let peak = proc_status_kb(&pid, "VmHWM:");
    anyhow::ensure!(status == 201, "import answered {status}: {summary}");
    let growth = peak.saturating_sub(rss_before);
    println!(
        "deltaplane-cp binary: import {:.2} s; peak RSS growth {:.1} MiB = {:.1}x the file (RSS before {:.1} MiB)",
        elapsed.as_secs_f64(),
        mib(growth),
        growth as f64 / size as f64,
        mib(rss_before)
    );
    let (status, summary, elapsed) = post(&client, &base, file).await?;
    println!(
        "deltaplane-cp binary: re-import {status} in {:.2} s, {summary}",
        elapsed.as_secs_f64()
    );
    child.kill()?;
    child.wait()?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let groups: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(6000);
    {
        let file = generated_file(groups);
        println!(
            "file: {} entities, {:.1} MiB",
            groups * 5,
            mib(file.len() as u64)
        );
        binary(&file).await?;
    }
    println!("in this process (the client's memory counts here too):");
    let dir = tempfile::tempdir()?;
    let mut cfg = CpConfig::new(dir.path().join("cp"));
    cfg.admin_listen = "127.0.0.1:0".parse()?;
    cfg.cluster_listen = "127.0.0.1:0".parse()?;
    let cp = cp::start(cfg).await?;
    let base = format!("http://{}", cp.admin_addr);
    let client = reqwest::Client::new();

    // A data plane follows, then is stopped before the import.
    let (crt, key) = cp.cluster_cert_files.clone().expect("dev certificate");
    let mut dcfg = DpConfig::new(
        dir.path().join("dp"),
        cp.cluster_addr.to_string(),
        crt.display().to_string(),
        key.display().to_string(),
    );
    dcfg.status_listen = "127.0.0.1:0".parse()?;
    let head = cp.store.version_info().await.map_err(anyhow::Error::msg)?;
    let running = dp::start(dcfg.clone()).await?;
    let mut rx = running.shared.subscribe();
    tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|v| *v >= head.version)).await??;
    running.shutdown().await;

    let file = generated_file(groups);
    let size = file.len() as u64;
    let rss_before = status_kb("VmRSS:");
    let can_reset = reset_peak();
    let heap0 = heap_mark();
    let (status, summary, elapsed) = post(&client, &base, &file).await?;
    let peak = status_kb("VmHWM:");
    let (heap_peak, heap_held) = heap_since(heap0);
    anyhow::ensure!(status == 201, "import answered {status}: {summary}");
    let growth = peak.saturating_sub(rss_before);
    println!("import: {:.2} s, {summary}", elapsed.as_secs_f64());
    if can_reset {
        println!(
            "peak RSS growth during the import: {:.1} MiB = {:.1}x the file (RSS before {:.1} MiB)",
            mib(growth),
            growth as f64 / size as f64,
            mib(rss_before)
        );
        println!(
            "  heap: peak growth {heap_peak:.1} MiB = {:.1}x the file; held after the answer {heap_held:.1} MiB",
            heap_peak * 1024.0 * 1024.0 / size as f64
        );
    } else {
        println!(
            "VmHWM could not be reset; process peak {:.1} MiB (RSS before {:.1} MiB)",
            mib(peak),
            mib(rss_before)
        );
    }

    let (status, summary, elapsed) = post(&client, &base, &file).await?;
    println!(
        "re-import of the same file: {status} in {:.2} s, {summary}",
        elapsed.as_secs_f64()
    );

    // The data plane comes back one version behind: a delta.
    let head = cp.store.version_info().await.map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let running = dp::start(dcfg).await?;
    let mut rx = running.shared.subscribe();
    tokio::time::timeout(
        Duration::from_secs(120),
        rx.wait_for(|v| *v >= head.version),
    )
    .await??;
    let st = running.shared.status_json();
    let full_after = st["full_syncs"].as_u64().unwrap_or(0);
    let same_hash = running.shared.store.state().state_hash == head.state_hash;
    println!(
        "data plane caught up to version {} in {:.2} s: {} (full syncs since its restart: {full_after}), state hash {}",
        head.version,
        started.elapsed().as_secs_f64(),
        if full_after == 0 {
            "delta"
        } else {
            "FULL SYNC"
        },
        if same_hash { "equal" } else { "DIFFERENT" }
    );
    running.shutdown().await;
    cp.shutdown().await;
    // The reader alone, for scale (after the rest: the allocator keeps what it frees): its
    // peak while the file becomes a `Config`.
    {
        let rss = status_kb("VmRSS:");
        reset_peak();
        let started = Instant::now();
        let config = deltaplane::declarative::parse(
            deltaplane::schema::Registry::builtin(),
            file.as_bytes(),
            &deltaplane::declarative::ParseOptions { now: 0 },
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        let held = status_kb("VmRSS:").saturating_sub(rss);
        let peak = status_kb("VmHWM:").saturating_sub(rss);
        println!(
            "parse alone: {:.2} s, peak growth {:.1} MiB ({:.1}x), the Config holds {:.1} MiB",
            started.elapsed().as_secs_f64(),
            mib(peak),
            peak as f64 / size as f64,
            mib(held)
        );
        drop(config);
    }
    breakdown(&file, dir.path()).await
}

/// The import's phases on a fresh control plane, by live heap: the reader, the store's
/// import (the parsed file held), what stays after (the recent-versions window).
async fn breakdown(file: &str, dir: &std::path::Path) -> anyhow::Result<()> {
    let size = file.len() as f64;
    let x = |m: f64| m * 1024.0 * 1024.0 / size;
    let mut cfg = CpConfig::new(dir.join("cp2"));
    cfg.admin_listen = "127.0.0.1:0".parse()?;
    cfg.cluster_listen = "127.0.0.1:0".parse()?;
    let cp = cp::start(cfg).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    println!("phases (live heap above the idle control plane; x = times the file):");
    let base = heap_mark();
    let config = deltaplane::declarative::parse(
        cp.store.registry(),
        file.as_bytes(),
        &deltaplane::declarative::ParseOptions { now: 0 },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (p, h) = heap_since(base);
    println!(
        "  parse: peak {p:.1} MiB ({:.1}x), the Config holds {h:.1} MiB ({:.1}x)",
        x(p),
        x(h)
    );
    heap_mark();
    let outcome = cp
        .store
        .import(config, deltaplane::cp::store::ImportMode::Sync, false)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (p, h) = heap_since(base);
    println!(
        "  import (consuming the parsed file): peak {p:.1} MiB ({:.1}x), the outcome holds {h:.1} MiB ({:.1}x)",
        x(p),
        x(h)
    );
    drop(outcome);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, h) = heap_since(base);
    println!(
        "  after the import, nothing held by the caller: {h:.1} MiB ({:.1}x) (the recent-versions window)",
        x(h)
    );
    cp.shutdown().await;
    Ok(())
}
