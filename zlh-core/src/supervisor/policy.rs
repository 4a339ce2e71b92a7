//! Restart policy: the backoff schedule, its reset after a stable run, and giving up.
//! Pure state, no clock: callers pass uptimes in, so it is tested exhaustively without time.
//!
//! Exact semantics of [`CrashTracker::on_exit`]:
//!
//! 1. `never` → [`Decision::Stay`]; `on-failure` with a clean exit (code 0) → [`Decision::Stay`].
//!    Neither touches the counters.
//! 2. Every other exit is a crash. If the run lasted at least `stable_after`, the streak starts
//!    over (consecutive = 0) before this crash is counted. Then consecutive += 1.
//! 3. The delay is `schedule[min(consecutive - 1, len - 1)]`: the last step repeats. An empty
//!    schedule restarts at once (`Duration::ZERO`).
//! 4. Crashes at the cap (`consecutive >= schedule.len()`) are counted; when that count reaches
//!    `failure_limit` the answer is [`Decision::GiveUp`] instead of a delay. `failure_limit` 0
//!    never gives up.
//!
//! So with 30/60/120 s and limit 3: crash 1 → 30 s, 2 → 60 s, 3 → 120 s, 4 → 120 s, 5 → give up.

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

/// The default backoff: 30 s, 60 s, 120 s (the last repeats).
pub fn default_schedule() -> Vec<Duration> {
    vec![Duration::from_secs(30), Duration::from_secs(60), Duration::from_secs(120)]
}

/// Counts crashes in a row and picks the next delay.
#[derive(Debug, Clone)]
pub struct CrashTracker {
    policy: RestartPolicy,
    schedule: Vec<Duration>,
    stable_after: Duration,
    failure_limit: u32,
    consecutive: u32,
}

impl CrashTracker {
    pub fn new(policy: RestartPolicy, schedule: Vec<Duration>, stable_after: Duration, failure_limit: u32) -> Self {
        Self { policy, schedule, stable_after, failure_limit, consecutive: 0 }
    }

    /// Records an exit after `uptime`; `clean` is exit code 0.
    pub fn on_exit(&mut self, uptime: Duration, clean: bool) -> Decision {
        match self.policy {
            RestartPolicy::Never => return Decision::Stay,
            RestartPolicy::OnFailure if clean => return Decision::Stay,
            _ => {}
        }
        if uptime >= self.stable_after {
            self.consecutive = 0;
        }
        self.consecutive = self.consecutive.saturating_add(1);

        // The first crash at the cap is number 1 (for an empty schedule every crash is at the cap).
        let len = self.schedule.len() as u64;
        let at_cap = u64::from(self.consecutive).saturating_sub(len.saturating_sub(1));
        if self.failure_limit > 0 && at_cap >= u64::from(self.failure_limit) {
            return Decision::GiveUp;
        }
        let step = (self.consecutive as usize - 1).min(self.schedule.len().saturating_sub(1));
        Decision::RestartAfter(self.schedule.get(step).copied().unwrap_or(Duration::ZERO))
    }

    /// Crashes in a row so far (0 after a stable run or a reset).
    pub fn consecutive(&self) -> u32 {
        self.consecutive
    }

    /// Carries on from a streak kept by an earlier supervisor.
    pub fn restore(&mut self, consecutive: u32) {
        self.consecutive = consecutive;
    }

    /// Forget the history (a start requested by the user).
    pub fn reset(&mut self) {
        self.consecutive = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHORT: Duration = Duration::from_secs(1);
    const STABLE: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Decision {
        Decision::RestartAfter(Duration::from_secs(s))
    }

    fn tracker(policy: RestartPolicy, limit: u32) -> CrashTracker {
        CrashTracker::new(policy, default_schedule(), STABLE, limit)
    }

    #[test]
    fn schedule_then_cap_then_give_up() {
        let mut t = tracker(RestartPolicy::Always, 3);
        let got: Vec<_> = (0..5).map(|_| t.on_exit(SHORT, false)).collect();
        assert_eq!(got, [secs(30), secs(60), secs(120), secs(120), Decision::GiveUp]);
        assert_eq!(t.consecutive(), 5);
    }

    #[test]
    fn limit_one_gives_up_at_first_crash_at_cap() {
        let mut t = tracker(RestartPolicy::Always, 1);
        assert_eq!(t.on_exit(SHORT, false), secs(30));
        assert_eq!(t.on_exit(SHORT, false), secs(60));
        assert_eq!(t.on_exit(SHORT, false), Decision::GiveUp);
    }

    #[test]
    fn limit_zero_never_gives_up() {
        let mut t = tracker(RestartPolicy::Always, 0);
        for _ in 0..1000 {
            assert_ne!(t.on_exit(SHORT, false), Decision::GiveUp);
        }
        assert_eq!(t.on_exit(SHORT, false), secs(120));
    }

    #[test]
    fn stable_run_resets_the_streak() {
        let mut t = tracker(RestartPolicy::Always, 3);
        assert_eq!(t.on_exit(SHORT, false), secs(30));
        assert_eq!(t.on_exit(SHORT, false), secs(60));
        assert_eq!(t.on_exit(SHORT, false), secs(120));
        // Exactly `stable_after` counts as stable: this crash is the first of a new streak.
        assert_eq!(t.on_exit(STABLE, false), secs(30));
        assert_eq!(t.consecutive(), 1);
        assert_eq!(t.on_exit(STABLE - Duration::from_millis(1), false), secs(60));
    }

    #[test]
    fn stable_run_saves_from_give_up() {
        let mut t = tracker(RestartPolicy::Always, 3);
        for _ in 0..4 {
            t.on_exit(SHORT, false);
        }
        assert_eq!(t.on_exit(Duration::from_secs(3600), false), secs(30));
    }

    #[test]
    fn never_stays_and_counts_nothing() {
        let mut t = tracker(RestartPolicy::Never, 3);
        assert_eq!(t.on_exit(SHORT, false), Decision::Stay);
        assert_eq!(t.on_exit(SHORT, true), Decision::Stay);
        assert_eq!(t.consecutive(), 0);
    }

    #[test]
    fn on_failure_stays_after_clean_exit_and_restarts_after_failure() {
        let mut t = tracker(RestartPolicy::OnFailure, 3);
        assert_eq!(t.on_exit(SHORT, true), Decision::Stay);
        assert_eq!(t.consecutive(), 0);
        assert_eq!(t.on_exit(SHORT, false), secs(30));
        // A clean exit in between neither counts nor resets.
        assert_eq!(t.on_exit(SHORT, true), Decision::Stay);
        assert_eq!(t.on_exit(SHORT, false), secs(60));
    }

    #[test]
    fn always_restarts_clean_exits_too() {
        let mut t = tracker(RestartPolicy::Always, 3);
        assert_eq!(t.on_exit(SHORT, true), secs(30));
        assert_eq!(t.on_exit(SHORT, true), secs(60));
    }

    #[test]
    fn empty_schedule_restarts_at_once() {
        let mut t = CrashTracker::new(RestartPolicy::Always, vec![], STABLE, 3);
        assert_eq!(t.on_exit(SHORT, false), Decision::RestartAfter(Duration::ZERO));
        assert_eq!(t.on_exit(SHORT, false), Decision::RestartAfter(Duration::ZERO));
        assert_eq!(t.on_exit(SHORT, false), Decision::GiveUp);
        let mut t = CrashTracker::new(RestartPolicy::Always, vec![], STABLE, 0);
        for _ in 0..10 {
            assert_eq!(t.on_exit(SHORT, false), Decision::RestartAfter(Duration::ZERO));
        }
    }

    #[test]
    fn single_step_schedule_is_the_cap() {
        let mut t = CrashTracker::new(RestartPolicy::Always, vec![SHORT], STABLE, 2);
        assert_eq!(t.on_exit(SHORT, false), Decision::RestartAfter(SHORT));
        assert_eq!(t.on_exit(SHORT, false), Decision::GiveUp);
    }

    #[test]
    fn reset_forgets_the_streak() {
        let mut t = tracker(RestartPolicy::Always, 3);
        for _ in 0..5 {
            t.on_exit(SHORT, false);
        }
        t.reset();
        assert_eq!(t.consecutive(), 0);
        assert_eq!(t.on_exit(SHORT, false), secs(30));
    }

    proptest! {
        #[test]
        fn delays_grow_within_a_streak_and_give_up_exactly_at_the_limit(
            schedule_secs in proptest::collection::vec(0u64..300, 0..6),
            limit in 0u32..6,
            runs in proptest::collection::vec((0u64..60, any::<bool>()), 1..40),
        ) {
            let mut sorted = schedule_secs.clone();
            sorted.sort_unstable();
            let schedule: Vec<_> = sorted.iter().map(|s| Duration::from_secs(*s)).collect();
            let cap = schedule.last().copied().unwrap_or(Duration::ZERO);
            let mut t = CrashTracker::new(RestartPolicy::Always, schedule.clone(), STABLE, limit);
            let mut last = Duration::ZERO;
            let mut streak = 0u32;
            for (uptime, clean) in runs {
                let uptime = Duration::from_secs(uptime);
                if uptime >= STABLE {
                    streak = 0;
                    last = Duration::ZERO;
                }
                streak += 1;
                let at_cap = (streak as usize + 1).saturating_sub(schedule.len().max(1));
                match t.on_exit(uptime, clean) {
                    Decision::RestartAfter(d) => {
                        prop_assert!(d >= last, "delay went down within a streak");
                        prop_assert!(d <= cap, "delay above the cap");
                        prop_assert!(limit == 0 || at_cap < limit as usize);
                        last = d;
                    }
                    Decision::GiveUp => {
                        prop_assert!(limit > 0 && at_cap == limit as usize);
                        break;
                    }
                    Decision::Stay => prop_assert!(false, "always never stays"),
                }
                prop_assert_eq!(t.consecutive(), streak);
            }
        }
    }
}
