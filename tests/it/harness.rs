//! In-process control planes on port 0 with temporary SQLite files or fresh PostgreSQL
#![allow(dead_code)]
//! databases, and a small JSON HTTP client.

use std::io::Write as _;
use std::sync::Once;
use std::time::Duration;

use deltaplane::dp::{DpConfig, DpShared, RunningDp};
use deltaplane::settings::ClusterSettings;

use deltaplane::cp::store::{Store, StoreOptions};
use deltaplane::cp::{self, CpConfig, RunningCp};
use reqwest::StatusCode;
use serde_json::Value;

pub const PG_ENV: &str = "DELTAPLANE_TEST_PG_URL";

/// A throwaway database: a SQLite file in a temp dir, or a PostgreSQL database dropped on drop.
pub struct TestDb {
    pub url: String,
    pub dir: tempfile::TempDir,
    pub pg: Option<(String, String)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

fn note_pg_skipped() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Straight to the process's stderr, past libtest's output capture, so it is always seen.
        let _ = writeln!(
            std::io::stderr(),
            "\n*** NOTE: the PostgreSQL suite did NOT run: set {PG_ENV}=postgres://postgres@127.0.0.1:5432/test to run it ***\n"
        );
    });
}

impl TestDb {
    pub async fn new(backend: Backend) -> Option<TestDb> {
        match backend {
            Backend::Sqlite => Some(TestDb::sqlite()),
            Backend::Postgres => TestDb::postgres().await,
        }
    }

    pub fn sqlite() -> TestDb {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}", dir.path().join("cp.db").display());
        TestDb { url, dir, pg: None }
    }

    /// A fresh database on the server named by `DELTAPLANE_TEST_PG_URL`, or `None` when unset.
    /// Panics when the variable is set and the server is unreachable: CI must not skip.
    pub async fn postgres() -> Option<TestDb> {
        let Ok(admin_url) = std::env::var(PG_ENV) else {
            note_pg_skipped();
            return None;
        };
        let name = format!("deltaplane_test_{}", uuid::Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin_url).await.unwrap_or_else(|e| {
            panic!("{PG_ENV} is set but PostgreSQL is unreachable at {admin_url}: {e}")
        });
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        let base = admin_url
            .rsplit_once('/')
            .map(|(b, _)| b.to_owned())
            .unwrap_or(admin_url.clone());
        let url = format!("{base}/{name}");
        Some(TestDb {
            url,
            dir: tempfile::tempdir().expect("temp dir"),
            pg: Some((admin_url, name)),
        })
    }

    pub fn store_options(&self) -> StoreOptions {
        let mut o = StoreOptions::new(self.url.clone());
        // Tests favour speed over power-loss durability.
        o.sqlite_synchronous_full = false;
        o
    }

    pub async fn store(&self) -> Store {
        Store::open(self.store_options()).await.expect("open store")
    }

    pub fn cp_config(&self) -> CpConfig {
        let mut cfg = CpConfig::new(self.dir.path().join("cp"));
        if self.pg.is_some() {
            cfg.database_url = Some(self.url.clone());
        }
        cfg.sqlite_synchronous_full = false;
        cfg.admin_listen = "127.0.0.1:0".parse().unwrap();
        cfg.cluster_listen = "127.0.0.1:0".parse().unwrap();
        short_timers(&mut cfg.cluster);
        cfg
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some((admin_url, name)) = self.pg.take() else {
            return;
        };
        // Drop runs outside async context; use a private runtime on a plain thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&admin_url).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&pool)
                    .await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// Runs an async test body once per backend: `both_backends!(name, |backend| async move { .. })`.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                ($body)($crate::harness::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                ($body)($crate::harness::Backend::Postgres).await
            }
        }
    };
}

/// A running control plane plus a client for its Admin API.
pub struct TestCp {
    pub cp: Option<RunningCp>,
    pub base: String,
    pub client: reqwest::Client,
    pub db: TestDb,
}

pub struct Resp {
    pub status: StatusCode,
    pub body: Value,
    pub headers: reqwest::header::HeaderMap,
}

impl std::fmt::Debug for Resp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status, self.body)
    }
}

impl TestCp {
    /// Starts a CP on a fresh database of `backend`; `None` when that backend is not available.
    pub async fn start(backend: Backend) -> Option<TestCp> {
        let db = TestDb::new(backend).await?;
        let cfg = db.cp_config();
        Some(TestCp::start_with(db, cfg).await)
    }

    pub async fn start_with(db: TestDb, cfg: CpConfig) -> TestCp {
        let cp = cp::start(cfg).await.expect("start control plane");
        let base = format!("http://{}", cp.admin_addr);
        TestCp {
            cp: Some(cp),
            base,
            client: reqwest::Client::new(),
            db,
        }
    }

    pub fn store(&self) -> &Store {
        &self.cp.as_ref().expect("running").store
    }

    pub async fn request(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Resp {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(b) = body {
            req = req.json(&b);
        }
        Self::finish(req).await
    }

    pub async fn raw(
        &self,
        method: reqwest::Method,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> Resp {
        let req = self
            .client
            .request(method, format!("{}{}", self.base, path))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(body);
        Self::finish(req).await
    }

    async fn finish(req: reqwest::RequestBuilder) -> Resp {
        let resp = req.send().await.expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Resp {
            status,
            body,
            headers,
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request(reqwest::Method::GET, path, None).await
    }
    pub async fn post(&self, path: &str, body: Value) -> Resp {
        self.request(reqwest::Method::POST, path, Some(body)).await
    }
    pub async fn put(&self, path: &str, body: Value) -> Resp {
        self.request(reqwest::Method::PUT, path, Some(body)).await
    }
    pub async fn patch(&self, path: &str, body: Value) -> Resp {
        self.request(reqwest::Method::PATCH, path, Some(body)).await
    }
    pub async fn delete(&self, path: &str) -> Resp {
        self.request(reqwest::Method::DELETE, path, None).await
    }
    pub async fn post_form(&self, path: &str, form: &str) -> Resp {
        self.raw(
            reqwest::Method::POST,
            path,
            "application/x-www-form-urlencoded",
            form.to_owned(),
        )
        .await
    }

    /// Sends a `multipart/form-data` body as `curl -F` builds it: each part is
    /// `(name, file name, value)`, a file part when a file name is given.
    pub async fn multipart(
        &self,
        method: reqwest::Method,
        path: &str,
        parts: &[(&str, Option<&str>, &str)],
    ) -> Resp {
        let boundary = "------------------------deltaplane7d3c1e";
        let mut body = String::new();
        for (name, file, value) in parts {
            body.push_str(&format!("--{boundary}\r\n"));
            match file {
                Some(file) => body.push_str(&format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{file}\"\r\n\
                     Content-Type: application/octet-stream\r\n\r\n"
                )),
                None => body.push_str(&format!(
                    "Content-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                )),
            }
            body.push_str(value);
            body.push_str("\r\n");
        }
        body.push_str(&format!("--{boundary}--\r\n"));
        let content_type = format!("multipart/form-data; boundary={boundary}");
        self.raw(method, path, &content_type, body).await
    }

    /// POSTs and asserts 201, returning the entity.
    pub async fn create(&self, path: &str, body: Value) -> Value {
        let r = self.post(path, body).await;
        assert_eq!(r.status, StatusCode::CREATED, "POST {path}: {r:?}");
        r.body
    }

    pub async fn shutdown(mut self) {
        if let Some(cp) = self.cp.take() {
            cp.shutdown().await;
        }
    }
}

/// A TCP port that was free a moment ago (for processes that need a fixed address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A test data plane's settings for the control plane at `addr` (with its shared certificate
/// files), data under `dir`: status on port 0, not durable, short back-offs and timers.
pub fn test_dp_config(dir: &std::path::Path, addr: String, crt: String, key: String) -> DpConfig {
    let mut cfg = DpConfig::new(dir, addr, crt, key);
    cfg.status_listen = "127.0.0.1:0".parse().unwrap();
    cfg.durable = false;
    cfg.reconnect_min = Duration::from_millis(50);
    cfg.reconnect_max = Duration::from_millis(500);
    cfg.invalid_backoff = Duration::from_millis(300);
    short_timers(&mut cfg.cluster);
    cfg
}

/// Timers short enough for tests, long enough for a loaded 2-core machine.
pub fn short_timers(c: &mut ClusterSettings) {
    c.ping_interval = Duration::from_secs(2);
    c.idle_timeout = Duration::from_secs(6);
    c.write_timeout = Duration::from_secs(3);
    c.call_timeout = Duration::from_secs(10);
    c.handshake_timeout = Duration::from_secs(5);
}

impl TestCp {
    pub fn running(&self) -> &RunningCp {
        self.cp.as_ref().expect("running")
    }

    /// The cluster address and the shared certificate files data planes need.
    pub fn cluster_target(&self) -> (String, String, String) {
        let cp = self.running();
        let (crt, key) = cp.cluster_cert_files.clone().expect("dev certificate");
        (
            cp.cluster_addr.to_string(),
            crt.display().to_string(),
            key.display().to_string(),
        )
    }

    /// A data-plane configuration pointing at this control plane, data under `dir`.
    pub fn dp_config(&self, dir: &std::path::Path) -> DpConfig {
        let (addr, crt, key) = self.cluster_target();
        test_dp_config(dir, addr, crt, key)
    }

    /// Starts a data plane in a fresh temp dir.
    pub async fn start_dp(&self) -> TestDp {
        let dir = tempfile::tempdir().expect("temp dir");
        let cfg = self.dp_config(dir.path());
        TestDp::start(cfg, dir).await
    }

    /// Starts a data plane running the proxy on a loopback port of its own.
    pub async fn start_proxy_dp(&self) -> TestDp {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cfg = self.dp_config(dir.path());
        cfg.proxy_listen = Some("127.0.0.1:0".parse().unwrap());
        TestDp::start(cfg, dir).await
    }

    /// The control plane's (version, state hash).
    pub async fn head(&self) -> (i64, String) {
        let info = self.store().version_info().await.expect("version info");
        (info.version, info.state_hash.to_hex())
    }
}

/// A data plane running in-process.
pub struct TestDp {
    pub dp: Option<RunningDp>,
    /// (version, state hash) when last stopped.
    stopped_at: (i64, String),
    pub cfg: DpConfig,
    pub dir: tempfile::TempDir,
}

impl TestDp {
    pub async fn start(cfg: DpConfig, dir: tempfile::TempDir) -> TestDp {
        let dp = deltaplane::dp::start(cfg.clone())
            .await
            .expect("start data plane");
        TestDp {
            dp: Some(dp),
            stopped_at: (0, String::new()),
            cfg,
            dir,
        }
    }

    pub fn shared(&self) -> &std::sync::Arc<DpShared> {
        &self.dp.as_ref().expect("running").shared
    }

    /// (version, state hash) as stored (as of the stop while stopped).
    pub fn state(&self) -> (i64, String) {
        match &self.dp {
            Some(dp) => {
                let s = dp.shared.store.state();
                (s.version, s.state_hash.to_hex())
            }
            None => self.stopped_at.clone(),
        }
    }

    /// Waits until the data plane has applied at least `version`; panics after `secs`.
    pub async fn wait_version(&self, version: i64, secs: u64) {
        let mut rx = self.shared().subscribe();
        let r =
            tokio::time::timeout(Duration::from_secs(secs), rx.wait_for(|v| *v >= version)).await;
        assert!(
            r.is_ok(),
            "data plane stuck at {:?}, wanted version {version}; status {}",
            self.state(),
            self.shared().status_json()
        );
    }

    /// `http://<proxy listener>` of a data plane started with the proxy on.
    pub fn proxy_url(&self) -> String {
        let addr = self
            .dp
            .as_ref()
            .expect("running")
            .proxy_addr
            .expect("the proxy is on");
        format!("http://{addr}")
    }

    /// Waits until the proxy serves the control plane's head version (the store applied it,
    /// and the proxy rebuilt from it); panics after `secs`.
    pub async fn wait_serving(&self, cp: &TestCp, secs: u64) -> i64 {
        let (v, _) = cp.head().await;
        let mut rx = self
            .shared()
            .proxy()
            .expect("the proxy is on")
            .watch_serving();
        let r = tokio::time::timeout(Duration::from_secs(secs), rx.wait_for(|s| *s >= v)).await;
        assert!(
            r.is_ok(),
            "proxy stuck; wanted version {v}; status {}",
            self.shared().status_json()
        );
        v
    }

    /// Waits until the data plane equals the control plane's head: same version, same hash.
    pub async fn converge(&self, cp: &TestCp, secs: u64) {
        let (v, hash) = cp.head().await;
        self.wait_version(v, secs).await;
        assert_eq!(
            self.state(),
            (v, hash.clone()),
            "data plane diverged from the control plane"
        );
        let recomputed = self.shared().store.compute_state_hash().unwrap().to_hex();
        assert_eq!(
            recomputed, hash,
            "stored entities do not hash to the recorded state hash"
        );
    }

    pub async fn stop(&mut self) {
        self.stopped_at = self.state();
        if let Some(dp) = self.dp.take() {
            dp.shutdown().await;
        }
    }

    /// Stops and starts again on the same data dir.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.dp = Some(
            deltaplane::dp::start(self.cfg.clone())
                .await
                .expect("restart data plane"),
        );
    }
}

/// A test certificate and key (self-signed, ECDSA P-256) for `cn`.
pub fn cert_and_key(cn: &str) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![cn.to_owned()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// A self-signed CA certificate.
pub fn ca_cert(cn: &str) -> String {
    Ca::new(cn).pem
}

/// A date: (year, month, day).
pub type Ymd = (i32, u8, u8);

/// A self-signed certificate authority that issues leaf certificates (pki mode).
pub struct Ca {
    params: rcgen::CertificateParams,
    key: rcgen::KeyPair,
    pub pem: String,
}

impl Ca {
    pub fn new(cn: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    /// (cert PEM, key PEM) for `name`, for a server or a client.
    pub fn issue(&self, name: &str, usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
        self.issue_valid(name, usage, None)
    }

    /// Issues a certificate, valid `(from, until)` (year, month, day) when given.
    pub fn issue_valid(
        &self,
        name: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
        validity: Option<(Ymd, Ymd)>,
    ) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        if let Some(((y0, m0, d0), (y1, m1, d1))) = validity {
            params.not_before = rcgen::date_time_ymd(y0, m0, d0);
            params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        }
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}
