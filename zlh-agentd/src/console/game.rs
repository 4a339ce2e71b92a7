//! The game server's console: recent lines on connect, then live lines, one text message per line;
//! what the client types goes to the server's stdin, line by line.
//!
//! A client too slow for the output is told how many lines it missed and carries on: the
//! supervisor's fan-out never waits for a browser.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket};
use zlh_core::supervisor::output::OutputEvent;
use zlh_core::supervisor::Supervisor;

use super::ClientMessage;

/// Close code when the console's process supervisor goes away (1001: going away).
const GOING_AWAY: u16 = 1001;

/// Runs one game console session until either side ends it.
pub async fn run(mut socket: WebSocket, game: Arc<dyn Supervisor>) {
    let (recent, mut live) = game.subscribe_output();
    for line in recent {
        if socket.send(Message::text(line.line)).await.is_err() {
            return;
        }
    }
    loop {
        tokio::select! {
            event = live.recv() => match event {
                Some(event) => {
                    for text in event_text(&event) {
                        if socket.send(Message::text(text)).await.is_err() {
                            return;
                        }
                    }
                }
                None => {
                    super::close(&mut socket, GOING_AWAY, "console ended").await;
                    return;
                }
            },
            msg = socket.recv() => {
                let Some(Ok(msg)) = msg else { return };
                if super::refuse_oversize(&mut socket, super::message_len(&msg)).await {
                    return;
                }
                let ok = match msg {
                    Message::Text(text) => send_input(&mut socket, game.as_ref(), text.as_str()).await,
                    Message::Binary(bytes) => match std::str::from_utf8(&bytes) {
                        Ok(text) => send_input(&mut socket, game.as_ref(), text).await,
                        Err(_) => notice(&mut socket, "input is not UTF-8; ignored").await,
                    },
                    Message::Ping(_) | Message::Pong(_) => true,
                    Message::Close(_) => false,
                };
                if !ok {
                    return;
                }
            }
        }
    }
}

/// What the console shows for one output event: its lines, or a notice of how many lines were
/// skipped, as a line of its own.
pub fn event_text(event: &OutputEvent) -> Vec<String> {
    match event {
        OutputEvent::Lines(batch) => batch.iter().map(|l| l.line.to_string()).collect(),
        OutputEvent::Skipped(n) => vec![format!("[zlh] {n} lines skipped (console too slow)")],
    }
}

/// The stdin lines of one client message: `{"type":"input","data":…}` or plain text, split on
/// newlines (`\r\n` too); an empty message is one empty line (Enter).
pub fn input_lines(text: &str) -> Vec<String> {
    let data = match ClientMessage::parse(text) {
        Some(ClientMessage::Input { data }) => data,
        // Control messages other than input mean nothing to a game console.
        Some(_) => return Vec::new(),
        None => text.to_owned(),
    };
    if data.is_empty() {
        return vec![String::new()];
    }
    data.lines().map(str::to_owned).collect()
}

/// Writes the lines to stdin; a process that is not running gets a notice back, not a hangup.
/// `false` when the socket is gone.
async fn send_input(socket: &mut WebSocket, game: &dyn Supervisor, text: &str) -> bool {
    for line in input_lines(text) {
        if let Err(e) = game.send_line(&line).await {
            return notice(socket, &format!("input not delivered: {e}")).await;
        }
    }
    true
}

async fn notice(socket: &mut WebSocket, text: &str) -> bool {
    socket.send(Message::text(format!("[zlh] {text}"))).await.is_ok()
}
