//! Test-only crash points, so crash-consistency tests can kill a process *inside* an
//! operation (by progress, not by wall-clock luck).
//!
//! `DELTAPLANE_FAILPOINT=<name>:<n>` makes the process abort (`SIGABRT`, no unwinding, no
//! destructors — as abrupt as `kill -9` for the files it has open) the `n`-th time the named
//! point is reached. Unset, a point costs one atomic load. Points:
//!
//! - `dp.apply.write`: a delta written into an open redb write transaction (not committed);
//! - `dp.apply.commit`: an apply about to commit;
//! - `dp.apply.committed`: an apply just committed (before anyone is told);
//! - `dp.stage.page`: a page of a paged transfer staged.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

struct Point {
    name: String,
    at: u64,
    seen: AtomicU64,
}

fn configured() -> Option<&'static Point> {
    static POINT: OnceLock<Option<Point>> = OnceLock::new();
    POINT
        .get_or_init(|| {
            let spec = std::env::var("DELTAPLANE_FAILPOINT").ok()?;
            let (name, at) = spec.rsplit_once(':')?;
            Some(Point {
                name: name.to_owned(),
                at: at.parse().ok()?,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks that `name` was reached; aborts the process when its configured count is reached.
#[inline]
pub fn hit(name: &str) {
    if let Some(p) = configured()
        && p.name == name
        && p.seen.fetch_add(1, Ordering::Relaxed) + 1 == p.at
    {
        eprintln!("deltaplane: failpoint {name}:{} reached, aborting", p.at);
        std::process::abort();
    }
}
