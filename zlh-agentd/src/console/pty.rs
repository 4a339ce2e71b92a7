//! A login shell on a real PTY (`pty-process`): the shell is a session leader with the PTY as its
//! controlling terminal, runs as the dev user with only the given environment, and dies with the
//! socket.
//!
//! Wire format: PTY output goes out as binary messages, raw bytes as the terminal produced them (a
//! UTF-8 character may straddle two messages; xterm.js takes `Uint8Array` writes as they are).
//! Binary messages from the client are keystrokes, always. Text messages are keystrokes too, unless
//! they are a JSON control message: `{"type":"resize","cols":N,"rows":M}` or
//! `{"type":"input","data":"…"}`. When the shell exits the socket is closed with code 1000 and the
//! exit status as reason; when the socket goes, the shell's process group gets SIGHUP, then SIGKILL
//! if it lingers, and is reaped.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use pty_process::{OwnedReadPty, OwnedWritePty, Size};
use rustix::process::{Pid, Signal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

use super::{ClientMessage, ShellSpec};

/// Terminal size until the client says otherwise.
pub const DEFAULT_SIZE: (u16, u16) = (24, 80);
/// After SIGHUP, how long a shell may take to exit before SIGKILL.
const HANGUP_GRACE: Duration = Duration::from_secs(2);
/// After the shell exited, how long to keep forwarding output still in the PTY.
const DRAIN_LIMIT: Duration = Duration::from_millis(500);
/// Close code for a shell that could not be started (1011: internal error).
const INTERNAL_ERROR: u16 = 1011;
/// Input messages queued for the PTY before the socket stops being read.
const INPUT_QUEUE: usize = 32;

/// What goes to the PTY, in order.
enum Input {
    Bytes(Bytes),
    Resize(Size),
}

/// A running shell: the child, its process group and the PTY master.
pub struct Shell {
    child: Child,
    pgid: Option<Pid>,
    reader: OwnedReadPty,
    writer: OwnedWritePty,
}

impl Shell {
    /// Opens a PTY and starts `spec` on it, switching to `spec.uid`/`spec.gid` (supplementary
    /// groups are dropped) after handing the terminal to that user, as login does.
    pub fn spawn(spec: &ShellSpec, (rows, cols): (u16, u16)) -> io::Result<Self> {
        let (pty, pts) = pty_process::open().map_err(io::Error::other)?;
        pty.resize(Size::new(rows, cols)).map_err(io::Error::other)?;
        if spec.uid.is_some() || spec.gid.is_some() {
            rustix::fs::fchown(&pts, spec.uid.map(rustix::fs::Uid::from_raw), spec.gid.map(rustix::fs::Gid::from_raw))?;
        }
        let mut cmd = pty_process::Command::new(&spec.program)
            .args(&spec.args)
            .env_clear()
            .envs(&spec.env)
            .current_dir(&spec.cwd)
            // A last resort should this struct be dropped without `shutdown`.
            .kill_on_drop(true);
        if let Some(gid) = spec.gid {
            cmd = cmd.gid(gid);
        }
        if let Some(uid) = spec.uid {
            cmd = cmd.uid(uid);
        }
        let child = cmd.spawn(pts).map_err(|e| match e {
            pty_process::Error::Io(e) => e,
            other => io::Error::other(other),
        })?;
        // The shell is a session leader, so its pid is its process group's id.
        let pgid = child.id().and_then(|pid| Pid::from_raw(pid as i32));
        let (reader, writer) = pty.into_split();
        Ok(Self { child, pgid, reader, writer })
    }

    pub fn pid(&self) -> Option<u32> {
        self.pgid.map(|p| p.as_raw_nonzero().get() as u32)
    }
}

/// Runs a shell session for `spec` until the shell exits or the socket goes.
pub async fn run(mut socket: WebSocket, spec: ShellSpec) {
    let shell = match Shell::spawn(&spec, DEFAULT_SIZE) {
        Ok(shell) => shell,
        Err(e) => {
            tracing::error!(program = %spec.program.display(), error = %e, "cannot start console shell");
            super::close(&mut socket, INTERNAL_ERROR, &format!("cannot start shell: {e}")).await;
            return;
        }
    };
    let pid = shell.pid();
    tracing::info!(pid, "console shell started");
    let Shell { mut child, pgid, mut reader, writer } = shell;
    let group = |signal| {
        if let Some(pgid) = pgid {
            // ESRCH: the group is already gone, which is the goal.
            let _ = rustix::process::kill_process_group(pgid, signal);
        }
    };

    // Input goes through its own task, so a shell that stops reading its terminal can never stop
    // its output from being forwarded (and so never deadlock the session).
    let (input_tx, input_rx) = mpsc::channel(INPUT_QUEUE);
    let input_task = tokio::spawn(write_input(writer, input_rx));
    let mut pending: Option<Input> = None;
    let mut output_open = true;
    let mut buf = vec![0u8; 16 * 1024];

    let ended = loop {
        tokio::select! {
            status = child.wait() => break End::Exited(status),
            read = reader.read(&mut buf), if output_open => match read {
                Ok(n) if n > 0 => {
                    if socket.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                        break End::SocketGone;
                    }
                }
                // EIO: no process has the terminal open any more; the exit follows.
                _ => output_open = false,
            },
            permit = input_tx.reserve(), if pending.is_some() => match permit {
                Ok(permit) => permit.send(pending.take().expect("guarded by is_some")),
                Err(_) => pending = None,
            },
            msg = socket.recv(), if pending.is_none() => {
                let Some(Ok(msg)) = msg else { break End::SocketGone };
                if super::refuse_oversize(&mut socket, super::message_len(&msg)).await {
                    break End::SocketGone;
                }
                match msg {
                    Message::Binary(bytes) => pending = Some(Input::Bytes(bytes)),
                    Message::Text(text) => pending = Some(text_input(text.as_str())),
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Close(_) => break End::SocketGone,
                }
            }
        }
    };
    drop(input_tx);

    match ended {
        End::Exited(status) => {
            // Leftover background jobs go with the shell; then what is still in the PTY is sent.
            group(Signal::HUP);
            if output_open {
                drain(&mut reader, &mut socket, &mut buf).await;
            }
            input_task.abort();
            drop(reader);
            let reason = match &status {
                Ok(status) => describe(*status),
                Err(e) => format!("shell status unknown: {e}"),
            };
            tracing::info!(pid, %reason, "console shell exited");
            super::close(&mut socket, 1000, &reason).await;
        }
        End::SocketGone => {
            input_task.abort();
            drop(reader);
            group(Signal::HUP);
            let status = match timeout(HANGUP_GRACE, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    group(Signal::KILL);
                    child.wait().await
                }
            };
            let reason = status.map(describe).unwrap_or_else(|e| e.to_string());
            tracing::info!(pid, %reason, "console closed; shell ended");
        }
    }
}

enum End {
    Exited(io::Result<ExitStatus>),
    SocketGone,
}

/// A text message: a resize or input control message, else the text typed as is.
fn text_input(text: &str) -> Input {
    match ClientMessage::parse(text) {
        Some(ClientMessage::Resize { cols, rows }) => Input::Resize(Size::new(rows.max(1), cols.max(1))),
        Some(ClientMessage::Input { data }) => Input::Bytes(Bytes::from(data)),
        Some(ClientMessage::Auth { .. }) => Input::Bytes(Bytes::new()),
        None => Input::Bytes(Bytes::copy_from_slice(text.as_bytes())),
    }
}

async fn write_input(mut writer: OwnedWritePty, mut input: mpsc::Receiver<Input>) {
    while let Some(item) = input.recv().await {
        let result = match item {
            Input::Bytes(bytes) => writer.write_all(&bytes).await,
            Input::Resize(size) => writer.resize(size).map_err(io::Error::other),
        };
        if let Err(e) = result {
            tracing::debug!(error = %e, "console shell input stopped");
            return;
        }
    }
}

/// Forwards output still in the PTY after the shell exited, for at most [`DRAIN_LIMIT`].
async fn drain(reader: &mut OwnedReadPty, socket: &mut WebSocket, buf: &mut [u8]) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, reader.read(buf)).await {
        if n == 0 || socket.send(Message::Binary(Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
            return;
        }
    }
}

/// `exit status 0`, `killed by signal 9`: the close reason a client shows.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => "exited".to_owned(),
    }
}
