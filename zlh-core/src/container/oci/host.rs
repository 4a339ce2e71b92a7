//! [`OciHost`]: each container is an OCI container run by runc, with its own namespaces (pid,
//! mount, uts, ipc, cgroup, network, and user where the kernel allows it), dropped capabilities,
//! `no_new_privileges`, a seccomp filter, cgroup limits from the plan, and its own address from
//! the CNI plugins ([`super::network`]). The agent runs inside as the container's root under a
//! small init (`zlh-agentd init`, [`super::init`]); everything a tenant runs runs as the dev user.
//!
//! Layout under `<containers_dir>/<vmid>/`:
//! - `container.json` — [`OciRecord`], written atomically;
//! - `bundle/` — `config.json` ([`super::bundle::runtime_config`]) and the read-only `rootfs/` of
//!   mount points;
//! - `agent/` — bound at `/.zlh/etc`: `agent.toml`, `agent.token` (mode 0600, owned by the
//!   container's root: the dev user cannot read it), `trusted.pub`;
//! - `etc/` — `passwd`, `group`, `hosts`, `hostname`, `resolv.conf`, bound over the host's, and
//!   `profile.d/` (a copy of the host's, where the agent adds the runtimes' PATH);
//! - `disk.img` — the container's disk: an ext4 image of the plan's size, loop-mounted at `fs/`,
//!   which holds the writable directories `home-dev` (`/home/dev`), `opt-zlh` (`/opt/zlh`),
//!   `var-lib-zlh` (`/var/lib/zlh`), `tmp` (`/tmp`);
//! - `fs/log/agent.log` — the container's output (the init's and the agent's logs), on its disk.
//!
//! With a user namespace, container ids `0..65536` are host ids `ID_BASE + vmid·65536 …`, so no
//! two containers share an id and none is an id of the host's. The directories on the way to the
//! bundle must be traversable by those ids (mode `o+x`); [`OciHost::new`] checks that.
//!
//! State is in these files and in runc's own state dir, so a new `OciHost` finds every
//! container; [`OciHost::recover`] removes what a crash left half-made (runc containers,
//! network namespaces and rules of containers that no longer exist).

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::bundle::{self, Bind, BundleSpec, IdMap};
use super::network::{CniNetwork, NetworkConfig, PortMapping, Protocol};
use super::runc::Runc;
use crate::atomic;
use crate::container::local::{log_tail, remove_dirs};
use crate::container::{
    AgentEndpoint, Container, ContainerError, ContainerHost, ContainerKind, ContainerSpec, ContainerState,
};

const RECORD: &str = "container.json";
/// The container's output (init and agent logs), on the container's own disk: it counts against
/// the plan, not the host's disk, and is not visible inside.
const LOG: &str = "fs/log/agent.log";
/// The agent's port inside every container. The container's init binds it before anything else
/// runs and hands it to each agent it starts, so no tenant process can hold it while the agent
/// restarts and receive the API's token.
pub const AGENT_PORT: u16 = 18888;
/// code-server's port inside a dev container.
pub const CODE_SERVER_PORT: u16 = 6000;
/// The dev user's id inside every container.
pub const DEV_UID: u32 = 1000;
/// Ids per container in the user namespace.
const IDS_PER_CONTAINER: u32 = 65536;
/// The first host id given to containers (above the ids of the host's own users).
const ID_BASE: u32 = 1 << 20;
/// Processes per container, at most.
const PIDS_LIMIT: i64 = 4096;

#[derive(Debug, Clone)]
pub struct OciHostConfig {
    /// Where containers live (`<data_dir>/oci`).
    pub containers_dir: PathBuf,
    /// The OCI runtime (`runc`; `crun` takes the same commands).
    pub runtime: PathBuf,
    pub agent_binary: PathBuf,
    /// Artifact store URL handed to every agent; a local store (`file://`, a path) is bound in
    /// read-only.
    pub store_url: String,
    pub trusted_key: PathBuf,
    pub catalog_key: Option<String>,
    /// More environment for every agent (`ZLH_LOG`, …).
    pub extra_env: Vec<(String, String)>,
    pub network: NetworkConfig,
    /// Map the container's ids into a range of their own. Required: without it the container's
    /// root would be the host's, so `false` is refused.
    pub user_namespace: bool,
    /// How long `start` waits for the agent's `/health`.
    pub start_timeout: Duration,
    /// How long processes get after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
}

impl OciHostConfig {
    pub fn new(
        containers_dir: impl Into<PathBuf>,
        agent_binary: impl Into<PathBuf>,
        store_url: impl Into<String>,
        trusted_key: impl Into<PathBuf>,
    ) -> Self {
        let containers_dir = containers_dir.into();
        Self {
            network: NetworkConfig::new(containers_dir.join("network")),
            containers_dir,
            runtime: PathBuf::from("runc"),
            agent_binary: agent_binary.into(),
            store_url: store_url.into(),
            trusted_key: trusted_key.into(),
            catalog_key: None,
            extra_env: Vec::new(),
            user_namespace: true,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(10),
        }
    }
}

/// `container.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OciRecord {
    pub vmid: u32,
    pub kind: ContainerKind,
    pub hostname: String,
    pub memory_mb: u32,
    pub disk_gb: u32,
    pub cores: u32,
    pub ports: Vec<u16>,
    /// The container's own address (from the CNI plugins).
    pub address: Ipv4Addr,
    /// The host id of the container's root; `None` without a user namespace.
    pub id_base: Option<u32>,
    pub created_at: DateTime<Utc>,
}

impl OciRecord {
    fn endpoint(&self) -> AgentEndpoint {
        let agent_url = format!("http://{}:{AGENT_PORT}/", self.address).parse().expect("a valid URL");
        let code_server = (self.kind == ContainerKind::Dev).then(|| (self.address, CODE_SERVER_PORT).into());
        AgentEndpoint { agent_url, code_server }
    }
}

pub struct OciHost {
    config: OciHostConfig,
    runc: Runc,
    network: CniNetwork,
    http: reqwest::Client,
    /// One lock per vmid: operations on one container are serialized, others run freely.
    locks: StdMutex<HashMap<u32, Arc<Mutex<()>>>>,
}

/// runc's name for a container.
fn runc_id(vmid: u32) -> String {
    format!("zlh-{vmid}")
}

impl OciHost {
    /// Checks the runtime, the plugins and that the containers' ids can reach their bundles.
    pub fn new(config: OciHostConfig) -> Result<Self, ContainerError> {
        if !config.user_namespace {
            return Err(ContainerError::backend(
                "user_namespace = false would make each container's root the host's root: refused",
            ));
        }
        let runtime = which(&config.runtime)
            .ok_or_else(|| ContainerError::backend(format!("OCI runtime {} not found", config.runtime.display())))?;
        std::fs::create_dir_all(&config.containers_dir)?;
        let containers_dir = config.containers_dir.canonicalize()?;
        // The mount table escapes such characters; a path with them could not be told mounted.
        if containers_dir.to_string_lossy().contains(|c: char| c.is_whitespace() || c == '\\') {
            return Err(ContainerError::backend(format!(
                "{}: the containers' directory may hold no spaces or backslashes",
                containers_dir.display()
            )));
        }
        // The containers run a copy of the agent kept here: reachable by their ids wherever the
        // original is, and a rebuilt or upgraded binary reaches containers as they start again.
        let agent_copy = containers_dir.join("bin/zlh-agentd");
        std::fs::create_dir_all(containers_dir.join("bin"))?;
        let aside = atomic::aside_path(&agent_copy);
        std::fs::copy(&config.agent_binary, &aside)
            .map_err(|e| ContainerError::backend(format!("copying {}: {e}", config.agent_binary.display())))?;
        std::fs::File::open(&aside)?.sync_all()?;
        std::fs::rename(&aside, &agent_copy)?;
        std::fs::set_permissions(&agent_copy, std::fs::Permissions::from_mode(0o755))?;
        if config.user_namespace {
            if let Some(dir) = untraversable(&containers_dir) {
                return Err(ContainerError::backend(format!(
                    "{} is not reachable by the containers' own users: {} is not traversable by others (mode o+x)",
                    containers_dir.display(),
                    dir.display()
                )));
            }
        }
        // The agent and code-server answer the control plane (root) only, never another user of
        // this machine.
        let network = NetworkConfig { host_only_ports: vec![AGENT_PORT, CODE_SERVER_PORT], ..config.network.clone() };
        let network = CniNetwork::new(network).map_err(|e| ContainerError::backend(e.to_string()))?;
        let runc = Runc { binary: runtime, root: containers_dir.join("runc") };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| ContainerError::backend(e.to_string()))?;
        Ok(Self {
            config: OciHostConfig { containers_dir, agent_binary: agent_copy, ..config },
            runc,
            network,
            http,
            locks: Default::default(),
        })
    }

    pub fn container_dir(&self, vmid: u32) -> PathBuf {
        self.config.containers_dir.join(vmid.to_string())
    }

    pub fn record(&self, vmid: u32) -> Result<Option<OciRecord>, ContainerError> {
        match std::fs::read(self.container_dir(vmid).join(RECORD)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| ContainerError::backend(format!("container {vmid}: unreadable {RECORD}: {e}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The vmids of every container made.
    pub fn list(&self) -> Result<Vec<u32>, ContainerError> {
        let mut vmids: Vec<u32> = std::fs::read_dir(&self.config.containers_dir)?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .filter(|vmid| self.container_dir(*vmid).join(RECORD).exists())
            .collect();
        vmids.sort_unstable();
        Ok(vmids)
    }

    /// Removes what a crash left behind: half-made containers, runc containers and networks of
    /// containers that no longer exist. Returns the vmids cleaned up.
    pub async fn recover(&self) -> Result<Vec<u32>, ContainerError> {
        let live: BTreeSet<u32> = self.list()?.into_iter().collect();
        let mut cleaned = BTreeSet::new();
        // The runc containers first: a half-made container's may still run from its files.
        for id in self.runc.list().await? {
            let Some(vmid) = id.strip_prefix("zlh-").and_then(|n| n.parse::<u32>().ok()) else { continue };
            if !live.contains(&vmid) {
                warn!(vmid, "removing a runc container without its container");
                self.runc.delete(&id).await?;
                cleaned.insert(vmid);
            }
        }
        for entry in std::fs::read_dir(&self.config.containers_dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(vmid) =
                name.strip_prefix('.').and_then(|n| n.strip_suffix(".creating")).and_then(|n| n.parse().ok())
            {
                warn!(vmid, "removing a container left half-made");
                // Never into a mounted disk: remove_dir_all would empty it.
                self.unmount_disk(&entry.path()).await?;
                let _ = std::fs::remove_dir_all(entry.path());
                cleaned.insert(vmid);
            }
        }
        let gone = self.network.cleanup(&live).await.map_err(|e| ContainerError::backend(e.to_string()))?;
        cleaned.extend(gone);
        Ok(cleaned.into_iter().collect())
    }

    fn lock(&self, vmid: u32) -> Arc<Mutex<()>> {
        self.locks.lock().unwrap().entry(vmid).or_default().clone()
    }

    fn require(&self, vmid: u32) -> Result<OciRecord, ContainerError> {
        self.record(vmid)?.ok_or(ContainerError::NotFound(vmid))
    }

    fn id_map(&self, vmid: u32) -> Result<Option<IdMap>, ContainerError> {
        if !self.config.user_namespace {
            return Ok(None);
        }
        let host_base = vmid
            .checked_mul(IDS_PER_CONTAINER)
            .and_then(|b| b.checked_add(ID_BASE))
            .filter(|b| b.checked_add(IDS_PER_CONTAINER).is_some())
            .ok_or_else(|| {
                ContainerError::InvalidSpec(format!("vmid {vmid} is too large for its own id range (at most 65518)"))
            })?;
        Ok(Some(IdMap { host_base, size: IDS_PER_CONTAINER }))
    }

    /// Where a local store's files are, if the store is local.
    fn local_store_dir(&self) -> Option<PathBuf> {
        let url = &self.config.store_url;
        if url.starts_with('/') {
            return Some(PathBuf::from(url));
        }
        url::Url::parse(url).ok().filter(|u| u.scheme() == "file").and_then(|u| u.to_file_path().ok())
    }

    /// Writes every file of a new container into `staging`.
    fn stage(&self, staging: &Path, spec: &ContainerSpec, id_map: Option<IdMap>) -> Result<(), ContainerError> {
        let root_id = id_map.map_or(0, |m| m.host_base);
        std::fs::create_dir_all(staging)?;
        std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o711))?;

        // The writable directories live on the container's own disk (`ensure_disk`), mounted
        // over `fs/`; these are the mount points' shadows beneath it.
        for dir in WRITABLE {
            std::fs::create_dir_all(staging.join("fs").join(dir.0))?;
        }

        // The agent's config: readable by the container's root only where it holds a secret.
        let agent = staging.join("agent");
        std::fs::create_dir_all(&agent)?;
        let token = agent.join("agent.token");
        atomic::write_file_with(&token, |f| {
            f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
            f.write_all(spec.agent_token.as_bytes())
        })?;
        chown(&token, Some(root_id), Some(root_id))?;
        atomic::write_file(&agent.join("trusted.pub"), &std::fs::read(&self.config.trusted_key)?)?;
        let store = if self.local_store_dir().is_some() {
            format!("file://{}", bundle::STORE_DIR)
        } else {
            self.config.store_url.clone()
        };
        let toml = agent_toml(spec.vmid, &store, self.config.catalog_key.as_deref());
        atomic::write_file(&agent.join("agent.toml"), toml.as_bytes())?;

        // Who is who inside, and the names it resolves.
        let etc = staging.join("etc");
        std::fs::create_dir_all(&etc)?;
        atomic::write_file(&etc.join("passwd"), PASSWD.as_bytes())?;
        atomic::write_file(&etc.join("group"), GROUP.as_bytes())?;
        atomic::write_file(&etc.join("hostname"), format!("{}\n", spec.hostname).as_bytes())?;
        let hosts = format!("127.0.0.1\tlocalhost\n::1\tlocalhost\n127.0.1.1\t{}\n", spec.hostname);
        atomic::write_file(&etc.join("hosts"), hosts.as_bytes())?;
        atomic::write_file(&etc.join("resolv.conf"), resolv_conf().as_bytes())?;
        // Readable inside whatever the API's umask (a unit's UMask=0027 would hide them).
        for name in ["passwd", "group", "hostname", "hosts", "resolv.conf"] {
            std::fs::set_permissions(etc.join(name), std::fs::Permissions::from_mode(0o644))?;
        }
        for name in ["trusted.pub", "agent.toml"] {
            std::fs::set_permissions(agent.join(name), std::fs::Permissions::from_mode(0o644))?;
        }
        for dir in [&agent, &etc] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        }
        std::fs::create_dir_all(staging.join("empty"))?;

        let bundle_dir = staging.join("bundle");
        std::fs::create_dir_all(&bundle_dir)?;
        Ok(())
    }

    /// The runtime config for a staged or made container at `dir`.
    fn bundle_spec(&self, dir: &Path, record: &OciRecord) -> BundleSpec {
        let fs = dir.join("fs");
        let etc = dir.join("etc");
        let mut binds = vec![
            Bind::rw(fs.join("home-dev"), "/home/dev"),
            Bind::rw(fs.join("opt-zlh"), "/opt/zlh"),
            Bind::rw(fs.join("var-lib-zlh"), "/var/lib/zlh"),
            Bind::rw(fs.join("tmp"), "/tmp"),
            Bind::ro(&self.config.agent_binary, bundle::AGENT_PATH),
            Bind::ro(dir.join("agent"), bundle::AGENT_ETC),
        ];
        if let Some(store) = self.local_store_dir() {
            binds.push(Bind::ro(store, bundle::STORE_DIR));
        }
        for name in ["passwd", "group", "hostname", "hosts", "resolv.conf"] {
            binds.push(Bind::ro(etc.join(name), &format!("/etc/{name}")));
        }
        if Path::new("/etc/profile.d").is_dir() {
            binds.push(Bind::rw(fs.join("etc-profile-d"), "/etc/profile.d"));
        }
        // The host's own configuration that may hold secrets (the API's, services' environment
        // files and credentials, SSH, the CNI's) is not the container's.
        for masked in HOST_ETC_MASKED {
            if Path::new(masked).is_dir() {
                binds.push(Bind::ro(dir.join("empty"), masked));
            }
        }
        let mut env = vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "HOME=/root".to_string(),
            "ZLH_LOG_FORMAT=json".to_string(),
        ];
        env.extend(self.config.extra_env.iter().map(|(k, v)| format!("{k}={v}")));
        let grace = self.config.stop_timeout.as_secs().max(1).to_string();
        BundleSpec {
            hostname: record.hostname.clone(),
            args: [
                bundle::AGENT_PATH,
                "init",
                "--stop-grace-secs",
                &grace,
                "--listen",
                &format!("0.0.0.0:{AGENT_PORT}"),
            ]
            .into_iter()
            .map(String::from)
            .chain(["--", "serve", "--config"].map(String::from))
            .chain([format!("{}/agent.toml", bundle::AGENT_ETC)])
            .collect(),
            env,
            id_map: record.id_base.map(|host_base| IdMap { host_base, size: IDS_PER_CONTAINER }),
            netns: self.network.netns_path(record.vmid),
            memory_bytes: u64::from(record.memory_mb) << 20,
            cpus: record.cores,
            pids: PIDS_LIMIT,
            cgroups_path: format!("zlh/{}", runc_id(record.vmid)),
            binds,
        }
    }

    /// Writes `config.json` and the root filesystem's mount points for `record` into `at`, for
    /// the container that will be at `dir` (the paths in the config are the final ones).
    fn write_bundle(&self, at: &Path, dir: &Path, record: &OciRecord) -> Result<(), ContainerError> {
        let spec = self.bundle_spec(dir, record);
        let staged = BundleSpec {
            binds: spec.binds.iter().map(|b| Bind { source: restage(&b.source, dir, at), ..b.clone() }).collect(),
            ..spec.clone()
        };
        let bundle_dir = at.join("bundle");
        let rootfs = bundle_dir.join("rootfs");
        bundle::make_rootfs(&rootfs, &staged)?;
        std::fs::create_dir_all(rootfs.join("root"))?;
        let config = serde_json::to_vec_pretty(&bundle::runtime_config(&spec)).expect("JSON");
        atomic::write_file(&bundle_dir.join("config.json"), &config)?;
        Ok(())
    }

    fn save(&self, dir: &Path, record: &OciRecord) -> Result<(), ContainerError> {
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| ContainerError::backend(e.to_string()))?;
        atomic::write_file(&dir.join(RECORD), &bytes)?;
        Ok(())
    }

    async fn wait_healthy(&self, record: &OciRecord) -> Result<(), ContainerError> {
        let url = format!("http://{}:{AGENT_PORT}/health", record.address);
        let id = runc_id(record.vmid);
        let deadline = tokio::time::Instant::now() + self.config.start_timeout;
        loop {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if !matches!(self.runc.state(&id).await?, Some(s) if s.status == "running") {
                let tail = log_tail(&self.container_dir(record.vmid).join(LOG), 20);
                return Err(ContainerError::backend(format!("container {} ended at start:\n{tail}", record.vmid)));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ContainerError::Timeout(format!(
                    "agent of {} not healthy within {:?}",
                    record.vmid, self.config.start_timeout
                )));
            }
            // No event says "listening"; poll the condition, bounded by the deadline above.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Refuses a disk the host cannot hold: the images are sparse, so what every container was
    /// promised and has not used yet must still fit in the free space, with the new one.
    fn check_disk_room(&self, disk_gb: u32) -> Result<(), ContainerError> {
        use std::os::unix::fs::MetadataExt;
        let fs = rustix::fs::statvfs(&self.config.containers_dir).map_err(std::io::Error::from)?;
        let free = fs.f_bavail.saturating_mul(fs.f_frsize);
        let mut promised = 0u64;
        for vmid in self.list()? {
            let (Some(record), Ok(image)) =
                (self.record(vmid)?, std::fs::metadata(self.container_dir(vmid).join("disk.img")))
            else {
                continue;
            };
            let size = u64::from(record.disk_gb) << 30;
            promised += size.saturating_sub(image.blocks() * 512);
        }
        let wanted = u64::from(disk_gb) << 30;
        if promised.saturating_add(wanted) > free {
            return Err(ContainerError::InvalidSpec(format!(
                "no room for a {disk_gb} GB disk on this host: {} GB free, {} GB of it promised to existing containers",
                free >> 30,
                promised >> 30
            )));
        }
        Ok(())
    }

    /// The container's writable directories live on a filesystem of the plan's disk size (ext4 in
    /// `disk.img`, loop-mounted over `fs/`), so a tenant writes no more than its plan allows,
    /// from the shell as from the agent. Made at create, mounted again at start after a reboot.
    async fn ensure_disk(&self, dir: &Path, record: &OciRecord) -> Result<(), ContainerError> {
        let image = dir.join("disk.img");
        let fs = dir.join("fs");
        if !image.exists() {
            let aside = atomic::aside_path(&image);
            std::fs::File::create(&aside)?.set_len(u64::from(record.disk_gb) << 30)?;
            let args = ["-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1"].map(std::ffi::OsStr::new);
            let made = run_tool("mkfs.ext4", &[&args[..], &[aside.as_os_str()]].concat()).await;
            if let Err(e) = made {
                let _ = std::fs::remove_file(&aside);
                return Err(e);
            }
            std::fs::rename(&aside, &image)?;
        }
        if !is_mounted(&fs) {
            let options = std::ffi::OsStr::new("loop,nosuid,nodev");
            run_tool("mount", &[std::ffi::OsStr::new("-o"), options, image.as_os_str(), fs.as_os_str()]).await?;
        }
        std::fs::set_permissions(&fs, std::fs::Permissions::from_mode(0o711))?;
        let root_id = record.id_base.unwrap_or(0);
        for (name, owner, mode) in WRITABLE {
            let path = fs.join(name);
            std::fs::create_dir_all(&path)?;
            let id = match owner {
                Owner::Root => root_id,
                Owner::Dev => root_id + DEV_UID,
                Owner::Host => 0,
            };
            own(&path, id, mode)?;
        }
        // The login scripts start as the host's; the agent adds the runtimes' PATH to them.
        let profile = fs.join("etc-profile-d");
        if std::fs::read_dir(&profile)?.next().is_none() {
            for entry in std::fs::read_dir("/etc/profile.d").into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_file()) {
                    let copy = profile.join(entry.file_name());
                    std::fs::copy(entry.path(), &copy)?;
                    own(&copy, root_id, 0o644)?;
                }
            }
        }
        Ok(())
    }

    /// Unmounts the container's disk, if mounted.
    async fn unmount_disk(&self, dir: &Path) -> Result<(), ContainerError> {
        let fs = dir.join("fs");
        if is_mounted(&fs) {
            run_tool("umount", &[fs.as_os_str()]).await?;
        }
        Ok(())
    }

    /// Stops every process of the container and removes runc's container (not ours).
    async fn stop_locked(&self, vmid: u32) -> Result<(), ContainerError> {
        let id = runc_id(vmid);
        let Some(state) = self.runc.state(&id).await? else { return Ok(()) };
        if state.status == "running" {
            // The init passes SIGTERM on to everything and waits its grace; then SIGKILL.
            self.runc.kill(&id, "TERM", false).await?;
            let deadline = tokio::time::Instant::now() + self.config.stop_timeout + Duration::from_secs(2);
            while matches!(self.runc.state(&id).await?, Some(s) if s.status == "running") {
                if tokio::time::Instant::now() >= deadline {
                    warn!(vmid, "container did not stop in time; killing it");
                    self.runc.kill(&id, "KILL", true).await?;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.runc.delete(&id).await?;
        info!(vmid, "OCI container stopped");
        Ok(())
    }
}

#[async_trait]
impl ContainerHost for OciHost {
    async fn create(&self, spec: &ContainerSpec) -> Result<Container, ContainerError> {
        spec.validate()?;
        let id_map = self.id_map(spec.vmid)?;
        let lock = self.lock(spec.vmid);
        let _held = lock.lock().await;
        let dir = self.container_dir(spec.vmid);
        if dir.exists() {
            return Err(ContainerError::Conflict(format!("container {} already exists", spec.vmid)));
        }
        self.check_disk_room(spec.disk_gb)?;
        // Made aside and renamed into place: a crash half-way leaves no half-made container.
        let staging = self.config.containers_dir.join(format!(".{}.creating", spec.vmid));
        let _ = std::fs::remove_dir_all(&staging);
        if let Err(e) = self.stage(&staging, spec, id_map) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        let ports: Vec<PortMapping> = spec
            .ports
            .iter()
            .flat_map(|&p| {
                [Protocol::Tcp, Protocol::Udp].map(|protocol| PortMapping { host_port: p, container_port: p, protocol })
            })
            .collect();
        let attachment = match self.network.attach(spec.vmid, &ports).await {
            Ok(a) => a,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                return Err(ContainerError::backend(e.to_string()));
            }
        };
        let record = OciRecord {
            vmid: spec.vmid,
            kind: spec.kind,
            hostname: spec.hostname.clone(),
            memory_mb: spec.memory_mb,
            disk_gb: spec.disk_gb,
            cores: spec.cores,
            ports: spec.ports.clone(),
            address: attachment.address,
            id_base: id_map.map(|m| m.host_base),
            created_at: Utc::now(),
        };
        let made = self.write_bundle(&staging, &dir, &record).and_then(|()| {
            self.save(&staging, &record)?;
            std::fs::rename(&staging, &dir)?;
            atomic::sync_dir(&self.config.containers_dir)?;
            Ok(())
        });
        if let Err(e) = made {
            let _ = std::fs::remove_dir_all(&staging);
            let _ = self.network.detach(spec.vmid).await;
            return Err(e);
        }
        if let Err(e) = self.ensure_disk(&dir, &record).await {
            let _ = self.unmount_disk(&dir).await;
            let _ = std::fs::remove_dir_all(&dir);
            let _ = self.network.detach(spec.vmid).await;
            return Err(e);
        }
        info!(vmid = spec.vmid, address = %record.address, "OCI container created");
        Ok(Container { vmid: spec.vmid, endpoint: record.endpoint() })
    }

    async fn start(&self, vmid: u32) -> Result<(), ContainerError> {
        let lock = self.lock(vmid);
        let _held = lock.lock().await;
        let record = self.require(vmid)?;
        let id = runc_id(vmid);
        match self.runc.state(&id).await? {
            Some(s) if s.status == "running" => return Ok(()),
            // Stopped or half-started: start over.
            Some(_) => self.runc.delete(&id).await?,
            None => {}
        }
        // After a reboot the namespace is gone; the address stays the recorded one only if the
        // lease survived, so the record follows what the plugins say.
        let mut record = record;
        if self.network.attachment(vmid).await.map_err(|e| ContainerError::backend(e.to_string()))?.is_none()
            || !self.network.netns_path(vmid).exists()
        {
            let _ = self.network.detach(vmid).await;
            let ports: Vec<PortMapping> = record
                .ports
                .iter()
                .flat_map(|&p| {
                    [Protocol::Tcp, Protocol::Udp].map(|protocol| PortMapping {
                        host_port: p,
                        container_port: p,
                        protocol,
                    })
                })
                .collect();
            let a = self.network.attach(vmid, &ports).await.map_err(|e| ContainerError::backend(e.to_string()))?;
            record.address = a.address;
            let dir = self.container_dir(vmid);
            self.write_bundle(&dir, &dir, &record)?;
            self.save(&dir, &record)?;
        }
        let dir = self.container_dir(vmid);
        self.network.ensure_container_rules(vmid).await.map_err(|e| ContainerError::backend(e.to_string()))?;
        self.ensure_disk(&dir, &record).await?;
        self.runc.run_detached(&id, &dir.join("bundle"), &dir.join(LOG)).await?;
        if let Err(e) = self.wait_healthy(&record).await {
            warn!(vmid, error = %e, "OCI container did not come up");
            let _ = self.runc.kill(&id, "KILL", true).await;
            let _ = self.runc.delete(&id).await;
            return Err(e);
        }
        info!(vmid, address = %record.address, "OCI container started");
        Ok(())
    }

    async fn stop(&self, vmid: u32) -> Result<(), ContainerError> {
        let lock = self.lock(vmid);
        let _held = lock.lock().await;
        self.require(vmid)?;
        self.stop_locked(vmid).await
    }

    async fn destroy(&self, vmid: u32) -> Result<(), ContainerError> {
        let lock = self.lock(vmid);
        let _held = lock.lock().await;
        self.stop_locked(vmid).await?;
        self.network.detach(vmid).await.map_err(|e| ContainerError::backend(e.to_string()))?;
        let dir = self.container_dir(vmid);
        self.unmount_disk(&dir).await?;
        let staging = self.config.containers_dir.join(format!(".{vmid}.creating"));
        remove_dirs(vec![dir, staging]).await?;
        atomic::sync_dir(&self.config.containers_dir)?;
        info!(vmid, "OCI container destroyed");
        Ok(())
    }

    async fn status(&self, vmid: u32) -> Result<ContainerState, ContainerError> {
        if self.record(vmid)?.is_none() {
            return Ok(ContainerState::Missing);
        }
        Ok(match self.runc.state(&runc_id(vmid)).await? {
            Some(s) if s.status == "running" => ContainerState::Running,
            _ => ContainerState::Stopped,
        })
    }

    async fn agent_endpoint(&self, vmid: u32) -> Result<AgentEndpoint, ContainerError> {
        Ok(self.require(vmid)?.endpoint())
    }
}

/// The writable directories on a container's disk: name under `fs/`, owner (the container's root
/// or the dev user), mode.
const WRITABLE: [(&str, Owner, u32); 6] = [
    ("home-dev", Owner::Dev, 0o700),
    ("opt-zlh", Owner::Root, 0o755),
    ("var-lib-zlh", Owner::Root, 0o700),
    ("tmp", Owner::Root, 0o1777),
    ("etc-profile-d", Owner::Root, 0o755),
    // The container's log: the host's, not visible inside.
    ("log", Owner::Host, 0o700),
];

#[derive(Debug, Clone, Copy)]
enum Owner {
    /// The container's root (the agent).
    Root,
    Dev,
    /// The host's root (the API).
    Host,
}

/// Gives `path` to host id `id` with `mode`.
fn own(path: &Path, id: u32, mode: u32) -> std::io::Result<()> {
    chown(path, Some(id), Some(id))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Runs a host tool; its own words in the error.
async fn run_tool(program: &str, args: &[&std::ffi::OsStr]) -> Result<(), ContainerError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| ContainerError::backend(format!("running {program}: {e}")))?;
    if out.status.success() {
        return Ok(());
    }
    Err(ContainerError::backend(format!("{program}: {}", String::from_utf8_lossy(&out.stderr).trim())))
}

/// Whether something is mounted at `path` (from the mount table).
fn is_mounted(path: &Path) -> bool {
    let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_string_lossy();
    table.lines().any(|l| l.split(' ').nth(4) == Some(&want))
}

/// Host configuration directories hidden from containers (bound over with an empty one).
const HOST_ETC_MASKED: [&str; 7] =
    ["/etc/zlh", "/etc/systemd", "/etc/default", "/etc/credstore", "/etc/credstore.encrypted", "/etc/ssh", "/etc/cni"];

/// The users inside: root (the agent), the dev user, nobody.
const PASSWD: &str = "root:x:0:0:root:/root:/bin/bash\n\
dev:x:1000:1000:dev:/home/dev:/bin/bash\n\
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\ntty:x:5:\ndev:x:1000:\nnogroup:x:65534:\n";

/// `agent.toml` for an agent inside a container: the real paths, the dev user that exists.
fn agent_toml(vmid: u32, store: &str, catalog_key: Option<&str>) -> String {
    #[derive(Serialize)]
    struct AgentToml<'a> {
        listen: &'a str,
        port: u16,
        root: &'a str,
        vmid: u32,
        token_file: String,
        store: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        catalog_key: Option<&'a str>,
        trusted_key: String,
        dev: DevToml,
    }
    #[derive(Serialize)]
    struct DevToml {
        code_server_bind: String,
        create_user: bool,
        user: &'static str,
    }
    let toml = AgentToml {
        // The container's own network: only the host reaches it (see `network`).
        listen: "0.0.0.0",
        port: AGENT_PORT,
        root: "/",
        vmid,
        token_file: format!("{}/agent.token", bundle::AGENT_ETC),
        store,
        catalog_key,
        trusted_key: format!("{}/trusted.pub", bundle::AGENT_ETC),
        // The user exists (`PASSWD`), so nothing is added; processes switch to it.
        dev: DevToml { code_server_bind: format!("0.0.0.0:{CODE_SERVER_PORT}"), create_user: true, user: "dev" },
    };
    toml::to_string(&toml).expect("TOML")
}

/// The host's resolvers that a container can reach: not those on the host's own loopback.
fn resolv_conf() -> String {
    let host = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    host.lines()
        .filter(|l| {
            let mut words = l.split_whitespace();
            match (words.next(), words.next()) {
                (Some("nameserver"), Some(addr)) => {
                    addr.parse::<std::net::IpAddr>().map(|a| !a.is_loopback()).unwrap_or(false)
                }
                (Some("search" | "options"), _) => true,
                _ => false,
            }
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The first directory on the way to `path` that others may not traverse.
fn untraversable(path: &Path) -> Option<PathBuf> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        let mode = std::fs::metadata(d).map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o001 == 0 {
            return Some(d.to_path_buf());
        }
        dir = d.parent();
    }
    None
}

/// `program` as given if it has a slash, else found on the PATH.
pub(crate) fn which(program: &Path) -> Option<PathBuf> {
    if program.components().count() > 1 {
        return program.is_file().then(|| program.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// `path` under `at` instead of `dir`, if it is under `dir` (where a staged file is now).
fn restage(path: &Path, dir: &Path, at: &Path) -> PathBuf {
    path.strip_prefix(dir).map(|rest| at.join(rest)).unwrap_or_else(|_| path.to_path_buf())
}
