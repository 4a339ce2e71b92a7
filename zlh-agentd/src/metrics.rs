//! The agent's Prometheus metrics, on `prometheus-client`.
//!
//! Every label takes its values from a bounded set (route templates, status codes, catalog ids,
//! fixed state names), never from raw URLs or user input, so a scrape's size stays bounded however
//! the agent is used.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use zlh_core::supervisor::ProcessState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstallLabels {
    id: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusalLabels {
    reason: &'static str,
}

/// How an install ended, for `zlh_agent_install_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstallOutcome {
    Ok,
    Failed,
}

/// Route label of requests that matched no route (404s of unknown paths).
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// Request latency buckets in seconds: 1 ms to about 65 s (long installs land in the last ones).
const LATENCY_BUCKETS: [f64; 14] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 30.0, 65.0];

/// Every metric of the agent and the registry that encodes them.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    durations: Family<RouteLabels, Histogram>,
    installs: Family<InstallLabels, Counter>,
    crashes: Counter,
    game_state: Family<StateLabels, Gauge>,
    upload_bytes: Counter,
    console_sessions: Gauge,
    connections_refused: Family<RefusalLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(env!("CARGO_PKG_VERSION"))
    }
}

impl Metrics {
    /// Registers every metric; `version` goes into `zlh_agent_build_info`.
    pub fn new(version: &str) -> Self {
        let mut registry = Registry::with_prefix("zlh_agent");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by method, route template and status", requests.clone());
        let durations = Family::<RouteLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(LATENCY_BUCKETS)) as fn() -> Histogram,
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency by route template",
            Unit::Seconds,
            durations.clone(),
        );
        let installs = Family::<InstallLabels, Counter>::default();
        registry.register("install", "Runtime and addon installs by id and outcome", installs.clone());
        let crashes = Counter::default();
        registry.register("game_crashes", "Unrequested exits of the game server", crashes.clone());
        let game_state = Family::<StateLabels, Gauge>::default();
        registry.register(
            "game_state",
            "The game server's state: 1 for the current state, 0 for the others",
            game_state.clone(),
        );
        let upload_bytes = Counter::default();
        registry.register("upload_bytes", "Bytes received by file uploads", upload_bytes.clone());
        let console_sessions = Gauge::default();
        registry.register("console_sessions", "Open console sessions", console_sessions.clone());
        let connections_refused = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "connections_refused",
            "Connections closed on arrival: over the cap per client address, or in all",
            connections_refused.clone(),
        );
        registry.register("build", "Agent build", Info::new(vec![("version".to_owned(), version.to_owned())]));
        let metrics = Self {
            registry,
            requests,
            durations,
            installs,
            crashes,
            game_state,
            upload_bytes,
            console_sessions,
            connections_refused,
        };
        // Every state is present from the first scrape, so queries never miss a series.
        metrics.set_game_state(ProcessState::Stopped);
        metrics
    }

    /// Records one HTTP request. `route` must be a route template or [`UNMATCHED_ROUTE`].
    pub fn record_request(&self, method: &axum::http::Method, route: &str, status: u16, elapsed: Duration) {
        let route = route.to_owned();
        self.requests
            .get_or_create(&RequestLabels { method: method_label(method), route: route.clone(), status })
            .inc();
        self.durations.get_or_create(&RouteLabels { route }).observe(elapsed.as_secs_f64());
    }

    /// Records how an install of a catalog id ended. Pass only ids the catalog resolved.
    pub fn record_install(&self, id: &str, outcome: InstallOutcome) {
        let outcome = match outcome {
            InstallOutcome::Ok => "ok",
            InstallOutcome::Failed => "failed",
        };
        self.installs.get_or_create(&InstallLabels { id: id.to_owned(), outcome }).inc();
    }

    pub fn record_crash(&self) {
        self.crashes.inc();
    }

    /// Sets the one-hot `zlh_agent_game_state{state}` gauge.
    pub fn set_game_state(&self, current: ProcessState) {
        for state in ALL_STATES {
            self.game_state.get_or_create(&StateLabels { state: state_name(state) }).set(i64::from(state == current));
        }
    }

    pub fn add_upload_bytes(&self, bytes: u64) {
        self.upload_bytes.inc_by(bytes);
    }

    /// One connection closed on arrival.
    pub fn connection_refused(&self, refusal: zlh_core::net::Refusal) {
        self.connections_refused.get_or_create(&RefusalLabels { reason: refusal.as_str() }).inc();
    }

    /// Counts a console session until the returned guard is dropped, however the session ends.
    pub fn console_session(self: &std::sync::Arc<Self>) -> ConsoleSession {
        self.console_sessions.inc();
        ConsoleSession { metrics: self.clone() }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Keeps `zlh_agent_console_sessions` one higher while alive.
pub struct ConsoleSession {
    metrics: std::sync::Arc<Metrics>,
}

impl Drop for ConsoleSession {
    fn drop(&mut self) {
        self.metrics.console_sessions.dec();
    }
}

const ALL_STATES: [ProcessState; 6] = [
    ProcessState::Stopped,
    ProcessState::Starting,
    ProcessState::Running,
    ProcessState::Stopping,
    ProcessState::Backoff,
    ProcessState::Error,
];

fn state_name(state: ProcessState) -> &'static str {
    match state {
        ProcessState::Stopped => "stopped",
        ProcessState::Starting => "starting",
        ProcessState::Running => "running",
        ProcessState::Stopping => "stopping",
        ProcessState::Backoff => "backoff",
        ProcessState::Error => "error",
    }
}

/// Standard methods by name; anything else (extension methods are client-chosen) as `other`.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
