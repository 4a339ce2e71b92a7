//! The container's console over a WebSocket: the game server's console (its output lines out,
//! typed lines to its stdin) or, in dev containers, a login shell on a real PTY.
//!
//! The HTTP side (authentication, mode choice, upgrade) is `http::console`; this module runs one
//! session once the socket is open.

use std::collections::BTreeMap;
use std::path::PathBuf;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use serde::Deserialize;

pub mod game;
pub mod pty;

#[cfg(test)]
mod tests;

/// Largest message a client may send: a generous paste, not a file upload. A larger one closes
/// the socket with 1009 and a reason.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Hard limit of the WebSocket layer, above which a connection is dropped without a close frame.
pub const MAX_WIRE_MESSAGE_BYTES: usize = 1024 * 1024;
/// Close code for a message over [`MAX_MESSAGE_BYTES`].
pub const CLOSE_TOO_BIG: u16 = 1009;

/// The shell a dev container's console runs, built by the caller from the dev user (HOME, USER,
/// LOGNAME, TERM=xterm-256color, PATH, …). The environment is exactly `env`: nothing of the
/// agent's own environment leaks into the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShellSpec {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// Switched to before the shell starts (the agent runs as root); `None` keeps the agent's.
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// A JSON control message from the client. Anything that does not parse as one is input.
/// No `Debug`: `Auth` carries a ticket.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientMessage {
    /// In-band authentication, the first message when no credential came with the upgrade.
    Auth {
        ticket: String,
    },
    Input {
        data: String,
    },
    Resize {
        cols: u16,
        rows: u16,
    },
}

impl ClientMessage {
    /// `Some` only for a JSON object that is one of the control messages.
    pub fn parse(text: &str) -> Option<Self> {
        if !text.trim_start().starts_with('{') {
            return None;
        }
        serde_json::from_str(text).ok()
    }
}

/// A close frame; the reason is cut to the 123 bytes a close frame can carry.
pub fn close_message(code: u16, reason: &str) -> Message {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame { code, reason: reason[..end].into() }))
}

/// Payload size of a data message (0 for control frames).
pub fn message_len(msg: &Message) -> usize {
    match msg {
        Message::Text(t) => t.len(),
        Message::Binary(b) => b.len(),
        _ => 0,
    }
}

/// Closes with 1009 when a client message is over [`MAX_MESSAGE_BYTES`]; `true` if it did.
pub async fn refuse_oversize(socket: &mut WebSocket, len: usize) -> bool {
    if len <= MAX_MESSAGE_BYTES {
        return false;
    }
    close(socket, CLOSE_TOO_BIG, &format!("message too big: {len} bytes, limit {MAX_MESSAGE_BYTES}")).await;
    true
}

/// Sends a close frame; the peer may already be gone, which changes nothing.
pub async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    let _ = socket.send(close_message(code, reason)).await;
}
