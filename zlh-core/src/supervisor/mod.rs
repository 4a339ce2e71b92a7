//! Supervising one long-lived process (a game server, code-server): declared here, implemented by
//! the supervisor work (`process.rs`, `policy.rs`, `classify.rs`, `shim.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

pub mod classify;
pub mod detect;
pub mod history;
pub mod output;
pub mod policy;
pub mod process;
pub mod shim;
pub mod sim;

/// Lifecycle states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessState {
    Stopped,
    Starting,
    Running,
    Stopping,
    Backoff,
    Error,
}

/// Why a process ended unasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrashClass {
    Oom,
    ModOrPluginError,
    MissingDependency,
    NonzeroExit,
    UnexpectedExit,
}

impl CrashClass {
    /// The class as shown in `/status` (`missing_dependency`).
    pub fn as_str(self) -> &'static str {
        match self {
            CrashClass::Oom => "oom",
            CrashClass::ModOrPluginError => "mod_or_plugin_error",
            CrashClass::MissingDependency => "missing_dependency",
            CrashClass::NonzeroExit => "nonzero_exit",
            CrashClass::UnexpectedExit => "unexpected_exit",
        }
    }
}

/// How to stop the process gracefully before signals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopStrategy {
    /// A line written to stdin first (`stop` for Minecraft); `None` goes straight to SIGTERM.
    pub stdin_command: Option<String>,
    pub command_timeout: Duration,
    pub term_timeout: Duration,
}

/// When to restart after an exit nobody asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    Never,
    OnFailure,
    Always,
}

/// What to run and how to look after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub command: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub user: Option<String>,
    /// Group name or gid; defaults to the user's primary group.
    #[serde(default)]
    pub group: Option<String>,
    pub stop: StopStrategy,
    pub restart: RestartPolicy,
    /// Delays before successive restarts; the last repeats (30 s, 60 s, 120 s).
    pub backoff: Vec<Duration>,
    /// A run at least this long resets the backoff schedule.
    pub stable_after: Duration,
    /// Crashes in a row at the last backoff step before giving up in `error`.
    pub failure_limit: u32,
    /// Output pattern that marks the process ready (`Done (`).
    pub ready_pattern: Option<String>,
    pub memory_limit_bytes: Option<u64>,
}

impl ProcessSpec {
    /// A spec with the platform's defaults: empty env, cwd `/`, restart on failure with backoff
    /// 30 s → 60 s → 120 s, stable after 30 s, `error` after 3 crashes at the cap, SIGTERM then
    /// SIGKILL after 10 s each, no ready pattern, no memory limit.
    pub fn new(command: impl Into<PathBuf>, args: Vec<String>) -> Self {
        Self {
            command: command.into(),
            args,
            env: BTreeMap::new(),
            cwd: PathBuf::from("/"),
            user: None,
            group: None,
            stop: StopStrategy {
                stdin_command: None,
                command_timeout: Duration::from_secs(10),
                term_timeout: Duration::from_secs(10),
            },
            restart: RestartPolicy::OnFailure,
            backoff: policy::default_schedule(),
            stable_after: Duration::from_secs(30),
            failure_limit: 3,
            ready_pattern: None,
            memory_limit_bytes: None,
        }
    }

    /// `/bin/sh -c <script>`: the shape of most test and simple service commands.
    pub fn shell(script: &str) -> Self {
        Self::new("/bin/sh", vec!["-c".into(), script.into()])
    }
}

/// One crash, as shown in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CrashRecord {
    pub time: DateTime<Utc>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub uptime: Duration,
    pub log_tail: Vec<String>,
    pub classification: CrashClass,
}

/// A snapshot of the supervised process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessStatus {
    pub state: ProcessState,
    pub pid: Option<u32>,
    /// Crashes in the current streak.
    pub crash_count: u32,
    pub last_crash: Option<CrashRecord>,
    /// Why the process is in `error` (`None` in every other state).
    #[serde(default)]
    pub error: Option<String>,
}

/// One line of output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputLine {
    pub seq: u64,
    pub line: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("process is {0:?}; that action is not possible now")]
    WrongState(ProcessState),
    #[error("failed to spawn {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("supervisor state {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Supervisor: Send + Sync {
    async fn start(&self) -> Result<(), SupervisorError>;
    async fn stop(&self) -> Result<(), SupervisorError>;
    async fn restart(&self) -> Result<(), SupervisorError>;
    async fn status(&self) -> ProcessStatus;
    async fn send_line(&self, line: &str) -> Result<(), SupervisorError>;
    /// Recent lines, then live output.
    fn subscribe_output(&self) -> (Vec<OutputLine>, output::OutputReceiver);
    async fn crash_history(&self) -> Vec<CrashRecord>;
}
