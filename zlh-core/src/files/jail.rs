//! [`Jail`]: file operations confined to one root directory through a `cap-std` [`Dir`].
//!
//! Paths are resolved from the root handle, never from the host path, so `..`, absolute symlinks
//! and relative symlinks that climb out are refused by cap-std (openat2 `RESOLVE_BENEATH` on Linux).
//! Operations on a final component (create, rename, remove) run on the opened parent directory with
//! a single name, which the kernel does not follow when it is a symlink.

use std::fs::File as StdFile;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use cap_std::ambient_authority;
use cap_std::fs::{Dir, Metadata, OpenOptions, OpenOptionsExt};
use futures::Stream;
use rustix::fs::{Gid, Mode, RenameFlags, Uid};
use tokio::io::AsyncWriteExt;

use super::upload::{copy_stream, CopyEnd};
use super::{is_reserved, random_hex, Entry, EntryKind, FileError, RelPath, TEMP_PREFIX, UPLOAD_PREFIX};

/// Mode of a new file (an existing file's mode is kept when it is replaced).
const NEW_FILE_MODE: u32 = 0o644;

/// A root directory and everything beneath it, and nothing else. Cheap to clone (one shared fd).
#[derive(Clone)]
pub struct Jail {
    inner: Arc<Inner>,
    /// Bytes the tree may hold (see [`Jail::with_quota`]).
    quota: Option<u64>,
}

struct Inner {
    root: Dir,
    root_path: PathBuf,
    owner: Option<(u32, u32)>,
}

impl std::fmt::Debug for Jail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jail").field("root", &self.inner.root_path).field("owner", &self.inner.owner).finish()
    }
}

/// A file being written beside its target; dropped before [`AtomicWrite::commit`], it removes
/// itself and the target is untouched.
pub struct AtomicWrite {
    dir: Dir,
    tmp: String,
    name: String,
    user: String,
    file: StdFile,
    mode: u32,
    owner: Option<(u32, u32)>,
    replace: bool,
    done: bool,
}

/// Where a write lands: the opened parent directory and the final name in it.
struct Target {
    dir: Dir,
    name: String,
    existing: Option<Metadata>,
}

impl Jail {
    /// Opens `root` (the only use of ambient authority). New files and directories are chowned to
    /// `owner` when given: the agent runs as root and the tree belongs to the dev user.
    pub fn open(root: &Path, owner: Option<(u32, u32)>) -> Result<Self, FileError> {
        let dir = Dir::open_ambient_dir(root, ambient_authority()).map_err(|e| FileError::from_io(".", e))?;
        Ok(Self { inner: Arc::new(Inner { root: dir, root_path: root.to_path_buf(), owner }), quota: None })
    }

    /// The bytes the files under this root may hold, open uploads included (the container's disk);
    /// uploads and writes check it through [`super::UploadManager::quota_free`].
    pub fn with_quota(mut self, quota_bytes: Option<u64>) -> Self {
        self.quota = quota_bytes;
        self
    }

    pub fn quota(&self) -> Option<u64> {
        self.quota
    }

    /// The host path the jail was opened on (for the agent's bookkeeping, never for users).
    pub fn root_path(&self) -> &Path {
        &self.inner.root_path
    }

    pub fn owner(&self) -> Option<(u32, u32)> {
        self.inner.owner
    }

    /// The entries of a directory, directories first then by name; the agent's temp files are hidden.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>, FileError> {
        let rel = RelPath::parse(path)?;
        let dir = self.dir(path, &rel)?;
        let mut entries = Vec::new();
        for ent in dir.entries().map_err(|e| FileError::from_io(path, e))? {
            let ent = ent.map_err(|e| FileError::from_io(path, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if is_reserved(&name) {
                continue;
            }
            match ent.metadata() {
                Ok(meta) => entries.push(entry(name, &meta)),
                // Removed between readdir and stat: not there any more.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(FileError::from_io(path, e)),
            }
        }
        entries.sort_by(|a, b| (a.kind != EntryKind::Dir, &a.name).cmp(&(b.kind != EntryKind::Dir, &b.name)));
        Ok(entries)
    }

    /// One entry, without following a final symlink.
    pub fn stat(&self, path: &str) -> Result<Entry, FileError> {
        let rel = RelPath::parse(path)?;
        let Some((parent, name)) = rel.split_last() else {
            let meta = self.inner.root.dir_metadata().map_err(|e| FileError::from_io(path, e))?;
            return Ok(entry(".".into(), &meta));
        };
        let dir = self.dir(path, &parent)?;
        let meta = dir.symlink_metadata(name).map_err(|e| FileError::from_io(path, e))?;
        Ok(entry(name.to_owned(), &meta))
    }

    /// Opens a regular file for streaming out; returns it with its length.
    pub fn open_read(&self, path: &str) -> Result<(StdFile, u64), FileError> {
        let rel = RelPath::parse(path)?;
        // Non-blocking so that a FIFO planted in the tree cannot hang the open.
        let mut opts = OpenOptions::new();
        opts.read(true).custom_flags(libc::O_NONBLOCK);
        let file = self.inner.root.open_with(rel.as_path(), &opts).map_err(|e| FileError::from_io(path, e))?;
        let meta = file.metadata().map_err(|e| FileError::from_io(path, e))?;
        if meta.is_dir() {
            return Err(FileError::IsADirectory { path: path.to_owned() });
        }
        if !meta.is_file() {
            return Err(FileError::invalid(path, "not a regular file"));
        }
        Ok((file.into_std(), meta.len()))
    }

    /// Creates a directory and any missing parents (no error when it already exists).
    pub fn mkdir(&self, path: &str) -> Result<(), FileError> {
        let rel = RelPath::parse(path)?;
        self.mkdir_all(path, &rel).map(drop)
    }

    /// Moves `from` to `to`, both inside the root. An existing `to` is replaced only when
    /// `overwrite` is set, and a directory is never replaced.
    pub fn rename(&self, from: &str, to: &str, overwrite: bool) -> Result<(), FileError> {
        let (from_rel, to_rel) = (RelPath::parse(from)?, RelPath::parse(to)?);
        let (from_parent, from_name) =
            from_rel.split_last().ok_or_else(|| FileError::invalid(from, "cannot move the files root"))?;
        let (to_parent, to_name) =
            to_rel.split_last().ok_or_else(|| FileError::invalid(to, "cannot replace the files root"))?;
        let from_dir = self.dir(from, &from_parent)?;
        let to_dir = self.dir(to, &to_parent)?;
        from_dir.symlink_metadata(from_name).map_err(|e| FileError::from_io(from, e))?;
        match to_dir.symlink_metadata(to_name) {
            Ok(meta) if meta.is_dir() && overwrite => return Err(FileError::IsADirectory { path: to.to_owned() }),
            Ok(_) if !overwrite => return Err(FileError::AlreadyExists { path: to.to_owned() }),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::from_io(to, e)),
        }
        rename_at(&from_dir, from_name, &to_dir, to_name, overwrite).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) => FileError::invalid(to, "cannot move a directory inside itself"),
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => FileError::AlreadyExists { path: to.to_owned() },
            Some(libc::ENOTDIR) | Some(libc::EISDIR) => FileError::from_io(to, e),
            _ => FileError::from_io(from, e),
        })?;
        sync(&to_dir, to)?;
        sync(&from_dir, from)
    }

    /// Removes a file, a symlink (not its target) or a directory (`recursive` for a non-empty one).
    pub fn remove(&self, path: &str, recursive: bool) -> Result<(), FileError> {
        let rel = RelPath::parse(path)?;
        let (parent, name) =
            rel.split_last().ok_or_else(|| FileError::invalid(path, "cannot delete the files root"))?;
        let dir = self.dir(path, &parent)?;
        let meta = dir.symlink_metadata(name).map_err(|e| FileError::from_io(path, e))?;
        let removed = if meta.is_dir() {
            if recursive {
                dir.remove_dir_all(name)
            } else {
                dir.remove_dir(name)
            }
        } else {
            dir.remove_file(name)
        };
        removed.map_err(|e| FileError::from_io(path, e))?;
        sync(&dir, path)
    }

    /// Starts an atomic replacement of `path` (its parent must exist). A symlink inside the root is
    /// written through; one that leads outside is refused.
    pub fn begin_write(&self, path: &str) -> Result<AtomicWrite, FileError> {
        let rel = RelPath::parse(path)?;
        let target = self.resolve_target(path, &rel, 0)?;
        self.begin_write_at(path, target, true)
    }

    /// Writes everything `reader` yields to `path` atomically, at most `max_bytes` bytes.
    pub fn write_atomic(&self, path: &str, reader: impl Read, max_bytes: u64) -> Result<u64, FileError> {
        let mut write = self.begin_write(path)?;
        let copied = io::copy(&mut reader.take(max_bytes.saturating_add(1)), &mut write.file)
            .map_err(|e| FileError::from_io(path, e))?;
        if copied > max_bytes {
            return Err(FileError::TooLarge { path: path.to_owned(), limit: max_bytes });
        }
        write.commit()
    }

    /// Streams `stream` into `path` atomically with constant memory. More than `max_bytes` is
    /// [`FileError::TooLarge`]; more than `quota_free` (when given) is [`FileError::QuotaExceeded`].
    /// On any error, or if the future is dropped, the old content stays and no temp file remains.
    pub async fn write_stream<S, B, E>(
        &self,
        path: &str,
        stream: S,
        max_bytes: u64,
        quota_free: Option<u64>,
    ) -> Result<u64, FileError>
    where
        S: Stream<Item = Result<B, E>>,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        let jail = self.clone();
        let owned = path.to_owned();
        let write = blocking(path, move || jail.begin_write(&owned)).await?;
        let mut file = tokio::fs::File::from_std(write.file.try_clone().map_err(|e| FileError::from_io(path, e))?);
        let limit = max_bytes.min(quota_free.unwrap_or(u64::MAX));
        let mut stream = std::pin::pin!(stream);
        let mut stop = std::future::pending();
        let (written, end) = copy_stream(&mut stream, &mut file, limit, u64::MAX, &mut stop, None).await;
        match end {
            CopyEnd::Done | CopyEnd::Paused => {}
            CopyEnd::OverLimit if limit == max_bytes => {
                return Err(FileError::TooLarge { path: path.to_owned(), limit: max_bytes })
            }
            CopyEnd::OverLimit => {
                let available = quota_free.unwrap_or(u64::MAX);
                return Err(FileError::QuotaExceeded { path: path.to_owned(), available });
            }
            CopyEnd::Stopped => unreachable!("a pending future never stops the copy"),
            CopyEnd::Source(reason) => return Err(FileError::Interrupted { path: path.to_owned(), written, reason }),
            CopyEnd::Sink(e) => return Err(FileError::from_io(path, e)),
        }
        file.flush().await.map_err(|e| FileError::from_io(path, e))?;
        drop(file);
        blocking(path, move || write.commit()).await
    }

    /// Bytes used by the regular files under the root (symlinks not followed, temps not counted).
    pub fn usage(&self) -> Result<u64, FileError> {
        let mut total = 0u64;
        self.walk(|_, name, meta| {
            if meta.is_file() && !is_reserved(name) {
                total = total.saturating_add(meta.len());
            }
        })?;
        Ok(total)
    }

    /// Removes leftovers of interrupted work: atomic-write temps last modified before `older_than`
    /// anywhere in the tree, and upload data in the root whose id `is_live` does not know.
    pub fn sweep_temps(&self, older_than: SystemTime, is_live: &dyn Fn(&str) -> bool) -> Result<usize, FileError> {
        let mut stale: Vec<(PathBuf, String)> = Vec::new();
        self.walk(|dir, name, meta| {
            let old = meta.modified().map(|t| t.into_std() < older_than).unwrap_or(true);
            let stale_temp = name.starts_with(TEMP_PREFIX) && old && !meta.is_dir();
            let orphan_upload = dir.as_os_str() == "."
                && name.strip_prefix(UPLOAD_PREFIX).is_some_and(|id| !is_live(id))
                && !meta.is_dir();
            if stale_temp || orphan_upload {
                stale.push((dir.to_path_buf(), name.to_owned()));
            }
        })?;
        let mut removed = 0;
        for (dir, name) in stale {
            let path = dir.join(&name);
            match self.inner.root.remove_file(&path) {
                Ok(()) => {
                    removed += 1;
                    tracing::info!(path = %path.display(), "removed a stale temp file");
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove a stale temp file"),
            }
        }
        Ok(removed)
    }

    /// Checks up front that an upload may later land on `path`: inside the root, not a directory,
    /// and not existing unless `overwrite`. Missing parent directories are fine (made at the end).
    /// Returns the size of the file it would replace.
    pub(crate) fn check_target(&self, path: &str, overwrite: bool) -> Result<(RelPath, u64), FileError> {
        let rel = RelPath::parse(path)?;
        let (parent, _) = rel.split_last().ok_or_else(|| FileError::IsADirectory { path: path.to_owned() })?;
        match self.dir(path, &parent) {
            Ok(_) => {}
            Err(FileError::NotFound { .. }) => return Ok((rel, 0)),
            Err(e) => return Err(e),
        }
        let target = self.resolve_target(path, &rel, 0)?;
        match target.existing {
            Some(_) if !overwrite => Err(FileError::AlreadyExists { path: path.to_owned() }),
            Some(meta) => Ok((rel, meta.len())),
            None => Ok((rel, 0)),
        }
    }

    /// Creates the hidden file an upload's bytes go to, in the root.
    pub(crate) fn create_upload_part(&self, id: &str) -> Result<StdFile, FileError> {
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let file = self.inner.root.open_with(upload_name(id), &opts).map_err(|e| FileError::from_io(".", e))?;
        let file = file.into_std();
        self.chown(&file).map_err(|e| FileError::from_io(".", e))?;
        file.sync_all().map_err(|e| FileError::from_io(".", e))?;
        sync(&self.inner.root, ".")?;
        Ok(file)
    }

    /// Opens an upload's hidden file to append to it.
    pub(crate) fn open_upload_part(&self, id: &str) -> Result<StdFile, FileError> {
        let mut opts = OpenOptions::new();
        opts.write(true).custom_flags(libc::O_NOFOLLOW);
        let file = self.inner.root.open_with(upload_name(id), &opts).map_err(|e| FileError::from_io(".", e))?;
        Ok(file.into_std())
    }

    /// Removes an upload's hidden file (gone already is fine).
    pub(crate) fn remove_upload_part(&self, id: &str) -> Result<(), FileError> {
        match self.inner.root.remove_file(upload_name(id)) {
            Ok(()) => sync(&self.inner.root, "."),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(FileError::from_io(".", e)),
        }
    }

    /// Puts a complete upload in place with one rename (parents made as needed); only when the
    /// target is on another filesystem than the root, it is copied aside and renamed instead.
    pub(crate) fn place_upload(&self, id: &str, path: &str, overwrite: bool) -> Result<u64, FileError> {
        let rel = RelPath::parse(path)?;
        let (parent, _) = rel.split_last().ok_or_else(|| FileError::IsADirectory { path: path.to_owned() })?;
        self.mkdir_all(path, &parent)?;
        let target = self.resolve_target(path, &rel, 0)?;
        if target.existing.is_some() && !overwrite {
            return Err(FileError::AlreadyExists { path: path.to_owned() });
        }
        let part_name = upload_name(id);
        let part = self.inner.root.open(&part_name).map_err(|e| FileError::from_io(path, e))?.into_std();
        let len = part.metadata().map_err(|e| FileError::from_io(path, e))?.len();
        let mode = target.existing.as_ref().map_or(NEW_FILE_MODE, mode_of);
        self.finish_file(&part, mode).map_err(|e| FileError::from_io(path, e))?;
        match rename_at(&self.inner.root, &part_name, &target.dir, &target.name, overwrite) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let mut write = self.begin_write_at(path, target, overwrite)?;
                io::copy(&mut &part, &mut write.file).map_err(|e| FileError::from_io(path, e))?;
                write.commit()?;
                return self.remove_upload_part(id).map(|()| len);
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(FileError::AlreadyExists { path: path.to_owned() })
            }
            Err(e) => return Err(FileError::from_io(path, e)),
        }
        sync(&target.dir, path)?;
        sync(&self.inner.root, path)?;
        Ok(len)
    }

    /// Opens the directory at `rel`, resolved from the root.
    fn dir(&self, user: &str, rel: &RelPath) -> Result<Dir, FileError> {
        let dir = if rel.is_root() { self.inner.root.try_clone() } else { self.inner.root.open_dir(rel.as_path()) };
        dir.map_err(|e| FileError::from_io(user, e))
    }

    /// Like `create_dir_all`, chowning each directory it creates; returns the last one.
    fn mkdir_all(&self, user: &str, rel: &RelPath) -> Result<Dir, FileError> {
        let mut cur = self.dir(user, &RelPath::parse("").expect("the root parses"))?;
        let mut prefix = PathBuf::new();
        for part in rel.parts() {
            prefix.push(part);
            match cur.create_dir(part) {
                Ok(()) => {
                    if self.inner.owner.is_some() {
                        let made = readable(&cur, part).map_err(|e| FileError::from_io(user, e))?;
                        self.chown(&made).map_err(|e| FileError::from_io(user, e))?;
                    }
                    sync(&cur, user)?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(FileError::from_io(user, e)),
            }
            // From the root, so that a symlink to elsewhere in the tree resolves like in every other
            // operation (and one leading out is refused).
            cur = self.inner.root.open_dir(&prefix).map_err(|e| FileError::from_io(user, e))?;
        }
        Ok(cur)
    }

    /// The directory and name a write to `rel` lands on. A final symlink that stays inside the
    /// root is followed (once), so saving through it keeps the link.
    fn resolve_target(&self, user: &str, rel: &RelPath, depth: u8) -> Result<Target, FileError> {
        let (parent, name) = rel.split_last().ok_or_else(|| FileError::IsADirectory { path: user.to_owned() })?;
        let dir = self.dir(user, &parent)?;
        match dir.symlink_metadata(name) {
            Ok(meta) if meta.is_symlink() => {
                if depth > 0 {
                    return Err(FileError::invalid(user, "too many levels of symbolic links"));
                }
                let real = self.inner.root.canonicalize(rel.as_path()).map_err(|e| FileError::from_io(user, e))?;
                let real = real.to_str().ok_or_else(|| FileError::invalid(user, "link target is not UTF-8"))?;
                let real = RelPath::parse(real).map_err(|_| FileError::Escape { path: user.to_owned() })?;
                self.resolve_target(user, &real, depth + 1)
            }
            Ok(meta) if meta.is_dir() => Err(FileError::IsADirectory { path: user.to_owned() }),
            Ok(meta) if !meta.is_file() => Err(FileError::invalid(user, "not a regular file")),
            Ok(meta) => Ok(Target { dir, name: name.to_owned(), existing: Some(meta) }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Target { dir, name: name.to_owned(), existing: None }),
            Err(e) => Err(FileError::from_io(user, e)),
        }
    }

    fn begin_write_at(&self, user: &str, target: Target, replace: bool) -> Result<AtomicWrite, FileError> {
        let tmp = format!("{TEMP_PREFIX}{}", random_hex());
        let mut opts = OpenOptions::new();
        opts.write(true).create_new(true).mode(0o600);
        let file = target.dir.open_with(&tmp, &opts).map_err(|e| FileError::from_io(user, e))?.into_std();
        Ok(AtomicWrite {
            mode: target.existing.as_ref().map_or(NEW_FILE_MODE, mode_of),
            dir: target.dir,
            tmp,
            name: target.name,
            user: user.to_owned(),
            file,
            owner: self.inner.owner,
            replace,
            done: false,
        })
    }

    /// Final mode and owner, then data on disk: before the rename that makes the file visible.
    fn finish_file(&self, file: &StdFile, mode: u32) -> io::Result<()> {
        rustix::fs::fchmod(file, Mode::from_raw_mode(mode))?;
        self.chown(file)?;
        file.sync_all()
    }

    fn chown(&self, fd: impl AsFd) -> io::Result<()> {
        chown_to(fd, self.inner.owner)
    }

    /// Visits every entry under the root (`dir` relative to the root, `.` for the root itself)
    /// without following symlinks. Entries that vanish or cannot be read are skipped.
    fn walk(&self, mut visit: impl FnMut(&Path, &str, &Metadata)) -> Result<(), FileError> {
        let mut pending = vec![PathBuf::from(".")];
        while let Some(rel) = pending.pop() {
            let dir =
                match if rel.as_os_str() == "." { self.inner.root.try_clone() } else { self.inner.root.open_dir(&rel) }
                {
                    Ok(dir) => dir,
                    Err(e) if rel.as_os_str() == "." => return Err(FileError::from_io(".", e)),
                    Err(_) => continue,
                };
            let Ok(entries) = dir.entries() else { continue };
            for ent in entries.flatten() {
                let name = ent.file_name().to_string_lossy().into_owned();
                let Ok(meta) = ent.metadata() else { continue };
                if meta.is_dir() && !is_reserved(&name) {
                    pending.push(if rel.as_os_str() == "." { PathBuf::from(&name) } else { rel.join(&name) });
                }
                visit(&rel, &name, &meta);
            }
        }
        Ok(())
    }
}

impl AtomicWrite {
    /// The temp file to fill.
    pub fn file(&mut self) -> &mut StdFile {
        &mut self.file
    }

    /// Sets mode and owner, fsyncs, renames over the target and fsyncs the directory.
    /// Returns the size written.
    pub fn commit(mut self) -> Result<u64, FileError> {
        let user = self.user.clone();
        let io_err = |e| FileError::from_io(&user, e);
        rustix::fs::fchmod(&self.file, Mode::from_raw_mode(self.mode)).map_err(|e| io_err(e.into()))?;
        chown_to(&self.file, self.owner).map_err(io_err)?;
        self.file.flush().map_err(io_err)?;
        self.file.sync_all().map_err(io_err)?;
        let len = self.file.metadata().map_err(io_err)?.len();
        rename_at(&self.dir, &self.tmp, &self.dir, &self.name, self.replace).map_err(io_err)?;
        self.done = true;
        sync(&self.dir, &user)?;
        tracing::debug!(path = %user, size = len, "file written");
        Ok(len)
    }
}

impl Drop for AtomicWrite {
    fn drop(&mut self) {
        if !self.done {
            let _ = self.dir.remove_file(&self.tmp);
        }
    }
}

fn entry(name: String, meta: &Metadata) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryKind::Symlink
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    };
    Entry { name, kind, size: meta.len(), modified: meta.modified().ok().map(|t| t.into_std()) }
}

fn mode_of(meta: &Metadata) -> u32 {
    use cap_std::fs::PermissionsExt;
    meta.permissions().mode() & 0o777
}

fn upload_name(id: &str) -> String {
    format!("{UPLOAD_PREFIX}{id}")
}

fn chown_to(fd: impl AsFd, owner: Option<(u32, u32)>) -> io::Result<()> {
    if let Some((uid, gid)) = owner {
        rustix::fs::fchown(fd, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))?;
    }
    Ok(())
}

/// Renames one name to another in opened directories; without `replace` an existing target is an
/// `EEXIST` error, decided by the kernel (renameat2 `RENAME_NOREPLACE`) rather than a racy check.
fn rename_at(from_dir: &Dir, from: &str, to_dir: &Dir, to: &str, replace: bool) -> io::Result<()> {
    if replace {
        return Ok(rustix::fs::renameat(from_dir, from, to_dir, to)?);
    }
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        // A filesystem without RENAME_NOREPLACE (or a directory moved inside itself, which the
        // plain rename refuses the same way): check, then rename.
        Err(rustix::io::Errno::INVAL) => match rustix::fs::statat(to_dir, to, rustix::fs::AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Err(io::Error::from_raw_os_error(libc::EEXIST)),
            Err(_) => Ok(rustix::fs::renameat(from_dir, from, to_dir, to)?),
        },
        other => Ok(other?),
    }
}

/// fsync a directory so creates, renames and removals in it survive a crash.
fn sync(dir: &Dir, user: &str) -> Result<(), FileError> {
    let fd = readable(dir, ".").map_err(|e| FileError::from_io(user, e))?;
    rustix::fs::fsync(&fd).map_err(|e| FileError::from_io(user, e.into()))
}

/// A directory opened for reading: cap-std holds directories as `O_PATH` handles, which serve
/// `*at` calls but not fsync or fchown.
fn readable(dir: &Dir, name: &str) -> io::Result<StdFile> {
    let mut opts = OpenOptions::new();
    opts.read(true).custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW);
    Ok(dir.open_with(name, &opts)?.into_std())
}

/// Runs blocking filesystem work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    user: &str,
    f: impl FnOnce() -> Result<T, FileError> + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FileError::Io { path: user.to_owned(), source: io::Error::other(e) })?
}
