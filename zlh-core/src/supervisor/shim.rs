//! Reattachment: a supervised process outlives an agent restart (the containerd-shim / conmon
//! pattern). A small shim process owns the child instead of the agent: it holds the child's stdin
//! and output pipes, appends the output to a log, and serves a Unix socket. A new agent finds the
//! live shim through that socket and adopts the process (same pid, output continues, stdin
//! forwarded, real exit status) instead of starting a second copy.
//!
//! The shim is the agent binary run again (`zlh-agentd shim <state-dir>`, which calls
//! [`run_shim`]). The first copy (the launcher) starts a second copy in a new session with
//! `setsid` and exits once that one reports ready, so the shim is nobody's child in the agent's
//! process tree (the double fork, done with fork+exec so no threads are forked).
//!
//! State dir:
//! - `spec.json` — the [`LaunchPlan`], written by the agent before it launches the shim.
//! - `shim.json` — [`ShimState`] (shim pid, child pid, start time), written once the child runs.
//! - `output.log` — the child's stdout and stderr, line by line.
//! - `exit.json` — [`ExitRecord`], written when the child has ended and its output is in the log.
//! - `shim.sock` — the control socket; `shim.log` — the shim's own errors.
//!
//! Every file is written atomically. The agent removes `shim.json` and `exit.json` once it has
//! taken the exit into account, so a state dir with both means an exit nobody saw yet.
//!
//! Socket protocol: one request line per connection.
//! - `STATUS` → one JSON line: [`ShimStatus`].
//! - `OUTPUT <offset>` → the bytes of `output.log` from `offset`, then new ones as they come;
//!   the connection closes after the child has ended and all its output was sent.
//! - `STDIN` → `OK`, then every line the client sends is written to the child's stdin.
//! - `SIGNAL <number>` → the signal goes to the child's process group; `OK` or `ERR <message>`.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::net::{UnixListener, UnixStream as StdUnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{info, warn};

use super::classify::ExitInfo;
use super::output::OutputHub;
use super::process::{kill_group, pump_lines, Control, LaunchPlan, LineSplitter, ReadyMatcher, Run};
use super::SupervisorError;
use crate::atomic;

const SPEC: &str = "spec.json";
const STATE: &str = "shim.json";
const OUTPUT: &str = "output.log";
const EXIT: &str = "exit.json";
const SOCKET: &str = "shim.sock";
const SHIM_LOG: &str = "shim.log";
/// Set for the second (daemon) copy of the shim.
const STAGE_ENV: &str = "ZLH_SHIM_STAGE";
/// Always set for the shim command: the state dir (it is also the last argument).
pub const STATE_DIR_ENV: &str = "ZLH_SHIM_STATE_DIR";
const READY: &str = "ZLH-SHIM-READY";
const FAILED: &str = "ZLH-SHIM-FAILED ";
/// Longest output line the shim keeps.
const MAX_LINE: usize = 64 * 1024;
/// How much old output a newly adopting agent replays into its ring.
const REPLAY_BYTES: u64 = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How to run the shim: normally the agent binary with `shim`; the state dir is appended as the
/// last argument and also set in `ZLH_SHIM_STATE_DIR`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Where and how a supervisor keeps its process under a shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShimConfig {
    pub command: ShimCommand,
    pub state_dir: PathBuf,
}

/// `shim.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimState {
    pub shim_pid: u32,
    pub child_pid: u32,
    pub started_at: DateTime<Utc>,
}

/// `exit.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub memory_limit_hit: bool,
    pub ended_at: DateTime<Utc>,
}

impl From<ExitRecord> for ExitInfo {
    fn from(r: ExitRecord) -> Self {
        ExitInfo { code: r.code, signal: r.signal, memory_limit_hit: r.memory_limit_hit }
    }
}

/// The answer to `STATUS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimStatus {
    #[serde(flatten)]
    pub state: ShimState,
    pub exit: Option<ExitRecord>,
}

// ---------------------------------------------------------------------------------------------
// The shim process.

/// The shim's entry point: `zlh-agentd shim <state-dir>` calls this. Never returns.
pub fn run_shim(state_dir: &Path) -> ! {
    let daemon = std::env::var_os(STAGE_ENV).is_some_and(|v| v == "daemon");
    let result = if daemon { run_daemon(state_dir) } else { run_launcher(state_dir) };
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            if daemon {
                println!("{FAILED}{e}");
            }
            eprintln!("shim: {e}");
            std::process::exit(1)
        }
    }
}

/// First copy: start the daemon copy in its own session and wait until it runs the child.
fn run_launcher(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let log = OpenOptions::new().create(true).append(true).open(dir.join(SHIM_LOG))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(std::env::args_os().skip(1))
        .env(STAGE_ENV, "daemon")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe { cmd.pre_exec(|| rustix::process::setsid().map(drop).map_err(io::Error::from)) };
    let mut child = cmd.spawn()?;
    let out = BufReader::new(child.stdout.take().expect("piped"));
    for line in out.lines() {
        let line = line?;
        if line == READY {
            return Ok(());
        }
        if let Some(msg) = line.strip_prefix(FAILED) {
            let _ = child.wait();
            return Err(io::Error::other(msg.to_string()));
        }
    }
    let _ = child.wait();
    Err(io::Error::other("shim ended before it was ready"))
}

/// What the daemon's threads share.
struct Daemon {
    dir: PathBuf,
    state: ShimState,
    log: Mutex<File>,
    progress: Mutex<Progress>,
    changed: Condvar,
    stdin: Mutex<Option<ChildStdin>>,
    streams: AtomicUsize,
}

#[derive(Default)]
struct Progress {
    /// Bytes in `output.log`.
    len: u64,
    tail: VecDeque<String>,
    exit: Option<ExitRecord>,
}

/// Second copy: run the child, record its output and exit, serve the socket.
fn run_daemon(dir: &Path) -> io::Result<()> {
    let spec = dir.join(SPEC);
    let read = fs::read(&spec).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", spec.display())))?;
    let plan: LaunchPlan = serde_json::from_slice(&read)?;
    let sock = dir.join(SOCKET);
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(dir.join(EXIT));
    let listener = UnixListener::bind(&sock)?;
    let log = OpenOptions::new().create(true).write(true).truncate(true).open(dir.join(OUTPUT))?;
    let mut cmd = plan.std_command()?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let state = ShimState { shim_pid: std::process::id(), child_pid: child.id(), started_at: Utc::now() };
    atomic::write_file(&dir.join(STATE), &serde_json::to_vec(&state)?)?;
    let d = Arc::new(Daemon {
        dir: dir.to_path_buf(),
        state,
        log: Mutex::new(log),
        progress: Mutex::new(Progress::default()),
        changed: Condvar::new(),
        stdin: Mutex::new(child.stdin.take()),
        streams: AtomicUsize::new(0),
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pipes: Vec<Box<dyn Read + Send>> =
        vec![Box::new(child.stdout.take().expect("piped")), Box::new(child.stderr.take().expect("piped"))];
    for pipe in pipes {
        let (d, done) = (d.clone(), done_tx.clone());
        std::thread::spawn(move || {
            d.copy_output(pipe);
            let _ = done.send(());
        });
    }
    {
        let d = d.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let d = d.clone();
                std::thread::spawn(move || d.serve(conn));
            }
        });
    }
    println!("{READY}");
    io::stdout().flush()?;

    let status = child.wait().ok();
    let _ = kill_group(d.state.child_pid, rustix::process::Signal::KILL);
    for _ in 0..2 {
        let _ = done_rx.recv_timeout(Duration::from_secs(5));
    }
    let tail: Vec<String> = d.progress.lock().unwrap().tail.iter().cloned().collect();
    let info = plan.exit_info(status, &tail);
    let exit = ExitRecord {
        code: info.code,
        signal: info.signal,
        memory_limit_hit: info.memory_limit_hit,
        ended_at: Utc::now(),
    };
    atomic::write_file(&dir.join(EXIT), &serde_json::to_vec(&exit)?)?;
    d.progress.lock().unwrap().exit = Some(exit);
    d.changed.notify_all();
    // Let connected readers take the last output, then go.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut progress = d.progress.lock().unwrap();
    while d.streams.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
        progress = d.changed.wait_timeout(progress, Duration::from_millis(100)).unwrap().0;
    }
    drop(progress);
    let _ = fs::remove_file(&sock);
    Ok(())
}

impl Daemon {
    fn copy_output(&self, mut pipe: Box<dyn Read + Send>) {
        let mut split = LineSplitter::new(MAX_LINE);
        let mut buf = vec![0u8; 64 * 1024];
        let mut write = |line: &str| {
            let mut log = self.log.lock().unwrap();
            let mut progress = self.progress.lock().unwrap();
            if log.write_all(format!("{line}\n").as_bytes()).is_ok() {
                progress.len += line.len() as u64 + 1;
            }
            if progress.tail.len() == 64 {
                progress.tail.pop_front();
            }
            progress.tail.push_back(line.to_string());
            drop(progress);
            self.changed.notify_all();
        };
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => split.feed(&buf[..n], &mut write),
            }
        }
        split.finish(&mut write);
    }

    fn serve(&self, conn: StdUnixStream) {
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => return,
        });
        let mut conn = conn;
        let mut request = String::new();
        if reader.read_line(&mut request).is_err() {
            return;
        }
        let request = request.trim_end();
        let (verb, arg) = request.split_once(' ').unwrap_or((request, ""));
        let _ = match verb {
            "STATUS" => {
                let status = ShimStatus { state: self.state.clone(), exit: self.progress.lock().unwrap().exit };
                let mut line = serde_json::to_vec(&status).unwrap_or_default();
                line.push(b'\n');
                conn.write_all(&line)
            }
            "OUTPUT" => self.stream_output(conn, arg.parse().unwrap_or(0)),
            "STDIN" => self.forward_stdin(conn, reader),
            "SIGNAL" => {
                let sig = arg.parse().ok().and_then(rustix::process::Signal::from_named_raw);
                let reply = match sig.map(|s| kill_group(self.state.child_pid, s)) {
                    Some(Ok(())) => "OK\n".to_string(),
                    Some(Err(e)) => format!("ERR {e}\n"),
                    None => format!("ERR unknown signal {arg}\n"),
                };
                conn.write_all(reply.as_bytes())
            }
            _ => conn.write_all(b"ERR unknown request\n"),
        };
    }

    fn stream_output(&self, mut conn: StdUnixStream, offset: u64) -> io::Result<()> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        let result = (|| {
            let mut file = File::open(self.dir.join(OUTPUT))?;
            let mut pos = file.seek(SeekFrom::Start(offset))?;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let (len, ended) = {
                    let mut p = self.progress.lock().unwrap();
                    while p.len <= pos && p.exit.is_none() {
                        p = self.changed.wait_timeout(p, Duration::from_millis(500)).unwrap().0;
                    }
                    (p.len, p.exit.is_some())
                };
                while pos < len {
                    let want = ((len - pos) as usize).min(buf.len());
                    let n = file.read(&mut buf[..want])?;
                    if n == 0 {
                        break;
                    }
                    conn.write_all(&buf[..n])?;
                    pos += n as u64;
                }
                if ended && pos >= len {
                    return Ok(());
                }
            }
        })();
        self.streams.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_all();
        result
    }

    fn forward_stdin(&self, mut conn: StdUnixStream, reader: BufReader<StdUnixStream>) -> io::Result<()> {
        conn.write_all(b"OK\n")?;
        for line in reader.lines() {
            let line = line?;
            let mut stdin = self.stdin.lock().unwrap();
            let Some(w) = stdin.as_mut() else { break };
            w.write_all(format!("{line}\n").as_bytes())?;
            w.flush()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The agent side.

/// Talks to the shim of one state dir.
pub struct ShimClient {
    dir: PathBuf,
}

impl ShimClient {
    pub fn new(state_dir: &Path) -> Self {
        Self { dir: state_dir.to_path_buf() }
    }

    /// Opens a connection and sends one request line.
    async fn request(&self, line: &str) -> io::Result<AsyncBufReader<UnixStream>> {
        let mut s = UnixStream::connect(self.dir.join(SOCKET)).await?;
        s.write_all(format!("{line}\n").as_bytes()).await?;
        Ok(AsyncBufReader::new(s))
    }

    /// One reply line to one request.
    async fn call(&self, line: &str) -> io::Result<String> {
        tokio::time::timeout(REQUEST_TIMEOUT, async {
            let mut conn = self.request(line).await?;
            let mut reply = String::new();
            conn.read_line(&mut reply).await?;
            Ok(reply.trim_end().to_string())
        })
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "shim did not answer"))?
    }

    pub async fn status(&self) -> io::Result<ShimStatus> {
        let reply = self.call("STATUS").await?;
        serde_json::from_str(&reply).map_err(io::Error::other)
    }

    pub async fn signal(&self, sig: i32) -> io::Result<()> {
        match self.call(&format!("SIGNAL {sig}")).await?.as_str() {
            "OK" => Ok(()),
            other => Err(io::Error::other(other.to_string())),
        }
    }

    /// A writer whose lines reach the child's stdin.
    pub async fn stdin(&self) -> io::Result<UnixStream> {
        let mut conn = self.request("STDIN").await?;
        let mut reply = String::new();
        conn.read_line(&mut reply).await?;
        if reply.trim_end() != "OK" {
            return Err(io::Error::other(format!("shim refused stdin: {}", reply.trim_end())));
        }
        Ok(conn.into_inner())
    }

    /// Output from byte `offset` of the log, live, until the child has ended.
    pub async fn output(&self, offset: u64) -> io::Result<UnixStream> {
        Ok(self.request(&format!("OUTPUT {offset}")).await?.into_inner())
    }
}

/// What a state dir held when a supervisor looked.
pub(crate) enum Adopted {
    Running(Run),
    /// The child ended while no agent watched; its exit and how long it had run.
    EndedUnwatched(ExitInfo, Option<Instant>),
    Nothing,
}

/// Adopts the live shim of `cfg.state_dir`, if any.
pub(crate) async fn adopt(
    cfg: &ShimConfig,
    hub: Arc<OutputHub>,
    matcher: Arc<ReadyMatcher>,
    max_line: usize,
) -> Adopted {
    let dir = &cfg.state_dir;
    let client = ShimClient::new(dir);
    match client.status().await {
        Ok(status) => {
            // Replay recent output for context, from a line start.
            let len = fs::metadata(dir.join(OUTPUT)).map(|m| m.len()).unwrap_or(0);
            let offset = replay_offset(&dir.join(OUTPUT), len);
            match attach(cfg, client, &status.state, offset, hub, matcher, max_line).await {
                Ok(run) => Adopted::Running(run),
                Err(e) => {
                    warn!(dir = %dir.display(), error = %e, "live shim found but could not attach");
                    Adopted::Nothing
                }
            }
        }
        Err(_) => {
            // No shim: an exit nobody has taken into account yet?
            let state: Option<ShimState> = read_json(&dir.join(STATE));
            let exit: Option<ExitRecord> = read_json(&dir.join(EXIT));
            match (state, exit) {
                (Some(state), Some(exit)) => {
                    let log = dir.join(OUTPUT);
                    if let Ok(text) = fs::read(&log) {
                        let start = replay_offset(&log, text.len() as u64) as usize;
                        LineSplitter::new(max_line).feed(&text[start..], |l| hub.push(l));
                    }
                    consume(dir);
                    let ran = (exit.ended_at - state.started_at).to_std().unwrap_or_default();
                    info!(dir = %dir.display(), code = ?exit.code, "the process ended while no agent watched");
                    Adopted::EndedUnwatched(exit.into(), Instant::now().checked_sub(ran))
                }
                _ => Adopted::Nothing,
            }
        }
    }
}

/// Writes the plan, runs the shim command and attaches to the new shim.
pub(crate) async fn launch(
    cfg: &ShimConfig,
    plan: &LaunchPlan,
    hub: Arc<OutputHub>,
    matcher: Arc<ReadyMatcher>,
    max_line: usize,
) -> Result<Run, SupervisorError> {
    let dir = &cfg.state_dir;
    let state_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SupervisorError::State { path, source }
    };
    fs::create_dir_all(dir).map_err(state_err(dir))?;
    consume(dir);
    let spec = dir.join(SPEC);
    let json = serde_json::to_vec_pretty(plan).map_err(|e| SupervisorError::Other(e.to_string()))?;
    atomic::write_file(&spec, &json).map_err(state_err(&spec))?;
    let c = &cfg.command;
    let spawn_err = |source| SupervisorError::Spawn { command: c.program.display().to_string(), source };
    let status = tokio::process::Command::new(&c.program)
        .args(&c.args)
        .arg(dir)
        .envs(&c.env)
        .env(STATE_DIR_ENV, dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .await
        .map_err(spawn_err)?;
    if !status.success() {
        let why = fs::read_to_string(dir.join(SHIM_LOG)).unwrap_or_default();
        let why = why.lines().last().unwrap_or("no shim log").to_string();
        return Err(spawn_err(io::Error::other(format!("shim failed ({status}): {why}"))));
    }
    let client = ShimClient::new(dir);
    let status = client.status().await.map_err(state_err(&dir.join(SOCKET)))?;
    info!(dir = %dir.display(), shim = status.state.shim_pid, pid = status.state.child_pid, "process started under a shim");
    attach(cfg, client, &status.state, 0, hub, matcher, max_line).await.map_err(state_err(&dir.join(SOCKET)))
}

/// Connects stdin and the output stream of a running shim into a [`Run`].
async fn attach(
    cfg: &ShimConfig,
    client: ShimClient,
    state: &ShimState,
    offset: u64,
    hub: Arc<OutputHub>,
    matcher: Arc<ReadyMatcher>,
    max_line: usize,
) -> io::Result<Run> {
    let stdin = client.stdin().await?;
    let output = client.output(offset).await?;
    let dir = cfg.state_dir.clone();
    let (exit_tx, exit) = oneshot::channel();
    let pump = tokio::spawn(async move {
        pump_lines(output, hub, matcher, max_line).await;
        // The stream ends when the child has ended (exit.json is written first) or the shim died.
        let exit = read_json::<ExitRecord>(&dir.join(EXIT));
        if exit.is_none() {
            warn!(dir = %dir.display(), "shim went away without an exit status");
        }
        consume(&dir);
        let info = exit.map(ExitInfo::from).unwrap_or(ExitInfo { code: None, signal: None, memory_limit_hit: false });
        let _ = exit_tx.send(info);
    });
    let ran = (Utc::now() - state.started_at).to_std().unwrap_or_default();
    Ok(Run {
        pid: state.child_pid,
        started: Instant::now().checked_sub(ran).unwrap_or_else(Instant::now),
        exit,
        ready: None,
        stdin: Box::new(stdin),
        control: Control::Shim(client),
        tasks: vec![pump.abort_handle()],
    })
}

/// A byte offset about [`REPLAY_BYTES`] before `len`, at the start of a line.
fn replay_offset(log: &Path, len: u64) -> u64 {
    if len <= REPLAY_BYTES {
        return 0;
    }
    let start = len - REPLAY_BYTES;
    let Ok(mut f) = File::open(log) else { return len };
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err() || f.take(REPLAY_BYTES).read_to_end(&mut buf).is_err() {
        return len;
    }
    buf.iter().position(|b| *b == b'\n').map(|i| start + i as u64 + 1).unwrap_or(len)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Forgets a finished run: its exit has been taken into account.
fn consume(dir: &Path) {
    let _ = fs::remove_file(dir.join(EXIT));
    let _ = fs::remove_file(dir.join(STATE));
}
