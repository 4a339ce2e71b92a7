//! Mods and plugins of a game server: the jars in one directory of the server root (`mods/` for
//! modded loaders, `plugins/` for Paper and Spigot).
//!
//! Installs stream from the artifact store into a hidden file in that directory while hashing, so
//! memory stays constant and a wrong digest leaves nothing behind; only a verified, fsynced file is
//! renamed into place. Disabling follows the Minecraft convention of renaming `x.jar` to
//! `x.jar.disabled` in the same directory, which loaders skip. File digests are cached in a small
//! hidden index keyed by name, size, inode and mtime, so listing does not re-hash every jar.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::sync::Mutex;
use zlh_core::artifact::{ArtifactError, ArtifactStoreExt, DynStore};
use zlh_core::types::InvalidValue;
use zlh_core::{atomic, ArtifactKey, Digest};

/// Appended to a disabled mod's file name; loaders only load `*.jar`.
pub const DISABLED_SUFFIX: &str = ".disabled";
/// The digest cache, hidden so that neither loaders nor [`ModManager::list`] take it for a mod.
const INDEX_FILE: &str = ".zlh-mods.json";
/// Extensions accepted by default.
pub const DEFAULT_EXTENSIONS: [&str; 2] = [".jar", ".zip"];
/// Largest mod accepted by default when the request does not state a size.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;
const MAX_NAME_BYTES: usize = 200;

/// One mod as listed: `name` is always the enabled form (`x.jar`), whatever its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModEntry {
    pub name: String,
    pub enabled: bool,
    pub size: u64,
    pub sha256: Digest,
}

/// What to install: an artifact of the store and the digest its catalog gives for it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstallRequest {
    /// Artifact key in the store (`mods/fabric-api/0.100.0/fabric-api.jar`).
    pub key: String,
    pub sha256: Digest,
    /// File name in the mods dir; default: the key's last segment.
    #[serde(default)]
    pub name: Option<String>,
    /// Expected size; the download stops as soon as it is exceeded.
    #[serde(default)]
    pub size: Option<u64>,
    /// Replace a mod of the same name (keeping its enabled or disabled state).
    #[serde(default)]
    pub replace: bool,
}

#[derive(Debug)]
pub enum ModError {
    InvalidName {
        name: String,
        reason: String,
    },
    InvalidKey(InvalidValue),
    NotFound {
        name: String,
    },
    Exists {
        name: String,
    },
    /// Both `x.jar` and `x.jar.disabled` exist: someone made them by hand; the user must choose.
    BothStates {
        name: String,
    },
    DigestMismatch {
        key: String,
        expected: Digest,
        actual: Digest,
    },
    SizeMismatch {
        key: String,
        expected: u64,
        actual: u64,
    },
    TooLarge {
        key: String,
        max: u64,
    },
    /// The mod does not fit in what the server's disk quota leaves.
    QuotaExceeded {
        key: String,
        available: u64,
    },
    Store(ArtifactError),
    Io {
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for ModError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModError::InvalidName { name, reason } => write!(f, "invalid mod file name {name:?}: {reason}"),
            ModError::InvalidKey(e) => e.fmt(f),
            ModError::NotFound { name } => write!(f, "no mod named {name:?}"),
            ModError::Exists { name } => write!(f, "mod {name:?} already exists; pass replace to overwrite it"),
            ModError::BothStates { name } => {
                write!(f, "both {name} and {name}{DISABLED_SUFFIX} exist; remove one of them first")
            }
            ModError::DigestMismatch { key, expected, actual } => {
                write!(f, "artifact {key} digest mismatch: expected {expected}, got {actual}")
            }
            ModError::SizeMismatch { key, expected, actual } => {
                write!(f, "artifact {key} size mismatch: expected {expected} bytes, got {actual}")
            }
            ModError::TooLarge { key, max } => write!(f, "artifact {key} is larger than the {max} bytes allowed"),
            ModError::QuotaExceeded { key, available } => {
                write!(f, "artifact {key} does not fit in the disk quota ({available} bytes free)")
            }
            ModError::Store(e) => e.fmt(f),
            ModError::Io { path, source } => write!(f, "I/O error at {}: {source}", path.display()),
        }
    }
}

impl std::error::Error for ModError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ModError::Store(e) => Some(e),
            ModError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ModError + '_ {
    move |source| ModError::Io { path: path.to_path_buf(), source }
}

/// Manages the mods of one directory. Build one per directory and share it: it serializes the
/// renames and index updates of its callers.
pub struct ModManager {
    dir: PathBuf,
    store: DynStore,
    /// uid and gid that installed files (and a created dir) are given: the game server's user.
    owner: Option<(u32, u32)>,
    /// Accepted file name endings; empty accepts any.
    extensions: Vec<String>,
    max_bytes: u64,
    lock: Mutex<()>,
}

impl ModManager {
    /// A manager for `dir`; removes install leftovers of processes that died mid-download.
    pub fn new(dir: impl Into<PathBuf>, store: DynStore) -> Self {
        let dir = dir.into();
        remove_dead_partials(&dir);
        Self {
            dir,
            store,
            owner: None,
            extensions: DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect(),
            max_bytes: DEFAULT_MAX_BYTES,
            lock: Mutex::new(()),
        }
    }

    pub fn with_owner(mut self, uid: u32, gid: u32) -> Self {
        self.owner = Some((uid, gid));
        self
    }

    /// Every mod, enabled or not, sorted by name. Digests come from the index when the file is
    /// unchanged, else they are computed and the index updated.
    pub async fn list(&self) -> Result<Vec<ModEntry>, ModError> {
        let _guard = self.lock.lock().await;
        let (dir, extensions) = (self.dir.clone(), self.extensions.clone());
        blocking(move || list_dir(&dir, &extensions)).await
    }

    /// Streams an artifact into the mods dir, checking its digest; see the module docs. At most
    /// `quota_free` bytes are taken (`None`: no quota): a stated size beyond it is refused before
    /// the download, an artifact that grows beyond it as it arrives.
    pub async fn install(&self, req: InstallRequest, quota_free: Option<u64>) -> Result<ModEntry, ModError> {
        let key = ArtifactKey::parse(&req.key).map_err(ModError::InvalidKey)?;
        if let Some(available) = quota_free.filter(|free| req.size.is_some_and(|size| size > *free)) {
            return Err(ModError::QuotaExceeded { key: key.to_string(), available });
        }
        let name = req.name.clone().unwrap_or_else(|| key.file_name().to_owned());
        self.check_name(&name)?;
        if !req.replace {
            self.refuse_existing(&name)?;
        }
        self.ensure_dir()?;

        let (partial, file) = Partial::create(&self.dir, &name).await?;
        let (digest, size) = self.download(&key, &req, quota_free, file, &partial.path).await?;
        if digest != req.sha256 {
            return Err(ModError::DigestMismatch { key: key.to_string(), expected: req.sha256, actual: digest });
        }

        let _guard = self.lock.lock().await;
        // Checked again under the lock: another install of the same name may have finished.
        let (enabled, disabled) = (self.dir.join(&name), self.dir.join(format!("{name}{DISABLED_SUFFIX}")));
        let target = match (exists(&enabled)?, exists(&disabled)?) {
            (false, false) => &enabled,
            _ if !req.replace => return Err(ModError::Exists { name }),
            (false, true) => &disabled,
            (true, _) => &enabled,
        };
        partial.commit(target)?;
        let entry = ModEntry { name: name.clone(), enabled: target == &enabled, size, sha256: digest };
        let dir = self.dir.clone();
        let stamp = Stamp::of(&fs::metadata(target).map_err(io_err(target))?, digest);
        blocking(move || {
            update_index(&dir, |index| {
                index.insert(name, stamp);
            })
        })
        .await?;
        tracing::info!(name = %entry.name, key = %key, sha256 = %digest, "mod installed");
        Ok(entry)
    }

    /// Renames `x.jar.disabled` to `x.jar`. Enabling an enabled mod is a no-op.
    pub async fn enable(&self, name: &str) -> Result<ModEntry, ModError> {
        self.set_enabled(name, true).await
    }

    /// Renames `x.jar` to `x.jar.disabled`. Disabling a disabled mod is a no-op.
    pub async fn disable(&self, name: &str) -> Result<ModEntry, ModError> {
        self.set_enabled(name, false).await
    }

    /// Deletes the mod, in whichever state it is.
    pub async fn remove(&self, name: &str) -> Result<(), ModError> {
        self.check_name(name)?;
        let _guard = self.lock.lock().await;
        let mut found = false;
        for path in [self.dir.join(name), self.dir.join(format!("{name}{DISABLED_SUFFIX}"))] {
            match fs::remove_file(&path) {
                Ok(()) => found = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ModError::Io { path, source: e }),
            }
        }
        if !found {
            return Err(ModError::NotFound { name: name.to_owned() });
        }
        atomic::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        let (dir, owned) = (self.dir.clone(), name.to_owned());
        blocking(move || {
            update_index(&dir, |index| {
                index.remove(&owned);
            })
        })
        .await?;
        tracing::info!(name, "mod removed");
        Ok(())
    }

    async fn set_enabled(&self, name: &str, enable: bool) -> Result<ModEntry, ModError> {
        self.check_name(name)?;
        let _guard = self.lock.lock().await;
        let enabled = self.dir.join(name);
        let disabled = self.dir.join(format!("{name}{DISABLED_SUFFIX}"));
        let (from, to) = if enable { (&disabled, &enabled) } else { (&enabled, &disabled) };
        match (exists(from)?, exists(to)?) {
            (true, true) => return Err(ModError::BothStates { name: name.to_owned() }),
            (false, false) => return Err(ModError::NotFound { name: name.to_owned() }),
            (false, true) => {}
            (true, false) => {
                fs::rename(from, to).map_err(io_err(from))?;
                atomic::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
                tracing::info!(name, enabled = enable, "mod state changed");
            }
        }
        let (dir, owned, path) = (self.dir.clone(), name.to_owned(), to.clone());
        blocking(move || describe(&dir, &owned, &path, enable)).await
    }

    fn check_name(&self, name: &str) -> Result<(), ModError> {
        check_name(name, &self.extensions)
            .map_err(|reason| ModError::InvalidName { name: name.chars().take(MAX_NAME_BYTES).collect(), reason })
    }

    fn refuse_existing(&self, name: &str) -> Result<(), ModError> {
        if exists(&self.dir.join(name))? || exists(&self.dir.join(format!("{name}{DISABLED_SUFFIX}")))? {
            return Err(ModError::Exists { name: name.to_owned() });
        }
        Ok(())
    }

    /// Creates the mods dir if the server has not yet (owned by the server's user).
    fn ensure_dir(&self) -> Result<(), ModError> {
        if self.dir.is_dir() {
            return Ok(());
        }
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(&self.dir, Some(uid), Some(gid)).map_err(io_err(&self.dir))?;
        }
        atomic::sync_parent(&self.dir).map_err(io_err(&self.dir))
    }

    /// Streams the artifact into `file` (at `path`), hashing as it goes; stops at the first byte beyond
    /// the stated size (or the configured maximum). Returns the digest and byte count.
    async fn download(
        &self,
        key: &ArtifactKey,
        req: &InstallRequest,
        quota_free: Option<u64>,
        file: tokio::fs::File,
        path: &Path,
    ) -> Result<(Digest, u64), ModError> {
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let limit = req.size.unwrap_or(self.max_bytes);
        let mut stream = self.store.get_resumable(key);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(ModError::Store)?;
            size += chunk.len() as u64;
            if let Some(available) = quota_free.filter(|free| size > *free) {
                return Err(ModError::QuotaExceeded { key: key.to_string(), available });
            }
            if size > limit {
                return Err(match req.size {
                    Some(expected) => ModError::SizeMismatch { key: key.to_string(), expected, actual: size },
                    None => ModError::TooLarge { key: key.to_string(), max: limit },
                });
            }
            hasher.update(&chunk);
            out.write_all(&chunk).await.map_err(io_err(path))?;
        }
        if let Some(expected) = req.size.filter(|e| *e != size) {
            return Err(ModError::SizeMismatch { key: key.to_string(), expected, actual: size });
        }
        out.flush().await.map_err(io_err(path))?;
        let file = out.into_inner();
        file.sync_all().await.map_err(io_err(path))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io_err(path))?;
        }
        Ok((Digest::from_hasher(hasher), size))
    }
}

/// A download in progress: a hidden file in the mods dir, removed unless committed (also when
/// the install is cancelled because the client went away).
struct Partial {
    path: PathBuf,
    committed: bool,
}

impl Partial {
    async fn create(dir: &Path, name: &str) -> Result<(Self, tokio::fs::File), ModError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!(".{name}.{}.{n}.partial", std::process::id()));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&path)
            .await
            .map_err(io_err(&path))?;
        Ok((Self { path, committed: false }, file))
    }

    /// Renames the (synced) file into place and makes the rename durable.
    fn commit(mut self, target: &Path) -> Result<(), ModError> {
        fs::rename(&self.path, target).map_err(io_err(target))?;
        self.committed = true;
        atomic::sync_parent(target).map_err(io_err(target))
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "could not remove a partial mod download");
            }
        }
    }
}

/// Why `name` is not a plain mod file name, if it is not.
fn check_name(name: &str, extensions: &[String]) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("must be 1 to {MAX_NAME_BYTES} bytes"));
    }
    if name.contains('/') || name.contains('\\') || name.chars().any(char::is_control) {
        return Err("must be a plain file name (no '/', '\\' or control characters)".into());
    }
    if name.starts_with('.') {
        return Err("must not start with '.'".into());
    }
    let lower = name.to_ascii_lowercase();
    if !extensions.is_empty() && !extensions.iter().any(|e| lower.ends_with(&e.to_ascii_lowercase())) {
        return Err(format!("must end with {}", extensions.join(" or ")));
    }
    Ok(())
}

fn exists(path: &Path) -> Result<bool, ModError> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(ModError::Io { path: path.to_path_buf(), source: e }),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, ModError> + Send + 'static) -> Result<T, ModError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ModError::Io { path: PathBuf::new(), source: io::Error::other(e) })?
}

/// A cached digest and what the file looked like when it was computed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    size: u64,
    ino: u64,
    mtime: i64,
    mtime_nsec: i64,
    sha256: Digest,
}

impl Stamp {
    fn of(meta: &fs::Metadata, sha256: Digest) -> Self {
        Stamp { size: meta.len(), ino: meta.ino(), mtime: meta.mtime(), mtime_nsec: meta.mtime_nsec(), sha256 }
    }
    fn matches(&self, meta: &fs::Metadata) -> bool {
        self.size == meta.len()
            && self.ino == meta.ino()
            && self.mtime == meta.mtime()
            && self.mtime_nsec == meta.mtime_nsec()
    }
}

type Index = BTreeMap<String, Stamp>;

/// The index as stored; a damaged one is only a cache, so it is dropped and rebuilt.
fn read_index(dir: &Path) -> Index {
    let path = dir.join(INDEX_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "mod digest index unreadable; rebuilding it");
            Index::new()
        }),
        Err(_) => Index::new(),
    }
}

fn write_index(dir: &Path, index: &Index) -> Result<(), ModError> {
    let path = dir.join(INDEX_FILE);
    let json = serde_json::to_vec_pretty(index).expect("the index serializes");
    atomic::write_file(&path, &json).map_err(io_err(&path))
}

fn update_index(dir: &Path, edit: impl FnOnce(&mut Index)) -> Result<(), ModError> {
    let mut index = read_index(dir);
    let before = index.clone();
    edit(&mut index);
    if index != before {
        write_index(dir, &index)?;
    }
    Ok(())
}

/// The entry of one mod file, its digest from the index (computed and recorded on a miss).
fn describe(dir: &Path, name: &str, path: &Path, enabled: bool) -> Result<ModEntry, ModError> {
    let meta = fs::metadata(path).map_err(io_err(path))?;
    let cached = read_index(dir).get(name).filter(|s| s.matches(&meta)).cloned();
    let stamp = match cached {
        Some(s) => s,
        None => {
            let stamp = Stamp::of(&meta, hash_file(path).map_err(io_err(path))?);
            let recorded = stamp.clone();
            update_index(dir, |index| {
                index.insert(name.to_owned(), recorded);
            })?;
            stamp
        }
    };
    Ok(ModEntry { name: name.to_owned(), enabled, size: meta.len(), sha256: stamp.sha256 })
}

/// Lists the mods of `dir`, hashing files the index has no current digest for.
fn list_dir(dir: &Path, extensions: &[String]) -> Result<Vec<ModEntry>, ModError> {
    let read = match fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ModError::Io { path: dir.to_path_buf(), source: e }),
    };
    let old = read_index(dir);
    let mut index = Index::new();
    let mut entries = Vec::new();
    for dirent in read {
        let dirent = dirent.map_err(io_err(dir))?;
        let Some(file_name) = dirent.file_name().to_str().map(str::to_owned) else { continue };
        let (name, enabled) = match file_name.strip_suffix(DISABLED_SUFFIX) {
            Some(base) => (base.to_owned(), false),
            None => (file_name.clone(), true),
        };
        if check_name(&name, extensions).is_err() {
            continue;
        }
        let path = dirent.path();
        let meta = match fs::metadata(&path) {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            // Removed between the listing and now.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ModError::Io { path, source: e }),
        };
        let stamp = match old.get(&name).filter(|s| s.matches(&meta)) {
            Some(s) => s.clone(),
            None => Stamp::of(&meta, hash_file(&path).map_err(io_err(&path))?),
        };
        entries.push(ModEntry { name: name.clone(), enabled, size: meta.len(), sha256: stamp.sha256 });
        index.insert(name, stamp);
    }
    if index != old {
        write_index(dir, &index)?;
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name).then(b.enabled.cmp(&a.enabled)));
    Ok(entries)
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(Digest::from_hasher(hasher))
}

/// Removes `.<name>.<pid>.<n>.partial` files whose process is gone (killed mid-download).
fn remove_dead_partials(dir: &Path) {
    let Ok(read) = fs::read_dir(dir) else { return };
    for dirent in read.flatten() {
        let name = dirent.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")) else { continue };
        let pid: Option<u32> = rest.rsplit('.').nth(1).and_then(|p| p.parse().ok());
        let Some(pid) = pid else { continue };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match fs::remove_file(dirent.path()) {
            Ok(()) => tracing::info!(path = %dirent.path().display(), "removed a partial mod download"),
            Err(e) => {
                tracing::warn!(path = %dirent.path().display(), error = %e, "could not remove a partial mod download")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exts() -> Vec<String> {
        DEFAULT_EXTENSIONS.iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn names_must_be_plain_mod_files() {
        for bad in ["", "../x.jar", "a/b.jar", ".hidden.jar", "x.txt", "x.jar.disabled", "a\\b.jar", "x\n.jar"] {
            assert!(check_name(bad, &exts()).is_err(), "{bad:?} accepted");
        }
        for good in ["fabric-api-0.100.0+1.21.jar", "Pack.ZIP", "x.jar"] {
            assert!(check_name(good, &exts()).is_ok(), "{good:?} refused");
        }
        assert!(check_name("config.toml", &[]).is_ok());
        assert!(check_name(".x", &[]).is_err());
    }

    #[test]
    fn dead_partials_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        // pid 0 never names a live process visible in /proc.
        let dead = dir.path().join(".x.jar.0.3.partial");
        let ours = dir.path().join(format!(".y.jar.{}.0.partial", std::process::id()));
        fs::write(&dead, b"half").unwrap();
        fs::write(&ours, b"in flight").unwrap();
        remove_dead_partials(dir.path());
        assert!(!dead.exists());
        assert!(ours.exists());
    }
}
