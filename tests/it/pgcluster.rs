//! A throwaway PostgreSQL 15 cluster for tests that must crash and restart the server: `initdb`
//! into a temp dir as the `postgres` user, on a free loopback port, with its Unix socket in that
//! dir. The shared server named by `DELTAPLANE_TEST_PG_URL` is never touched. Stopped and
//! removed on drop, always.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct PgCluster {
    /// Owned by `postgres`; holds `data/`, `log` and the socket. Removed on drop.
    dir: tempfile::TempDir,
    pub port: u16,
    /// `postgres://postgres@127.0.0.1:PORT/cp`.
    pub url: String,
}

fn bin(name: &str) -> PathBuf {
    Path::new(PG_BIN).join(name)
}

/// Runs `cmd args` as the `postgres` user; panics with its output on failure.
fn as_postgres(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin(cmd))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd} via runuser: {e}"))
}

fn check(what: &str, out: std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl PgCluster {
    /// initdb + start + `CREATE DATABASE cp`. Panics (loudly) when PostgreSQL 15 is missing.
    pub async fn start() -> PgCluster {
        assert!(
            bin("initdb").exists(),
            "{} is missing: install postgresql-15 (apt-get install -y postgresql-15)",
            bin("initdb").display()
        );
        let cluster = tokio::task::spawn_blocking(|| {
            let dir = tempfile::Builder::new()
                .prefix("dp-pg")
                .tempdir()
                .expect("temp dir");
            check(
                "chown",
                Command::new("chown")
                    .args(["postgres:postgres"])
                    .arg(dir.path())
                    .output()
                    .expect("chown"),
            );
            let port = crate::harness::free_port();
            let cluster = PgCluster {
                url: format!("postgres://postgres@127.0.0.1:{port}/cp"),
                dir,
                port,
            };
            let data = cluster.data();
            check(
                "initdb",
                as_postgres(
                    "initdb",
                    &[
                        "-D",
                        &data,
                        "-U",
                        "postgres",
                        "-A",
                        "trust",
                        "--no-sync",
                        "-E",
                        "UTF8",
                    ],
                ),
            );
            cluster.start_server();
            cluster
        })
        .await
        .expect("start the cluster");
        let admin = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("connect to the throwaway cluster");
        sqlx::query("CREATE DATABASE cp")
            .execute(&pool)
            .await
            .expect("create database");
        pool.close().await;
        cluster
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `pg_ctl start` (waits until it accepts connections).
    pub fn start_server(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        check(
            "pg_ctl start",
            as_postgres(
                "pg_ctl",
                &["-D", &self.data(), "-l", &log, "-w", "-o", &opts, "start"],
            ),
        );
    }

    /// `pg_ctl -m immediate stop`: a crash (no checkpoint, backends killed); crash recovery on
    /// the next start.
    pub fn crash(&self) {
        check(
            "pg_ctl -m immediate stop",
            as_postgres(
                "pg_ctl",
                &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
            ),
        );
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        // Stop whatever state it is in (never panic here); the temp dir then goes with `dir`.
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin("pg_ctl"))
            .args(["-D", &self.data(), "-m", "immediate", "-w", "stop"])
            .output();
    }
}
