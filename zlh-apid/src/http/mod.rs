//! The API's HTTP surface: one sub-router per concept, composed in [`app`].

pub mod error;
pub mod metrics;
pub mod openapi;
pub mod server;

use std::sync::Arc;

use axum::middleware::from_fn_with_state;
use axum::routing::get;
use axum::{Json, Router};

pub use error::{ApiError, ApiResult};

use crate::auth::CurrentUser;
use crate::state::AppState;

pub fn app(app: Arc<AppState>) -> Router {
    let metrics = app.metrics.clone();
    Router::new()
        .route("/api/health", get(health))
        .route("/api/openapi.json", get(|| async { Json(openapi::document()) }))
        .route("/metrics", get(metrics::scrape))
        .merge(crate::auth::routes::router())
        .merge(crate::billing::router::<CurrentUser>(app.billing.clone()))
        .merge(crate::servers::routes::router())
        .merge(crate::catalog::router())
        .fallback(error::no_route)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::middleware::map_response(error::json_errors))
        .layer(from_fn_with_state(metrics.clone(), metrics::track))
        .layer(axum::Extension(metrics))
        .with_state(app)
}

/// `GET /api/health`: the API and its database answer; which container host runs, and a warning
/// when containers are not isolated.
async fn health(axum::extract::State(app): axum::extract::State<Arc<AppState>>) -> ApiResult<Json<serde_json::Value>> {
    sqlx::query("SELECT 1").execute(app.db.pool()).await?;
    let host = app.config.container_host.as_str();
    let mut body = serde_json::json!({ "ok": true, "containerHost": host });
    if matches!(host, "process" | "local") {
        body["warning"] = "containers are processes without isolation: not for strangers' code".into();
    }
    Ok(Json(body))
}
