//! The two supervised services of a container: the game server and code-server. Both run under a
//! shim so they outlive an agent restart and are adopted again by the next agent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zlh_core::catalog::GameLaunch;
use zlh_core::supervisor::classify::Classifier;
use zlh_core::supervisor::process::{ProcessOptions, ProcessSupervisor};
use zlh_core::supervisor::shim::{ShimCommand, ShimConfig};
use zlh_core::supervisor::{ProcessSpec, RestartPolicy, StopStrategy};

use super::devenv::{DevUser, RuntimeEnv};
use crate::config::AgentConfig;
use crate::paths::AgentPaths;
use zlh_core::payload::GamePayload;

/// What provisioning resolved for the game server, kept in `provisioned.json` so a restarted
/// agent can run it again without the catalog.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GamePlan {
    pub id: String,
    pub version: String,
    /// The server artifact's install dir (`{install}`).
    pub install: PathBuf,
    pub launch: GameLaunch,
}

/// The shim runs as the agent binary's hidden `shim` subcommand.
fn shim(paths: &AgentPaths, name: &str) -> anyhow::Result<ShimConfig> {
    let program = std::env::current_exe()?;
    Ok(ShimConfig {
        command: ShimCommand { program, args: vec!["shim".into()], env: BTreeMap::new() },
        state_dir: paths.shim_dir(name),
    })
}

/// Where a service's crash history, streak and pending backoff outlive the agent.
fn history_file(paths: &AgentPaths, name: &str) -> PathBuf {
    paths.shim_dir(name).join("crashes.json")
}

/// A cgroup and log name unique to this agent, so agents sharing a host (local containers,
/// tests) never share a memory cgroup.
fn unique_name(paths: &AgentPaths, name: &str) -> String {
    use sha2::Digest as _;
    let h = sha2::Sha256::digest(paths.root.as_os_str().as_encoded_bytes());
    format!("{name}-{}", hex_prefix(&h[..4]))
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Expands the launch placeholders.
fn expand(arg: &str, plan: &GamePlan, paths: &AgentPaths, game: &GamePayload) -> String {
    let heap = (game.memory_mb * 3 / 4).max(64);
    arg.replace("{install}", &plan.install.display().to_string())
        .replace("{server}", &paths.server.display().to_string())
        .replace("{memory_mb}", &game.memory_mb.to_string())
        .replace("{heap_mb}", &heap.to_string())
        .replace("{port}", &game.ports.first().map(|p| p.to_string()).unwrap_or_default())
        .replace("{world}", game.world.as_deref().unwrap_or("world"))
}

pub fn game_supervisor(
    config: &AgentConfig,
    paths: &AgentPaths,
    plan: &GamePlan,
    game: &GamePayload,
    env: &RuntimeEnv,
) -> anyhow::Result<Arc<ProcessSupervisor>> {
    let args: Vec<String> = plan.launch.command.iter().map(|a| expand(a, plan, paths, game)).collect();
    let (program, rest) = args.split_first().ok_or_else(|| anyhow::anyhow!("launch command is empty"))?;
    let mut vars = env.service_env("zlh", &paths.server);
    vars.remove("SHELL");
    vars.insert("TERM".into(), "dumb".into());
    vars.insert("ZLH_MEMORY_MB".into(), game.memory_mb.to_string());
    vars.insert("ZLH_WORLD".into(), game.world.clone().unwrap_or_else(|| "world".into()));
    if let Some(port) = game.ports.first() {
        vars.insert("SERVER_PORT".into(), port.to_string());
    }
    vars.insert("ZLH_PORTS".into(), game.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    let spec = ProcessSpec {
        env: vars,
        cwd: paths.server.clone(),
        user: config.game.user.clone(),
        stop: StopStrategy {
            stdin_command: plan.launch.stop_command.clone(),
            command_timeout: config.game.stop_command_timeout,
            term_timeout: config.game.stop_term_timeout,
        },
        ready_pattern: plan.launch.ready_pattern.clone(),
        memory_limit_bytes: Some(game.memory_mb << 20),
        ..ProcessSpec::new(resolve_program(program, &env.path()), rest.to_vec())
    };
    // Lines the game's players can write never decide a crash's class.
    let classifier = Classifier::default()
        .with_player_patterns(plan.launch.chat_pattern.clone())
        .map_err(|e| anyhow::anyhow!("chat_pattern of {} {}: {e}", plan.id, plan.version))?;
    let options = ProcessOptions {
        name: unique_name(paths, "game"),
        shim: Some(shim(paths, "game")?),
        classifier,
        history_file: Some(history_file(paths, "game")),
        ..ProcessOptions::default()
    };
    Ok(Arc::new(ProcessSupervisor::new(spec, options)?))
}

/// How long code-server is given after SIGTERM before SIGKILL: it keeps no state the editor in
/// the browser has not saved, and deleting a dev server should not wait on it.
pub const CODE_SERVER_STOP_GRACE: Duration = Duration::from_secs(1);

/// code-server from its addon install, bound as configured, as the dev user, in the workspace.
pub fn code_server_supervisor(
    config: &AgentConfig,
    paths: &AgentPaths,
    install: &Path,
    user: &DevUser,
    env: &RuntimeEnv,
) -> anyhow::Result<Arc<ProcessSupervisor>> {
    let args = vec![
        "--bind-addr".into(),
        config.dev.code_server_bind.clone(),
        "--auth".into(),
        "none".into(),
        "--disable-telemetry".into(),
        "--disable-update-check".into(),
        paths.workspace.display().to_string(),
    ];
    let spec = ProcessSpec {
        env: env.service_env(&user.name, &paths.home),
        cwd: paths.workspace.clone(),
        user: user.switch.then(|| user.uid.to_string()),
        stop: StopStrategy {
            stdin_command: None,
            command_timeout: Duration::ZERO,
            term_timeout: CODE_SERVER_STOP_GRACE,
        },
        restart: RestartPolicy::OnFailure,
        ..ProcessSpec::new(install.join("bin/code-server"), args)
    };
    let options = ProcessOptions {
        name: unique_name(paths, "code-server"),
        shim: Some(shim(paths, "code-server")?),
        history_file: Some(history_file(paths, "code-server")),
        ..ProcessOptions::default()
    };
    Ok(Arc::new(ProcessSupervisor::new(spec, options)?))
}

/// The port code-server listens on.
pub fn code_server_port(config: &AgentConfig) -> u16 {
    config.dev.code_server_bind.parse::<std::net::SocketAddr>().map(|a| a.port()).unwrap_or(6000)
}

/// A bare program name looked up on `path` (the runtime's bin dirs first), so the shim and a
/// direct spawn run the same binary; a name not found stays as is and fails at spawn, clearly.
fn resolve_program(program: &str, path: &str) -> PathBuf {
    if program.contains('/') {
        return PathBuf::from(program);
    }
    path.split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(program))
}
