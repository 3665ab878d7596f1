//! One configuration as the proxy serves it: the router, the services, the balancers, the
//! plugin table and the certificates of one applied version, immutable once built.
//!
//! A [`Gateway`] is built from a store [`Snapshot`] and then derived from its predecessor for
//! each committed apply ([`Gateway::update`]): only what the change feed names is reread,
//! the router is updated incrementally (unchanged routes keep their compiled matchers), and
//! the balancers and plugins are rebuilt with the previous ones lending their runtime state
//! (health, counters). The proxy swaps the new one in atomically; a request holds the
//! `Arc<Gateway>` it started with until it ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::balancer::Balancers;
use super::plugins::{Exporter, Plugins};
use super::router::{Route, Router};
use super::tls::Certificates;
use crate::dp::store::{Changed, DpStoreError, Snapshot};

/// Entity types whose change rebuilds the plugin table.
const PLUGIN_INPUTS: [&str; 6] = [
    "plugins",
    "consumers",
    "keyauth_credentials",
    "basicauth_credentials",
    "jwt_secrets",
    "acls",
];

/// A service as the proxy forwards to it (`kong/db/schema/entities/services.lua`).
#[derive(Debug)]
pub struct Service {
    pub id: String,
    pub name: Option<String>,
    pub ws_id: String,
    /// `http`, `https`, `grpc`, `grpcs`, (stream protocols are not proxied here).
    pub protocol: String,
    pub host: String,
    pub port: u16,
    pub path: Option<String>,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub read_timeout: Duration,
    pub enabled: bool,
    /// `tls_verify`: null means Kong's default (`nginx_proxy_ssl_verify` off).
    pub tls_verify: bool,
}

impl Service {
    /// Parses a stored service.
    pub fn from_entity(ws_id: &str, v: &Value) -> Result<Service, String> {
        let str_field = |f: &str| v[f].as_str().map(str::to_owned);
        let ms = |f: &str, default: u64| Duration::from_millis(v[f].as_u64().unwrap_or(default));
        let protocol = str_field("protocol").unwrap_or_else(|| "http".into());
        let default_port = if protocol.ends_with('s') { 443 } else { 80 };
        Ok(Service {
            id: str_field("id").ok_or("a service without an id")?,
            name: str_field("name"),
            ws_id: ws_id.to_owned(),
            host: str_field("host").ok_or("a service without a host")?,
            port: v["port"]
                .as_u64()
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(default_port),
            path: str_field("path"),
            retries: v["retries"].as_u64().unwrap_or(5).min(32767) as u32,
            connect_timeout: ms("connect_timeout", 60_000),
            write_timeout: ms("write_timeout", 60_000),
            read_timeout: ms("read_timeout", 60_000),
            enabled: v["enabled"].as_bool().unwrap_or(true),
            tls_verify: v["tls_verify"].as_bool().unwrap_or(false),
            protocol,
        })
    }
}

/// Something in the configuration the proxy could not use, left out and shown in `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub entity_type: &'static str,
    pub id: String,
    pub message: String,
}

/// One configuration, ready to serve requests.
pub struct Gateway {
    /// The store version this configuration is the state of.
    pub version: i64,
    pub router: Router,
    pub services: HashMap<String, Arc<Service>>,
    pub balancers: Arc<Balancers>,
    pub plugins: Arc<Plugins>,
    pub certificates: Arc<Certificates>,
    /// Every stored HTTP route by id, in the router or not (a disabled service's routes).
    routes: HashMap<String, Arc<Route>>,
    /// Route ids by service id, to re-evaluate a service's routes when it changes.
    routes_by_service: HashMap<String, HashSet<String>>,
    /// Route, service, upstream, plugin and certificate problems of this configuration.
    pub problems: Vec<Problem>,
}

impl Gateway {
    /// A configuration with nothing in it (before the first apply).
    pub fn empty(exporter: &Arc<Exporter>) -> Gateway {
        let (router, _) = Router::new(std::iter::empty());
        let (balancers, _) = Balancers::new(&[], &[], None);
        let (plugins, _) = Plugins::new(&|_| Vec::new(), None, exporter);
        let (certificates, _) = Certificates::new(&[], &[]);
        Gateway {
            version: 0,
            router,
            services: HashMap::new(),
            balancers: Arc::new(balancers),
            plugins: Arc::new(plugins),
            certificates: Arc::new(certificates),
            routes: HashMap::new(),
            routes_by_service: HashMap::new(),
            problems: Vec::new(),
        }
    }

    /// Builds everything from one snapshot; `previous` lends runtime state.
    pub fn build(
        snapshot: &Snapshot,
        previous: Option<&Gateway>,
        exporter: &Arc<Exporter>,
    ) -> Result<Gateway, DpStoreError> {
        let mut problems = Vec::new();
        let mut services = HashMap::new();
        snapshot.for_each("services", &mut |ws, _, v| {
            match Service::from_entity(ws, &v) {
                Ok(s) => {
                    services.insert(s.id.clone(), Arc::new(s));
                }
                Err(message) => problems.push(problem("services", &v, message)),
            }
            true
        })?;
        let mut routes = HashMap::new();
        let mut routes_by_service: HashMap<String, HashSet<String>> = HashMap::new();
        snapshot.for_each("routes", &mut |_, _, v| {
            match Route::from_entity(&v) {
                Ok(r) => {
                    if let Some(s) = &r.service_id {
                        routes_by_service
                            .entry(s.clone())
                            .or_default()
                            .insert(r.id.clone());
                    }
                    routes.insert(r.id.clone(), Arc::new(r));
                }
                Err(message) => problems.push(problem("routes", &v, message)),
            }
            true
        })?;
        let routable = routes
            .values()
            .filter(|r| routable(r, &services))
            .cloned()
            .collect::<Vec<_>>();
        let (router, errors) = Router::new(routable);
        problems.extend(errors.into_iter().map(|(id, message)| Problem {
            entity_type: "routes",
            id,
            message,
        }));
        let balancers = balancers(snapshot, previous, &mut problems)?;
        let plugins = plugins(snapshot, previous, exporter, &mut problems)?;
        let certificates = certificates(snapshot, &mut problems)?;
        Ok(Gateway {
            version: snapshot.state().version,
            router,
            services,
            balancers,
            plugins,
            certificates,
            routes,
            routes_by_service,
            problems,
        })
    }

    /// The configuration after one committed apply: `changed` names what it changed.
    pub fn update(
        &self,
        snapshot: &Snapshot,
        changed: &Changed,
        exporter: &Arc<Exporter>,
    ) -> Result<Gateway, DpStoreError> {
        let Changed::Entities(keys) = changed else {
            return Gateway::build(snapshot, Some(self), exporter);
        };
        let mut services = self.services.clone();
        let mut routes = self.routes.clone();
        let mut routes_by_service = self.routes_by_service.clone();
        let mut problems: Vec<Problem> = Vec::new();
        // Routes to re-evaluate: changed ones, and those of a changed service.
        let mut touched_routes: HashSet<String> = HashSet::new();
        let mut touched_types: HashSet<&str> = HashSet::new();
        for (ty, id) in keys {
            match ty.as_str() {
                "services" => {
                    match snapshot.get_by_id("services", id)? {
                        Some((ws, v)) => match Service::from_entity(&ws, &v) {
                            Ok(s) => {
                                services.insert(id.clone(), Arc::new(s));
                            }
                            Err(message) => {
                                services.remove(id);
                                problems.push(problem("services", &v, message));
                            }
                        },
                        None => {
                            services.remove(id);
                        }
                    }
                    if let Some(ids) = routes_by_service.get(id) {
                        touched_routes.extend(ids.iter().cloned());
                    }
                }
                "routes" => {
                    if let Some(old) = routes.remove(id)
                        && let Some(s) = &old.service_id
                        && let Some(set) = routes_by_service.get_mut(s)
                    {
                        set.remove(id);
                    }
                    if let Some((_, v)) = snapshot.get_by_id("routes", id)? {
                        match Route::from_entity(&v) {
                            Ok(r) => {
                                if let Some(s) = &r.service_id {
                                    routes_by_service
                                        .entry(s.clone())
                                        .or_default()
                                        .insert(r.id.clone());
                                }
                                routes.insert(id.clone(), Arc::new(r));
                            }
                            Err(message) => problems.push(problem("routes", &v, message)),
                        }
                    }
                    touched_routes.insert(id.clone());
                }
                other => {
                    touched_types.insert(match other {
                        "upstreams" | "targets" => "balancers",
                        "certificates" | "snis" => "certificates",
                        t if PLUGIN_INPUTS.contains(&t) => "plugins",
                        _ => "other",
                    });
                }
            }
        }
        let removed: Vec<&str> = touched_routes.iter().map(String::as_str).collect();
        let upserted = touched_routes
            .iter()
            .filter_map(|id| routes.get(id))
            .filter(|r| routable(r, &services))
            .cloned()
            .collect::<Vec<_>>();
        let (router, errors) = self.router.update(&removed, upserted);
        // Problems of untouched entities carry over; touched ones were re-evaluated.
        let rechecked = |p: &Problem| {
            (p.entity_type == "routes" && touched_routes.contains(&p.id))
                || (p.entity_type == "services"
                    && keys.contains(&("services".into(), p.id.clone())))
                || (p.entity_type == "upstreams" && touched_types.contains("balancers"))
                || (p.entity_type == "plugins" && touched_types.contains("plugins"))
                || (p.entity_type == "certificates" && touched_types.contains("certificates"))
        };
        problems.extend(self.problems.iter().filter(|p| !rechecked(p)).cloned());
        problems.extend(errors.into_iter().map(|(id, message)| Problem {
            entity_type: "routes",
            id,
            message,
        }));
        let balancers = if touched_types.contains("balancers") {
            balancers(snapshot, Some(self), &mut problems)?
        } else {
            self.balancers.clone()
        };
        let plugins = if touched_types.contains("plugins") {
            plugins(snapshot, Some(self), exporter, &mut problems)?
        } else {
            self.plugins.clone()
        };
        let certificates = if touched_types.contains("certificates") {
            certificates(snapshot, &mut problems)?
        } else {
            self.certificates.clone()
        };
        Ok(Gateway {
            version: snapshot.state().version,
            router,
            services,
            balancers,
            plugins,
            certificates,
            routes,
            routes_by_service,
            problems,
        })
    }

    /// Every stored HTTP route, in the router or not.
    pub fn n_routes(&self) -> usize {
        self.routes.len()
    }
}

/// Whether a route goes into the router: Kong leaves out the routes of a disabled service
/// (`kong/router/utils.lua` and `kong/runloop/handler.lua` build the router from routes whose
/// service is enabled); a route without a service stays (it answers 503).
fn routable(route: &Route, services: &HashMap<String, Arc<Service>>) -> bool {
    match &route.service_id {
        None => true,
        Some(id) => services.get(id).is_some_and(|s| s.enabled),
    }
}

fn balancers(
    snapshot: &Snapshot,
    previous: Option<&Gateway>,
    problems: &mut Vec<Problem>,
) -> Result<Arc<Balancers>, DpStoreError> {
    let upstreams = snapshot.list("upstreams")?;
    let targets = snapshot.list("targets")?;
    let (balancers, errors) = Balancers::new(&upstreams, &targets, previous.map(|p| &*p.balancers));
    problems.extend(errors.into_iter().map(|(id, message)| Problem {
        entity_type: "upstreams",
        id,
        message,
    }));
    Ok(Arc::new(balancers))
}

fn plugins(
    snapshot: &Snapshot,
    previous: Option<&Gateway>,
    exporter: &Arc<Exporter>,
    problems: &mut Vec<Problem>,
) -> Result<Arc<Plugins>, DpStoreError> {
    let mut lists: HashMap<&str, Vec<Value>> = HashMap::new();
    for ty in PLUGIN_INPUTS {
        lists.insert(ty, snapshot.list(ty)?);
    }
    let entities = |ty: &str| lists.get(ty).cloned().unwrap_or_default();
    let (plugins, errors) = Plugins::new(&entities, previous.map(|p| &*p.plugins), exporter);
    problems.extend(errors.into_iter().map(|(id, message)| Problem {
        entity_type: "plugins",
        id,
        message,
    }));
    Ok(Arc::new(plugins))
}

fn certificates(
    snapshot: &Snapshot,
    problems: &mut Vec<Problem>,
) -> Result<Arc<Certificates>, DpStoreError> {
    let (certificates, errors) =
        Certificates::new(&snapshot.list("certificates")?, &snapshot.list("snis")?);
    problems.extend(errors.into_iter().map(|(id, message)| Problem {
        entity_type: "certificates",
        id,
        message,
    }));
    Ok(Arc::new(certificates))
}

fn problem(entity_type: &'static str, v: &Value, message: String) -> Problem {
    Problem {
        entity_type,
        id: v["id"].as_str().unwrap_or("").to_owned(),
        message,
    }
}
