//! What a supervisor remembers across agent restarts: the crash records, the crash streak, a
//! pending backoff and why it gave up. Without it a restarted agent would start a crash-looping
//! server at once, forget how often it crashed, and restart a server it had given up on.
//!
//! The backoff is kept as a wall-clock deadline (the tokio clock starts anew with each agent);
//! on load, the time left is `deadline − now`, clamped to `[0, longest backoff step]` so a clock
//! that jumped cannot park the process for longer than the schedule allows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{CrashRecord, SupervisorError};
use crate::atomic;

/// The file's content.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedHistory {
    /// Oldest first.
    pub crashes: Vec<CrashRecord>,
    /// Crashes in a row (the backoff schedule's position).
    pub streak: u32,
    /// When the pending restart is due, if the process is in `backoff`.
    pub backoff_until: Option<DateTime<Utc>>,
    /// Set when the supervisor gave up: the process stays in `error` with this reason.
    pub error: Option<String>,
}

impl SavedHistory {
    /// The saved history; `Ok(None)` when there is none yet.
    pub fn load(path: &Path) -> Result<Option<Self>, SupervisorError> {
        let state_err = |source| SupervisorError::State { path: path.to_path_buf(), source };
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(state_err(e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| state_err(std::io::Error::other(e)))
    }

    /// Replaces the file atomically.
    pub fn save(&self, path: &Path) -> Result<(), SupervisorError> {
        let state_err = |source| SupervisorError::State { path: path.to_path_buf(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(state_err)?;
        }
        let json = serde_json::to_vec_pretty(self).map_err(|e| state_err(std::io::Error::other(e)))?;
        atomic::write_file(path, &json).map_err(state_err)
    }

    /// How long the pending backoff still has to run at `now`, at most `cap`.
    pub fn backoff_left(&self, now: DateTime<Utc>, cap: Duration) -> Option<Duration> {
        let until = self.backoff_until?;
        Some((until - now).to_std().unwrap_or(Duration::ZERO).min(cap))
    }
}

/// Where a supervisor keeps its [`SavedHistory`], if anywhere.
#[derive(Debug, Clone, Default)]
pub struct HistoryFile(pub Option<PathBuf>);

impl HistoryFile {
    /// Loads the history; a file that cannot be read or parsed is reported and ignored (the
    /// process must stay supervisable), and overwritten at the next save.
    pub fn load(&self) -> SavedHistory {
        let Some(path) = &self.0 else { return SavedHistory::default() };
        match SavedHistory::load(path) {
            Ok(saved) => saved.unwrap_or_default(),
            Err(e) => {
                tracing::warn!(error = %e, "crash history unreadable; starting without it");
                SavedHistory::default()
            }
        }
    }

    /// Saves the history; a failure is logged (supervision goes on without it).
    pub fn save(&self, saved: &SavedHistory) {
        if let Some(path) = &self.0 {
            if let Err(e) = saved.save(path) {
                tracing::warn!(error = %e, "crash history not saved");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_left_is_clamped_to_zero_and_the_cap() {
        let now = Utc::now();
        let cap = Duration::from_secs(120);
        let at = |secs: i64| SavedHistory {
            backoff_until: Some(now + chrono::Duration::seconds(secs)),
            ..Default::default()
        };
        assert_eq!(at(30).backoff_left(now, cap), Some(Duration::from_secs(30)));
        assert_eq!(at(-5).backoff_left(now, cap), Some(Duration::ZERO));
        assert_eq!(at(86_400).backoff_left(now, cap), Some(cap));
        assert_eq!(SavedHistory::default().backoff_left(now, cap), None);
    }

    #[test]
    fn round_trip_and_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/crashes.json");
        let file = HistoryFile(Some(path.clone()));
        assert_eq!(file.load(), SavedHistory::default());
        let saved = SavedHistory { streak: 3, error: Some("why".into()), ..Default::default() };
        file.save(&saved);
        assert_eq!(file.load(), saved);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(SavedHistory::load(&path).is_err());
        assert_eq!(file.load(), SavedHistory::default());
    }
}
