//! Copy-on-write indexes over the matchers, so that a request looks at few of them and an
//! update copies little.
//!
//! A [`ShardedMap`] is a string-keyed map split into shards behind `Arc`s: cloning it copies
//! the shard pointers, and changing one key copies only that key's shard. A [`PathIndex`]
//! holds the matchers of one host group by the literal their paths start with (a prefix, or
//! a regex's literal prefix), so a request looks up only the prefixes of its own path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Arc;

use crate::dp::proxy::router::matcher::{Key, Matcher, Prepared};

/// The multiply-rotate hash of rustc (FxHash): keys come from configuration, lookups from
/// requests never insert, so flooding is not a concern and speed is.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

type FxMap<V> = HashMap<Box<str>, V, BuildHasherDefault<FxHasher>>;

/// Shards of a large map; a map starts with one shard and splits at this size.
const SHARDS: usize = 64;
const SPLIT_AT: usize = 128;

/// A string-keyed map whose clone is cheap and whose updates copy one shard.
#[derive(Clone)]
pub(crate) struct ShardedMap<V> {
    shards: Vec<Arc<FxMap<V>>>,
    len: usize,
}

// === impl ShardedMap ===

impl<V: Clone> Default for ShardedMap<V> {
    fn default() -> Self {
        ShardedMap {
            shards: vec![Arc::new(FxMap::default())],
            len: 0,
        }
    }
}

fn hash_key(key: &str) -> u64 {
    let mut hasher = FxHasher::default();
    key.hash(&mut hasher);
    hasher.finish()
}

impl<V: Clone> ShardedMap<V> {
    fn shard_of(&self, key: &str) -> usize {
        if self.shards.len() == 1 {
            0
        } else {
            // The high bits: the map itself uses the low ones.
            (hash_key(key) >> 58) as usize % self.shards.len()
        }
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&V> {
        self.shards[self.shard_of(key)].get(key)
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Changes the value under `key` in place (`None` = absent); a `None` result removes it.
    pub fn update(&mut self, key: &str, f: impl FnOnce(Option<V>) -> Option<V>) {
        let shard_idx = self.shard_of(key);
        let shard = Arc::make_mut(&mut self.shards[shard_idx]);
        let old = shard.remove(key);
        let had = old.is_some();
        match f(old) {
            Some(v) => {
                shard.insert(key.into(), v);
                if !had {
                    self.len += 1;
                }
            }
            None => {
                if had {
                    self.len -= 1;
                }
            }
        }
        if self.shards.len() == 1 && self.len > SPLIT_AT {
            self.split();
        }
    }

    fn split(&mut self) {
        let mut shards: Vec<FxMap<V>> = (0..SHARDS).map(|_| FxMap::default()).collect();
        for (k, v) in self.shards[0].iter() {
            let idx = (hash_key(k) >> 58) as usize % SHARDS;
            shards[idx].insert(k.clone(), v.clone());
        }
        self.shards = shards.into_iter().map(Arc::new).collect();
    }
}

/// Matchers sorted by key, greatest first.
#[derive(Clone, Default)]
pub(crate) struct Bucket {
    matchers: Vec<Arc<Matcher>>,
}

// === impl Bucket ===

impl Bucket {
    fn insert(&mut self, m: Arc<Matcher>) {
        let pos = self.matchers.partition_point(|x| x.key > m.key);
        self.matchers.insert(pos, m);
    }

    fn remove(&mut self, key: Key) {
        self.matchers.retain(|x| x.key != key);
    }

    fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }

    /// Finds the first (best) matcher that beats `best` and matches.
    fn scan<'a>(&'a self, req: &Prepared<'_>, best: &mut Option<&'a Arc<Matcher>>) {
        for m in &self.matchers {
            if let Some(b) = best
                && b.key >= m.key
            {
                return;
            }
            if m.is_match(req) {
                *best = Some(m);
                return;
            }
        }
    }
}

/// The matchers of one host group, indexed by the literal their paths start with.
#[derive(Clone, Default)]
pub(crate) struct PathIndex {
    by_prefix: ShardedMap<Arc<Bucket>>,
    /// The distinct key lengths in use, ascending, with how many keys have each.
    lens: Arc<Vec<(usize, usize)>>,
    /// Matchers without paths.
    pathless: Arc<Bucket>,
    n_matchers: usize,
}

// === impl PathIndex ===

impl PathIndex {
    /// Whether no matcher is left.
    pub fn is_empty(&self) -> bool {
        self.n_matchers == 0
    }

    /// Adds a matcher under each distinct literal of its paths.
    pub fn insert(&mut self, m: &Arc<Matcher>) {
        self.n_matchers += 1;
        if m.paths.is_empty() {
            Arc::make_mut(&mut self.pathless).insert(m.clone());
            return;
        }
        for key in distinct_keys(m) {
            let mut new_key = false;
            self.by_prefix.update(key, |old| {
                new_key = old.is_none();
                let mut bucket = old.unwrap_or_default();
                Arc::make_mut(&mut bucket).insert(m.clone());
                Some(bucket)
            });
            if new_key {
                let lens = Arc::make_mut(&mut self.lens);
                match lens.binary_search_by_key(&key.len(), |&(len, _)| len) {
                    Ok(pos) => lens[pos].1 += 1,
                    Err(pos) => lens.insert(pos, (key.len(), 1)),
                }
            }
        }
    }

    /// Removes a matcher inserted with [`PathIndex::insert`].
    pub fn remove(&mut self, m: &Matcher) {
        self.n_matchers = self.n_matchers.saturating_sub(1);
        if m.paths.is_empty() {
            Arc::make_mut(&mut self.pathless).remove(m.key);
            return;
        }
        for key in distinct_keys(m) {
            let mut gone = false;
            self.by_prefix.update(key, |old| {
                let mut bucket = old?;
                Arc::make_mut(&mut bucket).remove(m.key);
                if bucket.is_empty() {
                    gone = true;
                    None
                } else {
                    Some(bucket)
                }
            });
            if gone {
                let lens = Arc::make_mut(&mut self.lens);
                if let Ok(pos) = lens.binary_search_by_key(&key.len(), |&(len, _)| len) {
                    lens[pos].1 -= 1;
                    if lens[pos].1 == 0 {
                        lens.remove(pos);
                    }
                }
            }
        }
    }

    /// Offers every matcher whose literal is a prefix of the path, best first per bucket.
    pub fn scan<'a>(&'a self, req: &Prepared<'_>, best: &mut Option<&'a Arc<Matcher>>) {
        self.pathless.scan(req, best);
        let path = req.path;
        for &(len, _) in self.lens.iter() {
            if len > path.len() {
                break;
            }
            if !path.is_char_boundary(len) {
                continue;
            }
            if let Some(bucket) = self.by_prefix.get(&path[..len]) {
                bucket.scan(req, best);
            }
        }
    }
}

/// A matcher's literals, each once.
fn distinct_keys(m: &Matcher) -> Vec<&str> {
    let mut keys: Vec<&str> = m.paths.iter().map(|p| p.index_key()).collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}
