//! The `delta_apply` target: op sequences applied to the DP store and to a reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use redb::StorageBackend;
use redb::backends::InMemoryBackend;
use serde_json::{Value, json};

use crate::dp::store::{ApplyError, ApplyKind, DpState, DpStore, DpStoreOptions};
use crate::dp::v2::apply_stream;
use crate::proto::Delta;
use crate::proto::StateHash;
use crate::schema::Registry;

/// Sequences of delta batches applied to the real redb DP store (on redb's in-memory backend,
/// see [`Memory`]) and to a plain reference model that decides acceptance by the documented
/// rules ([`ApplyKind`], [`crate::dp::store::VersionError`], schema validity known per
/// generated body, foreign keys and unique keys in the final state). After every operation the
/// store equals the model:
/// entities (with workspaces), version, epoch, entity count, state hash (the model's is summed
/// with [`StateHash::of_entity`]), the recomputed hash, the unique-key and foreign-key indexes.
/// A rejected operation leaves all of it untouched, with the error class the model expects;
/// the version only grows, except through a full sync (documented to allow a lower version).
///
/// Input format (missing bytes read as 0), up to [`MAX_OPS`] operations, each `op` byte then:
///
/// - `op % 8` in 0..=2: incremental batch through `begin`/`delta`/`commit`: `params`, `count`,
///   then `count % 9` deltas of 4 bytes (see [`Gen`]); 3: the same as a `get_delta` answer
///   through the DP client's `apply_stream` (deltas go through their wire form);
/// - 4: full sync: `params`, `count`, `count % 13` deltas (direct, or wire when `params` bit 7);
/// - 5: a paged transfer through `DpStore::apply_pages`, its pages decoded into deltas as
///   built; 6: the same with pages as the control plane sends them, their JSON text decoded by
///   the DP client's `decode_page`. `params`: bit 0 full (else incremental), bits 1–2 the
///   version (or `expect_from`), bits 3–4 the epoch (or `latest`), bits 5–7 how the pages
///   arrive (0..=3 in order; 4 page `k` after page `k + 1`, or page `k` twice when it is the
///   last; 5 page `k` missing; 6 cut after `k` pages; 7 a page past the last); `shape`:
///   `shape % 5` pages, `k = shape / 5 % pages`; then each page: `count`, `count % 7` deltas;
/// - 7: close the store and reopen it on the same memory.
///
/// A complete transfer is judged as one batch of all its pages' deltas; one whose pages do not
/// all arrive in order is refused as incomplete (`ApplyError::Staging`) and changes nothing,
/// unless what arrived before the fault already stopped the apply (a stale `expect_from`, a
/// version that does not follow, a page delta the decoder cannot read).
pub fn delta_apply(data: &[u8]) {
    let mut input = Bytes(data);
    let memory = Memory::default();
    let mut store = Some(open_store(&memory));
    let mut model = Model::default();
    // The store as last found equal to the model, `None` once the model has moved on.
    let mut verified: Option<Verified> = None;
    for _ in 0..MAX_OPS {
        let Some(op) = input.next() else { break };
        let dp = store.as_ref().expect("open");
        let before = model.version;
        let (outcome, what, full) = match op % 8 {
            0..=3 => {
                let wire = op % 8 == 3;
                let p = input.byte();
                let expect_from =
                    (model.version + [0, 0, 0, 0, 0, 0, -1, 1][p as usize & 7]).max(0);
                let n = input.byte() % 9;
                let deltas = gen_deltas(&mut input, model.version, n, None);
                let last = deltas.last().map_or(model.version, |g| g.version);
                let latest = match (p >> 3) & 3 {
                    0 | 1 => None,
                    2 => Some(last),
                    _ => Some(if p & 0x80 != 0 { last + 1 } else { last - 1 }),
                };
                let kind = ApplyKind::Incremental {
                    expect_from,
                    latest,
                };
                let (outcome, lens) = run_both(dp, &mut model, &kind, &deltas, wire);
                (
                    outcome,
                    format!("incremental ({lens:?}) {kind:?} {deltas:?}"),
                    false,
                )
            }
            4 => {
                let p = input.byte();
                let version = (model.version + [1, 2, 0, -1, 5, 1, 1, 1][p as usize & 7]).max(0);
                let epoch = [None, Some("e1"), Some("e2"), Some("e1")][(p as usize >> 3) & 3]
                    .map(str::to_owned);
                let n = input.byte() % 13;
                let deltas = gen_deltas(&mut input, version, n, Some(version));
                let kind = ApplyKind::Full { version, epoch };
                let wire = p & 0x80 != 0;
                let (outcome, lens) = run_both(dp, &mut model, &kind, &deltas, wire);
                (
                    outcome,
                    format!("full sync ({lens:?}) {kind:?} {deltas:?}"),
                    true,
                )
            }
            5 | 6 => {
                let as_text = op % 8 == 6;
                let p = input.byte();
                let shape = input.byte();
                let n = usize::from(shape % 5);
                let k = usize::from(shape / 5) % n.max(1);
                let full = (p & 1 != 0)
                    .then(|| (model.version + [1, 0, 2, -1][(p as usize >> 1) & 3]).max(0));
                let mut pages: Vec<Vec<Gen>> = Vec::with_capacity(n);
                let mut cursor = model.version;
                for _ in 0..n {
                    let count = input.byte() % 7;
                    let deltas = gen_deltas(&mut input, cursor, count, full);
                    cursor = deltas.last().map_or(cursor, |g| g.version);
                    pages.push(deltas);
                }
                let kind = match full {
                    Some(version) => ApplyKind::Full {
                        version,
                        epoch: [None, Some("e1"), Some("e2"), Some("e1")][(p as usize >> 3) & 3]
                            .map(str::to_owned),
                    },
                    None => ApplyKind::Incremental {
                        expect_from: (model.version + [0, 0, 1, -1][(p as usize >> 1) & 3]).max(0),
                        latest: [None, Some(cursor), Some(cursor + 1), Some(cursor - 1)]
                            [(p as usize >> 3) & 3],
                    },
                };
                let mut order: Vec<u64> = (0..n as u64).collect();
                match p >> 5 {
                    4 if k + 1 < n => order.swap(k, k + 1),
                    4 => order.push(k as u64),
                    5 if n > 0 => {
                        order.remove(k);
                    }
                    6 => order.truncate(k),
                    7 => order.push(n as u64),
                    _ => {}
                }
                let lens = if as_text {
                    Lens::PageBytes
                } else {
                    Lens::Direct
                };
                let expected = model.run_pages(&kind, &pages, &order, lens);
                let got = run_pages(dp, &kind, &pages, &order, as_text);
                (
                    compare(expected, got, &mut model),
                    format!("paged ({lens:?}) {kind:?} order {order:?} {pages:?}"),
                    full.is_some(),
                )
            }
            _ => {
                drop(store.take());
                store = Some(open_store(&memory));
                (Outcome::Unchanged, "reopen".to_owned(), false)
            }
        };
        let dp = store.as_ref().expect("open");
        if let Outcome::Mismatch(msg) = &outcome {
            panic!("{what}: {msg}");
        }
        if !full {
            assert!(model.version >= before, "{what}: the version went down");
        }
        let last = verified
            .take()
            .filter(|_| !matches!(outcome, Outcome::Changed));
        verified = Some(check_store_or_unchanged(dp, &model, last, &what));
    }
}

/// At most this many operations per input.
const MAX_OPS: usize = 24;

/// Reads input bytes; past the end every byte is 0.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn byte(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }
}

/// The store's memory image ([`InMemoryBackend`]), shared so that the store can be closed and
/// reopened on it as on a file, without the file system.
#[derive(Debug, Clone, Default)]
struct Memory(Arc<InMemoryBackend>);

impl StorageBackend for Memory {
    fn len(&self) -> std::io::Result<u64> {
        self.0.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.0.read(offset, out)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.0.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write(offset, data)
    }
}

fn open_store(memory: &Memory) -> DpStore {
    DpStore::open_with_backend(
        memory.clone(),
        Arc::clone(Registry::builtin()),
        DpStoreOptions {
            cache_size: 1 << 20,
            durable: false,
        },
    )
    .expect("open the DP store")
}

// --- the universe ---

/// The entity types of the universe, parents before children.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ty {
    Service,
    Route,
    Consumer,
    KeyAuth,
    Plugin,
}

const TYPES: [Ty; 5] = [
    Ty::Service,
    Ty::Route,
    Ty::Consumer,
    Ty::KeyAuth,
    Ty::Plugin,
];

/// The two workspaces; the second is rare.
const WS: [&str; 2] = [
    "0a0a0a0a-0000-4000-8000-00000000ffff",
    "0b0b0b0b-0000-4000-8000-00000000ffff",
];

const SERVICE_NAMES: [Option<&str>; 4] = [Some("s-a"), Some("s-b"), Some("s-c"), None];
const ROUTE_NAMES: [Option<&str>; 4] = [Some("r-a"), Some("r-b"), Some("r-c"), None];
const USERNAMES: [Option<&str>; 4] = [Some("alice"), Some("bob"), Some("carol"), None];
const KEYS: [&str; 4] = ["k1", "k2", "k3", "k1"];
const INSTANCE_NAMES: [Option<&str>; 4] = [None, Some("pi-a"), Some("pi-b"), None];
const PLUGIN_NAMES: [&str; 2] = ["key-auth", "cors"];

impl Ty {
    fn name(self) -> &'static str {
        match self {
            Ty::Service => "services",
            Ty::Route => "routes",
            Ty::Consumer => "consumers",
            Ty::KeyAuth => "keyauth_credentials",
            Ty::Plugin => "plugins",
        }
    }

    fn n_ids(self) -> usize {
        match self {
            Ty::Service => 4,
            Ty::Route => 6,
            Ty::Consumer | Ty::KeyAuth | Ty::Plugin => 3,
        }
    }

    fn id(self, idx: usize) -> String {
        format!(
            "{:08x}-0000-4000-8000-{:012x}",
            self as usize + 1,
            idx % self.n_ids()
        )
    }

    fn ids(self) -> impl Iterator<Item = String> {
        (0..self.n_ids()).map(move |i| self.id(i))
    }

    /// Foreign keys: `(field, parent type)`.
    fn foreign(self) -> &'static [(&'static str, Ty)] {
        match self {
            Ty::Service | Ty::Consumer => &[],
            Ty::Route => &[("service", Ty::Service)],
            Ty::KeyAuth => &[("consumer", Ty::Consumer)],
            Ty::Plugin => &[
                ("service", Ty::Service),
                ("route", Ty::Route),
                ("consumer", Ty::Consumer),
            ],
        }
    }

    /// Unique fields and the cache key (`@cache_key`, a JSON array of values, foreign keys as
    /// their ids), as the schemas declare them.
    fn unique_keys(self, e: &Value) -> Vec<(&'static str, Value)> {
        let mut keys = Vec::new();
        let fields: &[&str] = match self {
            Ty::Service | Ty::Route => &["name"],
            Ty::Consumer => &["username", "custom_id"],
            Ty::KeyAuth => &["key"],
            Ty::Plugin => &["instance_name"],
        };
        for f in fields {
            if let Some(v) = e.get(f).filter(|v| !v.is_null()) {
                keys.push((*f, v.clone()));
            }
        }
        let fk = |f: &str| e.get(f).and_then(|v| v.get("id")).cloned();
        match self {
            Ty::KeyAuth => keys.push(("@cache_key", json!([e["key"]]))),
            Ty::Plugin => keys.push((
                "@cache_key",
                json!([e["name"], fk("route"), fk("service"), fk("consumer")]),
            )),
            _ => {}
        }
        keys
    }

    /// Every unique value the generator can produce, to look up absent keys too.
    fn all_unique_values(self) -> Vec<(&'static str, Value)> {
        let mut out = Vec::new();
        match self {
            Ty::Service => out.extend(SERVICE_NAMES.iter().flatten().map(|n| ("name", json!(n)))),
            Ty::Route => out.extend(ROUTE_NAMES.iter().flatten().map(|n| ("name", json!(n)))),
            Ty::Consumer => {
                out.extend(USERNAMES.iter().flatten().map(|n| ("username", json!(n))));
                out.extend((0..4).map(|rev| ("custom_id", json!(format!("cid-{rev}")))));
            }
            Ty::KeyAuth => {
                for k in &KEYS[..3] {
                    out.push(("key", json!(k)));
                    out.push(("@cache_key", json!([k])));
                }
            }
            Ty::Plugin => {
                out.extend(
                    INSTANCE_NAMES
                        .iter()
                        .flatten()
                        .map(|n| ("instance_name", json!(n))),
                );
                for name in PLUGIN_NAMES {
                    for s in Ty::Service.ids() {
                        out.push(("@cache_key", json!([name, null, s, null])));
                    }
                    for r in Ty::Route.ids() {
                        out.push(("@cache_key", json!([name, r, null, null])));
                    }
                }
            }
        }
        out
    }
}

/// A valid stored-form body (what the CP's store writes, see the unit test) of entity `id_idx`
/// of `ty`. `name` picks the unique names, `rev` varies the rest, `parent` the foreign keys.
fn valid_body(ty: Ty, id_idx: usize, name: usize, rev: usize, parent: usize) -> Value {
    let id = ty.id(id_idx);
    let opt = |v: Option<&str>| v.map_or(Value::Null, |s| json!(s));
    match ty {
        Ty::Service => json!({
            "ca_certificates": null, "client_certificate": null, "connect_timeout": 60000,
            "created_at": 1_700_000_000, "enabled": true, "host": "svc.example", "id": id,
            "name": opt(SERVICE_NAMES[name % 4]), "path": null, "port": 80 + rev % 4,
            "protocol": "http", "read_timeout": 60000, "retries": 5, "tags": null,
            "tls_verify": null, "tls_verify_depth": null, "updated_at": 1_700_000_000,
            "write_timeout": 60000
        }),
        Ty::Route => json!({
            "created_at": 1_700_000_000, "destinations": null, "headers": null, "hosts": null,
            "https_redirect_status_code": 426, "id": id, "methods": null,
            "name": opt(ROUTE_NAMES[name % 4]), "path_handling": "v0",
            "paths": [format!("/p{}", rev % 4)], "preserve_host": false,
            "protocols": ["http", "https"], "regex_priority": 0, "request_buffering": true,
            "response_buffering": true, "service": {"id": Ty::Service.id(parent)},
            "snis": null, "sources": null, "strip_path": true, "tags": null,
            "updated_at": 1_700_000_000
        }),
        Ty::Consumer => {
            let username = USERNAMES[name % 4];
            let custom_id = username.is_none().then(|| format!("cid-{}", rev % 4));
            json!({
                "created_at": 1_700_000_000, "custom_id": custom_id, "id": id, "tags": null,
                "updated_at": 1_700_000_000, "username": opt(username)
            })
        }
        Ty::KeyAuth => json!({
            "consumer": {"id": Ty::Consumer.id(parent)}, "created_at": 1_700_000_000, "id": id,
            "key": KEYS[name % 4],
            "tags": if rev.is_multiple_of(4) { Value::Null } else { json!([format!("t{}", rev % 4)]) }
        }),
        Ty::Plugin => {
            let (route, service) = if parent & 0x40 != 0 {
                (json!({"id": Ty::Route.id(parent)}), Value::Null)
            } else {
                (Value::Null, json!({"id": Ty::Service.id(parent)}))
            };
            let plugin = PLUGIN_NAMES[rev % 2];
            let config = if plugin == "key-auth" {
                json!({
                    "anonymous": null, "hide_credentials": false, "key_in_body": false,
                    "key_in_header": true, "key_in_query": true, "key_names": ["apikey"],
                    "realm": null, "run_on_preflight": true
                })
            } else {
                json!({
                    "allow_origin_absent": true, "credentials": false, "exposed_headers": null,
                    "headers": null, "max_age": null,
                    "methods": ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS",
                                "TRACE", "CONNECT"],
                    "origins": null, "preflight_continue": false, "private_network": false
                })
            };
            json!({
                "config": config, "consumer": null, "created_at": 1_700_000_000,
                "enabled": true, "id": id, "instance_name": opt(INSTANCE_NAMES[name % 4]),
                "name": plugin, "ordering": null, "protocols": ["grpc", "grpcs", "http", "https"],
                "route": route, "service": service, "tags": null, "updated_at": 1_700_000_000
            })
        }
    }
}

/// A body its schema rejects: the valid body with one field broken.
fn schema_invalid_body(ty: Ty, id_idx: usize, name: usize, rev: usize, parent: usize) -> Value {
    let mut e = valid_body(ty, id_idx, name, rev, parent);
    match ty {
        Ty::Service => e["port"] = json!("eighty"),
        Ty::Route => e["protocols"] = json!([]),
        Ty::Consumer => {
            e["username"] = Value::Null;
            e["custom_id"] = Value::Null;
        }
        Ty::KeyAuth => e["consumer"] = Value::Null,
        Ty::Plugin => e["config"]["no_such_field"] = json!(1),
    }
    e
}

/// How a generated delta is broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// The body fails its schema.
    Schema,
    /// The delta's id is another entity's; the body is valid for its own id.
    IdMismatch,
    EmptyWs,
    UnknownType,
    /// The entity is a JSON array.
    NotObject,
    /// The id (delta and body) is not a UUID.
    BadId,
}

/// One generated delta, 4 input bytes: `a` type (`a % 5`) and action (`a >> 3 & 3`: 0, 1
/// upsert, 2 delete, 3 a fault `a >> 5 % 6`); `b` id (`b % n`), name (`b >> 3 & 3`), rev
/// (`b >> 6`); `c` foreign keys (`c`), workspace (the second when `c >= 0xe0`); `d` the version
/// step (`d & 7`: mostly +1 for the first delta, +0/+1 after, sometimes a gap or a step back;
/// a full sync's deltas carry its version unless `d & 7 == 7`).
#[derive(Clone)]
struct Gen {
    ty: Ty,
    /// The delta's id.
    id: String,
    ws: String,
    version: i64,
    entity: Option<Value>,
    fault: Fault,
}

impl std::fmt::Debug for Gen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match &self.entity {
            None => "delete".to_owned(),
            Some(e) => format!(
                "upsert name={} {}",
                e.get("name")
                    .or_else(|| e.get("username"))
                    .or_else(|| e.get("key"))
                    .unwrap_or(&Value::Null),
                e.get("instance_name").unwrap_or(&Value::Null)
            ),
        };
        write!(
            f,
            "{{v{} {} {} ws{} {what} {:?}}}",
            self.version,
            self.ty.name(),
            self.id,
            if self.ws == WS[0] { 0 } else { 1 },
            self.fault
        )
    }
}

fn gen_deltas(input: &mut Bytes<'_>, start: i64, n: u8, full: Option<i64>) -> Vec<Gen> {
    let mut out: Vec<Gen> = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (a, b, c, d) = (input.byte(), input.byte(), input.byte(), input.byte());
        let ty = TYPES[a as usize % 5];
        let (id_idx, name, rev, parent) = (
            b as usize % ty.n_ids(),
            (b as usize >> 3) & 3,
            b as usize >> 6,
            c as usize,
        );
        let step = (d & 7) as usize;
        let version = match (full, out.last()) {
            (Some(v), _) => v + i64::from(step == 7),
            (None, None) => start + [1, 1, 1, 1, 1, 1, 2, 0][step],
            (None, Some(prev)) => prev.version + [0, 0, 0, 1, 1, 1, 2, -1][step],
        }
        .max(0);
        let mut g = Gen {
            ty,
            id: ty.id(id_idx),
            ws: WS[usize::from(c >= 0xe0)].to_owned(),
            version,
            entity: Some(valid_body(ty, id_idx, name, rev, parent)),
            fault: Fault::None,
        };
        match (a >> 3) & 3 {
            0 | 1 => {}
            2 => g.entity = None,
            _ => {
                g.fault = [
                    Fault::Schema,
                    Fault::IdMismatch,
                    Fault::EmptyWs,
                    Fault::UnknownType,
                    Fault::NotObject,
                    Fault::BadId,
                ][(a as usize >> 5) % 6];
                match g.fault {
                    Fault::Schema => {
                        g.entity = Some(schema_invalid_body(ty, id_idx, name, rev, parent));
                    }
                    Fault::IdMismatch => g.id = ty.id(id_idx + 1),
                    Fault::EmptyWs => g.ws.clear(),
                    Fault::NotObject => g.entity = Some(json!(["not", "an", "object"])),
                    Fault::BadId => {
                        g.id = format!("not-a-uuid-{id_idx}");
                        if let Some(e) = &mut g.entity {
                            e["id"] = json!(g.id);
                        }
                    }
                    Fault::None | Fault::UnknownType => {}
                }
            }
        }
        out.push(g);
    }
    out
}

fn to_delta(g: &Gen) -> Delta {
    Delta {
        entity_type: if g.fault == Fault::UnknownType {
            "gizmos".to_owned()
        } else {
            g.ty.name().to_owned()
        },
        id: g.id.clone(),
        ws_id: g.ws.clone(),
        version: g.version,
        entity: g.entity.clone(),
    }
}

fn to_deltas(gs: &[Gen]) -> Vec<Delta> {
    gs.iter().map(to_delta).collect()
}

/// A page as the control plane sends it: its JSON text, with a `deltas` array.
fn page_bytes(gs: &[Gen]) -> Vec<u8> {
    let wire: Vec<Value> = to_deltas(gs).iter().map(Delta::to_wire).collect();
    json!({"deltas": wire}).to_string().into_bytes()
}

// --- running on the store ---

/// A committed apply's (version, state hash, entity count), or why it was refused.
type Got = Result<Option<(i64, StateHash, u64)>, ApplyError>;

/// Applies `deltas` to the model and to the store (directly, or through the wire form when
/// `wire`) and compares the two.
fn run_both(
    dp: &DpStore,
    model: &mut Model,
    kind: &ApplyKind,
    deltas: &[Gen],
    wire: bool,
) -> (Outcome, Lens) {
    let lens = if wire { Lens::Wire } else { Lens::Direct };
    let expected = model.run(kind, deltas, lens);
    let got = if wire {
        run_wire(dp, kind, deltas)
    } else {
        run_direct(dp, kind, deltas)
    };
    (compare(expected, got, model), lens)
}

fn run_direct(dp: &DpStore, kind: &ApplyKind, deltas: &[Gen]) -> Got {
    let mut apply = dp.begin(kind.clone())?;
    for g in deltas {
        apply.delta(to_delta(g))?;
    }
    let a = apply.commit()?;
    Ok(Some((a.version, a.state_hash, a.n_entities)))
}

/// As the DP client applies a `get_delta` answer: the deltas' wire form, streamed.
fn run_wire(dp: &DpStore, kind: &ApplyKind, deltas: &[Gen]) -> Got {
    let wire: Vec<Value> = to_deltas(deltas).iter().map(Delta::to_wire).collect();
    let answer = json!({"default": {"deltas": wire}}).to_string();
    match apply_stream(dp, &answer, |_| Some(kind.clone()))? {
        None => Ok(None),
        Some(version) => {
            let s = dp.state();
            assert_eq!(
                s.version, version,
                "apply_stream reports the stored version"
            );
            Ok(Some((s.version, s.state_hash, s.n_entities)))
        }
    }
}

/// A paged transfer of `pages` through [`DpStore::apply_pages`], the pages arriving in
/// `order`: as their JSON text for the DP client's decoder when `as_text`, else as their
/// number, decoded into the page's deltas as built.
fn run_pages(
    dp: &DpStore,
    kind: &ApplyKind,
    pages: &[Vec<Gen>],
    order: &[u64],
    as_text: bool,
) -> Got {
    let n = pages.len() as u64;
    let a = if as_text {
        let arrived: Vec<(u64, Vec<u8>)> = order
            .iter()
            .map(|&no| {
                (
                    no,
                    page_bytes(pages.get(no as usize).map_or(&[], Vec::as_slice)),
                )
            })
            .collect();
        dp.apply_pages("t", kind.clone(), n, arrived, crate::dp::v2::decode_page)?
    } else {
        let deltas: Vec<Vec<Delta>> = pages.iter().map(|p| to_deltas(p)).collect();
        let arrived = order.iter().map(|&no| (no, no.to_le_bytes()));
        dp.apply_pages("t", kind.clone(), n, arrived, |no, bytes, sink| {
            assert_eq!(bytes, no.to_le_bytes(), "the bytes of page {no}");
            for d in &deltas[no as usize] {
                sink(d.clone())?;
            }
            Ok(())
        })?
    };
    Ok(Some((a.version, a.state_hash, a.n_entities)))
}

// --- the reference model ---

/// Why the model refuses an operation (the store's error must be of the same class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reject {
    /// `ApplyError::Version`: conflict, gap, full-sync mismatch, not the latest.
    Version,
    /// `ApplyError::Invalid`: a bad delta, a dangling foreign key, a duplicate unique key.
    Invalid,
    /// `ApplyError::Staging`: a paged transfer whose pages did not all arrive in order.
    Staging,
}

/// How the deltas reach the store: as built (an apply's `delta`, or pages of deltas), or
/// through their wire form (a `get_delta` answer, or pages' JSON text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lens {
    Direct,
    /// `apply_stream`: the apply begins at the first delta.
    Wire,
    /// `apply_pages` with the client's page decoder: the apply begins before the first page.
    PageBytes,
}

/// The model's verdict: the new state, or unchanged (an empty incremental), or a refusal.
#[derive(Debug)]
enum Verdict {
    Commit(Model),
    NoChange,
}

type Entities = BTreeMap<(Ty, String), (String, Value)>;

#[derive(Debug, Clone, Default)]
struct Model {
    entities: Entities,
    version: i64,
    epoch: Option<String>,
}

/// Deltas streamed into an apply, before its commit: the entities they leave (not yet
/// checked against each other), the last version, and whether a delta was invalid.
struct Streamed {
    next: Model,
    last: Option<i64>,
    invalid: bool,
}

impl Model {
    fn hash(&self) -> StateHash {
        let mut h = StateHash::ZERO;
        for ((ty, id), (ws, e)) in &self.entities {
            h.add(&StateHash::of_entity(ty.name(), ws, id, e));
        }
        h
    }

    /// The documented contract of one apply, evaluated in stream order.
    fn run(&self, kind: &ApplyKind, deltas: &[Gen], lens: Lens) -> Result<Verdict, Reject> {
        let incremental = matches!(kind, ApplyKind::Incremental { .. });
        // `apply_stream` begins at the first delta; with none, an incremental is a no-op.
        if lens == Lens::Wire && deltas.is_empty() && incremental {
            return Ok(Verdict::NoChange);
        }
        let Streamed {
            mut next,
            last,
            invalid,
        } = self.stream(kind, deltas, lens)?;
        let version = match kind {
            ApplyKind::Full { version, .. } => *version,
            ApplyKind::Incremental { .. } => last.unwrap_or(self.version),
        };
        if let ApplyKind::Incremental {
            latest: Some(latest),
            ..
        } = kind
            && *latest != version
        {
            return Err(Reject::Version);
        }
        if invalid || !consistent(&next.entities) {
            return Err(Reject::Invalid);
        }
        if incremental && deltas.is_empty() {
            return Ok(Verdict::NoChange);
        }
        next.version = version;
        if let ApplyKind::Full { epoch, .. } = kind {
            next.epoch = epoch.clone();
        }
        Ok(Verdict::Commit(next))
    }

    /// The deltas streamed into an apply, up to its commit. The errors are those that stop
    /// the stream where they occur: a stale `expect_from` (at begin), a version that does not
    /// follow, a delta the wire form cannot carry; an invalid delta is only noted, and
    /// reported at commit.
    fn stream(&self, kind: &ApplyKind, deltas: &[Gen], lens: Lens) -> Result<Streamed, Reject> {
        let begin = || match kind {
            ApplyKind::Incremental { expect_from, .. } if *expect_from != self.version => {
                Err(Reject::Version)
            }
            _ => Ok(()),
        };
        if lens != Lens::Wire {
            begin()?;
        }
        let mut next = self.clone();
        if matches!(kind, ApplyKind::Full { .. }) {
            next.entities.clear();
        }
        let mut last: Option<i64> = None;
        let mut invalid = false;
        for (i, g) in deltas.iter().enumerate() {
            // What the store receives after the lens.
            let (id, fault) = match (lens, g.fault) {
                (Lens::Wire | Lens::PageBytes, Fault::NotObject) => {
                    return Err(Reject::Invalid);
                }
                // Read back from the wire form, the key comes from the entity.
                (Lens::Wire | Lens::PageBytes, Fault::IdMismatch) => {
                    let e = g.entity.as_ref().expect("an upsert");
                    (e["id"].as_str().expect("an id").to_owned(), Fault::None)
                }
                (_, f) => (g.id.clone(), f),
            };
            if lens == Lens::Wire && i == 0 {
                begin()?;
            }
            let ok = match (kind, last) {
                (ApplyKind::Full { version, .. }, _) => g.version == *version,
                (ApplyKind::Incremental { .. }, None) => g.version == self.version + 1,
                (ApplyKind::Incremental { .. }, Some(l)) => g.version == l || g.version == l + 1,
            };
            if !ok {
                return Err(Reject::Version);
            }
            last = Some(g.version);
            if fault != Fault::None {
                invalid = true;
            }
            if invalid {
                continue;
            }
            let key = (g.ty, id);
            match &g.entity {
                Some(e) => {
                    next.entities.insert(key, (g.ws.clone(), e.clone()));
                }
                // A delete in another workspace finds nothing.
                None => {
                    if next.entities.get(&key).is_some_and(|(ws, _)| *ws == g.ws) {
                        next.entities.remove(&key);
                    }
                }
            }
        }
        Ok(Streamed {
            next,
            last,
            invalid,
        })
    }

    /// A paged transfer of `pages`, arriving in `order`. Pages are decoded into the apply as
    /// long as they arrive as 0, 1, 2, …; the first one out of place (or past the last), or
    /// the end of `order` before the last page, cuts the transfer: refused as incomplete,
    /// unless the pages before it already stopped the stream.
    fn run_pages(
        &self,
        kind: &ApplyKind,
        pages: &[Vec<Gen>],
        order: &[u64],
        lens: Lens,
    ) -> Result<Verdict, Reject> {
        let in_order = order
            .iter()
            .zip(0u64..)
            .take_while(|&(&no, expected)| no == expected && no < pages.len() as u64)
            .count();
        let deltas = pages[..in_order].concat();
        if in_order == pages.len() && order.len() == pages.len() {
            return self.run(kind, &deltas, lens);
        }
        self.stream(kind, &deltas, lens)?;
        Err(Reject::Staging)
    }
}

/// Foreign keys resolve (to an entity of the parent type, in any workspace: foreign keys carry
/// only the id) and unique keys are unique per workspace.
fn consistent(entities: &Entities) -> bool {
    let mut seen = BTreeSet::new();
    for ((ty, _), (ws, e)) in entities {
        for (field, parent) in ty.foreign() {
            if let Some(pid) = e
                .get(field)
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                && !entities.contains_key(&(*parent, pid.to_owned()))
            {
                return false;
            }
        }
        for (field, value) in ty.unique_keys(e) {
            if !seen.insert((*ty, ws.clone(), field, value.to_string())) {
                return false;
            }
        }
    }
    true
}

enum Outcome {
    Unchanged,
    Changed,
    Mismatch(String),
}

/// Compares the store's answer to the model's verdict; on agreement the model moves on.
fn compare(expected: Result<Verdict, Reject>, got: Got, model: &mut Model) -> Outcome {
    match (expected, got) {
        (Ok(Verdict::NoChange), Ok(None)) => Outcome::Unchanged,
        (Ok(Verdict::NoChange), Ok(Some((v, h, n)))) => {
            if (v, h, n) == (model.version, model.hash(), model.entities.len() as u64) {
                Outcome::Unchanged
            } else {
                Outcome::Mismatch(format!("expected no change, the store reports {v} {h} {n}"))
            }
        }
        (Ok(Verdict::Commit(next)), Ok(Some((v, h, n)))) => {
            let want = (next.version, next.hash(), next.entities.len() as u64);
            if (v, h, n) != want {
                return Outcome::Mismatch(format!(
                    "committed {v} {h} {n} entities, the model has {want:?}"
                ));
            }
            *model = next;
            Outcome::Changed
        }
        (Ok(Verdict::Commit(next)), Ok(None)) => Outcome::Mismatch(format!(
            "the store applied nothing, the model commits version {}",
            next.version
        )),
        (Ok(_), Err(e)) => {
            Outcome::Mismatch(format!("the model accepts, the store refuses: {e:?}"))
        }
        (Err(r), Ok(x)) => Outcome::Mismatch(format!(
            "the model refuses ({r:?}), the store accepts: {x:?}"
        )),
        (Err(r), Err(e)) => {
            let class = match &e {
                ApplyError::Version(_) => Some(Reject::Version),
                ApplyError::Invalid { .. } => Some(Reject::Invalid),
                ApplyError::Staging { .. } => Some(Reject::Staging),
                _ => None,
            };
            if class == Some(r) {
                Outcome::Unchanged
            } else {
                Outcome::Mismatch(format!(
                    "the model refuses with {r:?}, the store with {e:?}"
                ))
            }
        }
    }
}

/// A store found equal to the model by [`check_store`]: its state and its rows.
struct Verified {
    state: DpState,
    rows: Vec<u8>,
}

/// The store equals the model. When the model has not changed since the store was `last`
/// verified, it is enough that the store has not either: the same state, cached and in a
/// snapshot, and the very same rows (every read is a function of them). Otherwise, and when
/// anything differs, [`check_store`] compares everything with the model.
fn check_store_or_unchanged(
    dp: &DpStore,
    model: &Model,
    last: Option<Verified>,
    what: &str,
) -> Verified {
    let state = dp.state();
    let snapshot = dp.snapshot().expect("a snapshot");
    let rows = snapshot.rows().expect("the store's rows");
    if let Some(last) = last
        && last.state == state
        && snapshot.state() == &state
        && last.rows == rows
    {
        return last;
    }
    check_store(dp, model, what);
    Verified { state, rows }
}

/// The store equals the model: state, recomputed hash, entities, unique keys, foreign keys,
/// all read from one snapshot, which shows the state the store reports.
fn check_store(dp: &DpStore, model: &Model, what: &str) {
    let state = dp.state();
    let snapshot = dp.snapshot().expect("a snapshot");
    assert_eq!(snapshot.state(), &state, "{what}: the snapshot's state");
    assert_eq!(state.version, model.version, "{what}: version");
    assert_eq!(state.epoch, model.epoch, "{what}: epoch");
    assert_eq!(
        state.n_entities,
        model.entities.len() as u64,
        "{what}: entity count"
    );
    assert_eq!(state.state_hash, model.hash(), "{what}: state hash");
    assert_eq!(
        snapshot.compute_state_hash().expect("recompute"),
        state.state_hash,
        "{what}: recomputed state hash"
    );
    // Every unique key the model's entities hold, `(type, ws, field, value, id)`, in the
    // model's order (the first holder is the one a lookup finds).
    let model_keys: Vec<(Ty, &str, &str, Value, &str)> = model
        .entities
        .iter()
        .flat_map(|((ty, id), (ws, e))| {
            ty.unique_keys(e)
                .into_iter()
                .map(move |(field, value)| (*ty, ws.as_str(), field, value, id.as_str()))
        })
        .collect();
    for ty in TYPES {
        let mut stored = Vec::new();
        snapshot
            .for_each(ty.name(), &mut |ws, id, e| {
                stored.push((id.to_owned(), ws.to_owned(), e));
                true
            })
            .expect("for_each");
        let want: Vec<(String, String, Value)> = model
            .entities
            .range((ty, String::new())..)
            .take_while(|((t, _), _)| *t == ty)
            .map(|((_, id), (ws, e))| (id.clone(), ws.clone(), e.clone()))
            .collect();
        assert_eq!(stored, want, "{what}: {} entities", ty.name());
        // Unique keys: every value the generator can produce, held or not.
        for ws in WS {
            for (field, value) in ty.all_unique_values() {
                let holder = model_keys
                    .iter()
                    .find(|(t, w, f, v, _)| *t == ty && *w == ws && *f == field && *v == value)
                    .map(|(_, _, _, _, id)| (*id).to_owned());
                let found = snapshot
                    .find_by_key(ty.name(), ws, field, &value)
                    .unwrap_or_else(|e| {
                        panic!("{what}: find_by_key {} {field}={value}: {e}", ty.name())
                    })
                    .map(|e| e["id"].as_str().unwrap_or_default().to_owned());
                assert_eq!(
                    found,
                    holder,
                    "{what}: {} {field}={value} in ws {ws}",
                    ty.name()
                );
            }
        }
        // Foreign keys: children of every possible parent.
        for (field, parent) in ty.foreign() {
            for pid in parent.ids() {
                let mut found: Vec<String> = snapshot
                    .children(ty.name(), field, &pid)
                    .expect("children")
                    .iter()
                    .map(|e| e["id"].as_str().unwrap_or_default().to_owned())
                    .collect();
                found.sort();
                let want: Vec<String> = model
                    .entities
                    .iter()
                    .filter(|((t, _), (_, e))| {
                        *t == ty && e.get(field).and_then(|v| v.get("id")) == Some(&json!(pid))
                    })
                    .map(|((_, id), _)| id.clone())
                    .collect();
                assert_eq!(
                    found,
                    want,
                    "{what}: {}.{field} children of {pid}",
                    ty.name()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Mode;

    /// The universe's bodies are what the CP stores: `prepare` leaves them unchanged. The
    /// broken ones fail their schema.
    #[test]
    fn universe_bodies_are_stored_forms() {
        let registry = Registry::builtin();
        for ty in TYPES {
            let schema = registry.get(ty.name()).expect("a builtin type");
            for id_idx in 0..ty.n_ids() {
                for name in 0..4 {
                    for rev in 0..4 {
                        for parent in [0, 1, 2, 3, 4, 5, 0x40, 0x45] {
                            let body = valid_body(ty, id_idx, name, rev, parent);
                            let p = registry
                                .prepare(schema, body.clone(), None, Mode::Insert, 1_700_000_000)
                                .unwrap_or_else(|e| panic!("{body}: {}", e.message()));
                            assert_eq!(p.entity, body, "{} stored form", ty.name());
                            let bad = schema_invalid_body(ty, id_idx, name, rev, parent);
                            assert!(
                                registry
                                    .prepare(schema, bad.clone(), None, Mode::Insert, 0)
                                    .is_err(),
                                "{bad} is invalid"
                            );
                        }
                    }
                }
            }
            let mut bad_id = valid_body(ty, 0, 0, 0, 0);
            bad_id["id"] = json!("not-a-uuid-0");
            assert!(
                registry
                    .prepare(schema, bad_id, None, Mode::Insert, 0)
                    .is_err()
            );
        }
    }

    /// The checker is not vacuous: a store that diverges from the model fails it.
    #[test]
    fn check_store_detects_divergence() {
        let dp = open_store(&Memory::default());
        let model = Model::default();
        check_store(&dp, &model, "empty");
        let empty = check_store_or_unchanged(&dp, &model, None, "empty");
        let g = Gen {
            ty: Ty::Consumer,
            id: Ty::Consumer.id(0),
            ws: WS[0].to_owned(),
            version: 1,
            entity: Some(valid_body(Ty::Consumer, 0, 0, 0, 0)),
            fault: Fault::None,
        };
        let kind = ApplyKind::Incremental {
            expect_from: 0,
            latest: None,
        };
        run_direct(&dp, &kind, std::slice::from_ref(&g)).expect("applies");
        let diverged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_store(&dp, &model, "diverged")
        }));
        assert!(diverged.is_err(), "a diverged store is caught");
        // Also when the model did not change: the store's rows did.
        let diverged = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check_store_or_unchanged(&dp, &model, Some(empty), "diverged")
        }));
        assert!(
            diverged.is_err(),
            "a store changed behind the model's back is caught"
        );
        let Ok(Verdict::Commit(next)) = model.run(&kind, &[g], Lens::Direct) else {
            panic!("the model accepts a valid consumer");
        };
        check_store(&dp, &next, "in step");
    }

    /// Hand-written scenarios: a cascade, a gap, a duplicate name, paged transfers.
    #[test]
    fn delta_apply_scenarios() {
        // consumer + credential, then delete both (cascade), then a gap.
        delta_apply(&[
            0, 0, 2, 2, 0, 0, 0, 3, 0, 0,
            0, // incremental: consumer 0, keyauth 0 → consumer 0
            0, 0, 2, 3, 16, 0, 0, 0, 16, 0, 0, 3, // delete keyauth 0, consumer 0 at v2
            0, 0, 1, 2, 0, 0, 6, // a gap: v+2
        ]);
        // Two services with one name in a batch: rejected.
        delta_apply(&[0, 0, 2, 0, 0, 0, 0, 0, 1, 0, 0]);
        // A paged full sync of two pages (service 0, consumer 0), then the same as page
        // text with page 1 missing (refused), then a reopen.
        delta_apply(&[
            5, 1, 2, 1, 0, 0, 0, 0, 1, 2, 0, 0, 0, //
            6, 0xa1, 7, 1, 0, 0, 0, 0, 1, 2, 0, 0, 0, //
            7,
        ]);
        // A paged incremental of three pages (a consumer, its credential, a service) whose
        // last page comes twice (refused), then the same in order; `latest` is the last
        // delta's version.
        delta_apply(&[
            5, 0x88, 13, 1, 2, 0, 0, 0, 1, 3, 0, 0, 0, 1, 0, 0, 0, 0, //
            6, 0x08, 3, 1, 2, 0, 0, 0, 1, 3, 0, 0, 0, 1, 0, 0, 0, 0,
        ]);
    }
}
