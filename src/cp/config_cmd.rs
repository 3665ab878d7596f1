//! `deltaplane-cp config import|export|validate`: declarative files from the command line.
//!
//! Import and export go through a running control plane's Admin API (`/config`), so the
//! control plane that writes also notifies its data planes. When no control plane answers at
//! the Admin URL they open the database themselves, with one rule for the embedded SQLite
//! database: a running control plane holds an advisory lock on `deltaplane-cp.lock` in its
//! data directory ([`DataDirLock`]), and the command refuses to touch a data directory whose
//! lock is held (that control plane would not learn of the new version: SQLite has no
//! notifications). On PostgreSQL the direct path is always allowed: the import takes the
//! same version lock as every writer, and every control plane sharing the database hears of
//! the version through `pg_notify`.

use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::Path;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::Value;

use super::CpConfig;
use super::config::{ConfigCommand, ConfigTarget};
use super::store::{ImportMode, ImportOutcome, Store, StoreError};
use crate::declarative::{self, OutputFormat, ParseOptions, WriteOptions};
use crate::schema::Registry;

/// An exclusive advisory lock (`flock`) on `deltaplane-cp.lock` in a data directory, held
/// while the value lives.
pub struct DataDirLock {
    _file: std::fs::File,
}

/// The lock file's name in the data directory.
pub const LOCK_FILE: &str = "deltaplane-cp.lock";

impl DataDirLock {
    /// Takes the lock without waiting; `Ok(None)` when another process (or another open of
    /// the file in this one) holds it.
    pub fn try_acquire(data_dir: &Path) -> std::io::Result<Option<DataDirLock>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(data_dir.join(LOCK_FILE))?;
        // SAFETY: flock on a file descriptor this function owns.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(Some(DataDirLock { _file: file }));
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(None)
        } else {
            Err(e)
        }
    }
}

/// Runs a `config` subcommand.
pub async fn run(command: ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Validate { file } => validate(&file),
        ConfigCommand::Import {
            file,
            upsert,
            dry_run,
            target,
        } => import(&file, upsert, dry_run, &target).await,
        ConfigCommand::Export {
            file,
            format,
            nested,
            force,
            target,
        } => {
            let format = match format.to_ascii_lowercase().as_str() {
                "yaml" | "yml" => OutputFormat::Yaml,
                "json" => OutputFormat::Json,
                other => bail!("--format must be yaml or json, not '{other}'"),
            };
            export(
                file.as_deref(),
                WriteOptions { format, nested },
                force,
                &target,
            )
            .await
        }
    }
}

fn read_input(file: &str) -> anyhow::Result<Vec<u8>> {
    if file == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("reading the file from standard input")?;
        Ok(buf)
    } else {
        std::fs::read(file).with_context(|| format!("reading {file}"))
    }
}

/// Parses a file, with the problems (and their lines) as the error.
fn parse(file: &str, text: &[u8]) -> anyhow::Result<declarative::Config> {
    let options = ParseOptions {
        now: crate::node::now_secs(),
    };
    declarative::parse(Registry::builtin(), text, &options)
        .map_err(|e| anyhow::anyhow!("{file} is not a valid declarative configuration:\n{e}"))
}

/// `config validate FILE` (Kong's `kong config parse`).
fn validate(file: &str) -> anyhow::Result<()> {
    let text = read_input(file)?;
    let config = parse(file, &text)?;
    println!(
        "{file}: valid declarative configuration ({} entities)",
        config.entities.len()
    );
    Ok(())
}

/// The Admin URL to try, and the settings for the direct path.
fn target_of(target: &ConfigTarget) -> anyhow::Result<(String, Option<String>, CpConfig)> {
    let cfg = CpConfig::from_args(&target.serve)?;
    let base = match &target.admin_url {
        Some(u) => u.trim_end_matches('/').to_owned(),
        None => {
            let mut addr = cfg.admin_listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
    };
    let token = cfg.admin_token.clone();
    Ok((base, token, cfg))
}

/// An HTTP request to the Admin API. `Err` with a connect error means no control plane
/// answers there.
async fn admin_request(
    base: &str,
    method: http::Method,
    path_and_query: &str,
    token: Option<&str>,
    body: Option<(&'static str, Vec<u8>)>,
) -> Result<(http::StatusCode, Bytes), AdminError> {
    let uri: http::Uri = format!("{base}{path_and_query}")
        .parse()
        .map_err(|e| AdminError::Other(anyhow::anyhow!("invalid --admin-url '{base}': {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(AdminError::Other(anyhow::anyhow!(
            "--admin-url must be http://host:port (the Admin API serves plain HTTP), not '{base}'"
        )));
    }
    let host = uri.host().unwrap_or("127.0.0.1").to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| AdminError::Unreachable(format!("{host}:{port}: {e}")))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| AdminError::Unreachable(format!("{host}:{port}: {e}")))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = http::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(http::header::HOST, format!("{host}:{port}"));
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let body = match body {
        Some((ct, b)) => {
            req = req.header(http::header::CONTENT_TYPE, ct);
            Full::new(Bytes::from(b))
        }
        None => Full::new(Bytes::new()),
    };
    let req = req
        .body(body)
        .map_err(|e| AdminError::Other(anyhow::anyhow!("building the request: {e}")))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| AdminError::Other(anyhow::anyhow!("Admin API at {base}: {e}")))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| AdminError::Other(anyhow::anyhow!("reading the answer of {base}: {e}")))?
        .to_bytes();
    Ok((status, bytes))
}

enum AdminError {
    /// Nothing listens there.
    Unreachable(String),
    Other(anyhow::Error),
}

/// A running control plane if one answers; otherwise the database, when allowed.
fn direct_allowed(cfg: &CpConfig, base: &str, why: &str) -> anyhow::Result<Option<DataDirLock>> {
    if cfg.database_url.is_some() {
        return Ok(None);
    }
    if !cfg.data_dir.join("deltaplane.db").exists() {
        bail!(
            "no control plane answers at {base} ({why}) and {} holds no database; start \
             deltaplane-cp serve, or pass --admin-url or --data-dir",
            cfg.data_dir.display()
        );
    }
    match DataDirLock::try_acquire(&cfg.data_dir)
        .with_context(|| format!("locking {}", cfg.data_dir.join(LOCK_FILE).display()))?
    {
        Some(lock) => Ok(Some(lock)),
        None => bail!(
            "a control plane holds {} but its Admin API does not answer at {base} ({why}); \
             pass --admin-url (and --admin-token), or stop it first",
            cfg.data_dir.display()
        ),
    }
}

async fn open_store(cfg: &CpConfig) -> anyhow::Result<Store> {
    Store::open(super::store_options(cfg))
        .await
        .map_err(|e| anyhow::anyhow!("opening the database: {e}"))
}

/// `config import FILE|-`.
async fn import(
    file: &str,
    upsert: bool,
    dry_run: bool,
    target: &ConfigTarget,
) -> anyhow::Result<()> {
    let text = read_input(file)?;
    // Locally first: problems with the file's line numbers.
    let config = parse(file, &text)?;
    let (base, token, cfg) = target_of(target)?;
    let mut query = vec!["flatten_errors=1"];
    if upsert {
        query.push("upsert=true");
    }
    if dry_run {
        query.push("dry_run=true");
    }
    let path = format!("/config?{}", query.join("&"));
    let why = match admin_request(
        &base,
        http::Method::POST,
        &path,
        token.as_deref(),
        Some(("application/x-yaml", text)),
    )
    .await
    {
        Ok((status, body)) => {
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if status.is_success() {
                print_summary(&json["_deltaplane"]);
                return Ok(());
            }
            bail!("{}", describe_refusal(&base, status, &json));
        }
        Err(AdminError::Other(e)) => return Err(e),
        Err(AdminError::Unreachable(why)) => why,
    };
    let _lock = direct_allowed(&cfg, &base, &why)?;
    let store = open_store(&cfg).await?;
    let mode = if upsert {
        ImportMode::Upsert
    } else {
        ImportMode::Sync
    };
    let result = store.import(config, mode, dry_run).await;
    store.close().await;
    match result {
        Ok(outcome) => {
            eprintln!(
                "deltaplane-cp: no control plane answers at {base}; wrote the database directly"
            );
            print_summary(&outcome_json(&outcome));
            Ok(())
        }
        Err(StoreError::InvalidConfig(invalid)) => {
            bail!(
                "{file} is not a valid declarative configuration:\n{}",
                declarative::Error::Invalid(*invalid)
            )
        }
        Err(e) => bail!("importing: {e}"),
    }
}

fn outcome_json(outcome: &ImportOutcome) -> Value {
    serde_json::json!({
        "version": outcome.version,
        "previous_version": outcome.previous_version,
        "dry_run": outcome.dry_run,
        "changes": outcome.counts,
    })
}

/// The difference per type and the version, for people.
fn print_summary(summary: &Value) {
    let dry = summary["dry_run"].as_bool().unwrap_or(false);
    if let Some(changes) = summary["changes"].as_object() {
        for (ty, c) in changes {
            println!(
                "{ty}: {} created, {} updated, {} deleted",
                c["created"], c["updated"], c["deleted"]
            );
        }
    }
    match (summary["version"].as_i64(), dry) {
        (Some(v), true) => println!("dry run: would create version {v}; nothing written"),
        (Some(v), false) => println!("version {v}"),
        (None, _) => println!(
            "no changes: the configuration already matches (version {})",
            summary["previous_version"]
        ),
    }
}

/// A refused `/config` request in a few lines: Kong's flattened errors, one per line.
fn describe_refusal(base: &str, status: http::StatusCode, body: &Value) -> String {
    let mut out = format!("{base} refused the file ({status})");
    if let Some(m) = body["message"].as_str() {
        out.push_str(": ");
        out.push_str(m);
    }
    for entry in body["flattened_errors"].as_array().into_iter().flatten() {
        let who = entry["entity_name"]
            .as_str()
            .or(entry["entity_id"].as_str())
            .unwrap_or("?");
        for e in entry["errors"].as_array().into_iter().flatten() {
            let field = e["field"]
                .as_str()
                .map(|f| format!("{f}: "))
                .unwrap_or_default();
            out.push_str(&format!(
                "\n  {} {who}: {field}{}",
                entry["entity_type"].as_str().unwrap_or("?"),
                e["message"].as_str().unwrap_or("?")
            ));
        }
    }
    out
}

/// `config export [FILE]`.
async fn export(
    file: Option<&Path>,
    options: WriteOptions,
    force: bool,
    target: &ConfigTarget,
) -> anyhow::Result<()> {
    if let Some(f) = file
        && f.exists()
        && !force
    {
        bail!("{} exists; pass --force to overwrite it", f.display());
    }
    let (base, token, cfg) = target_of(target)?;
    let format = match options.format {
        OutputFormat::Yaml => "yaml",
        OutputFormat::Json => "json",
    };
    let path = format!("/config?format={format}&nested={}", options.nested);
    let text = match admin_request(&base, http::Method::GET, &path, token.as_deref(), None).await {
        Ok((status, body)) => {
            let json: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if !status.is_success() {
                bail!("{}", describe_refusal(&base, status, &json));
            }
            json["config"]
                .as_str()
                .map(str::to_owned)
                .with_context(|| format!("{base}/config answered without a config"))?
        }
        Err(AdminError::Other(e)) => return Err(e),
        Err(AdminError::Unreachable(why)) => {
            let _lock = direct_allowed(&cfg, &base, &why)?;
            let store = open_store(&cfg).await?;
            let r = super::admin::config::export(&store, options).await;
            store.close().await;
            r.map_err(|e| anyhow::anyhow!("exporting: {e}"))?.0
        }
    };
    match file {
        Some(f) => write_file(f, &text, force),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
            Ok(())
        }
    }
}

fn write_file(path: &Path, text: &str, force: bool) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut f = options
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    eprintln!("deltaplane-cp: wrote {}", path.display());
    Ok(())
}
