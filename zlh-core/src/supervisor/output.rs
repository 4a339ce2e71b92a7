//! Process output: a ring buffer of recent lines, fan-out to many subscribers that never blocks
//! the producer, and a size-rotated log file.
//!
//! A game server can print thousands of lines a second and a browser console can stall at any
//! time, so the producer side is built not to wait on anyone: live lines go through a bounded
//! `broadcast` channel (a slow subscriber skips lines and is told so, memory stays fixed), the
//! ring is bounded, and log write errors turn into one warning, never into lost console output.
//! One mutex orders everything: sequence numbers, the ring, the channel and the file, so a
//! subscriber's snapshot and its live receiver meet without a gap or a duplicate.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::broadcast;

use super::OutputLine;

/// Appended to a line cut at `max_line_bytes`.
pub const CUT_MARKER: &str = " […cut]";

/// After a log write error, lines to let pass before trying the file again.
const LOG_RETRY_LINES: u64 = 10_000;

/// Where output goes. Cheap to share (`Arc`); `push` never blocks on subscribers.
pub struct OutputHub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<OutputLine>,
    ring_lines: usize,
    max_line_bytes: usize,
}

struct Inner {
    next_seq: u64,
    ring: VecDeque<OutputLine>,
    log: Option<LogFile>,
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
    /// Fails only when the log file cannot be opened at all; later errors are warnings.
    pub fn new(options: OutputOptions) -> std::io::Result<Self> {
        let log = match options.log_file {
            Some(path) => Some(LogFile::open(path, options.log_max_bytes, options.log_keep)?),
            None => None,
        };
        let (tx, _) = broadcast::channel(options.channel_capacity.max(1));
        Ok(Self {
            inner: Mutex::new(Inner { next_seq: 0, ring: VecDeque::with_capacity(options.ring_lines), log }),
            tx,
            ring_lines: options.ring_lines,
            max_line_bytes: options.max_line_bytes,
        })
    }

    /// Adds one line (without its newline); assigns the next sequence number.
    pub fn push(&self, line: &str) {
        let (line, cut) = cut_line(line, self.max_line_bytes);
        let mut inner = self.lock();
        let seq = inner.next_seq;
        inner.next_seq += 1;
        if let Some(log) = inner.log.as_mut() {
            log.write_line(seq, line, cut);
        }
        // The ring reuses the buffer of the line it drops, so a full ring allocates nothing.
        if self.ring_lines > 0 {
            let mut text = if inner.ring.len() >= self.ring_lines {
                inner.ring.pop_front().map(|old| old.line).unwrap_or_default()
            } else {
                String::new()
            };
            text.clear();
            push_cut(&mut text, line, cut);
            inner.ring.push_back(OutputLine { seq, line: text });
        }
        if self.tx.receiver_count() > 0 {
            let mut text = String::with_capacity(line.len() + if cut { CUT_MARKER.len() } else { 0 });
            push_cut(&mut text, line, cut);
            // Only fails without receivers; a full channel overwrites its oldest line instead.
            let _ = self.tx.send(OutputLine { seq, line: text });
        }
    }

    /// Recent lines, then live ones (a subscriber that lags gets `RecvError::Lagged` and goes on).
    pub fn subscribe(&self) -> (Vec<OutputLine>, broadcast::Receiver<OutputLine>) {
        // Under the lock no line can be pushed between the snapshot and the receiver.
        let inner = self.lock();
        let rx = self.tx.subscribe();
        (inner.ring.iter().cloned().collect(), rx)
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        let inner = self.lock();
        let skip = inner.ring.len().saturating_sub(n);
        inner.ring.iter().skip(skip).map(|l| l.line.clone()).collect()
    }

    /// The sequence number the next line will get.
    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq
    }

    /// Writes buffered log lines to the file (call when the process exits).
    pub fn flush(&self) {
        if let Some(log) = self.lock().log.as_mut() {
            log.flush();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere while holding the lock leaves consistent data: keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for OutputHub {
    fn drop(&mut self) {
        self.flush();
    }
}

/// `line` cut to at most `max` bytes on a char boundary; true when it was cut.
fn cut_line(line: &str, max: usize) -> (&str, bool) {
    if line.len() <= max {
        return (line, false);
    }
    let mut end = max;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    (&line[..end], true)
}

fn push_cut(text: &mut String, line: &str, cut: bool) {
    text.push_str(line);
    if cut {
        text.push_str(CUT_MARKER);
    }
}

/// `console.log`, rotated by size to `console.log.1` … `console.log.<keep>`.
struct LogFile {
    path: PathBuf,
    max_bytes: u64,
    keep: usize,
    /// `None` after a write error, until `retry_at`.
    writer: Option<BufWriter<File>>,
    written: u64,
    /// Sequence number of the line being written (for the retry after an error).
    seq: u64,
    retry_at: u64,
    warned: bool,
}

impl LogFile {
    fn open(path: PathBuf, max_bytes: u64, keep: usize) -> std::io::Result<Self> {
        let (writer, written) = Self::open_append(&path)?;
        Ok(Self { path, max_bytes, keep, writer: Some(writer), written, seq: 0, retry_at: 0, warned: false })
    }

    fn open_append(path: &Path) -> std::io::Result<(BufWriter<File>, u64)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let len = file.metadata()?.len();
        Ok((BufWriter::new(file), len))
    }

    fn write_line(&mut self, seq: u64, line: &str, cut: bool) {
        self.seq = seq;
        if self.writer.is_none() {
            if seq < self.retry_at {
                return;
            }
            match Self::open_append(&self.path) {
                Ok((w, len)) => (self.writer, self.written) = (Some(w), len),
                Err(e) => return self.failed(e),
            }
        }
        let len = (line.len() + 1 + if cut { CUT_MARKER.len() } else { 0 }) as u64;
        if self.written > 0 && self.written + len > self.max_bytes {
            if let Err(e) = self.rotate() {
                return self.failed(e);
            }
        }
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        let result = (|| {
            w.write_all(line.as_bytes())?;
            if cut {
                w.write_all(CUT_MARKER.as_bytes())?;
            }
            w.write_all(b"\n")
        })();
        match result {
            Ok(()) => self.written += len,
            Err(e) => self.failed(e),
        }
    }

    /// Shifts `console.log.N-1` → `.N` … `console.log` → `.1` and starts a new file.
    fn rotate(&mut self) -> std::io::Result<()> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
        }
        let numbered = |n: usize| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if self.keep == 0 {
            ignore_missing(std::fs::remove_file(&self.path))?;
        } else {
            for n in (1..self.keep).rev() {
                ignore_missing(std::fs::rename(numbered(n), numbered(n + 1)))?;
            }
            ignore_missing(std::fs::rename(&self.path, numbered(1)))?;
        }
        let (w, len) = Self::open_append(&self.path)?;
        (self.writer, self.written) = (Some(w), len);
        Ok(())
    }

    fn flush(&mut self) {
        if let Some(w) = self.writer.as_mut() {
            if let Err(e) = w.flush() {
                self.failed(e);
            }
        }
    }

    /// Drops the file for a while and warns once; output goes on without it.
    fn failed(&mut self, error: std::io::Error) {
        if !self.warned {
            self.warned = true;
            tracing::warn!(path = %self.path.display(), %error, "console log write failed; output continues without the file");
        }
        // Dropping a BufWriter flushes it again: discard what it holds instead.
        if let Some(w) = self.writer.take() {
            let _ = w.into_parts();
        }
        self.retry_at = self.seq + LOG_RETRY_LINES;
    }
}

fn ignore_missing(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};

    fn hub(ring_lines: usize, channel_capacity: usize) -> OutputHub {
        OutputHub::new(OutputOptions { ring_lines, channel_capacity, ..OutputOptions::default() }).unwrap()
    }

    #[test]
    fn ring_keeps_the_last_lines_in_order() {
        let h = hub(3, 16);
        for i in 0..10 {
            h.push(&format!("line {i}"));
        }
        let (snapshot, _) = h.subscribe();
        let seqs: Vec<_> = snapshot.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, [7, 8, 9]);
        assert_eq!(h.tail(2), ["line 8", "line 9"]);
        assert_eq!(h.tail(100), ["line 7", "line 8", "line 9"]);
        assert_eq!(h.next_seq(), 10);
    }

    #[test]
    fn live_lines_follow_the_snapshot() {
        let h = hub(10, 16);
        h.push("a");
        let (snapshot, mut rx) = h.subscribe();
        h.push("b");
        assert_eq!(snapshot, [OutputLine { seq: 0, line: "a".into() }]);
        assert_eq!(rx.try_recv().unwrap(), OutputLine { seq: 1, line: "b".into() });
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Empty);
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let h = OutputHub::new(OutputOptions { max_line_bytes: 5, ..OutputOptions::default() }).unwrap();
        let (_, mut rx) = h.subscribe();
        h.push("abcdé"); // 6 bytes: 'é' straddles the limit
        h.push("abcde");
        assert_eq!(h.tail(2), [format!("abcd{CUT_MARKER}"), "abcde".to_string()]);
        assert_eq!(rx.try_recv().unwrap().line, format!("abcd{CUT_MARKER}"));
    }

    #[test]
    fn snapshot_and_live_have_no_gap_or_duplicate_under_concurrent_pushes() {
        const WRITERS: u64 = 4;
        const PER_WRITER: u64 = 20_000;
        let h = Arc::new(hub(100, 1 << 17));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..PER_WRITER {
                        h.push(&format!("{w}:{i}"));
                    }
                })
            })
            .collect();
        let mut subscriptions = Vec::new();
        while subscriptions.len() < 50 {
            subscriptions.push(h.subscribe());
            std::thread::yield_now();
        }
        for w in writers {
            w.join().unwrap();
        }
        let total = WRITERS * PER_WRITER;
        for (snapshot, mut rx) in subscriptions {
            let mut seqs: Vec<u64> = snapshot.iter().map(|l| l.seq).collect();
            while let Ok(line) = rx.try_recv() {
                seqs.push(line.seq);
            }
            let first = seqs[0];
            assert!(seqs.iter().copied().eq(first..total), "gap or duplicate");
        }
    }

    #[test]
    fn stalled_subscriber_neither_blocks_nor_grows_memory() {
        const LINES: u64 = 1_000_000;
        const CAPACITY: usize = 1024;
        let h = Arc::new(hub(500, CAPACITY));
        let (_, mut stalled) = h.subscribe();
        let (_, mut draining) = h.subscribe();
        let reader = std::thread::spawn(move || {
            let (mut last, mut lagged) = (None::<u64>, 0u64);
            loop {
                match draining.blocking_recv() {
                    Ok(line) => {
                        assert!(last.is_none_or(|l| line.seq > l), "out of order");
                        last = Some(line.seq);
                        if line.seq == LINES - 1 {
                            return lagged;
                        }
                    }
                    Err(RecvError::Lagged(n)) => lagged += n,
                    Err(RecvError::Closed) => panic!("closed"),
                }
            }
        });
        for i in 0..LINES {
            h.push(&format!("[12:00:00] [Server thread/INFO]: line {i}"));
        }
        let lagged = reader.join().unwrap();
        assert!(lagged < LINES);
        assert_eq!(h.tail(usize::MAX).len(), 500);
        // The stalled one skips to what the bounded channel still holds.
        match stalled.try_recv() {
            Err(TryRecvError::Lagged(n)) => assert_eq!(n, LINES - CAPACITY as u64),
            other => panic!("expected lag, got {other:?}"),
        }
        let mut held = 0;
        while stalled.try_recv().is_ok() {
            held += 1;
        }
        assert_eq!(held, CAPACITY);
    }

    fn log_hub(dir: &Path, max_bytes: u64, keep: usize) -> OutputHub {
        OutputHub::new(OutputOptions {
            log_file: Some(dir.join("console.log")),
            log_max_bytes: max_bytes,
            log_keep: keep,
            ..OutputOptions::default()
        })
        .unwrap()
    }

    fn read(path: PathBuf) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn log_rotation_keeps_n_files_with_the_newest_in_console_log() {
        let dir = tempfile::tempdir().unwrap();
        let h = log_hub(dir.path(), 100, 2);
        for i in 0..100 {
            h.push(&format!("line {i:03}")); // 9 bytes with the newline: 11 lines per file
        }
        h.flush();
        let current = read(dir.path().join("console.log"));
        assert!(current.ends_with("line 099\n"), "{current}");
        assert!(current.len() <= 100);
        assert!(dir.path().join("console.log.2").exists());
        assert!(!dir.path().join("console.log.3").exists());
        // Oldest to newest, the kept files hold consecutive lines.
        let all = [".2", ".1", ""].iter().map(|s| read(dir.path().join(format!("console.log{s}")))).collect::<String>();
        let numbers: Vec<u32> = all.lines().map(|l| l[5..].parse().unwrap()).collect();
        assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
        assert_eq!(numbers.len(), 11 * 2 + current.lines().count());
    }

    #[test]
    fn log_appends_to_an_existing_file_and_flushes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        log_hub(dir.path(), 1 << 20, 3).push("first run");
        log_hub(dir.path(), 1 << 20, 3).push("second run");
        assert_eq!(read(dir.path().join("console.log")), "first run\nsecond run\n");
    }

    #[test]
    fn log_rotation_without_kept_files_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let h = log_hub(dir.path(), 10, 0);
        h.push("12345678");
        h.push("abcdefgh");
        h.flush();
        assert_eq!(read(dir.path().join("console.log")), "abcdefgh\n");
        assert!(!dir.path().join("console.log.1").exists());
    }

    #[test]
    fn log_write_errors_do_not_stop_output() {
        // Every write to /dev/full fails with "no space left on device".
        let full = Path::new("/dev/full");
        if !full.exists() {
            return;
        }
        let h = OutputHub::new(OutputOptions {
            log_file: Some(full.to_path_buf()),
            log_max_bytes: u64::MAX, // never rotate (never rename a device node)
            ..OutputOptions::default()
        })
        .unwrap();
        let (_, mut rx) = h.subscribe();
        for i in 0..50_000 {
            h.push(&format!("line {i} {}", "x".repeat(100)));
        }
        h.flush();
        assert_eq!(h.next_seq(), 50_000);
        assert!(rx.try_recv().is_err_and(|e| matches!(e, TryRecvError::Lagged(_))));
    }
}
