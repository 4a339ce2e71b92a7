//! `/metrics` of the API: requests by method, route template and status, and their latency; and
//! the dev hosts' (browser IDE) requests by status and their latency, counted apart so a page
//! load's hundred asset requests do not drown the API's routes; and connections refused.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: String,
    route: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    ide_requests: Family<StatusLabels, Counter>,
    ide_durations: Histogram,
    connections_refused: Family<RefusalLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("zlh_api");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by method, route template and status", requests.clone());
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new([0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0])) as fn() -> Histogram,
        );
        registry.register("http_request_duration_seconds", "HTTP request latency by route template", durations.clone());
        let ide_requests = Family::<StatusLabels, Counter>::default();
        registry.register("ide_requests", "Requests on dev hosts (browser IDE) by status", ide_requests.clone());
        // Until the answer's head: a WebSocket counts up to its 101, a download up to its headers.
        let ide_durations = Histogram::new([0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0]);
        registry.register(
            "ide_request_duration_seconds",
            "Time to the answer's head for requests on dev hosts",
            ide_durations.clone(),
        );
        let connections_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed on arrival: over the cap per client address, or in all",
            connections_refused.clone(),
        );
        Self { registry, requests, durations, ide_requests, ide_durations, connections_refused }
    }
}

impl Metrics {
    /// One request on a dev host answered with `status` after `elapsed`.
    pub fn ide_request(&self, status: u16, elapsed: std::time::Duration) {
        self.ide_requests.get_or_create(&StatusLabels { status }).inc();
        self.ide_durations.observe(elapsed.as_secs_f64());
    }

    /// One connection closed on arrival.
    pub fn connection_refused(&self, refusal: zlh_core::net::Refusal) {
        self.connections_refused.get_or_create(&RefusalLabels { reason: refusal.as_str() }).inc();
    }
}

/// Records each request under its route template (never the raw path: ids stay out of labels).
pub async fn track(State(m): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_owned();
    let route =
        req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    m.requests.get_or_create(&RequestLabels { method, route: route.clone(), status: resp.status().as_u16() }).inc();
    m.durations.get_or_create(&RouteLabels { route }).observe(started.elapsed().as_secs_f64());
    resp
}

/// `/metrics` for Prometheus with the configured token, or for an admin's session.
pub async fn scrape(
    State(app): State<Arc<crate::state::AppState>>,
    Extension(m): Extension<Arc<Metrics>>,
    headers: axum::http::HeaderMap,
) -> Result<Response, crate::http::ApiError> {
    let token =
        crate::auth::bearer_token(&headers).ok_or_else(|| crate::http::ApiError::unauthorized("not signed in"))?;
    let scraper = app.config.metrics_token.as_deref().is_some_and(|expected| {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        bool::from(sha2::Sha256::digest(expected).ct_eq(&sha2::Sha256::digest(token)))
    });
    if !scraper && !crate::auth::user_from_token(&app, token).await?.is_admin() {
        return Err(crate::http::ApiError::forbidden("admins only"));
    }
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &m.registry);
    Ok(([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], out).into_response())
}
