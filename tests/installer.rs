//! The runtime installer against a memory store and a real filesystem root: installs, the install
//! guard, verify, upgrade/rollback/remove, staging cleanup, and refusals that leave no trace.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use zlh_core::artifact::{ArtifactError, DynStore, MockArtifactStore};
use zlh_core::catalog::ArchiveFormat;
use zlh_core::runtime::{InstallError, InstallStep, Installer, InstallerOptions, RuntimeInstaller};
use zlh_core::Version;

fn installer(root: &Path, store: DynStore) -> Installer {
    Installer::open(InstallerOptions::new(root, store)).unwrap()
}

fn staging_entries(root: &Path) -> usize {
    fs::read_dir(root.join(".staging")).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn install_extracts_activates_and_verifies() {
    let (bytes, it) = runtime_artifact("java", "21.0.5");
    let store = memory_store(&[(&bytes, &it)]).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), store);

    let got = inst.install(&it, true).await.unwrap();
    assert!(got.current);
    assert_eq!(got.path, root.path().join("java/21.0.5"));
    // The in-install symlink works through `current`.
    let java = fs::read_to_string(root.path().join("java/current/bin/java")).unwrap();
    assert!(java.contains("java 21.0.5"));
    assert_eq!(fs::read_link(root.path().join("java/current")).unwrap(), Path::new("21.0.5"));
    let report = inst.verify(&it.id, &it.version).await.unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.files_checked, 3);
    let listed = inst.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].version.as_str(), "21.0.5");
    assert_eq!(staging_entries(root.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_installs_of_one_version_share_one_download() {
    let (bytes, it) = runtime_artifact("node", "22.11.0");
    let store = Arc::new(InterceptStore::new(memory_store(&[(&bytes, &it)]).await));
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), store.clone());

    let results = futures::future::join_all((0..8).map(|_| {
        let inst = inst.clone();
        let it = it.clone();
        tokio::spawn(async move { inst.install(&it, false).await })
    }))
    .await;
    for r in results {
        assert_eq!(r.unwrap().unwrap().version.as_str(), "22.11.0");
    }
    assert_eq!(store.gets.load(Ordering::SeqCst), 1);
    // A later install of the same version is a no-op.
    inst.install(&it, false).await.unwrap();
    assert_eq!(store.gets.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn digest_mismatch_is_refused_and_leaves_nothing() {
    let (bytes, mut it) = runtime_artifact("java", "21.0.5");
    it.artifact.sha256 = zlh_core::Digest::of(b"something else");
    let store = memory_store(&[(&bytes, &it)]).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), store);
    let err = inst.install(&it, true).await.unwrap_err();
    assert!(matches!(err, InstallError::DigestMismatch { .. }), "{err}");
    assert!(!root.path().join("java/21.0.5").exists());
    assert!(!root.path().join("java/current").exists());
    assert_eq!(staging_entries(root.path()), 0);
}

#[tokio::test]
async fn size_mismatch_is_refused() {
    let (bytes, mut it) = runtime_artifact("java", "21.0.5");
    it.artifact.size -= 1;
    let store = memory_store(&[(&bytes, &it)]).await;
    let root = tempfile::tempdir().unwrap();
    let err = installer(root.path(), store).install(&it, true).await.unwrap_err();
    assert!(matches!(err, InstallError::SizeMismatch { .. }), "{err}");
    assert!(!root.path().join("java/21.0.5").exists());
}

#[tokio::test]
async fn hostile_archive_with_a_valid_digest_is_refused_without_trace() {
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("owned");
    let link_target = outside.path().to_str().unwrap().to_owned();
    let archive = zst(&tar(&[Member::Symlink("escape", &link_target), Member::File("escape/owned", b"pwned", 0o644)]));
    let it = item("evil", "1.0", &archive, ArchiveFormat::TarZst, 5, 2);
    let store = memory_store(&[(&archive, &it)]).await;
    let root = tempfile::tempdir().unwrap();
    let err = installer(root.path(), store).install(&it, true).await.unwrap_err();
    assert!(matches!(err, InstallError::Archive { .. }), "{err}");
    assert!(!target.exists());
    assert!(!root.path().join("evil/1.0").exists());
    assert_eq!(staging_entries(root.path()), 0);
}

// Real time: the store's retry backoff (well under a second) runs while the extraction thread
// waits, and tokio does not auto-advance paused time during blocking tasks.
#[tokio::test]
async fn store_failure_changes_nothing_on_disk() {
    let (bytes, old) = runtime_artifact("java", "17.0.13");
    let (_, new) = runtime_artifact("java", "21.0.5");
    let root = tempfile::tempdir().unwrap();
    installer(root.path(), memory_store(&[(&bytes, &old)]).await).install(&old, true).await.unwrap();

    let mut broken = MockArtifactStore::new();
    broken.expect_describe().return_const("mock://broken".to_owned());
    broken.expect_get_range().returning(|key, _| {
        Err(ArtifactError::Unavailable {
            store: "mock://broken".into(),
            key: key.to_string(),
            attempts: 3,
            message: "connection refused".into(),
        })
    });
    let err = installer(root.path(), Arc::new(broken)).install(&new, true).await.unwrap_err();
    assert!(matches!(err, InstallError::Store(ArtifactError::Unavailable { .. })), "{err}");
    assert!(err.to_string().contains("unreachable for runtimes/java/21.0.5/"), "{err}");
    assert!(err.to_string().contains("after 3 attempts"), "{err}");
    assert_eq!(fs::read_link(root.path().join("java/current")).unwrap(), Path::new("17.0.13"));
    assert!(!root.path().join("java/21.0.5").exists());
    assert_eq!(staging_entries(root.path()), 0);
}

#[tokio::test]
async fn upgrade_keeps_previous_and_rollback_returns_to_it() {
    let (b17, v17) = runtime_artifact("java", "17.0.13");
    let (b21, v21) = runtime_artifact("java", "21.0.5");
    let store = memory_store(&[(&b17, &v17), (&b21, &v21)]).await;
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), store);
    inst.install(&v17, true).await.unwrap();

    let up = inst.upgrade(&v21).await.unwrap();
    assert_eq!(up.previous.as_ref().map(Version::as_str), Some("17.0.13"));
    assert!(up.current.current);
    assert!(root.path().join("java/17.0.13").is_dir(), "upgrade keeps the previous version");
    assert_eq!(inst.current_version(&v21.id).unwrap().as_str(), "21.0.5");

    let back = inst.rollback(&v21.id, None).await.unwrap();
    assert_eq!(back.version.as_str(), "17.0.13");
    assert!(fs::read_to_string(root.path().join("java/current/bin/java")).unwrap().contains("17.0.13"));
    // Rolling back again returns to the version we just left.
    assert_eq!(inst.rollback(&v21.id, None).await.unwrap().version.as_str(), "21.0.5");
    // An explicit target that is not installed is refused with what is.
    let err = inst.rollback(&v21.id, Some(Version::parse("11").unwrap())).await.unwrap_err();
    assert!(err.to_string().contains("installed: 17.0.13, 21.0.5"), "{err}");
}

#[tokio::test]
async fn rollback_without_history_is_refused() {
    let (b, it) = runtime_artifact("go", "1.23.4");
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), memory_store(&[(&b, &it)]).await);
    inst.install(&it, true).await.unwrap();
    assert!(matches!(inst.rollback(&it.id, None).await.unwrap_err(), InstallError::NoRollback { .. }));
}

#[tokio::test]
async fn remove_refuses_current_unless_forced() {
    let (b1, v1) = runtime_artifact("python", "3.12.8");
    let (b2, v2) = runtime_artifact("python", "3.13.1");
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), memory_store(&[(&b1, &v1), (&b2, &v2)]).await);
    inst.install(&v1, true).await.unwrap();
    inst.upgrade(&v2).await.unwrap();

    let err = inst.remove(&v2.id, &v2.version, false).await.unwrap_err();
    assert!(matches!(err, InstallError::IsCurrent { .. }), "{err}");
    assert!(root.path().join("python/3.13.1").is_dir());

    inst.remove(&v1.id, &v1.version, false).await.unwrap();
    assert!(!root.path().join("python/3.12.8").exists());
    assert!(!root.path().join("python/previous").exists(), "previous must not dangle");

    inst.remove(&v2.id, &v2.version, true).await.unwrap();
    assert!(!root.path().join("python/current").exists());
    assert!(inst.list().await.unwrap().is_empty());
    let err = inst.remove(&v2.id, &v2.version, true).await.unwrap_err();
    assert!(matches!(err, InstallError::NotInstalled { .. }));
    assert_eq!(staging_entries(root.path()), 0);
}

#[tokio::test]
async fn verify_reports_changed_missing_and_extra_files() {
    let (b, it) = runtime_artifact("java", "21.0.5");
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), memory_store(&[(&b, &it)]).await);
    inst.install(&it, true).await.unwrap();
    let dir = root.path().join("java/21.0.5");
    fs::write(dir.join("lib/libjvm.so"), b"tampered").unwrap();
    fs::remove_file(dir.join("release")).unwrap();
    fs::write(dir.join("lib/extra.so"), b"dropped in").unwrap();
    let report = inst.verify(&it.id, &it.version).await.unwrap();
    assert!(!report.is_ok());
    assert_eq!(report.mismatched, ["lib/libjvm.so", "release"]);
    assert_eq!(report.unexpected, ["lib/extra.so"]);
}

#[tokio::test]
async fn open_removes_staging_leftovers_of_dead_processes_only() {
    let root = tempfile::tempdir().unwrap();
    let staging = root.path().join(".staging");
    fs::create_dir_all(staging.join("999999999.java-21.0.5.abc/lib")).unwrap();
    fs::write(staging.join("999999999.java-21.0.5.abc/lib/half"), b"x").unwrap();
    // pid 1 is alive: that process's install is in progress and must survive.
    fs::create_dir_all(staging.join("1.node-22.1.0.xyz")).unwrap();
    installer(root.path(), Arc::new(zlh_core::artifact::MemoryStore::new()));
    let left: Vec<_> = fs::read_dir(&staging).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["1.node-22.1.0.xyz"]);
}

#[tokio::test]
async fn progress_reports_steps_and_bytes() {
    let (b, it) = runtime_artifact("java", "21.0.5");
    let root = tempfile::tempdir().unwrap();
    let inst = installer(root.path(), memory_store(&[(&b, &it)]).await);
    let mut rx = inst.subscribe();
    inst.install(&it, true).await.unwrap();
    let mut steps = Vec::new();
    while let Ok(p) = rx.try_recv() {
        assert_eq!(p.bytes_total, it.artifact.size);
        if steps.last() != Some(&p.step) {
            steps.push(p.step);
        }
    }
    assert_eq!(
        steps,
        [
            InstallStep::Downloading,
            InstallStep::Verifying,
            InstallStep::Committing,
            InstallStep::Activating,
            InstallStep::Done
        ]
    );
}

#[tokio::test]
async fn more_unpacked_bytes_than_declared_is_refused() {
    let (bytes, mut it) = runtime_artifact("java", "21.0.5");
    it.artifact.unpacked_size -= 1; // the catalog promises less than the archive holds: a bomb
    let root = tempfile::tempdir().unwrap();
    let err = installer(root.path(), memory_store(&[(&bytes, &it)]).await).install(&it, true).await.unwrap_err();
    assert!(matches!(err, InstallError::Archive { .. }), "{err}");
    assert!(!root.path().join("java/21.0.5").exists());
    assert_eq!(staging_entries(root.path()), 0);
}

#[tokio::test]
async fn leftover_aside_links_of_dead_processes_are_removed_at_start() {
    let root = tempfile::tempdir().unwrap();
    fs::create_dir_all(root.path().join("java")).unwrap();
    std::os::unix::fs::symlink("21.0.5", root.path().join("java/.current.999999999.partial")).unwrap();
    installer(root.path(), Arc::new(zlh_core::artifact::MemoryStore::new()));
    assert_eq!(fs::read_dir(root.path().join("java")).unwrap().count(), 0);
}

/// A real full disk: a 1 MiB tmpfs as the install root. Needs the privilege to mount; where the
/// machine does not give it, the test says so and does nothing.
#[tokio::test]
async fn disk_full_mid_install_removes_staging_and_keeps_previous_state() {
    let root = tempfile::tempdir().unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(root.path())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN)");
        return;
    }
    struct Unmount<'a>(&'a Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(self.0).status();
        }
    }
    let _unmount = Unmount(root.path());

    let (small, v1) = runtime_artifact("java", "17.0.13");
    let (big, v2) = sized_runtime_artifact("java", "21.0.5", 4, 512 * 1024); // 2 MiB unpacked
    let inst = installer(root.path(), memory_store(&[(&small, &v1), (&big, &v2)]).await);
    inst.install(&v1, true).await.unwrap();
    let err = inst.upgrade(&v2).await.unwrap_err();
    assert!(err.to_string().contains("No space left"), "{err}");
    assert_eq!(staging_entries(root.path()), 0);
    assert!(!root.path().join("java/21.0.5").exists());
    assert_eq!(fs::read_link(root.path().join("java/current")).unwrap(), Path::new("17.0.13"));
    assert!(inst.verify(&v1.id, &v1.version).await.unwrap().is_ok());
}
