//! The plugin table of one configuration, and the phases that walk it.
//!
//! Which configuration of a plugin applies (`kong/runloop/plugins_iterator.lua`,
//! `lookup_cfg`), most specific first: route+service+consumer, route+consumer,
//! service+consumer, route+service, consumer, route, service, global. The access phase
//! resolves each plugin in priority order with the consumer known at that point, so a plugin
//! scoped to a consumer applies once an auth plugin of higher priority set that consumer. Every
//! plugin is resolved (collected for the response and log phases) even after one answered, as
//! Kong's collecting iterator does; only the access handlers stop running.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::Full;
use serde_json::Value;

use super::clock::Clock;
use super::prometheus::Exporter;
use super::ratelimit::Counters;
use super::request::{Consumer, Credential, Ctx, LogEntry};
use super::util::foreign_id;
use super::{acl, basicauth, cors, ip, jwt, keyauth, prometheus, ratelimit};

/// The parsed configuration of one plugin entity.
pub(super) enum Conf {
    /// cors.
    Cors(cors::CorsConf),
    /// jwt.
    Jwt(jwt::JwtConf),
    /// key-auth.
    KeyAuth(keyauth::KeyAuthConf),
    /// basic-auth.
    BasicAuth(basicauth::BasicAuthConf),
    /// ip-restriction.
    IpRestriction(ip::IpConf),
    /// acl.
    Acl(acl::AclConf),
    /// rate-limiting.
    RateLimiting(ratelimit::RateLimitConf),
    /// prometheus.
    Prometheus(prometheus::PrometheusConf),
}

/// One enabled plugin entity, parsed.
pub struct PluginInstance {
    /// The plugin entity's id.
    pub(super) id: String,
    /// The route it is scoped to.
    pub(super) route_id: Option<String>,
    /// The service it is scoped to.
    pub(super) service_id: Option<String>,
    /// The parsed config.
    pub(super) conf: Conf,
}

/// The plugins by priority, highest first: the index into [`WsPlugins::by_plugin`].
const ORDER: [&str; 8] = [
    "cors",
    "jwt",
    "key-auth",
    "basic-auth",
    "ip-restriction",
    "acl",
    "rate-limiting",
    "prometheus",
];

/// The combinations of `lookup_cfg`, most specific first: (route, service, consumer) set.
const COMBOS: [(bool, bool, bool); 8] = [
    (true, true, true),
    (true, false, true),
    (false, true, true),
    (true, true, false),
    (false, false, true),
    (true, false, false),
    (false, true, false),
    (false, false, false),
];

/// The configs of one plugin in one workspace, by Kong's compound key.
#[derive(Default)]
struct Combos {
    /// `route:service:consumer` (empty for unset) to the instance.
    by_key: HashMap<String, Arc<PluginInstance>>,
    /// Which of [`COMBOS`] have at least one entry (bit i for COMBOS[i]), to skip lookups.
    present: u8,
}

/// The plugins of one workspace.
#[derive(Default)]
struct WsPlugins {
    /// One entry per plugin of [`ORDER`].
    by_plugin: [Combos; 8],
}

/// A basic-auth credential: the credential and its stored (hashed) password.
pub(super) struct BasicCredential {
    /// The credential.
    pub(super) credential: Credential,
    /// `sha1_hex(password .. consumer_id)`, as stored.
    pub(super) password_hash: String,
}

/// A key-auth credential, with its expiry when the entity has a `ttl`.
pub(super) struct KeyCredential {
    /// The credential.
    pub(super) credential: Credential,
    /// When it expires (ms since the epoch): the table's build time plus the entity's `ttl`
    /// seconds, as `ttl` is the time left when the entity is read. A `ttl` of 0 is expired
    /// (key-auth's `load_credential`).
    pub(super) expires_ms: Option<u64>,
}

/// A jwt secret (`jwt_secrets` entity).
pub(super) struct JwtSecret {
    /// The credential (identifier: the key).
    pub(super) credential: Credential,
    /// The algorithm (default HS256).
    pub(super) algorithm: String,
    /// The HMAC secret.
    pub(super) secret: Option<String>,
    /// The public key PEM.
    pub(super) rsa_public_key: Option<String>,
}

/// Consumers and credentials of one workspace, indexed for lookup.
#[derive(Default)]
pub(super) struct WsData {
    /// Consumers by id.
    pub(super) consumers_by_id: HashMap<String, Arc<Consumer>>,
    /// Consumers by username.
    pub(super) consumers_by_username: HashMap<String, Arc<Consumer>>,
    /// key-auth credentials by key.
    pub(super) keyauth: HashMap<String, KeyCredential>,
    /// basic-auth credentials by username.
    pub(super) basicauth: HashMap<String, BasicCredential>,
    /// jwt secrets by key.
    pub(super) jwt: HashMap<String, JwtSecret>,
    /// ACL groups by consumer id, in the order the entities came.
    pub(super) acls: HashMap<String, Vec<String>>,
}

impl WsData {
    /// Kong's `kong.client.load_consumer(id_or_username, true)`: by id, then by username.
    pub(super) fn load_consumer(&self, id_or_username: &str) -> Option<Arc<Consumer>> {
        self.consumers_by_id
            .get(id_or_username)
            .or_else(|| self.consumers_by_username.get(id_or_username))
            .cloned()
    }
}

/// The plugin table of one configuration: which plugin configs exist, consumers and their
/// credentials and ACL groups, indexed for per-request lookup. Send + Sync.
pub struct Plugins {
    /// Plugins by workspace id.
    plugins: HashMap<String, WsPlugins>,
    /// Consumers and credentials by workspace id.
    data: HashMap<String, WsData>,
    /// An empty workspace, for requests in a workspace with no entities.
    empty: WsData,
    /// Rate-limiting counters, shared with the previous and next tables.
    pub(super) counters: Arc<Counters>,
    /// The prometheus exporter (long-lived).
    pub(super) exporter: Arc<Exporter>,
    /// The time source.
    pub(super) clock: Clock,
    /// Whether any plugin is configured at all (fast path).
    has_plugins: bool,
}

/// The workspace of an entity (`ws_id`), or the empty string when it has none.
fn ws_of(entity: &Value) -> String {
    entity
        .get("ws_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// Whether a plugin's protocols include one of the http subsystem (Kong's
/// `should_process_plugin`); a plugin with no `protocols` field is kept.
fn runs_on_http(plugin: &Value) -> bool {
    match plugin.get("protocols").and_then(Value::as_array) {
        None => true,
        Some(protocols) => protocols
            .iter()
            .filter_map(Value::as_str)
            .any(|p| matches!(p, "http" | "https" | "grpc" | "grpcs" | "ws" | "wss")),
    }
}

impl Plugins {
    /// `entities(type)` returns every stored entity of a type (plugins, consumers,
    /// keyauth_credentials, basicauth_credentials, jwt_secrets, acls). Disabled plugins
    /// (`enabled: false`) are left out. A plugin whose name is not in EXECUTED, or whose
    /// config this DP cannot run (e.g. rate-limiting policy redis), is an error in the list
    /// (plugin id, message): the caller refuses the whole configuration then.
    ///
    /// Rate-limiting counters and the clock carry over from `previous`.
    pub fn new(
        entities: &dyn Fn(&str) -> Vec<Value>,
        previous: Option<&Plugins>,
        exporter: &Arc<Exporter>,
    ) -> (Plugins, Vec<(String, String)>) {
        let mut errors = Vec::new();
        let mut data: HashMap<String, WsData> = HashMap::new();
        let (counters, clock) = match previous {
            Some(previous) => (previous.counters.clone(), previous.clock.clone()),
            None => (Arc::new(Counters::default()), Clock::system()),
        };
        load_consumers(entities, &mut data);
        load_credentials(entities, &mut data, clock.now_ms());

        let mut plugins: HashMap<String, WsPlugins> = HashMap::new();
        let mut has_plugins = false;
        let mut upstream_health = false;
        for plugin in entities("plugins") {
            let id = plugin
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let name = plugin
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some(index) = ORDER.iter().position(|n| *n == name) else {
                errors.push((
                    id,
                    format!("plugin '{name}' not enabled; add it to the 'plugins' configuration property"),
                ));
                continue;
            };
            if plugin.get("enabled").and_then(Value::as_bool) == Some(false)
                || !runs_on_http(&plugin)
            {
                continue;
            }
            let empty = Value::Object(Default::default());
            let config = plugin.get("config").unwrap_or(&empty);
            let conf = match parse_conf(name, config) {
                Ok(conf) => conf,
                Err(message) => {
                    errors.push((id, format!("{name}: {message}")));
                    continue;
                }
            };
            if let Conf::Prometheus(p) = &conf {
                upstream_health |= p.upstream_health_metrics;
            }
            let route_id = foreign_id(&plugin, "route");
            let service_id = foreign_id(&plugin, "service");
            let consumer_id = foreign_id(&plugin, "consumer");
            let combo = COMBOS
                .iter()
                .position(|c| {
                    *c == (
                        route_id.is_some(),
                        service_id.is_some(),
                        consumer_id.is_some(),
                    )
                })
                .unwrap_or(7);
            let key = compound_key(
                route_id.as_deref(),
                service_id.as_deref(),
                consumer_id.as_deref(),
            );
            let instance = Arc::new(PluginInstance {
                id,
                route_id,
                service_id,
                conf,
            });
            let combos = &mut plugins.entry(ws_of(&plugin)).or_default().by_plugin[index];
            combos.present |= 1 << combo;
            combos.by_key.insert(key, instance);
            has_plugins = true;
        }
        exporter.set_upstream_health_enabled(upstream_health);

        let table = Plugins {
            plugins,
            data,
            empty: WsData::default(),
            counters,
            exporter: exporter.clone(),
            clock,
            has_plugins,
        };
        (table, errors)
    }

    /// Replaces the time source (tests move a manual clock); later tables built with this one
    /// as `previous` keep it.
    pub fn set_clock(&mut self, clock: Clock) {
        self.clock = clock;
    }

    /// The consumers and credentials of a workspace.
    pub(super) fn ws_data(&self, ws_id: &str) -> &WsData {
        self.data.get(ws_id).unwrap_or(&self.empty)
    }

    /// Kong's `lookup_cfg` for one plugin with the request's route, service and consumer.
    fn lookup(&self, ws: &WsPlugins, index: usize, ctx: &Ctx) -> Option<Arc<PluginInstance>> {
        let combos = &ws.by_plugin[index];
        if combos.present == 0 {
            return None;
        }
        let route = ctx.route_id.as_deref();
        let service = ctx.service_id.as_deref();
        let consumer = ctx.consumer.as_ref().map(|c| c.id.as_str());
        for (i, (r, s, c)) in COMBOS.iter().enumerate() {
            if combos.present & (1 << i) == 0 {
                continue;
            }
            if (*r && route.is_none()) || (*s && service.is_none()) || (*c && consumer.is_none()) {
                continue;
            }
            let key = compound_key(
                if *r { route } else { None },
                if *s { service } else { None },
                if *c { consumer } else { None },
            );
            if let Some(found) = combos.by_key.get(&key) {
                return Some(found.clone());
            }
        }
        None
    }

    /// Runs the access phase in priority order with Kong's configuration precedence
    /// (route+service+consumer … global), re-resolving each plugin's config after an
    /// auth plugin set the consumer. Returns `Some(response)` when a plugin answers
    /// (401/403/429/preflight...), else None and `ctx` carries the changes to make
    /// (request headers set/removed, query args removed for hide_credentials, body...).
    ///
    /// The proxy passes the returned response (or the upstream's) through
    /// [`Plugins::response`] exactly once, as Kong runs `header_filter` on both.
    /// Whether no plugin is configured at all: the proxy then skips every phase.
    pub fn is_empty(&self) -> bool {
        !self.has_plugins
    }

    pub async fn access(&self, ctx: &mut Ctx) -> Option<Response<Full<Bytes>>> {
        if !self.has_plugins {
            return None;
        }
        let ws = self.plugins.get(&ctx.ws_id)?;
        let mut answer: Option<Response<Full<Bytes>>> = None;
        for index in 0..ORDER.len() {
            let Some(instance) = self.lookup(ws, index, ctx) else {
                continue;
            };
            match &instance.conf {
                Conf::Cors(_) => ctx.cors = Some(instance.clone()),
                Conf::Prometheus(_) => ctx.prometheus = Some(instance.clone()),
                _ => {}
            }
            if answer.is_some() {
                continue;
            }
            answer = match &instance.conf {
                Conf::Cors(conf) => cors::access(conf, ctx),
                Conf::Jwt(conf) => jwt::access(self, conf, ctx),
                Conf::KeyAuth(conf) => keyauth::access(self, conf, ctx).await,
                Conf::BasicAuth(conf) => basicauth::access(self, conf, ctx),
                Conf::IpRestriction(conf) => ip::access(conf, ctx),
                Conf::Acl(conf) => acl::access(self, conf, ctx),
                Conf::RateLimiting(conf) => ratelimit::access(self, &instance, conf, ctx),
                Conf::Prometheus(_) => None,
            };
            if let Some(response) = &answer {
                tracing::debug!(plugin = %instance.id, status = %response.status(), "plugin answered");
            }
        }
        answer
    }

    /// Header-filter phase on the upstream's (or any) response: cors and rate-limiting
    /// headers, in Kong's order.
    ///
    /// The rate-limiting headers were stored in the access phase (Kong sets them on the
    /// response there), then cors' `header_filter` runs.
    pub fn response(&self, ctx: &Ctx, status: StatusCode, headers: &mut HeaderMap) {
        let _ = status;
        for (name, value) in &ctx.rate_limit_headers {
            if let Ok(value) = http::HeaderValue::from_str(value) {
                headers.insert(name.clone(), value);
            }
        }
        if let Some(instance) = &ctx.cors
            && let Conf::Cors(conf) = &instance.conf
        {
            cors::header_filter(conf, ctx, headers);
        }
    }

    /// Log phase (prometheus).
    pub fn log(&self, ctx: &Ctx, log: &LogEntry) {
        if let Some(instance) = &ctx.prometheus
            && let Conf::Prometheus(conf) = &instance.conf
        {
            self.exporter.log(conf, ctx, log);
        }
    }
}

/// Kong's `build_compound_key`: `route:service:consumer`, empty for unset.
fn compound_key(route: Option<&str>, service: Option<&str>, consumer: Option<&str>) -> String {
    format!(
        "{}:{}:{}",
        route.unwrap_or(""),
        service.unwrap_or(""),
        consumer.unwrap_or("")
    )
}

/// Parses a plugin's config by name.
fn parse_conf(name: &str, config: &Value) -> Result<Conf, String> {
    Ok(match name {
        "cors" => Conf::Cors(cors::CorsConf::parse(config)?),
        "jwt" => Conf::Jwt(jwt::JwtConf::parse(config)?),
        "key-auth" => Conf::KeyAuth(keyauth::KeyAuthConf::parse(config)?),
        "basic-auth" => Conf::BasicAuth(basicauth::BasicAuthConf::parse(config)?),
        "ip-restriction" => Conf::IpRestriction(ip::IpConf::parse(config)?),
        "acl" => Conf::Acl(acl::AclConf::parse(config)?),
        "rate-limiting" => Conf::RateLimiting(ratelimit::RateLimitConf::parse(config)?),
        "prometheus" => Conf::Prometheus(prometheus::PrometheusConf::parse(config)),
        other => {
            return Err(format!(
                "plugin '{other}' is not executed by this data plane"
            ));
        }
    })
}

/// Indexes consumers by id and username, per workspace.
fn load_consumers(entities: &dyn Fn(&str) -> Vec<Value>, data: &mut HashMap<String, WsData>) {
    for consumer in entities("consumers") {
        let Some(id) = consumer.get("id").and_then(Value::as_str) else {
            continue;
        };
        let consumer_arc = Arc::new(Consumer {
            id: id.to_owned(),
            username: consumer
                .get("username")
                .and_then(Value::as_str)
                .map(str::to_owned),
            custom_id: consumer
                .get("custom_id")
                .and_then(Value::as_str)
                .map(str::to_owned),
        });
        let ws = data.entry(ws_of(&consumer)).or_default();
        if let Some(username) = &consumer_arc.username {
            ws.consumers_by_username
                .insert(username.clone(), consumer_arc.clone());
        }
        ws.consumers_by_id.insert(id.to_owned(), consumer_arc);
    }
}

/// Indexes credentials and ACL groups, per workspace. Entities missing their key fields are
/// skipped (logged): they cannot authenticate anything.
fn load_credentials(
    entities: &dyn Fn(&str) -> Vec<Value>,
    data: &mut HashMap<String, WsData>,
    now_ms: u64,
) {
    let base = |e: &Value, identifier: Option<&str>| -> Option<Credential> {
        let id = e.get("id").and_then(Value::as_str)?;
        let consumer_id = foreign_id(e, "consumer")?;
        Some(Credential {
            id: id.to_owned(),
            consumer_id,
            identifier: identifier.unwrap_or(id).to_owned(),
        })
    };
    for e in entities("keyauth_credentials") {
        let key = e.get("key").and_then(Value::as_str);
        match (key, base(&e, None)) {
            (Some(key), Some(credential)) => {
                let expires_ms = e
                    .get("ttl")
                    .and_then(Value::as_f64)
                    .map(|ttl| now_ms.saturating_add((ttl.max(0.0) * 1000.0) as u64));
                data.entry(ws_of(&e)).or_default().keyauth.insert(
                    key.to_owned(),
                    KeyCredential {
                        credential,
                        expires_ms,
                    },
                );
            }
            _ => tracing::warn!("keyauth_credential without key, id or consumer skipped"),
        }
    }
    for e in entities("basicauth_credentials") {
        let username = e.get("username").and_then(Value::as_str);
        let password = e.get("password").and_then(Value::as_str);
        match (username, password, base(&e, username)) {
            (Some(username), Some(password), Some(credential)) => {
                data.entry(ws_of(&e)).or_default().basicauth.insert(
                    username.to_owned(),
                    BasicCredential {
                        credential,
                        password_hash: password.to_owned(),
                    },
                );
            }
            _ => tracing::warn!(
                "basicauth_credential without username, password or consumer skipped"
            ),
        }
    }
    for e in entities("jwt_secrets") {
        let key = e.get("key").and_then(Value::as_str);
        match (key, base(&e, key)) {
            (Some(key), Some(credential)) => {
                data.entry(ws_of(&e)).or_default().jwt.insert(
                    key.to_owned(),
                    JwtSecret {
                        credential,
                        algorithm: e
                            .get("algorithm")
                            .and_then(Value::as_str)
                            .unwrap_or("HS256")
                            .to_owned(),
                        secret: e.get("secret").and_then(Value::as_str).map(str::to_owned),
                        rsa_public_key: e
                            .get("rsa_public_key")
                            .and_then(Value::as_str)
                            .map(str::to_owned),
                    },
                );
            }
            _ => tracing::warn!("jwt_secret without key or consumer skipped"),
        }
    }
    for e in entities("acls") {
        let group = e.get("group").and_then(Value::as_str);
        match (group, foreign_id(&e, "consumer")) {
            (Some(group), Some(consumer_id)) => {
                data.entry(ws_of(&e))
                    .or_default()
                    .acls
                    .entry(consumer_id)
                    .or_default()
                    .push(group.to_owned());
            }
            _ => tracing::warn!("acl without group or consumer skipped"),
        }
    }
}
