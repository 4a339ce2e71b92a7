//! Provisioning a container from its payload, in the background, step by step:
//! catalog → runtime → (game: server artifact → server dir → start) | (dev: user → environment →
//! code-server). Each step shows in `/status`; the first error stops it and shows there too.
//! `restore` brings a completed provisioning back after an agent restart without the catalog.

use std::sync::Arc;

use anyhow::Context;
use tokio::task::JoinHandle;
use zlh_core::catalog::{Catalog, CatalogItem, Channel};
use zlh_core::runtime::{InstallStep, Installer, RuntimeInstaller};
use zlh_core::supervisor::process::ProcessSupervisor;
use zlh_core::supervisor::Supervisor;

use super::devenv::{self, RuntimeEnv};
use super::services::{self, GamePlan};
use super::status::{Phase, RuntimeReport};
use super::{Agent, Provisioned};
use crate::metrics::InstallOutcome;
use crate::mods::ModManager;
use zlh_core::payload::{DevPayload, GamePayload, Payload};

pub fn spawn(agent: Arc<Agent>, payload: Payload) -> JoinHandle<()> {
    tokio::spawn(async move {
        let vmid = payload.vmid();
        agent.set_progress(Phase::Installing, Some("catalog"), None);
        match run(&agent, payload).await {
            Ok(()) => {
                agent.set_progress(Phase::Done, None, None);
                tracing::info!(vmid, "provisioning complete");
            }
            Err(e) => {
                let message = format!("{e:#}");
                tracing::error!(vmid, error = %message, "provisioning failed");
                agent.set_failed(message);
            }
        }
    })
}

async fn run(agent: &Arc<Agent>, payload: Payload) -> anyhow::Result<()> {
    let catalog = agent.catalog.load().await?;
    match &payload {
        Payload::Dev(dev) => provision_dev(agent, &catalog, &payload, dev).await,
        Payload::Game(game) => provision_game(agent, &catalog, &payload, game).await,
    }
}

/// Installs `item` and makes it current, with its progress in `/status` under `step`.
async fn install(
    agent: &Agent,
    installer: &Installer,
    item: &CatalogItem,
    step: &str,
) -> anyhow::Result<RuntimeReport> {
    agent.set_progress(Phase::Installing, Some(step), Some(0));
    let mut events = installer.subscribe();
    let id = item.id.clone();
    let watch = async {
        while let Ok(p) = events.recv().await {
            if p.id != id {
                continue;
            }
            let percent = (p.bytes_done.saturating_mul(100) / p.bytes_total.max(1)).min(100) as u8;
            let phase = match p.step {
                InstallStep::Downloading => Phase::Installing,
                _ => Phase::Verifying,
            };
            agent.set_progress(phase, Some(step), Some(percent));
        }
    };
    let result = tokio::select! {
        r = installer.install(item, true) => r,
        _ = watch => unreachable!("the installer outlives the install"),
    };
    let outcome = if result.is_ok() { InstallOutcome::Ok } else { InstallOutcome::Failed };
    agent.metrics.record_install(item.id.as_str(), outcome);
    let installed = result.with_context(|| format!("installing {} {}", item.id, item.version))?;
    Ok(RuntimeReport {
        id: installed.id.to_string(),
        version: installed.version.to_string(),
        path: installed.path.display().to_string(),
    })
}

fn current_dir(installer: &Installer, id: &str) -> std::path::PathBuf {
    installer.layout().root().join(id).join("current")
}

async fn provision_dev(
    agent: &Arc<Agent>,
    catalog: &Catalog,
    payload: &Payload,
    dev: &DevPayload,
) -> anyhow::Result<()> {
    let item = catalog.runtime(&dev.runtime, &dev.version, Channel::Stable)?;
    let runtime = install(agent, &agent.installers.runtimes, &item, "runtime").await?;
    agent.set_progress(Phase::Installing, Some("dev-user"), None);
    let user = devenv::ensure_user(&agent.config.dev.user, agent.config.dev.create_user, &agent.paths.home)?;
    let env = RuntimeEnv::for_install(&current_dir(&agent.installers.runtimes, item.id.as_str()), &item.bin, &item.env);
    devenv::prepare_home(&agent.paths, &user, &env)?;
    let mut code_server = None;
    if dev.enable_code_server {
        let cs = catalog.addon("code-server", "", Channel::Stable)?;
        install(agent, &agent.installers.services, &cs, "code-server").await?;
        code_server = Some(current_dir(&agent.installers.services, "code-server"));
    }
    let done = Provisioned {
        payload: payload.clone(),
        runtime,
        runtime_env_bin: item.bin.clone(),
        runtime_env_vars: item.env.clone(),
        game: None,
        code_server,
        completed_at: chrono::Utc::now(),
    };
    agent.set_progress(Phase::Starting, Some("services"), None);
    start_services(agent, done, true).await
}

async fn provision_game(
    agent: &Arc<Agent>,
    catalog: &Catalog,
    payload: &Payload,
    game: &GamePayload,
) -> anyhow::Result<()> {
    let server = catalog.game(&game.game, &game.variant, &game.version, Channel::Stable)?;
    let need = server.runtime.clone().context("game entry names no runtime")?;
    let rt = catalog.runtime(need.id.as_str(), &need.version, Channel::Stable)?;
    let runtime = install(agent, &agent.installers.runtimes, &rt, "runtime").await?;
    let installed = install(agent, &agent.installers.games, &server, "server").await?;
    let launch = server.launch.clone().context("game entry has no launch command")?;
    std::fs::create_dir_all(&agent.paths.server)
        .with_context(|| format!("creating {}", agent.paths.server.display()))?;
    if let Some(mods) = &launch.mods_dir {
        std::fs::create_dir_all(agent.paths.server.join(mods))?;
    }
    let done = Provisioned {
        payload: payload.clone(),
        runtime,
        runtime_env_bin: rt.bin.clone(),
        runtime_env_vars: rt.env.clone(),
        game: Some(GamePlan {
            id: server.id.to_string(),
            version: server.version.to_string(),
            install: installed.path.into(),
            launch,
        }),
        code_server: None,
        completed_at: chrono::Utc::now(),
    };
    agent.set_progress(Phase::Starting, Some("starting"), None);
    start_services(agent, done, true).await
}

/// Builds the supervisors for a completed provisioning, adopts processes that are still running
/// under their shims, and starts what should run. `fresh`: just provisioned (start the game).
async fn start_services(agent: &Arc<Agent>, done: Provisioned, fresh: bool) -> anyhow::Result<()> {
    let rt_current = current_dir(&agent.installers.runtimes, &done.runtime.id);
    let env = RuntimeEnv::for_install(&rt_current, &done.runtime_env_bin, &done.runtime_env_vars);
    // Replace the services of an earlier payload: stop what it ran.
    let (old_game, old_cs) = {
        let s = agent.services.read().unwrap();
        (s.game.clone(), s.code_server.clone())
    };
    let mut game_sup = None;
    let mut cs_sup = None;
    let mut dev_user = None;
    let mut mods = None;
    match &done.payload {
        Payload::Game(g) => {
            if let Some(old) = old_game {
                old.stop().await.context("stopping the previous game server")?;
            }
            let plan = done.game.as_ref().context("provisioned game without a plan")?;
            if let Some(dir) = &plan.launch.mods_dir {
                let mut manager = ModManager::new(agent.paths.server.join(dir), agent.store.clone());
                if let Some((uid, gid)) = agent.game_owner() {
                    manager = manager.with_owner(uid, gid);
                }
                mods = Some(Arc::new(manager));
            }
            let sup = services::game_supervisor(&agent.config, &agent.paths, plan, g, &env)?;
            if sup.attach().await? {
                tracing::info!("game server adopted from the previous agent");
            } else if !fresh && resumes_on_its_own(sup.as_ref()).await {
                tracing::info!("game server: the previous agent's backoff or error carries on");
            } else if fresh || agent.game_desired() {
                agent.set_game_desired(true)?;
                sup.start().await.context("starting the game server")?;
            }
            watch_game(agent, &sup);
            game_sup = Some(sup);
        }
        Payload::Dev(_) => {
            let user = devenv::ensure_user(&agent.config.dev.user, agent.config.dev.create_user, &agent.paths.home)?;
            if let Some(old) = old_cs {
                old.stop().await.context("stopping code-server")?;
            }
            if let Some(install) = &done.code_server {
                let sup = services::code_server_supervisor(&agent.config, &agent.paths, install, &user, &env)?;
                if !sup.attach().await? && (fresh || !resumes_on_its_own(sup.as_ref()).await) {
                    sup.start().await.context("starting code-server")?;
                }
                cs_sup = Some(sup);
            }
            dev_user = Some(user);
        }
    }
    if fresh {
        let json = serde_json::to_vec_pretty(&done)?;
        zlh_core::atomic::write_file(&agent.paths.provisioned_file(), &json)?;
    }
    let mut s = agent.services.write().unwrap();
    s.env = env;
    s.game = game_sup;
    s.code_server = cs_sup;
    s.dev_user = dev_user;
    s.mods = mods;
    s.provisioned = Some(done);
    Ok(())
}

/// A supervisor that carries on from the previous agent's backoff (it restarts when that is
/// over) or `error` (it waits for a user's start): starting it now would defeat either.
async fn resumes_on_its_own(sup: &ProcessSupervisor) -> bool {
    use zlh_core::supervisor::ProcessState;
    matches!(sup.status().await.state, ProcessState::Backoff | ProcessState::Error)
}

/// Agent restart: the same services again, adopting running processes.
pub async fn restore(agent: &Arc<Agent>, done: Provisioned) -> anyhow::Result<()> {
    tracing::info!(vmid = done.payload.vmid(), "restoring the provisioned services");
    start_services(agent, done, false).await?;
    agent.set_progress(Phase::Done, None, None);
    Ok(())
}

/// Keeps the game's metrics current: its state gauge, and a count of crashes (each new crash
/// record, whichever state it led to).
fn watch_game(agent: &Arc<Agent>, sup: &Arc<ProcessSupervisor>) {
    let mut events = sup.subscribe_states();
    let (metrics, sup) = (agent.metrics.clone(), Arc::downgrade(sup));
    tokio::spawn(async move {
        let mut last_crash = None;
        loop {
            let Some(sup) = sup.upgrade() else { return };
            let status = sup.status().await;
            metrics.set_game_state(status.state);
            let seen = status.last_crash.as_ref().map(|c| c.time);
            if seen.is_some() && seen != last_crash {
                if last_crash.is_some() || status.crash_count > 0 {
                    metrics.record_crash();
                }
                last_crash = seen;
            }
            drop(sup);
            match events.recv().await {
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}
