//! The browser never talks to a container: console, files, uploads, mods and runtimes reach the
//! agent only through these relays, after the API has checked the user owns the server.
//!
//! - HTTP: the request body streams to the agent and the agent's response streams back (constant
//!   memory, so resumable upload chunks pass through as they are). Only the headers a route needs
//!   are forwarded; the user's `Authorization` and cookies never reach the agent, which gets its
//!   own bearer token instead.
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
pub async fn http(
    client: &reqwest::Client,
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
    let body = SharedBody::new(body);
    let resp = match req.body(reqwest::Body::wrap_stream(body.stream())).send().await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::warn!(vmid = target.vmid, error = %e, "agent request failed");
            // An agent refusing an upload chunk (wrong offset, busy) answers before reading the
            // body and closes, and the reset can take its answer with it. Where the upload
            // stands is what the client needs to resume, so it is asked for.
            if upload_patch {
                if let Some(resp) = upload_standing(client, target, url, headers).await {
                    body.drain(declared).await;
                    return Ok(resp);
                }
            }
            return Err(if e.is_timeout() {
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
    let body = Body::from_stream(resp.bytes_stream());
    Ok(out.body(body).unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response()))
}

/// The client's request body, read by the agent request and, when the agent answered before
/// reading all of it, drained by the relay.
struct SharedBody(Arc<tokio::sync::Mutex<BodyDataStream>>);

impl SharedBody {
    fn new(body: Body) -> Self {
        Self(Arc::new(tokio::sync::Mutex::new(body.into_data_stream())))
    }

    /// The body for the agent request.
    fn stream(&self) -> impl futures::Stream<Item = Result<Bytes, axum::Error>> + Send + 'static {
        futures::stream::unfold(self.0.clone(), |body| async move {
            let next = body.lock().await.next().await;
            next.map(|item| (item, body))
        })
    }

    /// Reads and drops what the client still sends of a body of `declared` bytes, within bounds.
    /// A server that answers, stops reading and closes resets the connection, and the client can
    /// lose the answer with it (the upload's real offset, say).
    async fn drain(&self, declared: Option<u64>) {
        if declared.is_some_and(|n| n > DRAIN_MAX) {
            return;
        }
        let drained = async {
            let mut body = self.0.lock().await;
            let mut total = 0u64;
            while let Some(Ok(chunk)) = body.next().await {
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
    target: &AgentTarget,
    url: url::Url,
    headers: &HeaderMap,
) -> Option<Response> {
    let offset_of = |h: &HeaderMap| h.get("upload-offset")?.to_str().ok()?.trim().parse::<u64>().ok();
    let asked = offset_of(headers);
    let resp = client.head(url).bearer_auth(&target.token).header("tus-resumable", TUS_VERSION).send().await.ok()?;
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
