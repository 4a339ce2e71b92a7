//! The agent client against an in-test stand-in agent over real HTTP: per-agent tokens, the
//! agent's refusals with their messages, timeouts of hung agents, and unreachable agents.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use zlh_core::agent_client::{
    AgentClient, AgentClientConfig, AgentError, CodeServerAction, ConfigureOutcome, PowerAction,
};
use zlh_core::container::AgentEndpoint;

const TOKEN: &str = "agent-token-0123456789abcdef0123456789";

#[derive(Default)]
struct Agent {
    configured: AtomicUsize,
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {TOKEN}"))
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

fn status_body() -> Value {
    json!({"state": "installing", "vmid": 6001, "containerType": "dev", "provisioningComplete": false,
           "installStep": "runtime zrt", "progress": 40, "crashCount": 0, "somethingNew": {"x": 1},
           "codeServer": null})
}

async fn status(headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    Json(status_body()).into_response()
}

async fn configure(State(agent): State<Arc<Agent>>, headers: HeaderMap, Json(payload): Json<Value>) -> Response {
    if !authorized(&headers) {
        return refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    if payload["vmid"] != 6001 {
        return refuse(StatusCode::CONFLICT, "payload is for vmid 7, this agent is 6001");
    }
    let code = if agent.configured.fetch_add(1, Ordering::SeqCst) == 0 { StatusCode::ACCEPTED } else { StatusCode::OK };
    (code, Json(status_body())).into_response()
}

async fn power(headers: HeaderMap) -> Response {
    if !authorized(&headers) {
        return refuse(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    (StatusCode::ACCEPTED, Json(json!({"accepted": true}))).into_response()
}

async fn start_refused() -> Response {
    refuse(StatusCode::CONFLICT, "the server is not provisioned yet")
}

async fn hang() -> Response {
    std::future::pending::<()>().await;
    unreachable!()
}

async fn serve(router: Router) -> AgentEndpoint {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    AgentEndpoint { agent_url: format!("http://{addr}/").parse().unwrap(), code_server: None }
}

async fn stand_in() -> AgentEndpoint {
    let router = Router::new()
        .route("/health", get(|| async { Json(json!({"ok": true})) }))
        .route("/status", get(status))
        .route("/config", post(configure))
        .route("/stop", post(power))
        .route("/start", post(start_refused))
        .route("/dev/codeserver/restart", post(|| async { Json(json!({"ok": true, "action": "restart"})) }))
        .route("/slow/status", get(hang))
        .with_state(Arc::new(Agent::default()));
    serve(router).await
}

fn client(timeout: Duration) -> AgentClient {
    AgentClient::new(AgentClientConfig { request_timeout: timeout, ..AgentClientConfig::default() }).unwrap()
}

#[tokio::test]
async fn status_with_the_right_token_and_401_without() {
    let ep = stand_in().await;
    let c = client(Duration::from_secs(5));
    c.health(&ep).await.unwrap();
    let s = c.status(&ep, TOKEN).await.unwrap();
    assert_eq!((s.state.as_str(), s.progress, s.vmid), ("installing", Some(40), Some(6001)));
    assert_eq!(s.install_step.as_deref(), Some("runtime zrt"));
    assert!(s.code_server.is_none() && s.last_crash.is_none());

    let wrong = "wrong-token-0123456789abcdef0123456789";
    let err = c.status(&ep, wrong).await.unwrap_err();
    assert!(matches!(err, AgentError::Unauthorized), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("wrong-token"), "errors never carry the token");
}

#[tokio::test]
async fn configure_started_then_already_applied_and_refusals_keep_the_message() {
    let ep = stand_in().await;
    let c = client(Duration::from_secs(5));
    let payload = json!({"vmid": 6001, "container_type": "dev", "runtime": "zrt", "version": "1"});
    let first = c.configure(&ep, TOKEN, &payload).await.unwrap();
    assert!(matches!(first, ConfigureOutcome::Started(_)), "{first:?}");
    assert_eq!(first.status().state, "installing");
    let again = c.configure(&ep, TOKEN, &payload).await.unwrap();
    assert!(matches!(again, ConfigureOutcome::AlreadyApplied(_)), "{again:?}");

    let err = c.configure(&ep, TOKEN, &json!({"vmid": 7})).await.unwrap_err();
    match err {
        AgentError::Refused { status, message } => {
            assert_eq!(status, 409);
            assert_eq!(message, "payload is for vmid 7, this agent is 6001");
        }
        other => panic!("{other:?}"),
    }

    c.power(&ep, TOKEN, PowerAction::Stop).await.unwrap();
    let err = c.power(&ep, TOKEN, PowerAction::Start).await.unwrap_err();
    assert!(
        matches!(&err, AgentError::Refused { status: 409, message } if message.contains("not provisioned")),
        "{err:?}"
    );
    let answer = c.code_server(&ep, TOKEN, CodeServerAction::Restart).await.unwrap();
    assert_eq!(answer["action"], "restart");
    // A route the agent does not have: 404, relayed as a refusal.
    let err = c.power(&ep, TOKEN, PowerAction::Kill).await.unwrap_err();
    assert!(matches!(err, AgentError::Refused { status: 404, .. }), "{err:?}");
}

#[tokio::test]
async fn passthrough_returns_the_agent_answer_as_it_is() {
    let ep = stand_in().await;
    let c = client(Duration::from_secs(5));
    let r = c.request(&ep, TOKEN, reqwest::Method::GET, "/status", None).await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["somethingNew"]["x"], 1);
    let r =
        c.request(&ep, "bad-token-0123456789abcdef0123456789", reqwest::Method::GET, "/status", None).await.unwrap();
    assert_eq!(r.status(), 401, "relayed, not turned into an error");
    let err = c.request(&ep, TOKEN, reqwest::Method::GET, "status", None).await.unwrap_err();
    assert!(matches!(err, AgentError::BadRequest(_)), "{err:?}");
}

#[tokio::test]
async fn a_hung_agent_times_out_within_the_configured_bound() {
    let base = stand_in().await;
    // The same stand-in under a prefix whose /status never answers.
    let hung = AgentEndpoint { agent_url: base.agent_url.join("slow/").unwrap(), code_server: None };
    let c = client(Duration::from_millis(200));
    let started = Instant::now();
    let err = c.status(&hung, TOKEN).await.unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, AgentError::Timeout(d) if d == Duration::from_millis(200)), "{err:?}");
    assert!(err.is_unreachable());
    assert!(elapsed >= Duration::from_millis(200) && elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn a_closed_port_is_unreachable() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ep = AgentEndpoint { agent_url: format!("http://127.0.0.1:{port}/").parse().unwrap(), code_server: None };
    let err = client(Duration::from_secs(5)).status(&ep, TOKEN).await.unwrap_err();
    assert!(matches!(err, AgentError::Unreachable(_)), "{err:?}");
    assert!(err.is_unreachable());
}
