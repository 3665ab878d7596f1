//! Change-log invariants: gap-free versions visible in commit order under concurrent writers
//! (two store instances on one database), state hashes that a reader can reproduce, and the
//! purge horizon.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use deltaplane::cp::store::{Op, StateHash, Store, StoreError};
use rand::Rng as _;
use serde_json::{Value, json};

use crate::both_backends;
use crate::harness::TestDb;

type Model = BTreeMap<(String, String), (String, Value)>;

fn model_hash(model: &Model) -> StateHash {
    let mut h = StateHash::ZERO;
    for ((ty, id), (ws, e)) in model {
        h.add(&StateHash::of_entity(ty, ws, id, e));
    }
    h
}

/// Follows the log from `*last`, checking contiguity and the recorded hash of every version.
async fn tail(store: &Store, model: &mut Model, last: &mut i64) {
    loop {
        let mut batch = Vec::new();
        let res = store
            .changes_after(*last, 500, |c| {
                batch.push(c);
                Ok(())
            })
            .await
            .expect("read changes")
            .expect("within the horizon");
        if batch.is_empty() {
            assert_eq!(res.version, *last, "head without deltas");
            return;
        }
        let mut i = 0;
        while i < batch.len() {
            let v = batch[i].version;
            assert_eq!(v, *last + 1, "versions are gap-free and in order");
            while i < batch.len() && batch[i].version == v {
                let c = &batch[i];
                match &c.entity {
                    Some(e) => model.insert(
                        (c.entity_type.clone(), c.id.clone()),
                        (c.ws_id.clone(), e.clone()),
                    ),
                    None => model.remove(&(c.entity_type.clone(), c.id.clone())),
                };
                i += 1;
            }
            let recorded = store
                .state_hash_at(v)
                .await
                .unwrap()
                .expect("retained version has a hash");
            assert_eq!(model_hash(model), recorded, "state hash at version {v}");
            *last = v;
        }
    }
}

async fn writer(store: Store, n_ops: usize, seed: u64) {
    let mut names: Vec<String> = Vec::new();
    for i in 0..n_ops {
        let op = {
            let mut rng = rand::rng();
            let pick = rng.random_range(0..10);
            if names.is_empty() || pick < 5 {
                let name = format!("w{seed}-{i}");
                names.push(name.clone());
                Op::Create {
                    entity: "consumers".into(),
                    input: json!({"username": name, "tags": ["t"]}),
                    scope: None,
                }
            } else if pick < 8 {
                let name = names[rng.random_range(0..names.len())].clone();
                Op::Patch {
                    entity: "consumers".into(),
                    key: name,
                    input: json!({"custom_id": format!("c{seed}-{i}")}),
                    scope: None,
                }
            } else {
                let name = names.swap_remove(rng.random_range(0..names.len()));
                Op::Delete {
                    entity: "consumers".into(),
                    key: name,
                    scope: None,
                }
            }
        };
        match store.write(op).await {
            Ok(_) | Err(StoreError::NotFound) => {}
            Err(e) => panic!("write failed: {e:?}"),
        }
    }
}

both_backends!(
    concurrent_writers_gap_free_and_reproducible,
    |b| async move {
        let Some(db) = TestDb::new(b).await else {
            return;
        };
        let mut opts = db.store_options();
        // Sixteen writers on two SQLite handles contend through SQLite's busy handler, which is
        // not fair: on a loaded machine one writer can wait past the 3 s default and get a 503.
        // This test is about ordering, not about that timeout.
        opts.acquire_timeout = Duration::from_secs(30);
        // A random delay after the versions are taken and before COMMIT widens every race window.
        opts.before_commit = Some(Arc::new(|| {
            Duration::from_micros(rand::rng().random_range(0..3000))
        }));
        let a = Store::open(opts.clone()).await.unwrap();
        let b2 = Store::open(opts).await.unwrap();
        let reader = db.store().await;

        let mut tasks = Vec::new();
        for w in 0..16u64 {
            let store = if w % 2 == 0 { a.clone() } else { b2.clone() };
            tasks.push(tokio::spawn(writer(store, 25, w)));
        }
        let mut model = Model::new();
        let mut last = 0;
        while tasks.iter().any(|t| !t.is_finished()) {
            tail(&reader, &mut model, &mut last).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        tail(&reader, &mut model, &mut last).await;

        let head = reader.version_info().await.unwrap();
        assert_eq!(head.version, last);
        assert_eq!(head.state_hash, model_hash(&model));
        // The reconstructed model equals the tables.
        let mut snap = Model::new();
        let info = reader
            .snapshot(|c| {
                snap.insert((c.entity_type, c.id), (c.ws_id, c.entity.unwrap()));
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(info.version, last);
        assert_eq!(snap, model);
    }
);

/// Two control planes on one PostgreSQL database, each with its group-commit writer and no
/// delay before commits: runs of creates go as one statement each (`dp_apply_creates` takes
/// the version lock, checks the head this store last saw, commits), and a head moved by the
/// other store sends the batch through a transaction. Versions stay gap-free, in order, and
/// reproduce the state hash.
#[tokio::test]
async fn concurrent_group_commits_of_creates_gap_free() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let a = db.store().await;
    let b = db.store().await;
    let reader = db.store().await;
    let writers = [
        deltaplane::cp::writer::Writer::spawn(a.clone(), 64),
        deltaplane::cp::writer::Writer::spawn(b.clone(), 64),
    ];
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let writer = writers[(w % 2) as usize].clone();
        tasks.push(tokio::spawn(async move {
            let mut names: Vec<String> = Vec::new();
            for i in 0..40 {
                let delete = !names.is_empty() && rand::rng().random_range(0..10) == 0;
                let op = if delete {
                    let n = names.len();
                    Op::Delete {
                        entity: "consumers".into(),
                        key: names.swap_remove(rand::rng().random_range(0..n)),
                        scope: None,
                    }
                } else {
                    // Now and then a name another task also creates: one of them fails alone.
                    let name = if i % 7 == 3 {
                        format!("shared-{i}")
                    } else {
                        format!("g{w}-{i}")
                    };
                    names.push(name.clone());
                    Op::Create {
                        entity: "consumers".into(),
                        input: json!({"username": name, "tags": ["t"]}),
                        scope: None,
                    }
                };
                match writer.write(op).await {
                    Ok(_) | Err(StoreError::Unique(_)) | Err(StoreError::NotFound) => {}
                    Err(e) => panic!("write failed: {e:?}"),
                }
            }
        }));
    }
    let mut model = Model::new();
    let mut last = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        tail(&reader, &mut model, &mut last).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    tail(&reader, &mut model, &mut last).await;
    let head = reader.version_info().await.unwrap();
    assert_eq!(head.version, last);
    assert_eq!(head.state_hash, model_hash(&model));
    let mut snap = Model::new();
    reader
        .snapshot(|c| {
            snap.insert((c.entity_type, c.id), (c.ws_id, c.entity.unwrap()));
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(snap, model);
    assert!(last > 16 * 20, "most writes made versions: {last}");
}

both_backends!(purge_keeps_the_horizon, |b| async move {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let store = db.store().await;
    for i in 0..30 {
        store
            .write(Op::Create {
                entity: "consumers".into(),
                input: json!({"username": format!("p{i}")}),
                scope: None,
            })
            .await
            .unwrap();
    }
    let head = store.version_info().await.unwrap().version;
    assert_eq!(head, 31);
    // Young versions are never purged, whatever their count.
    assert_eq!(store.purge_once(3600, 5, 1000).await.unwrap(), 0);
    // Old enough: keep the last 10 behind the head, in small batches.
    let mut purged = 0;
    loop {
        let n = store.purge_once(-10, 10, 4).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(n <= 4, "small batches");
        purged += n;
    }
    let info = store.version_info().await.unwrap();
    assert_eq!(purged, 20);
    assert_eq!(info.oldest_version, head - 10);
    let behind = store
        .changes_after(info.oldest_version - 2, 100, |_| Ok(()))
        .await
        .unwrap();
    assert_eq!(behind.unwrap_err().oldest_version, info.oldest_version);
    let mut n = 0;
    let ok = store
        .changes_after(info.oldest_version - 1, 1000, |_| {
            n += 1;
            Ok(())
        })
        .await
        .unwrap()
        .expect("a reader at oldest - 1 is served");
    assert_eq!(ok.version, head);
    assert_eq!(n, 11);
});

both_backends!(version_one_is_the_default_workspace, |b| async move {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let store = db.store().await;
    // Opening twice (as two CPs would) creates it once.
    let again = db.store().await;
    let info = again.version_info().await.unwrap();
    assert_eq!(info.version, 1);
    assert_eq!(info.epoch.len(), 36);
    let mut changes = Vec::new();
    store
        .changes_after(0, 10, |c| {
            changes.push(c);
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].entity_type, "workspaces");
    assert_eq!(changes[0].entity.as_ref().unwrap()["name"], "default");
    assert_eq!(changes[0].ws_id, changes[0].id);
});

both_backends!(deltas_in_dependency_order, |b| async move {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let store = db.store().await;
    store
        .write(Op::Create {
            entity: "consumers".into(),
            input: json!({"username": "c"}),
            scope: None,
        })
        .await
        .unwrap();
    // Both may be scoped to a consumer (cors may not: kong/plugins/cors/schema.lua has
    // `typedefs.no_consumer`).
    for (name, config) in [
        ("rate-limiting", json!({"minute": 5})),
        ("request-termination", json!({})),
    ] {
        store
            .write(Op::Create {
                entity: "plugins".into(),
                input: json!({"name": name, "config": config}),
                scope: Some(deltaplane::cp::store::Scope {
                    parent: "consumers".into(),
                    parent_key: "c".into(),
                    field: "consumer".into(),
                }),
            })
            .await
            .unwrap();
    }
    let v = store
        .write(Op::Delete {
            entity: "consumers".into(),
            key: "c".into(),
            scope: None,
        })
        .await
        .unwrap()
        .version
        .unwrap();
    let mut deltas = Vec::new();
    store
        .changes_after(v - 1, 1, |c| {
            deltas.push(c);
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    let types: Vec<&str> = deltas.iter().map(|d| d.entity_type.as_str()).collect();
    assert_eq!(
        types,
        ["plugins", "plugins", "consumers"],
        "children deleted first"
    );
    assert!(deltas.iter().all(|d| d.entity.is_none() && d.version == v));

    let mut snapshot_types = Vec::new();
    store
        .snapshot(|c| {
            snapshot_types.push(c.entity_type);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(snapshot_types[0], "workspaces", "parents first");
});

#[tokio::test]
async fn epoch_differs_per_database() {
    let a = TestDb::sqlite();
    let b = TestDb::sqlite();
    let ea = a.store().await.version_info().await.unwrap().epoch;
    let eb = b.store().await.version_info().await.unwrap().epoch;
    assert_ne!(ea, eb);
    // And survives a reopen.
    assert_eq!(a.store().await.version_info().await.unwrap().epoch, ea);
}

both_backends!(group_commit_isolates_failing_operations, |b| async move {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let store = db.store().await;
    let create = |name: &str| Op::Create {
        entity: "consumers".into(),
        input: json!({"username": name}),
        scope: None,
    };
    let results = store
        .write_batch(vec![
            create("a"),
            Op::Create {
                entity: "consumers".into(),
                input: json!({"bogus": 1}),
                scope: None,
            },
            create("a"), // unique violation against the first op of the same batch
            Op::Patch {
                entity: "consumers".into(),
                key: "a".into(),
                input: json!({"username": "a"}),
                scope: None,
            },
            create("b"),
        ])
        .await;
    assert_eq!(results[0].as_ref().unwrap().version, Some(2));
    assert!(matches!(results[1], Err(StoreError::Schema(_))));
    assert!(matches!(results[2], Err(StoreError::Unique(_))));
    assert_eq!(
        results[3].as_ref().unwrap().version,
        None,
        "a no-op makes no version"
    );
    assert_eq!(
        results[4].as_ref().unwrap().version,
        Some(3),
        "failed ops consume no version"
    );
    let mut n = 0;
    store
        .changes_after(1, 100, |_| {
            n += 1;
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(store.version_info().await.unwrap().version, 3);
});

// Creates that need no read before their write go, on PostgreSQL, as one call for the whole
// run (`dp_apply_creates`); a failing one still rolls back only itself with the error the
// checks give, and the others commit with consecutive versions.
both_backends!(group_commit_planned_creates_fail_alone, |b| async move {
    let Some(db) = TestDb::new(b).await else {
        return;
    };
    let store = db.store().await;
    let consumer = |name: &str| Op::Create {
        entity: "consumers".into(),
        input: json!({"username": name, "tags": ["t1", "t2"]}),
        scope: None,
    };
    let first = store.write(consumer("taken")).await.unwrap();
    let taken_id = first.entity.unwrap()["id"].as_str().unwrap().to_owned();
    let service = store
        .write(Op::Create {
            entity: "services".into(),
            input: json!({"name": "s", "host": "example.com"}),
            scope: None,
        })
        .await
        .unwrap();
    let service_id = service.entity.unwrap()["id"].as_str().unwrap().to_owned();
    let head = store.version_info().await.unwrap().version;
    let missing = "2b1e9d3c-3f62-4d4e-8d2a-9c1a5b7e6f01";
    let results = store
        .write_batch(vec![
            consumer("c1"),
            Op::Create {
                entity: "routes".into(),
                input: json!({"name": "dangling", "paths": ["/d"], "service": {"id": missing}}),
                scope: None,
            },
            consumer("c2"),
            Op::Create {
                entity: "consumers".into(),
                input: json!({"id": taken_id, "username": "other"}),
                scope: None,
            },
            consumer("c3"),
            consumer("taken"),
            Op::Create {
                entity: "routes".into(),
                input: json!({"name": "r", "paths": ["/r"], "service": {"id": service_id}}),
                scope: None,
            },
            consumer("c1"),
        ])
        .await;
    let version = |i: usize| results[i].as_ref().unwrap().version;
    assert_eq!(version(0), Some(head + 1));
    match &results[1] {
        Err(StoreError::ForeignKey { message, fields }) => {
            assert_eq!(
                message,
                &format!(
                    "the foreign key '{{id=\"{missing}\"}}' does not reference an existing 'services' entity."
                )
            );
            assert_eq!(fields["service"], json!({"id": missing}));
        }
        other => panic!("expected a foreign key error, got {other:?}"),
    }
    assert_eq!(version(2), Some(head + 2));
    match &results[3] {
        Err(StoreError::PrimaryKey { message, fields }) => {
            assert_eq!(
                message,
                &format!("primary key violation on key '{{id=\"{taken_id}\"}}'")
            );
            assert_eq!(fields["id"], json!(taken_id));
        }
        other => panic!("expected a primary key error, got {other:?}"),
    }
    assert_eq!(version(4), Some(head + 3));
    match &results[5] {
        Err(StoreError::Unique(fields)) => assert_eq!(fields["username"], json!("taken")),
        other => panic!("expected a unique violation, got {other:?}"),
    }
    assert_eq!(version(6), Some(head + 4));
    assert!(
        matches!(&results[7], Err(StoreError::Unique(f)) if f["username"] == json!("c1")),
        "a key taken earlier in the same batch: {:?}",
        results[7]
    );
    assert_eq!(store.version_info().await.unwrap().version, head + 4);

    // The change log has one delta per version, consecutive, and the state hash of the
    // stored entities.
    let mut seen = Vec::new();
    store
        .changes_after(head, 100, |c| {
            seen.push((c.version, c.entity_type.clone()));
            Ok(())
        })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen,
        [
            (head + 1, "consumers".to_owned()),
            (head + 2, "consumers".to_owned()),
            (head + 3, "consumers".to_owned()),
            (head + 4, "routes".to_owned()),
        ]
    );
    let mut model = Model::new();
    store
        .snapshot(|c| {
            if let Some(e) = c.entity {
                model.insert((c.entity_type.clone(), c.id.clone()), (c.ws_id.clone(), e));
            }
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(
        store.version_info().await.unwrap().state_hash,
        model_hash(&model)
    );
    // Index rows were written: keys (found by username), tags, and the route's reference row
    // (it keeps its service).
    assert!(store.find("consumers", "c2", None).await.unwrap().is_some());
    let tagged = store.list_tags(Some("t2"), 100, None).await.unwrap();
    assert_eq!(tagged.data.len(), 4, "taken, c1, c2, c3: {:?}", tagged.data);
    let deleted = store
        .write(Op::Delete {
            entity: "services".into(),
            key: service_id.clone(),
            scope: None,
        })
        .await;
    assert!(
        matches!(deleted, Err(StoreError::ForeignKey { .. })),
        "{deleted:?}"
    );
});

/// A call of `dp_apply_creates` that fails as a whole (here: the function is missing) is
/// rolled back to the savepoint and its creates applied one at a time, each with its result.
#[tokio::test]
async fn planned_creates_fall_back_when_the_call_fails() {
    let Some(db) = TestDb::postgres().await else {
        return;
    };
    let store = db.store().await;
    let deltaplane::cp::store::Pool::Postgres(pool) = store.pool() else {
        unreachable!("a PostgreSQL store");
    };
    sqlx::query("ALTER FUNCTION dp_apply_creates RENAME TO dp_apply_creates_gone")
        .execute(pool)
        .await
        .unwrap();
    let head = store.version_info().await.unwrap().version;
    let consumer = |name: &str| Op::Create {
        entity: "consumers".into(),
        input: json!({"username": name}),
        scope: None,
    };
    let results = store
        .write_batch(vec![consumer("a"), consumer("a"), consumer("b")])
        .await;
    assert_eq!(results[0].as_ref().unwrap().version, Some(head + 1));
    assert!(
        matches!(&results[1], Err(StoreError::Unique(_))),
        "{:?}",
        results[1]
    );
    assert_eq!(results[2].as_ref().unwrap().version, Some(head + 2));
    assert_eq!(store.version_info().await.unwrap().version, head + 2);
}

/// Joins versions' wire text as the change log's reader gives it (`changes_after_raw`).
async fn change_log_text(store: &Store, after: i64, upto: i64) -> Vec<(i64, Vec<u8>)> {
    use deltaplane::proto::v2::{DeltaText, RawDelta};
    let mut out: Vec<(i64, DeltaText)> = Vec::new();
    store
        .changes_after_raw(after, upto - after, |c| {
            if out.last().is_none_or(|(v, _)| *v != c.version) {
                out.push((c.version, DeltaText::new()));
            }
            out.last_mut().unwrap().1.push(&RawDelta::from(&c));
            std::ops::ControlFlow::Continue(())
        })
        .await
        .unwrap()
        .unwrap();
    out.into_iter()
        .map(|(v, t)| (v, t.slice(0, t.len()).to_vec()))
        .collect()
}

/// The versions `after+1 ..= upto` kept by the store are held, and equal the change log's
/// rows, byte for byte.
async fn assert_kept_as_logged(store: &Store, epoch: &str, after: i64, upto: i64) {
    let own = store
        .committed_after(epoch, after, upto)
        .expect("every version was committed here");
    let read = change_log_text(store, after, upto).await;
    assert_eq!(own.len() as i64, upto - after);
    assert_eq!(own.len(), read.len());
    for (o, (v, text)) in own.iter().zip(&read) {
        assert_eq!(o.version, *v);
        assert_eq!(
            String::from_utf8_lossy(o.deltas.slice(0, o.deltas.len())),
            String::from_utf8_lossy(text),
            "version {v}"
        );
    }
}

// The recent-versions window takes this CP's own committed versions from the store instead of
// reading them back (issue 11): they must be the change log's rows, byte for byte.
both_backends!(
    own_committed_versions_are_the_change_log_rows,
    |b| async move {
        let Some(db) = TestDb::new(b).await else {
            return;
        };
        let store = db.store().await;
        let epoch = store.version_info().await.unwrap().epoch;
        let start = store.version_info().await.unwrap().version;
        let results = store
            .write_batch(vec![
                Op::Create {
                    entity: "services".into(),
                    input: json!({"name": "s1", "url": "http://a.test:81/p", "tags": ["x", "é"]}),
                    scope: None,
                },
                Op::Create {
                    entity: "services".into(),
                    input: json!({"bogus": 1}),
                    scope: None,
                },
                Op::Create {
                    entity: "routes".into(),
                    input: json!({"name": "r1", "paths": ["/a"], "service": {"name": "s1"}}),
                    scope: None,
                },
            ])
            .await;
        assert!(results[1].is_err());
        store
            .write(Op::Patch {
                entity: "services".into(),
                key: "s1".into(),
                input: json!({"retries": 9}),
                scope: None,
            })
            .await
            .unwrap();
        // A consumer with a credential; deleting it cascades: one version of two deltas.
        store
            .write(Op::Create {
                entity: "consumers".into(),
                input: json!({"username": "c1"}),
                scope: None,
            })
            .await
            .unwrap();
        store
            .write(Op::Create {
                entity: "keyauth_credentials".into(),
                input: json!({"key": "k1", "consumer": {"username": "c1"}}),
                scope: None,
            })
            .await
            .unwrap();
        store
            .write(Op::Delete {
                entity: "consumers".into(),
                key: "c1".into(),
                scope: None,
            })
            .await
            .unwrap();
        let head = store.version_info().await.unwrap().version;
        assert_eq!(head, start + 6);
        assert_eq!(change_log_text(&store, head - 1, head).await.len(), 1);
        for after in start..head {
            assert_kept_as_logged(&store, &epoch, after, head).await;
        }
        assert!(
            store
                .committed_after("another-epoch", start, head)
                .is_none()
        );
        assert!(
            store.committed_after(&epoch, head, head + 1).is_none(),
            "not committed yet"
        );

        // Another control plane's write (another store on the same database) is not held here:
        // the run breaks and readers go to the database.
        let other = db.store().await;
        other
            .write(Op::Create {
                entity: "consumers".into(),
                input: json!({"username": "elsewhere"}),
                scope: None,
            })
            .await
            .unwrap();
        store
            .write(Op::Create {
                entity: "consumers".into(),
                input: json!({"username": "here"}),
                scope: None,
            })
            .await
            .unwrap();
        let now = store.version_info().await.unwrap().version;
        assert_eq!(now, head + 2);
        assert!(store.committed_after(&epoch, head, now).is_none());
        assert_kept_as_logged(&store, &epoch, now - 1, now).await;

        // A batch of plain creates right after a write (on PostgreSQL: one `dp_apply_creates`
        // statement that commits by itself), one of them failing.
        let results = store
            .write_batch(vec![
                Op::Create {
                    entity: "consumers".into(),
                    input: json!({"username": "p1", "tags": ["a"]}),
                    scope: None,
                },
                Op::Create {
                    entity: "consumers".into(),
                    input: json!({"username": "here"}),
                    scope: None,
                },
                Op::Create {
                    entity: "consumers".into(),
                    input: json!({"username": "p2", "custom_id": "ü"}),
                    scope: None,
                },
            ])
            .await;
        assert!(matches!(results[1], Err(StoreError::Unique(_))));
        let last = store.version_info().await.unwrap().version;
        assert_eq!(last, now + 2);
        assert_kept_as_logged(&store, &epoch, now - 1, last).await;
    }
);
