//! `GET /status`: what the portal shows. Field names follow the existing portal's contract
//! (camelCase); the state is the provisioning phase until provisioning completes, then the game
//! server's supervisor state (game) or `running` (dev).

use serde::Serialize;
use zlh_core::supervisor::{CrashClass, CrashRecord, ProcessState};

/// Where provisioning stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Idle,
    Installing,
    Verifying,
    Starting,
    Done,
    Failed,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    /// `idle` | `installing` | `verifying` | `starting` | `running` | `stopping` | `stopped` |
    /// `crashed` | `error`
    pub state: &'static str,
    pub vmid: Option<u32>,
    pub container_type: Option<&'static str>,
    pub provisioning_complete: bool,
    pub install_step: Option<String>,
    /// Percent of the current install's bytes, 0–100.
    pub progress: Option<u8>,
    pub error: Option<String>,
    pub crash_count: u32,
    pub last_crash: Option<CrashReport>,
    pub runtime: Option<RuntimeReport>,
    pub code_server: Option<CodeServerReport>,
    pub game: Option<GameReport>,
    /// A dev container's workspace as its code-server and shell see it (the path differs between
    /// platforms: `/home/dev/workspace` in a real container, under the data dir for local ones).
    pub workspace: Option<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeReport {
    pub id: String,
    pub version: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CodeServerReport {
    pub state: ProcessState,
    pub pid: Option<u32>,
    pub port: u16,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GameReport {
    pub id: String,
    pub version: String,
    pub process: ProcessState,
    pub pid: Option<u32>,
    /// The power action running now (`start`, `stop`, `restart`), if any.
    pub power_action: Option<&'static str>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CrashReport {
    pub time: chrono::DateTime<chrono::Utc>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub uptime_secs: u64,
    pub log_tail: Vec<String>,
    pub classification: CrashClass,
}

impl From<&CrashRecord> for CrashReport {
    fn from(c: &CrashRecord) -> Self {
        Self {
            time: c.time,
            exit_code: c.exit_code,
            signal: c.signal,
            uptime_secs: c.uptime.as_secs(),
            log_tail: c.log_tail.clone(),
            classification: c.classification,
        }
    }
}

/// The portal's word for a game server's supervisor state.
pub fn game_state(state: ProcessState) -> &'static str {
    match state {
        ProcessState::Stopped => "stopped",
        ProcessState::Starting => "starting",
        ProcessState::Running => "running",
        ProcessState::Stopping => "stopping",
        ProcessState::Backoff => "crashed",
        ProcessState::Error => "error",
    }
}

pub fn phase_state(phase: Phase) -> &'static str {
    match phase {
        Phase::Idle => "idle",
        Phase::Installing => "installing",
        Phase::Verifying => "verifying",
        Phase::Starting => "starting",
        Phase::Done => "running",
        Phase::Failed => "error",
    }
}
