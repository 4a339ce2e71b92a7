//! A real SIGKILL in the middle of an install, at several points: mid-download, with the staging
//! dir full, before the manifest, between the commit rename and the `current` swap, and after it.
//! Afterwards no partial version is visible, `verify` passes for what is installed, `current`
//! points at a complete version, and the next start leaves `.staging` empty.
//!
//! The child is this test binary re-executed on the ignored test `kill_child`, which installs and
//! then stops forever at the requested point; it announces that on stdout so the parent kills it
//! exactly there, with no timing guesses.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use futures::StreamExt;
use zlh_core::artifact::{self, DynStore, GetResult};
use zlh_core::runtime::{InstallStep, Installer, InstallerOptions, RuntimeInstaller};

const REACHED: &str = "ZLH-KILL-POINT-REACHED";
const FILES: usize = 24;
const FILE_SIZE: usize = 128 * 1024;

fn old_artifact() -> (Vec<u8>, zlh_core::catalog::CatalogItem) {
    common::sized_runtime_artifact("java", "17.0.13", FILES, FILE_SIZE)
}
fn new_artifact() -> (Vec<u8>, zlh_core::catalog::CatalogItem) {
    common::sized_runtime_artifact("java", "21.0.5", FILES, FILE_SIZE)
}

/// A store that, after `limit` bytes of a download, announces it and hangs forever.
fn stalling(inner: DynStore, limit: u64) -> common::InterceptStore {
    let mut store = common::InterceptStore::new(inner);
    store.on_get = Some(Box::new(move |mut got: GetResult| {
        let mut sent = 0u64;
        got.stream = got
            .stream
            .then(move |chunk| {
                // Hang before the chunk that would carry the download past `limit`.
                let len = chunk.as_ref().map(|c| c.len() as u64).unwrap_or(0);
                let reached = sent + len > limit;
                sent += len;
                async move {
                    if reached {
                        println!("{REACHED}");
                        futures::future::pending::<()>().await;
                    }
                    chunk
                }
            })
            .boxed();
        got
    }));
    store
}

/// The child's side: install the new version, stopping forever at `ZLH_KILL_AT`.
#[tokio::test]
#[ignore = "run only as the child of kill_mid_install_at_every_point"]
async fn kill_child() {
    let (Ok(root), Ok(store_dir), Ok(at)) =
        (std::env::var("ZLH_KILL_ROOT"), std::env::var("ZLH_KILL_STORE"), std::env::var("ZLH_KILL_AT"))
    else {
        return;
    };
    let store = artifact::from_url(&format!("file://{store_dir}")).unwrap();
    let (store, hook_step): (DynStore, Option<InstallStep>) = match at.strip_prefix("bytes:") {
        Some(n) => (Arc::new(stalling(store, n.parse().unwrap())), None),
        None => (store, Some(serde_json::from_value(serde_json::Value::String(at)).unwrap())),
    };
    let mut options = InstallerOptions::new(PathBuf::from(root), store);
    options.step_hook = Some(Arc::new(move |_, _, step| {
        if Some(step) == hook_step {
            println!("{REACHED}");
            loop {
                std::thread::park();
            }
        }
    }));
    let inst = Installer::open(options).unwrap();
    let (_, item) = new_artifact();
    inst.upgrade(&item).await.unwrap();
    // Reaching here means the kill point was never hit; the parent sees no marker and fails.
}

fn kill_at(root: &Path, store_dir: &Path, at: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env("ZLH_KILL_ROOT", root)
        .env("ZLH_KILL_STORE", store_dir)
        .env("ZLH_KILL_AT", at)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let reached = stdout.lines().map_while(Result::ok).any(|l| l.contains(REACHED));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(reached, "child never reached kill point {at}");
}

/// What must hold after any kill: complete versions only, verify passes, `current` is complete.
async fn assert_consistent(root: &Path, store: DynStore) {
    let inst = Installer::open(InstallerOptions::new(root, store)).unwrap();
    assert_eq!(std::fs::read_dir(root.join(".staging")).unwrap().count(), 0, ".staging not cleaned at start");
    for entry in std::fs::read_dir(root.join("java")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if entry.file_type().unwrap().is_dir() {
            assert!(entry.path().join(".zlh-manifest.json").is_file(), "partial version {name} is visible");
        } else {
            assert!(matches!(name.as_str(), "current" | "previous"), "stray entry {name}");
        }
    }
    let installed = inst.list().await.unwrap();
    for i in &installed {
        let report = inst.verify(&i.id, &i.version).await.unwrap();
        assert!(report.is_ok(), "{report:?}");
    }
    let current = std::fs::read_link(root.join("java/current")).unwrap();
    assert!(installed.iter().any(|i| Path::new(i.version.as_str()) == current), "current -> {current:?} incomplete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_mid_install_at_every_point() {
    let store_dir = tempfile::tempdir().unwrap();
    let (old_bytes, old) = old_artifact();
    let (new_bytes, new) = new_artifact();
    common::put_in_dir_store(store_dir.path(), &old_bytes, &old);
    common::put_in_dir_store(store_dir.path(), &new_bytes, &new);
    let store = artifact::from_url(&format!("file://{}", store_dir.path().display())).unwrap();
    let size = new_bytes.len() as u64;
    assert!(size > 1 << 20, "artifact must span many chunks");

    let points = [
        format!("bytes:{}", size / 10),
        format!("bytes:{}", size / 2),
        format!("bytes:{}", size * 19 / 20),
        "verifying".to_owned(),
        "committing".to_owned(),
        "activating".to_owned(),
        "done".to_owned(),
    ];
    for at in &points {
        let root = tempfile::tempdir().unwrap();
        Installer::open(InstallerOptions::new(root.path(), store.clone())).unwrap().install(&old, true).await.unwrap();
        kill_at(root.path(), store_dir.path(), at);
        assert_consistent(root.path(), store.clone()).await;
        let current = std::fs::read_link(root.path().join("java/current")).unwrap();
        let expect_new = matches!(at.as_str(), "done");
        assert_eq!(current == Path::new("21.0.5"), expect_new, "after kill at {at}, current is {current:?}");
        // And the interrupted upgrade can simply be run again.
        let inst = Installer::open(InstallerOptions::new(root.path(), store.clone())).unwrap();
        inst.upgrade(&new).await.unwrap();
        assert_consistent(root.path(), store.clone()).await;
        assert_eq!(std::fs::read_link(root.path().join("java/current")).unwrap(), Path::new("21.0.5"));
    }
}
