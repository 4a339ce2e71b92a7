//! The portal's agent contract: `/health`, `/config`, `/status`, the game's power actions and
//! code-server's lifecycle.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use super::{ApiError, ApiResult};
use crate::agent::{Agent, AgentError, Power};

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::BadRequest(m) => ApiError::bad_request(m),
            AgentError::Conflict(m) => ApiError::conflict(m),
            AgentError::Internal(m) => ApiError::internal(m),
        }
    }
}

/// `GET /health`: the only route without a token; says nothing about the container.
pub async fn health() -> impl IntoResponse {
    Json(json!({ "ok": true }))
}

/// The authenticated routes of this module.
pub fn router(agent: Arc<Agent>) -> Router {
    Router::new()
        .route("/config", post(configure).get(current_config))
        .route("/status", get(status))
        .route("/start", post(|s| power(s, Power::Start)))
        .route("/stop", post(|s| power(s, Power::Stop)))
        .route("/restart", post(|s| power(s, Power::Restart)))
        .route("/kill", post(|s| power(s, Power::Kill)))
        .route("/dev/codeserver", get(code_server_status))
        .route("/dev/codeserver/start", post(|s| code_server(s, Power::Start)))
        .route("/dev/codeserver/stop", post(|s| code_server(s, Power::Stop)))
        .route("/dev/codeserver/restart", post(|s| code_server(s, Power::Restart)))
        .with_state(agent)
}

/// 202 when provisioning starts, 200 when the payload is already in force or being provisioned.
async fn configure(State(agent): State<Arc<Agent>>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let started = agent.configure(&body)?;
    let code = if started { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((code, Json(agent.status().await)))
}

async fn current_config(State(agent): State<Arc<Agent>>) -> ApiResult<impl IntoResponse> {
    match agent.provisioned() {
        Some(p) => Ok(Json(serde_json::to_value(p.payload).map_err(|e| ApiError::internal(e.to_string()))?)),
        None => Err(ApiError::not_found("no provisioning payload has completed")),
    }
}

async fn status(State(agent): State<Arc<Agent>>) -> impl IntoResponse {
    Json(agent.status().await)
}

async fn power(State(agent): State<Arc<Agent>>, action: Power) -> ApiResult<impl IntoResponse> {
    agent.power(action)?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "accepted": true, "action": action.name() }))))
}

async fn code_server_status(State(agent): State<Arc<Agent>>) -> ApiResult<impl IntoResponse> {
    let report = agent.status().await.code_server.ok_or_else(|| ApiError::not_found("code-server is not enabled"))?;
    Ok(Json(report))
}

async fn code_server(State(agent): State<Arc<Agent>>, action: Power) -> ApiResult<impl IntoResponse> {
    agent.code_server_action(action).await?;
    let report = agent.status().await.code_server;
    Ok(Json(json!({ "ok": true, "action": action.name(), "codeServer": report })))
}
