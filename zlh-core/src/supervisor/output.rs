//! Process output: a ring buffer of recent lines, fan-out to many subscribers that never blocks
//! the producer, and a size-rotated log file.
//!
//! A game server can print thousands of lines a second and a browser console can stall at any
//! time, so the producer side is built not to wait on anyone. Output arrives in chunks (one pipe
//! read); each chunk's lines become one shared batch ([`Lines`]: one text buffer and where each
//! line ends), so a chunk costs two allocations however many lines it holds, and fan-out costs one
//! reference count per subscriber and chunk instead of one copy per subscriber and line. Batches
//! go through a bounded `broadcast` channel: a subscriber that falls behind skips batches and is
//! told how many lines it missed ([`OutputEvent::Skipped`]); memory stays fixed. The ring holds
//! the same batches. Log write errors turn into one warning, never into lost console output.
//! One mutex orders everything: sequence numbers, the ring, the channel and the file, so a
//! subscriber's snapshot and its live receiver meet without a gap or a duplicate.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast::{self, error::RecvError, error::TryRecvError};

use super::OutputLine;

/// Appended to a line cut at `max_line_bytes`.
pub const CUT_MARKER: &str = " […cut]";

/// After a log write error, lines to let pass before trying the file again.
const LOG_RETRY_LINES: u64 = 10_000;

/// Lines that arrived together, in order, shared by every subscriber.
pub type Batch = Arc<Lines>;

/// Consecutive lines in one text buffer: line `i` is `text[ends[i-1]..ends[i]]`, numbered
/// `first_seq + i`. One allocation for the text and one for the offsets, however many lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lines {
    first_seq: u64,
    text: String,
    ends: Vec<usize>,
}

/// One line of a [`Lines`] batch, borrowed from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    pub seq: u64,
    pub line: &'a str,
}

impl Line<'_> {
    pub fn to_output_line(self) -> OutputLine {
        OutputLine { seq: self.seq, line: self.line.to_string() }
    }
}

impl Lines {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<Line<'_>> {
        let end = *self.ends.get(i)?;
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        Some(Line { seq: self.first_seq + i as u64, line: &self.text[start..end] })
    }

    pub fn first(&self) -> Option<Line<'_>> {
        self.get(0)
    }

    pub fn last(&self) -> Option<Line<'_>> {
        self.get(self.len().checked_sub(1)?)
    }

    pub fn iter(&self) -> LinesIter<'_> {
        LinesIter { lines: self, next: 0, start: 0 }
    }
}

/// The lines of a batch in order. Every subscriber walks every line, so this is the hot loop of
/// a console flood: it steps through the offsets without re-checking them.
pub struct LinesIter<'a> {
    lines: &'a Lines,
    next: usize,
    start: usize,
}

impl<'a> Iterator for LinesIter<'a> {
    type Item = Line<'a>;

    fn next(&mut self) -> Option<Line<'a>> {
        let end = *self.lines.ends.get(self.next)?;
        // SAFETY: `ends` only ever records `text.len()` right after a whole `&str` was appended
        // (`LineBuf::push`), so `start..end` is in bounds and on char boundaries.
        let line = unsafe { self.lines.text.get_unchecked(self.start..end) };
        let seq = self.lines.first_seq + self.next as u64;
        self.start = end;
        self.next += 1;
        Some(Line { seq, line })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.lines.ends.len() - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for LinesIter<'_> {}

/// Lines being gathered into one batch for [`OutputHub::push_batch`]; lines longer than the hub's
/// limit are cut as they are added.
#[derive(Debug)]
pub struct LineBuf {
    text: String,
    ends: Vec<usize>,
    max_line_bytes: usize,
}

impl LineBuf {
    /// Adds one line (without its newline).
    pub fn push(&mut self, line: &str) {
        if line.len() <= self.max_line_bytes {
            self.text.push_str(line);
        } else {
            let mut end = self.max_line_bytes;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            self.text.push_str(&line[..end]);
            self.text.push_str(CUT_MARKER);
        }
        self.ends.push(self.text.len());
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// An empty buffer with room for as much as this one holds (the next chunk is likely alike).
    pub fn fresh(&self) -> LineBuf {
        LineBuf {
            text: String::with_capacity(self.text.capacity()),
            ends: Vec::with_capacity(self.ends.capacity()),
            max_line_bytes: self.max_line_bytes,
        }
    }
}

/// What a subscriber gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// The next lines, in order, without a gap since the last event.
    Lines(Batch),
    /// The subscriber fell behind and this many lines were dropped for it; the console shows
    /// this as a line of its own.
    Skipped(u64),
}

/// Live output of one hub, from the moment of [`OutputHub::subscribe`].
pub struct OutputReceiver {
    rx: broadcast::Receiver<Batch>,
    /// The sequence number the next line should have; a batch that starts later means lines
    /// were skipped.
    next_seq: u64,
    /// A batch that arrived after a skip, given out after the `Skipped` event.
    pending: Option<Batch>,
    /// The batch [`Self::next_line`] is reading, and the position in it.
    reading: Option<(Batch, usize)>,
}

impl OutputReceiver {
    /// The next event; `None` once the hub is gone and everything was read.
    pub async fn recv(&mut self) -> Option<OutputEvent> {
        if let Some(batch) = self.pending.take() {
            return Some(OutputEvent::Lines(batch));
        }
        loop {
            match self.rx.recv().await {
                Ok(batch) => return Some(self.arrived(batch)),
                // The next receive gives the oldest batch still held; the gap is counted in lines.
                Err(RecvError::Lagged(_)) => continue,
                Err(RecvError::Closed) => return None,
            }
        }
    }

    /// The next line, one at a time, passing over skips (for callers that look for a line, not
    /// for a console); `None` once the hub is gone. Do not mix with [`Self::recv`].
    pub async fn next_line(&mut self) -> Option<OutputLine> {
        loop {
            if let Some((batch, pos)) = &mut self.reading {
                if let Some(line) = batch.get(*pos) {
                    *pos += 1;
                    return Some(line.to_output_line());
                }
            }
            match self.recv().await? {
                OutputEvent::Lines(batch) => self.reading = Some((batch, 0)),
                OutputEvent::Skipped(_) => {}
            }
        }
    }

    /// The next event if one is ready now (`None` when none is, or the hub is gone).
    pub fn try_recv(&mut self) -> Option<OutputEvent> {
        if let Some(batch) = self.pending.take() {
            return Some(OutputEvent::Lines(batch));
        }
        loop {
            match self.rx.try_recv() {
                Ok(batch) => return Some(self.arrived(batch)),
                Err(TryRecvError::Lagged(_)) => continue,
                Err(TryRecvError::Empty | TryRecvError::Closed) => return None,
            }
        }
    }

    fn arrived(&mut self, batch: Batch) -> OutputEvent {
        let (first, last) = match (batch.first(), batch.last()) {
            (Some(f), Some(l)) => (f.seq, l.seq),
            _ => return OutputEvent::Lines(batch),
        };
        let skipped = first.saturating_sub(self.next_seq);
        self.next_seq = last + 1;
        if skipped > 0 {
            self.pending = Some(batch);
            OutputEvent::Skipped(skipped)
        } else {
            OutputEvent::Lines(batch)
        }
    }
}

/// Where output goes. Cheap to share (`Arc`); `push` never blocks on subscribers.
pub struct OutputHub {
    inner: Mutex<Inner>,
    tx: broadcast::Sender<Batch>,
    ring_lines: usize,
    max_line_bytes: usize,
}

struct Inner {
    next_seq: u64,
    /// Recent batches, newest last, holding at least the last `ring_lines` lines.
    ring: VecDeque<Batch>,
    ring_len: usize,
    log: Option<LogFile>,
}

pub struct OutputOptions {
    /// Lines kept for late subscribers and crash records (default 500).
    pub ring_lines: usize,
    /// Live-channel capacity in batches (one batch per pipe read, up to 64 KiB of lines); a
    /// subscriber that falls further behind skips lines and is told how many (default 128).
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
            channel_capacity: 128,
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
            inner: Mutex::new(Inner { next_seq: 0, ring: VecDeque::new(), ring_len: 0, log }),
            tx,
            ring_lines: options.ring_lines,
            max_line_bytes: options.max_line_bytes,
        })
    }

    /// Adds one line (without its newline); assigns the next sequence number.
    pub fn push(&self, line: &str) {
        self.push_lines([line]);
    }

    /// Adds lines that arrived together (without their newlines), as one batch.
    pub fn push_lines<S: AsRef<str>>(&self, lines: impl IntoIterator<Item = S>) {
        let mut buf = self.line_buf();
        for line in lines {
            buf.push(line.as_ref());
        }
        self.push_batch(buf);
    }

    /// An empty batch to gather lines in.
    pub fn line_buf(&self) -> LineBuf {
        LineBuf { text: String::new(), ends: Vec::new(), max_line_bytes: self.max_line_bytes }
    }

    /// Adds the gathered lines as one batch; assigns their sequence numbers.
    pub fn push_batch(&self, lines: LineBuf) {
        if lines.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let first_seq = inner.next_seq;
        inner.next_seq += lines.ends.len() as u64;
        let batch: Batch = Arc::new(Lines { first_seq, text: lines.text, ends: lines.ends });
        if let Some(log) = inner.log.as_mut() {
            for line in batch.iter() {
                log.write_line(line.seq, line.line);
            }
        }
        if self.ring_lines > 0 {
            inner.ring_len += batch.len();
            inner.ring.push_back(batch.clone());
            while inner.ring.front().is_some_and(|b| inner.ring_len - b.len() >= self.ring_lines) {
                let old = inner.ring.pop_front().expect("checked");
                inner.ring_len -= old.len();
            }
        }
        // Only fails without receivers; a full channel overwrites its oldest batch instead.
        let _ = self.tx.send(batch);
    }

    /// Recent lines, then live ones.
    pub fn subscribe(&self) -> (Vec<OutputLine>, OutputReceiver) {
        // Under the lock no line can be pushed between the snapshot and the receiver.
        let inner = self.lock();
        let rx = OutputReceiver { rx: self.tx.subscribe(), next_seq: inner.next_seq, pending: None, reading: None };
        (Self::last(&inner, self.ring_lines).map(Line::to_output_line).collect(), rx)
    }

    /// The last `n` lines.
    pub fn tail(&self, n: usize) -> Vec<String> {
        self.tail_since(0, n)
    }

    /// The last `n` lines among those numbered `first_seq` or later (one run's output).
    pub fn tail_since(&self, first_seq: u64, n: usize) -> Vec<String> {
        let inner = self.lock();
        let lines: Vec<Line<'_>> = Self::last(&inner, self.ring_lines).filter(|l| l.seq >= first_seq).collect();
        let skip = lines.len().saturating_sub(n);
        lines[skip..].iter().map(|l| l.line.to_string()).collect()
    }

    /// The last `ring_lines` lines held, oldest first.
    fn last(inner: &Inner, ring_lines: usize) -> impl Iterator<Item = Line<'_>> {
        inner.ring.iter().flat_map(|b| b.iter()).skip(inner.ring_len.saturating_sub(ring_lines))
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

    fn write_line(&mut self, seq: u64, line: &str) {
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
        let len = line.len() as u64 + 1;
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

    fn hub(ring_lines: usize, channel_capacity: usize) -> OutputHub {
        OutputHub::new(OutputOptions { ring_lines, channel_capacity, ..OutputOptions::default() }).unwrap()
    }

    /// Everything a receiver holds now, lines as sequence numbers and skips as markers.
    fn drain(rx: &mut OutputReceiver) -> (Vec<u64>, Vec<u64>) {
        let (mut seqs, mut skips) = (Vec::new(), Vec::new());
        while let Some(event) = rx.try_recv() {
            match event {
                OutputEvent::Lines(batch) => seqs.extend(batch.iter().map(|l| l.seq)),
                OutputEvent::Skipped(n) => skips.push(n),
            }
        }
        (seqs, skips)
    }

    #[test]
    fn ring_keeps_the_last_lines_in_order() {
        let h = hub(3, 16);
        for i in 0..10 {
            h.push(&format!("line {i}"));
        }
        h.push_lines(["a", "b"]);
        let (snapshot, _) = h.subscribe();
        let seqs: Vec<_> = snapshot.iter().map(|l| l.seq).collect();
        assert_eq!(seqs, [9, 10, 11]);
        assert_eq!(h.tail(2), ["a", "b"]);
        assert_eq!(h.tail(100), ["line 9", "a", "b"]);
        assert_eq!(h.tail_since(10, 100), ["a", "b"]);
        assert_eq!(h.next_seq(), 12);
    }

    #[test]
    fn live_lines_follow_the_snapshot() {
        let h = hub(10, 16);
        h.push("a");
        let (snapshot, mut rx) = h.subscribe();
        h.push("b");
        assert_eq!(snapshot, [OutputLine { seq: 0, line: "a".into() }]);
        match rx.try_recv() {
            Some(OutputEvent::Lines(batch)) => {
                assert_eq!(batch.iter().collect::<Vec<_>>(), [Line { seq: 1, line: "b" }])
            }
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn long_lines_are_cut_on_a_char_boundary() {
        let h = OutputHub::new(OutputOptions { max_line_bytes: 5, ..OutputOptions::default() }).unwrap();
        let (_, mut rx) = h.subscribe();
        h.push("abcdé"); // 6 bytes: 'é' straddles the limit
        h.push("abcde");
        assert_eq!(h.tail(2), [format!("abcd{CUT_MARKER}"), "abcde".to_string()]);
        match rx.try_recv() {
            Some(OutputEvent::Lines(batch)) => assert_eq!(batch.first().unwrap().line, format!("abcd{CUT_MARKER}")),
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// A batch gives back exactly the lines put in, numbered in order, whatever their bytes
        /// (multi-byte characters at the cut included), by `iter`, `get`, `first` and `last`.
        #[test]
        fn a_batch_gives_back_its_lines(lines in proptest::collection::vec("\\PC{0,12}", 0..40), max in 1usize..16) {
            let h = OutputHub::new(OutputOptions { max_line_bytes: max, ..OutputOptions::default() }).unwrap();
            h.push("before");
            let (_, mut rx) = h.subscribe();
            h.push_lines(&lines);
            let want: Vec<String> = lines.iter().map(|l| {
                let mut l = l.clone();
                if l.len() > max {
                    let mut end = max;
                    while !l.is_char_boundary(end) { end -= 1; }
                    l.truncate(end);
                    l.push_str(CUT_MARKER);
                }
                l
            }).collect();
            let Some(OutputEvent::Lines(batch)) = rx.try_recv() else {
                proptest::prop_assert!(lines.is_empty());
                return Ok(());
            };
            let got: Vec<(u64, &str)> = batch.iter().map(|l| (l.seq, l.line)).collect();
            let expected: Vec<(u64, &str)> = want.iter().zip(1..).map(|(l, seq)| (seq, l.as_str())).collect();
            proptest::prop_assert_eq!(&got, &expected);
            proptest::prop_assert_eq!(batch.len(), want.len());
            for (i, l) in batch.iter().enumerate() {
                proptest::prop_assert_eq!(batch.get(i), Some(l));
            }
            proptest::prop_assert_eq!(batch.first().map(|l| l.line), want.first().map(String::as_str));
            proptest::prop_assert_eq!(batch.last().map(|l| l.line), want.last().map(String::as_str));
        }
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
            let (live, skips) = drain(&mut rx);
            assert!(skips.is_empty());
            seqs.extend(live);
            let first = seqs[0];
            assert!(seqs.iter().copied().eq(first..total), "gap or duplicate");
        }
    }

    #[test]
    fn a_lagging_subscriber_is_told_exactly_how_many_lines_it_missed() {
        let h = hub(10, 4);
        let (_, mut lagging) = h.subscribe();
        let (_, mut keeping_up) = h.subscribe();
        let mut seen = Vec::new();
        for b in 0..10u64 {
            h.push_lines((0..100).map(|i| format!("{b}:{i}")));
            seen.extend(drain(&mut keeping_up).0);
        }
        assert!(seen.iter().copied().eq(0..1000), "the one that keeps up sees every line");
        // The channel holds the last 4 batches: the first 6 (600 lines) are gone, said once.
        let (seqs, skips) = drain(&mut lagging);
        assert_eq!(skips, [600]);
        assert!(seqs.iter().copied().eq(600..1000));
        // After the skip it goes on without another marker.
        h.push("more");
        assert_eq!(drain(&mut lagging), (vec![1000], vec![]));
    }

    #[test]
    fn stalled_subscriber_neither_blocks_nor_grows_memory() {
        const LINES: u64 = 1_000_000;
        const CAPACITY: usize = 64;
        const BATCH: u64 = 100;
        let h = Arc::new(hub(500, CAPACITY));
        let (_, mut stalled) = h.subscribe();
        for b in 0..LINES / BATCH {
            h.push_lines((0..BATCH).map(|i| format!("[12:00:00] [Server thread/INFO]: line {}", b * BATCH + i)));
        }
        assert_eq!(h.tail(usize::MAX).len(), 500);
        // The stalled one skips to what the bounded channel still holds.
        let (seqs, skips) = drain(&mut stalled);
        assert_eq!(skips, [LINES - CAPACITY as u64 * BATCH]);
        assert_eq!(seqs.len() as u64, CAPACITY as u64 * BATCH);
    }

    #[tokio::test]
    async fn receivers_end_when_the_hub_goes_away() {
        let h = hub(10, 4);
        let (_, mut rx) = h.subscribe();
        h.push("last");
        drop(h);
        assert!(matches!(rx.recv().await, Some(OutputEvent::Lines(_))));
        assert_eq!(rx.recv().await, None);
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
        assert!(matches!(rx.try_recv(), Some(OutputEvent::Skipped(_))));
    }
}
