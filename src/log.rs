//! Logging through Redis's log from any thread, without Redis's lock, and
//! warnings that repeat at most once per period.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Redis's logger takes a C string: a NUL byte would end (or, in the
/// crate, panic) the line.
fn clean(msg: &str) -> std::borrow::Cow<'_, str> {
    if msg.contains('\0') {
        msg.replace('\0', " ").into()
    } else {
        msg.into()
    }
}

pub fn warning(msg: &str) {
    redis_module::logging::log_warning(clean(msg));
}

pub fn notice(msg: &str) {
    redis_module::logging::log_notice(clean(msg));
}

pub fn debug(msg: &str) {
    redis_module::logging::log_debug(clean(msg));
}

/// Whether Redis logs at `debug` (its `loglevel`, followed through config
/// change events): lines logged per fill or per key are formatted only then.
static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Logs `msg()` at debug level, formatting it only when Redis logs debug.
pub fn debug_with(msg: impl FnOnce() -> String) {
    if debug_enabled() {
        debug(&msg());
    }
}

/// A warning logged at most once per `period`; the next one that gets
/// through says how many were held back.
pub struct Every {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Every {
    pub const fn new(period: Duration) -> Every {
        Every {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// Logs `msg()` at `level` unless one was logged less than a period ago.
    pub fn log(&self, level: fn(&str), msg: impl FnOnce() -> String) {
        let held_back = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            if st.0.is_some_and(|at| now.duration_since(at) < self.period) {
                st.1 += 1;
                return;
            }
            st.0 = Some(now);
            std::mem::take(&mut st.1)
        };
        let msg = msg();
        if held_back > 0 {
            level(&format!("{msg} ({held_back} more like this not logged)"));
        } else {
            level(&msg);
        }
    }
}
