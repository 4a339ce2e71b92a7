//! The real-process supervisor: one OS process (a game server, code-server), started in its own
//! process group so stop signals reach everything it forked.
//!
//! One actor task owns the state machine (`stopped → starting → running → stopping → stopped`,
//! crash → `backoff` | `error` | `stopped`); `start`/`stop`/`restart` are messages to it, so a stop
//! during a backoff wait simply drops the pending restart. `status`, `send_line` and the output
//! never wait for the actor. The process is either a direct child (`tokio::process`) or lives
//! under a shim ([`super::shim`]) so it survives an agent restart; the actor only sees a [`Run`]
//! either way. All waiting uses `tokio::time`, so the backoff schedule is testable on paused time.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::FutureExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use super::classify::{strip_ansi, Classifier, ExitInfo, RunOutput};
use super::history::{HistoryFile, SavedHistory};
use super::output::{LineBuf, OutputHub, OutputOptions, OutputReceiver};
use super::policy::{CrashTracker, Decision};
use super::shim::{self, ShimConfig};
use super::{CrashRecord, OutputLine, ProcessSpec, ProcessState, ProcessStatus, Supervisor, SupervisorError};

/// Bytes read into one output batch at most (a pipe holds 64 KiB).
const READ_BUFFER: usize = 64 * 1024;

/// How long the output of an exited process may take to drain before its exit is reported.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Knobs of one supervisor besides the [`ProcessSpec`].
pub struct ProcessOptions {
    /// Used in logs and as the cgroup name.
    pub name: String,
    pub output: OutputOptions,
    pub classifier: Classifier,
    /// Output lines kept in each crash record.
    pub crash_tail_lines: usize,
    /// Crash records kept.
    pub crash_history: usize,
    /// Run the process under a shim in this state dir, so it outlives the agent.
    pub shim: Option<ShimConfig>,
    /// Parent cgroup (v2) for memory limits; `None` looks for a writable one, else `RLIMIT_AS`.
    pub cgroup_parent: Option<PathBuf>,
    /// Where crash history, streak, a pending backoff and an `error` reason are kept, so the
    /// next supervisor (after an agent restart) carries on from them; `None` keeps them in memory.
    pub history_file: Option<PathBuf>,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        Self {
            name: "process".into(),
            output: OutputOptions::default(),
            classifier: Classifier::default(),
            crash_tail_lines: 50,
            crash_history: 20,
            shim: None,
            cgroup_parent: None,
            history_file: None,
        }
    }
}

/// One state transition, stamped on the tokio clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateEvent {
    pub state: ProcessState,
    pub pid: Option<u32>,
    /// The wait before the next start, for `backoff`.
    pub delay: Option<Duration>,
    pub at: Instant,
}

/// How the memory limit is enforced for a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum MemoryLimit {
    None,
    /// A child cgroup with a memory limit (`memory.max` on v2, `memory.limit_in_bytes` on v1);
    /// a kernel OOM kill shows as the `oom_kill` counter of `counter_file` (`memory.events` on
    /// v2, `memory.oom_control` on v1).
    Cgroup {
        dir: PathBuf,
        bytes: u64,
        counter_file: PathBuf,
        oom_kills_before: u64,
    },
    /// `RLIMIT_AS`: allocations fail; an OOM is recognised by the runtime's error text or SIGKILL.
    Rlimit {
        bytes: u64,
    },
}

/// Everything needed to spawn the process, resolved (user ids, memory mode). Serialized for the
/// shim, which spawns from the same plan, so both paths share [`LaunchPlan::std_command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchPlan {
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub memory: MemoryLimit,
}

impl LaunchPlan {
    /// The command: cleared env, own process group, user, memory limit. Stdio is left to the caller.
    pub fn std_command(&self) -> io::Result<std::process::Command> {
        let mut cmd = std::process::Command::new(&self.command);
        cmd.args(&self.args).env_clear().envs(&self.env).current_dir(&self.cwd).process_group(0);
        if let Some(gid) = self.gid {
            cmd.gid(gid);
        }
        if let Some(uid) = self.uid {
            cmd.uid(uid);
        }
        match &self.memory {
            MemoryLimit::None => {}
            MemoryLimit::Cgroup { dir, .. } => {
                // Opened here (with our rights) and written in the child before exec, so the
                // limit holds from the first allocation.
                let procs = OpenOptions::new().write(true).open(dir.join("cgroup.procs"))?;
                // SAFETY: only a write(2) on an already open fd between fork and exec.
                unsafe { cmd.pre_exec(move || (&procs).write_all(b"0")) };
            }
            MemoryLimit::Rlimit { bytes } => {
                let limit = rustix::process::Rlimit { current: Some(*bytes), maximum: Some(*bytes) };
                // SAFETY: setrlimit(2) is async-signal-safe.
                unsafe {
                    cmd.pre_exec(move || {
                        rustix::process::setrlimit(rustix::process::Resource::As, limit).map_err(io::Error::from)
                    })
                };
            }
        }
        Ok(cmd)
    }

    /// Removes the run's cgroup once its processes are gone (best effort: a cgroup that still
    /// holds a process stays, and the next start of the same name removes it).
    pub fn release_memory_limit(&self) {
        if let MemoryLimit::Cgroup { dir, .. } = &self.memory {
            let _ = fs::remove_dir(dir);
        }
    }

    /// How the run ended, including whether the memory limit was hit (the kernel's word only:
    /// output can be written by players, so it is no evidence here).
    pub fn exit_info(&self, status: Option<ExitStatus>) -> ExitInfo {
        let code = status.and_then(|s| s.code());
        let signal = status.and_then(|s| s.signal());
        let memory_limit_hit = match &self.memory {
            MemoryLimit::None => false,
            MemoryLimit::Cgroup { counter_file, oom_kills_before, .. } => oom_kills(counter_file) > *oom_kills_before,
            // A SIGKILL (or a wrapper's 137 for it) with a limit set is most likely the limit.
            MemoryLimit::Rlimit { .. } => signal == Some(sigkill()) || code == Some(128 + sigkill()),
        };
        ExitInfo { code, signal, memory_limit_hit }
    }
}

fn sigkill() -> i32 {
    rustix::process::Signal::KILL.as_raw()
}

/// `oom_kill` from a cgroup's `memory.events` (0 when unreadable).
fn oom_kills(counter_file: &Path) -> u64 {
    fs::read_to_string(counter_file)
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(0)
}

/// Sends `sig` to the process group `pgid` (the child's pid); a group already gone is fine.
pub(crate) fn kill_group(pgid: u32, sig: rustix::process::Signal) -> io::Result<()> {
    let Some(pid) = rustix::process::Pid::from_raw(pgid as i32) else {
        return Ok(());
    };
    match rustix::process::kill_process_group(pid, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Splits a byte stream into lines (without `\n`/`\r\n`), cutting lines longer than `max` bytes
/// so one endless line cannot grow memory. Shared by the direct readers, the shim and its client.
pub(crate) struct LineSplitter {
    line: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    pub(crate) fn new(max: usize) -> Self {
        Self { line: Vec::new(), max: max.max(1) }
    }

    pub(crate) fn feed(&mut self, mut buf: &[u8], mut emit: impl FnMut(&str)) {
        while let Some(i) = memchr::memchr(b'\n', buf) {
            if self.line.is_empty() {
                // The whole line is in this chunk (the common case): no copy.
                let line = &buf[..i];
                emit_bytes(&line[..line.len().min(self.max)], &mut emit);
            } else {
                self.take(&buf[..i]);
                self.emit(&mut emit);
            }
            buf = &buf[i + 1..];
        }
        self.take(buf);
    }

    /// Emits a last line that had no newline.
    pub(crate) fn finish(&mut self, mut emit: impl FnMut(&str)) {
        if !self.line.is_empty() {
            self.emit(&mut emit);
        }
    }

    fn take(&mut self, part: &[u8]) {
        let room = self.max.saturating_sub(self.line.len());
        self.line.extend_from_slice(&part[..part.len().min(room)]);
    }

    fn emit(&mut self, emit: &mut impl FnMut(&str)) {
        emit_bytes(&self.line, emit);
        self.line.clear();
    }
}

/// One line's bytes as text, without a trailing `\r`.
fn emit_bytes(line: &[u8], emit: &mut impl FnMut(&str)) {
    let bytes = line.strip_suffix(b"\r").unwrap_or(line);
    emit(&String::from_utf8_lossy(bytes));
}

/// How a run ended, with the last lines it wrote to stderr (where runtimes report running out of
/// memory, and where a game's chat never goes).
#[derive(Debug, Default)]
pub(crate) struct Ended {
    pub info: ExitInfo,
    pub stderr: Vec<String>,
}

/// Lines a crash record keeps from stderr.
pub(crate) const STDERR_TAIL_LINES: usize = 50;

/// The last [`STDERR_TAIL_LINES`] lines of one run's stderr.
#[derive(Debug, Default)]
pub(crate) struct StderrTail(Mutex<VecDeque<String>>);

impl StderrTail {
    pub(crate) fn push(&self, line: &str) {
        let mut lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == STDERR_TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_string());
    }

    pub(crate) fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }
}

/// Fires once, on the first line that contains the ready pattern (a literal substring).
pub(crate) struct ReadyMatcher {
    pattern: Option<String>,
    fired: AtomicBool,
    tx: Mutex<Option<oneshot::Sender<()>>>,
}

impl ReadyMatcher {
    pub(crate) fn new(pattern: Option<String>) -> (Arc<Self>, Option<oneshot::Receiver<()>>) {
        let (tx, rx) = oneshot::channel();
        let has = pattern.is_some();
        let m = Self { pattern, fired: AtomicBool::new(!has), tx: Mutex::new(Some(tx)) };
        (Arc::new(m), has.then_some(rx))
    }

    pub(crate) fn see(&self, line: &str) {
        if self.fired.load(Ordering::Relaxed) {
            return;
        }
        if self.pattern.as_deref().is_some_and(|p| line.contains(p)) {
            self.fired.store(true, Ordering::Relaxed);
            if let Some(tx) = self.tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
        }
    }
}

/// Reads `r` to its end, pushing the lines of each read to the hub as one batch. Whatever more
/// is already waiting in the pipe (written while the last batch was fanned out) joins the same
/// batch, up to the buffer's size: every batch wakes every subscriber, so fewer, fuller batches
/// are what keeps fan-out cheap, and no line waits for more input to arrive.
/// Lines of a stderr pipe also go to `stderr`.
pub(crate) async fn pump_lines(
    mut r: impl AsyncRead + Unpin,
    hub: Arc<OutputHub>,
    ready: Arc<ReadyMatcher>,
    max: usize,
    stderr: Option<Arc<StderrTail>>,
) {
    let mut split = LineSplitter::new(max);
    let mut buf = vec![0u8; READ_BUFFER];
    let mut lines = hub.line_buf();
    let collect = |lines: &mut LineBuf, l: &str| {
        ready.see(l);
        if let Some(tail) = &stderr {
            tail.push(l);
        }
        lines.push(l);
    };
    let mut open = true;
    while open {
        let mut filled = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while filled < buf.len() {
            match r.read(&mut buf[filled..]).now_or_never() {
                Some(Ok(n)) if n > 0 => filled += n,
                Some(_) => {
                    open = false;
                    break;
                }
                None => break,
            }
        }
        split.feed(&buf[..filled], |l| collect(&mut lines, l));
        let next = lines.fresh();
        hub.push_batch(std::mem::replace(&mut lines, next));
    }
    split.finish(|l| collect(&mut lines, l));
    hub.push_batch(lines);
}

/// How to reach a run's process group with signals.
#[derive(Clone)]
pub(crate) enum Control {
    Group(u32),
    Shim(shim::ShimClient),
}

impl Control {
    async fn signal(&self, sig: rustix::process::Signal) -> io::Result<()> {
        match self {
            Control::Group(pgid) => kill_group(*pgid, sig),
            Control::Shim(client) => client.signal(sig.as_raw()).await,
        }
    }
}

/// One live process, whichever way it was started.
pub(crate) struct Run {
    pub pid: u32,
    pub started: Instant,
    /// Resolves once the process ended and its output is drained.
    pub exit: oneshot::Receiver<Ended>,
    pub ready: Option<oneshot::Receiver<()>>,
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    pub control: Control,
    /// Tasks that feed this run (stopped when the supervisor goes away).
    pub tasks: Vec<AbortHandle>,
}

/// Spawns `plan` as a direct child.
fn spawn_direct(
    plan: LaunchPlan,
    hub: Arc<OutputHub>,
    ready_pattern: Option<String>,
    max_line: usize,
) -> Result<Run, SupervisorError> {
    let spawn_err = |source| SupervisorError::Spawn { command: plan.command.display().to_string(), source };
    let mut cmd = tokio::process::Command::from(plan.std_command().map_err(spawn_err)?);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pid = child.id().ok_or_else(|| SupervisorError::Other("child exited before its pid was read".into()))?;
    let (matcher, ready) = ReadyMatcher::new(ready_pattern);
    let stderr = Arc::new(StderrTail::default());
    let out =
        tokio::spawn(pump_lines(child.stdout.take().expect("piped"), hub.clone(), matcher.clone(), max_line, None));
    let err = tokio::spawn(pump_lines(
        child.stderr.take().expect("piped"),
        hub.clone(),
        matcher,
        max_line,
        Some(stderr.clone()),
    ));
    let stdin = child.stdin.take().expect("piped");
    let (exit_tx, exit) = oneshot::channel();
    let tasks = vec![out.abort_handle(), err.abort_handle()];
    tokio::spawn(async move {
        let status = child.wait().await.ok();
        // Whatever the process left behind in its group goes with it (and closes the pipes).
        let _ = kill_group(pid, rustix::process::Signal::KILL);
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
            let _ = out.await;
            let _ = err.await;
        })
        .await;
        let info = plan.exit_info(status);
        plan.release_memory_limit();
        let _ = exit_tx.send(Ended { info, stderr: stderr.lines() });
    });
    Ok(Run { pid, started: Instant::now(), exit, ready, stdin: Box::new(stdin), control: Control::Group(pid), tasks })
}

/// `(uid, gid)` of a user name or numeric uid, from `/etc/passwd`.
fn lookup_user(user: &str) -> Result<(u32, u32), SupervisorError> {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 4 && (f[0] == user || f[2] == user) {
            if let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse()) {
                return Ok((uid, gid));
            }
        }
    }
    match user.parse::<u32>() {
        Ok(uid) => Ok((uid, uid)),
        Err(_) => Err(SupervisorError::Other(format!("unknown user {user}"))),
    }
}

/// The gid of a group name or numeric gid, from `/etc/group`.
fn lookup_group(group: &str) -> Result<u32, SupervisorError> {
    let groups = fs::read_to_string("/etc/group").unwrap_or_default();
    for line in groups.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && (f[0] == group || f[2] == group) {
            if let Ok(gid) = f[2].parse() {
                return Ok(gid);
            }
        }
    }
    group.parse().map_err(|_| SupervisorError::Other(format!("unknown group {group}")))
}

/// Which cgroup hierarchy holds the memory controller; they name their files differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CgroupVersion {
    V1,
    V2,
}

impl CgroupVersion {
    fn limit_file(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "memory.limit_in_bytes",
            CgroupVersion::V2 => "memory.max",
        }
    }
    fn counter_file(self) -> &'static str {
        match self {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        }
    }
}

/// A cgroup directory with the memory controller that we may create children in: the configured
/// one (v2), our own cgroup on a unified (v2) mount, or our own cgroup in a v1 memory hierarchy.
fn writable_cgroup(configured: Option<&Path>) -> Option<(PathBuf, CgroupVersion)> {
    let root = Path::new("/sys/fs/cgroup");
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let (parent, version) = match configured {
        Some(p) => (p.to_path_buf(), CgroupVersion::V2),
        None if root.join("cgroup.controllers").exists() => {
            let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim_start_matches('/').to_string();
            (root.join(rel), CgroupVersion::V2)
        }
        None => {
            // v1: the line `<n>:memory:/path` names our place in the memory hierarchy.
            let rel = own.lines().find_map(|l| l.split_once(":memory:").map(|(_, p)| p))?;
            (root.join("memory").join(rel.trim_start_matches('/')), CgroupVersion::V1)
        }
    };
    if version == CgroupVersion::V2 {
        let control = fs::read_to_string(parent.join("cgroup.subtree_control")).ok()?;
        if !control.split_whitespace().any(|c| c == "memory") {
            fs::write(parent.join("cgroup.subtree_control"), "+memory").ok()?;
        }
    } else if !parent.join("memory.limit_in_bytes").exists() {
        return None;
    }
    Some((parent, version))
}

fn prepare_memory_limit(name: &str, bytes: Option<u64>, cgroup_parent: Option<&Path>) -> MemoryLimit {
    let Some(bytes) = bytes else {
        return MemoryLimit::None;
    };
    if let Some((parent, version)) = writable_cgroup(cgroup_parent) {
        let dir = parent.join(format!("zlh-{name}"));
        let _ = fs::remove_dir(&dir); // a leftover from a previous run, if empty
        let made = fs::create_dir_all(&dir).and_then(|_| fs::write(dir.join(version.limit_file()), bytes.to_string()));
        match made {
            Ok(()) => {
                info!(name, bytes, cgroup = %dir.display(), ?version, "memory limit via cgroup");
                let counter_file = dir.join(version.counter_file());
                return MemoryLimit::Cgroup { oom_kills_before: oom_kills(&counter_file), counter_file, dir, bytes };
            }
            Err(e) => warn!(name, error = %e, "cgroup memory limit not possible; using RLIMIT_AS"),
        }
    } else {
        info!(name, bytes, "no writable cgroup with a memory controller; memory limit via RLIMIT_AS");
    }
    MemoryLimit::Rlimit { bytes }
}

enum Cmd {
    Start(oneshot::Sender<Result<(), SupervisorError>>),
    Stop(oneshot::Sender<Result<(), SupervisorError>>),
    Restart(oneshot::Sender<Result<(), SupervisorError>>),
    Attach(oneshot::Sender<Result<bool, SupervisorError>>),
}

/// What the actor shares with the handle.
struct Shared {
    hub: Arc<OutputHub>,
    status: Mutex<ProcessStatus>,
    history: Mutex<VecDeque<CrashRecord>>,
    stdin: tokio::sync::Mutex<Option<Box<dyn AsyncWrite + Send + Unpin>>>,
    events: broadcast::Sender<StateEvent>,
    memory: Mutex<MemoryLimit>,
    /// The live run's signal route, so `kill` works while the actor is busy (a slow stop).
    control: Mutex<Option<Control>>,
    /// Set by `kill`: the coming exit was asked for and is no crash.
    kill_requested: AtomicBool,
}

/// Supervises one real OS process. Dropping it kills a direct child; a shimmed process stays up
/// for the next supervisor on the same state dir.
pub struct ProcessSupervisor {
    shared: Arc<Shared>,
    cmds: mpsc::Sender<Cmd>,
}

impl ProcessSupervisor {
    /// Creates the supervisor in `stopped` (nothing is started or adopted yet). Needs a tokio runtime.
    pub fn new(spec: ProcessSpec, options: ProcessOptions) -> Result<Self, SupervisorError> {
        let max_line = options.output.max_line_bytes;
        let hub = OutputHub::new(options.output).map_err(|e| SupervisorError::Other(format!("output: {e}")))?;
        let history_file = HistoryFile(options.history_file);
        let saved = history_file.load();
        let history_cap = options.crash_history.max(1);
        let crashes: VecDeque<CrashRecord> =
            saved.crashes.iter().skip(saved.crashes.len().saturating_sub(history_cap)).cloned().collect();
        let cap = spec.backoff.iter().max().copied().unwrap_or(Duration::ZERO);
        let backoff = if saved.error.is_some() { None } else { saved.backoff_left(Utc::now(), cap) };
        let shared = Arc::new(Shared {
            hub: Arc::new(hub),
            status: Mutex::new(ProcessStatus {
                state: ProcessState::Stopped,
                pid: None,
                crash_count: saved.streak,
                last_crash: crashes.back().cloned(),
                error: None,
            }),
            history: Mutex::new(crashes),
            stdin: tokio::sync::Mutex::new(None),
            events: broadcast::channel(256).0,
            memory: Mutex::new(MemoryLimit::None),
            control: Mutex::new(None),
            kill_requested: AtomicBool::new(false),
        });
        let mut tracker = CrashTracker::new(spec.restart, spec.backoff.clone(), spec.stable_after, spec.failure_limit);
        tracker.restore(saved.streak);
        let (cmds, rx) = mpsc::channel(16);
        let actor = Actor {
            spec,
            name: options.name,
            classifier: options.classifier,
            tail_lines: options.crash_tail_lines,
            history_cap,
            history_file,
            run_first_seq: 0,
            backoff_until: saved.backoff_until.filter(|_| backoff.is_some()),
            error: saved.error,
            shim: options.shim,
            cgroup_parent: options.cgroup_parent,
            max_line,
            tracker,
            shared: shared.clone(),
            state: ProcessState::Stopped,
            stop_requested: false,
            killed: false,
        };
        tokio::spawn(actor.main(rx, backoff));
        Ok(Self { shared, cmds })
    }

    /// Every state transition from now on.
    pub fn subscribe_states(&self) -> broadcast::Receiver<StateEvent> {
        self.shared.events.subscribe()
    }

    /// The memory limit mechanism of the current (or last) run.
    pub fn memory_limit(&self) -> MemoryLimit {
        self.shared.memory.lock().unwrap().clone()
    }

    /// SIGKILL to the whole process group at once, without waiting for the actor: the way out when
    /// a graceful stop or a start is stuck. The exit that follows counts as a requested stop.
    pub async fn kill(&self) -> Result<(), SupervisorError> {
        let control = self.shared.control.lock().unwrap().clone();
        let Some(control) = control else { return Ok(()) };
        self.shared.kill_requested.store(true, Ordering::SeqCst);
        warn!("kill requested: SIGKILL to the process group");
        control.signal(rustix::process::Signal::KILL).await.map_err(|e| SupervisorError::Other(format!("kill: {e}")))
    }

    /// Adopts a process still running under a shim in the configured state dir; `Ok(false)` when
    /// there is none (or no shim is configured). `start` does this first as well.
    pub async fn attach(&self) -> Result<bool, SupervisorError> {
        self.ask(Cmd::Attach).await?
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Cmd) -> Result<T, SupervisorError> {
        let (tx, rx) = oneshot::channel();
        let gone = || SupervisorError::Other("supervisor task ended".into());
        self.cmds.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
}

#[async_trait]
impl Supervisor for ProcessSupervisor {
    async fn start(&self) -> Result<(), SupervisorError> {
        self.ask(Cmd::Start).await?
    }
    async fn stop(&self) -> Result<(), SupervisorError> {
        self.ask(Cmd::Stop).await?
    }
    async fn restart(&self) -> Result<(), SupervisorError> {
        self.ask(Cmd::Restart).await?
    }
    async fn status(&self) -> ProcessStatus {
        self.shared.status.lock().unwrap().clone()
    }
    async fn send_line(&self, line: &str) -> Result<(), SupervisorError> {
        let mut stdin = self.shared.stdin.lock().await;
        let state = self.shared.status.lock().unwrap().state;
        let w = stdin.as_mut().ok_or(SupervisorError::WrongState(state))?;
        let io = |e: io::Error| SupervisorError::Other(format!("stdin: {e}"));
        w.write_all(format!("{line}\n").as_bytes()).await.map_err(io)?;
        w.flush().await.map_err(io)
    }
    fn subscribe_output(&self) -> (Vec<OutputLine>, OutputReceiver) {
        self.shared.hub.subscribe()
    }
    async fn crash_history(&self) -> Vec<CrashRecord> {
        self.shared.history.lock().unwrap().iter().cloned().collect()
    }
}

/// What woke the actor.
enum Wake {
    Cmd(Option<Cmd>),
    Ready(bool),
    Exit(Ended),
    BackoffOver,
}

struct Actor {
    spec: ProcessSpec,
    name: String,
    classifier: Classifier,
    tail_lines: usize,
    history_cap: usize,
    history_file: HistoryFile,
    /// Sequence number of the current run's first output line: crash tails hold only its lines.
    run_first_seq: u64,
    /// The wall-clock deadline of the pending backoff (kept in the history file).
    backoff_until: Option<chrono::DateTime<Utc>>,
    /// Why the process is in `error`.
    error: Option<String>,
    shim: Option<ShimConfig>,
    cgroup_parent: Option<PathBuf>,
    max_line: usize,
    tracker: CrashTracker,
    shared: Arc<Shared>,
    state: ProcessState,
    /// Set by `stop`; an exit then is not a crash.
    stop_requested: bool,
    /// The last stop ended by a `kill`.
    killed: bool,
}

/// The parts of the actor that the wait borrows while the rest is free.
#[derive(Default)]
struct Live {
    run: Option<Run>,
    backoff: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Live {
    async fn next(&mut self, rx: &mut mpsc::Receiver<Cmd>) -> Wake {
        let (ready, exit) = match &mut self.run {
            Some(run) => (run.ready.as_mut(), Some(&mut run.exit)),
            None => (None, None),
        };
        let (has_ready, has_exit, has_backoff) = (ready.is_some(), exit.is_some(), self.backoff.is_some());
        let backoff = self.backoff.as_mut();
        tokio::select! {
            cmd = rx.recv() => Wake::Cmd(cmd),
            r = async { ready.expect("guarded").await }, if has_ready => Wake::Ready(r.is_ok()),
            e = async { exit.expect("guarded").await }, if has_exit => {
                Wake::Exit(e.unwrap_or_default())
            }
            _ = async { backoff.expect("guarded").await }, if has_backoff => Wake::BackoffOver,
        }
    }
}

impl Actor {
    /// Runs until the handle is gone; `backoff` resumes a backoff the previous supervisor left
    /// pending, and a saved `error` is resumed as well.
    async fn main(mut self, mut rx: mpsc::Receiver<Cmd>, backoff: Option<Duration>) {
        let mut live = Live::default();
        if self.error.is_some() {
            self.set_state(ProcessState::Error, None, None);
        } else if let Some(delay) = backoff {
            info!(name = %self.name, ?delay, "resuming the pending backoff");
            live.backoff = Some(Box::pin(tokio::time::sleep(delay)));
            self.set_state(ProcessState::Backoff, None, Some(delay));
        }
        loop {
            match live.next(&mut rx).await {
                Wake::Cmd(None) => break,
                Wake::Cmd(Some(cmd)) => self.command(cmd, &mut live).await,
                Wake::Ready(ok) => {
                    if let Some(run) = live.run.as_mut() {
                        run.ready = None;
                        if ok && self.state == ProcessState::Starting {
                            self.set_state(ProcessState::Running, Some(run.pid), None);
                        }
                    }
                }
                Wake::Exit(ended) => self.exited(ended, &mut live).await,
                Wake::BackoffOver => {
                    live.backoff = None;
                    self.backoff_until = None;
                    self.save();
                    let _ = self.launch(&mut live).await;
                }
            }
        }
        // The handle is gone: a direct child goes with us, a shimmed one waits for the next agent.
        if let Some(run) = live.run.take() {
            for t in &run.tasks {
                t.abort();
            }
            if let Control::Group(pgid) = run.control {
                info!(name = %self.name, pgid, "supervisor dropped; killing the process group");
                let _ = kill_group(pgid, rustix::process::Signal::KILL);
            }
        }
    }

    async fn command(&mut self, cmd: Cmd, live: &mut Live) {
        match cmd {
            Cmd::Start(reply) => {
                let _ = reply.send(self.start(live).await);
            }
            Cmd::Stop(reply) => {
                let _ = reply.send(self.stop(live).await);
            }
            Cmd::Restart(reply) => {
                let result = match self.stop(live).await {
                    // A kill during the stop half cancels the restart: the process stays down.
                    Ok(()) if self.killed => Err(SupervisorError::Other("killed during the restart".into())),
                    Ok(()) => self.start(live).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(result);
            }
            Cmd::Attach(reply) => {
                let result = if live.run.is_some() { Ok(true) } else { self.adopt(live).await };
                let _ = reply.send(result);
            }
        }
    }

    async fn start(&mut self, live: &mut Live) -> Result<(), SupervisorError> {
        self.shared.kill_requested.store(false, Ordering::SeqCst);
        match self.state {
            ProcessState::Starting | ProcessState::Running | ProcessState::Stopping => {
                return Err(SupervisorError::WrongState(self.state))
            }
            // A start asked for after a stop or after giving up begins a fresh streak; one during
            // a backoff only skips the wait.
            ProcessState::Error | ProcessState::Stopped => {
                self.tracker.reset();
                self.shared.status.lock().unwrap().crash_count = 0;
                self.error = None;
            }
            ProcessState::Backoff => live.backoff = None,
        }
        self.backoff_until = None;
        self.save();
        self.stop_requested = false;
        self.launch(live).await
    }

    async fn stop(&mut self, live: &mut Live) -> Result<(), SupervisorError> {
        self.stop_requested = true;
        self.killed = false;
        live.backoff = None;
        if self.backoff_until.take().is_some() {
            self.save();
        }
        let Some(mut run) = live.run.take() else {
            if self.state != ProcessState::Stopped {
                self.set_state(ProcessState::Stopped, None, None);
            }
            return Ok(());
        };
        self.set_state(ProcessState::Stopping, Some(run.pid), None);
        let stop = self.spec.stop.clone();
        let mut ended = false;
        if let Some(line) = &stop.stdin_command {
            info!(name = %self.name, command = %line, "stopping: stdin command");
            let _ = self.write_stdin(line).await;
            ended = tokio::time::timeout(stop.command_timeout, &mut run.exit).await.is_ok();
        }
        if !ended {
            info!(name = %self.name, pid = run.pid, "stopping: SIGTERM to the process group");
            let _ = run.control.signal(rustix::process::Signal::TERM).await;
            ended = tokio::time::timeout(stop.term_timeout, &mut run.exit).await.is_ok();
        }
        if !ended {
            warn!(name = %self.name, pid = run.pid, "still running after SIGTERM; SIGKILL to the process group");
            let _ = run.control.signal(rustix::process::Signal::KILL).await;
            let _ = (&mut run.exit).await;
        }
        *self.shared.stdin.lock().await = None;
        *self.shared.control.lock().unwrap() = None;
        self.killed = self.shared.kill_requested.swap(false, Ordering::SeqCst);
        self.set_state(ProcessState::Stopped, None, None);
        Ok(())
    }

    async fn write_stdin(&self, line: &str) -> io::Result<()> {
        let mut stdin = self.shared.stdin.lock().await;
        if let Some(w) = stdin.as_mut() {
            w.write_all(format!("{line}\n").as_bytes()).await?;
            w.flush().await?;
        }
        Ok(())
    }

    /// Adopts a live shimmed process; `Ok(false)` when there is none.
    async fn adopt(&mut self, live: &mut Live) -> Result<bool, SupervisorError> {
        let Some(cfg) = &self.shim else { return Ok(false) };
        self.run_first_seq = self.shared.hub.next_seq();
        let (matcher, _) = ReadyMatcher::new(None);
        let found = shim::adopt(cfg, self.shared.hub.clone(), matcher, self.max_line).await;
        match found {
            shim::Adopted::Running(run) => {
                info!(name = %self.name, pid = run.pid, "adopted the running process from its shim");
                self.install(run, live).await;
                Ok(true)
            }
            shim::Adopted::EndedUnwatched(Ended { info, stderr }, started) => {
                // It ended while no agent was watching: a crash on record, no restart decisions.
                self.record_crash(&info, &stderr, started.map(|s| s.elapsed()).unwrap_or_default());
                self.save();
                Ok(false)
            }
            shim::Adopted::Nothing => Ok(false),
        }
    }

    /// Starts a run (or adopts one under the shim): `starting` once the process exists, then
    /// `running` at once or on the ready line. A failed spawn ends in `error`.
    async fn launch(&mut self, live: &mut Live) -> Result<(), SupervisorError> {
        if self.adopt(live).await? {
            return Ok(());
        }
        self.run_first_seq = self.shared.hub.next_seq();
        let result = self.spawn().await;
        match result {
            Ok(run) => {
                self.install(run, live).await;
                Ok(())
            }
            Err(e) => {
                warn!(name = %self.name, error = %e, "start failed");
                // Not saved: the next agent tries again (the install may have been repaired).
                self.error = Some(format!("start failed: {e}"));
                self.set_state(ProcessState::Error, None, None);
                Err(e)
            }
        }
    }

    async fn spawn(&mut self) -> Result<Run, SupervisorError> {
        let (uid, mut gid) = match &self.spec.user {
            None => (None, None),
            Some(user) => {
                let (uid, gid) = lookup_user(user)?;
                let euid = rustix::process::geteuid().as_raw();
                if uid == euid {
                    (None, None)
                } else if euid == 0 {
                    (Some(uid), Some(gid))
                } else {
                    return Err(SupervisorError::Other(format!("running as uid {euid}: cannot switch to user {user}")));
                }
            }
        };
        if let Some(group) = &self.spec.group {
            let wanted = lookup_group(group)?;
            if wanted != rustix::process::getegid().as_raw() || gid.is_some() {
                if !rustix::process::geteuid().is_root() {
                    return Err(SupervisorError::Other(format!("not root: cannot switch to group {group}")));
                }
                gid = Some(wanted);
            }
        }
        let memory = prepare_memory_limit(&self.name, self.spec.memory_limit_bytes, self.cgroup_parent.as_deref());
        *self.shared.memory.lock().unwrap() = memory.clone();
        let plan = LaunchPlan {
            command: self.spec.command.clone(),
            args: self.spec.args.clone(),
            env: self.spec.env.clone(),
            cwd: self.spec.cwd.clone(),
            uid,
            gid,
            memory,
        };
        let hub = self.shared.hub.clone();
        match &self.shim {
            Some(cfg) => {
                let (matcher, ready) = ReadyMatcher::new(self.spec.ready_pattern.clone());
                let mut run =
                    shim::launch(cfg, &plan, self.spec.stop.term_timeout, hub, matcher, self.max_line).await?;
                run.ready = ready;
                Ok(run)
            }
            None => spawn_direct(plan, hub, self.spec.ready_pattern.clone(), self.max_line),
        }
    }

    async fn install(&mut self, mut run: Run, live: &mut Live) {
        let stdin = std::mem::replace(&mut run.stdin, Box::new(tokio::io::sink()));
        *self.shared.stdin.lock().await = Some(stdin);
        let pid = run.pid;
        *self.shared.control.lock().unwrap() = Some(run.control.clone());
        let ready_now = run.ready.is_none();
        info!(name = %self.name, pid, "process started");
        // An adopted process ends a resumed backoff: it is already running.
        live.backoff = None;
        if self.backoff_until.take().is_some() {
            self.save();
        }
        live.run = Some(run);
        self.set_state(ProcessState::Starting, Some(pid), None);
        if ready_now {
            self.set_state(ProcessState::Running, Some(pid), None);
        }
    }

    /// The process ended. Asked for (a stop in progress handles its own exit) or not: a crash.
    async fn exited(&mut self, Ended { info, stderr }: Ended, live: &mut Live) {
        let Some(run) = live.run.take() else { return };
        *self.shared.stdin.lock().await = None;
        let uptime = run.started.elapsed();
        *self.shared.control.lock().unwrap() = None;
        if self.stop_requested || self.shared.kill_requested.swap(false, Ordering::SeqCst) {
            self.stop_requested = true;
            self.set_state(ProcessState::Stopped, None, None);
            return;
        }
        let record = self.record_crash(&info, &stderr, uptime);
        let decision = self.tracker.on_exit(uptime, info.code == Some(0));
        let streak = self.tracker.consecutive();
        self.shared.status.lock().unwrap().crash_count = streak;
        match decision {
            Decision::RestartAfter(delay) => {
                info!(name = %self.name, ?delay, "restarting after backoff");
                live.backoff = Some(Box::pin(tokio::time::sleep(delay)));
                self.backoff_until = chrono::Duration::from_std(delay).ok().map(|d| Utc::now() + d);
                self.save();
                self.set_state(ProcessState::Backoff, None, Some(delay));
            }
            Decision::Stay => {
                self.save();
                self.set_state(ProcessState::Stopped, None, None)
            }
            Decision::GiveUp => {
                warn!(name = %self.name, crashes = streak, "giving up after repeated crashes");
                self.error = Some(give_up_reason(streak, &record));
                self.save();
                self.set_state(ProcessState::Error, None, None);
            }
        }
    }

    /// Writes what the next supervisor needs to carry on to the history file.
    fn save(&self) {
        let saved = SavedHistory {
            crashes: self.shared.history.lock().unwrap().iter().cloned().collect(),
            streak: self.tracker.consecutive(),
            backoff_until: self.backoff_until,
            error: self.error.clone(),
        };
        self.history_file.save(&saved);
    }

    fn record_crash(&mut self, info: &ExitInfo, stderr: &[String], uptime: Duration) -> CrashRecord {
        let tail: Vec<String> =
            self.shared.hub.tail_since(self.run_first_seq, self.tail_lines).iter().map(|l| strip_ansi(l)).collect();
        let classification = self.classifier.classify(info, RunOutput { tail: &tail, stderr });
        warn!(name = %self.name, code = ?info.code, signal = ?info.signal, ?uptime, ?classification,
            memory_limit_hit = info.memory_limit_hit, "process exited unasked");
        let record = CrashRecord {
            time: Utc::now(),
            exit_code: info.code,
            signal: info.signal,
            uptime,
            log_tail: tail,
            classification,
        };
        let mut history = self.shared.history.lock().unwrap();
        if history.len() == self.history_cap {
            history.pop_front();
        }
        history.push_back(record.clone());
        self.shared.status.lock().unwrap().last_crash = Some(record.clone());
        record
    }

    fn set_state(&mut self, state: ProcessState, pid: Option<u32>, delay: Option<Duration>) {
        self.state = state;
        {
            let mut status = self.shared.status.lock().unwrap();
            status.state = state;
            status.pid = pid;
            status.error = if state == ProcessState::Error { self.error.clone() } else { None };
        }
        let _ = self.shared.events.send(StateEvent { state, pid, delay, at: Instant::now() });
    }
}

/// What `/status` says about a supervisor that gave up: "crashed 5 times in a row; last:
/// missing_dependency (exit 1)".
pub fn give_up_reason(streak: u32, last: &CrashRecord) -> String {
    let how = match (last.exit_code, last.signal) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("signal {signal}"),
        (None, None) => "exit unknown".to_string(),
    };
    let times = if streak == 1 { "once".to_string() } else { format!("{streak} times in a row") };
    format!("crashed {times}; last: {} ({how})", last.classification.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(input: &[&[u8]], max: usize) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for part in input {
            s.feed(part, |l| out.push(l.to_string()));
        }
        s.finish(|l| out.push(l.to_string()));
        out
    }

    /// Gives out one chunk per read, as a pipe does per write; when they are used up it ends,
    /// or with `then_wait` stays open with nothing more to read.
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        then_wait: bool,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            let Some(mut chunk) = self.chunks.pop_front() else {
                return if self.then_wait { std::task::Poll::Pending } else { std::task::Poll::Ready(Ok(())) };
            };
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            if n < chunk.len() {
                self.chunks.push_front(chunk.split_off(n));
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn pump_hub() -> Arc<OutputHub> {
        Arc::new(OutputHub::new(OutputOptions { channel_capacity: 1024, ..OutputOptions::default() }).unwrap())
    }

    /// The batches a receiver holds now, each as its lines' sequence numbers.
    fn batches(rx: &mut OutputReceiver) -> Vec<Vec<u64>> {
        let mut out = Vec::new();
        while let Some(event) = rx.try_recv() {
            match event {
                super::super::output::OutputEvent::Lines(b) => out.push(b.iter().map(|l| l.seq).collect()),
                other => panic!("{other:?}"),
            }
        }
        out
    }

    #[tokio::test]
    async fn output_already_waiting_goes_out_as_one_batch() {
        let hub = pump_hub();
        let (_, mut rx) = hub.subscribe();
        let chunks = (0..100).map(|i| format!("line {i}\n").into_bytes()).collect();
        pump_lines(Chunks { chunks, then_wait: false }, hub.clone(), ReadyMatcher::new(None).0, 8192, None).await;
        assert_eq!(batches(&mut rx), [(0..100).collect::<Vec<_>>()], "one wake-up for the whole burst");
        assert_eq!(hub.tail(1), ["line 99"]);
    }

    #[tokio::test]
    async fn a_batch_holds_at_most_one_read_buffer() {
        let hub = pump_hub();
        let (_, mut rx) = hub.subscribe();
        // 150 lines of 1 KiB with the newline: 64 + 64 + 22 lines.
        let chunks = (0..150).map(|i| format!("{i:<1023}\n").into_bytes()).collect();
        pump_lines(Chunks { chunks, then_wait: false }, hub.clone(), ReadyMatcher::new(None).0, 8192, None).await;
        let got = batches(&mut rx);
        assert_eq!(got.iter().map(Vec::len).collect::<Vec<_>>(), [64, 64, 22]);
        assert!(got.concat().into_iter().eq(0..150), "every line, in order");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_does_not_wait_for_more_output() {
        let hub = pump_hub();
        let (_, mut rx) = hub.subscribe();
        let chunks = VecDeque::from([b"first\n".to_vec(), b"second\n".to_vec()]);
        let pump =
            tokio::spawn(pump_lines(Chunks { chunks, then_wait: true }, hub, ReadyMatcher::new(None).0, 8192, None));
        let lines = tokio::time::timeout(Duration::from_secs(5), async {
            [rx.next_line().await.unwrap().line, rx.next_line().await.unwrap().line]
        });
        assert_eq!(lines.await.expect("lines out while the pipe stays open"), ["first", "second"]);
        pump.abort();
    }

    #[test]
    fn lines_across_chunks_crlf_and_cut() {
        assert_eq!(split(&[b"ab", b"c\nde\r\n", b"f"], 100), vec!["abc", "de", "f"]);
        assert_eq!(split(&[b"0123456789\nxy\n"], 4), vec!["0123", "xy"]);
        assert_eq!(split(&[b"\xff\n"], 4), vec!["\u{fffd}"]);
    }

    #[test]
    fn ready_fires_once_on_substring() {
        let (m, rx) = ReadyMatcher::new(Some("Done (".into()));
        let mut rx = rx.unwrap();
        m.see("Loading");
        assert!(rx.try_recv().is_err());
        m.see("[12:00] Done (3.2s)! For help, type \"help\"");
        assert!(rx.try_recv().is_ok());
        m.see("Done (again)");
    }

    #[test]
    fn users_resolve_from_passwd() {
        assert_eq!(lookup_user("root").unwrap(), (0, 0));
        assert_eq!(lookup_user("0").unwrap(), (0, 0));
        assert!(lookup_user("no-such-user-zlh").is_err());
        assert_eq!(lookup_group("root").unwrap(), 0);
        assert_eq!(lookup_group("0").unwrap(), 0);
        assert!(lookup_group("no-such-group-zlh").is_err());
    }
}
