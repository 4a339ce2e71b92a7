//! The agent's HTTP surface: one sub-router per concept, composed here. Every route but a bare
//! `GET /health` sits behind the bearer token.

pub mod agent;
pub mod error;

use std::sync::Arc;

use axum::routing::get;
use axum::Router;

pub use error::{ApiError, ApiResult};

use crate::agent::Agent;

pub fn app(agent: Arc<Agent>) -> Router {
    let protected = Router::new().merge(agent::router(agent.clone()));
    Router::new().route("/health", get(agent::health)).merge(protected)
}
