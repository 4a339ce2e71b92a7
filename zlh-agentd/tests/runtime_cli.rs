//! The operator CLI end to end, as the real binary: publish an artifact, sign the catalog, push
//! it, install, list, verify, upgrade, roll back, remove; and the failures an operator must see
//! as one clear line with a non-zero exit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Env {
    dir: tempfile::TempDir,
    keypair: minisign::KeyPair,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let keypair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        std::fs::write(dir.path().join("zlh.pub"), keypair.pk.to_box().unwrap().to_string()).unwrap();
        Env { dir, keypair }
    }
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn store_url(&self) -> String {
        format!("file://{}", self.path("store").display())
    }
    /// The agent binary with the store, key, catalog and root configured through the environment.
    fn agent(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_zlh-agentd"))
            .args(args)
            .current_dir(self.dir.path())
            .env("ZLH_STORE", self.store_url())
            .env("ZLH_TRUSTED_KEY", self.path("zlh.pub"))
            .env("ZLH_RUNTIME_ROOT", self.path("runtimes"))
            .env("ZLH_CATALOG_FILE", self.path("catalog.json"))
            .env_remove("ZLH_CATALOG_KEY")
            .output()
            .unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
    /// Runs a command that must fail and returns its stderr, which must be one `error:` line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.agent(args);
        assert!(!out.status.success(), "{args:?} unexpectedly succeeded");
        let err = String::from_utf8(out.stderr).unwrap();
        let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
        assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
        assert!(lines[0].starts_with("error: "), "{err}");
        lines[0].to_owned()
    }
    fn sign_catalog(&self) {
        let data = std::fs::read(self.path("catalog.json")).unwrap();
        let sig =
            minisign::sign(Some(&self.keypair.pk), &self.keypair.sk, data.as_slice(), Some("zlh test"), None).unwrap();
        std::fs::write(self.path("catalog.json.minisig"), sig.to_string()).unwrap();
    }
    fn artifact(&self, version: &str) -> PathBuf {
        let mut b = tar::Builder::new(Vec::new());
        let script = format!("#!/bin/sh\necho node {version}\n");
        for (path, data, mode) in [("lib/node-real", script.as_bytes(), 0o755), ("README", b"node".as_slice(), 0o644)] {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(mode);
            b.append_data(&mut h, path, data).unwrap();
        }
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "bin/node", "../lib/node-real").unwrap();
        let bytes = zstd::encode_all(b.into_inner().unwrap().as_slice(), 3).unwrap();
        let path = self.path(&format!("node-{version}-linux-x64.tar.zst"));
        std::fs::write(&path, bytes).unwrap();
        path
    }
    /// Uploads an artifact and records it in the local catalog (not yet signed or pushed).
    fn upload(&self, version: &str, channel: &str) {
        let file = self.artifact(version);
        let out = self.ok(&[
            "publish",
            "artifact",
            file.to_str().unwrap(),
            "--id",
            "node",
            "--version",
            version,
            "--channel",
            channel,
            "--bin",
            "bin",
        ]);
        assert!(out.contains(&format!("runtimes/node/{version}/node-{version}-linux-x64.tar.zst")), "{out}");
    }
    /// Uploads, signs and pushes: what an operator does to release a version.
    fn publish(&self, version: &str, channel: &str) {
        self.upload(version, channel);
        self.sign_catalog();
        self.ok(&["publish", "push"]);
    }
}

fn current(root: &Path, id: &str) -> String {
    std::fs::read_link(root.join(id).join("current")).unwrap().to_string_lossy().into_owned()
}

#[test]
fn publish_install_verify_upgrade_rollback_remove() {
    let env = Env::new();
    env.publish("20.18.1", "stable");
    let out = env.ok(&["runtime", "install", "node", "20"]);
    assert!(out.contains("node 20.18.1 is current"), "{out}");
    let root = env.path("runtimes");
    let node = Command::new(root.join("node/current/bin/node")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&node.stdout), "node 20.18.1\n");
    assert!(env.ok(&["runtime", "verify", "node"]).contains("2 files verified"));

    // A dev-channel release is invisible to stable installs until promoted.
    env.publish("22.11.0", "dev");
    assert!(env.ok(&["runtime", "upgrade", "node"]).contains("node 20.18.1 is current"));
    env.ok(&["publish", "promote", "node", "22.11.0", "stable"]);
    env.sign_catalog();
    env.ok(&["publish", "push"]);
    let out = env.ok(&["runtime", "upgrade", "node"]);
    assert!(out.contains("node 22.11.0 is current (was 20.18.1)"), "{out}");
    let list = env.ok(&["runtime", "list"]);
    assert!(list.contains("  node             20.18.1") && list.contains("* node             22.11.0"), "{list}");

    assert!(env.fails(&["runtime", "remove", "node", "22.11.0"]).contains("is the current version"));
    env.ok(&["runtime", "rollback", "node"]);
    assert_eq!(current(&root, "node"), "20.18.1");
    env.ok(&["runtime", "remove", "node", "22.11.0"]);
    assert!(!root.join("node/22.11.0").exists());

    // Tampering with an installed file is caught.
    std::fs::write(root.join("node/20.18.1/README"), "changed").unwrap();
    assert!(env.fails(&["runtime", "verify", "node"]).contains("README"));
}

#[test]
fn unknown_runtime_or_version_lists_what_exists() {
    let env = Env::new();
    env.publish("20.18.1", "stable");
    let err = env.fails(&["runtime", "install", "python"]);
    assert!(err.contains("node"), "{err}");
    let err = env.fails(&["runtime", "install", "node", "18"]);
    assert!(err.contains("20.18.1"), "{err}");
    assert!(!env.path("runtimes/node").exists());
}

#[test]
fn unsigned_or_tampered_catalog_is_refused() {
    let env = Env::new();
    env.upload("20.18.1", "stable");
    // No signature yet: push refuses, nothing reaches the store.
    env.fails(&["publish", "push"]);
    assert!(!env.path("store/catalog.json").exists());
    // A signature over other bytes is refused too.
    env.sign_catalog();
    let mut json = std::fs::read_to_string(env.path("catalog.json")).unwrap();
    json = json.replace("\"stable\"", "\"beta\"");
    std::fs::write(env.path("catalog.json"), json).unwrap();
    env.fails(&["publish", "push"]);
    // An install against a store with no catalog fails with one clear line.
    let err = env.fails(&["runtime", "install", "node"]);
    assert!(err.contains("catalog"), "{err}");
}

#[test]
fn unreachable_store_fails_cleanly() {
    let env = Env::new();
    let out = Command::new(env!("CARGO_BIN_EXE_zlh-agentd"))
        .args(["runtime", "install", "node", "--store", "http://127.0.0.1:9/artifacts"])
        .env("ZLH_TRUSTED_KEY", env.path("zlh.pub"))
        .env("ZLH_RUNTIME_ROOT", env.path("runtimes"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unreachable"), "{err}");
    assert!(!env.path("runtimes/node").exists());
}

#[test]
fn help_is_available_for_every_command() {
    for args in [&["--help"][..], &["runtime", "--help"], &["runtime", "install", "--help"], &["publish", "--help"]] {
        let out = Command::new(env!("CARGO_BIN_EXE_zlh-agentd")).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
    }
}
