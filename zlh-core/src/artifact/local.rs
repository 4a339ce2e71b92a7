//! `file:///srv/artifacts`: artifacts as plain files under a root directory.
//!
//! Keys map one to one onto relative paths, so the tree can be served as is by any static file
//! server (the `http(s)://` backend reads such a tree). A `put` streams into an aside file under
//! `<root>/.partial/`, fsyncs it, renames it into place and fsyncs the directory: readers see the
//! old file or the complete new one, and a failed or abandoned upload leaves nothing visible (the
//! aside file is removed when the upload fails or its future is dropped). `.partial` is never
//! listed and is not a usable key.

use std::io::{self, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{ArtifactError, ArtifactStore, ByteRange, ByteStream, GetResult, ObjectMeta};
use crate::types::ArtifactKey;

/// Directory under the root that holds uploads in progress.
const PARTIAL_DIR: &str = ".partial";
/// Read size of served streams.
const CHUNK: usize = 256 * 1024;

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating it if needed) the store rooted at the absolute path `root`.
    pub fn new(root: impl AsRef<Path>) -> Result<Self, ArtifactError> {
        let root = root.as_ref();
        let invalid =
            |reason: &str| ArtifactError::InvalidUrl { url: root.display().to_string(), reason: reason.to_owned() };
        if !root.is_absolute() {
            return Err(invalid("the store root must be an absolute path"));
        }
        std::fs::create_dir_all(root).map_err(|e| invalid(&format!("cannot create the store root: {e}")))?;
        let root = root.canonicalize().map_err(|e| invalid(&format!("cannot resolve the store root: {e}")))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn store(&self) -> String {
        format!("file://{}", self.root.display())
    }

    fn io(&self, key: &ArtifactKey, source: io::Error) -> ArtifactError {
        if source.kind() == io::ErrorKind::NotFound {
            return ArtifactError::NotFound { store: self.store(), key: key.to_string() };
        }
        ArtifactError::Io { store: self.store(), key: key.to_string(), source }
    }

    fn not_found(&self, key: &ArtifactKey) -> ArtifactError {
        ArtifactError::NotFound { store: self.store(), key: key.to_string() }
    }

    /// The file behind `key`. Refuses the reserved `.partial` tree.
    fn path(&self, key: &ArtifactKey) -> Result<PathBuf, ArtifactError> {
        if key.as_str().split('/').next() == Some(PARTIAL_DIR) {
            return Err(ArtifactError::Forbidden { store: self.store(), key: key.to_string() });
        }
        Ok(self.root.join(key.as_str()))
    }

    /// Refuses paths that a symlink inside the tree leads out of the root.
    async fn check_inside(&self, key: &ArtifactKey, path: &Path) -> Result<(), ArtifactError> {
        let real = tokio::fs::canonicalize(path).await.map_err(|e| self.io(key, e))?;
        if real.starts_with(&self.root) {
            Ok(())
        } else {
            Err(ArtifactError::Forbidden { store: self.store(), key: key.to_string() })
        }
    }

    /// Metadata of the regular file behind `key` (a directory is not an object).
    async fn file_meta(&self, key: &ArtifactKey) -> Result<(PathBuf, ObjectMeta), ArtifactError> {
        let path = self.path(key)?;
        self.check_inside(key, &path).await?;
        let md = tokio::fs::metadata(&path).await.map_err(|e| self.io(key, e))?;
        if !md.is_file() {
            return Err(self.not_found(key));
        }
        Ok((path, meta(key.clone(), &md)))
    }
}

fn meta(key: ArtifactKey, md: &std::fs::Metadata) -> ObjectMeta {
    let modified = md.modified().ok();
    let nanos = modified.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0);
    ObjectMeta {
        key,
        size: md.len(),
        last_modified: modified.map(chrono::DateTime::<chrono::Utc>::from),
        etag: Some(format!("{nanos:x}-{:x}", md.len())),
    }
}

/// Every regular file under `dir`, as keys relative to `root`, skipping `.partial` and symlinks.
fn walk(root: &Path, dir: &Path, out: &mut Vec<ObjectMeta>) -> io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        let file_type = entry.file_type()?;
        if dir == root && entry.file_name() == PARTIAL_DIR {
            continue;
        }
        if file_type.is_dir() {
            walk(root, &path, out)?;
        } else if file_type.is_file() {
            let rel = path.strip_prefix(root).expect("walk stays under root");
            // Names that are not valid keys (control characters…) cannot be addressed: skip them.
            if let Some(key) = rel.to_str().and_then(|s| ArtifactKey::parse(s).ok()) {
                out.push(meta(key, &entry.metadata()?));
            }
        }
    }
    Ok(())
}

#[async_trait]
impl ArtifactStore for LocalStore {
    fn describe(&self) -> String {
        self.store()
    }

    async fn head(&self, key: &ArtifactKey) -> Result<ObjectMeta, ArtifactError> {
        Ok(self.file_meta(key).await?.1)
    }

    async fn get_range(&self, key: &ArtifactKey, range: ByteRange) -> Result<GetResult, ArtifactError> {
        let (path, meta) = self.file_meta(key).await?;
        let served = range.resolve(meta.size).ok_or_else(|| ArtifactError::invalid_range(key, range, meta.size))?;
        let mut file = tokio::fs::File::open(&path).await.map_err(|e| self.io(key, e))?;
        file.seek(SeekFrom::Start(served.start)).await.map_err(|e| self.io(key, e))?;
        let (store, key_name) = (self.store(), key.to_string());
        let stream = ReaderStream::with_capacity(file.take(served.end - served.start), CHUNK)
            .map_err(move |source| ArtifactError::Io { store: store.clone(), key: key_name.clone(), source })
            .boxed();
        Ok(GetResult { meta, range: served, stream })
    }

    async fn put(&self, key: &ArtifactKey, mut body: ByteStream) -> Result<ObjectMeta, ArtifactError> {
        let dest = self.path(key)?;
        let io = |e| self.io(key, e);
        let partial_dir = self.root.join(PARTIAL_DIR);
        tokio::fs::create_dir_all(&partial_dir).await.map_err(io)?;
        // The temp path removes the aside file when dropped: on any error below, and when the
        // caller drops this future mid-upload.
        let aside = tempfile::Builder::new().prefix("put-").tempfile_in(&partial_dir).map_err(io)?;
        let (file, aside) = aside.into_parts();
        let mut file = tokio::fs::File::from_std(file);
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk?).await.map_err(io)?;
        }
        file.flush().await.map_err(io)?;
        // Artifacts are published and signed, not secret: readable by every user of the machine,
        // as the containers' own users that install them are (the temp file starts at 0600).
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o644)).await.map_err(io)?;
        file.sync_all().await.map_err(io)?;
        drop(file);

        let parent = dest.parent().expect("a key path has a parent").to_owned();
        tokio::fs::create_dir_all(&parent).await.map_err(io)?;
        self.check_inside(key, &parent).await?;
        let dest_for_rename = dest.clone();
        tokio::task::spawn_blocking(move || {
            aside.persist(&dest_for_rename).map_err(|e| e.error)?;
            crate::atomic::sync_dir(&parent)
        })
        .await
        .map_err(|e| io(io::Error::other(e)))?
        .map_err(io)?;
        let md = tokio::fs::metadata(&dest).await.map_err(io)?;
        Ok(meta(key.clone(), &md))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, ArtifactError> {
        // Prefixes match whole segments, so everything under `a/b` is the file `a/b` or the tree
        // below the directory `a/b`: start there rather than walking the whole root.
        let start = match prefix.trim_end_matches('/') {
            "" => self.root.clone(),
            p => match ArtifactKey::parse(p) {
                Ok(k) if k.as_str().split('/').next() != Some(PARTIAL_DIR) => self.root.join(k.as_str()),
                _ => return Ok(Vec::new()), // no valid key lies under an invalid prefix
            },
        };
        let root = self.root.clone();
        let store = self.store();
        let mut found = tokio::task::spawn_blocking(move || -> io::Result<Vec<ObjectMeta>> {
            let mut out = Vec::new();
            match std::fs::symlink_metadata(&start) {
                Ok(md) if md.is_file() => {
                    if let Some(key) = start.strip_prefix(&root).ok().and_then(|r| r.to_str()) {
                        out.extend(ArtifactKey::parse(key).ok().map(|k| meta(k, &md)));
                    }
                }
                Ok(md) if md.is_dir() => walk(&root, &start, &mut out)?,
                _ => {}
            }
            Ok(out)
        })
        .await
        .map_err(|e| ArtifactError::Backend { store: store.clone(), message: e.to_string() })?
        .map_err(|e| ArtifactError::Backend { store, message: format!("listing {prefix:?}: {e}") })?;
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }

    async fn delete(&self, key: &ArtifactKey) -> Result<(), ArtifactError> {
        let (path, _) = self.file_meta(key).await?;
        tokio::fs::remove_file(&path).await.map_err(|e| self.io(key, e))?;
        if let Some(parent) = path.parent() {
            crate::atomic::sync_dir(parent).map_err(|e| self.io(key, e))?;
        }
        Ok(())
    }
}
