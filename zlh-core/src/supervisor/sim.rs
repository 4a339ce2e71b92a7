//! A supervisor without processes, for the simulator and for tests of everything above the
//! supervisor: each start plays the next scripted run (output lines, then an exit after its
//! uptime) on tokio time, so a paused-clock test can walk through hours of crashes and backoffs
//! at once. It shares the pure parts with the real supervisor ([`CrashTracker`], [`Classifier`],
//! [`OutputHub`]) and follows the same state machine:
//! `stopped → starting → running → backoff | stopped | error`, `backoff → starting`, and a stop
//! from any state goes through `stopping` to `stopped` with no restart afterwards.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use super::classify::strip_ansi;
use super::output::OutputReceiver;
use super::process::give_up_reason;
use tokio::time::Instant;

use super::classify::{Classifier, ExitInfo, RunOutput};
use super::output::{OutputHub, OutputOptions};
use super::policy::{CrashTracker, Decision};
use super::{CrashRecord, OutputLine, ProcessSpec, ProcessState, ProcessStatus, Supervisor, SupervisorError};

/// Output lines kept in a crash record.
pub const CRASH_TAIL_LINES: usize = 50;
/// Crash records kept in the history.
pub const CRASH_HISTORY: usize = 100;

/// One scripted run: it prints `output`, lives `uptime`, then ends with `exit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimRun {
    pub uptime: Duration,
    pub exit: ExitInfo,
    pub output: Vec<String>,
    /// Lines written to stderr, after `output`.
    pub stderr: Vec<String>,
}

impl SimRun {
    /// A run that exits with `code` after `uptime`.
    pub fn exit_code(uptime: Duration, code: i32) -> Self {
        Self {
            uptime,
            exit: ExitInfo { code: Some(code), signal: None, memory_limit_hit: false },
            output: Vec::new(),
            stderr: Vec::new(),
        }
    }

    pub fn with_output(mut self, lines: &[&str]) -> Self {
        self.output = lines.iter().map(|l| l.to_string()).collect();
        self
    }

    pub fn with_stderr(mut self, lines: &[&str]) -> Self {
        self.stderr = lines.iter().map(|l| l.to_string()).collect();
        self
    }
}

/// The in-memory supervisor. When the script runs out, a start runs until stopped.
pub struct SimSupervisor {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    output: OutputHub,
    classifier: Classifier,
    states: broadcast::Sender<ProcessState>,
}

struct Inner {
    state: ProcessState,
    script: VecDeque<SimRun>,
    tracker: CrashTracker,
    crashes: VecDeque<CrashRecord>,
    crash_count: u32,
    /// Why the supervisor gave up, in `error`.
    error: Option<String>,
    pid: Option<u32>,
    runs_started: u32,
    sent: Vec<String>,
    /// Bumped by every stop/start, so a task of an earlier generation knows to quit.
    generation: u64,
    task: Option<JoinHandle<()>>,
}

impl SimSupervisor {
    /// Restart policy, backoff and limits come from `spec`; the default classification rules.
    pub fn new(spec: &ProcessSpec, script: impl IntoIterator<Item = SimRun>) -> Self {
        Self::with_classifier(spec, script, Classifier::default())
    }

    pub fn with_classifier(
        spec: &ProcessSpec,
        script: impl IntoIterator<Item = SimRun>,
        classifier: Classifier,
    ) -> Self {
        let output = OutputHub::new(OutputOptions::default()).expect("no log file to open");
        let tracker = CrashTracker::new(spec.restart, spec.backoff.clone(), spec.stable_after, spec.failure_limit);
        let shared = Shared {
            inner: Mutex::new(Inner {
                state: ProcessState::Stopped,
                script: script.into_iter().collect(),
                tracker,
                crashes: VecDeque::new(),
                crash_count: 0,
                error: None,
                pid: None,
                runs_started: 0,
                sent: Vec::new(),
                generation: 0,
                task: None,
            }),
            output,
            classifier,
            states: broadcast::channel(256).0,
        };
        Self { shared: Arc::new(shared) }
    }

    /// Every state change, as it happens.
    pub fn subscribe_states(&self) -> broadcast::Receiver<ProcessState> {
        self.shared.states.subscribe()
    }

    /// Appends a run to the script.
    pub fn push_run(&self, run: SimRun) {
        self.shared.lock().script.push_back(run);
    }

    /// Scripted runs not played yet.
    pub fn remaining_runs(&self) -> usize {
        self.shared.lock().script.len()
    }

    /// Lines written with `send_line`, in order.
    pub fn sent_lines(&self) -> Vec<String> {
        self.shared.lock().sent.clone()
    }

    /// Ends the current generation: cancels its task and goes to `stopped` via `stopping`.
    fn stop_now(&self, inner: &mut Inner) {
        inner.generation += 1;
        if let Some(task) = inner.task.take() {
            task.abort();
        }
        inner.pid = None;
        match inner.state {
            ProcessState::Stopped => {}
            ProcessState::Starting | ProcessState::Running => {
                self.shared.set_state(inner, ProcessState::Stopping);
                self.shared.set_state(inner, ProcessState::Stopped);
            }
            _ => self.shared.set_state(inner, ProcessState::Stopped),
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, inner: &mut Inner, state: ProcessState) {
        if inner.state != state {
            inner.state = state;
            // No subscriber is fine.
            let _ = self.states.send(state);
        }
    }

    /// Plays runs until one ends in `stopped`/`error`, the script runs out, or the generation
    /// changes (a stop or start by the user; checked under the lock after every wait).
    async fn run_loop(self: Arc<Self>, generation: u64) {
        loop {
            let run = {
                let mut inner = self.lock();
                if inner.generation != generation {
                    return;
                }
                self.set_state(&mut inner, ProcessState::Starting);
                inner.runs_started += 1;
                inner.pid = Some(10_000 + inner.runs_started);
                self.set_state(&mut inner, ProcessState::Running);
                inner.script.pop_front()
            };
            // An empty script: a process that runs until stopped.
            let Some(run) = run else { return };
            let started = Instant::now();
            let first_seq = self.output.next_seq();
            self.output.push_lines(&run.output);
            self.output.push_lines(&run.stderr);
            tokio::time::sleep(run.uptime).await;

            let delay = {
                let mut inner = self.lock();
                if inner.generation != generation {
                    return;
                }
                let uptime = started.elapsed();
                let decision = self.record_exit(&mut inner, &run.exit, &run.stderr, uptime, first_seq);
                match decision {
                    Decision::RestartAfter(delay) => {
                        self.set_state(&mut inner, ProcessState::Backoff);
                        delay
                    }
                    Decision::Stay => {
                        self.set_state(&mut inner, ProcessState::Stopped);
                        return;
                    }
                    Decision::GiveUp => {
                        let last = inner.crashes.back().expect("just recorded");
                        inner.error = Some(give_up_reason(inner.tracker.consecutive(), last));
                        self.set_state(&mut inner, ProcessState::Error);
                        return;
                    }
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Keeps a crash record of an exit nobody asked for (its tail: the run's lines from
    /// `first_seq` on) and asks the policy what next.
    fn record_exit(
        &self,
        inner: &mut Inner,
        exit: &ExitInfo,
        stderr: &[String],
        uptime: Duration,
        first_seq: u64,
    ) -> Decision {
        let log_tail: Vec<String> =
            self.output.tail_since(first_seq, CRASH_TAIL_LINES).iter().map(|l| strip_ansi(l)).collect();
        let classification = self.classifier.classify(exit, RunOutput { tail: &log_tail, stderr });
        if inner.crashes.len() >= CRASH_HISTORY {
            inner.crashes.pop_front();
        }
        inner.crashes.push_back(CrashRecord {
            time: Utc::now(),
            exit_code: exit.code,
            signal: exit.signal,
            uptime,
            log_tail,
            classification,
        });
        inner.crash_count += 1;
        inner.pid = None;
        let clean = exit.code == Some(0) && exit.signal.is_none();
        inner.tracker.on_exit(uptime, clean)
    }
}

#[async_trait]
impl Supervisor for SimSupervisor {
    async fn start(&self) -> Result<(), SupervisorError> {
        let mut inner = self.shared.lock();
        match inner.state {
            ProcessState::Stopped | ProcessState::Error => {}
            other => return Err(SupervisorError::WrongState(other)),
        }
        // A start asked for by the user forgets earlier crash streaks.
        inner.tracker.reset();
        inner.error = None;
        inner.generation += 1;
        let generation = inner.generation;
        self.shared.set_state(&mut inner, ProcessState::Starting);
        inner.task = Some(tokio::spawn(self.shared.clone().run_loop(generation)));
        Ok(())
    }

    async fn stop(&self) -> Result<(), SupervisorError> {
        let mut inner = self.shared.lock();
        self.stop_now(&mut inner);
        Ok(())
    }

    async fn restart(&self) -> Result<(), SupervisorError> {
        self.stop().await?;
        self.start().await
    }

    async fn status(&self) -> ProcessStatus {
        let inner = self.shared.lock();
        ProcessStatus {
            state: inner.state,
            pid: inner.pid,
            crash_count: inner.crash_count,
            last_crash: inner.crashes.back().cloned(),
            error: (inner.state == ProcessState::Error).then(|| inner.error.clone()).flatten(),
        }
    }

    async fn send_line(&self, line: &str) -> Result<(), SupervisorError> {
        let mut inner = self.shared.lock();
        match inner.state {
            ProcessState::Running => {
                inner.sent.push(line.to_string());
                Ok(())
            }
            other => Err(SupervisorError::WrongState(other)),
        }
    }

    fn subscribe_output(&self) -> (Vec<OutputLine>, OutputReceiver) {
        self.shared.output.subscribe()
    }

    async fn crash_history(&self) -> Vec<CrashRecord> {
        self.shared.lock().crashes.iter().cloned().collect()
    }
}

impl Drop for SimSupervisor {
    fn drop(&mut self) {
        if let Some(task) = self.shared.lock().task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::policy::default_schedule;
    use crate::supervisor::{CrashClass, RestartPolicy, StopStrategy};
    use std::collections::BTreeMap;
    use tokio::sync::broadcast::error::TryRecvError;
    use ProcessState::*;

    const SEC: Duration = Duration::from_secs(1);

    fn spec(restart: RestartPolicy) -> ProcessSpec {
        ProcessSpec {
            command: "java".into(),
            args: vec!["-jar".into(), "server.jar".into()],
            env: BTreeMap::new(),
            cwd: "/srv/minecraft".into(),
            user: None,
            group: None,
            stop: StopStrategy {
                stdin_command: Some("stop".into()),
                command_timeout: 30 * SEC,
                term_timeout: 10 * SEC,
            },
            restart,
            backoff: default_schedule(),
            stable_after: 30 * SEC,
            failure_limit: 3,
            ready_pattern: None,
            memory_limit_bytes: None,
        }
    }

    fn crashes(uptimes: &[u64]) -> Vec<SimRun> {
        uptimes.iter().map(|s| SimRun::exit_code(Duration::from_secs(*s), 1)).collect()
    }

    /// State changes with the time each was seen, until `last` (inclusive).
    async fn until(rx: &mut broadcast::Receiver<ProcessState>, last: ProcessState) -> Vec<(ProcessState, Instant)> {
        let mut seen = Vec::new();
        loop {
            let state = rx.recv().await.unwrap();
            seen.push((state, Instant::now()));
            if state == last {
                return seen;
            }
        }
    }

    /// Time spent in each `backoff` before the next `starting`.
    fn backoffs(seen: &[(ProcessState, Instant)]) -> Vec<Duration> {
        seen.windows(2).filter(|w| w[0].0 == Backoff && w[1].0 == Starting).map(|w| w[1].1 - w[0].1).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_follows_the_schedule_then_gives_up() {
        let sim = SimSupervisor::new(&spec(RestartPolicy::Always), crashes(&[1, 1, 1, 1, 1, 1]));
        let mut rx = sim.subscribe_states();
        sim.start().await.unwrap();
        let seen = until(&mut rx, Error).await;
        assert_eq!(backoffs(&seen), [30 * SEC, 60 * SEC, 120 * SEC, 120 * SEC]);
        let states: Vec<_> = seen.iter().map(|s| s.0).collect();
        assert_eq!(&states[..4], [Starting, Running, Backoff, Starting]);
        assert_eq!(states.iter().filter(|s| **s == Running).count(), 5);
        // Given up: nothing more happens and the sixth run is never played.
        tokio::time::sleep(3600 * SEC).await;
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        assert_eq!(sim.remaining_runs(), 1);
        let status = sim.status().await;
        assert_eq!((status.state, status.crash_count, status.pid), (Error, 5, None));
        assert_eq!(sim.crash_history().await.len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stable_run_resets_the_backoff() {
        let sim = SimSupervisor::new(&spec(RestartPolicy::Always), crashes(&[1, 1, 40, 1]));
        let mut rx = sim.subscribe_states();
        sim.start().await.unwrap();
        let mut seen = until(&mut rx, Backoff).await;
        for _ in 0..3 {
            seen.extend(until(&mut rx, Backoff).await);
        }
        // The fifth start runs until stopped (the script is over).
        seen.extend(until(&mut rx, Running).await);
        assert_eq!(backoffs(&seen), [30 * SEC, 60 * SEC, 30 * SEC, 60 * SEC]);
        let uptimes: Vec<_> = sim.crash_history().await.iter().map(|c| c.uptime).collect();
        assert_eq!(uptimes, [SEC, SEC, 40 * SEC, SEC]);
    }

    #[tokio::test(start_paused = true)]
    async fn no_restart_after_a_stop_during_backoff() {
        let sim = SimSupervisor::new(&spec(RestartPolicy::Always), crashes(&[1, 1]));
        let mut rx = sim.subscribe_states();
        sim.start().await.unwrap();
        until(&mut rx, Backoff).await;
        sim.stop().await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), Stopped);
        tokio::time::sleep(3600 * SEC).await;
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        assert_eq!(sim.remaining_runs(), 1);
        assert_eq!(sim.status().await.state, Stopped);
    }

    #[tokio::test(start_paused = true)]
    async fn a_requested_stop_is_no_crash() {
        let sim = SimSupervisor::new(&spec(RestartPolicy::Always), crashes(&[100]));
        let mut rx = sim.subscribe_states();
        sim.start().await.unwrap();
        until(&mut rx, Running).await;
        tokio::time::sleep(10 * SEC).await;
        sim.stop().await.unwrap();
        let states: Vec<_> = until(&mut rx, Stopped).await.iter().map(|s| s.0).collect();
        assert_eq!(states, [Stopping, Stopped]);
        tokio::time::sleep(3600 * SEC).await;
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
        assert!(sim.crash_history().await.is_empty());
        // Stopping again is harmless.
        sim.stop().await.unwrap();
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
    }

    #[tokio::test(start_paused = true)]
    async fn crash_record_has_tail_uptime_and_class() {
        let run = SimRun::exit_code(5 * SEC, 1)
            .with_output(&["[12:00:00] [Server thread/INFO]: Preparing level \"world\""])
            .with_stderr(&["Exception in thread \"Server thread\" java.lang.OutOfMemoryError: Java heap space"]);
        let sim = SimSupervisor::new(&spec(RestartPolicy::Never), [run]);
        let mut rx = sim.subscribe_states();
        let (snapshot, mut lines) = sim.subscribe_output();
        assert!(snapshot.is_empty());
        sim.start().await.unwrap();
        until(&mut rx, Stopped).await;
        let status = sim.status().await;
        assert_eq!((status.state, status.crash_count), (Stopped, 1));
        let crash = status.last_crash.unwrap();
        assert_eq!(crash.classification, CrashClass::Oom);
        assert_eq!((crash.exit_code, crash.signal, crash.uptime), (Some(1), None, 5 * SEC));
        assert_eq!(crash.log_tail.len(), 2);
        assert!(crash.log_tail[1].contains("OutOfMemoryError"));
        match lines.recv().await {
            Some(crate::supervisor::output::OutputEvent::Lines(batch)) => assert_eq!(batch.first().unwrap().seq, 0),
            other => panic!("{other:?}"),
        }
        assert_eq!(sim.crash_history().await, [crash]);
    }

    #[tokio::test(start_paused = true)]
    async fn on_failure_stays_stopped_after_a_clean_exit() {
        let sim = SimSupervisor::new(&spec(RestartPolicy::OnFailure), [SimRun::exit_code(3 * SEC, 0)]);
        let mut rx = sim.subscribe_states();
        sim.start().await.unwrap();
        let states: Vec<_> = until(&mut rx, Stopped).await.iter().map(|s| s.0).collect();
        assert_eq!(states, [Starting, Running, Stopped]);
        let crash = sim.status().await.last_crash.unwrap();
        assert_eq!(crash.classification, CrashClass::UnexpectedExit);
    }

    #[tokio::test(start_paused = true)]
    async fn start_from_error_begins_a_new_streak() {
        let mut s = spec(RestartPolicy::Always);
        s.failure_limit = 1;
        s.backoff = vec![30 * SEC];
        let sim = SimSupervisor::new(&s, crashes(&[1, 1, 1]));
        let mut rx = sim.subscribe_states();
        sim.start().await.unwrap();
        until(&mut rx, Error).await;
        assert_eq!(sim.remaining_runs(), 2);
        sim.start().await.unwrap();
        until(&mut rx, Error).await;
        assert_eq!(sim.remaining_runs(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn actions_in_the_wrong_state_are_refused() {
        let sim = SimSupervisor::new(&spec(RestartPolicy::Always), []);
        let mut rx = sim.subscribe_states();
        assert!(matches!(sim.send_line("say hi").await, Err(SupervisorError::WrongState(Stopped))));
        sim.start().await.unwrap();
        until(&mut rx, Running).await;
        assert!(matches!(sim.start().await, Err(SupervisorError::WrongState(Running))));
        sim.send_line("say hi").await.unwrap();
        assert_eq!(sim.sent_lines(), ["say hi"]);
        assert!(sim.status().await.pid.is_some());
        sim.restart().await.unwrap();
        let states: Vec<_> = until(&mut rx, Running).await.iter().map(|s| s.0).collect();
        assert_eq!(states, [Stopping, Stopped, Starting, Running]);
    }
}
