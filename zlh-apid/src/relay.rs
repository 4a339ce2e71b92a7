//! The browser never talks to a container: console, files, uploads, mods and runtimes reach the
//! agent only through these relays, after the API has checked the user owns the server.
//!
//! - HTTP: the request body streams to the agent and the agent's response streams back (constant
//!   memory, so resumable upload chunks pass through as they are). Only the headers a route needs
//!   are forwarded; the user's `Authorization` and cookies never reach the agent, which gets its
//!   own bearer token instead. A body that stops moving (a client gone without closing) is cut
//!   after [`RelayTimeouts::body_idle`], so the agent keeps what arrived and lets the upload go;
//!   sending may take as long as it keeps moving, and the agent then has
//!   [`RelayTimeouts::answer`] to answer.
//! - WebSocket: the browser's socket is joined to the agent's `/console/stream`, which the API
//!   opens with a short-lived console ticket bound to the user and the vmid.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::ws::{CloseFrame as AxumClose, Message as AxumMsg, WebSocket};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as AgentMsg;

use crate::http::ApiError;

mod agent_route;

pub use agent_route::{AgentRoute, RouteError};

/// How long a console ticket for the agent lives: only long enough to open the socket.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
// Agents refuse tickets that claim to live longer.
const _: () = assert!(TICKET_TTL.as_secs() <= zlh_core::token::MAX_CONSOLE_TICKET_SECS as u64);

/// Most of a refused request's body read (and dropped) so the client gets the answer, and for how
/// long; past that the connection is closed.
const DRAIN_MAX: u64 = 32 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The tus protocol version the agent speaks.
const TUS_VERSION: &str = "1.0.0";

/// Request headers passed to the agent (everything else, credentials included, stays here).
const FORWARD_REQUEST: &[&str] = &[
    "content-type",
    "content-length",
    "range",
    "if-range",
    "tus-resumable",
    "upload-offset",
    "upload-length",
    "upload-metadata",
    "upload-defer-length",
];

/// Response headers passed back to the browser.
const FORWARD_RESPONSE: &[&str] = &[
    "content-type",
    "content-length",
    "content-range",
    "accept-ranges",
    "location",
    "tus-resumable",
    "tus-version",
    "tus-extension",
    "tus-max-size",
    "upload-offset",
    "upload-length",
    "cache-control",
    "retry-after",
];

/// Bounds on one relayed request (see [`crate::config::ApiConfig::relay_body_idle_timeout`]).
#[derive(Debug, Clone, Copy)]
pub struct RelayTimeouts {
    /// Longest wait for the next bytes of a body, the client's or the agent's.
    pub body_idle: Duration,
    /// Longest wait for the agent's answer once the request body was sent.
    pub answer: Duration,
}

impl RelayTimeouts {
    pub fn of(config: &crate::config::ApiConfig) -> Self {
        Self { body_idle: config.relay_body_idle_timeout, answer: config.relay_answer_timeout }
    }
}

/// Where and how to reach one agent.
#[derive(Clone)]
pub struct AgentTarget {
    pub base: url::Url,
    pub token: String,
    pub vmid: u32,
}

impl std::fmt::Debug for AgentTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTarget").field("base", &self.base.as_str()).field("vmid", &self.vmid).finish()
    }
}

/// Relays one HTTP request to `route` on the agent. `prefix` is where the agent's paths live in
/// the API (`/api/servers/<id>`), so `Location` headers the agent sends point back here.
#[allow(clippy::too_many_arguments)]
pub async fn http(
    client: &reqwest::Client,
    timeouts: RelayTimeouts,
    target: &AgentTarget,
    method: Method,
    route: &AgentRoute,
    prefix: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let url = route.url(&target.base).map_err(|e| {
        tracing::error!(vmid = target.vmid, error = %e, "relayed route does not fit the agent's address");
        ApiError::bad_gateway("the server's agent address is unusable")
    })?;
    let upload_patch = method == Method::PATCH && route.is_upload();
    let mut req = client.request(method, url.clone()).bearer_auth(&target.token).header("x-forwarded-prefix", prefix);
    for name in FORWARD_REQUEST {
        if let Some(v) = headers.get(*name) {
            req = req.header(*name, v);
        }
    }
    let declared = headers.get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let body = SharedBody::new(body, timeouts.body_idle);
    let mut sent = body.sent.subscribe();
    let answer_overdue = async move {
        let _ = sent.wait_for(|sent| *sent).await;
        tokio::time::sleep(timeouts.answer).await;
    };
    let outcome = tokio::select! {
        r = req.body(reqwest::Body::wrap_stream(body.stream())).send() => r.map_err(|e| (e.is_timeout(), e.to_string())),
        () = answer_overdue => Err((true, "no answer after the body was sent".to_owned())),
    };
    let resp = match outcome {
        Ok(resp) => resp,
        Err((timed_out, e)) => {
            tracing::warn!(vmid = target.vmid, error = %e, "agent request failed");
            // An agent refusing an upload chunk (wrong offset, busy) answers before reading the
            // body and closes, and the reset can take its answer with it. Where the upload
            // stands is what the client needs to resume, so it is asked for.
            if upload_patch {
                if let Some(resp) = upload_standing(client, timeouts, target, url, headers).await {
                    body.drain(declared).await;
                    return Ok(resp);
                }
            }
            return Err(if timed_out {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the server's agent did not answer in time")
            } else {
                ApiError::bad_gateway("the server's agent is unreachable")
            });
        }
    };
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::UNAUTHORIZED {
        // The agent refused the API's own token: a platform fault, not the user's.
        tracing::error!(vmid = target.vmid, "agent refused the API's token");
        return Err(ApiError::bad_gateway("the server's agent refused the control plane"));
    }
    if status.is_client_error() || status.is_server_error() {
        // A refusal may come before the agent read the body; the client is still sending it.
        body.drain(declared).await;
    }
    let mut out = Response::builder().status(status);
    for name in FORWARD_RESPONSE {
        if let Some(v) = resp.headers().get(*name) {
            if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_bytes(v.as_bytes())) {
                out = out.header(n, v);
            }
        }
    }
    let body = Body::from_stream(idle_bounded(resp.bytes_stream(), timeouts.body_idle));
    Ok(out.body(body).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
}

/// `stream`, failing once its next item takes longer than `idle`.
fn idle_bounded<S, E>(stream: S, idle: Duration) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>>
where
    S: futures::Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    futures::stream::unfold(Some(stream), move |stream| async move {
        let mut stream = stream?;
        match tokio::time::timeout(idle, stream.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
            Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
            Ok(None) => None,
            Err(_) => Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the body stalled")), None)),
        }
    })
}

/// The client's request body, read by the agent request and, when the agent answered before
/// reading all of it, drained by the relay.
struct SharedBody {
    body: Arc<tokio::sync::Mutex<BodyDataStream>>,
    /// Longest wait for the client's next bytes.
    idle: Duration,
    /// Set once the whole body went to the agent.
    sent: Arc<tokio::sync::watch::Sender<bool>>,
}

impl SharedBody {
    fn new(body: Body, idle: Duration) -> Self {
        Self {
            body: Arc::new(tokio::sync::Mutex::new(body.into_data_stream())),
            idle,
            sent: Arc::new(tokio::sync::watch::Sender::new(false)),
        }
    }

    /// The body for the agent request. It fails when the client stalls for longer than `idle`,
    /// which ends the agent's request mid-body: the agent keeps what it got and releases the
    /// upload, instead of holding it for a client that is gone.
    fn stream(&self) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let (body, sent) = (self.body.clone(), self.sent.clone());
        let chunks = futures::stream::unfold(body, move |body| {
            let sent = sent.clone();
            async move {
                let next = body.lock().await.next().await;
                if next.is_none() {
                    sent.send_replace(true);
                }
                next.map(|item| (item, body))
            }
        });
        idle_bounded(Box::pin(chunks), self.idle)
    }

    /// Reads and drops what the client still sends of a body of `declared` bytes, within bounds.
    /// A server that answers, stops reading and closes resets the connection, and the client can
    /// lose the answer with it (the upload's real offset, say).
    async fn drain(&self, declared: Option<u64>) {
        if declared.is_some_and(|n| n > DRAIN_MAX) {
            return;
        }
        let drained = async {
            let mut body = self.body.lock().await;
            let mut total = 0u64;
            // A client that stalled is not waited for again.
            while let Ok(Some(Ok(chunk))) = tokio::time::timeout(self.idle, body.next()).await {
                total += chunk.len() as u64;
                if total > DRAIN_MAX {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(DRAIN_TIME, drained).await;
    }
}

/// After a relayed tus PATCH failed in transit: a 409 with the upload's real `Upload-Offset` if
/// the agent has it somewhere else than where the client thinks (tus clients resume from there),
/// or `None` when that does not help (agent gone, or nothing was written).
async fn upload_standing(
    client: &reqwest::Client,
    timeouts: RelayTimeouts,
    target: &AgentTarget,
    url: url::Url,
    headers: &HeaderMap,
) -> Option<Response> {
    let offset_of = |h: &HeaderMap| h.get("upload-offset")?.to_str().ok()?.trim().parse::<u64>().ok();
    let asked = offset_of(headers);
    let resp = client
        .head(url)
        .bearer_auth(&target.token)
        .header("tus-resumable", TUS_VERSION)
        .timeout(timeouts.answer)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let offset = offset_of(resp.headers())?;
    if asked == Some(offset) {
        return None;
    }
    tracing::info!(vmid = target.vmid, offset, "upload chunk failed in transit; told the client where it stands");
    let mut out = ApiError::conflict(format!("the upload is at offset {offset}")).into_response();
    let h = out.headers_mut();
    h.insert("upload-offset", HeaderValue::from(offset));
    h.insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    Some(out)
}

/// Joins the browser's socket to the agent's console until either side closes. `mode` selects
/// the console (`game`, `shell`), `ticket` authenticates the API to the agent for this user and
/// vmid.
pub async fn console(browser: WebSocket, target: AgentTarget, mode: Option<&'static str>, ticket: String) {
    let mut url = target.base.clone();
    let _ = url.set_scheme(if url.scheme() == "https" { "wss" } else { "ws" });
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(["console", "stream"]);
    }
    if let Some(mode) = mode {
        url.query_pairs_mut().append_pair("mode", mode);
    }
    let mut request = match url.as_str().into_client_request() {
        Ok(r) => r,
        Err(e) => return close(browser, 1011, &format!("bad agent address: {e}")).await,
    };
    let protocols = format!("zlh-console, zlh-ticket.{ticket}");
    match HeaderValue::from_str(&protocols) {
        Ok(v) => {
            request.headers_mut().insert("sec-websocket-protocol", v);
        }
        Err(_) => return close(browser, 1011, "bad ticket").await,
    }
    let agent = match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(request)).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(e)) => {
            tracing::warn!(vmid = target.vmid, error = %e, "agent console refused");
            return close(browser, 1011, "the server's console is not available").await;
        }
        Err(_) => return close(browser, 1011, "the server's agent did not answer").await,
    };
    let (mut agent_tx, mut agent_rx) = agent.split();
    let (mut browser_tx, mut browser_rx) = browser.split();
    let up = async {
        while let Some(Ok(msg)) = browser_rx.next().await {
            let out = match msg {
                AxumMsg::Text(t) => AgentMsg::text(t.as_str()),
                AxumMsg::Binary(b) => AgentMsg::binary(b),
                AxumMsg::Ping(p) => AgentMsg::Ping(p),
                AxumMsg::Pong(p) => AgentMsg::Pong(p),
                AxumMsg::Close(_) => break,
            };
            if agent_tx.send(out).await.is_err() {
                break;
            }
        }
        let _ = agent_tx.send(AgentMsg::Close(None)).await;
    };
    let down = async {
        while let Some(Ok(msg)) = agent_rx.next().await {
            let out = match msg {
                AgentMsg::Text(t) => AxumMsg::Text(t.as_str().into()),
                AgentMsg::Binary(b) => AxumMsg::Binary(b),
                AgentMsg::Ping(p) => AxumMsg::Ping(p),
                AgentMsg::Pong(p) => AxumMsg::Pong(p),
                AgentMsg::Close(frame) => {
                    let frame = frame.map(|f| AxumClose { code: f.code.into(), reason: f.reason.as_str().into() });
                    let _ = browser_tx.send(AxumMsg::Close(frame)).await;
                    return;
                }
                AgentMsg::Frame(_) => continue,
            };
            if browser_tx.send(out).await.is_err() {
                return;
            }
        }
        let away = AxumClose { code: 1001, reason: "the server's console ended".into() };
        let _ = browser_tx.send(AxumMsg::Close(Some(away))).await;
    };
    // Whichever side ends first ends the relay.
    tokio::select! {
        _ = up => {},
        _ = down => {},
    }
}

async fn close(mut ws: WebSocket, code: u16, reason: &str) {
    let _ = ws.send(AxumMsg::Close(Some(AxumClose { code, reason: reason.into() }))).await;
}
