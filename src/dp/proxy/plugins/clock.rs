//! The time source of the plugins: the system clock, or a manual one that tests set.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Where the plugins read the wall-clock time (jwt `exp` / `nbf`, rate-limiting windows).
///
/// Kong reads `ngx.time()` (whole seconds); the rate-limiting plugin multiplies it by 1000.
#[derive(Clone, Debug, Default)]
pub struct Clock {
    manual: Option<Arc<AtomicU64>>,
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { manual: None }
    }

    /// A clock that stays at `unix_ms` until [`Clock::set_ms`] moves it; clones share the time.
    pub fn manual(unix_ms: u64) -> Clock {
        Clock {
            manual: Some(Arc::new(AtomicU64::new(unix_ms))),
        }
    }

    /// Moves a manual clock to `unix_ms`; does nothing on the system clock.
    pub fn set_ms(&self, unix_ms: u64) {
        if let Some(manual) = &self.manual {
            manual.store(unix_ms, Ordering::Relaxed);
        }
    }

    /// The current time in milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match &self.manual {
            Some(manual) => manual.load(Ordering::Relaxed),
            None => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
        }
    }

    /// The current time in whole seconds since the Unix epoch, as `ngx.time()` gives it.
    pub fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }
}
