//! Reads: entities and pages for the Admin API, the change log and snapshots for sync, and the
//! background purge that keeps the change log bounded.

use std::ops::ControlFlow;

use base64::Engine as _;
use futures::TryStreamExt as _;
use serde_json::Value;

use super::write::canonical;
use super::{Pool, StateHash, Store, StoreError, on_backend};
use crate::node::now_secs;
use crate::proto::v2::{DeltaText, RawDelta};

/// `?tags=` as Kong filters it: `a,b` needs all, `a/b` needs any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    All(Vec<String>),
    Any(Vec<String>),
}

impl TagFilter {
    pub fn parse(s: &str) -> Result<TagFilter, String> {
        if s.contains(',') && s.contains('/') {
            return Err("invalid filter: mixing ',' and '/' is not supported".into());
        }
        let (parts, all): (Vec<&str>, bool) = if s.contains('/') {
            (s.split('/').collect(), false)
        } else {
            (s.split(',').collect(), true)
        };
        let tags: Vec<String> = parts.into_iter().map(str::to_owned).collect();
        if tags.iter().any(String::is_empty) || tags.len() > 5 {
            return Err("invalid filter: tags must be non-empty, at most 5".into());
        }
        Ok(if all {
            TagFilter::All(tags)
        } else {
            TagFilter::Any(tags)
        })
    }
}

/// One page request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub entity: String,
    pub size: usize,
    /// The opaque offset from the previous page.
    pub offset: Option<String>,
    pub tags: Option<TagFilter>,
    /// Only children of this parent: (parent type, parent id, foreign field).
    pub parent: Option<(String, String, String)>,
}

#[derive(Debug, Clone)]
pub struct Page {
    pub data: Vec<Value>,
    /// Offset of the next page, `None` on the last page.
    pub next_offset: Option<String>,
}

/// One row of Kong's `/tags` listing: an entity and one of its tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRow {
    pub entity_id: String,
    /// The entity type (Kong's DAO name, e.g. `keyauth_credentials`).
    pub entity_name: String,
    pub tag: String,
}

/// One page of tag rows.
#[derive(Debug, Clone)]
pub struct TagPage {
    pub data: Vec<TagRow>,
    /// Offset of the next page, `None` on the last page.
    pub next_offset: Option<String>,
}

/// The change log's current state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version: i64,
    pub state_hash: StateHash,
    pub epoch: String,
    /// The oldest version whose deltas are still retained.
    pub oldest_version: i64,
}

/// One delta of the change log, in Kong's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub version: i64,
    pub entity_type: String,
    pub id: String,
    pub ws_id: String,
    /// `None` for a delete.
    pub entity: Option<Value>,
}

impl Change {
    pub fn pk(&self) -> Value {
        serde_json::json!({ "id": self.id })
    }
}

/// One delta as stored: the entity is its canonical JSON text, not parsed, so the sync feed
/// can copy it into a frame without building a tree.
#[derive(Debug, Clone, Copy)]
pub struct RawChange<'a> {
    pub version: i64,
    pub entity_type: &'a str,
    pub id: &'a str,
    pub ws_id: &'a str,
    /// `None` for a delete.
    pub entity: Option<&'a str>,
}

impl<'a> From<&RawChange<'a>> for crate::proto::v2::RawDelta<'a> {
    fn from(c: &RawChange<'a>) -> Self {
        crate::proto::v2::RawDelta {
            version: c.version,
            entity_type: c.entity_type,
            id: c.id,
            ws_id: c.ws_id,
            entity: c.entity,
        }
    }
}

impl RawChange<'_> {
    /// The change with its entity parsed.
    pub fn parsed(&self) -> Result<Change, StoreError> {
        Ok(Change {
            version: self.version,
            entity_type: self.entity_type.to_owned(),
            id: self.id.to_owned(),
            ws_id: self.ws_id.to_owned(),
            entity: self
                .entity
                .map(|e| parse_body(self.entity_type, e))
                .transpose()?,
        })
    }
}

/// The reader is below the change-log horizon: deltas after its version were purged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BehindHorizon {
    pub oldest_version: i64,
}

pub(super) fn encode_offset(id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(canonical(&Value::Array(vec![Value::String(id.to_owned())])))
}

fn decode_offset(offset: &str) -> Result<String, StoreError> {
    decode_offset_value(offset)?
        .get(0)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad_offset(offset))
}

fn bad_offset(offset: &str) -> StoreError {
    StoreError::BadRequest(format!(
        "'{offset}' is not a valid offset: bad base64 encoding"
    ))
}

/// The JSON array an offset encodes.
fn decode_offset_value(offset: &str) -> Result<Value, StoreError> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(offset)
        .map_err(|_| bad_offset(offset))?;
    serde_json::from_slice(&raw).map_err(|_| bad_offset(offset))
}

fn parse_body(ty: &str, body: &str) -> Result<Value, StoreError> {
    serde_json::from_str(body)
        .map_err(|e| StoreError::Internal(format!("corrupt entity in {ty}: {e}")))
}

/// Reads the head, epoch and horizon on connection `$c` (inside the caller's snapshot).
macro_rules! version_info_in {
    ($c:expr) => {{
        let (version, state_hash, epoch): (i64, String, String) =
            sqlx::query_as("SELECT version, state_hash, epoch FROM dp_meta WHERE id = 1")
                .fetch_one(&mut *$c)
                .await?;
        let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(version) FROM dp_versions")
            .fetch_one(&mut *$c)
            .await?;
        VersionInfo {
            version,
            state_hash: StateHash::from_hex(&state_hash)
                .ok_or_else(|| StoreError::Internal("corrupt state hash in dp_meta".into()))?,
            epoch,
            oldest_version: oldest.unwrap_or(version + 1),
        }
    }};
}

/// How much of a SQLite database a snapshot read maps into memory: 1 GiB (SQLite caps it at
/// 2 GiB).
const SNAPSHOT_MMAP: &str = "PRAGMA mmap_size = 1073741824";

/// Entities per row of [`Store::snapshot_text`]'s reads (about 1 MiB of 1 KB entities).
pub const SNAPSHOT_CHUNK: i64 = 1000;

/// One chunk of a type's entities after an id: the bodies, ids and workspace ids each
/// concatenated, with their byte lengths (comma-separated), and the chunk's last id. All the
/// aggregates see the rows in one pass, so in the same order. `$1` type, `$2` the last id of
/// the previous chunk, `$3` [`SNAPSHOT_CHUNK`].
const SNAPSHOT_CHUNK_SQLITE: &str = "SELECT count(*), group_concat(body, ''), group_concat(octet_length(body), ','), group_concat(id, ''), group_concat(octet_length(id), ','), group_concat(ws_id, ''), group_concat(octet_length(ws_id), ','), max(id) FROM (SELECT id, ws_id, body FROM dp_entities WHERE type = $1 AND id > $2 ORDER BY id LIMIT $3)";
/// [`SNAPSHOT_CHUNK_SQLITE`] for PostgreSQL.
const SNAPSHOT_CHUNK_POSTGRES: &str = "SELECT count(*), string_agg(body, ''), string_agg(octet_length(body)::text, ','), string_agg(id, ''), string_agg(octet_length(id)::text, ','), string_agg(ws_id, ''), string_agg(octet_length(ws_id)::text, ','), max(id) FROM (SELECT id, ws_id, body FROM dp_entities WHERE type = $1 AND id > $2 ORDER BY id LIMIT $3) AS chunk";

/// Cuts `text` into the pieces `lengths` (comma-separated byte lengths) says, exactly `n`.
fn cut<'t>(text: &'t str, lengths: &str, n: usize) -> Result<Vec<&'t str>, StoreError> {
    let bad = |why: String| StoreError::Internal(format!("snapshot chunk: {why}"));
    let mut pieces = Vec::with_capacity(n);
    let mut at = 0usize;
    for l in lengths.split(',') {
        let len: usize = l.parse().map_err(|e| bad(format!("length {l:?}: {e}")))?;
        let piece = at
            .checked_add(len)
            .and_then(|end| text.get(at..end))
            .ok_or_else(|| bad(format!("{len} bytes at {at} do not fit the text")))?;
        pieces.push(piece);
        at += len;
    }
    if pieces.len() != n || at != text.len() {
        return Err(bad(format!(
            "{} pieces of {at} bytes for {n} rows of {} bytes",
            pieces.len(),
            text.len()
        )));
    }
    Ok(pieces)
}

macro_rules! read_tx {
    ($pool:expr, $c:ident => $body:expr) => {
        match $pool {
            Pool::Sqlite(p) => {
                let mut $c = p.begin().await?;
                let out = $body;
                $c.commit().await?;
                out
            }
            Pool::Postgres(p) => {
                let mut $c = p
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?;
                let out = $body;
                $c.commit().await?;
                out
            }
        }
    };
}

impl Store {
    /// An entity by id.
    pub async fn get(&self, entity: &str, id: &str) -> Result<Option<Value>, StoreError> {
        let body: Option<String> = on_backend!(self.pool(), p => sqlx::query_scalar("SELECT body FROM dp_entities WHERE type = $1 AND id = $2")
            .bind(entity).bind(id).fetch_optional(p).await?);
        body.map(|b| parse_body(entity, &b)).transpose()
    }

    /// An entity by id or endpoint key, optionally required to belong to a parent.
    pub async fn find(
        &self,
        entity: &str,
        key: &str,
        parent: Option<(&str, &str)>,
    ) -> Result<Option<Value>, StoreError> {
        let schema = self
            .registry()
            .get(entity)
            .cloned()
            .ok_or(StoreError::NotFound)?;
        let mut found = None;
        if crate::schema::is_uuid(key) {
            found = self.get(entity, key).await?;
        } else if let Some(alias) = &schema.alias_key {
            // `/certificates/{sni}`: the entity the named child references.
            let registry = self.registry().clone();
            let child = self.find(&alias.entity, key, None);
            let child = Box::pin(child).await?;
            let pid = registry
                .references_of(&alias.entity)
                .find(|fk| fk.parent == schema.name && !fk.is_array)
                .and_then(|fk| child.as_ref()?.get(&fk.field)?.get("id")?.as_str())
                .map(str::to_owned);
            if let Some(pid) = pid {
                found = self.get(entity, &pid).await?;
            }
        }
        if found.is_none()
            && let Some(ek) = &schema.endpoint_key
        {
            let ws = self.ws().await?;
            let value = canonical(&Value::String(key.to_owned()));
            let unique = schema.field(ek).is_some_and(|f| f.unique);
            let id: Option<String> = if unique {
                on_backend!(self.pool(), p => sqlx::query_scalar("SELECT id FROM dp_keys WHERE type = $1 AND ws_id = $2 AND name = $3 AND value = $4")
                    .bind(entity).bind(&ws).bind(ek).bind(&value).fetch_optional(p).await?)
            } else if let (Some(ck), Some((field, pid))) = (&schema.cache_key, parent) {
                if ck.len() == 2 && ck.contains(ek) && ck.iter().any(|f| f == field) {
                    let parts: Vec<Value> = ck
                        .iter()
                        .map(|f| {
                            if f == ek {
                                Value::String(key.to_owned())
                            } else {
                                Value::String(pid.to_owned())
                            }
                        })
                        .collect();
                    let v = canonical(&Value::Array(parts));
                    on_backend!(self.pool(), p => sqlx::query_scalar("SELECT id FROM dp_keys WHERE type = $1 AND ws_id = $2 AND name = '@cache_key' AND value = $3")
                        .bind(entity).bind(&ws).bind(&v).fetch_optional(p).await?)
                } else {
                    None
                }
            } else {
                None
            };
            if let Some(id) = id {
                found = self.get(entity, &id).await?;
            }
        }
        if let (Some(e), Some((field, pid))) = (&found, parent)
            && e.get(field)
                .and_then(|f| f.get("id"))
                .and_then(Value::as_str)
                != Some(pid)
        {
            return Ok(None);
        }
        Ok(found)
    }

    /// Endpoint keys of the `child` entities that reference `parent_id` (transient fields).
    pub async fn transient_list(
        &self,
        parent: &str,
        parent_id: &str,
        child: &str,
    ) -> Result<Vec<String>, StoreError> {
        let registry = self.registry().clone();
        let Some(fk) = registry
            .references_of(child)
            .find(|fk| fk.parent == parent && !fk.is_array)
        else {
            return Ok(Vec::new());
        };
        let Some(ek) = registry.get(child).and_then(|s| s.endpoint_key.clone()) else {
            return Ok(Vec::new());
        };
        let bodies: Vec<String> = on_backend!(self.pool(), p => sqlx::query_scalar(
            "SELECT e.body FROM dp_refs r JOIN dp_entities e ON e.type = r.child_type AND e.id = r.child_id \
             WHERE r.parent_type = $1 AND r.parent_id = $2 AND r.child_type = $3 AND r.field = $4")
            .bind(parent).bind(parent_id).bind(child).bind(&fk.field).fetch_all(p).await?);
        let mut names = Vec::new();
        for b in bodies {
            if let Some(name) = parse_body(child, &b)?.get(&ek).and_then(Value::as_str) {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// One page of a collection, in id order (keyset pagination: a walk during concurrent
    /// writes returns every row that existed throughout exactly once).
    pub async fn list(&self, q: &ListQuery) -> Result<Page, StoreError> {
        let after = match &q.offset {
            Some(o) => decode_offset(o)?,
            None => String::new(),
        };
        let limit = q.size as i64 + 1;
        let mut sql = String::from("SELECT e.id, e.body FROM dp_entities e");
        let mut binds: Vec<String> = vec![q.entity.clone(), after];
        if let Some((pt, pid, field)) = &q.parent {
            sql.push_str(" JOIN dp_refs r ON r.child_type = e.type AND r.child_id = e.id AND r.parent_type = $3 AND r.parent_id = $4 AND r.field = $5");
            binds.extend([pt.clone(), pid.clone(), field.clone()]);
        }
        sql.push_str(" WHERE e.type = $1 AND e.id > $2");
        if let Some(filter) = &q.tags {
            let (tags, all) = match filter {
                TagFilter::All(t) => (t, true),
                TagFilter::Any(t) => (t, false),
            };
            let first = binds.len() + 1;
            let placeholders: Vec<String> =
                (0..tags.len()).map(|i| format!("${}", first + i)).collect();
            binds.extend(tags.iter().cloned());
            if all {
                sql.push_str(&format!(
                    " AND e.id IN (SELECT id FROM dp_tags WHERE type = $1 AND tag IN ({}) GROUP BY id HAVING COUNT(*) = {})",
                    placeholders.join(", "),
                    tags.len()
                ));
            } else {
                sql.push_str(&format!(
                    " AND e.id IN (SELECT id FROM dp_tags WHERE type = $1 AND tag IN ({}))",
                    placeholders.join(", ")
                ));
            }
        }
        sql.push_str(&format!(" ORDER BY e.id LIMIT {limit}"));
        let rows: Vec<(String, String)> = on_backend!(self.pool(), p => {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
            for b in &binds {
                query = query.bind(b);
            }
            query.fetch_all(p).await?
        });
        let has_more = rows.len() > q.size;
        let mut data = Vec::with_capacity(rows.len().min(q.size));
        let mut last_id = None;
        for (id, body) in rows.into_iter().take(q.size) {
            data.push(parse_body(&q.entity, &body)?);
            last_id = Some(id);
        }
        let next_offset = if has_more {
            last_id.map(|id| encode_offset(&id))
        } else {
            None
        };
        Ok(Page { data, next_offset })
    }

    /// One page of every (entity, tag) pair, or of the entities carrying `tag`, across all
    /// entity types, in entity id order (then tag), keyset-paginated as [`Store::list`] is.
    /// Kong's `/tags` and `/tags/{tag}` (`kong/db/strategies/postgres/tags.lua`).
    pub async fn list_tags(
        &self,
        tag: Option<&str>,
        size: usize,
        offset: Option<&str>,
    ) -> Result<TagPage, StoreError> {
        let (after_id, after_tag) = match offset {
            Some(o) => {
                let v = decode_offset_value(o)?;
                let id = v.get(0).and_then(Value::as_str).map(str::to_owned);
                let tag = v.get(1).and_then(Value::as_str).map(str::to_owned);
                match id {
                    Some(id) => (id, tag.unwrap_or_default()),
                    None => return Err(bad_offset(o)),
                }
            }
            None => (String::new(), String::new()),
        };
        let limit = size as i64 + 1;
        let rows: Vec<(String, String, String)> = match tag {
            Some(tag) => on_backend!(self.pool(), p => sqlx::query_as(
                "SELECT id, type, tag FROM dp_tags WHERE tag = $1 AND id > $2 ORDER BY id LIMIT $3")
                .bind(tag).bind(&after_id).bind(limit).fetch_all(p).await?),
            None => on_backend!(self.pool(), p => sqlx::query_as(
                "SELECT id, type, tag FROM dp_tags WHERE id > $1 OR (id = $1 AND tag > $2) \
                 ORDER BY id, tag LIMIT $3")
                .bind(&after_id).bind(&after_tag).bind(limit).fetch_all(p).await?),
        };
        let has_more = rows.len() > size;
        let data: Vec<TagRow> = rows
            .into_iter()
            .take(size)
            .map(|(entity_id, entity_name, tag)| TagRow {
                entity_id,
                entity_name,
                tag,
            })
            .collect();
        let next_offset = match (has_more, data.last()) {
            (true, Some(last)) => {
                let mut key = vec![Value::String(last.entity_id.clone())];
                if tag.is_none() {
                    key.push(Value::String(last.tag.clone()));
                }
                Some(
                    base64::engine::general_purpose::URL_SAFE_NO_PAD
                        .encode(canonical(&Value::Array(key))),
                )
            }
            _ => None,
        };
        Ok(TagPage { data, next_offset })
    }

    /// The head of the change log.
    pub async fn version_info(&self) -> Result<VersionInfo, StoreError> {
        Ok(read_tx!(self.pool(), c => version_info_in!(c)))
    }

    /// The state hash recorded at a retained version.
    pub async fn state_hash_at(&self, version: i64) -> Result<Option<StateHash>, StoreError> {
        let h: Option<String> = on_backend!(self.pool(), p => sqlx::query_scalar("SELECT state_hash FROM dp_versions WHERE version = $1")
            .bind(version).fetch_optional(p).await?);
        Ok(h.and_then(|h| StateHash::from_hex(&h)))
    }

    /// Streams the deltas of versions after `after`, in version order, at most `max_versions`
    /// whole versions, to `f`. The horizon check and the read share one snapshot.
    /// Returns the head at that snapshot (its `version` capped at the last version read), or
    /// `Err(BehindHorizon)` when history was purged. An error from `f` ends the read.
    pub async fn changes_after(
        &self,
        after: i64,
        max_versions: i64,
        mut f: impl FnMut(Change) -> Result<(), StoreError> + Send,
    ) -> Result<Result<VersionInfo, BehindHorizon>, StoreError> {
        let mut failed = None;
        let head = self
            .changes_after_raw(after, max_versions, |c| match c.parsed().and_then(&mut f) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            })
            .await?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok(head.map(|info| VersionInfo {
            version: after.saturating_add(max_versions.max(1)).min(info.version),
            ..info
        }))
    }

    /// Like [`Store::changes_after`], with entities as stored text. `f` returns
    /// `ControlFlow::Break` to stop early (the caller keeps track of where it stopped).
    /// The returned head is the snapshot's, not where the caller stopped.
    pub async fn changes_after_raw(
        &self,
        after: i64,
        max_versions: i64,
        mut f: impl FnMut(RawChange<'_>) -> ControlFlow<()> + Send,
    ) -> Result<Result<VersionInfo, BehindHorizon>, StoreError> {
        Ok(read_tx!(self.pool(), c => {
            let info = version_info_in!(c);
            if after < info.oldest_version - 1 {
                Err(BehindHorizon { oldest_version: info.oldest_version })
            } else {
                let upto = after.saturating_add(max_versions.max(1)).min(info.version);
                let mut rows = sqlx::query_as::<_, (i64, String, String, String, Option<String>)>(
                    "SELECT version, type, pk, ws_id, entity FROM dp_changes WHERE version > $1 AND version <= $2 ORDER BY version, seq")
                    .bind(after)
                    .bind(upto)
                    .fetch(&mut *c);
                while let Some((version, ty, pk, ws_id, entity)) = rows.try_next().await? {
                    let id = serde_json::from_str::<Value>(&pk).ok().and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned)).unwrap_or_default();
                    let change = RawChange { version, entity_type: &ty, id: &id, ws_id: &ws_id, entity: entity.as_deref() };
                    if f(change).is_break() {
                        break;
                    }
                }
                drop(rows);
                Ok(info)
            }
        }))
    }

    /// Like [`Store::snapshot`], with entities as stored text. `f` returns
    /// `ControlFlow::Break` to stop early.
    pub async fn snapshot_raw(
        &self,
        mut f: impl FnMut(RawChange<'_>) -> ControlFlow<()> + Send,
    ) -> Result<VersionInfo, StoreError> {
        let types: Vec<String> = self.registry().entities().map(|s| s.name.clone()).collect();
        Ok(read_tx!(self.pool(), c => {
            let info = version_info_in!(c);
            'types: for ty in &types {
                let mut rows = sqlx::query_as::<_, (String, String, String)>("SELECT id, ws_id, body FROM dp_entities WHERE type = $1 ORDER BY id")
                    .bind(ty)
                    .fetch(&mut *c);
                while let Some((id, ws_id, body)) = rows.try_next().await? {
                    if f(RawChange { version: info.version, entity_type: ty, id: &id, ws_id: &ws_id, entity: Some(&body) }).is_break() {
                        break 'types;
                    }
                }
            }
            info
        }))
    }

    /// The whole current configuration as delta text, what a full sync sends: the same text,
    /// in the same order (dependency order, by id within a type), as [`DeltaText::push`] of
    /// each [`RawChange`] of [`Store::snapshot_raw`], at the version it is the state of. One
    /// snapshot.
    ///
    /// The database sends [`SNAPSHOT_CHUNK`] entities to a row (their texts concatenated,
    /// with their lengths): a row per entity cost more than the entity (issue 11: SQLite's
    /// reading thread and ours handed each row over, 100k times for 100k entities).
    pub async fn snapshot_text(&self) -> Result<(VersionInfo, DeltaText), StoreError> {
        let types: Vec<String> = self.registry().entities().map(|s| s.name.clone()).collect();
        let mut out = DeltaText::new();
        macro_rules! read_all {
            ($c:ident, $sql:expr) => {{
                let info = version_info_in!($c);
                for ty in &types {
                    let mut after = String::new();
                    loop {
                        type Chunk = (
                            i64,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                            Option<String>,
                        );
                        let (n, bodies, body_lens, ids, id_lens, wss, ws_lens, last): Chunk =
                            sqlx::query_as($sql)
                                .bind(ty)
                                .bind(&after)
                                .bind(SNAPSHOT_CHUNK)
                                .fetch_one(&mut *$c)
                                .await?;
                        let (
                            Some(bodies),
                            Some(body_lens),
                            Some(ids),
                            Some(id_lens),
                            Some(wss),
                            Some(ws_lens),
                            Some(last),
                        ) = (bodies, body_lens, ids, id_lens, wss, ws_lens, last)
                        else {
                            break;
                        };
                        let rows = usize::try_from(n).unwrap_or(0);
                        let bodies = cut(&bodies, &body_lens, rows)?;
                        let ids = cut(&ids, &id_lens, rows)?;
                        let wss = cut(&wss, &ws_lens, rows)?;
                        for ((id, ws_id), body) in ids.into_iter().zip(wss).zip(bodies) {
                            out.push(&RawDelta {
                                version: info.version,
                                entity_type: ty,
                                id,
                                ws_id,
                                entity: Some(body),
                            });
                        }
                        if n < SNAPSHOT_CHUNK {
                            break;
                        }
                        after = last;
                    }
                }
                info
            }};
        }
        let info = match self.pool() {
            Pool::Sqlite(p) => {
                // Rows come in key order, which visits the table's pages at random: with
                // SQLite's default cache, one pread per row. Mapped for the read, they are
                // memory reads; unmapped after it, so an idle connection maps nothing.
                let mut conn = p.acquire().await?;
                sqlx::query(SNAPSHOT_MMAP).execute(&mut *conn).await?;
                let read = async {
                    let mut c = sqlx::Connection::begin(&mut *conn).await?;
                    let out = read_all!(c, SNAPSHOT_CHUNK_SQLITE);
                    c.commit().await?;
                    Ok::<_, StoreError>(out)
                }
                .await;
                let _ = sqlx::query("PRAGMA mmap_size = 0")
                    .execute(&mut *conn)
                    .await;
                read?
            }
            Pool::Postgres(p) => {
                let mut c = p
                    .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?;
                let out = read_all!(c, SNAPSHOT_CHUNK_POSTGRES);
                c.commit().await?;
                out
            }
        };
        out.shrink_to_fit();
        Ok((info, out))
    }

    /// Streams the whole current configuration in dependency order (parents first) to `f`,
    /// and returns the version it is the state of. One snapshot. An error from `f` ends the
    /// read.
    pub async fn snapshot(
        &self,
        mut f: impl FnMut(Change) -> Result<(), StoreError> + Send,
    ) -> Result<VersionInfo, StoreError> {
        let mut failed = None;
        let info = self
            .snapshot_raw(|c| match c.parsed().and_then(&mut f) {
                Ok(()) => ControlFlow::Continue(()),
                Err(e) => {
                    failed = Some(e);
                    ControlFlow::Break(())
                }
            })
            .await?;
        match failed {
            Some(e) => Err(e),
            None => Ok(info),
        }
    }

    /// Deletes at most `batch` of the oldest versions that are both older than `max_age_secs`
    /// and more than `keep_versions` behind the head. Returns how many versions went.
    pub async fn purge_once(
        &self,
        max_age_secs: i64,
        keep_versions: i64,
        batch: i64,
    ) -> Result<u64, StoreError> {
        let age_cut = now_secs() - max_age_secs;
        let n = on_backend!(self.pool(), p => {
            let mut c = p.begin().await?;
            let head: i64 = sqlx::query_scalar("SELECT version FROM dp_meta WHERE id = 1").fetch_one(&mut *c).await?;
            // Retained versions stay a contiguous suffix even if clocks of several CPs disagree:
            // stop at the first version that is still young.
            let first_young: Option<i64> = sqlx::query_scalar("SELECT MIN(version) FROM dp_versions WHERE created_at >= $1")
                .bind(age_cut).fetch_one(&mut *c).await?;
            let mut bound = head - keep_versions;
            if let Some(y) = first_young {
                bound = bound.min(y);
            }
            let oldest: Option<i64> = sqlx::query_scalar("SELECT MIN(version) FROM dp_versions").fetch_one(&mut *c).await?;
            let Some(oldest) = oldest else { return Ok(0) };
            let upto = bound.min(oldest + batch);
            if upto <= oldest {
                c.commit().await?;
                0
            } else {
                sqlx::query("DELETE FROM dp_changes WHERE version < $1").bind(upto).execute(&mut *c).await?;
                let r = sqlx::query("DELETE FROM dp_versions WHERE version < $1").bind(upto).execute(&mut *c).await?;
                c.commit().await?;
                r.rows_affected()
            }
        });
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::cut;

    /// A snapshot chunk's column is cut by its lengths, and lengths that do not cut it into
    /// exactly the rows' pieces (or split a character) are an error, never a wrong delta.
    #[test]
    fn chunk_columns_cut_by_their_lengths() {
        assert_eq!(
            cut("abcdéf", "3,4", 2).unwrap(),
            vec!["abc", "déf"],
            "lengths are bytes"
        );
        assert_eq!(cut("", "0", 1).unwrap(), vec![""]);
        for (text, lengths, n) in [
            ("abcdef", "3,4", 2), // past the end
            ("abcdef", "3,2", 2), // short of it
            ("abcdef", "3,3", 3), // another row count
            ("abcdéf", "5,2", 2), // inside a character
            ("abcdef", "3,x", 2), // not a length
        ] {
            assert!(cut(text, lengths, n).is_err(), "{text} {lengths} {n}");
        }
    }
}
