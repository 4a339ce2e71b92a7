//! Safe extraction of runtime artifacts into a fresh staging directory.
//!
//! Artifacts come from a store we do not fully control, so an archive is treated as hostile input:
//! one bad entry refuses the WHOLE archive (the installer then deletes the staging directory). The
//! `tar` crate is used only to parse headers and read entry data; every check and every write is
//! ours, because its `unpack_in` silently skips entries it considers unsafe and would leave a
//! partial install behind.
//!
//! What is refused, each with its own [`ExtractError`] variant: absolute paths, `..`, empty or
//! over-long names, the reserved [`MANIFEST_NAME`], duplicate paths, writes through a symlink or
//! a non-directory, symlinks that are absolute or resolve outside the destination (following the
//! archive's other symlinks), hard links to anything but a regular file extracted earlier, device
//! nodes, FIFOs and other special entries, setuid/setgid bits, more bytes or more entries than
//! the catalog declares, an over-long decompressed stream and a stream that ends early.
//!
//! Every created path and its kind is tracked in memory ([`tree`]): the destination is fresh and
//! only we write into it, so the in-memory view is the truth and no per-entry `stat` is needed.
//! File digests for the manifest are computed on a separate thread ([`hasher`]) so hashing does
//! not slow down decompression and writing.

use std::fs::OpenOptions;
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use crate::catalog::ArchiveFormat;
use crate::runtime::layout::{ManifestEntry, MANIFEST_NAME};

mod hasher;
mod stream;
mod tree;

use hasher::Hasher;
use stream::{Counted, StreamState};
use tree::{Node, Tree};

/// Size of the chunks file data is read, written and hashed in.
const CHUNK: usize = 256 * 1024;
/// Longest accepted path or link target, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest accepted path component, in bytes (Linux `NAME_MAX`).
pub const MAX_COMPONENT: usize = 255;
/// Tar framing a legitimate entry may need on top of its data: header, padding, long-name headers.
const OVERHEAD_PER_ENTRY: u64 = 4096;
/// Slack for the end-of-archive blocks, record padding and global headers.
const OVERHEAD_FIXED: u64 = 1 << 20;
/// Mode of directories the archive implies but does not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;
/// Mode of a single-file artifact.
const SINGLE_FILE_MODE: u32 = 0o644;

/// What the catalog says an artifact unpacks to; more is a decompression bomb.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of regular-file data.
    pub max_unpacked_bytes: u64,
    /// Filesystem objects created: files, hard links, directories (listed or implied), symlinks.
    pub max_entries: u64,
}

impl Limits {
    /// No limits (for [`inspect`], which reads a trusted local file).
    pub const UNLIMITED: Limits = Limits { max_unpacked_bytes: u64::MAX, max_entries: u64::MAX };

    /// The most decompressed bytes a tar stream within these limits can need.
    pub fn max_stream_bytes(&self) -> u64 {
        self.max_unpacked_bytes
            .saturating_add(self.max_entries.saturating_mul(OVERHEAD_PER_ENTRY))
            .saturating_add(OVERHEAD_FIXED)
    }
}

/// What an extraction produced, in archive order (implied directories before their first child).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub entries: Vec<ManifestEntry>,
    /// Regular-file bytes written (hard links add none).
    pub unpacked_bytes: u64,
}

/// Why an archive was refused. `path` is the offending entry's path as the archive spells it
/// (for stream-level errors: the last entry read, or empty before the first).
#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    #[error("entry {path:?}: absolute path")]
    AbsolutePath { path: String },
    #[error("entry {path:?}: `..` component")]
    ParentComponent { path: String },
    #[error("entry {path:?}: empty path")]
    EmptyPath { path: String },
    #[error("entry {path:?}: path longer than {MAX_PATH} bytes or a component longer than {MAX_COMPONENT}")]
    PathTooLong { path: String },
    #[error("entry {path:?}: invalid name ({reason})")]
    InvalidName { path: String, reason: &'static str },
    #[error("entry {path:?}: reserved name {MANIFEST_NAME}")]
    ReservedName { path: String },
    #[error("entry {path:?}: duplicate path")]
    Duplicate { path: String },
    #[error("entry {path:?}: parent {parent:?} is a symlink")]
    ThroughSymlink { path: String, parent: String },
    #[error("entry {path:?}: parent {parent:?} is not a directory")]
    NotADirectory { path: String, parent: String },
    #[error("entry {path:?}: empty link target")]
    EmptyLinkTarget { path: String },
    #[error("entry {path:?}: symlink to absolute path {target:?}")]
    AbsoluteSymlink { path: String, target: String },
    #[error("entry {path:?}: symlink to {target:?} resolves outside the destination")]
    SymlinkEscapes { path: String, target: String },
    #[error("entry {path:?}: symlink to {target:?} does not resolve (too many levels of links)")]
    SymlinkLoop { path: String, target: String },
    #[error("entry {path:?}: hard link to {target:?} outside the archive")]
    HardLinkOutside { path: String, target: String },
    #[error("entry {path:?}: hard link to {target:?}, which is not a regular file extracted earlier")]
    HardLinkTarget { path: String, target: String },
    #[error("entry {path:?}: device node")]
    DeviceNode { path: String },
    #[error("entry {path:?}: FIFO")]
    Fifo { path: String },
    #[error("entry {path:?}: unsupported entry type {kind:?}")]
    UnsupportedType { path: String, kind: char },
    #[error("entry {path:?}: setuid/setgid mode {mode:o}")]
    SetId { path: String, mode: u32 },
    #[error("entry {path:?}: more than the declared {limit} unpacked bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("entry {path:?}: more than the declared {limit} entries")]
    TooManyEntries { path: String, limit: u64 },
    #[error("after entry {path:?}: decompressed stream longer than {limit} bytes")]
    StreamTooLarge { path: String, limit: u64 },
    #[error("entry {path:?}: stream ends early")]
    Truncated { path: String },
    #[error("entry {path:?}: malformed archive: {source}")]
    Malformed {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("entry {path:?}: I/O error: {source}")]
    Io {
        path: String,
        #[source]
        source: io::Error,
    },
}

impl ExtractError {
    /// The entry the error is about.
    pub fn path(&self) -> &str {
        use ExtractError::*;
        match self {
            AbsolutePath { path }
            | ParentComponent { path }
            | EmptyPath { path }
            | PathTooLong { path }
            | InvalidName { path, .. }
            | ReservedName { path }
            | Duplicate { path }
            | ThroughSymlink { path, .. }
            | NotADirectory { path, .. }
            | EmptyLinkTarget { path }
            | AbsoluteSymlink { path, .. }
            | SymlinkEscapes { path, .. }
            | SymlinkLoop { path, .. }
            | HardLinkOutside { path, .. }
            | HardLinkTarget { path, .. }
            | DeviceNode { path }
            | Fifo { path }
            | UnsupportedType { path, .. }
            | SetId { path, .. }
            | TooLarge { path, .. }
            | TooManyEntries { path, .. }
            | StreamTooLarge { path, .. }
            | Truncated { path }
            | Malformed { path, .. }
            | Io { path, .. } => path,
        }
    }

    fn io(path: &str) -> impl FnOnce(io::Error) -> ExtractError + '_ {
        move |source| ExtractError::Io { path: path.to_owned(), source }
    }
}

/// Wraps a compressed reader in the right streaming decoder (`File` is passed through as is).
pub fn decoder<'a>(format: ArchiveFormat, reader: impl Read + 'a) -> Result<Box<dyn Read + 'a>, ExtractError> {
    Ok(match format {
        ArchiveFormat::TarZst => Box::new(zstd::stream::read::Decoder::new(reader).map_err(ExtractError::io(""))?),
        // Multi-member aware: a valid gzip file may hold several members (e.g. concatenated).
        ArchiveFormat::TarGz => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(CHUNK, reader))),
        ArchiveFormat::File => Box::new(reader),
    })
}

/// Extracts a decompressed tar stream into `dest` (which must exist and be empty), entry by entry,
/// refusing the whole archive on the first unsafe entry. On error, `dest` may hold a partial
/// extraction (never anything outside it); the caller deletes it.
pub fn extract_tar(reader: impl Read, dest: &Path, limits: &Limits) -> Result<Extracted, ExtractError> {
    let mut sink = DiskSink::new(dest);
    let walked = walk(reader, limits, &mut sink)?;
    let digests = sink.digests(walked.tree.file_count())?;
    Ok(Extracted { entries: walked.tree.into_manifest(&digests), unpacked_bytes: walked.unpacked_bytes })
}

/// Installs a single-file artifact (format `file`) as `dest/<file_name>`, mode 0644, with the same
/// size and entry limits as archives.
pub fn extract_file(
    reader: impl Read,
    dest: &Path,
    file_name: &str,
    limits: &Limits,
) -> Result<Extracted, ExtractError> {
    let path = tree::normalize(file_name.as_bytes())?;
    if path.is_empty() || path.contains('/') {
        return Err(ExtractError::InvalidName { path: file_name.to_owned(), reason: "not a single file name" });
    }
    let mut tree = Tree::new(limits.max_entries);
    tree.add_file(&path, 0, SINGLE_FILE_MODE)?;
    let state = Rc::new(StreamState::default());
    let mut data = Counted::new(reader, u64::MAX, state.clone());
    let mut sink = DiskSink::new(dest);
    let size = sink
        .file(&path, SINGLE_FILE_MODE, &mut data, limits.max_unpacked_bytes)
        .map_err(|e| e.into_error(&path, &state, limits))?;
    let digests = sink.digests(1)?;
    let entry = ManifestEntry::File { path, size, sha256: digests[0], mode: SINGLE_FILE_MODE };
    Ok(Extracted { entries: vec![entry], unpacked_bytes: size })
}

/// Counts what an archive would unpack to, `(unpacked_bytes, entries)`, without writing anything,
/// applying every check extraction applies. The counts are the ones [`extract_tar`] reports (and
/// checks against [`Limits`]): regular-file bytes and manifest entries.
pub fn inspect(format: ArchiveFormat, reader: impl Read) -> Result<(u64, u64), ExtractError> {
    let reader = decoder(format, reader)?;
    if format == ArchiveFormat::File {
        let mut counted = Counted::new(reader, u64::MAX, Rc::new(StreamState::default()));
        let bytes = io::copy(&mut counted, &mut io::sink()).map_err(ExtractError::io(""))?;
        return Ok((bytes, 1));
    }
    let walked = walk(reader, &Limits::UNLIMITED, &mut NullSink)?;
    Ok((walked.unpacked_bytes, walked.tree.len() as u64))
}

/// The result of walking an archive.
struct Walked {
    tree: Tree,
    unpacked_bytes: u64,
}

/// Why writing one file's data failed.
enum FileError {
    Read(io::Error),
    Write(io::Error),
    TooLarge,
}

impl FileError {
    fn into_error(self, path: &str, state: &StreamState, limits: &Limits) -> ExtractError {
        match self {
            FileError::Read(e) => state.error(path, e),
            FileError::Write(source) => ExtractError::Io { path: path.to_owned(), source },
            FileError::TooLarge => ExtractError::TooLarge { path: path.to_owned(), limit: limits.max_unpacked_bytes },
        }
    }
}

/// Where checked entries go: the disk, or nowhere (for [`inspect`]).
trait Sink {
    fn dir(&mut self, path: &str, mode: u32, exists: bool) -> Result<(), ExtractError>;
    /// Copies `data` into a new file; fails with `TooLarge` past `budget` bytes. Returns the size.
    fn file(&mut self, path: &str, mode: u32, data: &mut dyn Read, budget: u64) -> Result<u64, FileError>;
    fn symlink(&mut self, path: &str, target: &str) -> Result<(), ExtractError>;
    fn hard_link(&mut self, path: &str, target: &str) -> Result<(), ExtractError>;
}

/// The one loop over archive entries: every check happens here or in [`Tree`].
fn walk(reader: impl Read, limits: &Limits, sink: &mut impl Sink) -> Result<Walked, ExtractError> {
    let state = Rc::new(StreamState::default());
    let counted = Counted::new(reader, limits.max_stream_bytes(), state.clone());
    // Buffered for the 512-byte header reads; large data reads bypass the buffer.
    let mut archive = tar::Archive::new(BufReader::with_capacity(64 * 1024, counted));
    let mut tree = Tree::new(limits.max_entries);
    let mut unpacked: u64 = 0;
    let mut last = String::new();

    let entries = archive.entries().map_err(|e| state.error(&last, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| state.error(&last, e))?;
        let header = entry.header();
        let kind = header.entry_type();
        last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let raw = last.clone();
        if kind.is_pax_global_extensions() {
            continue; // archive-wide metadata (e.g. `git archive`'s commit id); nothing to create
        }
        let mode = header.mode().map_err(|source| ExtractError::Malformed { path: raw.clone(), source })?;
        if mode & 0o6000 != 0 {
            return Err(ExtractError::SetId { path: raw, mode });
        }
        let path = tree::normalize(&entry.path_bytes())?;
        if path.is_empty() {
            // `./`, as `tar -C dir .` writes it: the destination itself, which already exists.
            if kind.is_dir() {
                continue;
            }
            return Err(ExtractError::EmptyPath { path: raw });
        }
        match kind {
            tar::EntryType::Directory => {
                let mode = dir_mode(mode);
                create_parents(&mut tree, sink, &path)?;
                let exists = tree.add_dir(&path, mode)?;
                sink.dir(&path, mode, exists)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                let budget = limits.max_unpacked_bytes - unpacked;
                if size > budget {
                    return Err(ExtractError::TooLarge { path: raw, limit: limits.max_unpacked_bytes });
                }
                let mode = mode & 0o777;
                create_parents(&mut tree, sink, &path)?;
                tree.add_file(&path, size, mode)?;
                let written =
                    sink.file(&path, mode, &mut entry, budget).map_err(|e| e.into_error(&raw, &state, limits))?;
                if written != size {
                    return Err(ExtractError::Truncated { path: raw });
                }
                unpacked += written;
            }
            tar::EntryType::Symlink => {
                let target = link_target(&entry, &raw)?;
                if target.starts_with('/') {
                    return Err(ExtractError::AbsoluteSymlink { path: raw, target });
                }
                create_parents(&mut tree, sink, &path)?;
                tree.add(&path, Node::Symlink { target: target.clone() })?;
                sink.symlink(&path, &target)?;
            }
            tar::EntryType::Link => {
                let target = link_target(&entry, &raw)?;
                let target = match tree::normalize(target.as_bytes()) {
                    Ok(t) if !t.is_empty() => t,
                    Ok(_) => return Err(ExtractError::HardLinkTarget { path: raw, target }),
                    Err(_) => return Err(ExtractError::HardLinkOutside { path: raw, target }),
                };
                let node = match tree.get(&target) {
                    Some(node @ Node::File { .. }) => node.clone(),
                    _ => return Err(ExtractError::HardLinkTarget { path: raw, target }),
                };
                create_parents(&mut tree, sink, &path)?;
                tree.add(&path, node)?;
                sink.hard_link(&path, &target)?;
            }
            tar::EntryType::Char | tar::EntryType::Block => return Err(ExtractError::DeviceNode { path: raw }),
            tar::EntryType::Fifo => return Err(ExtractError::Fifo { path: raw }),
            other => return Err(ExtractError::UnsupportedType { path: raw, kind: other.as_byte() as char }),
        }
    }

    // The tar crate takes EOF at a header boundary as the end; a real archive has zero blocks.
    if state.eof() {
        return Err(ExtractError::Truncated { path: last });
    }
    // Read the rest (zero padding), so that the decoder checks its own end and the whole
    // artifact passes through the caller's digest.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| state.error(&last, e))?;

    tree.check_symlinks()?;
    Ok(Walked { tree, unpacked_bytes: unpacked })
}

/// Checks the parents of `path` and creates the ones the archive implies without listing.
fn create_parents(tree: &mut Tree, sink: &mut impl Sink, path: &str) -> Result<(), ExtractError> {
    for dir in tree.add_parents(path)? {
        sink.dir(&dir, IMPLICIT_DIR_MODE, false)?;
    }
    Ok(())
}

fn dir_mode(mode: u32) -> u32 {
    (mode & 0o777) | 0o700
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>, path: &str) -> Result<String, ExtractError> {
    let bytes = entry.link_name_bytes().unwrap_or_default();
    if bytes.is_empty() {
        return Err(ExtractError::EmptyLinkTarget { path: path.to_owned() });
    }
    tree::check_name(&bytes, path)
}

/// Writes into the destination directory and hashes file data on a separate thread.
struct DiskSink {
    dest: PathBuf,
    umask: u32,
    hasher: Hasher,
}

impl DiskSink {
    fn new(dest: &Path) -> Self {
        Self { dest: dest.to_owned(), umask: stream::umask(), hasher: Hasher::spawn(CHUNK) }
    }
}

impl DiskSink {
    /// Waits for the hasher: the digests of the `files` files written, in order.
    fn digests(&mut self, files: usize) -> Result<Vec<crate::types::Digest>, ExtractError> {
        let digests = self.hasher.finish().map_err(ExtractError::io(""))?;
        if digests.len() != files {
            return Err(ExtractError::Io { path: String::new(), source: io::Error::other("hasher lost file data") });
        }
        Ok(digests)
    }
}

impl Sink for DiskSink {
    fn dir(&mut self, path: &str, mode: u32, exists: bool) -> Result<(), ExtractError> {
        let full = self.dest.join(path);
        if !exists {
            std::fs::DirBuilder::new().mode(mode).create(&full).map_err(ExtractError::io(path))?;
        }
        // The umask may have taken bits away; put them back only when it did.
        if exists || mode & self.umask != 0 {
            std::fs::set_permissions(&full, PermissionsExt::from_mode(mode)).map_err(ExtractError::io(path))?;
        }
        Ok(())
    }

    fn file(&mut self, path: &str, mode: u32, data: &mut dyn Read, budget: u64) -> Result<u64, FileError> {
        // Parents are directories we created, so this cannot leave `dest`; `create_new` and
        // `O_NOFOLLOW` are defence in depth.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(self.dest.join(path))
            .map_err(FileError::Write)?;
        if mode & self.umask != 0 {
            file.set_permissions(PermissionsExt::from_mode(mode)).map_err(FileError::Write)?;
        }
        let mut written: u64 = 0;
        loop {
            let mut buf = self.hasher.buffer();
            let n = read_full(data, &mut buf).map_err(FileError::Read)?;
            if n == 0 {
                self.hasher.recycle(buf);
                break;
            }
            written += n as u64;
            if written > budget {
                return Err(FileError::TooLarge);
            }
            file.write_all(&buf[..n]).map_err(FileError::Write)?;
            self.hasher.update(buf, n);
        }
        self.hasher.end_file();
        start_writeback(&file);
        Ok(written)
    }

    fn symlink(&mut self, path: &str, target: &str) -> Result<(), ExtractError> {
        std::os::unix::fs::symlink(target, self.dest.join(path)).map_err(ExtractError::io(path))
    }

    fn hard_link(&mut self, path: &str, target: &str) -> Result<(), ExtractError> {
        std::fs::hard_link(self.dest.join(target), self.dest.join(path)).map_err(ExtractError::io(path))
    }
}

/// Asks the kernel to start writing this file's pages to disk now, without waiting. The installer
/// makes the whole install durable once before committing; starting writeback per file overlaps
/// the disk writes with extraction instead of doing them all at that final flush.
fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid open fd; SYNC_FILE_RANGE_WRITE only schedules writeback and touches no memory.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "sync_file_range not available");
    }
}

/// Checks only; reads file data to count it.
struct NullSink;

impl Sink for NullSink {
    fn dir(&mut self, _: &str, _: u32, _: bool) -> Result<(), ExtractError> {
        Ok(())
    }
    fn file(&mut self, _: &str, _: u32, data: &mut dyn Read, budget: u64) -> Result<u64, FileError> {
        let n = io::copy(data, &mut io::sink()).map_err(FileError::Read)?;
        if n > budget {
            return Err(FileError::TooLarge);
        }
        Ok(n)
    }
    fn symlink(&mut self, _: &str, _: &str) -> Result<(), ExtractError> {
        Ok(())
    }
    fn hard_link(&mut self, _: &str, _: &str) -> Result<(), ExtractError> {
        Ok(())
    }
}

/// Reads until `buf` is full or the reader is exhausted.
fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
