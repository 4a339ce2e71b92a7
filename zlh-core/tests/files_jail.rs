//! The file manager's confinement and atomicity, on real directories: traversal and symlink
//! escapes are refused and change nothing outside; writes replace whole files or nothing.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zlh_core::files::{EntryKind, FileError, Jail};

/// A root to jail, beside an `outside` dir holding a secret nothing may reach.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
    jail: Jail,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    let outside = tmp.path().join("outside");
    fs::create_dir_all(root.join("data/sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret"), "top secret").unwrap();
    fs::write(root.join("data/file.txt"), "hello").unwrap();
    fs::write(root.join("readme.md"), "# readme").unwrap();
    let jail = Jail::open(&root, None).unwrap();
    Fixture { _tmp: tmp, root, outside, jail }
}

impl Fixture {
    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec!["secret"], "nothing created or removed outside the root");
        assert_eq!(fs::read_to_string(self.outside.join("secret")).unwrap(), "top secret");
    }

    fn temps_in(&self, dir: &str) -> Vec<String> {
        fs::read_dir(self.root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".zlh-"))
            .collect()
    }
}

fn read_all(jail: &Jail, path: &str) -> Result<String, FileError> {
    let (mut file, len) = jail.open_read(path)?;
    let mut s = String::new();
    file.read_to_string(&mut s).unwrap();
    assert_eq!(s.len() as u64, len);
    Ok(s)
}

fn is_escape<T: std::fmt::Debug>(r: Result<T, FileError>) -> bool {
    matches!(r, Err(FileError::Escape { .. }))
}

#[test]
fn dot_dot_traversal_is_refused_everywhere() {
    let f = fixture();
    for path in ["../outside/secret", "a/../../outside/secret", "data/../../outside/secret", ".."] {
        assert!(is_escape(f.jail.list(path)), "list {path}");
        assert!(is_escape(f.jail.open_read(path)), "read {path}");
        assert!(is_escape(f.jail.write_atomic(path, &b"pwned"[..], 100)), "write {path}");
        assert!(is_escape(f.jail.mkdir(path)), "mkdir {path}");
        assert!(is_escape(f.jail.remove(path, true)), "remove {path}");
        assert!(is_escape(f.jail.rename("readme.md", path, true)), "rename to {path}");
        assert!(is_escape(f.jail.rename(path, "stolen", false)), "rename from {path}");
    }
    // `..` that stays inside is just a path.
    assert_eq!(read_all(&f.jail, "data/sub/../file.txt").unwrap(), "hello");
    f.assert_outside_untouched();
    assert!(f.root.join("readme.md").exists());
}

#[test]
fn absolute_paths_and_nul_bytes_are_invalid() {
    let f = fixture();
    let secret = f.outside.join("secret");
    for path in [secret.to_str().unwrap(), "/etc/passwd", "data/\0file.txt"] {
        assert!(matches!(f.jail.open_read(path), Err(FileError::InvalidPath { .. })), "{path:?}");
        assert!(matches!(f.jail.write_atomic(path, &b"x"[..], 10), Err(FileError::InvalidPath { .. })));
    }
    f.assert_outside_untouched();
}

#[test]
fn symlink_to_etc_inside_the_tree_leads_nowhere() {
    let f = fixture();
    symlink("/etc", f.root.join("etc")).unwrap();
    assert!(is_escape(f.jail.list("etc")));
    assert!(is_escape(f.jail.open_read("etc/passwd")));
    assert!(is_escape(f.jail.open_read("etc/hostname")));
    assert!(is_escape(f.jail.write_atomic("etc/zlh-escape-test", &b"pwned"[..], 100)));
    assert!(!Path::new("/etc/zlh-escape-test").exists());
    assert!(is_escape(f.jail.mkdir("etc/zlh-escape-dir")));
    assert!(!Path::new("/etc/zlh-escape-dir").exists());
    assert!(is_escape(f.jail.remove("etc/hostname", false)));
    assert!(is_escape(f.jail.rename("readme.md", "etc/zlh-escape-test", false)));
    assert!(f.root.join("readme.md").exists());
    // The link itself is an entry of the tree: listed as a symlink, and removable (not its target).
    let entries = f.jail.list("").unwrap();
    let link = entries.iter().find(|e| e.name == "etc").unwrap();
    assert_eq!(link.kind, EntryKind::Symlink);
    f.jail.remove("etc", true).unwrap();
    assert!(Path::new("/etc/hostname").exists() || Path::new("/etc/passwd").exists());
    assert!(!f.root.join("etc").exists());
}

#[test]
fn relative_symlinks_out_of_the_root_are_refused() {
    let f = fixture();
    symlink("../outside", f.root.join("up")).unwrap();
    symlink("../../outside/secret", f.root.join("data/pw")).unwrap();
    assert!(is_escape(f.jail.list("up")));
    assert!(is_escape(f.jail.open_read("up/secret")));
    assert!(is_escape(f.jail.write_atomic("up/new", &b"pwned"[..], 100)));
    assert!(is_escape(f.jail.write_atomic("up/secret", &b"pwned"[..], 100)));
    assert!(is_escape(f.jail.open_read("data/pw")));
    // Writing onto a file symlink that leads out neither follows it nor replaces the link.
    assert!(is_escape(f.jail.write_atomic("data/pw", &b"pwned"[..], 100)));
    assert!(fs::symlink_metadata(f.root.join("data/pw")).unwrap().file_type().is_symlink());
    assert!(is_escape(f.jail.mkdir("up/x")));
    assert!(is_escape(f.jail.rename("up/secret", "stolen", false)));
    f.assert_outside_untouched();
    assert!(f.temps_in("").is_empty() && f.temps_in("data").is_empty());
}

#[test]
fn symlinks_inside_the_root_work_and_writes_keep_the_link() {
    let f = fixture();
    symlink("data/file.txt", f.root.join("link")).unwrap();
    symlink("..", f.root.join("data/sub/back")).unwrap();
    assert_eq!(read_all(&f.jail, "link").unwrap(), "hello");
    assert_eq!(read_all(&f.jail, "data/sub/back/file.txt").unwrap(), "hello");
    assert_eq!(f.jail.list("data/sub/back").unwrap().len(), 2);
    f.jail.write_atomic("link", &b"via link"[..], 100).unwrap();
    assert!(fs::symlink_metadata(f.root.join("link")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_to_string(f.root.join("data/file.txt")).unwrap(), "via link");
}

#[test]
fn list_is_sorted_dirs_first_and_hides_temps() {
    let f = fixture();
    fs::create_dir(f.root.join("zdir")).unwrap();
    fs::write(f.root.join("a.txt"), "12345").unwrap();
    fs::write(f.root.join(".zlh-tmp-0123"), "partial").unwrap();
    fs::write(f.root.join(".zlh-upload-0123"), "partial").unwrap();
    fs::write(f.root.join(".hidden"), "dotfile").unwrap();
    let names: Vec<_> = f.jail.list("").unwrap().into_iter().map(|e| (e.name, e.kind)).collect();
    assert_eq!(
        names,
        vec![
            ("data".into(), EntryKind::Dir),
            ("zdir".into(), EntryKind::Dir),
            (".hidden".into(), EntryKind::File),
            ("a.txt".into(), EntryKind::File),
            ("readme.md".into(), EntryKind::File),
        ]
    );
    let a = f.jail.stat("a.txt").unwrap();
    assert_eq!((a.kind, a.size), (EntryKind::File, 5));
    assert!(a.modified.is_some());
    assert!(matches!(f.jail.list("a.txt"), Err(FileError::NotADirectory { .. })));
    assert!(matches!(f.jail.list("nope"), Err(FileError::NotFound { .. })));
    // Temp names are not user paths.
    assert!(matches!(f.jail.open_read(".zlh-tmp-0123"), Err(FileError::InvalidPath { .. })));
    assert!(matches!(f.jail.remove(".zlh-upload-0123", false), Err(FileError::InvalidPath { .. })));
}

/// A reader that yields `good` bytes, then fails like a dropped connection.
struct Failing {
    good: usize,
}

impl Read for Failing {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good == 0 {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "peer went away"));
        }
        let n = buf.len().min(self.good);
        buf[..n].fill(b'x');
        self.good -= n;
        Ok(n)
    }
}

#[test]
fn a_failed_write_leaves_the_old_file_whole_and_no_temp() {
    let f = fixture();
    let err = f.jail.write_atomic("data/file.txt", Failing { good: 100_000 }, 1 << 20).unwrap_err();
    assert!(matches!(err, FileError::Io { .. }), "{err:?}");
    assert_eq!(fs::read_to_string(f.root.join("data/file.txt")).unwrap(), "hello");
    assert!(f.temps_in("data").is_empty());
}

#[test]
fn readers_see_the_old_content_until_commit() {
    let f = fixture();
    fs::set_permissions(f.root.join("data/file.txt"), fs::Permissions::from_mode(0o751)).unwrap();
    let mut w = f.jail.begin_write("data/file.txt").unwrap();
    w.file().write_all(b"half of the new").unwrap();
    assert_eq!(read_all(&f.jail, "data/file.txt").unwrap(), "hello");
    assert_eq!(f.jail.list("data").unwrap().len(), 2, "the temp is not listed");
    w.file().write_all(b" content").unwrap();
    assert_eq!(w.commit().unwrap(), 23);
    assert_eq!(read_all(&f.jail, "data/file.txt").unwrap(), "half of the new content");
    let mode = fs::metadata(f.root.join("data/file.txt")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o751, "a replaced file keeps its mode");
    assert!(f.temps_in("data").is_empty());
    // A dropped write leaves nothing.
    let mut w = f.jail.begin_write("new.txt").unwrap();
    w.file().write_all(b"never").unwrap();
    drop(w);
    assert!(!f.root.join("new.txt").exists());
    assert!(f.temps_in("").is_empty());
}

#[test]
fn size_limit_is_enforced_while_writing() {
    let f = fixture();
    let err = f.jail.write_atomic("data/file.txt", io::repeat(b'a').take(10_000), 4096).unwrap_err();
    assert!(matches!(err, FileError::TooLarge { limit: 4096, .. }), "{err:?}");
    assert_eq!(fs::read_to_string(f.root.join("data/file.txt")).unwrap(), "hello");
    assert_eq!(f.jail.write_atomic("data/file.txt", io::repeat(b'a').take(4096), 4096).unwrap(), 4096);
    assert!(f.temps_in("data").is_empty());
}

#[tokio::test]
async fn write_stream_is_atomic_and_respects_size_and_quota() {
    let f = fixture();
    let chunks = |n: usize| futures::stream::iter((0..n).map(|_| Ok::<_, io::Error>(vec![b'z'; 1000])));
    assert_eq!(f.jail.write_stream("big.bin", chunks(50), 1 << 20, None).await.unwrap(), 50_000);
    assert_eq!(fs::metadata(f.root.join("big.bin")).unwrap().len(), 50_000);
    let err = f.jail.write_stream("big.bin", chunks(50), 10_000, None).await.unwrap_err();
    assert!(matches!(err, FileError::TooLarge { limit: 10_000, .. }), "{err:?}");
    let err = f.jail.write_stream("big.bin", chunks(50), 1 << 20, Some(20_000)).await.unwrap_err();
    assert!(matches!(err, FileError::QuotaExceeded { available: 20_000, .. }), "{err:?}");
    let broken = futures::stream::iter(vec![Ok(vec![1u8; 10]), Err(io::Error::other("reset"))]);
    let err = f.jail.write_stream("big.bin", broken, 1 << 20, None).await.unwrap_err();
    assert!(matches!(err, FileError::Interrupted { written: 10, .. }), "{err:?}");
    assert_eq!(fs::metadata(f.root.join("big.bin")).unwrap().len(), 50_000, "old content stays");
    assert!(f.temps_in("").is_empty());
}

#[test]
fn mkdir_rename_and_remove() {
    let f = fixture();
    f.jail.mkdir("a/b/c").unwrap();
    f.jail.mkdir("a/b/c").unwrap();
    assert!(f.root.join("a/b/c").is_dir());
    assert!(matches!(f.jail.mkdir("readme.md/x"), Err(FileError::NotADirectory { .. })));

    f.jail.rename("readme.md", "a/b/README.md", false).unwrap();
    assert!(!f.root.join("readme.md").exists());
    assert_eq!(read_all(&f.jail, "a/b/README.md").unwrap(), "# readme");
    // No replacing unless asked; never a directory.
    assert!(matches!(f.jail.rename("data/file.txt", "a/b/README.md", false), Err(FileError::AlreadyExists { .. })));
    assert!(matches!(f.jail.rename("data/file.txt", "a/b", true), Err(FileError::IsADirectory { .. })));
    assert!(matches!(f.jail.rename("data/file.txt", "a/b", false), Err(FileError::AlreadyExists { .. })));
    f.jail.rename("data/file.txt", "a/b/README.md", true).unwrap();
    assert_eq!(read_all(&f.jail, "a/b/README.md").unwrap(), "hello");
    assert!(matches!(f.jail.rename("a", "a/b/c/a", false), Err(FileError::InvalidPath { .. })));
    assert!(matches!(f.jail.rename("missing", "x", false), Err(FileError::NotFound { .. })));
    assert!(matches!(f.jail.rename("", "x", false), Err(FileError::InvalidPath { .. })));

    assert!(matches!(f.jail.remove("a", false), Err(FileError::NotEmpty { .. })));
    f.jail.remove("a/b/README.md", false).unwrap();
    f.jail.remove("a", true).unwrap();
    assert!(!f.root.join("a").exists());
    assert!(matches!(f.jail.remove("", true), Err(FileError::InvalidPath { .. })));
    assert!(matches!(f.jail.remove("a", true), Err(FileError::NotFound { .. })));
    assert!(f.root.exists());
}

#[test]
fn errors_name_the_user_path_never_the_host_path() {
    let f = fixture();
    symlink("/etc", f.root.join("etc")).unwrap();
    let host = f.root.to_string_lossy().into_owned();
    let errors = [
        f.jail.open_read("missing/file").unwrap_err(),
        f.jail.open_read("etc/passwd").unwrap_err(),
        f.jail.list("../x").unwrap_err(),
        f.jail.remove("data", false).unwrap_err(),
    ];
    for e in errors {
        let text = e.to_string();
        assert!(!text.contains(&host), "{text}");
        assert!(
            text.contains("missing/file")
                || text.contains("etc/passwd")
                || text.contains("../x")
                || text.contains("data")
        );
    }
}

#[test]
fn a_fifo_is_refused_without_blocking() {
    let f = fixture();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        f.root.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    assert!(matches!(f.jail.open_read("pipe"), Err(FileError::InvalidPath { .. })));
    assert_eq!(f.jail.stat("pipe").unwrap().kind, EntryKind::Other);
}

#[test]
fn new_files_and_dirs_belong_to_the_owner() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: chown needs root");
        return;
    }
    let f = fixture();
    let jail = Jail::open(&f.root, Some((65534, 65533))).unwrap();
    jail.mkdir("owned/deeper").unwrap();
    jail.write_atomic("owned/deeper/file", &b"x"[..], 10).unwrap();
    for p in ["owned", "owned/deeper", "owned/deeper/file"] {
        let meta = fs::metadata(f.root.join(p)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65533), "{p}");
    }
    // Pre-existing directories keep their owner.
    assert_eq!(fs::metadata(f.root.join("data")).unwrap().uid(), 0);
}
