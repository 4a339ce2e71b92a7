//! Resumable uploads on real directories: pieces at exact offsets, interruption keeps what arrived,
//! nothing is visible until the last byte, and cancel, expiry and the sweep leave nothing behind.

use std::fs;
use std::io;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use futures::stream::{self, Stream, StreamExt};
use sha2::{Digest, Sha256};
use zlh_core::files::{FileError, Jail, UploadLimits, UploadManager};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    state: PathBuf,
    jail: Jail,
    uploads: UploadManager,
}

fn fixture(limits: UploadLimits) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let state = tmp.path().join("state");
    fs::create_dir_all(root.join("mods")).unwrap();
    let jail = Jail::open(&root, None).unwrap();
    let uploads = UploadManager::new(&state, limits).unwrap();
    Fixture { _tmp: tmp, root, state, jail, uploads }
}

impl Fixture {
    /// Names in the root a user could see, and the agent's hidden ones, apart.
    fn visible(&self, dir: &str) -> Vec<String> {
        self.jail.list(dir).unwrap().into_iter().map(|e| e.name).collect()
    }

    fn hidden(&self) -> Vec<String> {
        fs::read_dir(&self.root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".zlh-"))
            .collect()
    }

    fn state_files(&self) -> usize {
        fs::read_dir(self.state.join("uploads")).unwrap().count()
    }
}

/// Deterministic content: byte i is a function of i.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn chunks(data: &[u8], size: usize) -> impl Stream<Item = Result<Vec<u8>, io::Error>> {
    stream::iter(data.chunks(size).map(|c| Ok(c.to_vec())).collect::<Vec<_>>())
}

fn sha(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

#[tokio::test]
async fn pieces_at_exact_offsets_complete_with_one_rename() {
    let f = fixture(UploadLimits::default());
    let data = content(300_000);
    let up = f.uploads.create(&f.jail, "mods/big.jar", data.len() as u64, false).await.unwrap();
    assert_eq!((up.offset, up.length, up.path.as_str(), up.completed), (0, 300_000, "mods/big.jar", false));
    assert_eq!(up.id.len(), 32);

    let mut offset = 0;
    for piece in data.chunks(100_000) {
        assert!(!f.root.join("mods/big.jar").exists(), "the target never exists in part");
        assert_eq!(f.visible("mods"), Vec::<String>::new());
        assert_eq!(f.visible(""), vec!["mods"]);
        let info = f.uploads.append(&f.jail, &up.id, offset, None, chunks(piece, 8192)).await.unwrap();
        offset += piece.len() as u64;
        assert_eq!(info.offset, offset);
        assert_eq!(f.uploads.status(&f.jail, &up.id).await.unwrap().offset, offset);
    }
    let done = f.uploads.status(&f.jail, &up.id).await.unwrap();
    assert!(done.completed);
    assert_eq!(sha(&fs::read(f.root.join("mods/big.jar")).unwrap()), sha(&data));
    assert!(f.hidden().is_empty(), "the partial file became the target");
    // A retried last request (the client missed the answer) still succeeds.
    let again = f.uploads.append(&f.jail, &up.id, 300_000, None, stream::empty::<Result<Vec<u8>, io::Error>>()).await;
    assert!(again.unwrap().completed);
}

#[tokio::test]
async fn a_wrong_offset_is_a_conflict_that_tells_the_real_one() {
    let f = fixture(UploadLimits::default());
    let data = content(1000);
    let up = f.uploads.create(&f.jail, "a.bin", 1000, false).await.unwrap();
    f.uploads.append(&f.jail, &up.id, 0, None, chunks(&data[..400], 100)).await.unwrap();
    for wrong in [0, 399, 401, 1000] {
        let err = f.uploads.append(&f.jail, &up.id, wrong, None, chunks(&data[400..], 100)).await.unwrap_err();
        assert!(matches!(err, FileError::OffsetConflict { current: 400, got } if got == wrong), "{err:?}");
    }
    assert_eq!(f.uploads.status(&f.jail, &up.id).await.unwrap().offset, 400);
    f.uploads.append(&f.jail, &up.id, 400, None, chunks(&data[400..], 100)).await.unwrap();
    assert_eq!(fs::read(f.root.join("a.bin")).unwrap(), data);
}

#[tokio::test]
async fn an_interrupted_append_keeps_what_arrived_and_shows_nothing() {
    let f = fixture(UploadLimits::default());
    let data = content(100_000);
    let up = f.uploads.create(&f.jail, "mods/x.jar", 100_000, false).await.unwrap();
    // 30 000 bytes, then the connection drops.
    let broken =
        chunks(&data[..30_000], 10_000).chain(stream::once(async { Err(io::Error::other("connection reset")) }));
    let err = f.uploads.append(&f.jail, &up.id, 0, None, broken).await.unwrap_err();
    assert!(matches!(err, FileError::Interrupted { written: 30_000, .. }), "{err:?}");
    assert_eq!(f.uploads.status(&f.jail, &up.id).await.unwrap().offset, 30_000);
    assert!(!f.root.join("mods/x.jar").exists());
    assert!(f.visible("mods").is_empty());
    // The client resumes where the agent says.
    f.uploads.append(&f.jail, &up.id, 30_000, None, chunks(&data[30_000..], 7_000)).await.unwrap();
    assert_eq!(sha(&fs::read(f.root.join("mods/x.jar")).unwrap()), sha(&data));
}

#[tokio::test]
async fn bytes_beyond_the_length_are_refused() {
    let f = fixture(UploadLimits::default());
    let up = f.uploads.create(&f.jail, "a.bin", 100, false).await.unwrap();
    let err = f.uploads.append(&f.jail, &up.id, 0, None, chunks(&content(150), 60)).await.unwrap_err();
    assert!(matches!(err, FileError::TooLarge { limit: 100, .. }), "{err:?}");
    // The first whole chunk that fit was kept; the one that would overflow was not written.
    assert_eq!(f.uploads.status(&f.jail, &up.id).await.unwrap().offset, 60);
    assert!(!f.root.join("a.bin").exists());
    // A declared body length that would pass the end is refused before any byte is read.
    let err = f.uploads.append(&f.jail, &up.id, 60, Some(41), chunks(&content(40), 40)).await.unwrap_err();
    assert!(matches!(err, FileError::TooLarge { limit: 100, .. }), "{err:?}");
    assert_eq!(f.uploads.status(&f.jail, &up.id).await.unwrap().offset, 60);
    f.uploads.append(&f.jail, &up.id, 60, Some(40), chunks(&content(40), 40)).await.unwrap();
    assert!(f.root.join("a.bin").exists());
}

#[tokio::test]
async fn size_limit_and_quota_are_checked_at_creation() {
    let limits = UploadLimits { max_file_bytes: 10_000, quota_bytes: Some(25_000), ..UploadLimits::default() };
    let f = fixture(limits);
    fs::write(f.root.join("mods/existing"), vec![0u8; 5_000]).unwrap();
    let err = f.uploads.create(&f.jail, "big", 10_001, false).await.unwrap_err();
    assert!(matches!(err, FileError::TooLarge { limit: 10_000, .. }), "{err:?}");
    // 5 000 used + 10 000 reserved by an open upload leaves 10 000.
    f.uploads.create(&f.jail, "one", 10_000, false).await.unwrap();
    let err = f.uploads.create(&f.jail, "two", 10_001, false).await.unwrap_err();
    assert!(matches!(err, FileError::TooLarge { .. } | FileError::QuotaExceeded { .. }), "{err:?}");
    let two = f.uploads.create(&f.jail, "two", 10_000, false).await.unwrap();
    let err = f.uploads.create(&f.jail, "three", 1, false).await.unwrap_err();
    assert!(matches!(err, FileError::QuotaExceeded { available: 0, .. }), "{err:?}");
    // Replacing a file frees its bytes; cancelling frees the reservation.
    f.uploads.create(&f.jail, "mods/existing", 5_000, true).await.unwrap();
    f.uploads.cancel(&f.jail, &two.id).await.unwrap();
    f.uploads.create(&f.jail, "three", 1, false).await.unwrap();
    assert_eq!(f.uploads.quota_free(&f.jail, 0).await.unwrap(), Some(25_000 - 5_000 - 10_000 - 5_000 - 1));
}

#[tokio::test]
async fn targets_are_checked_up_front_and_again_at_the_end() {
    let f = fixture(UploadLimits::default());
    fs::write(f.root.join("mods/taken"), "old").unwrap();
    std::os::unix::fs::symlink("/etc", f.root.join("etc")).unwrap();
    let refused = [
        ("mods/taken", FileError::AlreadyExists { path: String::new() }),
        ("mods", FileError::IsADirectory { path: String::new() }),
        ("../x", FileError::Escape { path: String::new() }),
        ("etc/x", FileError::Escape { path: String::new() }),
        ("/abs", FileError::InvalidPath { path: String::new(), reason: String::new() }),
        ("", FileError::IsADirectory { path: String::new() }),
    ];
    for (path, want) in refused {
        let err = f.uploads.create(&f.jail, path, 3, false).await.unwrap_err();
        assert_eq!(std::mem::discriminant(&err), std::mem::discriminant(&want), "{path}: {err:?}");
    }
    assert_eq!(f.state_files(), 0);

    // Missing parents are made at the end; a file that appeared meanwhile is not replaced.
    let up = f.uploads.create(&f.jail, "new/dir/file", 3, false).await.unwrap();
    assert!(!f.root.join("new").exists());
    let race = f.uploads.create(&f.jail, "mods/later", 3, false).await.unwrap();
    fs::write(f.root.join("mods/later"), "someone else").unwrap();
    let err = f.uploads.append(&f.jail, &race.id, 0, None, chunks(b"abc", 3)).await.unwrap_err();
    assert!(matches!(err, FileError::AlreadyExists { .. }), "{err:?}");
    assert_eq!(fs::read_to_string(f.root.join("mods/later")).unwrap(), "someone else");
    f.uploads.append(&f.jail, &up.id, 0, None, chunks(b"abc", 3)).await.unwrap();
    assert_eq!(fs::read_to_string(f.root.join("new/dir/file")).unwrap(), "abc");

    // With overwrite, the old file is replaced whole at the last byte.
    let up = f.uploads.create(&f.jail, "mods/taken", 3, true).await.unwrap();
    f.uploads.append(&f.jail, &up.id, 0, None, chunks(b"new", 1)).await.unwrap();
    assert_eq!(fs::read_to_string(f.root.join("mods/taken")).unwrap(), "new");
}

#[tokio::test]
async fn an_empty_upload_is_complete_at_once() {
    let f = fixture(UploadLimits::default());
    let up = f.uploads.create(&f.jail, "empty.txt", 0, false).await.unwrap();
    assert!(up.completed);
    assert_eq!(fs::read(f.root.join("empty.txt")).unwrap(), b"");
}

#[tokio::test]
async fn cancel_removes_the_partial_data() {
    let f = fixture(UploadLimits::default());
    let up = f.uploads.create(&f.jail, "a.bin", 1000, false).await.unwrap();
    f.uploads.append(&f.jail, &up.id, 0, None, chunks(&content(500), 100)).await.unwrap();
    assert_eq!(f.hidden().len(), 1);
    f.uploads.cancel(&f.jail, &up.id).await.unwrap();
    assert!(f.hidden().is_empty());
    assert_eq!(f.state_files(), 0);
    assert!(!f.root.join("a.bin").exists());
    let err = f.uploads.status(&f.jail, &up.id).await.unwrap_err();
    assert!(matches!(err, FileError::UnknownUpload { .. }));
    assert!(matches!(f.uploads.cancel(&f.jail, &up.id).await, Err(FileError::UnknownUpload { .. })));
}

#[tokio::test]
async fn ids_that_are_not_ours_touch_nothing() {
    let f = fixture(UploadLimits::default());
    fs::write(f.state.join("secret.json"), "{}").unwrap();
    for id in ["../secret", "../../root/mods", "ABCDEF0123456789ABCDEF0123456789", "", "0123"] {
        assert!(matches!(f.uploads.status(&f.jail, id).await, Err(FileError::UnknownUpload { .. })), "{id}");
        assert!(matches!(f.uploads.cancel(&f.jail, id).await, Err(FileError::UnknownUpload { .. })));
        let body = chunks(b"x", 1);
        assert!(matches!(f.uploads.append(&f.jail, id, 0, None, body).await, Err(FileError::UnknownUpload { .. })));
    }
    assert!(f.state.join("secret.json").exists());
    // An upload belongs to the root it was made in.
    let up = f.uploads.create(&f.jail, "a", 10, false).await.unwrap();
    let other = tempfile::tempdir().unwrap();
    let other = Jail::open(other.path(), None).unwrap();
    assert!(matches!(f.uploads.status(&other, &up.id).await, Err(FileError::UnknownUpload { .. })));
}

#[tokio::test]
async fn idle_uploads_expire_and_strays_are_swept() {
    let limits = UploadLimits { upload_ttl: Duration::from_secs(3600), ..UploadLimits::default() };
    let f = fixture(limits);
    let up = f.uploads.create(&f.jail, "a.bin", 1000, false).await.unwrap();
    f.uploads.append(&f.jail, &up.id, 0, None, chunks(&content(10), 10)).await.unwrap();
    let done = f.uploads.create(&f.jail, "done.bin", 1, false).await.unwrap();
    f.uploads.append(&f.jail, &done.id, 0, None, chunks(b"x", 1)).await.unwrap();

    let now = SystemTime::now();
    assert_eq!(f.uploads.cleanup_expired(now + Duration::from_secs(60)).await.unwrap(), 0);
    assert!(f.uploads.status(&f.jail, &up.id).await.is_ok());
    assert!(up.expires > now && up.expires <= now + Duration::from_secs(3601));
    assert_eq!(f.uploads.cleanup_expired(now + Duration::from_secs(3602)).await.unwrap(), 2);
    assert!(matches!(f.uploads.status(&f.jail, &up.id).await, Err(FileError::UnknownUpload { .. })));
    assert!(f.hidden().is_empty());
    assert_eq!(f.state_files(), 0);
    assert!(f.root.join("done.bin").exists(), "a finished upload's file stays");

    // Leftovers of a crash: an atomic-write temp deep in the tree and upload data nobody knows.
    fs::write(f.root.join("mods/.zlh-tmp-deadbeef"), "half").unwrap();
    fs::write(f.root.join(".zlh-upload-0123456789abcdef0123456789abcdef"), "orphan").unwrap();
    let live = f.uploads.create(&f.jail, "live.bin", 10, false).await.unwrap();
    let later = SystemTime::now() + Duration::from_secs(1);
    assert_eq!(f.uploads.sweep(&f.jail, later).await.unwrap(), 2);
    assert_eq!(f.hidden(), vec![format!(".zlh-upload-{}", live.id)], "a live upload is kept");
    assert!(!f.root.join("mods/.zlh-tmp-deadbeef").exists());
    // Recent temps may belong to writes in flight.
    fs::write(f.root.join("mods/.zlh-tmp-beef"), "in flight").unwrap();
    assert_eq!(f.uploads.sweep(&f.jail, SystemTime::now() - Duration::from_secs(3600)).await.unwrap(), 0);
}

#[tokio::test]
async fn a_new_request_takes_over_from_a_stalled_one() {
    let f = fixture(UploadLimits::default());
    let data = content(1000);
    let up = f.uploads.create(&f.jail, "a.bin", 1000, false).await.unwrap();
    // The first request sends 100 bytes and then stalls forever, as a dead connection would.
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
    let first = chunks(&data[..100], 100).chain(stream::once(async move {
        let _ = stalled_tx.send(());
        std::future::pending::<Result<Vec<u8>, io::Error>>().await
    }));
    let uploads = &f.uploads;
    let jail = &f.jail;
    let id = up.id.clone();
    let stalled = async move { uploads.append(jail, &id, 0, None, first).await };
    let resume = async {
        stalled_rx.await.unwrap();
        // The client (which believes nothing arrived) tries offset 0 and learns the truth.
        let err = f.uploads.append(&f.jail, &up.id, 0, None, chunks(&data, 100)).await.unwrap_err();
        assert!(matches!(err, FileError::OffsetConflict { current: 100, .. }), "{err:?}");
        f.uploads.append(&f.jail, &up.id, 100, None, chunks(&data[100..], 100)).await.unwrap()
    };
    let (stalled, resumed) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(stalled, resume) }).await.unwrap();
    assert!(matches!(stalled, Err(FileError::UploadBusy { .. })), "{stalled:?}");
    assert!(resumed.completed);
    assert_eq!(fs::read(f.root.join("a.bin")).unwrap(), data);
}

#[tokio::test]
async fn status_during_a_stalled_request_reports_every_byte_that_arrived() {
    let f = fixture(UploadLimits::default());
    let data = content(1000);
    let up = f.uploads.create(&f.jail, "a.bin", 1000, false).await.unwrap();
    // 300 bytes, then the sender goes silent with the request still open.
    let (stalled_tx, stalled_rx) = tokio::sync::oneshot::channel::<()>();
    let first = chunks(&data[..300], 100).chain(stream::once(async move {
        let _ = stalled_tx.send(());
        std::future::pending::<Result<Vec<u8>, io::Error>>().await
    }));
    let (uploads, jail, id) = (&f.uploads, &f.jail, up.id.clone());
    let stalled = async move { uploads.append(jail, &id, 0, None, first).await };
    let query = async {
        stalled_rx.await.unwrap();
        let asked = std::time::Instant::now();
        let status = f.uploads.status(&f.jail, &up.id).await.unwrap();
        assert_eq!(status.offset, 300, "the bytes received, not the last periodic save");
        assert!(asked.elapsed() < Duration::from_secs(2), "answered while the request still holds it");
        // The offset is saved: a client resuming from it takes over and completes the file.
        f.uploads.append(&f.jail, &up.id, 300, None, chunks(&data[300..], 100)).await.unwrap()
    };
    let (stalled, resumed) =
        tokio::time::timeout(Duration::from_secs(30), async { tokio::join!(stalled, query) }).await.unwrap();
    assert!(matches!(stalled, Err(FileError::UploadBusy { .. })), "{stalled:?}");
    assert!(resumed.completed);
    assert_eq!(fs::read(f.root.join("a.bin")).unwrap(), data);
}

#[tokio::test]
async fn owner_gets_the_uploaded_file() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: chown needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let f = fixture(UploadLimits::default());
    let jail = Jail::open(&f.root, Some((65534, 65534))).unwrap();
    let up = f.uploads.create(&jail, "made/for/you.txt", 2, false).await.unwrap();
    f.uploads.append(&jail, &up.id, 0, None, chunks(b"hi", 2)).await.unwrap();
    for p in ["made", "made/for", "made/for/you.txt"] {
        let meta = fs::metadata(f.root.join(p)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534), "{p}");
    }
    assert_eq!(fs::metadata(f.root.join("made/for/you.txt")).unwrap().mode() & 0o777, 0o644);
}

#[tokio::test]
async fn the_jails_quota_wins_and_is_checked_again_when_bytes_arrive() {
    let f = fixture(UploadLimits { quota_bytes: Some(1 << 30), ..UploadLimits::default() });
    let jail = f.jail.clone().with_quota(Some(20_000));
    let up = f.uploads.create(&jail, "a.bin", 10_000, false).await.unwrap();
    let err = f.uploads.create(&jail, "b.bin", 10_001, false).await.unwrap_err();
    assert!(matches!(err, FileError::QuotaExceeded { available: 10_000, .. }), "{err:?}");

    // The game writes 15 000 bytes behind the agent's back; the next measurement sees them.
    fs::write(f.root.join("world.dat"), vec![9u8; 15_000]).unwrap();
    f.uploads.forget_usage(&jail);
    let err = f.uploads.append(&jail, &up.id, 0, Some(10_000), chunks(&content(10_000), 1_000)).await.unwrap_err();
    assert!(matches!(err, FileError::QuotaExceeded { available: 5_000, .. }), "{err:?}");
    assert_eq!(f.uploads.status(&jail, &up.id).await.unwrap().offset, 0, "nothing was taken");
    assert!(!f.root.join("a.bin").exists());
    assert_eq!(fs::read(f.root.join("world.dat")).unwrap(), vec![9u8; 15_000], "existing files intact");

    // Room again: the upload goes on where it was.
    fs::remove_file(f.root.join("world.dat")).unwrap();
    f.uploads.forget_usage(&jail);
    f.uploads.append(&jail, &up.id, 0, Some(10_000), chunks(&content(10_000), 1_000)).await.unwrap();
    assert_eq!(fs::read(f.root.join("a.bin")).unwrap(), content(10_000));
}
