//! `/api/servers…` and `/api/dev`: every route checks that the signed-in user owns the server
//! (admins may act on any); another user's server answers 404, exactly like a missing one.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use zlh_core::agent_client::{AgentError, CodeServerAction, PowerAction};
use zlh_core::container::AgentEndpoint;

use super::jobs;
use super::provision;
use super::quota;
use super::repo::{self, state, Kind, Server};
use crate::auth::CurrentUser;
use crate::http::{ApiError, ApiResult};
use crate::relay::{self, AgentRoute, AgentTarget, RouteError};
use crate::state::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/servers", get(list).post(create_game))
        .route("/api/dev", post(create_dev))
        .route("/api/servers/{id}", get(show).delete(remove))
        .route("/api/servers/{id}/status", get(status))
        .route("/api/servers/{id}/game/{action}", post(game_power))
        .route("/api/servers/{id}/codeserver/{action}", post(code_server))
        .route("/api/servers/{id}/console", get(console))
        .route("/api/servers/{id}/files", any(relay_agent))
        .route("/api/servers/{id}/files/{*rest}", any(relay_agent))
        .route("/api/servers/{id}/mods", any(relay_agent))
        .route("/api/servers/{id}/mods/{*rest}", any(relay_agent))
        .route("/api/servers/{id}/runtimes", any(relay_agent))
        .route("/api/servers/{id}/runtimes/{*rest}", any(relay_agent))
}

/// The server `id` if `user` may act on it.
pub async fn owned(app: &AppState, id: &str, user: &CurrentUser) -> ApiResult<Server> {
    repo::get_owned(&app.db, id, &user.id, user.is_admin()).await?.ok_or_else(|| ApiError::not_found("no such server"))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    all: bool,
}

async fn list(
    State(app): State<Arc<AppState>>,
    user: CurrentUser,
    query: axum::extract::Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    let servers = if query.all && user.is_admin() {
        repo::list_all(&app.db).await?
    } else {
        repo::list_for_user(&app.db, &user.id).await?
    };
    Ok(Json(json!({ "servers": servers.iter().map(summary).collect::<Vec<_>>() })))
}

/// A server as the portal lists it: its record and the agent's last reported status (stale
/// unless the agent answered the last poll).
fn summary(s: &Server) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    let live = s.last_status.as_ref();
    v["agentState"] = live.map(|l| l["state"].clone()).unwrap_or(Value::Null);
    v["crashCount"] = live.map(|l| l["crashCount"].clone()).unwrap_or(json!(0));
    mark_freshness(&mut v, s.agent_status == "online", s.agent_last_seen, crate::db::now_ms());
    v
}

/// Says whether the agent's status in `v` is what it reports now (`stale: false`) or what it
/// last reported before it stopped answering (`stale: true`, `staleSecs` since `agentLastSeen`,
/// null if it never answered): a stale snapshot's processes may be long gone.
fn mark_freshness(v: &mut Value, fresh: bool, last_seen_ms: Option<i64>, now_ms: i64) {
    let age = last_seen_ms.map(|seen| (now_ms - seen).max(0) / 1000);
    v["stale"] = json!(!fresh);
    v["staleSecs"] = if fresh { Value::Null } else { json!(age) };
    if let Some(agent) = v.get_mut("agent").and_then(Value::as_object_mut) {
        agent.insert("stale".into(), json!(!fresh));
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GameRequest {
    #[serde(default)]
    name: Option<String>,
    game: String,
    variant: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    world: Option<String>,
    #[serde(default)]
    memory_mb: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevRequest {
    #[serde(default)]
    name: Option<String>,
    runtime: String,
    #[serde(default)]
    version: String,
    #[serde(default)]
    enable_code_server: bool,
    #[serde(default)]
    memory_mb: Option<u32>,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid request: {e}")))
}

fn name_ok(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request("name must be 1 to 64 printable characters"));
    }
    Ok(())
}

async fn create_game(State(app): State<Arc<AppState>>, user: CurrentUser, body: Bytes) -> ApiResult<Response> {
    let r: GameRequest = parse(&body)?;
    let name = r.name.clone().unwrap_or_else(|| format!("{} {}", r.game, r.variant));
    name_ok(&name)?;
    let spec = json!({"game": r.game, "variant": r.variant, "version": r.version, "world": r.world,
                      "memory_mb": r.memory_mb, "ports": []});
    check_payload(Kind::Game, &spec, r.memory_mb)?;
    crate::catalog::check_game(&app, &r.game, &r.variant, &r.version).await?;
    create(&app, &user, Kind::Game, &name, spec, r.memory_mb).await
}

async fn create_dev(State(app): State<Arc<AppState>>, user: CurrentUser, body: Bytes) -> ApiResult<Response> {
    let r: DevRequest = parse(&body)?;
    let name = r.name.clone().unwrap_or_else(|| format!("{} dev", r.runtime));
    name_ok(&name)?;
    let spec = json!({"runtime": r.runtime, "version": r.version, "enable_code_server": r.enable_code_server,
                      "memory_mb": r.memory_mb});
    check_payload(Kind::Dev, &spec, r.memory_mb)?;
    crate::catalog::check_dev(&app, &r.runtime, &r.version, r.enable_code_server).await?;
    create(&app, &user, Kind::Dev, &name, spec, r.memory_mb).await
}

/// The same checks the agent applies to its payload, before anything is stored (vmid 1 stands
/// in): a malformed request is a 400 before the catalog is asked about it.
fn check_payload(kind: Kind, spec: &Value, memory_mb: Option<u32>) -> ApiResult<()> {
    let mut probe = spec.clone();
    probe["vmid"] = json!(1);
    probe["container_type"] = json!(kind.as_str());
    probe["memory_mb"] = json!(memory_mb.unwrap_or(1024));
    zlh_core::payload::Payload::parse(probe.to_string().as_bytes()).map_err(ApiError::bad_request)?;
    Ok(())
}

/// Checks the request against the user's plan, records the server and its provisioning job, and
/// starts the job: the answer comes at once with the server's id. The payload and the catalog
/// were checked by the caller.
async fn create(
    app: &Arc<AppState>,
    user: &CurrentUser,
    kind: Kind,
    name: &str,
    mut spec: Value,
    memory_mb: Option<u32>,
) -> ApiResult<Response> {
    let plan = app.plan_for(user, memory_mb.unwrap_or(0)).await?;
    spec["memory_mb"] = json!(memory_mb.unwrap_or(plan.memory_mb));
    spec["disk_gb"] = json!(plan.disk_gb);
    let (server, job) = quota::create_within_plan(&app.db, &user.id, kind, name, plan, &spec).await?;
    tracing::info!(server = %server.id, user = %user.id, kind = kind.as_str(), "provisioning accepted");
    tokio::spawn(provision::run(app.clone(), job.id.clone()));
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": server.id, "state": server.state, "jobId": job.id }))).into_response())
}

async fn show(State(app): State<Arc<AppState>>, user: CurrentUser, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    Ok(Json(summary(&owned(&app, &id, &user).await?)))
}

/// The server, its newest job with every step, and the agent's status (asked now, briefly; the
/// poller's last answer when the agent does not answer in time).
async fn status(State(app): State<Arc<AppState>>, user: CurrentUser, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    let s = owned(&app, &id, &user).await?;
    let job = jobs::latest_for_server(&app.db, &s.id).await?;
    let mut agent = s.last_status.clone();
    let mut agent_status = s.agent_status.clone();
    let mut last_seen = s.agent_last_seen;
    let mut fresh = false;
    if let Some(target) = endpoint(&app, &s) {
        match app.agents.with_request_timeout(Duration::from_secs(2)).status(&target.0, &target.1).await {
            Ok(live) => {
                agent = serde_json::to_value(&live).ok();
                agent_status = "online".into();
                last_seen = Some(crate::db::now_ms());
                fresh = true;
            }
            Err(e) if e.is_unreachable() => agent_status = "offline".into(),
            Err(_) => {}
        }
    }
    let mut v = summary(&s);
    v["agentStatus"] = json!(agent_status);
    v["agentLastSeen"] = json!(last_seen);
    v["agent"] = agent.unwrap_or(Value::Null);
    mark_freshness(&mut v, fresh, last_seen, crate::db::now_ms());
    v["job"] = serde_json::to_value(job).unwrap_or(Value::Null);
    Ok(Json(v))
}

fn endpoint(app: &AppState, s: &Server) -> Option<(AgentEndpoint, String)> {
    let url = url::Url::parse(s.agent_url.as_deref()?).ok()?;
    let vmid = s.vmid?;
    let code_server = s.code_server_addr.as_deref().and_then(|a| a.parse().ok());
    Some((AgentEndpoint { agent_url: url, code_server }, app.agent_token(vmid)))
}

fn reachable(app: &AppState, s: &Server) -> ApiResult<(AgentEndpoint, String)> {
    if s.state == state::SUSPENDED {
        return Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            "this server is suspended until the subscription is paid (or a new one taken out) under billing",
        ));
    }
    // Only a running server's agent is asked: while provisioning it is not up yet (or not
    // configured), while deleting it is going away; either way that is no failure of the agent.
    match s.state.as_str() {
        state::RUNNING => {}
        state::PROVISIONING => {
            return Err(ApiError::conflict(format!(
                "the server is still being provisioned: poll GET /api/servers/{}/status until it is running",
                s.id
            )))
        }
        state::DELETING => return Err(ApiError::conflict("the server is being deleted")),
        other => return Err(ApiError::conflict(format!("the server is {other}, not running"))),
    }
    endpoint(app, s).ok_or_else(|| ApiError::conflict("the server has no running container yet"))
}

fn agent_error(e: AgentError) -> ApiError {
    match e {
        AgentError::Refused { status, message } if (400..500).contains(&status) => {
            ApiError::new(StatusCode::from_u16(status).unwrap_or(StatusCode::CONFLICT), message)
        }
        e if e.is_unreachable() => ApiError::bad_gateway("the server's agent is unreachable"),
        e => ApiError::bad_gateway(format!("the server's agent failed: {e}")),
    }
}

async fn game_power(
    State(app): State<Arc<AppState>>,
    user: CurrentUser,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Response> {
    let action = match action.as_str() {
        "start" => PowerAction::Start,
        "stop" => PowerAction::Stop,
        "restart" => PowerAction::Restart,
        "kill" => PowerAction::Kill,
        _ => return Err(ApiError::not_found("unknown action (start, stop, restart, kill)")),
    };
    let s = owned(&app, &id, &user).await?;
    if s.kind != Kind::Game {
        return Err(ApiError::conflict("only game servers have power actions"));
    }
    let (ep, token) = reachable(&app, &s)?;
    app.agents.power(&ep, &token, action).await.map_err(agent_error)?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": true, "action": action.as_str() }))).into_response())
}

async fn code_server(
    State(app): State<Arc<AppState>>,
    user: CurrentUser,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let action = match action.as_str() {
        "start" => CodeServerAction::Start,
        "stop" => CodeServerAction::Stop,
        "restart" => CodeServerAction::Restart,
        _ => return Err(ApiError::not_found("unknown action (start, stop, restart)")),
    };
    let s = owned(&app, &id, &user).await?;
    if s.kind != Kind::Dev {
        return Err(ApiError::conflict("only dev containers run code-server"));
    }
    let (ep, token) = reachable(&app, &s)?;
    let stop = matches!(action, CodeServerAction::Stop);
    if stop {
        // The IDE closes first (the row says stopped, then the route goes), so no request
        // reaches a code-server that is going away, and later ones get "stopped", not a 502.
        repo::set_ide_stopped(&app.db, &s.id, true).await?;
        app.ide_stopped(s.vmid).await;
    }
    if let Err(e) = app.agents.code_server(&ep, &token, action).await {
        if stop && !s.ide_stopped {
            // It may well still run: as it was, the IDE stays open.
            repo::set_ide_stopped(&app.db, &s.id, false).await?;
        }
        return Err(agent_error(e));
    }
    if !stop {
        repo::set_ide_stopped(&app.db, &s.id, false).await?;
        if let (Some(ide), Some(addr), Some(vmid)) = (app.ide.get(), ep.code_server, s.vmid) {
            ide.server_started(vmid, addr).await;
        }
    }
    Ok(Json(json!({ "ok": true, "action": action.as_str() })))
}

async fn remove(State(app): State<Arc<AppState>>, user: CurrentUser, Path(id): Path<String>) -> ApiResult<Response> {
    let s = owned(&app, &id, &user).await?;
    if s.state == state::DELETING {
        // Asking again retries a delete that failed; one still under way is left to finish.
        let latest = jobs::latest_for_server(&app.db, &s.id).await?;
        if latest.is_some_and(|j| j.kind == jobs::DELETE && j.state != "failed") {
            return Ok((StatusCode::ACCEPTED, Json(json!({ "id": s.id, "state": s.state }))).into_response());
        }
    }
    repo::set_state(&app.db, &s.id, state::DELETING, None).await?;
    let job = match jobs::create(&app.db, &s.id, jobs::DELETE).await {
        Ok(job) => job,
        // Another DELETE (here or on another replica) just started the one delete job.
        Err(e) if crate::db::is_unique_violation(&e) => {
            return Ok((StatusCode::ACCEPTED, Json(json!({ "id": s.id, "state": state::DELETING }))).into_response());
        }
        Err(e) => return Err(e.into()),
    };
    tokio::spawn(provision::run(app.clone(), job.id.clone()));
    Ok((StatusCode::ACCEPTED, Json(json!({ "id": s.id, "state": state::DELETING, "jobId": job.id }))).into_response())
}

/// `/api/servers/:id/console`: the agent's console, relayed. Browsers authenticate with the
/// session token in the subprotocol list (`zlh-console`, `zlh-auth.<token>`) or the header.
async fn console(
    State(app): State<Arc<AppState>>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    // Who asks comes first: a plain GET learns nothing about a server it may not see.
    let user = crate::auth::user_from_headers_or_protocol(&app, &headers).await?;
    let s = owned(&app, &id, &user).await?;
    let ws = ws.map_err(|e| ApiError::new(e.status(), "the console is a WebSocket: send an upgrade request"))?;
    let (ep, token) = reachable(&app, &s)?;
    let vmid = s.vmid.unwrap_or_default();
    let key = zlh_core::token::console_ticket_key(&token);
    let ticket = zlh_core::token::issue(
        &key,
        zlh_core::token::CONSOLE_PURPOSE,
        &user.id,
        vmid,
        relay::TICKET_TTL,
        chrono::Utc::now(),
    )
    .map_err(ApiError::internal)?;
    let target = AgentTarget { base: ep.agent_url, token, vmid };
    // Only a mode the agent knows goes on: nothing else of the user's query reaches it.
    let mode = match url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()).find(|(k, _)| k == "mode") {
        None => None,
        Some((_, m)) if m == "game" => Some("game"),
        Some((_, m)) if m == "shell" => Some("shell"),
        Some(_) => return Err(ApiError::bad_request("unknown console mode (game, shell)")),
    };
    tracing::info!(server = %s.id, user = %user.id, "console opened");
    Ok(ws.protocols(["zlh-console"]).on_upgrade(move |socket| relay::console(socket, target, mode, ticket)))
}

/// Files, uploads, mods and runtimes: the same route under the agent, streamed both ways.
async fn relay_agent(
    State(app): State<Arc<AppState>>,
    user: CurrentUser,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    // Read from the path exactly as it came (the router matched these routes on it, and a
    // decoded tail would no longer tell `a%2Fb` from `a/b`): `<id>/<family>[/<tail>]`.
    let (raw_id, tail) = uri.path().strip_prefix("/api/servers/").and_then(|p| p.split_once('/')).unwrap_or_default();
    let id = percent_encoding::percent_decode_str(raw_id)
        .decode_utf8()
        .map_err(|_| ApiError::not_found("no such server"))?;
    let s = owned(&app, &id, &user).await?;
    // Only validated segments of the tail can become the agent's path.
    let route = AgentRoute::parse(tail, uri.query()).map_err(|e| match e {
        RouteError::Unknown => ApiError::not_found(e.to_string()),
        e => ApiError::bad_request(e.to_string()),
    })?;
    let (ep, token) = reachable(&app, &s)?;
    let prefix = format!("/api/servers/{}", s.id);
    let target = AgentTarget { base: ep.agent_url, token, vmid: s.vmid.unwrap_or_default() };
    relay::http(
        &app.relay_http,
        relay::RelayTimeouts::of(&app.config),
        &target,
        method,
        &route,
        &prefix,
        &headers,
        body,
    )
    .await
}
