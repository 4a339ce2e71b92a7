//! Running provisioning and deletion jobs. Each step is recorded before and after it runs, so a
//! job taken over by another replica (its lease expired) repeats at most the step in flight, and
//! every step is safe to repeat: allocation keeps an existing lease, creation skips an existing
//! container, the agent treats a repeated payload as a no-op.
//!
//! Steps of a provision: allocate (vmid, port) → create container → start → wait for agent →
//! send config → wait running. An agent error ends the job at once; a failed job destroys what
//! it created and gives back its numbers.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use zlh_core::agent_client::{AgentError, AgentStatus};
use zlh_core::container::{AgentEndpoint, ContainerKind, ContainerSpec, ContainerState};

use super::alloc::{self, DEV_VMIDS, GAME_VMIDS};
use super::jobs::{self, Job};
use super::repo::{self, state, Kind, Server};
use crate::state::AppState;

/// A job's lease; renewed at a third of it while the job runs.
const LEASE_MS: i64 = 30_000;
/// How long the agent may take to answer after its container started.
const AGENT_UP: Duration = Duration::from_secs(60);
/// How long provisioning inside the container may take (downloads of big runtimes).
const RUNNING_WITHIN: Duration = Duration::from_secs(15 * 60);
/// How often provisioning status is asked for while waiting: an agent error shows within it.
const STATUS_EVERY: Duration = Duration::from_millis(500);

/// Claims job `id` and runs it to the end on this replica (a no-op if another replica holds it).
pub async fn run(app: Arc<AppState>, id: String) {
    let owner = app.instance_id.clone();
    match jobs::claim(&app.db, &id, &owner, LEASE_MS).await {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => return tracing::error!(job = %id, error = %e, "claiming job failed"),
    }
    let Ok(Some(job)) = jobs::get(&app.db, &id).await else { return };
    let renew = tokio::spawn({
        let (app, id, owner) = (app.clone(), id.clone(), owner.clone());
        async move {
            let mut tick = tokio::time::interval(Duration::from_millis(LEASE_MS as u64 / 3));
            loop {
                tick.tick().await;
                if !matches!(jobs::renew(&app.db, &id, &owner, LEASE_MS).await, Ok(true)) {
                    return;
                }
            }
        }
    });
    let result = match job.kind.as_str() {
        jobs::PROVISION => provision(&app, &job).await.map(Done::Provisioned),
        jobs::DELETE => delete(&app, &job).await.map(Done::Deleted),
        other => Err(anyhow!("unknown job kind {other}")),
    };
    renew.abort();
    let error = result.as_ref().err().map(|e| format!("{e:#}"));
    if let Some(e) = &error {
        tracing::warn!(job = %id, server = %job.server_id, error = %e, "job failed");
    } else {
        tracing::info!(job = %id, server = %job.server_id, kind = %job.kind, "job done");
    }
    let end = match (&result, job.kind.as_str()) {
        (Ok(Done::Provisioned(_)), _) => Some(jobs::ServerEnd::State(state::RUNNING, None)),
        (Ok(Done::Deleted(_)), _) => Some(jobs::ServerEnd::Deleted),
        (Err(_), jobs::PROVISION) => Some(jobs::ServerEnd::State(state::FAILED, error.as_deref())),
        (Err(_), _) => None,
    };
    let recorded = match end {
        Some(end) => jobs::finish_with_server(&app.db, &id, error.as_deref(), &job.server_id, end).await,
        None => jobs::finish(&app.db, &id, error.as_deref()).await,
    };
    if let Err(e) = recorded {
        return tracing::error!(job = %id, error = %e, "recording the job's end failed");
    }
    match result {
        // Routed once the row says running, so the IDE's own check agrees.
        Ok(Done::Provisioned(Some((vmid, addr)))) => {
            if let Some(ide) = app.ide.get() {
                ide.server_started(vmid, addr).await;
            }
        }
        // Again now the row says so: an IDE request in between may have memoised access.
        Ok(Done::Deleted(vmid)) => app.ide_stopped(vmid).await,
        _ => {}
    }
}

/// What a job that succeeded leaves to do once its end is recorded.
enum Done {
    /// The code-server to route to, for a dev server with one.
    Provisioned(Option<(u32, std::net::SocketAddr)>),
    /// The vmid the deleted server had.
    Deleted(Option<u32>),
}

/// Runs `f` as step `name` of `job`, recording its start and end.
async fn step<T>(
    app: &AppState,
    job: &Job,
    name: &str,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    jobs::record_step(&app.db, &job.id, name, "running", None).await?;
    match f.await {
        Ok(v) => {
            jobs::record_step(&app.db, &job.id, name, "done", None).await?;
            Ok(v)
        }
        Err(e) => {
            let msg = format!("{e:#}");
            jobs::record_step(&app.db, &job.id, name, "failed", Some(&msg)).await?;
            Err(e.context(format!("step {name}")))
        }
    }
}

async fn server(app: &AppState, id: &str) -> anyhow::Result<Server> {
    repo::get(&app.db, id).await?.ok_or_else(|| anyhow!("server {id} is gone"))
}

/// The steps; a failure destroys what they made. The server's final state is the caller's to
/// record, with the job's end.
async fn provision(app: &Arc<AppState>, job: &Job) -> anyhow::Result<Option<(u32, std::net::SocketAddr)>> {
    let result = provision_steps(app, job).await;
    if result.is_err() {
        if let Err(clean) = cleanup(app, &job.server_id).await {
            tracing::error!(server = %job.server_id, error = %clean, "cleanup after a failed provision failed");
        }
    }
    result
}

async fn provision_steps(app: &Arc<AppState>, job: &Job) -> anyhow::Result<Option<(u32, std::net::SocketAddr)>> {
    let s = server(app, &job.server_id).await?;
    let vmid = step(app, job, "allocate", async {
        if let Some(v) = s.vmid {
            return Ok(v);
        }
        let range = if s.kind == Kind::Game { GAME_VMIDS } else { DEV_VMIDS };
        let vmid = alloc::allocate_vmid(&app.db, range, &s.id).await?;
        repo::set_vmid(&app.db, &s.id, vmid).await?;
        if s.kind == Kind::Game {
            let port = alloc::allocate_port(&app.db, app.config.game_ports.clone(), &s.id).await?;
            let mut spec = s.spec.clone();
            spec["ports"] = json!([port]);
            sqlx::query("UPDATE servers SET spec = $1 WHERE id = $2")
                .bind(spec.to_string())
                .bind(&s.id)
                .execute(app.db.pool())
                .await?;
        }
        Ok(vmid)
    })
    .await?;
    let s = server(app, &job.server_id).await?;
    let token = app.agent_token(vmid);
    let endpoint = step(app, job, "create container", async {
        if app.host.status(vmid).await? != ContainerState::Missing {
            return Ok(app.host.agent_endpoint(vmid).await?);
        }
        let spec = ContainerSpec {
            vmid,
            kind: if s.kind == Kind::Game { ContainerKind::Game } else { ContainerKind::Dev },
            hostname: format!("{}-{vmid}", s.kind.as_str()),
            memory_mb: s.spec["memory_mb"].as_u64().unwrap_or(1024) as u32,
            disk_gb: s.spec["disk_gb"].as_u64().unwrap_or(10) as u32,
            cores: 2,
            agent_token: token.clone(),
            ports: ports(&s.spec),
        };
        Ok(app.host.create(&spec).await?.endpoint)
    })
    .await?;
    // Only a dev server that asked for code-server has an IDE to route to.
    let wants_ide = s.kind == Kind::Dev && s.spec["enable_code_server"].as_bool() == Some(true);
    let code_server = endpoint.code_server.filter(|_| wants_ide);
    repo::set_endpoint(&app.db, &s.id, endpoint.agent_url.as_str(), code_server.map(|a| a.to_string()).as_deref())
        .await?;
    step(app, job, "start container", async { Ok(app.host.start(vmid).await?) }).await?;
    step(app, job, "wait for agent", wait_agent(app, &endpoint)).await?;
    let payload = agent_payload(&s, vmid);
    step(app, job, "send config", async {
        app.agents.configure(&endpoint, &token, &payload).await.map_err(agent_failure)?;
        Ok(())
    })
    .await?;
    step(app, job, "wait running", wait_running(app, &s.id, &endpoint, &token)).await?;
    Ok(code_server.map(|addr| (vmid, addr)))
}

fn ports(spec: &Value) -> Vec<u16> {
    spec["ports"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_u64()).map(|p| p as u16).collect())
        .unwrap_or_default()
}

/// The agent's provisioning payload (the existing portal's shape, plus the plan's `disk_gb`, which
/// the agent enforces as the files quota).
pub fn agent_payload(s: &Server, vmid: u32) -> Value {
    let mut p = s.spec.clone();
    p["vmid"] = json!(vmid);
    p["container_type"] = json!(s.kind.as_str());
    if let Some(o) = p.as_object_mut() {
        o.remove("name");
    }
    p
}

async fn wait_agent(app: &AppState, endpoint: &AgentEndpoint) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + AGENT_UP;
    loop {
        match app.agents.health(endpoint).await {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => bail!("the agent did not come up: {e}"),
            Err(_) => tokio::time::sleep(STATUS_EVERY).await,
        }
    }
}

/// Waits until the agent reports provisioning complete; its error fails the job at once.
async fn wait_running(app: &AppState, server_id: &str, endpoint: &AgentEndpoint, token: &str) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + RUNNING_WITHIN;
    loop {
        match app.agents.status(endpoint, token).await {
            Ok(st) => {
                record_status(app, server_id, &st).await;
                if st.state == "error" {
                    bail!("the agent failed: {}", st.error.as_deref().unwrap_or("unknown error"));
                }
                if st.provisioning_complete {
                    return Ok(());
                }
            }
            Err(AgentError::Unauthorized) => bail!("the agent refused the control plane's token"),
            Err(e) => tracing::debug!(server = server_id, error = %e, "agent status not available yet"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("provisioning did not complete within {RUNNING_WITHIN:?}");
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

async fn record_status(app: &AppState, server_id: &str, st: &AgentStatus) {
    let value = serde_json::to_value(st).unwrap_or(Value::Null);
    let _ = repo::record_poll(&app.db, server_id, true, Some(&value), crate::db::now_ms()).await;
}

fn agent_failure(e: AgentError) -> anyhow::Error {
    match e {
        AgentError::Refused { status, message } => anyhow!("the agent refused the payload ({status}): {message}"),
        other => anyhow!(other),
    }
}

/// Destroys the container (if any) and gives back the server's numbers.
async fn cleanup(app: &AppState, server_id: &str) -> anyhow::Result<()> {
    if let Some(vmid) = server(app, server_id).await?.vmid {
        app.ide_stopped(Some(vmid)).await;
        app.host.destroy(vmid).await.context("destroying the container")?;
    }
    alloc::release_all(&app.db, server_id).await?;
    // The vmid may go to another server now: this one must no longer lead to that container.
    sqlx::query("UPDATE servers SET vmid = NULL, agent_url = NULL, code_server_addr = NULL WHERE id = $1")
        .bind(server_id)
        .execute(app.db.pool())
        .await?;
    Ok(())
}

/// Stops, destroys and releases; the row is marked deleted with the job's end.
async fn delete(app: &Arc<AppState>, job: &Job) -> anyhow::Result<Option<u32>> {
    let s = server(app, &job.server_id).await?;
    app.ide_stopped(s.vmid).await;
    if let Some(vmid) = s.vmid {
        step(app, job, "stop container", async { Ok(app.host.stop(vmid).await?) }).await?;
        step(app, job, "destroy container", async { Ok(app.host.destroy(vmid).await?) }).await?;
    }
    step(app, job, "release", async { Ok(alloc::release_all(&app.db, &s.id).await?) }).await?;
    Ok(s.vmid)
}

/// Claims jobs whose replica died (lease expired) or that were never started, every `every`.
pub fn spawn_sweeper(app: Arc<AppState>, every: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match jobs::claimable(&app.db, 32).await {
                Ok(ids) => {
                    for id in ids {
                        tokio::spawn(run(app.clone(), id));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "looking for jobs to take over failed"),
            }
        }
    })
}
