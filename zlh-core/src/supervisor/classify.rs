//! Crash classification: rules are data (patterns over the log tail + exit status), with
//! defaults for Java/Minecraft, Node and Python. (Agreed interface; bodies being written.)

use serde::{Deserialize, Serialize};

use super::CrashClass;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// True when the kernel's memory limit was hit during the run (cgroup `memory.events` oom_kill,
    /// or a SIGKILL while a limit was set and usage was at it).
    pub memory_limit_hit: bool,
}

/// One rule: it matches when every given condition holds (empty lists match anything).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub class: CrashClass,
    /// Regexes; the rule matches if any of them matches any line of the tail.
    #[serde(default)]
    pub patterns: Vec<String>,
    #[serde(default)]
    pub exit_codes: Vec<i32>,
    #[serde(default)]
    pub signals: Vec<i32>,
    /// Only matches when `ExitInfo::memory_limit_hit`.
    #[serde(default)]
    pub requires_memory_limit_hit: bool,
}

/// Ordered rules; the first match wins. Falls back to `unexpected_exit` for exit 0 and
/// `nonzero_exit` otherwise.
#[derive(Debug, Clone)]
pub struct Classifier {
    _rules: Vec<Rule>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid classification rule {index}: {message}")]
pub struct RuleError {
    pub index: usize,
    pub message: String,
}

impl Classifier {
    pub fn new(_rules: Vec<Rule>) -> Result<Self, RuleError> {
        unimplemented!()
    }
    pub fn default_rules() -> Vec<Rule> {
        unimplemented!()
    }
    pub fn classify(&self, _exit: &ExitInfo, _tail: &[String]) -> CrashClass {
        unimplemented!()
    }
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new(Self::default_rules()).expect("default rules are valid")
    }
}
