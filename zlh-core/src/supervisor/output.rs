//! Process output: a ring buffer of recent lines, fan-out to many subscribers that never blocks
//! the producer, and a size-rotated log file. (Agreed interface; bodies being written.)

use std::path::PathBuf;

use tokio::sync::broadcast;

use super::OutputLine;

/// Where output goes. Cheap to share (`Arc`); `push` never blocks on subscribers.
pub struct OutputHub {
    _p: (),
}

pub struct OutputOptions {
    /// Lines kept for late subscribers and crash records (default 500).
    pub ring_lines: usize,
    /// Live-channel capacity; a subscriber that falls further behind skips lines (default 1024).
    pub channel_capacity: usize,
    /// Log file (`console.log`); `None` for no file.
    pub log_file: Option<PathBuf>,
    /// Rotate when the log exceeds this (default 10 MiB), keeping `log_keep` old files (default 3).
    pub log_max_bytes: u64,
    pub log_keep: usize,
    /// Longest line kept; longer lines are cut (default 8 KiB), so one huge line cannot grow memory.
    pub max_line_bytes: usize,
}

impl Default for OutputOptions {
    fn default() -> Self {
        Self {
            ring_lines: 500,
            channel_capacity: 1024,
            log_file: None,
            log_max_bytes: 10 << 20,
            log_keep: 3,
            max_line_bytes: 8192,
        }
    }
}

impl OutputHub {
    pub fn new(_options: OutputOptions) -> std::io::Result<Self> {
        unimplemented!()
    }
    /// Adds one line (without its newline); assigns the next sequence number.
    pub fn push(&self, _line: &str) {
        unimplemented!()
    }
    /// Recent lines, then live ones (a subscriber that lags gets `RecvError::Lagged` and goes on).
    pub fn subscribe(&self) -> (Vec<OutputLine>, broadcast::Receiver<OutputLine>) {
        unimplemented!()
    }
    /// The last `n` lines.
    pub fn tail(&self, _n: usize) -> Vec<String> {
        unimplemented!()
    }
}
