//! SHA-256 of file data on a dedicated thread, so hashing overlaps decompression and writing.
//!
//! The extraction thread sends filled chunks over a bounded channel and gets them back through a
//! pool once hashed, so memory stays at a few chunks whatever the archive size.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::thread::JoinHandle;

use sha2::{Digest as _, Sha256};

use crate::types::Digest;

/// Chunks in flight to the hasher.
const DEPTH: usize = 8;

enum Msg {
    /// The first `len` bytes of the chunk belong to the current file.
    Data(Box<[u8]>, usize),
    /// The current file is complete.
    End,
}

pub(super) struct Hasher {
    tx: Option<SyncSender<Msg>>,
    pool_tx: Sender<Box<[u8]>>,
    pool_rx: Receiver<Box<[u8]>>,
    allocated: usize,
    chunk: usize,
    thread: Option<JoinHandle<Vec<Digest>>>,
}

impl Hasher {
    pub(super) fn spawn(chunk: usize) -> Self {
        let (tx, rx) = mpsc::sync_channel::<Msg>(DEPTH);
        let (pool_tx, pool_rx) = mpsc::channel();
        let back = pool_tx.clone();
        let thread = std::thread::Builder::new()
            .name("extract-hash".into())
            .spawn(move || {
                let mut digests = Vec::new();
                let mut h = Sha256::new();
                while let Ok(msg) = rx.recv() {
                    match msg {
                        Msg::Data(buf, len) => {
                            h.update(&buf[..len]);
                            let _ = back.send(buf);
                        }
                        Msg::End => digests.push(Digest::from_hasher(std::mem::take(&mut h))),
                    }
                }
                digests
            })
            .ok();
        Self { tx: Some(tx), pool_tx, pool_rx, allocated: 0, chunk, thread }
    }

    /// A chunk to fill: a hashed one back from the pool, or a new one while few exist.
    pub(super) fn buffer(&mut self) -> Box<[u8]> {
        if let Ok(buf) = self.pool_rx.try_recv() {
            return buf;
        }
        if self.allocated < DEPTH + 2 || self.thread.is_none() {
            self.allocated += 1;
            return vec![0u8; self.chunk].into_boxed_slice();
        }
        self.pool_rx.recv().unwrap_or_else(|_| vec![0u8; self.chunk].into_boxed_slice())
    }

    /// Returns an unused chunk to the pool.
    pub(super) fn recycle(&mut self, buf: Box<[u8]>) {
        let _ = self.pool_tx.send(buf);
    }

    /// Hashes `buf[..len]` as the next bytes of the current file (a dead hasher shows in `finish`).
    pub(super) fn update(&mut self, buf: Box<[u8]>, len: usize) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::Data(buf, len));
        }
    }

    /// Ends the current file.
    pub(super) fn end_file(&mut self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Msg::End);
        }
    }

    /// Waits for the hasher; the digests of all files, in order.
    pub(super) fn finish(&mut self) -> io::Result<Vec<Digest>> {
        self.tx = None;
        self.thread
            .take()
            .ok_or_else(|| io::Error::other("hasher thread could not start"))?
            .join()
            .map_err(|_| io::Error::other("hasher thread panicked"))
    }
}

impl Drop for Hasher {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
