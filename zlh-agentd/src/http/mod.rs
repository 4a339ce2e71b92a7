//! The agent's HTTP surface: one sub-router per concept, composed here. Every route but a bare
//! `GET /health` sits behind the bearer token; every request is counted in the metrics.

pub mod agent;
pub mod auth;
pub mod console;
pub mod error;
pub mod files;
pub mod metrics;
pub mod mods;
pub mod runtimes;
pub mod server;
pub mod used_tickets;

use std::sync::Arc;

use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;

pub use error::{ApiError, ApiResult};

use crate::agent::Agent;
use crate::console::ShellSpec;
use auth::{require_bearer, AgentAuth, AgentToken};

pub fn app(agent: Arc<Agent>) -> anyhow::Result<Router> {
    let auth = Arc::new(AgentAuth::new(AgentToken::new(agent.config.token().to_owned()))?);
    let mods_source = {
        let agent = agent.clone();
        Arc::new(move || agent.mods())
    };
    let files = files::FilesState::new(files_root(&agent), agent.paths.state.clone(), upload_limits(&agent))?
        .with_metrics(agent.metrics.clone());
    files.spawn_maintenance(std::time::Duration::from_secs(3600));
    let protected = Router::new()
        .merge(agent::router(agent.clone()))
        .merge(files::router(files.clone()))
        .merge(mods::router(mods::ModsState { mods: mods_source, files: Some(files) }))
        .merge(runtimes::router(runtimes::RuntimesState {
            installer: agent.installers.runtimes.clone(),
            catalog: agent.catalog.clone(),
            metrics: Some(agent.metrics.clone()),
        }))
        .merge(metrics::router(agent.metrics.clone()))
        .layer(from_fn_with_state(auth.clone(), require_bearer));
    Ok(Router::new()
        .route("/health", get(agent::health))
        // The console authenticates by itself: browsers cannot set headers on a WebSocket.
        .merge(console::router(console_state(&agent, auth).with_metrics(agent.metrics.clone())))
        .merge(protected)
        .layer(from_fn_with_state(agent.metrics.clone(), metrics::track)))
}

/// What the console reaches: the game server's supervisor, or a login shell as the dev user in
/// the workspace with the runtime environment.
fn console_state(agent: &Arc<Agent>, auth: Arc<AgentAuth>) -> console::ConsoleState {
    let (a1, a2, a3) = (agent.clone(), agent.clone(), agent.clone());
    console::ConsoleState::new(
        auth,
        Arc::new(move || a1.provisioned().map(|p| p.payload.vmid()).or(a1.config.vmid)),
        Arc::new(move || a2.game().map(|g| g as Arc<dyn zlh_core::supervisor::Supervisor>)),
        Arc::new(move || {
            let user = a3.dev_user()?;
            let shell = &a3.config.dev.shell;
            Some(ShellSpec {
                program: shell[0].clone().into(),
                args: shell[1..].to_vec(),
                env: a3.runtime_env().service_env(&user.name, &a3.paths.home),
                cwd: a3.paths.workspace.clone(),
                uid: user.switch.then_some(user.uid),
                gid: user.switch.then_some(user.gid),
            })
        }),
    )
}

/// The file manager's root: the workspace (owned by the dev user) or the game server's dir.
fn files_root(agent: &Arc<Agent>) -> files::RootSource {
    let agent = agent.clone();
    Arc::new(move || {
        let provisioned = agent.provisioned()?;
        // The plan's disk, or the configured quota when smaller (or when the payload gives none).
        let configured = (agent.config.files.quota_bytes > 0).then_some(agent.config.files.quota_bytes);
        let quota_bytes = match (provisioned.payload.disk_bytes(), configured) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Some(match provisioned.payload {
            zlh_core::payload::Payload::Dev(_) => files::FilesRoot {
                path: agent.paths.workspace.clone(),
                owner: agent.dev_user().and_then(|u| u.owner()),
                quota_bytes,
            },
            zlh_core::payload::Payload::Game(_) => {
                files::FilesRoot { path: agent.paths.server.clone(), owner: agent.game_owner(), quota_bytes }
            }
        })
    })
}

fn upload_limits(agent: &Agent) -> zlh_core::files::UploadLimits {
    let f = &agent.config.files;
    zlh_core::files::UploadLimits {
        max_file_bytes: f.max_file_bytes,
        quota_bytes: (f.quota_bytes > 0).then_some(f.quota_bytes),
        write_body_max: f.write_body_max,
        upload_ttl: f.upload_ttl,
    }
}
