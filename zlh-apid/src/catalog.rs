//! `/api/catalog/dev` and `/api/catalog/game`: the portal's dropdowns, from the signed catalog
//! (verified and anti-rollback checked like the agents do). Versions are strings, newest first,
//! stable unless `?channel=beta|dev`.
//!
//! Provisioning asks here first ([`check_dev`], [`check_game`]): what the agent could not install
//! is refused at once, before any job, lease or container exists.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use zlh_core::catalog::{Catalog, Channel, ItemKind};

use crate::auth::CurrentUser;
use crate::http::{ApiError, ApiResult};
use crate::state::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new().route("/api/catalog/dev", get(dev)).route("/api/catalog/game", get(game))
}

#[derive(Deserialize)]
struct ChannelQuery {
    channel: Option<String>,
}

fn channel(q: &ChannelQuery) -> ApiResult<Channel> {
    q.channel
        .as_deref()
        .unwrap_or("stable")
        .parse()
        .map_err(|e: zlh_core::catalog::CatalogError| ApiError::bad_request(e.to_string()))
}

async fn load(app: &AppState) -> ApiResult<Catalog> {
    let source = app
        .catalog
        .as_ref()
        .ok_or_else(|| ApiError::new(axum::http::StatusCode::SERVICE_UNAVAILABLE, "no catalog is configured"))?;
    source.load().await.map_err(|e| ApiError::bad_gateway(format!("catalog unavailable: {e}")))
}

/// 422 with the catalog's own words, which list what exists.
fn not_provisionable(e: zlh_core::catalog::CatalogError) -> ApiError {
    ApiError::new(axum::http::StatusCode::UNPROCESSABLE_ENTITY, e.to_string())
}

/// Refuses a dev container whose runtime and version (a prefix, or empty for the newest) resolve
/// to no stable version, as the agent resolves them, or that wants an IDE the catalog lacks.
/// Without a configured catalog (an embedder's choice) there is nothing to check against.
pub async fn check_dev(app: &AppState, runtime: &str, version: &str, code_server: bool) -> ApiResult<()> {
    if app.catalog.is_none() {
        return Ok(());
    }
    let catalog = load(app).await?;
    catalog.runtime(runtime, version, Channel::Stable).map_err(not_provisionable)?;
    if code_server {
        catalog.addon("code-server", "", Channel::Stable).map_err(not_provisionable)?;
    }
    Ok(())
}

/// Refuses a game server whose game, variant and version resolve to no stable version, or whose
/// runtime the catalog does not carry.
pub async fn check_game(app: &AppState, game: &str, variant: &str, version: &str) -> ApiResult<()> {
    if app.catalog.is_none() {
        return Ok(());
    }
    let catalog = load(app).await?;
    let server = catalog.game(game, variant, version, Channel::Stable).map_err(not_provisionable)?;
    if let Some(need) = &server.runtime {
        catalog.runtime(need.id.as_str(), &need.version, Channel::Stable).map_err(|e| {
            ApiError::new(
                axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                format!("{game} {variant} {} needs {e}", server.version),
            )
        })?;
    }
    Ok(())
}

fn strings(vs: Vec<zlh_core::Version>) -> Vec<String> {
    vs.into_iter().map(|v| v.to_string()).collect()
}

pub fn dev_view(c: &Catalog, channel: Channel) -> Value {
    let runtimes: Vec<Value> = c
        .runtimes
        .iter()
        .map(|p| json!({"id": p.id.as_str(), "versions": strings(c.versions(ItemKind::Runtime, p.id.as_str(), channel))}))
        .filter(|v| v["versions"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    let code_server = !c.versions(ItemKind::Addon, "code-server", channel).is_empty();
    json!({ "runtimes": runtimes, "codeServer": code_server })
}

pub fn game_view(c: &Catalog, channel: Channel) -> Value {
    let games: Vec<Value> = c
        .games
        .iter()
        .map(|g| {
            let variants: Vec<Value> = g
                .variants
                .iter()
                .map(|v| {
                    let id = format!("{}-{}", g.id, v.id);
                    json!({"id": v.id.as_str(), "versions": strings(c.versions(ItemKind::Game, &id, channel))})
                })
                .filter(|v| v["versions"].as_array().is_some_and(|a| !a.is_empty()))
                .collect();
            json!({"id": g.id.as_str(), "variants": variants})
        })
        .filter(|g| g["variants"].as_array().is_some_and(|a| !a.is_empty()))
        .collect();
    json!({ "games": games })
}

async fn dev(State(app): State<Arc<AppState>>, _user: CurrentUser, q: Query<ChannelQuery>) -> ApiResult<Json<Value>> {
    Ok(Json(dev_view(&load(&app).await?, channel(&q)?)))
}

async fn game(State(app): State<Arc<AppState>>, _user: CurrentUser, q: Query<ChannelQuery>) -> ApiResult<Json<Value>> {
    Ok(Json(game_view(&load(&app).await?, channel(&q)?)))
}
