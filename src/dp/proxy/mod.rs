//! The data plane's proxy: Kong's HTTP gateway, driven by the synced configuration.
//!
//! - `router/`: Kong 3.10's `traditional_compatible` router (matching, priority, the upstream
//!   URI), with no I/O.
//! - `balancer/`: upstreams and targets (Kong's algorithms, health checks) and DNS for plain
//!   service hosts.
//! - `plugins/`: the plugins this data plane executes, and the plugin table of one
//!   configuration.
//! - `gateway.rs`: one configuration ready to serve (router, services, balancers, plugins,
//!   certificates), built from a store snapshot and derived incrementally per commit.
//! - `server.rs`: the listeners and the request path; `upstream.rs`: upstream connections
//!   and pools; `errors.rs`: Kong's error bodies; `tls.rs`: certificates by SNI.

pub mod balancer;
pub mod errors;
pub mod gateway;
pub mod ipnet;
pub mod plugins;
pub mod router;
pub mod server;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;

use crate::dp::store::{Changed, DpStore};
use gateway::{Builder, Gateway, Problem};
use plugins::Exporter;
use server::Proxy;

/// What `/status` shows of the proxy.
#[derive(Debug, Clone, Default)]
pub struct ProxyStatus {
    pub listen: Option<SocketAddr>,
    pub listen_tls: Option<SocketAddr>,
    /// The store version the proxy is serving.
    pub serving_version: i64,
    /// Why the newest stored version is not served, if it is not.
    pub refused: Option<String>,
    /// What the served configuration left out.
    pub problems: Vec<Problem>,
    pub n_routes: usize,
    /// Configurations built since start (full builds and incremental updates).
    pub builds: u64,
    pub full_builds: u64,
}

/// The proxy of a running data plane: its state and what `/status` shows of it.
pub struct ProxyHandle {
    pub proxy: Arc<Proxy>,
    pub exporter: Arc<Exporter>,
    status: Mutex<ProxyStatus>,
    serving: watch::Sender<i64>,
}

impl ProxyHandle {
    pub fn new(proxy: Arc<Proxy>, exporter: Arc<Exporter>) -> Arc<ProxyHandle> {
        Arc::new(ProxyHandle {
            proxy,
            exporter,
            status: Mutex::new(ProxyStatus::default()),
            serving: watch::channel(0).0,
        })
    }

    pub fn status(&self) -> ProxyStatus {
        self.status.lock().expect("proxy status lock").clone()
    }

    pub fn set_listeners(&self, plain: Option<SocketAddr>, tls: Option<SocketAddr>) {
        let mut s = self.status.lock().expect("proxy status lock");
        s.listen = plain;
        s.listen_tls = tls;
    }

    /// The version the proxy serves, as it changes (for tests and tools).
    pub fn watch_serving(&self) -> watch::Receiver<i64> {
        self.serving.subscribe()
    }

    /// Serves `gw` unless it uses a plugin this data plane cannot run, in which case the
    /// previous configuration stays and the refusal is shown.
    fn offer(&self, gw: Arc<Gateway>, full: bool) {
        let mut s = self.status.lock().expect("proxy status lock");
        s.builds += 1;
        s.full_builds += u64::from(full);
        match gw.refusal() {
            None => {
                s.serving_version = gw.version;
                s.refused = None;
                s.problems = (*gw.problems).clone();
                s.n_routes = gw.router.len();
                drop(s);
                let version = gw.version;
                self.proxy.swap(gw);
                self.serving.send_replace(version);
            }
            Some(why) => {
                tracing::error!(
                    version = gw.version,
                    serving = s.serving_version,
                    "the proxy keeps serving its previous configuration: {why}"
                );
                s.refused = Some(format!("version {} not served: {why}", gw.version));
            }
        }
    }
}

/// Keeps the proxy's configuration equal to the store's: one build from a snapshot at
/// start, then one update per committed apply from the change feed (a full rebuild when
/// the feed says everything changed, or this task lagged). Builds run on a blocking thread,
/// never on the request path.
pub async fn follow(store: DpStore, handle: Arc<ProxyHandle>, mut shutdown: watch::Receiver<bool>) {
    let mut feed = store.subscribe();
    let mut builder = Some(Builder::new(
        handle.exporter.clone(),
        handle.proxy.resolver().clone(),
    ));
    let mut pending: Option<Changed> = Some(Changed::All);
    // The version of the last feed message merged into `pending`.
    let mut through: Option<i64> = None;
    loop {
        if let Some(changed) = pending.take() {
            let store = store.clone();
            let mut b = builder
                .take()
                .expect("the builder is back after each build");
            let full = matches!(changed, Changed::All);
            let built = tokio::task::spawn_blocking(move || {
                let r = store
                    .snapshot()
                    .and_then(|snap| b.update(&snap, &changed, through));
                (b, r)
            })
            .await;
            match built {
                Ok((b, Ok(gw))) => {
                    builder = Some(b);
                    handle.offer(gw, full);
                }
                Ok((b, Err(e))) => {
                    tracing::error!(error = %e, "could not read the store to rebuild the proxy");
                    builder = Some(b);
                    pending = Some(Changed::All);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the proxy's rebuild panicked; starting over");
                    builder = Some(Builder::new(
                        handle.exporter.clone(),
                        handle.proxy.resolver().clone(),
                    ));
                    pending = Some(Changed::All);
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            msg = feed.recv() => match msg {
                Ok(committed) => {
                    // Everything already queued joins this update.
                    let mut changed = committed.changed.clone();
                    through = Some(committed.version);
                    loop {
                        match feed.try_recv() {
                            Ok(more) => {
                                merge(&mut changed, &more.changed);
                                through = Some(more.version);
                            }
                            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => {
                                changed = Changed::All;
                            }
                            Err(_) => break,
                        }
                    }
                    pending = Some(changed);
                }
                Err(RecvError::Lagged(_)) => pending = Some(Changed::All),
                Err(RecvError::Closed) => return,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

fn merge(into: &mut Changed, more: &Changed) {
    match (&mut *into, more) {
        (Changed::All, _) => {}
        (_, Changed::All) => *into = Changed::All,
        (Changed::Entities(a), Changed::Entities(b)) => {
            a.extend(b.iter().cloned());
        }
    }
}
