//! The agent of one container: provisioning from a `/config` payload, the dev environment, the
//! game server and code-server under the supervisor, power actions, and the status report.
//! HTTP handlers (`crate::http`) only translate to and from these methods.

pub mod devenv;
mod provision;
pub mod services;
pub mod status;

use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use zlh_core::artifact::DynStore;
use zlh_core::catalog::TrustedKey;
use zlh_core::runtime::{Installer, InstallerOptions};
use zlh_core::supervisor::process::ProcessSupervisor;
use zlh_core::supervisor::{ProcessState, Supervisor};
use zlh_core::ArtifactKey;

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use crate::mods::ModManager;
use crate::paths::AgentPaths;
use devenv::{DevUser, RuntimeEnv};
use services::GamePlan;
use status::{CodeServerReport, GameReport, Phase, RuntimeReport, StatusReport};
use zlh_core::catalog::CatalogSource;
use zlh_core::payload::Payload;

/// One installer per kind of install, each with its own root.
pub struct Installers {
    pub runtimes: Arc<Installer>,
    pub services: Arc<Installer>,
    pub games: Arc<Installer>,
}

/// Provisioning progress, as `/status` shows it.
#[derive(Debug, Clone)]
struct Progress {
    phase: Phase,
    step: Option<String>,
    percent: Option<u8>,
    error: Option<String>,
}

/// What `provisioned.json` records: the payload it was done for and what it resolved to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Provisioned {
    pub payload: Payload,
    pub runtime: RuntimeReport,
    pub runtime_env_bin: Vec<String>,
    pub runtime_env_vars: std::collections::BTreeMap<String, String>,
    pub game: Option<GamePlan>,
    pub code_server: Option<std::path::PathBuf>,
    pub completed_at: chrono::DateTime<chrono::Utc>,
}

/// The running services of a provisioned container.
#[derive(Default)]
struct Services {
    provisioned: Option<Provisioned>,
    dev_user: Option<DevUser>,
    env: RuntimeEnv,
    game: Option<Arc<ProcessSupervisor>>,
    code_server: Option<Arc<ProcessSupervisor>>,
    mods: Option<Arc<ModManager>>,
}

/// The power action in flight: its name and its task (aborted by a later stop).
struct PowerAction {
    name: &'static str,
    task: JoinHandle<()>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    Start,
    Stop,
    Restart,
    Kill,
}

impl Power {
    pub fn name(self) -> &'static str {
        match self {
            Power::Start => "start",
            Power::Stop => "stop",
            Power::Restart => "restart",
            Power::Kill => "kill",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Internal(String),
}

pub struct Agent {
    pub config: AgentConfig,
    pub paths: AgentPaths,
    pub store: DynStore,
    pub catalog: Arc<CatalogSource>,
    pub installers: Installers,
    pub metrics: Arc<Metrics>,
    progress: Mutex<Progress>,
    services: RwLock<Services>,
    /// The payload being provisioned and its task.
    provisioning: Mutex<Option<(Payload, JoinHandle<()>)>>,
    power: Mutex<Option<PowerAction>>,
}

impl Agent {
    /// Opens the installers and state dirs. Nothing is started yet: see [`Agent::resume`].
    pub fn open(config: AgentConfig) -> anyhow::Result<Arc<Self>> {
        let paths = AgentPaths::new(&config.root);
        std::fs::create_dir_all(&paths.state)?;
        restrict(&paths.state)?;
        let store = zlh_core::artifact::from_url(config.store.as_deref().unwrap_or_default())?;
        let trusted = TrustedKey::from_file(config.trusted_key.as_deref().unwrap_or(std::path::Path::new("")))?;
        let catalog = Arc::new(CatalogSource::new(
            store.clone(),
            ArtifactKey::parse(&config.catalog_key)?,
            trusted,
            paths.catalog_state(),
        ));
        let installer = |root: &std::path::Path| -> anyhow::Result<Arc<Installer>> {
            Ok(Arc::new(Installer::open(InstallerOptions::new(root, store.clone()))?))
        };
        let installers = Installers {
            runtimes: installer(&paths.runtimes)?,
            services: installer(&paths.services)?,
            games: installer(&paths.games)?,
        };
        Ok(Arc::new(Self {
            config,
            paths,
            store,
            catalog,
            installers,
            metrics: Arc::new(Metrics::new(env!("CARGO_PKG_VERSION"))),
            progress: Mutex::new(Progress { phase: Phase::Idle, step: None, percent: None, error: None }),
            services: RwLock::new(Services::default()),
            provisioning: Mutex::new(None),
            power: Mutex::new(None),
        }))
    }

    /// After a start: a completed provisioning brings its services back (adopting processes that
    /// outlived the previous agent); an unfinished one carries on in the background.
    pub async fn resume(self: &Arc<Self>) -> anyhow::Result<()> {
        let Some(payload) = read_json::<Payload>(&self.paths.config_file())? else { return Ok(()) };
        zlh_core::logging::set_vmid(payload.vmid());
        match read_json::<Provisioned>(&self.paths.provisioned_file())? {
            Some(done) if done.payload == payload => provision::restore(self, done).await,
            _ => {
                tracing::info!(vmid = payload.vmid(), "resuming unfinished provisioning");
                self.spawn_provisioning(payload);
                Ok(())
            }
        }
    }

    /// `POST /config`: stores the payload atomically and provisions in the background.
    /// Repeating the payload in force changes nothing; a different one while provisioning runs
    /// is refused; after completion, a different one provisions again.
    pub fn configure(self: &Arc<Self>, body: &[u8]) -> Result<bool, AgentError> {
        let payload = Payload::parse(body).map_err(AgentError::BadRequest)?;
        if let Some(vmid) = self.config.vmid {
            if payload.vmid() != vmid {
                return Err(AgentError::BadRequest(format!(
                    "payload is for vmid {}, this agent is vmid {vmid}",
                    payload.vmid()
                )));
            }
        }
        let mut running = self.provisioning.lock().unwrap();
        if let Some((current, task)) = running.as_ref() {
            if !task.is_finished() {
                return if *current == payload {
                    Ok(false)
                } else {
                    Err(AgentError::Conflict("provisioning of a different payload is in progress".into()))
                };
            }
        }
        let failed = self.progress.lock().unwrap().phase == Phase::Failed;
        let done = self.services.read().unwrap().provisioned.as_ref().map(|p| p.payload == payload).unwrap_or(false);
        if done && !failed {
            return Ok(false);
        }
        if let Some(current) = self.services.read().unwrap().provisioned.as_ref().map(|p| p.payload.clone()) {
            if std::mem::discriminant(&current) != std::mem::discriminant(&payload) {
                return Err(AgentError::Conflict("a container cannot change between dev and game".into()));
            }
        }
        let json = serde_json::to_vec_pretty(&payload).map_err(|e| AgentError::Internal(e.to_string()))?;
        zlh_core::atomic::write_file(&self.paths.config_file(), &json)
            .map_err(|e| AgentError::Internal(format!("storing the payload: {e}")))?;
        zlh_core::logging::set_vmid(payload.vmid());
        tracing::info!(vmid = payload.vmid(), "provisioning payload accepted");
        *running = Some((payload.clone(), provision::spawn(self.clone(), payload)));
        Ok(true)
    }

    fn spawn_provisioning(self: &Arc<Self>, payload: Payload) {
        let task = provision::spawn(self.clone(), payload.clone());
        *self.provisioning.lock().unwrap() = Some((payload, task));
    }

    pub async fn status(&self) -> StatusReport {
        let progress = self.progress.lock().unwrap().clone();
        let (provisioned, game, code_server) = {
            let s = self.services.read().unwrap();
            (s.provisioned.clone(), s.game.clone(), s.code_server.clone())
        };
        let payload = provisioned
            .as_ref()
            .map(|p| p.payload.clone())
            .or_else(|| self.provisioning.lock().unwrap().as_ref().map(|(p, _)| p.clone()));
        let mut report = StatusReport {
            state: status::phase_state(progress.phase),
            vmid: payload.as_ref().map(Payload::vmid).or(self.config.vmid),
            container_type: payload.as_ref().map(|p| match p {
                Payload::Dev(_) => "dev",
                Payload::Game(_) => "game",
            }),
            provisioning_complete: progress.phase == Phase::Done,
            install_step: progress.step,
            progress: progress.percent,
            error: progress.error,
            crash_count: 0,
            last_crash: None,
            runtime: provisioned.as_ref().map(|p| p.runtime.clone()),
            code_server: None,
            game: None,
            workspace: matches!(payload, Some(Payload::Dev(_))).then(|| self.paths.workspace.display().to_string()),
        };
        if let Some(sup) = game {
            let st = sup.status().await;
            if progress.phase == Phase::Done {
                report.state = status::game_state(st.state);
            }
            report.crash_count = st.crash_count;
            // In `error`, say why (provisioning's own error comes first).
            report.error = report.error.or(st.error.clone());
            report.last_crash = st.last_crash.as_ref().map(Into::into);
            if let Some(plan) = provisioned.as_ref().and_then(|p| p.game.as_ref()) {
                report.game = Some(GameReport {
                    id: plan.id.clone(),
                    version: plan.version.clone(),
                    process: st.state,
                    pid: st.pid,
                    power_action: self.power_action(),
                });
            }
        }
        if let Some(sup) = code_server {
            let st = sup.status().await;
            report.code_server =
                Some(CodeServerReport { state: st.state, pid: st.pid, port: services::code_server_port(&self.config) });
        }
        report
    }

    fn power_action(&self) -> Option<&'static str> {
        self.power.lock().unwrap().as_ref().filter(|a| !a.task.is_finished()).map(|a| a.name)
    }

    pub fn game(&self) -> Option<Arc<ProcessSupervisor>> {
        self.services.read().unwrap().game.clone()
    }

    pub fn code_server(&self) -> Option<Arc<ProcessSupervisor>> {
        self.services.read().unwrap().code_server.clone()
    }

    /// Who owns the game server's files: its configured user, when the agent is root.
    pub fn game_owner(&self) -> Option<(u32, u32)> {
        let user = self.config.game.user.as_deref()?;
        rustix::process::geteuid().is_root().then(|| devenv::passwd_by_name(user)).flatten()
    }

    pub fn mods(&self) -> Option<Arc<ModManager>> {
        self.services.read().unwrap().mods.clone()
    }

    pub fn dev_user(&self) -> Option<DevUser> {
        self.services.read().unwrap().dev_user.clone()
    }

    pub fn runtime_env(&self) -> RuntimeEnv {
        self.services.read().unwrap().env.clone()
    }

    pub fn provisioned(&self) -> Option<Provisioned> {
        self.services.read().unwrap().provisioned.clone()
    }

    /// `POST /start|stop|restart|kill` of the game server: accepted at once, carried out in the
    /// background. One start or restart at a time; stop and kill are always accepted, and stop
    /// abandons a start or restart that is still waiting.
    pub fn power(self: &Arc<Self>, action: Power) -> Result<(), AgentError> {
        let sup = self.game().ok_or_else(|| AgentError::Conflict("no game server is provisioned".into()))?;
        let mut slot = self.power.lock().unwrap();
        let busy = slot.as_ref().filter(|a| !a.task.is_finished()).map(|a| a.name);
        match (action, busy) {
            (Power::Start | Power::Restart, Some(other)) => {
                return Err(AgentError::Conflict(format!("a {other} is in progress; stop or kill first")));
            }
            (Power::Stop, Some("stop")) => return Ok(()),
            (Power::Stop | Power::Kill, Some(_)) => {
                if let Some(a) = slot.take() {
                    if a.name != "stop" || action == Power::Kill {
                        a.task.abort();
                    }
                }
            }
            _ => {}
        }
        let desired = matches!(action, Power::Start | Power::Restart);
        if let Err(e) = self.set_game_desired(desired) {
            return Err(AgentError::Internal(format!("recording the desired state: {e}")));
        }
        tracing::info!(action = action.name(), "power action accepted");
        let task = tokio::spawn(async move {
            let result = match action {
                Power::Start => sup.start().await,
                Power::Stop => sup.stop().await,
                Power::Restart => sup.restart().await,
                Power::Kill => sup.kill().await,
            };
            match result {
                Ok(()) => tracing::info!(action = action.name(), "power action done"),
                Err(e) => tracing::warn!(action = action.name(), error = %e, "power action failed"),
            }
        });
        *slot = Some(PowerAction { name: action.name(), task });
        Ok(())
    }

    fn set_game_desired(&self, running: bool) -> std::io::Result<()> {
        zlh_core::atomic::write_file(&self.paths.game_desired_file(), if running { b"true" } else { b"false" })
    }

    fn game_desired(&self) -> bool {
        std::fs::read(self.paths.game_desired_file()).map(|b| b == b"true").unwrap_or(false)
    }

    /// `POST /dev/codeserver/start|stop|restart`.
    pub async fn code_server_action(&self, action: Power) -> Result<(), AgentError> {
        let sup = self.code_server().ok_or_else(|| AgentError::Conflict("code-server is not enabled".into()))?;
        let result = match action {
            Power::Start => match sup.status().await.state {
                ProcessState::Running | ProcessState::Starting => Ok(()),
                _ => sup.start().await,
            },
            Power::Stop => sup.stop().await,
            Power::Restart => sup.restart().await,
            Power::Kill => sup.kill().await,
        };
        result.map_err(|e| AgentError::Internal(format!("code-server {}: {e}", action.name())))
    }

    /// Agent shutdown: by default the supervised processes stay up under their shims for the
    /// next agent; with `stop_on_shutdown` the game server is stopped gracefully first.
    pub async fn shutdown(&self) {
        if let Some((_, task)) = self.provisioning.lock().unwrap().take() {
            task.abort();
        }
        if self.config.game.stop_on_shutdown {
            if let Some(game) = self.game() {
                tracing::info!("stopping the game server before exit (stop_on_shutdown)");
                if let Err(e) = game.stop().await {
                    tracing::warn!(error = %e, "stopping the game server failed");
                }
            }
        }
    }

    fn set_progress(&self, phase: Phase, step: Option<&str>, percent: Option<u8>) {
        let mut p = self.progress.lock().unwrap();
        p.phase = phase;
        p.step = step.map(str::to_owned);
        p.percent = percent;
        if phase != Phase::Failed {
            p.error = None;
        }
    }

    fn set_failed(&self, error: String) {
        let mut p = self.progress.lock().unwrap();
        p.phase = Phase::Failed;
        p.error = Some(error);
    }
}

/// Agent state holds payloads and shim sockets: owner only.
fn restrict(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{} is corrupt: {e}", path.display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    }
}
