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
use tokio::time::Instant;

use super::classify::{Classifier, ExitInfo};
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
}

impl SimRun {
    /// A run that exits with `code` after `uptime`.
    pub fn exit_code(uptime: Duration, code: i32) -> Self {
        Self { uptime, exit: ExitInfo { code: Some(code), signal: None, memory_limit_hit: false }, output: Vec::new() }
    }

    pub fn with_output(mut self, lines: &[&str]) -> Self {
        self.output = lines.iter().map(|l| l.to_string()).collect();
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
            for line in &run.output {
                self.output.push(line);
            }
            tokio::time::sleep(run.uptime).await;

            let delay = {
                let mut inner = self.lock();
                if inner.generation != generation {
                    return;
                }
                let uptime = started.elapsed();
                let decision = self.record_exit(&mut inner, &run.exit, uptime);
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
                        self.set_state(&mut inner, ProcessState::Error);
                        return;
                    }
                }
            };
            tokio::time::sleep(delay).await;
        }
    }

    /// Keeps a crash record of an exit nobody asked for and asks the policy what next.
    fn record_exit(&self, inner: &mut Inner, exit: &ExitInfo, uptime: Duration) -> Decision {
        let log_tail = self.output.tail(CRASH_TAIL_LINES);
        let classification = self.classifier.classify(exit, &log_tail);
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

    fn subscribe_output(&self) -> (Vec<OutputLine>, broadcast::Receiver<OutputLine>) {
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
