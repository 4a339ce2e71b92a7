//! Test support for driving the real `zlh-agentd serve` binary: a local artifact store with a
//! signed catalog of stand-in artifacts (a runtime, a code-server that serves HTTP, a scripted
//! game server), and a running agent on its own root and port.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;
use zlh_core::artifact::{self, ArtifactStoreExt};
use zlh_core::catalog::{
    ArchiveFormat, ArtifactRef, Catalog, Channel, GameLaunch, GameVersion, ItemKind, PackageVersion, RuntimeRequirement,
};
use zlh_core::{ArtifactKey, Digest, RuntimeId, Version};

pub const TOKEN: &str = "test-agent-token-0123456789abcdef";
/// The dev user the agent creates when the tests run as root.
pub const DEV_USER: &str = "zlh-test-dev";

/// The scripted game server: ready line, echoes console lines, `stop` stops it, a `crash.flag`
/// file in its working dir (or the line `crash`) makes it crash with exit code 3.
pub const GAME_SERVER: &str = r#"#!/bin/bash
echo "Starting test server on port ${SERVER_PORT} with ${ZLH_MEMORY_MB} MB in $(pwd)"
echo "runtime: $(zrt)"
echo "Done (0.1s)! For help, type help"
while :; do
  if read -t 0.2 line; then
    case "$line" in
      stop) echo "Stopping the server"; exit 0 ;;
      crash) echo "Exception in server tick loop"; exit 3 ;;
      *) echo "echo: $line" ;;
    esac
  fi
  if [ -f crash.flag ]; then rm -f crash.flag; echo "Exception in server tick loop"; exit 3; fi
done
"#;

/// A server that ignores its stop command and SIGTERM: a graceful stop of it hangs.
pub const STUBBORN_SERVER: &str = r#"#!/bin/bash
trap '' TERM
echo "Done (0.1s)! stubborn server up"
while :; do read -t 1 line || true; done
"#;

/// A code-server stand-in: serves HTTP on `--bind-addr`, answering with its user and workspace.
/// Like a busy code-server, it does not stop on SIGTERM: only SIGKILL ends it.
pub const CODE_SERVER: &str = r#"#!/usr/bin/env python3
import getpass, http.server, os, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
args = sys.argv[1:]
bind = args[args.index("--bind-addr") + 1]
host, port = bind.rsplit(":", 1)
workspace = args[-1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("code-server stand-in user=%s workspace=%s path=%s" % (getpass.getuser(), workspace, os.environ.get("PATH"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
print("HTTP server listening on http://%s/" % bind, flush=True)
http.server.ThreadingHTTPServer((host, int(port)), H).serve_forever()
"#;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    keypair: minisign::KeyPair,
    catalog: Catalog,
}

/// A tar.zst of `files` and its unpacked size and entry count, counted as the publisher does.
fn tar_zst(files: &[(&str, &[u8], u32)]) -> (Vec<u8>, u64, u64) {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(*mode);
        b.append_data(&mut h, path, *data).unwrap();
    }
    let bytes = zstd::encode_all(b.into_inner().unwrap().as_slice(), 3).unwrap();
    let (unpacked, entries) = zlh_core::runtime::extract::inspect(ArchiveFormat::TarZst, bytes.as_slice()).unwrap();
    (bytes, unpacked, entries)
}

impl Fixture {
    /// A store holding runtime `zrt` 1.0.0, addon `code-server` 4.0.0 and game `testgame/vanilla`
    /// 1.0.0 (needs `zrt` 1), with a signed catalog.
    pub async fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("store")).unwrap();
        let keypair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
        std::fs::write(dir.path().join("catalog.pub"), keypair.pk.to_box().unwrap().to_string()).unwrap();
        let catalog = Catalog::empty(0, chrono::Utc::now() + chrono::Duration::days(30));
        let mut f = Fixture { dir, keypair, catalog };
        let zrt = "#!/bin/sh\necho zrt-1.0.0\n";
        f.add_package(ItemKind::Runtime, "zrt", "1.0.0", &[("bin/zrt", zrt.as_bytes(), 0o755)]).await;
        f.add_package(ItemKind::Addon, "code-server", "4.0.0", &[("bin/code-server", CODE_SERVER.as_bytes(), 0o755)])
            .await;
        f.add_game("testgame", "vanilla", "1.0.0", &[("server.sh", GAME_SERVER.as_bytes(), 0o755)]).await;
        f.add_game("testgame", "stubborn", "1.0.0", &[("server.sh", STUBBORN_SERVER.as_bytes(), 0o755)]).await;
        f.publish().await;
        f
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn store_url(&self) -> String {
        format!("file://{}", self.path("store").display())
    }

    async fn put(&self, key: &str, files: &[(&str, &[u8], u32)]) -> ArtifactRef {
        let (bytes, unpacked, entries) = tar_zst(files);
        let store = artifact::from_url(&self.store_url()).unwrap();
        let key = ArtifactKey::parse(key).unwrap();
        let r = ArtifactRef {
            key: key.clone(),
            sha256: Digest::of(&bytes),
            size: bytes.len() as u64,
            format: ArchiveFormat::TarZst,
            unpacked_size: unpacked,
            entries,
        };
        store.put_bytes(&key, Bytes::from(bytes)).await.unwrap();
        r
    }

    pub async fn add_package(&mut self, kind: ItemKind, id: &str, version: &str, files: &[(&str, &[u8], u32)]) {
        let dir = if kind == ItemKind::Addon { "addons" } else { "runtimes" };
        let artifact = self.put(&format!("{dir}/{id}/{version}/{id}-{version}.tar.zst"), files).await;
        let env = BTreeMap::from([(format!("{}_HOME", id.to_uppercase().replace('-', "_")), "{install}".to_string())]);
        let v = PackageVersion {
            version: Version::parse(version).unwrap(),
            channel: Channel::Stable,
            artifact,
            bin: vec!["bin".into()],
            env,
        };
        self.catalog.upsert_package_version(kind, &RuntimeId::parse(id).unwrap(), v).unwrap();
    }

    pub async fn add_game(&mut self, game: &str, variant: &str, version: &str, files: &[(&str, &[u8], u32)]) {
        let artifact = self.put(&format!("games/{game}/{variant}/{version}/server.tar.zst"), files).await;
        let v = GameVersion {
            version: Version::parse(version).unwrap(),
            channel: Channel::Stable,
            artifact,
            runtime: RuntimeRequirement { id: RuntimeId::parse("zrt").unwrap(), version: "1".into() },
            launch: Some(GameLaunch {
                command: vec!["bash".into(), "{install}/server.sh".into()],
                stop_command: Some("stop".into()),
                ready_pattern: Some("Done (".into()),
                mods_dir: Some("mods".into()),
                chat_pattern: None,
            }),
        };
        self.catalog
            .upsert_game_version(&RuntimeId::parse(game).unwrap(), &RuntimeId::parse(variant).unwrap(), v)
            .unwrap();
    }

    /// Puts raw bytes in the store (a mod jar) and returns their sha256.
    pub async fn put_raw(&self, key: &str, bytes: &[u8]) -> String {
        let store = artifact::from_url(&self.store_url()).unwrap();
        store.put_bytes(&ArtifactKey::parse(key).unwrap(), Bytes::copy_from_slice(bytes)).await.unwrap();
        Digest::of(bytes).to_string()
    }

    /// Signs the catalog and puts it in the store.
    pub async fn publish(&mut self) {
        self.catalog.bump_serial();
        let json = self.catalog.to_json_pretty();
        let sig = minisign::sign(Some(&self.keypair.pk), &self.keypair.sk, json.as_slice(), Some("zlh test"), None)
            .unwrap()
            .to_string();
        let store = artifact::from_url(&self.store_url()).unwrap();
        store.put_bytes(&ArtifactKey::parse("catalog.json.minisig").unwrap(), Bytes::from(sig)).await.unwrap();
        store.put_bytes(&ArtifactKey::parse("catalog.json").unwrap(), Bytes::from(json)).await.unwrap();
    }

    /// Starts an agent on root `<fixture>/<name>`.
    pub fn agent(&self, name: &str) -> Agent {
        Agent::start(self, name, &[])
    }
}

/// A free port on loopback (bound and released; the agent binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A running `zlh-agentd serve`.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub code_server_port: u16,
    pub root: PathBuf,
    pub log: PathBuf,
    pub http: reqwest::Client,
    env: Vec<(String, String)>,
    /// The soft open-files limit the agent starts with (default: this process's).
    soft_open_files: Option<u64>,
}

impl Agent {
    pub fn start(fx: &Fixture, name: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_limited(fx, name, extra_env, None)
    }

    /// [`Agent::start`] with the soft open-files limit set to `soft_open_files` first.
    pub fn start_limited(fx: &Fixture, name: &str, extra_env: &[(&str, &str)], soft_open_files: Option<u64>) -> Self {
        let root = fx.path(name);
        std::fs::create_dir_all(&root).unwrap();
        let port = free_port();
        let code_server_port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("ZLH_AGENT_PORT".into(), port.to_string()),
            ("ZLH_AGENT_LISTEN".into(), "127.0.0.1".into()),
            ("ZLH_AGENT_ROOT".into(), root.display().to_string()),
            ("ZLH_AGENT_TOKEN".into(), TOKEN.into()),
            ("ZLH_STORE".into(), fx.store_url()),
            ("ZLH_TRUSTED_KEY".into(), fx.path("catalog.pub").display().to_string()),
            ("ZLH_CODE_SERVER_BIND".into(), format!("127.0.0.1:{code_server_port}")),
            ("ZLH_DEV_USER".into(), DEV_USER.into()),
            ("ZLH_LOG_FORMAT".into(), "json".into()),
            ("ZLH_LOG".into(), "debug,hyper=info,h2=info".into()),
        ];
        for (k, v) in extra_env {
            env.push((k.to_string(), v.to_string()));
        }
        let mut a = Agent {
            child: Command::new("true").spawn().unwrap(),
            port,
            code_server_port,
            root,
            log: fx.path(&format!("{name}.log")),
            http: reqwest::Client::new(),
            env,
            soft_open_files,
        };
        a.child = a.spawn();
        a
    }

    fn spawn(&self) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut command = match self.soft_open_files {
            None => Command::new(env!("CARGO_BIN_EXE_zlh-agentd")),
            Some(soft) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -S -n {soft} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_zlh-agentd"));
                sh
            }
        };
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until `/health` answers (the agent binds after restoring its services).
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(self.url("/health")).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("agent exited with {status}: {}", self.logs());
            }
            assert!(Instant::now() < deadline, "agent not up in 60 s: {}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(TOKEN).send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(TOKEN).json(&body).send().await.unwrap()
    }

    pub async fn status(&self) -> Value {
        self.get("/status").await.json().await.unwrap()
    }

    /// Polls `/status` until `pred` holds (there is no push channel for status; bounded).
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; status {s}\nlogs:\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(),
            rustix::process::Signal::TERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }

    /// Starts the agent again on the same root, port and environment.
    pub async fn restart(&mut self) {
        self.child = self.spawn();
        self.ready().await;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Supervised processes live under shims that outlive the agent by design; end them.
        for name in ["game", "code-server"] {
            let state = self.root.join("var/lib/zlh/supervisor").join(name).join("shim.json");
            if let Ok(text) = std::fs::read_to_string(state) {
                if let Ok(v) = serde_json::from_str::<Value>(&text) {
                    for key in ["child_pid", "shim_pid"] {
                        if let Some(pid) = v[key].as_i64().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
                            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    }
                }
            }
        }
    }
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Polls an agent's `/status` until `pred` holds (the agent has no push channel for status;
/// bounded).
pub async fn wait_status(
    client: &zlh_core::agent_client::AgentClient,
    ep: &zlh_core::container::AgentEndpoint,
    pred: impl Fn(&zlh_core::agent_client::AgentStatus) -> bool,
) -> zlh_core::agent_client::AgentStatus {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = client.status(ep, TOKEN).await.unwrap();
        if pred(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "timed out; last status {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// GETs `url` until it answers (a service binds a moment after it starts).
pub async fn wait_http(url: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(url).await {
            return r.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "{url} did not answer");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
