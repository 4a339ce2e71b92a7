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
            .env_remove("ZLH_LOG")
            .env_remove("ZLH_LOG_FORMAT")
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
        assert!(!err.contains('\x1b'), "escape codes in a pipe: {err:?}");
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
        runtime_archive(self.dir.path(), "node", version)
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

/// `<dir>/<id>-<version>-linux-x64.tar.zst` holding `bin/<id>` (a link to a script printing
/// "<id> <version>") and a README.
fn runtime_archive(dir: &Path, id: &str, version: &str) -> PathBuf {
    let mut b = tar::Builder::new(Vec::new());
    let script = format!("#!/bin/sh\necho {id} {version}\n");
    let real = format!("lib/{id}-real");
    for (path, data, mode) in [(real.as_str(), script.as_bytes(), 0o755), ("README", id.as_bytes(), 0o644)] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        b.append_data(&mut h, path, data).unwrap();
    }
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_mode(0o777);
    b.append_link(&mut h, format!("bin/{id}"), format!("../{real}")).unwrap();
    let bytes = zstd::encode_all(b.into_inner().unwrap().as_slice(), 3).unwrap();
    let path = dir.join(format!("{id}-{version}-linux-x64.tar.zst"));
    std::fs::write(&path, bytes).unwrap();
    path
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

    let err = env.fails(&["runtime", "remove", "node", "22.11.0"]);
    assert!(err.contains("is the current version") && err.contains("pass --force"), "{err}");
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

/// An install against a store nobody answers on: retried (which logs), then refused.
fn unreachable_install(env: &Env, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zlh-agentd"))
        .args(extra)
        .args(["runtime", "install", "node", "--store", "http://127.0.0.1:9/artifacts"])
        .env("ZLH_TRUSTED_KEY", env.path("zlh.pub"))
        .env("ZLH_RUNTIME_ROOT", env.path("runtimes"))
        .env_remove("ZLH_LOG")
        .env_remove("ZLH_LOG_FORMAT")
        .output()
        .unwrap()
}

#[test]
fn a_failing_command_prints_one_error_line_and_logs_only_when_asked() {
    let env = Env::new();
    let out = unreachable_install(&env, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "one line, no logs: {err:?}");
    assert!(err.starts_with("error: ") && err.contains("catalog.json"), "{err:?}");

    // -v shows the retries as log lines, still without colour in a pipe, and the error last.
    let out = unreachable_install(&env, &["-v"]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("will retry"), "{err}");
    assert!(!err.contains('\x1b'), "escape codes in a pipe: {err:?}");
    assert!(err.lines().last().unwrap().starts_with("error: "), "{err}");
}

/// The help text of `path` (a command and its subcommands), as the binary prints it.
fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_zlh-agentd")).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "{path:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

/// The entries of one section of a clap help text (`Options:`, `Arguments:`, `Commands:`) as
/// (name, description), whether clap put the description beside the name or below it. Clap's
/// own bracketed notes (`[env: …]`, `[default: …]`) do not count as a description.
fn help_entries(text: &str, section: &str) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            inside = line.trim_end() == section;
            continue;
        }
        if !inside || line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let body = line.trim();
        if indent <= 6
            && (body.starts_with('-') || body.starts_with('<') || body.starts_with('[') || section == "Commands:")
        {
            let (name, description) = body.split_once("  ").unwrap_or((body, ""));
            entries.push((name.trim().to_owned(), description.trim().to_owned()));
        } else if let Some(last) = entries.last_mut() {
            last.1.push(' ');
            last.1.push_str(body);
        }
    }
    entries.into_iter().map(|(n, d)| (n, without_clap_notes(&d))).collect()
}

/// The description without clap's bracketed notes (`[env: …]`, `[default: …]`).
fn without_clap_notes(description: &str) -> String {
    let mut out = String::new();
    let mut depth = 0;
    for c in description.chars() {
        match c {
            '[' => depth += 1,
            ']' if depth > 0 => depth -= 1,
            _ if depth == 0 => out.push(c),
            _ => {}
        }
    }
    out.trim().to_owned()
}

#[test]
fn every_command_and_option_is_described_in_its_help() {
    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let args: Vec<&str> = path.iter().map(String::as_str).collect();
        let text = help(&args);
        assert!(text.contains("Usage"), "{args:?}");
        for section in ["Options:", "Arguments:"] {
            for (name, description) in help_entries(&text, section) {
                assert!(!description.is_empty(), "`{} --help`: {name} has no description:\n{text}", args.join(" "));
            }
        }
        for (name, description) in help_entries(&text, "Commands:") {
            if name == "help" {
                continue;
            }
            assert!(!description.is_empty(), "`{} --help`: command {name} has no description", args.join(" "));
            todo.push(path.iter().cloned().chain([name]).collect());
        }
        seen += 1;
    }
    // serve, runtime and its six, publish and its three, and the top level.
    assert!(seen >= 13, "only {seen} commands found");
}

#[test]
fn every_runtime_subcommand_accepts_the_store_flags() {
    let env = Env::new();
    env.publish("20.18.1", "stable");
    let store = env.store_url();
    let key = env.path("zlh.pub");
    let flags = ["--store", store.as_str(), "--trusted-key", key.to_str().unwrap(), "--catalog", "catalog.json"];
    let with_flags = |args: &[&str]| -> String { env.ok(&[args, &flags[..]].concat()) };
    assert!(with_flags(&["runtime", "install", "node", "20"]).contains("node 20.18.1 is current"));
    assert!(with_flags(&["runtime", "upgrade", "node"]).contains("node 20.18.1 is current"));
    assert!(with_flags(&["runtime", "verify", "node"]).contains("2 files verified"));
    assert!(with_flags(&["runtime", "list"]).contains("20.18.1"));
    // Before the subcommand too, as the README writes them.
    assert!(env.ok(&[&["runtime"], &flags[..], &["verify", "node"]].concat()).contains("2 files verified"));
    let err = env.fails(&[&["runtime", "rollback", "node"], &flags[..]].concat());
    assert!(err.contains("nothing to roll back"), "{err}");
    assert!(with_flags(&["runtime", "remove", "node", "20.18.1", "--force"]).contains("removed node 20.18.1"));
}

/// The README's publishing commands, run as written against a file store, signed by the real
/// `minisign` tool, then installed from that store.
#[test]
fn the_readme_publishing_path_ends_in_an_installable_runtime() {
    assert!(Command::new("minisign").arg("-v").output().is_ok(), "the minisign tool is needed (.ci/run installs it)");
    let env = Env::new();
    let dir = env.dir.path();
    // What an operator's shell has: a home with minisign's default key, the store and key in
    // the environment.
    let sh = |line: &str| -> Output {
        Command::new("sh")
            .args(["-c", line])
            .current_dir(dir)
            .env("HOME", dir)
            .env(
                "PATH",
                format!(
                    "{}:{}",
                    Path::new(env!("CARGO_BIN_EXE_zlh-agentd")).parent().unwrap().display(),
                    std::env::var("PATH").unwrap()
                ),
            )
            .env("ZLH_STORE", env.store_url())
            .env("ZLH_TRUSTED_KEY", dir.join("minisign.pub"))
            .env("ZLH_RUNTIME_ROOT", env.path("runtimes"))
            .env_remove("MINISIGN_CONFIG_DIR")
            .env_remove("ZLH_CATALOG_FILE")
            .env_remove("ZLH_CATALOG_KEY")
            .env_remove("ZLH_LOG")
            .output()
            .unwrap()
    };
    let ok = |line: &str| -> String {
        let out = sh(line);
        assert!(out.status.success(), "{line}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    ok("minisign -G -W");
    runtime_archive(dir, "java", "21.0.5");
    ok("zlh-agentd publish artifact java-21.0.5-linux-x64.tar.zst --id java --version 21.0.5 --bin bin \
        --env 'JAVA_HOME={install}'");
    ok("minisign -Sm catalog.json");
    ok("zlh-agentd publish push");
    assert!(ok("zlh-agentd runtime install java 21").contains("java 21.0.5 is current"));
    let java = Command::new(env.path("runtimes/java/current/bin/java")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&java.stdout), "java 21.0.5\n");

    // A staged release: invisible to installs, and the error says how to release it.
    runtime_archive(dir, "java", "21.0.6");
    ok("zlh-agentd publish artifact java-21.0.6-linux-x64.tar.zst --id java --version 21.0.6 --bin bin \
        --env 'JAVA_HOME={install}' --channel dev");
    ok("minisign -Sm catalog.json");
    ok("zlh-agentd publish push");
    let out = sh("zlh-agentd runtime install java 21.0.6");
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("java 21.0.6 exists on channel dev"), "{err}");
    let promote = err.split('`').nth(1).unwrap_or_else(|| panic!("no command in: {err}"));
    assert_eq!(promote, "zlh-agentd publish promote java 21.0.6 stable");
    ok(promote);
    ok("minisign -Sm catalog.json");
    ok("zlh-agentd publish push");
    assert!(ok("zlh-agentd runtime install java 21.0.6").contains("java 21.0.6 is current"));
}

/// A store that accepts connections and never answers (stopped with SIGSTOP, say): the install
/// fails well within a minute with the defaults, naming what it was fetching.
#[test]
fn a_hung_s3_store_fails_within_a_minute_naming_the_artifact() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().collect();
        drop(held);
    });
    let env = Env::new();
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_zlh-agentd"))
        .args(["runtime", "install", "node", "--store"])
        .arg(format!("s3://artifacts?endpoint={endpoint}&region=us-east-1"))
        .env("AWS_ACCESS_KEY_ID", "AKIAZLHTEST")
        .env("AWS_SECRET_ACCESS_KEY", "zlh-test-secret")
        .env("ZLH_TRUSTED_KEY", env.path("zlh.pub"))
        .env("ZLH_RUNTIME_ROOT", env.path("runtimes"))
        .env_remove("ZLH_LOG")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("did not answer for catalog.json"), "{err}");
    assert!(elapsed < std::time::Duration::from_secs(60), "took {elapsed:?}");
}
