//! The agent's HTTP surface: one sub-router per concept, composed here. Every route but a bare
//! `GET /health` sits behind the bearer token; every request is counted in the metrics.

pub mod agent;
pub mod error;
pub mod metrics;
pub mod mods;
pub mod runtimes;

use std::sync::Arc;

use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::Router;

pub use error::{ApiError, ApiResult};

use crate::agent::Agent;

pub fn app(agent: Arc<Agent>) -> Router {
    let mods_source = {
        let agent = agent.clone();
        Arc::new(move || agent.mods())
    };
    let protected = Router::new()
        .merge(agent::router(agent.clone()))
        .merge(mods::router(mods::ModsState { mods: mods_source }))
        .merge(runtimes::router(runtimes::RuntimesState {
            installer: agent.installers.runtimes.clone(),
            catalog: agent.catalog.clone(),
            metrics: Some(agent.metrics.clone()),
        }))
        .merge(metrics::router(agent.metrics.clone()));
    Router::new()
        .route("/health", get(agent::health))
        .merge(protected)
        .layer(from_fn_with_state(agent.metrics.clone(), metrics::track))
}
