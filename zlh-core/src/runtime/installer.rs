//! The [`Installer`]: the filesystem implementation of [`RuntimeInstaller`].
//!
//! One streaming pass per install: a pump task pulls the artifact from the store, hashes it and
//! hands the bytes over a bounded channel to a blocking thread that decompresses and extracts
//! into a private directory under `.staging`. Hashing and extraction thus run on two cores, and
//! memory stays bounded whatever the artifact's size. Only when the digest matches is the manifest
//! written and the directory renamed into place; `current` is then swapped by rename. Both renames
//! are atomic, so a kill leaves the old state or the new one, and the staging leftovers of a dead
//! process are removed by the next [`Installer::open`].

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use sha2::{Digest as _, Sha256};
use tokio::sync::{broadcast, mpsc};

use super::extract::{self, Limits};
use super::layout::{Layout, Manifest, ManifestEntry, MANIFEST_NAME};
use super::{InstallError, InstallProgress, InstallStep, InstalledRuntime, RuntimeInstaller, Upgrade, VerifyReport};
use crate::artifact::{ArtifactError, ArtifactStoreExt, DynStore};
use crate::atomic;
use crate::catalog::{ArchiveFormat, CatalogItem};
use crate::types::{Digest, RuntimeId, Version};

/// Called synchronously as an install enters each step (after `Downloading` started, before the
/// step's work). Lets an embedder trace installs or a test stop one at an exact point.
pub type StepHook = Arc<dyn Fn(&RuntimeId, &Version, InstallStep) + Send + Sync>;

/// How an [`Installer`] is set up.
#[derive(Clone)]
pub struct InstallerOptions {
    /// The install root (`/opt/zlh/runtimes`).
    pub root: PathBuf,
    /// Where artifacts are fetched from.
    pub store: DynStore,
    /// Flush the staged files to disk (syncfs) before the commit rename, so a power loss cannot
    /// leave a committed install with empty files. Off only for throwaway roots.
    pub durable: bool,
    pub step_hook: Option<StepHook>,
}

impl InstallerOptions {
    pub fn new(root: impl Into<PathBuf>, store: DynStore) -> Self {
        Self { root: root.into(), store, durable: true, step_hook: None }
    }
}

type InstallKey = (RuntimeId, Version);
type SharedInstall = Shared<BoxFuture<'static, Result<InstalledRuntime, Arc<InstallError>>>>;

struct Inner {
    layout: Layout,
    store: DynStore,
    durable: bool,
    step_hook: Option<StepHook>,
    progress: broadcast::Sender<InstallProgress>,
    /// The install guard: one in-flight install per id+version, shared by concurrent callers.
    inflight: Mutex<HashMap<InstallKey, SharedInstall>>,
}

/// Installs catalog items under one root. Cheap to clone; clones share the install guard.
#[derive(Clone)]
pub struct Installer {
    inner: Arc<Inner>,
}

/// Bytes handed from the pump task to the extraction thread at once; bounds memory in flight.
const PIPE_DEPTH: usize = 16;
/// Progress is broadcast at most once per this many bytes.
const PROGRESS_EVERY: u64 = 1 << 20;

impl Installer {
    /// Opens (creating if needed) an install root and removes staging leftovers of dead processes.
    pub fn open(options: InstallerOptions) -> Result<Self, InstallError> {
        let layout = Layout::new(options.root);
        let staging = layout.staging();
        fs::create_dir_all(&staging).map_err(InstallError::io(&staging))?;
        clean_staging(&staging)?;
        clean_aside_links(layout.root())?;
        let (progress, _) = broadcast::channel(256);
        Ok(Self {
            inner: Arc::new(Inner {
                layout,
                store: options.store,
                durable: options.durable,
                step_hook: options.step_hook,
                progress,
                inflight: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The installed version `current` points at, if any.
    pub fn current_version(&self, id: &RuntimeId) -> Option<Version> {
        read_version_link(&self.inner.layout.current_link(id))
    }
}

/// Removes staging dirs whose owning process is gone. Names start with the owner's pid, so a
/// second process (the CLI while the agent runs) never deletes an install in progress.
fn clean_staging(staging: &Path) -> Result<(), InstallError> {
    for entry in fs::read_dir(staging).map_err(InstallError::io(staging))? {
        let entry = entry.map_err(InstallError::io(staging))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner: Option<u32> = name.split('.').next().and_then(|p| p.parse().ok());
        if owned_by_other_live_process(owner) {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => tracing::info!(path = %path.display(), "removed staging leftover"),
            Err(e) => return Err(InstallError::Io { path, source: e }),
        }
    }
    Ok(())
}

/// True when `pid` names another process that is still running: its leftovers are work in progress.
fn owned_by_other_live_process(pid: Option<u32>) -> bool {
    pid.is_some_and(|pid| pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists())
}

/// Removes `current`/`previous` links a killed process made aside but never renamed into place
/// (`.current.<pid>.partial`, see [`atomic::replace_symlink`]).
fn clean_aside_links(root: &Path) -> Result<(), InstallError> {
    for id_dir in fs::read_dir(root).map_err(InstallError::io(root))?.flatten() {
        let name = id_dir.file_name();
        if name.to_string_lossy().starts_with('.') || !id_dir.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        for entry in fs::read_dir(id_dir.path()).map_err(InstallError::io(id_dir.path()))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".partial")) else { continue };
            let owner: Option<u32> = rest.rsplit('.').next().and_then(|p| p.parse().ok());
            if owned_by_other_live_process(owner) {
                continue;
            }
            fs::remove_file(entry.path()).map_err(InstallError::io(entry.path()))?;
        }
    }
    Ok(())
}

fn read_version_link(link: &Path) -> Option<Version> {
    let target = fs::read_link(link).ok()?;
    Version::parse(target.to_str()?).ok()
}

fn read_manifest(path: &Path) -> Result<Manifest, InstallError> {
    let bytes = fs::read(path).map_err(InstallError::io(path))?;
    serde_json::from_slice(&bytes).map_err(|e| InstallError::Manifest { path: path.into(), message: e.to_string() })
}

impl Inner {
    fn emit(&self, item: &CatalogItem, step: InstallStep, bytes_done: u64) {
        if let Some(hook) = &self.step_hook {
            if !matches!(step, InstallStep::Downloading) || bytes_done == 0 {
                hook(&item.id, &item.version, step);
            }
        }
        let _ = self.progress.send(InstallProgress {
            id: item.id.clone(),
            version: item.version.clone(),
            step,
            bytes_done,
            bytes_total: item.artifact.size,
        });
    }

    fn installed(&self, id: &RuntimeId, version: &Version) -> Result<InstalledRuntime, InstallError> {
        let manifest = read_manifest(&self.layout.manifest(id, version))?;
        let current = read_version_link(&self.layout.current_link(id)).as_ref() == Some(version);
        Ok(InstalledRuntime {
            id: id.clone(),
            version: version.clone(),
            path: self.layout.version_dir(id, version),
            current,
            artifact_sha256: manifest.artifact_sha256,
            installed_at: manifest.installed_at,
            bin: manifest.bin,
            env: manifest.env,
        })
    }

    /// The installed copy of `item`, if complete; an error if a different build sits there.
    fn existing(&self, item: &CatalogItem) -> Result<Option<InstalledRuntime>, InstallError> {
        let dir = self.layout.version_dir(&item.id, &item.version);
        if !dir.exists() {
            return Ok(None);
        }
        let installed = self.installed(&item.id, &item.version)?;
        if installed.artifact_sha256 != item.artifact.sha256 {
            return Err(InstallError::Manifest {
                path: self.layout.manifest(&item.id, &item.version),
                message: format!(
                    "installed from artifact {} but the catalog now says {}; remove it (force) and reinstall",
                    installed.artifact_sha256, item.artifact.sha256
                ),
            });
        }
        Ok(Some(installed))
    }

    /// Points `current` at `version`, recording the old target as `previous`.
    fn activate(&self, id: &RuntimeId, version: &Version) -> Result<(), InstallError> {
        let current = self.layout.current_link(id);
        let old = read_version_link(&current);
        if old.as_ref() == Some(version) {
            return Ok(());
        }
        if let Some(old) = old {
            let previous = self.layout.previous_link(id);
            atomic::replace_symlink(Path::new(old.as_str()), &previous).map_err(InstallError::io(&previous))?;
        }
        atomic::replace_symlink(Path::new(version.as_str()), &current).map_err(InstallError::io(&current))
    }

    async fn install_fresh(self: Arc<Self>, item: CatalogItem) -> Result<InstalledRuntime, InstallError> {
        if let Some(done) = self.existing(&item)? {
            return Ok(done);
        }
        let staging = self.layout.staging();
        fs::create_dir_all(&staging).map_err(InstallError::io(&staging))?;
        // Dropping `tmp` on any error below removes the staged files: the transaction's rollback.
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}.{}-{}.", std::process::id(), item.id, item.version))
            .tempdir_in(&staging)
            .map_err(InstallError::io(&staging))?;

        self.emit(&item, InstallStep::Downloading, 0);
        let (digest, size, extracted) = self.stream_and_extract(&item, tmp.path()).await?;

        self.emit(&item, InstallStep::Verifying, size);
        let key = item.artifact.key.to_string();
        if size != item.artifact.size {
            return Err(InstallError::SizeMismatch { key, expected: item.artifact.size, actual: size });
        }
        if digest != item.artifact.sha256 {
            return Err(InstallError::DigestMismatch { key, expected: item.artifact.sha256, actual: digest });
        }
        // Checked after the digest: a corrupted download is reported as such, not as a bad archive.
        let extracted = extracted.map_err(|source| InstallError::Archive { key, source })?;

        self.emit(&item, InstallStep::Committing, size);
        let manifest = Manifest {
            id: item.id.clone(),
            version: item.version.clone(),
            artifact_key: item.artifact.key.clone(),
            artifact_sha256: digest,
            installed_at: chrono::Utc::now(),
            bin: item.bin.clone(),
            env: item.env.clone(),
            entries: extracted.entries,
        };
        let this = self.clone();
        let tmp = tokio::task::spawn_blocking(move || this.commit(tmp, &manifest))
            .await
            .map_err(|e| InstallError::Io { path: staging.clone(), source: io::Error::other(e) })??;
        drop(tmp);
        self.installed(&item.id, &item.version)
    }

    /// Pumps the artifact through sha256 into the extraction thread. Returns digest, byte count
    /// and what extraction made of it; only a store failure is an error here.
    async fn stream_and_extract(
        self: &Arc<Self>,
        item: &CatalogItem,
        dest: &Path,
    ) -> Result<(Digest, u64, Result<extract::Extracted, extract::ExtractError>), InstallError> {
        let key = item.artifact.key.clone();
        // Resumable: a connection dropped mid-download continues where it stopped.
        let mut stream = self.store.get_resumable(&key);
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(PIPE_DEPTH);

        let format = item.artifact.format;
        let limits = Limits { max_unpacked_bytes: item.artifact.unpacked_size, max_entries: item.artifact.entries };
        let file_name = key.file_name().to_owned();
        let dest_owned = dest.to_path_buf();
        let extractor = tokio::task::spawn_blocking(move || {
            let mut reader = ChannelReader { rx, current: Bytes::new() };
            let result = if format == ArchiveFormat::File {
                extract::extract_file(&mut reader, &dest_owned, &file_name, &limits)
            } else {
                extract::decoder(format, &mut reader).and_then(|dec| extract::extract_tar(dec, &dest_owned, &limits))
            };
            // Drain what the pump still sends (tar padding after the end marker, or everything
            // after a refused entry) so it hashes the whole artifact: the digest is always
            // checked, and a corrupted download is reported as such.
            while reader.rx.blocking_recv().is_some() {}
            result
        });

        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut next_report = PROGRESS_EVERY;
        let mut store_error: Option<ArtifactError> = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(bytes) => {
                    hasher.update(&bytes);
                    size += bytes.len() as u64;
                    if size > item.artifact.size {
                        // More than declared: stop now rather than reading an endless stream.
                        break;
                    }
                    if size >= next_report {
                        self.emit(item, InstallStep::Downloading, size);
                        next_report = size + PROGRESS_EVERY;
                    }
                    if tx.send(Ok(bytes)).await.is_err() {
                        break; // the extraction thread died; its error is reported below
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(io::Error::other(e.to_string()))).await;
                    store_error = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        let extracted =
            extractor.await.map_err(|e| InstallError::Io { path: dest.to_path_buf(), source: io::Error::other(e) })?;
        if let Some(e) = store_error {
            return Err(e.into());
        }
        Ok((Digest::from_hasher(hasher), size, extracted))
    }

    /// Writes the manifest into the staged dir, makes it durable and renames it into place.
    /// Returns the (now empty-pathed) temp dir handle so the caller can drop it harmlessly.
    fn commit(&self, tmp: tempfile::TempDir, manifest: &Manifest) -> Result<tempfile::TempDir, InstallError> {
        let staged = tmp.path();
        let manifest_path = staged.join(MANIFEST_NAME);
        let json = serde_json::to_vec(manifest).expect("manifest serializes");
        atomic::write_file(&manifest_path, &json).map_err(InstallError::io(&manifest_path))?;
        if self.durable {
            let dir = fs::File::open(staged).map_err(InstallError::io(staged))?;
            rustix::fs::syncfs(&dir).map_err(|e| InstallError::Io { path: staged.into(), source: e.into() })?;
        }
        fs::set_permissions(staged, fs::Permissions::from_mode(0o755)).map_err(InstallError::io(staged))?;

        let id_dir = self.layout.id_dir(&manifest.id);
        fs::create_dir_all(&id_dir).map_err(InstallError::io(&id_dir))?;
        let target = self.layout.version_dir(&manifest.id, &manifest.version);
        match fs::rename(staged, &target) {
            Ok(()) => {}
            // Another process committed the same version first; theirs is as good as ours.
            Err(e) if target.join(MANIFEST_NAME).exists() => {
                tracing::info!(path = %target.display(), error = %e, "version was committed concurrently");
            }
            Err(e) => return Err(InstallError::Io { path: target, source: e }),
        }
        atomic::sync_dir(&id_dir).map_err(InstallError::io(&id_dir))?;
        Ok(tmp)
    }
}

/// Adapts the pump's channel to `std::io::Read` for the (blocking) decoder and tar parser.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        let _ = self.current.split_to(n);
        Ok(n)
    }
}

impl Installer {
    async fn install_shared(&self, item: &CatalogItem) -> Result<InstalledRuntime, InstallError> {
        let key = (item.id.clone(), item.version.clone());
        let (flight, leader) = {
            let mut inflight = self.inner.inflight.lock().unwrap();
            match inflight.get(&key) {
                Some(f) => (f.clone(), false),
                None => {
                    let inner = self.inner.clone();
                    let owned = item.clone();
                    let fut: BoxFuture<'static, _> =
                        async move { inner.install_fresh(owned).await.map_err(Arc::new) }.boxed();
                    let shared = fut.shared();
                    inflight.insert(key.clone(), shared.clone());
                    (shared, true)
                }
            }
        };
        let result = flight.await;
        if leader {
            self.inner.inflight.lock().unwrap().remove(&key);
        }
        result.map_err(|e| match Arc::try_unwrap(e) {
            Ok(e) => e,
            Err(shared) => InstallError::Shared(shared),
        })
    }

    fn installed_versions(&self, id: &RuntimeId) -> Vec<Version> {
        let dir = self.inner.layout.id_dir(id);
        let mut versions: Vec<Version> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| Version::parse(e.file_name().to_str()?).ok())
            .filter(|v| self.inner.layout.manifest(id, v).exists())
            .collect();
        versions.sort();
        versions
    }

    fn not_installed(&self, id: &RuntimeId, version: &str) -> InstallError {
        let installed: Vec<String> = self.installed_versions(id).iter().map(|v| v.to_string()).collect();
        InstallError::NotInstalled {
            id: id.to_string(),
            version: version.to_owned(),
            installed: if installed.is_empty() { "none".into() } else { installed.join(", ") },
        }
    }
}

#[async_trait]
impl RuntimeInstaller for Installer {
    async fn install(&self, item: &CatalogItem, activate: bool) -> Result<InstalledRuntime, InstallError> {
        let result = async {
            let mut installed = self.install_shared(item).await?;
            if activate && !installed.current {
                self.inner.emit(item, InstallStep::Activating, item.artifact.size);
                self.inner.activate(&item.id, &item.version)?;
                installed.current = true;
            }
            Ok(installed)
        }
        .await;
        match &result {
            Ok(_) => self.inner.emit(item, InstallStep::Done, item.artifact.size),
            Err(e) => {
                tracing::warn!(id = %item.id, version = %item.version, error = %e, "install failed");
                self.inner.emit(item, InstallStep::Failed, 0);
            }
        }
        result
    }

    async fn upgrade(&self, item: &CatalogItem) -> Result<Upgrade, InstallError> {
        let previous = self.current_version(&item.id);
        let current = self.install(item, true).await?;
        Ok(Upgrade { previous: previous.filter(|p| *p != item.version), current })
    }

    async fn rollback(&self, id: &RuntimeId, to: Option<Version>) -> Result<InstalledRuntime, InstallError> {
        let target = match to {
            Some(v) => v,
            None => read_version_link(&self.inner.layout.previous_link(id)).ok_or_else(|| {
                InstallError::NoRollback { id: id.to_string(), reason: "no previous version recorded".into() }
            })?,
        };
        if !self.inner.layout.manifest(id, &target).exists() {
            return Err(self.not_installed(id, target.as_str()));
        }
        self.inner.activate(id, &target)?;
        self.inner.installed(id, &target)
    }

    async fn remove(&self, id: &RuntimeId, version: &Version, force: bool) -> Result<(), InstallError> {
        let layout = &self.inner.layout;
        let dir = layout.version_dir(id, version);
        if !layout.manifest(id, version).exists() {
            return Err(self.not_installed(id, version.as_str()));
        }
        for link in [layout.current_link(id), layout.previous_link(id)] {
            if read_version_link(&link).as_ref() == Some(version) {
                if link.ends_with(super::layout::CURRENT_LINK) && !force {
                    return Err(InstallError::IsCurrent { id: id.to_string(), version: version.to_string() });
                }
                fs::remove_file(&link).map_err(InstallError::io(&link))?;
            }
        }
        // Move it out of sight in one rename, then delete at leisure: a kill mid-delete leaves a
        // staging leftover, never a half-deleted version that looks installed.
        let staging = layout.staging();
        let aside = staging.join(format!("{}.remove-{}-{}", std::process::id(), id, version));
        fs::rename(&dir, &aside).map_err(InstallError::io(&dir))?;
        tokio::task::spawn_blocking(move || fs::remove_dir_all(&aside).map_err(InstallError::io(&aside)))
            .await
            .map_err(|e| InstallError::Io { path: dir.clone(), source: io::Error::other(e) })??;
        Ok(())
    }

    async fn verify(&self, id: &RuntimeId, version: &Version) -> Result<VerifyReport, InstallError> {
        let path = self.inner.layout.manifest(id, version);
        if !path.exists() {
            return Err(self.not_installed(id, version.as_str()));
        }
        let manifest = read_manifest(&path)?;
        let dir = self.inner.layout.version_dir(id, version);
        tokio::task::spawn_blocking(move || verify_tree(&dir, &manifest))
            .await
            .map_err(|e| InstallError::Io { path: path.clone(), source: io::Error::other(e) })?
    }

    async fn list(&self) -> Result<Vec<InstalledRuntime>, InstallError> {
        let root = self.inner.layout.root();
        let mut ids: Vec<RuntimeId> = fs::read_dir(root)
            .map_err(InstallError::io(root))?
            .flatten()
            .filter_map(|e| RuntimeId::parse(e.file_name().to_str()?).ok())
            .collect();
        ids.sort();
        let mut out = Vec::new();
        for id in ids {
            for version in self.installed_versions(&id) {
                out.push(self.inner.installed(&id, &version)?);
            }
        }
        Ok(out)
    }

    fn subscribe(&self) -> broadcast::Receiver<InstallProgress> {
        self.inner.progress.subscribe()
    }
}

/// Re-hashes every file of an install and compares types, sizes, modes and link targets with the
/// manifest; also reports files the manifest does not list.
fn verify_tree(dir: &Path, manifest: &Manifest) -> Result<VerifyReport, InstallError> {
    let mut mismatched = Vec::new();
    let mut files_checked = 0;
    let mut listed = std::collections::HashSet::new();
    for entry in &manifest.entries {
        let rel = entry.path();
        listed.insert(rel.to_owned());
        let path = dir.join(rel);
        let ok = match (entry, fs::symlink_metadata(&path)) {
            (_, Err(_)) => false,
            (ManifestEntry::File { size, sha256, .. }, Ok(meta)) if meta.file_type().is_file() => {
                files_checked += 1;
                meta.len() == *size && hash_file(&path).map_err(InstallError::io(&path))? == *sha256
            }
            (ManifestEntry::Dir { .. }, Ok(meta)) => meta.file_type().is_dir(),
            (ManifestEntry::Symlink { target, .. }, Ok(meta)) if meta.file_type().is_symlink() => {
                fs::read_link(&path).map(|t| t == Path::new(target)).unwrap_or(false)
            }
            _ => false,
        };
        if !ok {
            mismatched.push(rel.to_owned());
        }
    }
    let mut unexpected = Vec::new();
    collect_unlisted(dir, dir, &listed, &mut unexpected).map_err(InstallError::io(dir))?;
    unexpected.sort();
    Ok(VerifyReport {
        id: manifest.id.clone(),
        version: manifest.version.clone(),
        files_checked,
        mismatched,
        unexpected,
    })
}

fn collect_unlisted(
    root: &Path,
    dir: &Path,
    listed: &std::collections::HashSet<String>,
    out: &mut Vec<String>,
) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let rel = path.strip_prefix(root).expect("under root").to_string_lossy().into_owned();
        if rel == MANIFEST_NAME {
            continue;
        }
        if !listed.contains(&rel) {
            out.push(rel.clone());
        }
        if entry.file_type()?.is_dir() {
            collect_unlisted(root, &path, listed, out)?;
        }
    }
    Ok(())
}

fn hash_file(path: &Path) -> io::Result<Digest> {
    let mut file = fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(Digest::from_hasher(hasher));
        }
        hasher.update(&buf[..n]);
    }
}
