//! The data-plane store against a real control-plane store: deltas read from the CP's change
//! log (SQLite) applied to a DP store beside it, the two compared entity by entity and by state
//! hash. Both planes are needed, so these tests live here rather than in `dp::store`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use deltaplane::cp::store::{Change, Op, Store, StoreOptions, VersionInfo};
use deltaplane::dp::store::{
    Applied, ApplyError, ApplyKind, DeltaSink, DpStore, DpStoreOptions, VersionError,
};
use deltaplane::proto::Delta;
use deltaplane::schema::Registry;
use deltaplane::schema::index::CACHE_KEY;
use serde_json::{Value, json};

fn upsert(version: i64, ty: &str, ws: &str, entity: Value) -> Delta {
    Delta {
        entity_type: ty.into(),
        id: entity["id"].as_str().unwrap().to_owned(),
        ws_id: ws.into(),
        version,
        entity: Some(entity),
    }
}

fn delete(version: i64, ty: &str, ws: &str, id: &str) -> Delta {
    Delta {
        entity_type: ty.into(),
        id: id.into(),
        ws_id: ws.into(),
        version,
        entity: None,
    }
}

// --- synced from a control-plane store ---

/// A CP store on a temporary SQLite file and a DP store beside it.
struct Env {
    dir: tempfile::TempDir,
    cp: Store,
    dp: DpStore,
}

impl Env {
    async fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let cp = Store::open(StoreOptions::sqlite_in(dir.path()))
            .await
            .unwrap();
        let dp = open_dp(&dir.path().join("dp.redb"));
        Env { dir, cp, dp }
    }

    fn dp_path(&self) -> PathBuf {
        self.dir.path().join("dp.redb")
    }

    fn reopen(&mut self) {
        // The old handle must close first: redb refuses a second open of the same file.
        let scratch = tempfile::tempdir().unwrap();
        self.dp = open_dp(&scratch.path().join("scratch.redb"));
        self.dp = open_dp(&self.dp_path());
    }

    async fn create(&self, entity: &str, input: Value) -> String {
        let out = self
            .cp
            .write(Op::Create {
                entity: entity.into(),
                input,
                scope: None,
            })
            .await
            .unwrap();
        out.entity.unwrap()["id"].as_str().unwrap().to_owned()
    }

    async fn patch(&self, entity: &str, key: &str, input: Value) {
        self.cp
            .write(Op::Patch {
                entity: entity.into(),
                key: key.into(),
                input,
                scope: None,
            })
            .await
            .unwrap();
    }

    async fn delete(&self, entity: &str, key: &str) {
        self.cp
            .write(Op::Delete {
                entity: entity.into(),
                key: key.into(),
                scope: None,
            })
            .await
            .unwrap();
    }

    async fn snapshot(&self) -> (Vec<Delta>, VersionInfo) {
        let mut deltas = Vec::new();
        let info = self
            .cp
            .snapshot(|c| {
                deltas.push(to_delta(c));
                Ok(())
            })
            .await
            .unwrap();
        (deltas, info)
    }

    async fn changes_after(&self, after: i64) -> (Vec<Delta>, i64) {
        let mut deltas = Vec::new();
        let info = self
            .cp
            .changes_after(after, i64::MAX, |c| {
                deltas.push(to_delta(c));
                Ok(())
            })
            .await
            .unwrap()
            .unwrap();
        (deltas, info.version)
    }

    async fn full_sync(&self) -> Applied {
        let (deltas, info) = self.snapshot().await;
        self.dp
            .apply(
                ApplyKind::Full {
                    version: info.version,
                    epoch: Some(info.epoch),
                },
                deltas,
            )
            .unwrap()
    }

    async fn incremental_sync(&self) -> Applied {
        let from = self.dp.state().version;
        let (deltas, latest) = self.changes_after(from).await;
        self.dp
            .apply(
                ApplyKind::Incremental {
                    expect_from: from,
                    latest: Some(latest),
                },
                deltas,
            )
            .unwrap()
    }

    /// The DP holds exactly the CP's configuration at the CP's head.
    #[track_caller]
    fn assert_synced_to(&self, info: &VersionInfo) {
        let state = self.dp.state();
        assert_eq!(state.version, info.version);
        assert_eq!(state.state_hash, info.state_hash, "cached state hash");
        assert_eq!(
            self.dp.compute_state_hash().unwrap(),
            info.state_hash,
            "recomputed state hash"
        );
    }

    async fn assert_synced(&self) {
        let info = self.cp.version_info().await.unwrap();
        self.assert_synced_to(&info);
    }

    fn ws(&self) -> String {
        self.dp.list("workspaces").unwrap()[0]["id"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

fn open_dp(path: &Path) -> DpStore {
    DpStore::open(
        path,
        Arc::clone(Registry::builtin()),
        DpStoreOptions::recommended(),
    )
    .unwrap()
}

fn to_delta(c: Change) -> Delta {
    Delta {
        entity_type: c.entity_type,
        id: c.id,
        ws_id: c.ws_id,
        version: c.version,
        entity: c.entity,
    }
}

/// Services, routes, a consumer with a key-auth credential, and a plugin.
async fn populate(env: &Env) -> (String, String, String) {
    let s1 = env
        .create("services", json!({"name": "s1", "host": "one.example"}))
        .await;
    let s2 = env
        .create(
            "services",
            json!({"name": "s2", "url": "http://two.example:8080/p"}),
        )
        .await;
    for (name, svc) in [("r1", &s1), ("r2", &s1), ("r3", &s2)] {
        env.create(
            "routes",
            json!({"name": name, "paths": [format!("/{name}")], "service": {"id": svc}}),
        )
        .await;
    }
    let alice = env.create("consumers", json!({"username": "alice"})).await;
    env.create(
        "keyauth_credentials",
        json!({"key": "alice-key", "consumer": {"id": alice}}),
    )
    .await;
    env.create(
        "plugins",
        json!({"name": "key-auth", "service": {"id": s1}}),
    )
    .await;
    (s1, s2, alice)
}

#[tokio::test]
async fn full_then_incremental_match_the_cp() {
    let env = Env::new().await;
    let (s1, s2, alice) = populate(&env).await;
    let applied = env.full_sync().await;
    env.assert_synced().await;
    assert_eq!(applied.n_entities, 1 + 2 + 3 + 1 + 1 + 1);
    assert_eq!(env.dp.state().n_entities, applied.n_entities);
    let epoch = env.cp.version_info().await.unwrap().epoch;
    assert_eq!(env.dp.state().epoch, Some(epoch.clone()));
    let ws = env.ws();
    assert_eq!(env.dp.children("routes", "service", &s1).unwrap().len(), 2);
    assert_eq!(
        env.dp
            .find_by_key("keyauth_credentials", &ws, "key", &json!("alice-key"))
            .unwrap()
            .unwrap()["consumer"]["id"],
        json!(alice)
    );

    // A unique field changes, a route moves, a consumer goes with its credential (cascade).
    env.patch("services", &s1, json!({"name": "s1-renamed"}))
        .await;
    let r2 = env
        .dp
        .find_by_key("routes", &ws, "name", &json!("r2"))
        .unwrap()
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    env.patch("routes", &r2, json!({"service": {"id": s2}}))
        .await;
    env.delete("consumers", &alice).await;
    let bob = env.create("consumers", json!({"username": "bob"})).await;
    env.create(
        "keyauth_credentials",
        json!({"key": "alice-key", "consumer": {"id": bob}}),
    )
    .await;
    let before = env.dp.state().version;
    let applied = env.incremental_sync().await;
    assert!(applied.version > before + 4);
    env.assert_synced().await;
    assert_eq!(
        env.dp.state().epoch,
        Some(epoch),
        "incremental keeps the epoch"
    );

    let find = |ty: &str, field: &str, v: &str| {
        env.dp
            .find_by_key(ty, &ws, field, &json!(v))
            .unwrap()
            .map(|e| e["id"].as_str().unwrap().to_owned())
    };
    assert_eq!(find("services", "name", "s1"), None);
    assert_eq!(find("services", "name", "s1-renamed"), Some(s1.clone()));
    assert_eq!(find("consumers", "username", "alice"), None);
    assert_eq!(find("consumers", "username", "bob"), Some(bob.clone()));
    let cred = env
        .dp
        .find_by_key("keyauth_credentials", &ws, "key", &json!("alice-key"))
        .unwrap()
        .unwrap();
    assert_eq!(cred["consumer"]["id"], json!(bob));
    // The cache key (`keyauth_credentials.cache_key = [key]`) follows too.
    assert_eq!(
        env.dp
            .find_by_key("keyauth_credentials", &ws, CACHE_KEY, &json!(["alice-key"]))
            .unwrap()
            .unwrap()["id"],
        cred["id"]
    );
    assert_eq!(env.dp.children("routes", "service", &s1).unwrap().len(), 1);
    assert_eq!(env.dp.children("routes", "service", &s2).unwrap().len(), 2);
    assert!(
        env.dp
            .children("keyauth_credentials", "consumer", &alice)
            .unwrap()
            .is_empty()
    );
    assert_eq!(env.dp.get("consumers", &ws, &alice).unwrap(), None);
    assert_eq!(
        env.dp.get("services", &ws, &s1).unwrap().unwrap()["name"],
        json!("s1-renamed")
    );
    assert_eq!(env.dp.get("services", "other-ws", &s1).unwrap(), None);
    assert_eq!(env.dp.list("routes").unwrap().len(), 3);

    // Nothing new: an empty incremental batch is a no-op at the same version.
    let same = env.incremental_sync().await;
    assert_eq!(same.version, applied.version);
    assert_eq!(same.n_deltas, 0);
    env.assert_synced().await;
}

#[tokio::test]
async fn many_small_versions_keep_the_hash() {
    let env = Env::new().await;
    env.full_sync().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        match i % 3 {
            0 | 1 => ids.push(
                env.create(
                    "consumers",
                    json!({"username": format!("u{i}"), "tags": ["t"]}),
                )
                .await,
            ),
            _ => {
                let id = ids.remove(0);
                env.patch("consumers", &id, json!({"custom_id": format!("c{i}")}))
                    .await;
                if i % 2 == 0 {
                    env.delete("consumers", &id).await;
                }
            }
        }
        // Every few writes, one incremental apply of everything new.
        if i % 4 == 3 {
            env.incremental_sync().await;
            env.assert_synced().await;
        }
    }
    env.incremental_sync().await;
    env.assert_synced().await;
}

/// Every rejected batch leaves entities, version, state hash and indexes as they were.
#[tokio::test]
async fn rejected_batches_change_nothing() {
    let env = Env::new().await;
    let (s1, _, _) = populate(&env).await;
    env.full_sync().await;
    let ws = env.ws();
    let state = env.dp.state();
    let v = state.version;
    let svc = env.dp.get("services", &ws, &s1).unwrap().unwrap();
    let new_id = "5f1c5a1a-0000-4000-8000-000000000001";
    let mut new_svc = svc.clone();
    new_svc["id"] = json!(new_id);
    new_svc["name"] = json!("fresh");
    let route = env
        .dp
        .find_by_key("routes", &ws, "name", &json!("r1"))
        .unwrap()
        .unwrap();

    let inc = |expect_from| ApplyKind::Incremental {
        expect_from,
        latest: None,
    };
    let check_unchanged = |what: &str| {
        assert_eq!(env.dp.state(), state, "{what}: state");
        assert_eq!(
            env.dp.compute_state_hash().unwrap(),
            state.state_hash,
            "{what}: stored entities"
        );
        assert_eq!(env.dp.get("services", &ws, new_id).unwrap(), None, "{what}");
        assert_eq!(
            env.dp.get("services", &ws, &s1).unwrap().as_ref(),
            Some(&svc),
            "{what}"
        );
        assert!(
            env.dp
                .find_by_key("services", &ws, "name", &json!("fresh"))
                .unwrap()
                .is_none(),
            "{what}: index"
        );
    };
    let invalid = |res: Result<Applied, ApplyError>, ty: &str, id: &str| match res {
        Err(ApplyError::Invalid {
            message,
            fields,
            flattened,
        }) => {
            assert!(message.starts_with("sync deltas is invalid: "), "{message}");
            assert!(fields[ty][id].is_object(), "{fields}");
            assert_eq!(flattened[0]["entity_type"], json!(ty));
            assert_eq!(flattened[0]["entity_id"], json!(id));
            assert!(!flattened[0]["errors"].as_array().unwrap().is_empty());
        }
        other => panic!("expected Invalid for {ty} {id}, got {other:?}"),
    };

    // Bad schema: the valid new service in the same batch is not written either.
    let mut bad = svc.clone();
    bad["port"] = json!("eighty");
    let res = env.dp.apply(
        inc(v),
        [
            upsert(v + 1, "services", &ws, new_svc.clone()),
            upsert(v + 1, "services", &ws, bad),
        ],
    );
    match &res {
        Err(ApplyError::Invalid { fields, .. }) => {
            assert_eq!(
                fields["services"][&s1]["port"],
                json!("expected an integer")
            )
        }
        other => panic!("{other:?}"),
    }
    check_unchanged("bad schema");

    // Unknown type, id mismatch, missing workspace.
    let mut thing = new_svc.clone();
    thing["id"] = json!("x");
    invalid(
        env.dp.apply(inc(v), [upsert(v + 1, "gizmos", &ws, thing)]),
        "gizmos",
        "x",
    );
    let mut mismatch = upsert(v + 1, "services", &ws, new_svc.clone());
    mismatch.id = s1.clone();
    invalid(env.dp.apply(inc(v), [mismatch]), "services", &s1);
    invalid(
        env.dp
            .apply(inc(v), [upsert(v + 1, "services", "", new_svc.clone())]),
        "services",
        new_id,
    );
    check_unchanged("shape");

    // A dangling foreign key.
    let mut orphan = route.clone();
    orphan["id"] = json!("5f1c5a1a-0000-4000-8000-000000000002");
    orphan["name"] = json!("orphan");
    orphan["paths"] = json!(["/orphan"]);
    orphan["service"] = json!({"id": new_id});
    invalid(
        env.dp
            .apply(inc(v), [upsert(v + 1, "routes", &ws, orphan.clone())]),
        "routes",
        "5f1c5a1a-0000-4000-8000-000000000002",
    );
    // The same route is fine when its service comes in the same batch.
    // (Checked below, after all rejections.)

    // Deleting a service that stored routes still reference.
    invalid(
        env.dp.apply(inc(v), [delete(v + 1, "services", &ws, &s1)]),
        "services",
        &s1,
    );
    // A unique key taken by another entity.
    let mut dup = new_svc.clone();
    dup["name"] = json!("s1");
    invalid(
        env.dp.apply(inc(v), [upsert(v + 1, "services", &ws, dup)]),
        "services",
        new_id,
    );
    check_unchanged("references and keys");

    // Versions: a gap, an old version again, a stale expect_from, a wrong latest, a version
    // going backwards inside the batch.
    for (kind, deltas, expected) in [
        (
            inc(v),
            vec![upsert(v + 2, "services", &ws, new_svc.clone())],
            VersionError::Gap {
                after: v,
                got: v + 2,
            },
        ),
        (
            inc(v),
            vec![upsert(v, "services", &ws, new_svc.clone())],
            VersionError::Gap { after: v, got: v },
        ),
        (
            inc(v),
            vec![
                upsert(v + 1, "services", &ws, new_svc.clone()),
                upsert(v + 2, "services", &ws, new_svc.clone()),
                upsert(v + 1, "services", &ws, new_svc.clone()),
            ],
            VersionError::Gap {
                after: v + 2,
                got: v + 1,
            },
        ),
        (
            ApplyKind::Incremental {
                expect_from: v,
                latest: Some(v + 3),
            },
            vec![upsert(v + 1, "services", &ws, new_svc.clone())],
            VersionError::NotLatest {
                last: v + 1,
                latest: v + 3,
            },
        ),
    ] {
        match env.dp.apply(kind, deltas) {
            Err(ApplyError::Version(e)) => assert_eq!(e, expected),
            other => panic!("expected {expected:?}, got {other:?}"),
        }
    }
    match env.dp.begin(inc(v - 1)) {
        Err(ApplyError::Version(VersionError::Conflict { expected, stored })) => {
            assert_eq!((expected, stored), (v - 1, v))
        }
        Err(e) => panic!("{e:?}"),
        Ok(_) => panic!("a stale expect_from was accepted"),
    }
    // A full sync whose deltas carry another version.
    assert!(matches!(
        env.dp.apply(
            ApplyKind::Full {
                version: v + 5,
                epoch: None
            },
            [upsert(v + 4, "services", &ws, new_svc.clone())]
        ),
        Err(ApplyError::Version(VersionError::FullSyncMismatch { .. }))
    ));
    // Dropping an Apply after writing a whole chunk aborts it.
    {
        let mut apply = env.dp.begin(inc(v)).unwrap();
        apply
            .delta(upsert(v + 1, "services", &ws, new_svc.clone()))
            .unwrap();
        apply.flush().unwrap();
    }
    check_unchanged("versions");

    // The store is not wedged: the orphan route with its service in one batch applies.
    let applied = env
        .dp
        .apply(
            inc(v),
            [
                upsert(v + 1, "services", &ws, new_svc.clone()),
                upsert(v + 2, "routes", &ws, orphan),
            ],
        )
        .unwrap();
    assert_eq!(applied.version, v + 2);
    assert_eq!(
        env.dp.children("routes", "service", new_id).unwrap().len(),
        1
    );
    assert_eq!(env.dp.compute_state_hash().unwrap(), applied.state_hash);
}

/// Within one batch a unique value may pass from one entity to another; only the final
/// state counts.
#[tokio::test]
async fn unique_values_may_swap_within_a_batch() {
    let env = Env::new().await;
    let (s1, s2, _) = populate(&env).await;
    env.full_sync().await;
    let ws = env.ws();
    let v = env.dp.state().version;
    let mut a = env.dp.get("services", &ws, &s1).unwrap().unwrap();
    let mut b = env.dp.get("services", &ws, &s2).unwrap().unwrap();
    a["name"] = json!("s2");
    b["name"] = json!("s1");
    let applied = env
        .dp
        .apply(
            ApplyKind::Incremental {
                expect_from: v,
                latest: Some(v + 1),
            },
            [
                upsert(v + 1, "services", &ws, a),
                upsert(v + 1, "services", &ws, b),
            ],
        )
        .unwrap();
    assert_eq!(applied.version, v + 1);
    let find = |name: &str| {
        env.dp
            .find_by_key("services", &ws, "name", &json!(name))
            .unwrap()
            .unwrap()["id"]
            .clone()
    };
    assert_eq!(find("s1"), json!(s2));
    assert_eq!(find("s2"), json!(s1));
    assert_eq!(env.dp.compute_state_hash().unwrap(), applied.state_hash);
}

#[tokio::test]
async fn restart_keeps_version_hash_and_entities() {
    let mut env = Env::new().await;
    let (s1, _, _) = populate(&env).await;
    env.full_sync().await;
    env.patch("services", &s1, json!({"name": "after"})).await;
    env.incremental_sync().await;
    let state = env.dp.state();
    env.reopen();
    assert_eq!(env.dp.state(), state);
    env.assert_synced().await;
    let ws = env.ws();
    assert_eq!(
        env.dp
            .find_by_key("services", &ws, "name", &json!("after"))
            .unwrap()
            .unwrap()["id"],
        json!(s1)
    );
    env.create("consumers", json!({"username": "late"})).await;
    env.incremental_sync().await;
    env.assert_synced().await;
}

/// A page as these tests encode it: a JSON array of wire deltas.
fn page_bytes(deltas: &[Delta]) -> Vec<u8> {
    serde_json::to_vec(&deltas.iter().map(Delta::to_wire).collect::<Vec<_>>()).unwrap()
}

/// Pages numbered from 0, as `DpStore::apply_pages` receives them.
fn numbered(pages: impl IntoIterator<Item = Vec<u8>>) -> Vec<(u64, Vec<u8>)> {
    (0..).zip(pages).collect()
}

/// Decodes [`page_bytes`] pages.
fn decode_page(page_no: u64, bytes: &[u8], sink: &mut DeltaSink<'_>) -> Result<(), ApplyError> {
    let deltas: Vec<Value> = serde_json::from_slice(bytes).map_err(|e| ApplyError::Staging {
        transfer_id: String::new(),
        reason: format!("page {page_no}: {e}"),
    })?;
    for d in deltas {
        sink(Delta::from_wire(d).unwrap())?;
    }
    Ok(())
}

/// A paged transfer (full or incremental) commits as one apply of all its pages, and until
/// then readers see the previous configuration. A page missing, pages out of order, or a
/// transfer cut short is refused and changes nothing.
#[tokio::test]
async fn paged_transfers_commit_as_one_apply() {
    let env = Env::new().await;
    populate(&env).await;
    let (deltas, info) = env.snapshot().await;
    let pages = numbered(deltas.chunks(3).map(page_bytes));
    let kind = ApplyKind::Full {
        version: info.version,
        epoch: Some(info.epoch.clone()),
    };
    let applied = env
        .dp
        .apply_pages("t1", kind, pages.len() as u64, pages, decode_page)
        .unwrap();
    assert_eq!(applied.n_deltas, deltas.len() as u64);
    env.assert_synced_to(&info);

    let s9 = env
        .create("services", json!({"name": "s9", "host": "nine.example"}))
        .await;
    env.create("services", json!({"name": "s10", "host": "ten.example"}))
        .await;
    let (deltas, info2) = env.snapshot().await;
    let pages = numbered(deltas.chunks(3).map(page_bytes));
    let n = pages.len() as u64;
    let kind = ApplyKind::Full {
        version: info2.version,
        epoch: Some(info2.epoch.clone()),
    };
    let mut swapped = pages.clone();
    swapped.swap(0, 1);
    for arrived in [
        pages[1..].to_vec(),
        swapped,
        pages[..pages.len() - 1].to_vec(),
    ] {
        let res = env
            .dp
            .apply_pages("t2", kind.clone(), n, arrived, decode_page);
        assert!(matches!(res, Err(ApplyError::Staging { .. })), "{res:?}");
        env.assert_synced_to(&info);
    }

    // An incremental transfer, one version a page; between pages the old config is read.
    let (changes, latest) = env.changes_after(info.version).await;
    assert_eq!((changes.len(), latest), (2, info2.version));
    let ws = env.ws();
    let dp = env.dp.clone();
    let arrived = numbered(changes.chunks(1).map(page_bytes))
        .into_iter()
        .inspect(|_| {
            assert_eq!(dp.get("services", &ws, &s9).unwrap(), None);
            assert_eq!(dp.list("routes").unwrap().len(), 3);
            assert_eq!(dp.state().version, info.version);
        });
    let kind = ApplyKind::Incremental {
        expect_from: info.version,
        latest: Some(latest),
    };
    env.dp
        .apply_pages("t3", kind, 2, arrived, decode_page)
        .unwrap();
    env.assert_synced_to(&info2);
}

/// Page bytes reach the decoder as they arrived, whatever their size, and in page order; a
/// decoder error after deltas were written rejects the whole transfer and changes nothing.
#[tokio::test]
async fn page_bytes_reach_the_decoder_whole_and_errors_change_nothing() {
    let env = Env::new().await;
    populate(&env).await;
    let info = {
        env.full_sync().await;
        env.cp.version_info().await.unwrap()
    };
    env.create("services", json!({"name": "s9", "host": "nine.example"}))
        .await;
    let (deltas, info2) = env.snapshot().await;
    let opaque = |n: usize, seed: u8| -> Vec<u8> {
        (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()
    };
    let pages: Vec<Vec<u8>> = vec![
        page_bytes(&deltas),
        opaque(1 << 20, 1),
        Vec::new(),
        opaque((2 << 20) + 12_345, 2),
        opaque(1, 3),
    ];
    let kind = ApplyKind::Full {
        version: info2.version,
        epoch: Some(info2.epoch.clone()),
    };
    let mut seen = Vec::new();
    let res = env.dp.apply_pages(
        "big",
        kind,
        pages.len() as u64,
        numbered(pages.clone()),
        |page_no, bytes, sink| {
            seen.push(page_no);
            if page_no == 0 {
                return decode_page(page_no, bytes, sink);
            }
            assert_eq!(bytes, pages[page_no as usize].as_slice(), "page {page_no}");
            if page_no as usize + 1 == pages.len() {
                return Err(ApplyError::Invalid {
                    message: "the last page is bad".into(),
                    fields: json!({}),
                    flattened: Vec::new(),
                });
            }
            Ok(())
        },
    );
    assert!(matches!(res, Err(ApplyError::Invalid { .. })), "{res:?}");
    assert_eq!(seen, [0, 1, 2, 3, 4]);
    env.assert_synced_to(&info);
    assert_eq!(env.dp.list("services").unwrap().len(), 2);
}

/// The CP's database was replaced: a full sync to a lower version with another epoch.
#[tokio::test]
async fn full_sync_to_a_lower_version() {
    let env = Env::new().await;
    populate(&env).await;
    for i in 0..5 {
        env.create("consumers", json!({"username": format!("extra{i}")}))
            .await;
    }
    env.full_sync().await;
    let high = env.dp.state();
    let other = Env::new().await;
    other
        .create("services", json!({"name": "only", "host": "only.example"}))
        .await;
    let (deltas, info) = other.snapshot().await;
    assert!(info.version < high.version);
    let applied = env
        .dp
        .apply(
            ApplyKind::Full {
                version: info.version,
                epoch: Some(info.epoch.clone()),
            },
            deltas,
        )
        .unwrap();
    assert_eq!(applied.version, info.version);
    assert_eq!(applied.n_entities, 2);
    env.assert_synced_to(&info);
    assert_eq!(env.dp.state().epoch, Some(info.epoch));
    assert_eq!(env.dp.list("routes").unwrap().len(), 0);
    assert_eq!(env.dp.list("consumers").unwrap().len(), 0);
    let ws = env.ws();
    assert!(
        env.dp
            .find_by_key("consumers", &ws, "username", &json!("alice"))
            .unwrap()
            .is_none()
    );
}

/// A data plane that says which plugins it runs (its proxy executes only those) rejects a
/// version enabling another, with Kong's words for a plugin missing from its `plugins`
/// property (`kong/db/schema/entities/plugins.lua`), and keeps its configuration; a disabled
/// plugin of that name is stored (it never runs), and a runnable one applies.
#[tokio::test]
async fn plugins_the_data_plane_cannot_run_are_rejected() {
    let env = Env::new().await;
    env.dp.only_plugins(["key-auth".to_owned()]);
    env.create("services", json!({"name": "s", "url": "http://a.example"}))
        .await;
    env.full_sync().await;
    let before = env.dp.state();
    env.create("plugins", json!({"name": "correlation-id"}))
        .await;
    let from = env.dp.state().version;
    let (deltas, latest) = env.changes_after(from).await;
    let err = env
        .dp
        .apply(
            ApplyKind::Incremental {
                expect_from: from,
                latest: Some(latest),
            },
            deltas,
        )
        .unwrap_err();
    let text = format!("{err:?}");
    assert!(
        text.contains(
            "plugin 'correlation-id' not enabled; add it to the 'plugins' configuration property"
        ),
        "{text}"
    );
    assert_eq!(
        env.dp.state(),
        before,
        "nothing of the rejected version is stored"
    );
    env.patch("plugins", &plugin_id(&env).await, json!({"enabled": false}))
        .await;
    env.create("plugins", json!({"name": "key-auth"})).await;
    // The DP catches up from its own version: both versions in one apply.
    env.incremental_sync().await;
    env.assert_synced().await;
}

async fn plugin_id(env: &Env) -> String {
    let (deltas, _) = env.snapshot().await;
    deltas
        .iter()
        .find(|d| d.entity_type == "plugins")
        .map(|d| d.id.clone())
        .unwrap()
}

/// The proxy's configuration is built from a snapshot taken after the feed messages it
/// merged, and that snapshot can already hold a later version whose message is still
/// queued. The configuration then claims only the version of the last message merged: the
/// later version's changes are not all in it (here a route it deletes still routes). The
/// race showed in `gateway::churn_under_load_fails_no_request` once the sync link ran on a
/// thread of its own, in parallel with the proxy's builds.
#[tokio::test]
async fn a_proxy_configuration_claims_only_the_versions_it_was_told_of() {
    use deltaplane::dp::proxy::balancer::Resolver;
    use deltaplane::dp::proxy::gateway::Builder;
    use deltaplane::dp::proxy::plugins::Exporter;

    let env = Env::new().await;
    let (s1, _, _) = populate(&env).await;
    env.full_sync().await;
    let r1 = env.dp.list("routes").unwrap();
    let r1 = r1.iter().find(|r| r["name"] == "r1").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut builder = Builder::new(Exporter::new(), Arc::new(Resolver::new()));
    let built = builder.build(&env.dp.snapshot().unwrap()).unwrap();
    assert_eq!(built.version, env.dp.state().version);
    assert!(built.router.route(&r1).is_some());

    let mut feed = env.dp.subscribe();
    let r4 = env
        .create(
            "routes",
            json!({"name": "r4", "paths": ["/r4"], "service": {"id": s1}}),
        )
        .await;
    env.incremental_sync().await;
    env.delete("routes", "r1").await;
    env.incremental_sync().await;
    let newest = env.dp.state().version;

    // The first message, read from a snapshot that already shows the second.
    let first = feed.try_recv().unwrap();
    assert!(first.version < newest);
    let snapshot = env.dp.snapshot().unwrap();
    assert_eq!(snapshot.state().version, newest);
    let gw = builder
        .update(&snapshot, &first.changed, Some(first.version))
        .unwrap();
    assert!(gw.router.route(&r4).is_some(), "the first version's route");
    assert!(
        gw.router.route(&r1).is_some(),
        "the second version's delete was not named yet"
    );
    assert_eq!(gw.version, first.version, "claims only what it was told of");

    // The second message brings the rest, and its version.
    let second = feed.try_recv().unwrap();
    assert_eq!(second.version, newest);
    let gw = builder
        .update(
            &env.dp.snapshot().unwrap(),
            &second.changed,
            Some(second.version),
        )
        .unwrap();
    assert!(gw.router.route(&r1).is_none());
    assert!(gw.router.route(&r4).is_some());
    assert_eq!(gw.version, newest);
}
