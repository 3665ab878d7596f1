//! One configuration as the proxy serves it: the router, the services, the balancers, the
//! plugin table and the certificates of one applied version, immutable once built.
//!
//! A [`Builder`], owned by the task that follows the store, keeps what derivation needs
//! (every route by id, routes by service, the problems found) and turns each committed
//! apply into the next [`Gateway`]: only what the change feed names is reread, the router
//! is updated incrementally (unchanged routes keep their compiled matchers), the services
//! map is copied only when a service changed, and the balancers and plugins are rebuilt
//! only when their inputs changed, with the previous ones lending their runtime state
//! (health, counters). The proxy swaps the new one in atomically; a request holds the
//! `Arc<Gateway>` it started with until it ends.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::balancer::{Balancers, Resolver};
use super::plugins::{Exporter, Plugins};
use super::router::FxHasher;
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

/// Services by id. Looked up once per request: FxHash rather than SipHash (the keys come
/// from configuration, requests never insert).
pub type ServiceMap = HashMap<String, Arc<Service>, std::hash::BuildHasherDefault<FxHasher>>;

/// A service as the proxy forwards to it (`kong/db/schema/entities/services.lua`).
#[derive(Debug)]
pub struct Service {
    pub id: String,
    pub name: Option<String>,
    pub ws_id: String,
    /// `http`, `https`, `grpc`, `grpcs` (stream protocols are not proxied here).
    pub protocol: String,
    pub host: String,
    pub port: u16,
    pub path: Option<String>,
    pub retries: u32,
    pub connect_timeout: Duration,
    pub write_timeout: Duration,
    pub read_timeout: Duration,
    pub enabled: bool,
}

impl Service {
    /// Parses a stored service.
    pub fn from_entity(ws_id: &str, v: &Value) -> Result<Service, String> {
        let str_field = |f: &str| v[f].as_str().map(str::to_owned);
        let ms = |f: &str, default: u64| Duration::from_millis(v[f].as_u64().unwrap_or(default));
        let protocol = str_field("protocol").unwrap_or_else(|| "http".into());
        if !matches!(protocol.as_str(), "http" | "https" | "grpc" | "grpcs") {
            return Err(format!(
                "protocol {protocol} is not proxied by this data plane (HTTP and gRPC only)"
            ));
        }
        if v["tls_verify"].as_bool() == Some(true) {
            return Err(
                "tls_verify is not supported by this data plane's proxy yet: upstream \
                 certificates are not verified (Kong's default)"
                    .into(),
            );
        }
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
    /// Every change through this store version is in effect. Built from a snapshot taken
    /// after the feed message that named the changes, it may hold some of a later version's
    /// too (that version's own message then brings the rest and the next number).
    pub version: i64,
    pub router: Arc<Router>,
    pub services: Arc<ServiceMap>,
    pub balancers: Arc<Balancers>,
    pub plugins: Arc<Plugins>,
    pub certificates: Arc<Certificates>,
    /// Workspace names by id (prometheus labels by name).
    pub workspaces: Arc<HashMap<String, String>>,
    /// What this configuration left out, and why.
    pub problems: Arc<Vec<Problem>>,
}

impl Gateway {
    /// A configuration with nothing in it (before the first build).
    pub fn empty(exporter: &Arc<Exporter>) -> Gateway {
        let (router, _) = Router::new(std::iter::empty());
        let balancers = Balancers::default();
        let (plugins, _) = Plugins::new(&|_| Vec::new(), None, exporter);
        let (certificates, _) = Certificates::new(&[], &[]);
        Gateway {
            version: 0,
            router: Arc::new(router),
            services: Arc::default(),
            balancers: Arc::new(balancers),
            plugins: Arc::new(plugins),
            certificates: Arc::new(certificates),
            workspaces: Arc::default(),
            problems: Arc::default(),
        }
    }

    /// The name of workspace `ws_id` (`default` when unknown).
    pub fn workspace_name(&self, ws_id: &str) -> &str {
        self.workspaces.get(ws_id).map_or("default", String::as_str)
    }

    /// Whether this configuration may be served: it uses no plugin this data plane cannot
    /// run (the proxy never silently skips one).
    pub fn refusal(&self) -> Option<String> {
        let refused: Vec<String> = self
            .problems
            .iter()
            .filter(|p| p.entity_type == "plugins")
            .map(|p| format!("plugin {}: {}", p.id, p.message))
            .collect();
        (!refused.is_empty()).then(|| refused.join("; "))
    }
}

/// Problems by (entity type, id).
type Problems = BTreeMap<(&'static str, String), String>;

/// Derives each configuration from the previous one and a committed apply.
pub struct Builder {
    exporter: Arc<Exporter>,
    resolver: Arc<Resolver>,
    /// Every stored HTTP route by id, in the router or not (a disabled service's routes).
    routes: HashMap<String, Arc<Route>>,
    /// Route ids by service id, to re-evaluate a service's routes when it changes.
    routes_by_service: HashMap<String, HashSet<String>>,
    problems: Problems,
    current: Arc<Gateway>,
}

impl Builder {
    pub fn new(exporter: Arc<Exporter>, resolver: Arc<Resolver>) -> Builder {
        let current = Arc::new(Gateway::empty(&exporter));
        Builder {
            exporter,
            resolver,
            routes: HashMap::new(),
            routes_by_service: HashMap::new(),
            problems: Problems::new(),
            current,
        }
    }

    /// The configuration built last.
    pub fn current(&self) -> &Arc<Gateway> {
        &self.current
    }

    /// Rebuilds everything from one snapshot (the previous configuration still lends its
    /// balancers' and plugins' runtime state).
    pub fn build(&mut self, snapshot: &Snapshot) -> Result<Arc<Gateway>, DpStoreError> {
        self.update(snapshot, &Changed::All, None)
    }

    /// The configuration after committed applies that changed `changed`, the last of them
    /// `through`, read from `snapshot` (taken after that apply). A snapshot can be newer than
    /// `through`: a later apply committed before the snapshot, its feed message not yet
    /// merged into `changed`. Then only `through` is known to be in effect and is the
    /// configuration's version (or the previous configuration's, if newer). `Changed::All`
    /// rereads everything: the snapshot's version.
    pub fn update(
        &mut self,
        snapshot: &Snapshot,
        changed: &Changed,
        through: Option<i64>,
    ) -> Result<Arc<Gateway>, DpStoreError> {
        let prev = self.current.clone();
        let full = matches!(changed, Changed::All);
        let mut touched_routes: HashSet<String> = HashSet::new();
        let mut services_changed = false;
        let mut rebuild = Rebuild::default();
        let mut services: ServiceMap;
        if full {
            services = ServiceMap::default();
            self.routes.clear();
            self.routes_by_service.clear();
            self.problems
                .retain(|(ty, _), _| !matches!(*ty, "services" | "routes"));
            let problems = &mut self.problems;
            snapshot.for_each("services", &mut |ws, id, v| {
                match Service::from_entity(ws, &v) {
                    Ok(s) => {
                        services.insert(s.id.clone(), Arc::new(s));
                    }
                    Err(m) => {
                        problems.insert(("services", id.to_owned()), m);
                    }
                }
                true
            })?;
            services_changed = true;
            let mut routes = Vec::new();
            snapshot.for_each("routes", &mut |_, id, v| {
                routes.push((id.to_owned(), v));
                true
            })?;
            for (id, v) in routes {
                self.put_route(&id, Some(&v));
            }
            rebuild = Rebuild {
                balancers: true,
                plugins: true,
                certificates: true,
                workspaces: true,
            };
        } else {
            let Changed::Entities(keys) = changed else {
                unreachable!("All is handled above")
            };
            services = ServiceMap::default();
            let mut services_copy: Option<ServiceMap> = None;
            for (ty, id) in keys {
                match ty.as_str() {
                    "services" => {
                        let map = services_copy.get_or_insert_with(|| (*prev.services).clone());
                        self.problems.remove(&("services", id.clone()));
                        map.remove(id);
                        if let Some((ws, v)) = snapshot.get_by_id("services", id)? {
                            match Service::from_entity(&ws, &v) {
                                Ok(s) => {
                                    map.insert(id.clone(), Arc::new(s));
                                }
                                Err(m) => {
                                    self.problems.insert(("services", id.clone()), m);
                                }
                            }
                        }
                        if let Some(ids) = self.routes_by_service.get(id) {
                            touched_routes.extend(ids.iter().cloned());
                        }
                    }
                    "routes" => {
                        let v = snapshot.get_by_id("routes", id)?.map(|(_, v)| v);
                        self.put_route(id, v.as_ref());
                        touched_routes.insert(id.clone());
                    }
                    "upstreams" | "targets" => rebuild.balancers = true,
                    "certificates" | "snis" => rebuild.certificates = true,
                    "workspaces" => rebuild.workspaces = true,
                    t if PLUGIN_INPUTS.contains(&t) => rebuild.plugins = true,
                    _ => {}
                }
            }
            if let Some(map) = services_copy {
                services = map;
                services_changed = true;
            }
        }
        let services = if services_changed {
            Arc::new(services)
        } else {
            prev.services.clone()
        };
        let router = if full {
            let routable = self
                .routes
                .values()
                .filter(|r| routable(r, &services))
                .cloned()
                .collect::<Vec<_>>();
            let (router, errors) = Router::new(routable);
            self.note("routes", errors);
            Arc::new(router)
        } else if touched_routes.is_empty() {
            prev.router.clone()
        } else {
            let removed: Vec<&str> = touched_routes.iter().map(String::as_str).collect();
            let upserted = touched_routes
                .iter()
                .filter_map(|id| self.routes.get(id))
                .filter(|r| routable(r, &services))
                .cloned()
                .collect::<Vec<_>>();
            for id in &touched_routes {
                self.problems.remove(&("routes", id.clone()));
            }
            let (router, errors) = prev.router.update(&removed, upserted);
            self.note("routes", errors);
            Arc::new(router)
        };
        let balancers = if rebuild.balancers {
            self.problems.retain(|(ty, _), _| *ty != "upstreams");
            let (b, errors) = Balancers::new(
                &list(snapshot, "upstreams")?,
                &list(snapshot, "targets")?,
                Some(&prev.balancers),
                &self.resolver,
            );
            self.note("upstreams", errors);
            Arc::new(b)
        } else {
            prev.balancers.clone()
        };
        let plugins = if rebuild.plugins {
            self.problems.retain(|(ty, _), _| *ty != "plugins");
            // Each type is read when the table asks for it, once, without a copy; a read
            // error is kept and returned after.
            let failed: std::cell::RefCell<Option<DpStoreError>> = Default::default();
            let entities = |ty: &str| {
                list(snapshot, ty).unwrap_or_else(|e| {
                    failed.borrow_mut().get_or_insert(e);
                    Vec::new()
                })
            };
            let (p, errors) = Plugins::new(&entities, Some(&prev.plugins), &self.exporter);
            if let Some(e) = failed.into_inner() {
                return Err(e);
            }
            self.note("plugins", errors);
            Arc::new(p)
        } else {
            prev.plugins.clone()
        };
        let certificates = if rebuild.certificates {
            self.problems.retain(|(ty, _), _| *ty != "certificates");
            let (c, errors) =
                Certificates::new(&list(snapshot, "certificates")?, &list(snapshot, "snis")?);
            self.note("certificates", errors);
            Arc::new(c)
        } else {
            prev.certificates.clone()
        };
        let workspaces = if rebuild.workspaces {
            let mut names = HashMap::new();
            snapshot.for_each("workspaces", &mut |_, id, v| {
                if let Some(n) = v["name"].as_str() {
                    names.insert(id.to_owned(), n.to_owned());
                }
                true
            })?;
            Arc::new(names)
        } else {
            prev.workspaces.clone()
        };
        let problems = Arc::new(
            self.problems
                .iter()
                .map(|((ty, id), m)| Problem {
                    entity_type: ty,
                    id: id.clone(),
                    message: m.clone(),
                })
                .collect(),
        );
        let version = match (changed, through) {
            // What the previous configuration had in effect still is (a rebuild after a lag
            // can be ahead of a message read after it).
            (Changed::Entities(_), Some(v)) => v.max(prev.version),
            _ => snapshot.state().version,
        };
        let gw = Arc::new(Gateway {
            version,
            router,
            services,
            balancers,
            plugins,
            certificates,
            workspaces,
            problems,
        });
        self.current = gw.clone();
        Ok(gw)
    }

    /// Records route `id` as stored now (`None`: deleted).
    fn put_route(&mut self, id: &str, v: Option<&Value>) {
        if let Some(old) = self.routes.remove(id)
            && let Some(s) = &old.service_id
            && let Some(set) = self.routes_by_service.get_mut(s)
        {
            set.remove(id);
        }
        self.problems.remove(&("routes", id.to_owned()));
        let Some(v) = v else { return };
        match Route::from_entity(v) {
            Ok(r) => {
                if let Some(s) = &r.service_id {
                    self.routes_by_service
                        .entry(s.clone())
                        .or_default()
                        .insert(r.id.clone());
                }
                self.routes.insert(id.to_owned(), Arc::new(r));
            }
            Err(m) => {
                self.problems.insert(("routes", id.to_owned()), m);
            }
        }
    }

    fn note(&mut self, ty: &'static str, errors: Vec<(String, String)>) {
        for (id, m) in errors {
            self.problems.insert((ty, id), m);
        }
    }
}

/// Every entity of a type with its `ws_id` (the store keeps the workspace beside the body;
/// the plugin table and the balancers index by it, as Kong's entities carry it).
fn list(snapshot: &Snapshot, entity_type: &str) -> Result<Vec<Value>, DpStoreError> {
    let mut out = Vec::new();
    snapshot.for_each(entity_type, &mut |ws, _, mut v| {
        if let Some(m) = v.as_object_mut()
            && !ws.is_empty()
        {
            m.insert("ws_id".into(), Value::String(ws.to_owned()));
        }
        out.push(v);
        true
    })?;
    Ok(out)
}

/// Which derived tables an apply makes stale.
#[derive(Default)]
struct Rebuild {
    balancers: bool,
    plugins: bool,
    certificates: bool,
    workspaces: bool,
}

/// Whether a route goes into the router: Kong leaves out the routes of a disabled service
/// (`kong/runloop/handler.lua` builds the router from routes whose service is enabled); a
/// route without a service stays (it answers 503).
fn routable(route: &Route, services: &ServiceMap) -> bool {
    match &route.service_id {
        None => true,
        Some(id) => services.get(id).is_some_and(|s| s.enabled),
    }
}
