//! The decompressed stream: a hard cap on how much of it is read, and what a read error means.

use std::cell::Cell;
use std::io::{self, Read};
use std::rc::Rc;

use super::ExtractError;

/// What happened to the stream so far, shared between the reader and the code mapping errors.
#[derive(Debug, Default)]
pub(super) struct StreamState {
    read: Cell<u64>,
    /// The source returned 0 (end of stream) to a read.
    eof: Cell<bool>,
    /// The source itself failed (as opposed to the tar parser refusing what it read).
    source_failed: Cell<bool>,
    /// The stream went past this cap.
    over_cap: Cell<Option<u64>>,
}

impl StreamState {
    pub(super) fn eof(&self) -> bool {
        self.eof.get()
    }

    /// The one place a stream read error becomes an [`ExtractError`]; `path` is the last entry.
    pub(super) fn error(&self, path: &str, source: io::Error) -> ExtractError {
        let path = path.to_owned();
        if let Some(limit) = self.over_cap.get() {
            ExtractError::StreamTooLarge { path, limit }
        } else if self.eof.get() || source.kind() == io::ErrorKind::UnexpectedEof {
            ExtractError::Truncated { path }
        } else if self.source_failed.get() {
            ExtractError::Io { path, source }
        } else {
            ExtractError::Malformed { path, source }
        }
    }
}

/// Counts what is read and fails once more than `cap` bytes come out of `inner`, so that huge
/// pax headers or padding cannot exhaust memory or time.
pub(super) struct Counted<R> {
    inner: R,
    cap: u64,
    state: Rc<StreamState>,
}

impl<R: Read> Counted<R> {
    pub(super) fn new(inner: R, cap: u64, state: Rc<StreamState>) -> Self {
        Self { inner, cap, state }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let done = self.state.read.get();
        // Ask for one byte past the cap, so that reaching it exactly is not an error.
        let room = self.cap.saturating_sub(done).saturating_add(1);
        let want = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want]).inspect_err(|e| {
            if e.kind() != io::ErrorKind::Interrupted {
                self.state.source_failed.set(true);
            }
        })?;
        if n == 0 {
            self.state.eof.set(true);
            return Ok(0);
        }
        let total = done + n as u64;
        self.state.read.set(total);
        if total > self.cap {
            self.state.over_cap.set(Some(self.cap));
            return Err(io::Error::other("decompressed stream over its limit"));
        }
        Ok(n)
    }
}

/// The process umask, read without changing it (`/proc/self/status`); all bits when unknown, so
/// that modes are then always set explicitly.
pub(super) fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Umask:")).and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o777)
}
