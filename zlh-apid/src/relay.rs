//! The browser never talks to a container: console, files, uploads, mods and runtimes reach the
//! agent only through these relays, after the API has checked the user owns the server.
//!
//! - HTTP: the request body streams to the agent and the agent's response streams back (constant
//!   memory, so resumable upload chunks pass through as they are). Only the headers a route needs
//!   are forwarded; the user's `Authorization` and cookies never reach the agent, which gets its
//!   own bearer token instead.
//! - WebSocket: the browser's socket is joined to the agent's `/console/stream`, which the API
//!   opens with a short-lived console ticket bound to the user and the vmid.

use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{CloseFrame as AxumClose, Message as AxumMsg, WebSocket};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt, TryStreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as AgentMsg;

use crate::http::ApiError;

/// How long a console ticket for the agent lives: only long enough to open the socket.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
// Agents refuse tickets that claim to live longer.
const _: () = assert!(TICKET_TTL.as_secs() <= zlh_core::token::MAX_CONSOLE_TICKET_SECS as u64);

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

/// Relays one HTTP request to `path_and_query` on the agent. `prefix` is where the agent's paths
/// live in the API (`/api/servers/<id>`), so `Location` headers the agent sends point back here.
pub async fn http(
    client: &reqwest::Client,
    target: &AgentTarget,
    method: Method,
    path_and_query: &str,
    prefix: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let url = agent_url(&target.base, path_and_query)?;
    let mut req = client.request(method, url).bearer_auth(&target.token).header("x-forwarded-prefix", prefix);
    for name in FORWARD_REQUEST {
        if let Some(v) = headers.get(*name) {
            req = req.header(*name, v);
        }
    }
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let resp = req.body(reqwest::Body::wrap_stream(stream)).send().await.map_err(|e| {
        tracing::warn!(vmid = target.vmid, error = %e, "agent unreachable");
        if e.is_timeout() {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "the server's agent did not answer in time")
        } else {
            ApiError::bad_gateway("the server's agent is unreachable")
        }
    })?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::UNAUTHORIZED {
        // The agent refused the API's own token: a platform fault, not the user's.
        tracing::error!(vmid = target.vmid, "agent refused the API's token");
        return Err(ApiError::bad_gateway("the server's agent refused the control plane"));
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

/// `path_and_query` under the agent's base path, as the agent client joins routes: it can never
/// name another host or climb out of the route it was given (dot segments, encoded or not, are
/// refused rather than resolved).
fn agent_url(base: &url::Url, path_and_query: &str) -> Result<url::Url, ApiError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let dots = |seg: &str| matches!(seg.to_ascii_lowercase().replace("%2e", ".").as_str(), "." | "..");
    if !path.starts_with('/') || path.split('/').any(dots) {
        return Err(ApiError::bad_request("bad path: dot segments are not allowed"));
    }
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    url.set_query(query);
    url.set_fragment(None);
    Ok(url)
}

/// Joins the browser's socket to the agent's console until either side closes. `query` selects
/// the mode (`?mode=shell`), `ticket` authenticates the API to the agent for this user and vmid.
pub async fn console(browser: WebSocket, target: AgentTarget, query: String, ticket: String) {
    let mut url = target.base.clone();
    let _ = url.set_scheme(if url.scheme() == "https" { "wss" } else { "ws" });
    url.set_path(&format!("{}/console/stream", target.base.path().trim_end_matches('/')));
    url.set_query((!query.is_empty()).then_some(query.as_str()));
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
