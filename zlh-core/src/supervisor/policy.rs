//! Restart policy: the backoff schedule, its reset after a stable run, and giving up.
//! Pure state, no clock: callers pass uptimes in, so it is tested exhaustively without time.
//! (Agreed interface; bodies being written.)

use std::time::Duration;

use super::RestartPolicy;

/// What to do after an exit nobody asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Wait this long in `backoff`, then start again.
    RestartAfter(Duration),
    /// Stay stopped: the policy does not restart this exit (`never`, or `on-failure` after exit 0).
    Stay,
    /// Too many failures: go to `error`.
    GiveUp,
}

/// Counts crashes in a row and picks the next delay.
#[derive(Debug, Clone)]
pub struct CrashTracker {
    _policy: RestartPolicy,
    _schedule: Vec<Duration>,
    _stable_after: Duration,
    _failure_limit: u32,
}

impl CrashTracker {
    pub fn new(_policy: RestartPolicy, _schedule: Vec<Duration>, _stable_after: Duration, _failure_limit: u32) -> Self {
        unimplemented!()
    }
    /// Records an exit after `uptime`; `clean` is exit code 0.
    pub fn on_exit(&mut self, _uptime: Duration, _clean: bool) -> Decision {
        unimplemented!()
    }
    /// Crashes in a row so far (0 after a stable run or a reset).
    pub fn consecutive(&self) -> u32 {
        unimplemented!()
    }
    /// Forget the history (a start requested by the user).
    pub fn reset(&mut self) {
        unimplemented!()
    }
}
