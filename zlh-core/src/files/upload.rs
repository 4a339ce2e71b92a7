//! Resumable uploads: a file arrives in pieces (each under a proxy's body cap), possibly over
//! several connections, and appears at its path only once complete.
//!
//! The model is tus 1.0's: `create` reserves an id, a length and the quota; `append` takes the bytes
//! at exactly the current offset and persists them (fsync, then the offset in the metadata) even if
//! the sender vanishes mid-body, so a `status` tells the client where to resume. The bytes live in
//! the root as a hidden `.zlh-upload-<id>` file (never listed, never a valid user path), so the
//! final step is one rename in the same filesystem. Metadata lives in the agent's state dir.
//!
//! A new request for an upload asks the one still holding it (a connection the client already gave
//! up on) to stop, then takes over: resuming never waits for a dead connection to time out. A
//! status query while a request is streaming asks it to save what it has so far, so the offset it
//! reports is the bytes really received, not the last periodic checkpoint.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use tokio::sync::watch;

use super::jail::blocking;
use super::{random_hex, FileError, Jail};

/// How long a new request waits for the previous one on the same upload to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);
/// How long a status query waits for the request holding the upload to save what it received.
const STATUS_GRACE: Duration = Duration::from_secs(3);
/// How long a stream asked for a checkpoint must bring nothing before the checkpoint is taken.
const CHECKPOINT_QUIET: Duration = Duration::from_millis(200);
/// Bytes between two fsync + offset records while one long request streams in.
const CHECKPOINT_BYTES: u64 = 32 << 20;
/// How long a measured usage of a tree is trusted (kept current by the agent's own writes);
/// after that the tree is walked again, which catches what the game or the dev user wrote.
const USAGE_REMEASURE: Duration = Duration::from_secs(30);

/// Size limits for writes and uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadLimits {
    /// Largest single file.
    pub max_file_bytes: u64,
    /// Bytes the files under the root plus open uploads may use; `None` for no quota. A quota
    /// given with the jail ([`Jail::with_quota`]) takes precedence.
    pub quota_bytes: Option<u64>,
    /// Largest body of a one-shot write (bigger files go through resumable uploads).
    pub write_body_max: u64,
    /// An upload idle this long is removed.
    pub upload_ttl: Duration,
}

impl Default for UploadLimits {
    fn default() -> Self {
        Self {
            max_file_bytes: 8 << 30,
            quota_bytes: None,
            write_body_max: 64 << 20,
            upload_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Where an upload stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadInfo {
    pub id: String,
    /// Bytes received and persisted.
    pub offset: u64,
    pub length: u64,
    /// The target, relative to the root.
    pub path: String,
    /// When it is removed if nothing more arrives.
    pub expires: SystemTime,
    /// The file is in place.
    pub completed: bool,
}

/// What `<id>.json` in the state dir holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Meta {
    id: String,
    path: String,
    length: u64,
    offset: u64,
    overwrite: bool,
    /// The root the upload belongs to: a different root later (re-provisioning) makes it unknown.
    root: PathBuf,
    /// Last activity, seconds since the epoch.
    updated: u64,
    completed: bool,
}

/// One upload's exclusive access and the signal that asks its holder to let go.
#[derive(Default)]
struct Slot {
    lock: tokio::sync::Mutex<()>,
    /// The newest request's ticket; a holder with an older ticket stops.
    newest: watch::Sender<u64>,
    /// Asks the holder to save what it received so far (a status query wants the offset).
    checkpoint: tokio::sync::Notify,
    /// Counts the holder's saves, so a status query knows when the one it asked for is done.
    saves: watch::Sender<u64>,
}

impl Slot {
    /// Takes a ticket newer than every earlier request's (which asks the current holder to stop),
    /// then waits for the lock. Returns the guard and a future that resolves once a newer request
    /// arrives in turn.
    async fn take_over(
        &self,
        id: &str,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Pin<Box<dyn Future<Output = ()> + Send + '_>>), FileError> {
        let mut ticket = 0;
        self.newest.send_modify(|newest| {
            *newest += 1;
            ticket = *newest;
        });
        let mut newest = self.newest.subscribe();
        let guard = tokio::time::timeout(TAKEOVER_WAIT, self.lock.lock())
            .await
            .map_err(|_| FileError::UploadBusy { id: id.to_owned() })?;
        let superseded = Box::pin(async move {
            loop {
                // The value, not the change flag: a newer ticket taken before `subscribe` counts too.
                if *newest.borrow_and_update() > ticket {
                    return;
                }
                if newest.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        });
        Ok((guard, superseded))
    }
}

/// Keeps the resumable uploads of one agent.
pub struct UploadManager {
    dir: PathBuf,
    limits: UploadLimits,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Serialises quota checks so two creations cannot both take the last free bytes.
    create_lock: tokio::sync::Mutex<()>,
    /// Bytes under each root as last measured (see [`USAGE_REMEASURE`]).
    usage: Mutex<HashMap<PathBuf, Measured>>,
}

#[derive(Debug, Clone, Copy)]
struct Measured {
    bytes: u64,
    at: tokio::time::Instant,
}

impl UploadManager {
    /// Keeps upload metadata in `<state_dir>/uploads` (created if missing).
    pub fn new(state_dir: &Path, limits: UploadLimits) -> Result<Self, FileError> {
        let dir = state_dir.join("uploads");
        std::fs::create_dir_all(&dir).map_err(|e| FileError::Io { path: "upload state".into(), source: e })?;
        Ok(Self {
            dir,
            limits,
            slots: Mutex::default(),
            create_lock: tokio::sync::Mutex::new(()),
            usage: Mutex::default(),
        })
    }

    pub fn limits(&self) -> &UploadLimits {
        &self.limits
    }

    /// Starts an upload of `length` bytes to `path`. The path, the size limit and the quota are
    /// checked now, so a client learns before sending anything.
    pub async fn create(&self, jail: &Jail, path: &str, length: u64, overwrite: bool) -> Result<UploadInfo, FileError> {
        if length > self.limits.max_file_bytes {
            return Err(FileError::TooLarge { path: path.to_owned(), limit: self.limits.max_file_bytes });
        }
        let _quota = self.create_lock.lock().await;
        let (j, p) = (jail.clone(), path.to_owned());
        let (rel, replaced) = blocking(path, move || j.check_target(&p, overwrite)).await?;
        if let Some(available) = self.quota_free(jail, replaced).await? {
            if length > available {
                return Err(FileError::QuotaExceeded { path: path.to_owned(), available });
            }
        }
        let meta = Meta {
            id: random_hex(),
            path: rel.to_string(),
            length,
            offset: 0,
            overwrite,
            root: jail.root_path().to_path_buf(),
            updated: unix_now(),
            completed: false,
        };
        // Metadata first: a part file without it is an orphan the sweep may remove.
        self.save(&meta).await?;
        let (j, id) = (jail.clone(), meta.id.clone());
        if let Err(e) = blocking(path, move || j.create_upload_part(&id)).await {
            let _ = tokio::fs::remove_file(self.meta_path(&meta.id)).await;
            return Err(e);
        }
        tracing::info!(id = %meta.id, path = %meta.path, length, overwrite, "upload created");
        let mut meta = meta;
        if length == 0 {
            self.finish(jail, &mut meta).await?;
        }
        Ok(self.info(&meta))
    }

    /// Where upload `id` stands. A request still busy with it is not interrupted: it is asked to
    /// save what it received so far (or it finishes), within a moment, so the offset reported is
    /// every byte that arrived.
    pub async fn status(&self, jail: &Jail, id: &str) -> Result<UploadInfo, FileError> {
        check_id(id)?;
        let slot = self.slot(id);
        let mut saves = slot.saves.subscribe();
        let before = *saves.borrow_and_update();
        slot.checkpoint.notify_one();
        let _settled = tokio::time::timeout(STATUS_GRACE, async {
            tokio::select! {
                _ = slot.lock.lock() => {}
                _ = saves.wait_for(|n| *n > before) => {}
            }
        })
        .await;
        let meta = self.load_for(jail, id).await?;
        Ok(self.info(&meta))
    }

    /// Appends the bytes of `stream` at `offset`, which must be the current offset
    /// ([`FileError::OffsetConflict`] carries the real one). Memory stays constant whatever the size.
    /// Whatever arrived is persisted before returning, also when the stream fails midway
    /// ([`FileError::Interrupted`]); bytes beyond the declared length are refused
    /// ([`FileError::TooLarge`], up front when `declared` says the body is too long). The last byte
    /// puts the file in place.
    pub async fn append<S, B, E>(
        &self,
        jail: &Jail,
        id: &str,
        offset: u64,
        declared: Option<u64>,
        stream: S,
    ) -> Result<UploadInfo, FileError>
    where
        S: Stream<Item = Result<B, E>>,
        B: AsRef<[u8]>,
        E: std::fmt::Display,
    {
        check_id(id)?;
        let slot = self.slot(id);
        let (_held, mut stop) = slot.take_over(id).await?;
        let mut meta = self.load_for(jail, id).await?;
        if meta.offset != offset {
            return Err(FileError::OffsetConflict { current: meta.offset, got: offset });
        }
        if declared.is_some_and(|n| offset.saturating_add(n) > meta.length) {
            return Err(FileError::TooLarge { path: meta.path, limit: meta.length });
        }
        if meta.completed {
            return Ok(self.info(&meta));
        }
        self.check_still_fits(jail, &meta).await?;
        let (j, i) = (jail.clone(), id.to_owned());
        let part = blocking(&meta.path, move || j.open_upload_part(&i)).await.map_err(|e| match e {
            FileError::NotFound { .. } => FileError::UnknownUpload { id: id.to_owned() },
            e => e,
        })?;
        let path = meta.path.clone();
        let io_err = |e| FileError::from_io(&path, e);
        // Bytes past the recorded offset were never acknowledged (a crash before the record).
        part.set_len(offset).map_err(io_err)?;
        let mut file = tokio::fs::File::from_std(part);
        file.seek(io::SeekFrom::Start(offset)).await.map_err(io_err)?;

        let mut stream = std::pin::pin!(stream);
        let end = loop {
            let remaining = meta.length - meta.offset;
            let (n, end) =
                copy_stream(&mut stream, &mut file, remaining, CHECKPOINT_BYTES, &mut stop, Some(&slot.checkpoint))
                    .await;
            let synced = async {
                file.flush().await?;
                file.sync_data().await
            }
            .await;
            if let Err(e) = synced {
                return Err(io_err(e));
            }
            if n > 0 {
                meta.offset += n;
                meta.updated = unix_now();
                self.save(&meta).await?;
            }
            slot.saves.send_modify(|n| *n += 1);
            if !matches!(end, CopyEnd::Paused) {
                break end;
            }
        };
        drop(file);
        match end {
            CopyEnd::Done | CopyEnd::Paused => {}
            CopyEnd::OverLimit => return Err(FileError::TooLarge { path, limit: meta.length }),
            CopyEnd::Stopped => {
                tracing::info!(id, offset = meta.offset, "upload request superseded by a newer one");
                return Err(FileError::UploadBusy { id: id.to_owned() });
            }
            CopyEnd::Source(reason) => {
                tracing::info!(id, path = %path, offset = meta.offset, %reason, "upload interrupted; bytes kept");
                return Err(FileError::Interrupted { path, written: meta.offset, reason });
            }
            CopyEnd::Sink(e) => return Err(io_err(e)),
        }
        if meta.offset == meta.length {
            self.finish(jail, &mut meta).await?;
        }
        Ok(self.info(&meta))
    }

    /// Refuses to go on with an upload that no longer fits under the quota: the tree grew (the game
    /// or the dev user wrote files) since the upload reserved its length.
    async fn check_still_fits(&self, jail: &Jail, meta: &Meta) -> Result<(), FileError> {
        if self.quota_of(jail).is_none() {
            return Ok(());
        }
        let (j, p, overwrite) = (jail.clone(), meta.path.clone(), meta.overwrite);
        // What the upload will replace frees its bytes; if the target cannot be checked, count none.
        let replaced = blocking(&meta.path, move || j.check_target(&p, overwrite)).await.map_or(0, |(_, r)| r);
        match self.quota_free_besides(jail, replaced, Some(&meta.id)).await? {
            Some(available) if meta.length > available => {
                Err(FileError::QuotaExceeded { path: meta.path.clone(), available })
            }
            _ => Ok(()),
        }
    }

    /// Drops upload `id` and its partial data (a completed upload's file stays).
    pub async fn cancel(&self, jail: &Jail, id: &str) -> Result<(), FileError> {
        check_id(id)?;
        let slot = self.slot(id);
        let _held = slot.take_over(id).await?;
        let meta = self.load_for(jail, id).await?;
        self.remove(jail, &meta).await?;
        tracing::info!(id, path = %meta.path, "upload cancelled");
        Ok(())
    }

    /// Removes uploads idle since before `now - ttl` (their partial data too), and metadata files
    /// that cannot be read. Uploads busy with a request are left alone. Returns how many went.
    pub async fn cleanup_expired(&self, now: SystemTime) -> Result<usize, FileError> {
        let dir = self.dir.clone();
        let entries = blocking("upload state", move || read_metas(&dir)).await?;
        let ttl = self.limits.upload_ttl.as_secs();
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut removed = 0;
        for (file, meta) in entries {
            let Some(meta) = meta else {
                let _ = tokio::fs::remove_file(&file).await;
                continue;
            };
            if meta.updated.saturating_add(ttl) > now {
                continue;
            }
            let slot = self.slot(&meta.id);
            let Ok(_held) = slot.lock.try_lock() else { continue };
            let root = meta.root.clone();
            let jail = match blocking(&meta.path, move || Jail::open(&root, None)).await {
                Ok(jail) => Some(jail),
                Err(e) => {
                    tracing::warn!(id = %meta.id, error = %e, "root of an expired upload is gone");
                    None
                }
            };
            match jail {
                Some(jail) => self.remove(&jail, &meta).await?,
                None => self.forget(&meta.id).await?,
            }
            tracing::info!(id = %meta.id, path = %meta.path, completed = meta.completed, "upload expired");
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes stray temp files in `jail`: atomic-write temps untouched since `older_than`, and
    /// upload data no upload knows (also untouched since `older_than`). Run it at startup and now
    /// and then; returns how many files went.
    pub async fn sweep(&self, jail: &Jail, older_than: SystemTime) -> Result<usize, FileError> {
        let (j, dir) = (jail.clone(), self.dir.clone());
        blocking(".", move || {
            j.sweep_temps(older_than, &|id| check_id(id).is_ok() && dir.join(format!("{id}.json")).exists())
        })
        .await
    }

    /// The quota of `jail`'s tree: the jail's own, else the configured one.
    pub fn quota_of(&self, jail: &Jail) -> Option<u64> {
        jail.quota().or(self.limits.quota_bytes)
    }

    /// Bytes a new file may still take under the quota when it replaces a file of `replaced`
    /// bytes; `None` without a quota. Counts the tree and the lengths of open uploads in it.
    pub async fn quota_free(&self, jail: &Jail, replaced: u64) -> Result<Option<u64>, FileError> {
        self.quota_free_besides(jail, replaced, None).await
    }

    /// [`UploadManager::quota_free`] not counting the reservation of upload `except`.
    async fn quota_free_besides(
        &self,
        jail: &Jail,
        replaced: u64,
        except: Option<&str>,
    ) -> Result<Option<u64>, FileError> {
        let Some(quota) = self.quota_of(jail) else { return Ok(None) };
        let except = except.map(str::to_owned);
        let root = jail.root_path().to_path_buf();
        let known = self.usage.lock().unwrap().get(&root).copied().filter(|m| m.at.elapsed() < USAGE_REMEASURE);
        let (j, dir, r) = (jail.clone(), self.dir.clone(), root.clone());
        let (used, reserved) = blocking(".", move || {
            let reserved: u64 = read_metas(&dir)?
                .into_iter()
                .filter_map(|(_, meta)| meta)
                .filter(|meta| !meta.completed && meta.root == r && Some(&meta.id) != except.as_ref())
                .map(|meta| meta.length)
                .sum();
            let used = match known {
                Some(m) => m.bytes,
                None => j.usage()?,
            };
            Ok((used, reserved))
        })
        .await?;
        if known.is_none() {
            self.usage.lock().unwrap().insert(root, Measured { bytes: used, at: tokio::time::Instant::now() });
        }
        Ok(Some(quota.saturating_sub(used.saturating_add(reserved)).saturating_add(replaced)))
    }

    /// Keeps the measured usage of `jail`'s tree current after the agent wrote `added` bytes in
    /// place of `removed` ones, so the next check needs no walk.
    pub fn note_written(&self, jail: &Jail, added: u64, removed: u64) {
        if let Some(m) = self.usage.lock().unwrap().get_mut(jail.root_path()) {
            m.bytes = m.bytes.saturating_add(added).saturating_sub(removed);
        }
    }

    /// Forgets the measured usage of `jail`'s tree (after a change of unknown size, such as a
    /// recursive delete): the next check walks it.
    pub fn forget_usage(&self, jail: &Jail) {
        self.usage.lock().unwrap().remove(jail.root_path());
    }

    /// Puts the complete file in place and records it, so a retried last request still succeeds.
    async fn finish(&self, jail: &Jail, meta: &mut Meta) -> Result<(), FileError> {
        let (j, id, path, overwrite) = (jail.clone(), meta.id.clone(), meta.path.clone(), meta.overwrite);
        let size = blocking(&meta.path, move || j.place_upload(&id, &path, overwrite)).await?;
        // The file may have replaced another of a size not known here: measure again.
        self.forget_usage(jail);
        meta.completed = true;
        meta.updated = unix_now();
        self.save(meta).await?;
        tracing::info!(id = %meta.id, path = %meta.path, size, "upload complete");
        Ok(())
    }

    async fn remove(&self, jail: &Jail, meta: &Meta) -> Result<(), FileError> {
        if !meta.completed {
            let (j, id) = (jail.clone(), meta.id.clone());
            blocking(&meta.path, move || j.remove_upload_part(&id)).await?;
        }
        self.forget(&meta.id).await
    }

    async fn forget(&self, id: &str) -> Result<(), FileError> {
        match tokio::fs::remove_file(self.meta_path(id)).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(FileError::Io { path: "upload state".into(), source: e }),
        }
        self.slots.lock().expect("slots lock").remove(id);
        Ok(())
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        self.slots.lock().expect("slots lock").entry(id.to_owned()).or_default().clone()
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// The metadata of `id`, if it belongs to `jail`'s root.
    async fn load_for(&self, jail: &Jail, id: &str) -> Result<Meta, FileError> {
        check_id(id)?;
        let unknown = || FileError::UnknownUpload { id: id.to_owned() };
        let bytes = match tokio::fs::read(self.meta_path(id)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(unknown()),
            Err(e) => return Err(FileError::Io { path: "upload state".into(), source: e }),
        };
        let meta: Meta = serde_json::from_slice(&bytes).map_err(|_| unknown())?;
        if meta.root != jail.root_path() {
            return Err(unknown());
        }
        Ok(meta)
    }

    async fn save(&self, meta: &Meta) -> Result<(), FileError> {
        let path = self.meta_path(&meta.id);
        let json = serde_json::to_vec(meta).expect("upload metadata serialises");
        blocking("upload state", move || {
            crate::atomic::write_file(&path, &json)
                .map_err(|e| FileError::Io { path: "upload state".into(), source: e })
        })
        .await
    }

    fn info(&self, meta: &Meta) -> UploadInfo {
        UploadInfo {
            id: meta.id.clone(),
            offset: meta.offset,
            length: meta.length,
            path: meta.path.clone(),
            expires: UNIX_EPOCH + Duration::from_secs(meta.updated) + self.limits.upload_ttl,
            completed: meta.completed,
        }
    }
}

/// Every file in the state dir with its metadata (`None` when unreadable, e.g. a torn aside file).
fn read_metas(dir: &Path) -> Result<Vec<(PathBuf, Option<Meta>)>, FileError> {
    let io_err = |e| FileError::Io { path: "upload state".into(), source: e };
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(io_err)? {
        let path = ent.map_err(io_err)?.path();
        let meta = std::fs::read(&path).ok().and_then(|bytes| serde_json::from_slice::<Meta>(&bytes).ok());
        out.push((path, meta));
    }
    Ok(out)
}

/// Upload ids are 32 lowercase hex digits; anything else is unknown before it touches a path.
fn check_id(id: &str) -> Result<(), FileError> {
    if id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(FileError::UnknownUpload { id: id.chars().take(64).collect() })
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

/// Why [`copy_stream`] returned.
pub(crate) enum CopyEnd {
    /// The stream ended.
    Done,
    /// `pause_after` bytes were written, or a checkpoint was asked for; call again to go on.
    Paused,
    /// The next chunk would pass `limit`; it was not written.
    OverLimit,
    /// `stop` fired.
    Stopped,
    /// The stream failed (the sender went away).
    Source(String),
    /// Writing failed.
    Sink(io::Error),
}

/// Copies chunks from `stream` into `file` one at a time (memory: one chunk), returning the bytes
/// written and why it stopped. Every written chunk is whole; a chunk is never split. A signal on
/// `checkpoint` pauses it between chunks once the stream goes quiet.
pub(crate) async fn copy_stream<S, B, E, F>(
    stream: &mut Pin<&mut S>,
    file: &mut tokio::fs::File,
    limit: u64,
    pause_after: u64,
    stop: &mut F,
    checkpoint: Option<&tokio::sync::Notify>,
) -> (u64, CopyEnd)
where
    S: Stream<Item = Result<B, E>>,
    B: AsRef<[u8]>,
    E: std::fmt::Display,
    F: Future<Output = ()> + Unpin,
{
    let mut written = 0u64;
    // A checkpoint asked for is taken once the stream has been quiet for `CHECKPOINT_QUIET`: a
    // client that sent its bytes and went away has them all counted (its stream runs on to its
    // end), while one that went silent is saved a moment later.
    let mut wanted = false;
    loop {
        let quiet = tokio::time::sleep(CHECKPOINT_QUIET);
        let item = tokio::select! {
            biased;
            () = &mut *stop => return (written, CopyEnd::Stopped),
            item = stream.next() => item,
            () = async {
                match checkpoint {
                    Some(c) => c.notified().await,
                    None => std::future::pending().await,
                }
            }, if !wanted => {
                wanted = true;
                continue;
            }
            () = quiet, if wanted => return (written, CopyEnd::Paused),
        };
        let chunk = match item {
            None => return (written, CopyEnd::Done),
            Some(Err(e)) => return (written, CopyEnd::Source(e.to_string())),
            Some(Ok(chunk)) => chunk,
        };
        let chunk = chunk.as_ref();
        if written + chunk.len() as u64 > limit {
            return (written, CopyEnd::OverLimit);
        }
        if let Err(e) = file.write_all(chunk).await {
            return (written, CopyEnd::Sink(e));
        }
        written += chunk.len() as u64;
        if written >= pause_after {
            return (written, CopyEnd::Paused);
        }
    }
}
