//! The store's unit tests, on deltas built by hand (snapshots, the change feed, applies).
//! The tests that sync from a real control-plane store need both planes: they are in
//! `tests/it/dp_store.rs`.

use std::sync::Arc;

use serde_json::{Value, json};
use tokio::sync::broadcast::error::TryRecvError;

use crate::dp::store::{
    Apply, ApplyError, ApplyKind, Changed, Committed, DpStore, DpStoreOptions, FEED_CAPACITY,
    MAX_NAMED, Snapshot, VersionError,
};
use crate::proto::Delta;
use crate::schema::Registry;

// --- on hand-built deltas: snapshots, the change feed ---

/// The workspace of the hand-built entities.
const WS: &str = "0a0a0a0a-0000-4000-8000-00000000ffff";

fn memory_store() -> DpStore {
    DpStore::open_in_memory(
        Arc::clone(Registry::builtin()),
        DpStoreOptions {
            cache_size: 1 << 20,
            durable: false,
        },
    )
    .unwrap()
}

fn consumer_id(idx: u32) -> String {
    format!("00000000-0000-4000-8000-{idx:012}")
}

/// A consumer in its stored form.
fn consumer(idx: u32, username: &str) -> Value {
    json!({
        "created_at": 1_700_000_000, "custom_id": null, "id": consumer_id(idx), "tags": null,
        "updated_at": 1_700_000_000, "username": username
    })
}

fn inc(expect_from: i64) -> ApplyKind {
    ApplyKind::Incremental {
        expect_from,
        latest: None,
    }
}

fn full(version: i64) -> ApplyKind {
    ApplyKind::Full {
        version,
        epoch: Some("e1".into()),
    }
}

fn usernames(entities: &[Value]) -> Vec<&str> {
    entities
        .iter()
        .map(|e| e["username"].as_str().unwrap())
        .collect()
}

/// A paged transfer's pages as the control plane sends them (`{"deltas": [...]}`), numbered
/// from 0, for [`DpStore::apply_pages`] with the v2 client's decoder (`decode_page`).
fn page_texts(pages: &[&[Delta]]) -> Vec<(u64, String)> {
    (0..)
        .zip(pages)
        .map(|(no, deltas)| {
            let wire: Vec<Value> = deltas.iter().map(Delta::to_wire).collect();
            (no, json!({ "deltas": wire }).to_string())
        })
        .collect()
}

/// The next message on the feed; there must be one.
#[track_caller]
fn next(feed: &mut tokio::sync::broadcast::Receiver<Arc<Committed>>) -> Committed {
    (*feed.try_recv().expect("a message on the feed")).clone()
}

fn named(keys: &[(&str, String)]) -> Changed {
    Changed::Entities(
        keys.iter()
            .map(|(ty, id)| (ty.to_string(), id.clone()))
            .collect(),
    )
}

/// A store opened in memory applies and answers reads as one on a file does.
#[test]
fn an_in_memory_store_applies_and_reads() {
    let dp = memory_store();
    let applied = dp
        .apply(
            inc(0),
            [
                upsert(1, "consumers", WS, consumer(1, "a")),
                upsert(1, "consumers", WS, consumer(2, "b")),
            ],
        )
        .unwrap();
    assert_eq!((applied.version, applied.n_entities), (1, 2));
    assert_eq!(dp.state().state_hash, applied.state_hash);
    assert_eq!(dp.compute_state_hash().unwrap(), applied.state_hash);
    assert_eq!(usernames(&dp.list("consumers").unwrap()), ["a", "b"]);
    assert_eq!(
        dp.find_by_key("consumers", WS, "username", &json!("b"))
            .unwrap()
            .unwrap()["id"],
        json!(consumer_id(2))
    );
    dp.apply(full(5), []).unwrap();
    assert_eq!(dp.state().version, 5);
    assert!(dp.get("consumers", WS, &consumer_id(1)).unwrap().is_none());
}

/// `skip_if_unchanged`: a full apply equal to the stored state under the same epoch commits
/// nothing (same version, nothing on the feed); another epoch, or other content, commits.
#[test]
fn skip_if_unchanged_commits_only_a_change() {
    let dp = memory_store();
    let mut feed = dp.subscribe();
    let apply_full = |version: i64, epoch: &str, names: &[&str]| {
        let kind = ApplyKind::Full {
            version,
            epoch: Some(epoch.into()),
        };
        let mut a = dp.begin(kind).unwrap();
        a.skip_if_unchanged();
        for (i, n) in names.iter().enumerate() {
            let idx = u32::try_from(i).unwrap() + 1;
            a.delta(upsert(version, "consumers", WS, consumer(idx, n)))
                .unwrap();
        }
        a.commit().unwrap()
    };
    assert_eq!(apply_full(1, "f", &["a", "b"]).version, 1);
    next(&mut feed);
    // The same entities, the same epoch: nothing.
    let same = apply_full(2, "f", &["a", "b"]);
    assert_eq!((same.version, same.n_deltas), (1, 0));
    assert_eq!(dp.state().version, 1);
    assert!(matches!(feed.try_recv(), Err(TryRecvError::Empty)));
    // One entity fewer: a version.
    assert_eq!(apply_full(2, "f", &["a"]).version, 2);
    next(&mut feed);
    // The same entities under another epoch: a version too.
    assert_eq!(apply_full(3, "other", &["a"]).version, 3);
    assert_eq!(dp.state().epoch.as_deref(), Some("other"));
}

/// A snapshot keeps showing its version, state and entities while later applies (incremental
/// and full) commit, and while an apply is still open; a new snapshot shows the new version.
#[test]
fn snapshot_keeps_its_version_while_applies_commit() {
    let dp = memory_store();
    dp.apply(
        inc(0),
        [
            upsert(1, "consumers", WS, consumer(1, "a")),
            upsert(1, "consumers", WS, consumer(2, "b")),
        ],
    )
    .unwrap();
    let s1 = dp.snapshot().unwrap();
    assert_eq!(s1.state(), &dp.state());
    assert_eq!(s1.state().version, 1);

    // An open apply is not seen by a snapshot taken meanwhile.
    let mut apply = dp.begin(inc(1)).unwrap();
    apply
        .delta(upsert(2, "consumers", WS, consumer(1, "a2")))
        .unwrap();
    apply
        .delta(delete(2, "consumers", WS, &consumer_id(2)))
        .unwrap();
    apply
        .delta(upsert(2, "consumers", WS, consumer(3, "c")))
        .unwrap();
    apply.flush().unwrap();
    let during = dp.snapshot().unwrap();
    apply.commit().unwrap();
    assert_eq!(during.state(), s1.state());
    assert_eq!(during.rows().unwrap(), s1.rows().unwrap());
    assert_eq!(usernames(&during.list("consumers").unwrap()), ["a", "b"]);

    let check_s1 = |what: &str| {
        assert_eq!(s1.state().version, 1, "{what}");
        assert_eq!(
            s1.compute_state_hash().unwrap(),
            s1.state().state_hash,
            "{what}"
        );
        assert_eq!(
            usernames(&s1.list("consumers").unwrap()),
            ["a", "b"],
            "{what}"
        );
        assert_eq!(
            s1.get("consumers", WS, &consumer_id(1)).unwrap().unwrap()["username"],
            json!("a"),
            "{what}"
        );
        assert!(
            s1.get("consumers", WS, &consumer_id(3)).unwrap().is_none(),
            "{what}"
        );
        assert_eq!(
            s1.find_by_key("consumers", WS, "username", &json!("b"))
                .unwrap()
                .unwrap()["id"],
            json!(consumer_id(2)),
            "{what}"
        );
        assert!(
            s1.find_by_key("consumers", WS, "username", &json!("a2"))
                .unwrap()
                .is_none(),
            "{what}"
        );
        let mut n = 0;
        s1.for_each("consumers", &mut |ws, _, _| {
            assert_eq!(ws, WS);
            n += 1;
            true
        })
        .unwrap();
        assert_eq!(n, 2, "{what}");
    };
    check_s1("after an incremental apply");
    let s2 = dp.snapshot().unwrap();
    assert_eq!(s2.state(), &dp.state());
    assert_eq!(s2.state().version, 2);
    assert_ne!(s2.state().state_hash, s1.state().state_hash);
    assert_eq!(usernames(&s2.list("consumers").unwrap()), ["a2", "c"]);
    assert_eq!(s2.compute_state_hash().unwrap(), s2.state().state_hash);
    assert_ne!(s2.rows().unwrap(), s1.rows().unwrap());

    // A full sync drops and refills every table; the snapshots do not notice.
    dp.apply(full(7), [upsert(7, "consumers", WS, consumer(4, "d"))])
        .unwrap();
    check_s1("after a full sync");
    assert_eq!(s2.state().version, 2);
    assert_eq!(usernames(&s2.list("consumers").unwrap()), ["a2", "c"]);
    let s3 = dp.snapshot().unwrap();
    assert_eq!(s3.state().version, 7);
    assert_eq!(s3.state().epoch.as_deref(), Some("e1"));
    assert_eq!(usernames(&s3.list("consumers").unwrap()), ["d"]);
    // The store's own read methods read the latest commit.
    assert_eq!(usernames(&dp.list("consumers").unwrap()), ["d"]);
}

/// An incremental apply publishes exactly what it wrote or deleted, once, with its final
/// version, after the state shows it; a delete that finds nothing is not named.
#[test]
fn feed_names_what_an_incremental_apply_changed() {
    let dp = memory_store();
    let mut feed = dp.subscribe();
    let applied = dp
        .apply(
            inc(0),
            [
                upsert(1, "consumers", WS, consumer(1, "a")),
                upsert(1, "consumers", WS, consumer(2, "b")),
                upsert(1, "consumers", WS, consumer(3, "c")),
            ],
        )
        .unwrap();
    let msg = next(&mut feed);
    assert_eq!(msg.version, 1);
    assert_eq!(msg.state_hash, applied.state_hash);
    assert_eq!(
        msg.changed,
        named(&[
            ("consumers", consumer_id(1)),
            ("consumers", consumer_id(2)),
            ("consumers", consumer_id(3)),
        ])
    );

    // Versions 2..=4 in one transaction: the union, once, with version 4. Deleting an absent
    // entity or one in another workspace changes nothing.
    dp.apply(
        inc(1),
        [
            upsert(2, "consumers", WS, consumer(1, "a2")),
            delete(3, "consumers", WS, &consumer_id(2)),
            delete(3, "consumers", WS, &consumer_id(9)),
            delete(4, "consumers", "another-ws", &consumer_id(3)),
        ],
    )
    .unwrap();
    let msg = next(&mut feed);
    assert_eq!(msg.version, 4);
    assert_eq!(msg.state_hash, dp.state().state_hash);
    assert_eq!(
        msg.changed,
        named(&[("consumers", consumer_id(1)), ("consumers", consumer_id(2))])
    );
    assert!(msg.changed.contains("consumers", &consumer_id(2)));
    assert!(!msg.changed.contains("consumers", &consumer_id(3)));
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Empty);

    // A version of deletes that found nothing still moves the version: an empty set.
    dp.apply(inc(4), [delete(5, "consumers", WS, &consumer_id(9))])
        .unwrap();
    let msg = next(&mut feed);
    assert_eq!(msg.version, 5);
    assert_eq!(msg.changed, Changed::Entities(Default::default()));

    // A second subscriber sees the same messages from when it subscribed.
    let mut late = dp.subscribe();
    dp.apply(inc(5), [delete(6, "consumers", WS, &consumer_id(1))])
        .unwrap();
    let want = named(&[("consumers", consumer_id(1))]);
    assert_eq!(next(&mut feed).changed, want);
    assert_eq!(next(&mut late).changed, want);
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Empty);
}

/// A full sync and the commit of a paged transfer (full or incremental) publish `All` with
/// their version, once.
#[test]
fn feed_says_all_for_full_syncs_and_transfers() {
    let dp = memory_store();
    let mut feed = dp.subscribe();
    dp.apply(full(3), [upsert(3, "consumers", WS, consumer(1, "a"))])
        .unwrap();
    let msg = next(&mut feed);
    assert_eq!((msg.version, &msg.changed), (3, &Changed::All));
    assert!(msg.changed.contains("anything", "at all"));

    // An empty full sync still replaces everything.
    dp.apply(full(4), []).unwrap();
    assert_eq!(next(&mut feed).changed, Changed::All);

    let t1 = page_texts(&[
        &[upsert(5, "consumers", WS, consumer(2, "b"))],
        &[upsert(6, "consumers", WS, consumer(3, "c"))],
    ]);
    dp.apply_pages("t1", inc(4), 2, t1, crate::dp::v2::decode_page)
        .unwrap();
    let msg = next(&mut feed);
    assert_eq!((msg.version, &msg.changed), (6, &Changed::All));
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Empty);

    let t2 = page_texts(&[&[upsert(9, "consumers", WS, consumer(3, "c"))]]);
    dp.apply_pages("t2", full(9), 1, t2, crate::dp::v2::decode_page)
        .unwrap();
    let msg = next(&mut feed);
    assert_eq!((msg.version, &msg.changed), (9, &Changed::All));
    assert_eq!(msg.state_hash, dp.state().state_hash);
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Empty);
}

/// An apply that changes more than `MAX_NAMED` entities says `All` rather than naming them;
/// naming one already named again does not count.
#[test]
fn past_max_named_a_change_says_all() {
    let mut changed = Changed::default();
    for idx in 0..MAX_NAMED {
        changed.note("consumers", &idx.to_string());
    }
    changed.note("consumers", "0");
    let Changed::Entities(keys) = &changed else {
        panic!("{MAX_NAMED} entities are still named");
    };
    assert_eq!(keys.len(), MAX_NAMED);
    changed.note("consumers", "one more");
    assert_eq!(changed, Changed::All);
    changed.note("consumers", "and another");
    assert_eq!(changed, Changed::All);
}

/// Nothing is published for an apply that does not commit: invalid, out of version, not the
/// latest, dropped, a paged transfer cut short or out of order, or an incremental apply of
/// no deltas.
#[test]
fn rejected_applies_publish_nothing() {
    let dp = memory_store();
    dp.apply(inc(0), [upsert(1, "consumers", WS, consumer(1, "a"))])
        .unwrap();
    let mut feed = dp.subscribe();
    let mut bad = consumer(2, "b");
    bad["username"] = json!(42);
    assert!(matches!(
        dp.apply(inc(1), [upsert(2, "consumers", WS, bad)]),
        Err(ApplyError::Invalid { .. })
    ));
    assert!(matches!(
        dp.apply(inc(1), [upsert(2, "consumers", WS, consumer(2, "a"))]),
        Err(ApplyError::Invalid { .. })
    ));
    assert!(matches!(
        dp.apply(inc(1), [upsert(3, "consumers", WS, consumer(2, "b"))]),
        Err(ApplyError::Version(VersionError::Gap { .. }))
    ));
    assert!(matches!(
        dp.apply(
            ApplyKind::Incremental {
                expect_from: 1,
                latest: Some(3)
            },
            [upsert(2, "consumers", WS, consumer(2, "b"))]
        ),
        Err(ApplyError::Version(VersionError::NotLatest { .. }))
    ));
    assert!(matches!(
        dp.begin(inc(0)),
        Err(ApplyError::Version(VersionError::Conflict { .. }))
    ));
    {
        let mut apply = dp.begin(inc(1)).unwrap();
        apply
            .delta(upsert(2, "consumers", WS, consumer(2, "b")))
            .unwrap();
        apply.flush().unwrap();
    }
    assert_eq!(dp.apply(inc(1), []).unwrap().n_deltas, 0);
    let t = page_texts(&[
        &[upsert(2, "consumers", WS, consumer(2, "b"))],
        &[upsert(2, "consumers", WS, consumer(3, "c"))],
    ]);
    let decode = crate::dp::v2::decode_page;
    // Page 0 missing, pages swapped, the last page never came, a page too many.
    let swapped = vec![t[1].clone(), t[0].clone()];
    for arrived in [t[1..].to_vec(), swapped, t[..1].to_vec()] {
        let res = dp.apply_pages("t", full(2), 2, arrived, decode);
        assert!(matches!(res, Err(ApplyError::Staging { .. })), "{res:?}");
    }
    let res = dp.apply_pages("t", full(2), 1, t, decode);
    assert!(matches!(res, Err(ApplyError::Staging { .. })), "{res:?}");
    assert_eq!(dp.state().version, 1);
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Empty);
}

/// A subscriber that falls more than `FEED_CAPACITY` commits behind is told how many it
/// missed, then resyncs from a snapshot and follows the feed again.
#[test]
fn a_lagging_subscriber_is_told_and_resyncs() {
    let dp = memory_store();
    let mut feed = dp.subscribe();
    let n = FEED_CAPACITY as i64 + 3;
    for v in 1..=n {
        let name = format!("u{v}");
        dp.apply(inc(v - 1), [upsert(v, "consumers", WS, consumer(1, &name))])
            .unwrap();
    }
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Lagged(3));
    let snapshot = dp.snapshot().unwrap();
    assert_eq!(snapshot.state().version, n);
    // The messages still queued are the last `FEED_CAPACITY`, oldest first; the snapshot
    // already shows all of them.
    assert_eq!(next(&mut feed).version, 4);
    let mut last = 4;
    while let Ok(msg) = feed.try_recv() {
        assert_eq!(msg.version, last + 1);
        last = msg.version;
    }
    assert_eq!(last, n);
    dp.apply(inc(n), [delete(n + 1, "consumers", WS, &consumer_id(1))])
        .unwrap();
    assert_eq!(next(&mut feed).version, n + 1);
}

/// Applies from several threads: the feed carries every commit once, each thread's in its
/// order, and the last message names the state the store ended in. (The interleaving the
/// writer's turn rules out, a commit published after the next one, needs a whole apply to fit
/// between a commit and its publication; this test does not force it.)
#[test]
fn feed_and_state_follow_commit_order() {
    let dp = memory_store();
    let mut feed = dp.subscribe();
    std::thread::scope(|scope| {
        for t in 0..2 {
            let dp = &dp;
            scope.spawn(move || {
                for i in 0..40 {
                    let v = 1000 * (t + 1) + i;
                    dp.apply(full(v), [upsert(v, "consumers", WS, consumer(1, "a"))])
                        .unwrap();
                }
            });
        }
    });
    let mut versions = Vec::new();
    while let Ok(msg) = feed.try_recv() {
        versions.push(msg.version);
    }
    assert_eq!(versions.len(), 80);
    assert_eq!(versions.last(), Some(&dp.state().version));
    assert_eq!(dp.snapshot().unwrap().state(), &dp.state());
    // Each thread's own commits stay in its order.
    for t in 1..=2 {
        let mine: Vec<i64> = versions.iter().copied().filter(|v| v / 1000 == t).collect();
        assert!(mine.is_sorted(), "{mine:?}");
    }
}

/// A store and its snapshots may be shared across threads, and an apply handed to a blocking
/// task: the writer's turn an apply holds is no `MutexGuard`.
#[test]
fn stores_snapshots_and_applies_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<DpStore>();
    send_sync::<Snapshot>();
    send::<Apply<'static>>();
}

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

/// A keyauth credential of consumer `consumer_idx` in its stored form.
fn credential(idx: u32, consumer_idx: u32, key: &str) -> Value {
    let registry = Registry::builtin();
    let schema = registry.get("keyauth_credentials").unwrap();
    let input = json!({
        "id": format!("00000000-0000-4000-8000-{:012}", 9000 + idx),
        "consumer": {"id": consumer_id(consumer_idx)}, "key": key
    });
    registry
        .prepare(
            schema,
            input,
            None,
            crate::schema::Mode::Insert,
            1_700_000_000,
        )
        .unwrap()
        .entity
}

/// Coalescing: the deltas of several consecutive versions (as one get_delta answer carries
/// them, or as versions pushed while a commit ran) fed in order into one `begin` … `commit`
/// make one write transaction, and the feed publishes one message with the last version and
/// the union of what they changed. The state (hash, every row of every table, key lookups)
/// equals applying the same versions one transaction each, including a unique key handed from
/// one entity to another across versions and a foreign key moved to another parent.
#[test]
fn versions_coalesced_into_one_transaction_equal_one_by_one() {
    let base = [
        upsert(1, "consumers", WS, consumer(1, "a")),
        upsert(1, "consumers", WS, consumer(2, "b")),
        upsert(1, "consumers", WS, consumer(3, "c")),
        upsert(1, "keyauth_credentials", WS, credential(1, 3, "k3")),
    ];
    let versions: Vec<Vec<Delta>> = vec![
        // 2: consumer 1 gives up "a", and gets a credential.
        vec![
            upsert(2, "consumers", WS, consumer(1, "x")),
            upsert(2, "keyauth_credentials", WS, credential(2, 1, "k1")),
        ],
        // 3: consumer 2 takes "a"; the credential moves to consumer 2 with the same key.
        vec![
            upsert(3, "consumers", WS, consumer(2, "a")),
            upsert(3, "keyauth_credentials", WS, credential(2, 2, "k1")),
        ],
        // 4: consumer 3 and its credential go; consumer 4 takes its name "c".
        vec![
            delete(
                4,
                "keyauth_credentials",
                WS,
                credential(1, 3, "k3")["id"].as_str().unwrap(),
            ),
            delete(4, "consumers", WS, &consumer_id(3)),
            upsert(4, "consumers", WS, consumer(4, "c")),
        ],
        // 5: a field of consumer 4 changes, its key stays.
        vec![upsert(5, "consumers", WS, {
            let mut c = consumer(4, "c");
            c["custom_id"] = json!("custom-4");
            c
        })],
    ];
    let one_by_one = memory_store();
    let coalesced = memory_store();
    for dp in [&one_by_one, &coalesced] {
        dp.apply(inc(0), base.clone()).unwrap();
    }
    for (idx, deltas) in versions.iter().enumerate() {
        let from = idx as i64 + 1;
        let applied = one_by_one
            .apply(
                ApplyKind::Incremental {
                    expect_from: from,
                    latest: Some(from + 1),
                },
                deltas.clone(),
            )
            .unwrap();
        assert_eq!(applied.version, from + 1);
    }

    let mut feed = coalesced.subscribe();
    let mut apply = coalesced
        .begin(ApplyKind::Incremental {
            expect_from: 1,
            latest: Some(5),
        })
        .unwrap();
    let all: Vec<Delta> = versions.iter().flatten().cloned().collect();
    // Through `feed`, the session's path: decoded and validated on a second thread.
    apply
        .feed(|sink| {
            for d in all {
                sink(d)?;
            }
            Ok(())
        })
        .unwrap();
    let applied = apply.commit().unwrap();
    assert_eq!((applied.version, applied.n_deltas), (5, 8));

    let msg = next(&mut feed);
    assert_eq!(msg.version, 5);
    assert_eq!(msg.state_hash, one_by_one.state().state_hash);
    let cred = |idx, consumer_idx, key| {
        (
            "keyauth_credentials",
            credential(idx, consumer_idx, key)["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        )
    };
    assert_eq!(
        msg.changed,
        named(&[
            ("consumers", consumer_id(1)),
            ("consumers", consumer_id(2)),
            ("consumers", consumer_id(3)),
            ("consumers", consumer_id(4)),
            cred(1, 3, "k3"),
            cred(2, 1, "k1"),
        ])
    );
    assert_eq!(feed.try_recv().unwrap_err(), TryRecvError::Empty);

    assert_eq!(coalesced.state(), one_by_one.state());
    assert_eq!(
        coalesced.compute_state_hash().unwrap(),
        one_by_one.state().state_hash
    );
    let (a, b) = (
        coalesced.snapshot().unwrap(),
        one_by_one.snapshot().unwrap(),
    );
    assert_eq!(a.rows().unwrap(), b.rows().unwrap());
    let by_name = |s: &Snapshot, name: &str| {
        s.find_by_key("consumers", WS, "username", &json!(name))
            .unwrap()
            .map(|c| c["id"].as_str().unwrap().to_owned())
    };
    assert_eq!(by_name(&a, "a"), Some(consumer_id(2)));
    assert_eq!(by_name(&a, "c"), Some(consumer_id(4)));
    assert_eq!(by_name(&a, "b"), None);
    let children: Vec<Value> = a
        .children("keyauth_credentials", "consumer", &consumer_id(2))
        .unwrap();
    assert_eq!(children.len(), 1);
    assert!(
        a.children("keyauth_credentials", "consumer", &consumer_id(1))
            .unwrap()
            .is_empty()
    );
}

/// A large paged transfer (2,000 entities in two pages) adds only its tables to the store's
/// file, as the same configuration applied at once does, and leaves no other file.
#[test]
fn a_paged_transfer_adds_only_its_tables() {
    let open = |dir: &tempfile::TempDir| {
        DpStore::open(
            &dir.path().join("dp.redb"),
            Arc::clone(Registry::builtin()),
            DpStoreOptions {
                cache_size: 1 << 20,
                durable: false,
            },
        )
        .unwrap()
    };
    let len =
        |dir: &tempfile::TempDir| std::fs::metadata(dir.path().join("dp.redb")).unwrap().len();
    let first = [upsert(1, "consumers", WS, consumer(1, "a"))];
    let deltas: Vec<Delta> = (0..2000)
        .map(|idx| upsert(2, "consumers", WS, consumer(idx, &format!("user-{idx}"))))
        .collect();

    let dir = tempfile::tempdir().unwrap();
    let dp = open(&dir);
    dp.apply(inc(0), first.clone()).unwrap();
    let t = page_texts(&[&deltas[..1000], &deltas[1000..]]);
    let applied = dp
        .apply_pages("t", full(2), 2, t, crate::dp::v2::decode_page)
        .unwrap();
    assert_eq!((applied.version, applied.n_entities), (2, 2000));
    let others: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != "dp.redb")
        .collect();
    assert_eq!(others, Vec::<String>::new());

    // The same configuration applied at once.
    let direct = tempfile::tempdir().unwrap();
    let other = open(&direct);
    other.apply(inc(0), first).unwrap();
    other.apply(full(2), deltas).unwrap();
    assert_eq!(len(&dir), len(&direct));
}
