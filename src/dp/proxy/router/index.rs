//! Copy-on-write indexes over the matchers, so that a request looks at few of them and an
//! update copies little.
//!
//! A [`ShardedMap`] is a string-keyed map split into shards behind `Arc`s: cloning it copies
//! the shard pointers, and changing one key copies only that key's shard. A [`PathIndex`]
//! holds the matchers of one host group by the literal their paths start with (a prefix, or
//! a regex's literal prefix), so a request looks up only the prefixes of its own path.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, OnceLock};

use regex::RegexSet;

use crate::dp::proxy::router::matcher::{Key, Matcher, PathPat, Prepared};

/// The multiply-rotate hash of rustc (FxHash): keys come from configuration, lookups from
/// requests never insert, so flooding is not a concern and speed is.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
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

    /// Every value, in no order (tests only).
    #[cfg(test)]
    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|shard| shard.values())
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

/// Buckets with at least this many matchers get [`RegexSet`] prefilters.
const PREFILTER_AT: usize = 8;

/// Matchers sorted by key, greatest first.
#[derive(Clone, Default)]
pub(crate) struct Bucket {
    matchers: Vec<Arc<Matcher>>,
    /// Built on the first scan of a large bucket and dropped by any change, so an update
    /// never compiles a set.
    prefilter: OnceLock<Prefilter>,
}

/// `RegexSet`s over the path regexes of a bucket's matchers, one per chunk of
/// [`CHUNK`] matchers, so that a request with many regexes under one literal (e.g.
/// `~/api/v\d+/...`) runs one search per chunk, not one per route. Small sets keep the
/// lazy DFA effective; one set over thousands of patterns falls back to a slow engine.
#[derive(Clone)]
struct Prefilter {
    chunks: Vec<Chunk>,
}

/// Matchers in one chunk of a bucket.
const CHUNK: usize = 32;

#[derive(Clone)]
struct Chunk {
    /// `None` when the chunk has too few regexes to be worth it, or the set failed to build.
    set: Option<RegexSet>,
    /// For the chunk's matcher `j`, its patterns are `starts[j]..starts[j + 1]` of the set.
    starts: Vec<usize>,
    /// Whether the chunk's matcher `j` has only regex paths (otherwise it is always evaluated).
    regex_only: Vec<bool>,
}

// === impl Prefilter ===

impl Prefilter {
    fn build(matchers: &[Arc<Matcher>]) -> Prefilter {
        let chunks = matchers
            .chunks(CHUNK)
            .map(|chunk| {
                let mut patterns = Vec::new();
                let mut starts = Vec::with_capacity(chunk.len() + 1);
                let mut regex_only = Vec::with_capacity(chunk.len());
                for m in chunk {
                    starts.push(patterns.len());
                    let mut only = true;
                    for p in m.paths.iter() {
                        match p {
                            PathPat::Regex { regex, .. } => patterns.push(regex.as_str()),
                            PathPat::Prefix(_) => only = false,
                        }
                    }
                    regex_only.push(only && !m.paths.is_empty());
                }
                starts.push(patterns.len());
                let set = if patterns.len() >= 2 {
                    RegexSet::new(patterns).ok()
                } else {
                    None
                };
                Chunk {
                    set,
                    starts,
                    regex_only,
                }
            })
            .collect();
        Prefilter { chunks }
    }
}

// === impl Bucket ===

impl Bucket {
    fn insert(&mut self, m: Arc<Matcher>) {
        let pos = self.matchers.partition_point(|x| x.key > m.key);
        self.matchers.insert(pos, m);
        self.prefilter = OnceLock::new();
    }

    fn remove(&mut self, key: Key) {
        self.matchers.retain(|x| x.key != key);
        self.prefilter = OnceLock::new();
    }

    fn is_empty(&self) -> bool {
        self.matchers.is_empty()
    }

    /// Finds the first (best) matcher that beats `best` and matches.
    fn scan<'a>(&'a self, req: &Prepared<'_>, best: &mut Option<&'a Arc<Matcher>>) {
        let prefilter = if self.matchers.len() >= PREFILTER_AT {
            Some(
                self.prefilter
                    .get_or_init(|| Prefilter::build(&self.matchers)),
            )
        } else {
            None
        };
        // The set matches of the chunk being walked, computed when the walk reaches it.
        let mut hits: Option<(usize, regex::SetMatches)> = None;
        for (idx, m) in self.matchers.iter().enumerate() {
            if let Some(b) = best
                && b.key >= m.key
            {
                return;
            }
            if let Some(pf) = prefilter {
                let (chunk_idx, j) = (idx / CHUNK, idx % CHUNK);
                let chunk = &pf.chunks[chunk_idx];
                if let Some(set) = &chunk.set
                    && chunk.regex_only[j]
                {
                    let chunk_hits = match &hits {
                        Some((at, h)) if *at == chunk_idx => h,
                        _ => &hits.insert((chunk_idx, set.matches(req.path))).1,
                    };
                    if !(chunk.starts[j]..chunk.starts[j + 1]).any(|p| chunk_hits.matched(p)) {
                        continue;
                    }
                }
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
