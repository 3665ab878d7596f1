//! Target health: lua-resty-healthcheck's counters and states, and the active prober.
//!
//! Semantics (lua-resty-healthcheck, `incr_counter` and `run_single_check`, as Kong 3.10
//! uses it from `kong/runloop/balancer/healthcheckers.lua`):
//! - four counters per target: successes, HTTP failures, TCP failures, timeouts;
//! - a threshold of 0 disables its counter;
//! - a success clears the failure counters, a failure clears the success counter;
//! - a counter reaching its threshold moves the target to fully healthy or unhealthy; a
//!   first failure on a healthy target makes it "mostly healthy" (still used), a first
//!   success on an unhealthy one "mostly unhealthy" (still skipped);
//! - reports matching the current full state are ignored.
//!
//! Active probes: connect (timeout → timeout, error → TCP failure); `tcp` stops there
//! (success); `https` then shakes hands (failure → TCP failure); `http` and `https` send `GET <http_path> HTTP/1.1` with `Connection: close`, the configured
//! headers and `Host`, reads the status line, and reports the status (a bad status line
//! counts as an HTTP failure). Healthy targets are probed every `healthy.interval`, unhealthy
//! ones every `unhealthy.interval`.

use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use super::config::{ActiveConfig, ProbeType};
use super::tls;
use super::{Target, Upstream};

/// lua-resty-healthcheck's internal health of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Healthy, no failure counted.
    Healthy,
    /// Healthy, with failures counted (still used).
    MostlyHealthy,
    /// Unhealthy, with successes counted (still skipped).
    MostlyUnhealthy,
    /// Unhealthy, no success counted.
    Unhealthy,
}

impl State {
    /// Whether the balancer uses a target in this state.
    pub fn available(self) -> bool {
        matches!(self, State::Healthy | State::MostlyHealthy)
    }
}

/// What one observation says about a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Report {
    /// A healthy status (or a TCP check's connection).
    Success,
    /// An unhealthy status, or a bad status line.
    HttpFailure,
    /// A connection, send or receive error.
    TcpFailure,
    /// A timeout.
    Timeout,
}

/// The counters and state of one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The current state.
    pub state: State,
    successes: u32,
    http_failures: u32,
    tcp_failures: u32,
    timeouts: u32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            state: State::Healthy,
            successes: 0,
            http_failures: 0,
            tcp_failures: 0,
            timeouts: 0,
        }
    }
}

impl Health {
    /// Counts one report against `limit` (its threshold; 0 disables it). Returns the new
    /// availability when it changed.
    pub fn record(&mut self, report: Report, limit: u32) -> Option<bool> {
        if limit == 0 {
            return None;
        }
        let success = report == Report::Success;
        if (success && self.state == State::Healthy) || (!success && self.state == State::Unhealthy)
        {
            return None;
        }
        let was = self.state.available();
        // lua-resty-healthcheck packs each counter in 8 bits; saturate likewise.
        let count = if success {
            self.http_failures = 0;
            self.tcp_failures = 0;
            self.timeouts = 0;
            self.successes = (self.successes + 1).min(255);
            self.successes
        } else {
            self.successes = 0;
            let counter = match report {
                Report::HttpFailure => &mut self.http_failures,
                Report::TcpFailure => &mut self.tcp_failures,
                _ => &mut self.timeouts,
            };
            *counter = (*counter + 1).min(255);
            *counter
        };
        let failures = self.http_failures + self.tcp_failures + self.timeouts;
        if count >= limit {
            self.state = if success {
                State::Healthy
            } else {
                State::Unhealthy
            };
        } else if self.state == State::Healthy && failures > 0 {
            self.state = State::MostlyHealthy;
        } else if self.state == State::Unhealthy && self.successes > 0 {
            self.state = State::MostlyUnhealthy;
        }
        let now = self.state.available();
        (now != was).then_some(now)
    }
}

/// Starts the active prober of an upstream, when its configuration asks for one and a tokio
/// runtime is running. The task holds only a `Weak` between rounds and ends once the
/// upstream is dropped (its `Drop` also aborts it).
pub(super) fn spawn_active(upstream: &Arc<Upstream>) -> Option<tokio::task::AbortHandle> {
    if !upstream.config.health.active_enabled() || upstream.targets.is_empty() {
        return None;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(
            upstream = %upstream.config.name,
            "no tokio runtime: active health checks not started"
        );
        return None;
    };
    let weak = Arc::downgrade(upstream);
    Some(runtime.spawn(run_active(weak)).abort_handle())
}

/// The prober's loop: one round per due interval.
async fn run_active(weak: Weak<Upstream>) {
    let (healthy_every, unhealthy_every) = match weak.upgrade() {
        Some(up) => (
            up.config.health.active.healthy.interval,
            up.config.health.active.unhealthy.interval,
        ),
        None => return,
    };
    let start = Instant::now();
    let due = |every: Duration| (!every.is_zero()).then(|| start + every);
    let mut next_healthy = due(healthy_every);
    let mut next_unhealthy = due(unhealthy_every);
    loop {
        let next = match (next_healthy, next_unhealthy) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return,
        };
        tokio::time::sleep_until(next).await;
        let Some(up) = weak.upgrade() else { return };
        let now = Instant::now();
        let probe_healthy = next_healthy.is_some_and(|t| t <= now);
        let probe_unhealthy = next_unhealthy.is_some_and(|t| t <= now);
        if probe_healthy {
            next_healthy = Some(now + healthy_every);
        }
        if probe_unhealthy {
            next_unhealthy = Some(now + unhealthy_every);
        }
        let due_targets: Vec<Arc<Target>> = up
            .targets
            .iter()
            .filter(|t| t.weight > 0)
            .filter(|t| {
                if t.available() {
                    probe_healthy
                } else {
                    probe_unhealthy
                }
            })
            .cloned()
            .collect();
        let concurrency = up.config.health.active.concurrency;
        futures::stream::iter(due_targets)
            .map(|target| {
                let up = Arc::clone(&up);
                async move {
                    if let Some(report) = probe_target(&up, &target).await {
                        let limits = &up.config.health.active;
                        let limit = match report {
                            Report::Success => limits.healthy.successes,
                            Report::HttpFailure => limits.unhealthy.http_failures,
                            Report::TcpFailure => limits.unhealthy.tcp_failures,
                            Report::Timeout => limits.unhealthy.timeouts,
                        };
                        up.record(&target, report, limit);
                    }
                }
            })
            .buffer_unordered(concurrency)
            .for_each(|()| async {})
            .await;
    }
}

/// Probes one target (its first address); `None` when the outcome counts for nothing (the
/// name does not resolve, or the status is in neither list).
async fn probe_target(up: &Upstream, target: &Target) -> Option<Report> {
    let addrs = match up.resolver.resolve(&target.host, target.port).await {
        Ok(addrs) => addrs,
        Err(err) => {
            tracing::debug!(target = %target.name, %err, "active health check: no address");
            return None;
        }
    };
    let addr = *addrs.first()?;
    let active = &up.config.health.active;
    let host_header = up.config.host_header.as_deref().unwrap_or(&target.host);
    match probe(addr, active, host_header).await {
        ProbeOutcome::Report(report) => Some(report),
        ProbeOutcome::Status(status) => {
            if active.healthy.http_statuses.contains(&status) {
                Some(Report::Success)
            } else if status == 0 || active.unhealthy.http_statuses.contains(&status) {
                Some(Report::HttpFailure)
            } else {
                None
            }
        }
    }
}

/// What a probe saw: a connection-level report, or an HTTP status (0: bad status line).
#[derive(Debug, PartialEq, Eq)]
enum ProbeOutcome {
    Report(Report),
    Status(u16),
}

/// One active probe of one address.
async fn probe(addr: SocketAddr, active: &ActiveConfig, host_header: &str) -> ProbeOutcome {
    let limit = active.timeout;
    let stream = match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => return ProbeOutcome::Report(Report::Timeout),
        Ok(Err(_)) => return ProbeOutcome::Report(Report::TcpFailure),
        Ok(Ok(stream)) => stream,
    };
    match active.probe {
        ProbeType::Tcp => ProbeOutcome::Report(Report::Success),
        ProbeType::Http => http_probe(stream, active, host_header).await,
        ProbeType::Https => {
            // Kong's SNI: `https_sni`, else the host header (the upstream's `host_header`,
            // else the target's name). A failed handshake is a TCP failure.
            let sni = active.https_sni.as_deref().unwrap_or(host_header);
            let (Some(config), Some(name)) = (
                tls::client_config(active.https_verify_certificate),
                tls::server_name(sni),
            ) else {
                return ProbeOutcome::Report(Report::TcpFailure);
            };
            let connector = tokio_rustls::TlsConnector::from(config);
            match timeout(limit, connector.connect(name, stream)).await {
                Err(_) => ProbeOutcome::Report(Report::Timeout),
                Ok(Err(err)) => {
                    tracing::debug!(%addr, sni, %err, "active health check: TLS handshake failed");
                    ProbeOutcome::Report(Report::TcpFailure)
                }
                Ok(Ok(tls)) => http_probe(tls, active, host_header).await,
            }
        }
    }
}

/// The HTTP part of a probe: request, then the status line.
async fn http_probe<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    active: &ActiveConfig,
    host_header: &str,
) -> ProbeOutcome {
    let limit = active.timeout;
    let mut request = format!("GET {} HTTP/1.1\r\nConnection: close\r\n", active.http_path);
    for (name, values) in &active.headers {
        for value in values {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
    }
    request.push_str(&format!("Host: {host_header}\r\n\r\n"));
    let mut stream = BufReader::new(stream);
    match timeout(limit, stream.get_mut().write_all(request.as_bytes())).await {
        Err(_) => return ProbeOutcome::Report(Report::Timeout),
        Ok(Err(_)) => return ProbeOutcome::Report(Report::TcpFailure),
        Ok(Ok(())) => {}
    }
    let mut line = String::new();
    match timeout(limit, stream.read_line(&mut line)).await {
        Err(_) => return ProbeOutcome::Report(Report::Timeout),
        Ok(Err(_)) | Ok(Ok(0)) => return ProbeOutcome::Report(Report::TcpFailure),
        Ok(Ok(_)) => {}
    }
    ProbeOutcome::Status(parse_status_line(&line))
}

/// The status of `HTTP/<d>.<d> <status>` (case-insensitive), else 0.
fn parse_status_line(line: &str) -> u16 {
    let Some(rest) = line
        .get(..5)
        .filter(|p| p.eq_ignore_ascii_case("HTTP/"))
        .map(|_| &line[5..])
    else {
        return 0;
    };
    let Some((version, rest)) = rest.split_once(|c: char| c.is_ascii_whitespace()) else {
        return 0;
    };
    let valid_version = version.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && !b.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.bytes().all(|c| c.is_ascii_digit())
    });
    if !valid_version {
        return 0;
    }
    let digits: String = rest
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local TLS server (self-signed for `localhost`) answering 200 to every request.
    async fn tls_server() -> SocketAddr {
        use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use tokio::io::AsyncReadExt;
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            certified.signing_key.serialize_der(),
        ));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![certified.cert.der().clone()], key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let _ = tls
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        local
    }

    fn https_config(verify: bool) -> ActiveConfig {
        let up = super::super::config::parse_upstream(&serde_json::json!({
            "id": "u", "name": "u",
            "healthchecks": {"active": {"type": "https", "https_verify_certificate": verify}},
        }))
        .unwrap();
        up.health.active
    }

    #[tokio::test]
    async fn https_probes_honour_certificate_verification() {
        let server = tls_server().await;
        // Not verified: the handshake passes and the status counts.
        let outcome = probe(server, &https_config(false), "localhost").await;
        assert_eq!(outcome, ProbeOutcome::Status(200));
        // Verified: a self-signed certificate fails the handshake, a TCP failure.
        let outcome = probe(server, &https_config(true), "localhost").await;
        assert_eq!(outcome, ProbeOutcome::Report(Report::TcpFailure));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK\r\n"), 200);
        assert_eq!(parse_status_line("http/1.0 503\r\n"), 503);
        assert_eq!(parse_status_line("HTTP/2 200\r\n"), 0);
        assert_eq!(parse_status_line("garbage\r\n"), 0);
    }

    #[test]
    fn counters_follow_resty_healthcheck() {
        let mut h = Health::default();
        // Disabled counter: nothing happens.
        assert_eq!(h.record(Report::TcpFailure, 0), None);
        assert_eq!(h.state, State::Healthy);
        // Two of three failures: mostly healthy, still available.
        assert_eq!(h.record(Report::HttpFailure, 3), None);
        assert_eq!(h.state, State::MostlyHealthy);
        assert_eq!(h.record(Report::HttpFailure, 3), None);
        // A success clears the failures (threshold 5, not reached).
        assert_eq!(h.record(Report::Success, 5), None);
        assert_eq!(h.record(Report::HttpFailure, 3), None);
        assert_eq!(h.record(Report::HttpFailure, 3), None);
        assert_eq!(h.state, State::MostlyHealthy);
        assert_eq!(h.record(Report::HttpFailure, 3), Some(false));
        assert_eq!(h.state, State::Unhealthy);
        // More failures are ignored; successes bring it back at the threshold.
        assert_eq!(h.record(Report::Timeout, 1), None);
        assert_eq!(h.record(Report::Success, 2), None);
        assert_eq!(h.state, State::MostlyUnhealthy);
        assert_eq!(h.record(Report::Success, 2), Some(true));
        assert_eq!(h.state, State::Healthy);
    }
}
