//! Test-only crash points, so crash-consistency tests can kill a process *inside* an
//! operation (by progress, not by wall-clock luck).
//!
//! `DELTAPLANE_FAILPOINT=<name>:<n>` makes the process send itself `SIGKILL` the `n`-th time
//! the named point is reached: no unwinding, no destructors, no flush, no other thread runs
//! on. Unset, a point costs one atomic load. Points:
//!
//! - `dp.apply.write`: a delta written into an open redb write transaction (not committed);
//! - `dp.apply.commit`: an apply about to commit;
//! - `dp.apply.committed`: an apply just committed (before anyone is told);
//! - `dp.stage.page`: a page of a paged transfer fed into its apply (not committed).

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

/// Marks that `name` was reached; kills the process when its configured count is reached.
#[inline]
pub fn hit(name: &str) {
    if let Some(p) = configured()
        && p.name == name
        && p.seen.fetch_add(1, Ordering::Relaxed) + 1 == p.at
    {
        eprintln!(
            "deltaplane: failpoint {name}:{} reached, killing the process",
            p.at
        );
        // SAFETY: raise(3) has no memory-safety preconditions. SIGKILL cannot be caught, so
        // the process ends here; abort() is the fallback should it somehow return.
        unsafe {
            libc::raise(libc::SIGKILL);
        }
        std::process::abort();
    }
}
