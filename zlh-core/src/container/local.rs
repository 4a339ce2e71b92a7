//! The embedded default container host: a "container" is a `zlh-agentd serve` process on this
//! machine with its own root directory and two loopback ports of its own (agent, code-server).
//! No isolation beyond that: it is for one machine, development and small installs.
//!
//! Layout under `<data_dir>/containers/<vmid>/`:
//! - `container.json` — [`LocalRecord`]: ports, paths, and the agent's pid with its start time
//!   (so a reused pid is never mistaken for the agent), written atomically.
//! - `agent.token` — the agent's bearer token, mode 0600; the agent reads it through `token_file`.
//! - `agent.log` — the agent's stdout and stderr, appended.
//! - `root/` — the agent's root prefix; `root/etc/zlh/agent.toml` is its config file.
//!
//! All state is in these files, so a new `LocalHost` on the same data dir finds every container
//! and whether it runs. Dropping a `LocalHost` stops nothing: containers are long-lived.
//!
//! A started agent is kept running: when it exits without being stopped (a crash, a kill), the
//! host starts it again after a backoff ([`RestartBackoff`]). `stop` and `destroy` end that first.
//!
//! Stopping a container stops everything in it: the agent gets SIGTERM (its whole process group),
//! and the processes it supervises — which by design outlive an agent restart under their shims —
//! are found through `root/var/lib/zlh/supervisor/*/shim.json` and stopped too (SIGTERM, then
//! SIGKILL after the grace their supervisor gives them, at most the stop timeout: code-server
//! has nothing to save and is killed within a second or two).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{AgentEndpoint, Container, ContainerError, ContainerHost, ContainerKind, ContainerSpec, ContainerState};
use crate::atomic;
use crate::supervisor::shim::{self, ShimState};

const RECORD: &str = "container.json";
const TOKEN: &str = "agent.token";
const LOG: &str = "agent.log";
/// How far a process's start time (from `/proc`, whole seconds) may be from the recorded one.
const START_SLACK_SECS: i64 = 2;

#[derive(Debug, Clone)]
pub struct LocalHostConfig {
    pub data_dir: PathBuf,
    /// The `zlh-agentd` executable.
    pub agent_binary: PathBuf,
    /// Artifact store URL handed to every agent.
    pub store_url: String,
    /// minisign public key file the catalog must be signed with.
    pub trusted_key: PathBuf,
    /// Key of the catalog in the store (agent default `catalog.json`).
    pub catalog_key: Option<String>,
    /// More environment for every agent (`ZLH_LOG_FORMAT`, `ZLH_LOG`, …). Inherited `ZLH_*`
    /// variables are removed first, so the control plane's own settings never leak into an agent.
    pub extra_env: Vec<(String, String)>,
    /// The dev user agents create when they run as root. `None`: no OS users are added to this
    /// machine; the agent's own user is the dev user.
    pub dev_user: Option<String>,
    /// How long `start` waits for the agent's `/health`.
    pub start_timeout: Duration,
    /// How long `stop` waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How soon an agent that died is started again.
    pub restart: RestartBackoff,
}

impl LocalHostConfig {
    pub fn new(
        data_dir: impl Into<PathBuf>,
        agent_binary: impl Into<PathBuf>,
        store_url: impl Into<String>,
        trusted_key: impl Into<PathBuf>,
    ) -> Self {
        Self {
            data_dir: data_dir.into(),
            agent_binary: agent_binary.into(),
            store_url: store_url.into(),
            trusted_key: trusted_key.into(),
            catalog_key: None,
            extra_env: Vec::new(),
            dev_user: None,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
            restart: RestartBackoff::default(),
        }
    }
}

/// `container.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalRecord {
    pub vmid: u32,
    pub kind: ContainerKind,
    pub hostname: String,
    pub memory_mb: u32,
    pub disk_gb: u32,
    pub cores: u32,
    pub ports: Vec<u16>,
    pub agent_port: u16,
    pub code_server_port: u16,
    pub root: PathBuf,
    pub token_file: PathBuf,
    pub created_at: DateTime<Utc>,
    /// The agent's pid while it runs (stale after it exits: check with its start time).
    pub pid: Option<u32>,
    pub pid_started_at: Option<DateTime<Utc>>,
    /// Started and not stopped since: an agent that dies is started again.
    #[serde(default)]
    pub keep_running: bool,
    /// How often the agent was started again after it died.
    #[serde(default)]
    pub restarts: u32,
}

impl LocalRecord {
    fn endpoint(&self) -> AgentEndpoint {
        let agent_url = format!("http://127.0.0.1:{}/", self.agent_port).parse().expect("a valid URL");
        let code_server = (self.kind == ContainerKind::Dev).then(|| ([127, 0, 0, 1], self.code_server_port).into());
        AgentEndpoint { agent_url, code_server }
    }

    fn agent_running(&self) -> bool {
        self.running_pid().is_some()
    }

    /// The agent's pid if the recorded process still runs.
    fn running_pid(&self) -> Option<u32> {
        self.pid.filter(|&pid| process_matches(pid, self.pid_started_at))
    }
}

/// `root/etc/zlh/agent.toml`: only keys the agent knows (it refuses unknown ones).
#[derive(Serialize)]
struct AgentToml<'a> {
    listen: &'a str,
    port: u16,
    root: &'a Path,
    vmid: u32,
    token_file: &'a Path,
    store: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    catalog_key: Option<&'a str>,
    trusted_key: &'a Path,
    dev: DevToml<'a>,
}

#[derive(Serialize)]
struct DevToml<'a> {
    code_server_bind: String,
    create_user: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

pub struct LocalHost {
    shared: Arc<Shared>,
    /// Serializes port allocation, so two creates never pick the same ports.
    allocating: Mutex<()>,
}

/// What the host and its watchers share.
struct Shared {
    config: LocalHostConfig,
    containers: PathBuf,
    http: reqwest::Client,
    /// One lock per vmid: operations on one container are serialized, others run freely.
    locks: StdMutex<HashMap<u32, Arc<Mutex<()>>>>,
    /// The watcher of each container whose agent is kept running (see [`watch`]); `stop` and
    /// `destroy` cancel it under the vmid lock, so a watcher never restarts a stopped agent.
    watchers: StdMutex<HashMap<u32, CancellationToken>>,
    /// Cancelled when the host is dropped: the watchers end, the agents keep running.
    closed: CancellationToken,
}

impl Drop for LocalHost {
    fn drop(&mut self) {
        self.shared.closed.cancel();
    }
}

impl LocalHost {
    /// Creates `<data_dir>/containers` if needed; existing containers are found there. Inside a
    /// tokio runtime, the agents of containers that were running are watched again (and restarted
    /// if they died meanwhile); otherwise that happens at their next `start`.
    pub fn new(config: LocalHostConfig) -> Result<Self, ContainerError> {
        let containers = config.data_dir.join("containers");
        std::fs::create_dir_all(&containers)?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| ContainerError::backend(format!("HTTP client: {e}")))?;
        let shared = Arc::new(Shared {
            config,
            containers,
            http,
            locks: StdMutex::default(),
            watchers: StdMutex::default(),
            closed: CancellationToken::new(),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            for vmid in shared.list()? {
                if let Some(record) = shared.record(vmid)?.filter(|r| r.keep_running) {
                    shared.watch_if_unwatched(vmid, Watched::Adopted(record.running_pid()));
                }
            }
        }
        Ok(Self { shared, allocating: Mutex::new(()) })
    }

    /// `<data_dir>/containers/<vmid>`.
    pub fn container_dir(&self, vmid: u32) -> PathBuf {
        self.shared.container_dir(vmid)
    }

    /// The container's record, if it exists.
    pub fn record(&self, vmid: u32) -> Result<Option<LocalRecord>, ContainerError> {
        self.shared.record(vmid)
    }

    /// Every container on this data dir, by vmid.
    pub fn list(&self) -> Result<Vec<u32>, ContainerError> {
        self.shared.list()
    }

    /// Two free loopback ports that no other container here has claimed.
    fn allocate_ports(&self) -> Result<(u16, u16), ContainerError> {
        let mut claimed = BTreeSet::new();
        for vmid in self.list()? {
            if let Some(r) = self.record(vmid)? {
                claimed.extend([r.agent_port, r.code_server_port]);
            }
        }
        for _ in 0..32 {
            // Both listeners are held at once, so the two ports differ.
            let a = std::net::TcpListener::bind("127.0.0.1:0")?;
            let b = std::net::TcpListener::bind("127.0.0.1:0")?;
            let (pa, pb) = (a.local_addr()?.port(), b.local_addr()?.port());
            if !claimed.contains(&pa) && !claimed.contains(&pb) {
                return Ok((pa, pb));
            }
        }
        Err(ContainerError::backend("no free loopback ports"))
    }

    /// Waits until the agent answers `/health`, it exits, or the start timeout passes.
    async fn wait_healthy(
        &self,
        record: &LocalRecord,
        child: &mut tokio::process::Child,
    ) -> Result<(), ContainerError> {
        let url = format!("http://127.0.0.1:{}/health", record.agent_port);
        let ready = async {
            loop {
                if let Ok(r) = self.shared.http.get(&url).send().await {
                    if r.status().is_success() {
                        return;
                    }
                }
                // No event says "listening"; poll the condition, bounded by the timeout below.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            _ = ready => Ok(()),
            status = child.wait() => {
                let tail = log_tail(&self.container_dir(record.vmid).join(LOG), 20);
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                Err(ContainerError::backend(format!("agent exited at start ({status}):\n{tail}")))
            }
            _ = tokio::time::sleep(self.shared.config.start_timeout) => {
                Err(ContainerError::Timeout(format!("agent of {} not healthy within {:?}", record.vmid, self.shared.config.start_timeout)))
            }
        }
    }
}

impl Shared {
    fn container_dir(&self, vmid: u32) -> PathBuf {
        self.containers.join(vmid.to_string())
    }

    fn record(&self, vmid: u32) -> Result<Option<LocalRecord>, ContainerError> {
        let path = self.container_dir(vmid).join(RECORD);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ContainerError::backend(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn list(&self) -> Result<Vec<u32>, ContainerError> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.containers)? {
            let entry = entry?;
            if let Some(vmid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) {
                if entry.path().join(RECORD).exists() {
                    out.push(vmid);
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    fn lock(&self, vmid: u32) -> Arc<Mutex<()>> {
        self.locks.lock().unwrap().entry(vmid).or_default().clone()
    }

    fn require(&self, vmid: u32) -> Result<LocalRecord, ContainerError> {
        self.record(vmid)?.ok_or(ContainerError::NotFound(vmid))
    }

    fn save(&self, record: &LocalRecord) -> Result<(), ContainerError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| ContainerError::backend(e.to_string()))?;
        atomic::write_file(&self.container_dir(record.vmid).join(RECORD), &bytes)?;
        Ok(())
    }

    /// Starts the agent process and records its pid; the caller holds the vmid lock.
    fn spawn_agent(&self, record: &mut LocalRecord) -> Result<tokio::process::Child, ContainerError> {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.container_dir(record.vmid).join(LOG))?;
        let mut cmd = tokio::process::Command::new(&self.config.agent_binary);
        cmd.arg("serve");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ZLH_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ZLH_AGENT_ROOT", &record.root)
            .envs(self.config.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| ContainerError::backend(format!("starting {}: {e}", self.config.agent_binary.display())))?;
        let pid = child.id().ok_or_else(|| ContainerError::backend("agent exited at once"))?;
        record.pid = Some(pid);
        record.pid_started_at = process_started_at(pid);
        self.save(record)?;
        Ok(child)
    }

    /// Stops the agent and everything it supervises, and its watcher first (so nothing restarts
    /// it); the caller holds the vmid lock.
    async fn stop_locked(&self, record: &mut LocalRecord) -> Result<(), ContainerError> {
        self.unwatch(record.vmid);
        if record.keep_running {
            record.keep_running = false;
            self.save(record)?;
        }
        if let Some(pid) = record.running_pid() {
            info!(vmid = record.vmid, pid, "stopping local agent");
            signal_group(pid, Signal::TERM);
            if !wait_exit(pid, self.config.stop_timeout).await {
                warn!(vmid = record.vmid, pid, "agent did not stop in time; killing it");
                signal_group(pid, Signal::KILL);
                wait_exit(pid, Duration::from_secs(5)).await;
            }
        }
        stop_supervised(&record.root, self.config.stop_timeout).await;
        if record.pid.is_some() {
            record.pid = None;
            record.pid_started_at = None;
            self.save(record)?;
        }
        Ok(())
    }

    /// Cancels the container's watcher, if any; the caller holds the vmid lock.
    fn unwatch(&self, vmid: u32) {
        if let Some(token) = self.watchers.lock().unwrap().remove(&vmid) {
            token.cancel();
        }
    }

    /// Starts watching `agent` unless a watcher already runs for `vmid`.
    fn watch_if_unwatched(self: &Arc<Self>, vmid: u32, agent: Watched) {
        let mut watchers = self.watchers.lock().unwrap();
        if watchers.get(&vmid).is_some_and(|t| !t.is_cancelled()) {
            return;
        }
        let token = self.closed.child_token();
        watchers.insert(vmid, token.clone());
        tokio::spawn(watch(self.clone(), vmid, agent, token));
    }
}

/// The agent a watcher waits for: our child (reaped by the watcher), or one found running that an
/// earlier host started (`None`: it was not running).
enum Watched {
    Child(tokio::process::Child),
    Adopted(Option<u32>),
}

impl Watched {
    async fn exited(&mut self) -> String {
        match self {
            Watched::Child(child) => child.wait().await.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
            Watched::Adopted(Some(pid)) => {
                wait_exit_unbounded(*pid).await;
                "exited".into()
            }
            Watched::Adopted(None) => "not running".into(),
        }
    }
}

/// How soon a dead agent is started again: `first` after a crash, doubling with each crash that
/// follows a short run, at most `max`; a run of `stable_after` or longer starts over at `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartBackoff {
    pub first: Duration,
    pub max: Duration,
    pub stable_after: Duration,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        Self { first: Duration::from_secs(1), max: Duration::from_secs(30), stable_after: Duration::from_secs(60) }
    }
}

impl RestartBackoff {
    /// The delay before the next start, given the previous delay (`None`: no crash yet) and how
    /// long the run that just ended lasted.
    pub fn next(&self, previous: Option<Duration>, ran: Duration) -> Duration {
        match previous {
            Some(d) if ran < self.stable_after => (d * 2).min(self.max),
            _ => self.first.min(self.max),
        }
    }
}

/// Keeps one container's agent running: when it exits, starts it again after the backoff, until
/// `stop` is cancelled (stop, destroy, start anew, the host dropped) or the record says it should
/// no longer run. Every decision to start is taken under the vmid lock, where `stop` cancels.
async fn watch(shared: Arc<Shared>, vmid: u32, mut agent: Watched, stop: CancellationToken) {
    let policy = shared.config.restart;
    let mut delay = None;
    let mut run_started = tokio::time::Instant::now();
    loop {
        let status = tokio::select! {
            status = agent.exited() => status,
            _ = stop.cancelled() => {
                // Stopping is someone else's business; ours is to reap our child when it ends.
                if let Watched::Child(mut child) = agent {
                    let _ = child.wait().await;
                }
                return;
            }
        };
        let ran = run_started.elapsed();
        let wait = policy.next(delay, ran);
        delay = Some(wait);
        warn!(vmid, %status, ran_ms = ran.as_millis() as u64, restart_in_ms = wait.as_millis() as u64, "local agent exited");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
        let lock = shared.lock(vmid);
        let _held = lock.lock().await;
        if stop.is_cancelled() {
            return;
        }
        let mut record = match shared.record(vmid) {
            Ok(Some(r)) if r.keep_running => r,
            Ok(_) => {
                shared.watchers.lock().unwrap().remove(&vmid);
                return;
            }
            Err(e) => {
                // Try again after the next delay rather than give up on the agent.
                warn!(vmid, error = %e, "reading the container record failed");
                agent = Watched::Adopted(None);
                continue;
            }
        };
        run_started = tokio::time::Instant::now();
        agent = match shared.spawn_agent(&mut record) {
            Ok(child) => {
                record.restarts += 1;
                if let Err(e) = shared.save(&record) {
                    warn!(vmid, error = %e, "recording the restart failed");
                }
                info!(vmid, pid = record.pid, restarts = record.restarts, "local agent restarted");
                Watched::Child(child)
            }
            Err(e) => {
                warn!(vmid, error = %e, "restarting the local agent failed");
                Watched::Adopted(None)
            }
        };
    }
}

#[async_trait]
impl ContainerHost for LocalHost {
    async fn create(&self, spec: &ContainerSpec) -> Result<Container, ContainerError> {
        spec.validate()?;
        let lock = self.shared.lock(spec.vmid);
        let _held = lock.lock().await;
        let dir = self.container_dir(spec.vmid);
        if dir.exists() {
            return Err(ContainerError::Conflict(format!("container {} already exists", spec.vmid)));
        }
        let _allocating = self.allocating.lock().await;
        let (agent_port, code_server_port) = self.allocate_ports()?;
        let record = LocalRecord {
            vmid: spec.vmid,
            kind: spec.kind,
            hostname: spec.hostname.clone(),
            memory_mb: spec.memory_mb,
            disk_gb: spec.disk_gb,
            cores: spec.cores,
            ports: spec.ports.clone(),
            agent_port,
            code_server_port,
            root: dir.join("root"),
            token_file: dir.join(TOKEN),
            created_at: Utc::now(),
            pid: None,
            pid_started_at: None,
            keep_running: false,
            restarts: 0,
        };
        // Everything is made in a staging dir renamed into place at the end: a crash half-way
        // leaves no half-made container.
        let containers = &self.shared.containers;
        let staging = containers.join(format!(".{}.creating", spec.vmid));
        let _ = std::fs::remove_dir_all(&staging);
        let made = self.stage(&staging, &record, spec);
        let made = made.and_then(|()| {
            std::fs::rename(&staging, &dir)?;
            atomic::sync_dir(containers)?;
            Ok(())
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        info!(vmid = spec.vmid, agent_port, code_server_port, "local container created");
        Ok(Container { vmid: spec.vmid, endpoint: record.endpoint() })
    }

    async fn start(&self, vmid: u32) -> Result<(), ContainerError> {
        let lock = self.shared.lock(vmid);
        let _held = lock.lock().await;
        let mut record = self.shared.require(vmid)?;
        if let Some(pid) = record.running_pid() {
            if !record.keep_running {
                record.keep_running = true;
                self.shared.save(&record)?;
            }
            self.shared.watch_if_unwatched(vmid, Watched::Adopted(Some(pid)));
            return Ok(());
        }
        // A watcher waiting to restart the agent would race this start: this start wins.
        self.shared.unwatch(vmid);
        let mut child = self.shared.spawn_agent(&mut record)?;
        let pid = record.pid.unwrap_or_default();
        info!(vmid, pid, port = record.agent_port, "local agent started");
        let result = self.wait_healthy(&record, &mut child).await;
        if let Err(e) = &result {
            warn!(vmid, error = %e, "local agent did not come up");
            if record.agent_running() {
                signal_group(pid, Signal::KILL);
            }
            let _ = child.wait().await;
            record.pid = None;
            record.pid_started_at = None;
            record.keep_running = false;
            self.shared.save(&record)?;
            return result;
        }
        record.keep_running = true;
        self.shared.save(&record)?;
        // From here on the watcher reaps the agent and starts it again whenever it dies.
        self.shared.watch_if_unwatched(vmid, Watched::Child(child));
        Ok(())
    }

    async fn stop(&self, vmid: u32) -> Result<(), ContainerError> {
        let lock = self.shared.lock(vmid);
        let _held = lock.lock().await;
        let mut record = self.shared.require(vmid)?;
        self.shared.stop_locked(&mut record).await
    }

    async fn destroy(&self, vmid: u32) -> Result<(), ContainerError> {
        let lock = self.shared.lock(vmid);
        let _held = lock.lock().await;
        let dir = self.container_dir(vmid);
        self.shared.unwatch(vmid);
        if let Some(mut record) = self.record(vmid)? {
            self.shared.stop_locked(&mut record).await?;
        }
        let containers = self.shared.containers.clone();
        let staging = containers.join(format!(".{vmid}.creating"));
        remove_dirs(vec![dir, staging]).await?;
        atomic::sync_dir(&containers)?;
        info!(vmid, "local container destroyed");
        Ok(())
    }

    async fn status(&self, vmid: u32) -> Result<ContainerState, ContainerError> {
        Ok(match self.record(vmid)? {
            None => ContainerState::Missing,
            Some(r) if r.agent_running() => ContainerState::Running,
            Some(_) => ContainerState::Stopped,
        })
    }

    async fn agent_endpoint(&self, vmid: u32) -> Result<AgentEndpoint, ContainerError> {
        Ok(self.shared.require(vmid)?.endpoint())
    }
}

impl LocalHost {
    /// Writes the token file, the agent's config and the record into `staging`.
    fn stage(&self, staging: &Path, record: &LocalRecord, spec: &ContainerSpec) -> Result<(), ContainerError> {
        let etc = staging.join("root/etc/zlh");
        std::fs::create_dir_all(&etc)?;
        let token_path = staging.join(TOKEN);
        atomic::write_file_with(&token_path, |f| {
            // Private before a single byte of the secret is in it.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(spec.agent_token.as_bytes())
        })?;
        let toml = AgentToml {
            listen: "127.0.0.1",
            port: record.agent_port,
            root: &record.root,
            vmid: record.vmid,
            token_file: &record.token_file,
            store: &self.shared.config.store_url,
            catalog_key: self.shared.config.catalog_key.as_deref(),
            trusted_key: &self.shared.config.trusted_key,
            dev: DevToml {
                code_server_bind: format!("127.0.0.1:{}", record.code_server_port),
                create_user: self.shared.config.dev_user.is_some(),
                user: self.shared.config.dev_user.as_deref(),
            },
        };
        let text = toml::to_string(&toml).map_err(|e| ContainerError::backend(format!("agent.toml: {e}")))?;
        atomic::write_file(&etc.join("agent.toml"), text.as_bytes())?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| ContainerError::backend(e.to_string()))?;
        atomic::write_file(&staging.join(RECORD), &bytes)?;
        Ok(())
    }
}

/// Stops the processes the agent supervises under shims: SIGTERM to each child's process group,
/// wait (each its own grace, at most `timeout`), SIGKILL what is left; then the shims themselves
/// (they exit once their child has).
async fn stop_supervised(root: &Path, timeout: Duration) {
    let Ok(entries) = std::fs::read_dir(root.join("var/lib/zlh/supervisor")) else {
        return;
    };
    let shims: Vec<(ShimState, Duration)> = entries
        .flatten()
        .filter_map(|e| {
            let state = serde_json::from_slice(&std::fs::read(e.path().join("shim.json")).ok()?).ok()?;
            Some((state, shim::stop_grace(&e.path()).map_or(timeout, |g| g.min(timeout))))
        })
        .collect();
    let live = |pid: u32, s: &ShimState| process_running_since(pid, s.started_at).then_some(pid);
    let children: Vec<(u32, Duration)> = shims.iter().filter_map(|(s, g)| Some((live(s.child_pid, s)?, *g))).collect();
    for &(pid, _) in &children {
        info!(pid, "stopping supervised process");
        signal_group(pid, Signal::TERM);
    }
    // They stop in parallel, each by its own deadline.
    let sent = tokio::time::Instant::now();
    for &(pid, grace) in &children {
        let left = (sent + grace).saturating_duration_since(tokio::time::Instant::now());
        if !wait_exit(pid, left).await {
            warn!(pid, "supervised process did not stop in time; killing it");
            signal_group(pid, Signal::KILL);
            wait_exit(pid, Duration::from_secs(5)).await;
        }
    }
    for pid in shims.iter().filter_map(|(s, _)| live(s.shim_pid, s)) {
        if !wait_exit(pid, Duration::from_secs(5)).await {
            signal_group(pid, Signal::KILL);
            wait_exit(pid, Duration::from_secs(5)).await;
        }
    }
}

/// Sends `sig` to the process group led by `pid` (falling back to the process alone).
fn signal_group(pid: u32, sig: Signal) {
    let Some(p) = Pid::from_raw(pid as i32) else {
        return;
    };
    if rustix::process::kill_process_group(p, sig).is_err() {
        let _ = rustix::process::kill_process(p, sig);
    }
}

/// Waits until `pid` has exited (through a pidfd, so no polling); false on timeout.
async fn wait_exit(pid: u32, timeout: Duration) -> bool {
    let Some(p) = Pid::from_raw(pid as i32) else {
        return true;
    };
    let fd = match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return true,
        Err(_) => return !process_alive(pid),
    };
    // SAFETY: an `OwnedFd` is a valid open descriptor that stays the same until it is dropped,
    // which happens only with the `AsyncFd`.
    match unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) } {
        Ok(afd) => tokio::time::timeout(timeout, afd.readable()).await.is_ok(),
        Err(_) => !process_alive(pid),
    }
}

/// Waits until `pid` has exited, however long that takes.
async fn wait_exit_unbounded(pid: u32) {
    while !wait_exit(pid, Duration::from_secs(3600)).await {
        // Without a pidfd, `wait_exit` answers at once: look again a moment later.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `(state, start time in clock ticks since boot)` from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields resume after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    Some((fields.first()?.chars().next()?, fields.get(19)?.parse().ok()?))
}

fn process_alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

/// When `pid` started, wall clock (whole seconds: boot time is).
fn process_started_at(pid: u32) -> Option<DateTime<Utc>> {
    let (_, ticks) = proc_stat(pid)?;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: i64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    let hz = rustix::param::clock_ticks_per_second().max(1);
    let millis = (ticks as i128 * 1000 / hz as i128) as i64;
    DateTime::from_timestamp(btime, 0).map(|b| b + chrono::Duration::milliseconds(millis))
}

/// `pid` runs and is the process recorded, which started at `expected` (give or take the slack).
/// Without a recorded time (a start time could not be read), a live pid is taken as it.
fn process_matches(pid: u32, expected: Option<DateTime<Utc>>) -> bool {
    if !process_alive(pid) {
        return false;
    }
    match (expected, process_started_at(pid)) {
        (Some(expected), Some(actual)) => (actual - expected).num_seconds().abs() <= START_SLACK_SECS,
        (expected, _) => expected.is_none(),
    }
}

/// `pid` runs and started no later than `seen_at` (plus the slack), when a shim recorded it as
/// running: a pid reused by another process started after the recorded one ended.
fn process_running_since(pid: u32, seen_at: DateTime<Utc>) -> bool {
    process_alive(pid)
        && process_started_at(pid).is_none_or(|actual| (actual - seen_at).num_seconds() <= START_SLACK_SECS)
}

/// The last `n` lines of a log file, for error messages.
/// Removes `dirs` and all they hold, off the async threads; missing ones are fine.
pub(crate) async fn remove_dirs(dirs: Vec<PathBuf>) -> Result<(), ContainerError> {
    tokio::task::spawn_blocking(move || {
        for d in dirs {
            match std::fs::remove_dir_all(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .map_err(|e| ContainerError::backend(format!("removing container: {e}")))??;
    Ok(())
}

/// The last `n` lines of a log file (empty when it cannot be read).
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_matches_its_start_time_and_not_another() {
        let me = std::process::id();
        let started = process_started_at(me).unwrap();
        assert!(process_matches(me, Some(started)));
        assert!(process_matches(me, None));
        assert!(!process_matches(me, Some(started - chrono::Duration::hours(1))), "a reused pid");
        assert!(!process_alive(u32::MAX / 2));
        assert!(process_running_since(me, started + chrono::Duration::minutes(1)));
        assert!(!process_running_since(me, started - chrono::Duration::minutes(1)), "a reused pid");
    }

    #[test]
    fn restart_delays_double_to_the_cap_and_start_over_after_a_stable_run() {
        let b = RestartBackoff::default();
        let short = Duration::from_secs(2);
        let mut delays = vec![b.next(None, short)];
        for _ in 0..7 {
            delays.push(b.next(delays.last().copied(), short));
        }
        let secs: Vec<u64> = delays.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(b.next(Some(b.max), b.stable_after), b.first, "a stable run resets the backoff");
    }
}
