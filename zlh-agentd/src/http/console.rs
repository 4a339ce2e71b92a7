//! `GET /console/stream`: the console WebSocket, with its own authentication because browsers
//! cannot set headers on a WebSocket.
//!
//! A client proves itself in one of three ways:
//! 1. `Authorization: Bearer <agent token>` (the API, tools);
//! 2. a console ticket in the subprotocol list: offer `zlh-console` and `zlh-ticket.<jwt>`; the
//!    server selects `zlh-console` and never echoes the ticket;
//! 3. offer only `zlh-console`, then send `{"type":"auth","ticket":"<jwt>"}` as the first message
//!    within 10 s; failure closes the socket with code 4401.
//!
//! A ticket opens one console: the agent remembers it until it expires, and refuses it again
//! (401, or 4401 in band). A ticket claiming to live more than 60 s is refused, however signed.
//!
//! Failures of 1 and 2, and requests with no credential at all, get a 401 and no upgrade. Tickets
//! never travel in the URL (URLs end up in logs): a `ticket`/`token` query parameter is refused.
//! Neither tokens nor tickets are logged; a verified ticket is logged by its `sub` and `jti`.
//!
//! `?mode=game|shell` picks the console; without it, the game console if there is a game server,
//! else the shell. An unavailable mode is a 409 (close code 4409 after in-band authentication), and
//! at most [`MAX_SHELLS`] shells run at once (429, or 4429).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{rejection::WebSocketUpgradeRejection, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::header::{AUTHORIZATION, SEC_WEBSOCKET_PROTOCOL};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::Utc;
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use zlh_core::supervisor::Supervisor;

use super::auth::{self, AgentAuth};
use super::{ApiError, ApiResult};
use crate::console::{self, ClientMessage, ShellSpec, MAX_WIRE_MESSAGE_BYTES};

/// The subprotocol of the console; the only one the server ever selects.
pub const PROTOCOL: &str = "zlh-console";
/// Prefix of the subprotocol entry carrying a ticket.
pub const TICKET_PROTOCOL_PREFIX: &str = "zlh-ticket.";
/// Time a client has to send its in-band `auth` message.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Shells running at once, across all connections.
pub const MAX_SHELLS: usize = 8;

/// Close code for failed in-band authentication (4000 + 401, after HTTP).
const CLOSE_UNAUTHORIZED: u16 = 4401;

/// Where the console's parts come from. Each source is asked on every connection, so the agent can
/// provision a game server or learn its vmid while running.
#[derive(Clone)]
pub struct ConsoleState {
    pub auth: Arc<AgentAuth>,
    /// The container's vmid, which tickets are bound to; `None` before provisioning (tickets are
    /// then refused, the bearer token still works).
    pub vmid: Arc<dyn Fn() -> Option<u32> + Send + Sync>,
    pub game: Arc<dyn Fn() -> Option<Arc<dyn Supervisor>> + Send + Sync>,
    /// The dev user's shell; `None` where there is none (game containers).
    pub shell: Arc<dyn Fn() -> Option<ShellSpec> + Send + Sync>,
    shells: Arc<Semaphore>,
    sessions: Arc<AtomicUsize>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl ConsoleState {
    pub fn new(
        auth: Arc<AgentAuth>,
        vmid: Arc<dyn Fn() -> Option<u32> + Send + Sync>,
        game: Arc<dyn Fn() -> Option<Arc<dyn Supervisor>> + Send + Sync>,
        shell: Arc<dyn Fn() -> Option<ShellSpec> + Send + Sync>,
    ) -> Self {
        Self {
            auth,
            vmid,
            game,
            shell,
            shells: Arc::new(Semaphore::new(MAX_SHELLS)),
            sessions: Arc::new(AtomicUsize::new(0)),
            metrics: None,
        }
    }

    /// Also counts sessions in the agent's `zlh_agent_console_sessions` gauge.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Console sessions open right now (game and shell).
    #[cfg(test)]
    pub fn console_sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// `GET /console/stream`. Mount it outside `require_bearer`: it authenticates by itself.
pub fn router(state: ConsoleState) -> Router {
    Router::new().route("/console/stream", get(stream)).with_state(state)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Game,
    Shell,
}

#[derive(Deserialize)]
struct StreamQuery {
    mode: Option<Mode>,
    ticket: Option<String>,
    token: Option<String>,
    access_token: Option<String>,
}

/// How the client got in.
enum Credential {
    Bearer,
    Ticket {
        sub: String,
        jti: String,
    },
    /// Not yet: the first message must carry a ticket.
    InBand,
}

/// A session ready to run.
enum Session {
    Game(Arc<dyn Supervisor>),
    Shell(ShellSpec, OwnedSemaphorePermit),
}

async fn stream(
    State(state): State<ConsoleState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let Query(query) = match query {
        Ok(q) => q,
        Err(e) => return ApiError::bad_request(format!("invalid query: {}", e.body_text())).into_response(),
    };
    if query.ticket.is_some() || query.token.is_some() || query.access_token.is_some() {
        return ApiError::bad_request(
            "credentials are not accepted in the URL; offer the ticket as a subprotocol or send it as the first message",
        )
        .into_response();
    }
    let credential = match credential(&state, &headers) {
        Ok(c) => c,
        Err(e) => return auth::unauthorized(e),
    };
    let ws = match ws {
        Ok(ws) => {
            ws.protocols([PROTOCOL]).max_message_size(MAX_WIRE_MESSAGE_BYTES).max_frame_size(MAX_WIRE_MESSAGE_BYTES)
        }
        Err(e) => return e.into_response(),
    };
    let mode = query.mode;
    match credential {
        Credential::InBand => ws.on_upgrade(move |socket| authenticate_then_run(socket, state, mode)),
        known => {
            let session = match prepare(&state, mode) {
                Ok(s) => s,
                Err(e) => return e.into_response(),
            };
            log_open(&known, &session);
            ws.on_upgrade(move |socket| run(socket, state, session))
        }
    }
}

/// The credential that came with the upgrade request, checked.
fn credential(state: &ConsoleState, headers: &HeaderMap) -> ApiResult<Credential> {
    if headers.contains_key(AUTHORIZATION) {
        state.auth.check_bearer(headers)?;
        return Ok(Credential::Bearer);
    }
    let offered = offered_protocols(headers);
    let tickets: Vec<&str> = offered.iter().filter_map(|p| p.strip_prefix(TICKET_PROTOCOL_PREFIX)).collect();
    let speaks_console = offered.contains(&PROTOCOL);
    match tickets.as_slice() {
        [] if speaks_console => Ok(Credential::InBand),
        [] => Err(ApiError::unauthorized("missing or invalid bearer token")),
        [ticket] => {
            if !speaks_console {
                return Err(ApiError::unauthorized(format!("offer the {PROTOCOL} subprotocol with the ticket")));
            }
            let claims = check_ticket(state, ticket)?;
            Ok(Credential::Ticket { sub: claims.sub, jti: claims.jti })
        }
        _ => Err(ApiError::unauthorized("more than one console ticket offered")),
    }
}

fn check_ticket(state: &ConsoleState, ticket: &str) -> ApiResult<zlh_core::token::Claims> {
    let vmid = (state.vmid)().ok_or_else(|| ApiError::unauthorized("this agent has no container id yet"))?;
    state.auth.check_console_ticket(ticket, vmid, Utc::now())
}

/// Every `Sec-WebSocket-Protocol` entry, across repeated headers.
fn offered_protocols(headers: &HeaderMap) -> Vec<&str> {
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

/// Picks the console for `mode` and reserves a shell slot if it is one.
fn prepare(state: &ConsoleState, mode: Option<Mode>) -> ApiResult<Session> {
    let game = || (state.game)().map(Session::Game);
    let shell = || -> ApiResult<Option<Session>> {
        let Some(spec) = (state.shell)() else { return Ok(None) };
        let permit = state.shells.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, format!("too many console shells open (limit {MAX_SHELLS})"))
        })?;
        Ok(Some(Session::Shell(spec, permit)))
    };
    let session = match mode {
        Some(Mode::Game) => game(),
        Some(Mode::Shell) => shell()?,
        None => match game() {
            Some(s) => Some(s),
            None => shell()?,
        },
    };
    session.ok_or_else(|| {
        ApiError::conflict(match mode {
            Some(Mode::Game) => "no game server console in this container",
            Some(Mode::Shell) => "no shell console in this container",
            None => "no console available in this container",
        })
    })
}

fn log_open(credential: &Credential, session: &Session) {
    let mode = match session {
        Session::Game(_) => "game",
        Session::Shell(..) => "shell",
    };
    match credential {
        Credential::Bearer => tracing::info!(mode, auth = "bearer", "console opened"),
        Credential::Ticket { sub, jti } => tracing::info!(mode, auth = "ticket", %sub, %jti, "console opened"),
        Credential::InBand => {}
    }
}

/// Waits for the `auth` message, then runs the session; closes with 4401 (or 4000 + the HTTP
/// status the session would have been refused with) otherwise.
async fn authenticate_then_run(mut socket: WebSocket, state: ConsoleState, mode: Option<Mode>) {
    let ticket = match tokio::time::timeout(AUTH_TIMEOUT, first_message(&mut socket)).await {
        Ok(Some(text)) if console::refuse_oversize(&mut socket, text.len()).await => return,
        Ok(Some(text)) => match ClientMessage::parse(&text) {
            Some(ClientMessage::Auth { ticket }) => ticket,
            _ => {
                let reason = r#"expected {"type":"auth","ticket":"…"} first"#;
                return console::close(&mut socket, CLOSE_UNAUTHORIZED, reason).await;
            }
        },
        Ok(None) => return,
        Err(_) => return console::close(&mut socket, CLOSE_UNAUTHORIZED, "authentication timed out").await,
    };
    let claims = match check_ticket(&state, &ticket) {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e.message, "console ticket refused");
            // 4401, or 4429 while too many tickets are in flight to remember another.
            return console::close(&mut socket, 4000 + e.status.as_u16(), &e.message).await;
        }
    };
    let credential = Credential::Ticket { sub: claims.sub, jti: claims.jti };
    match prepare(&state, mode) {
        Ok(session) => {
            log_open(&credential, &session);
            run(socket, state, session).await
        }
        Err(e) => console::close(&mut socket, 4000 + e.status.as_u16(), &e.message).await,
    }
}

/// The first data message as text (`None` if the socket closed first). Binary counts as text if
/// it is UTF-8, so that clients sending everything as bytes still work.
async fn first_message(socket: &mut WebSocket) -> Option<String> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(text)) => return Some(text.as_str().to_owned()),
            Ok(Message::Binary(bytes)) => return Some(String::from_utf8_lossy(&bytes).into_owned()),
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) | Err(_) => return None,
        }
    }
}

async fn run(socket: WebSocket, state: ConsoleState, session: Session) {
    state.sessions.fetch_add(1, Ordering::Relaxed);
    let _open = OpenSession(state.sessions.clone());
    let _counted = state.metrics.as_ref().map(|m| m.console_session());
    match session {
        Session::Game(game) => console::game::run(socket, game).await,
        Session::Shell(spec, _permit) => console::pty::run(socket, spec).await,
    }
}

/// Counts a session down when it ends, however it ends.
struct OpenSession(Arc<AtomicUsize>);

impl Drop for OpenSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
