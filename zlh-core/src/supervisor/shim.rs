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
//! - `spec.json` — the [`LaunchPlan`] plus the [`OutputRotation`] limits (absent fields take the
//!   defaults), written by the agent before it launches the shim.
//! - `shim.json` — [`ShimState`] (shim pid, child pid, start time), written once the child runs.
//! - `output.log` — the child's stdout and stderr, line by line. When appending a line would take
//!   it past [`OutputRotation::max_bytes`] (default [`DEFAULT_OUTPUT_MAX_BYTES`]), it is renamed
//!   to `output.log.1` (`.1` becomes `.2` and so on, keeping [`OutputRotation::keep`] old files,
//!   default [`DEFAULT_OUTPUT_KEEP`]) and a new `output.log` is started, so disk use stays bounded
//!   at about `(keep + 1) * max_bytes`. Files only change at line boundaries.
//! - `output.base` — the logical offset (see below) at which the current `output.log` starts, in
//!   decimal.
//! - `exit.json` — [`ExitRecord`], written when the child has ended and its output is in the log.
//! - `shim.sock` — the control socket; `shim.log` — the shim's own errors.
//!
//! Every file but the output logs is written atomically. The agent removes `shim.json` and `exit.json` once it has
//! taken the exit into account, so a state dir with both means an exit nobody saw yet.
//!
//! Socket protocol: one request line per connection.
//! - `STATUS` → one JSON line: [`ShimStatus`].
//! - `OUTPUT <offset>` → the output from logical `offset` (bytes since the child started, across
//!   rotations; an offset past the end means the end), then new output as it comes, following
//!   the log seamlessly across rotations; the connection closes after the child has ended and
//!   all its output was sent. An offset older than the oldest byte still on disk is served from
//!   that oldest byte: the lines in between are lost (the trade-off for bounded disk use), never
//!   an error and never a duplicate. A reader that falls more than the retained files behind
//!   skips the same way, to the oldest retained line.
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
use super::process::{kill_group, pump_lines, Control, Ended, LaunchPlan, LineSplitter, ReadyMatcher, Run, StderrTail};
use super::SupervisorError;
use crate::atomic;

const SPEC: &str = "spec.json";
const STATE: &str = "shim.json";
const OUTPUT: &str = "output.log";
const OUTPUT_BASE: &str = "output.base";
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
/// Default size at which `output.log` is rotated.
pub const DEFAULT_OUTPUT_MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Default number of rotated output logs kept (`output.log.1` … `output.log.<keep>`).
pub const DEFAULT_OUTPUT_KEEP: usize = 2;

/// Size-based rotation of `output.log`, read by the shim from `spec.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRotation {
    /// `output.log` is rotated before a line would take it past this size; 0 never rotates.
    #[serde(default = "default_output_max_bytes", rename = "output_max_bytes")]
    pub max_bytes: u64,
    /// How many rotated logs are kept.
    #[serde(default = "default_output_keep", rename = "output_keep")]
    pub keep: usize,
}

impl Default for OutputRotation {
    fn default() -> Self {
        Self { max_bytes: DEFAULT_OUTPUT_MAX_BYTES, keep: DEFAULT_OUTPUT_KEEP }
    }
}

fn default_output_max_bytes() -> u64 {
    DEFAULT_OUTPUT_MAX_BYTES
}

fn default_output_keep() -> usize {
    DEFAULT_OUTPUT_KEEP
}

/// `spec.json`: the plan, plus the rotation limits (older specs without them get the defaults)
/// and how long the process is given between SIGTERM and SIGKILL, for whoever stops it without
/// its supervisor (the container host, when the agent is gone).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ShimSpec {
    #[serde(flatten)]
    plan: LaunchPlan,
    #[serde(flatten)]
    rotation: OutputRotation,
    #[serde(default)]
    stop_grace_ms: Option<u64>,
}

/// How long the process kept in `state_dir` may take to exit after SIGTERM before it is killed,
/// as its supervisor was told; `None` if its spec does not say.
pub fn stop_grace(state_dir: &Path) -> Option<Duration> {
    let spec: ShimSpec = serde_json::from_slice(&fs::read(state_dir.join(SPEC)).ok()?).ok()?;
    spec.stop_grace_ms.map(Duration::from_millis)
}

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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub memory_limit_hit: bool,
    pub ended_at: DateTime<Utc>,
    /// The child's last lines on stderr (see [`StderrTail`]).
    #[serde(default)]
    pub stderr_tail: Vec<String>,
}

impl From<ExitRecord> for Ended {
    fn from(r: ExitRecord) -> Self {
        let info = ExitInfo { code: r.code, signal: r.signal, memory_limit_hit: r.memory_limit_hit };
        Ended { info, stderr: r.stderr_tail }
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
    rotation: OutputRotation,
    log: Mutex<File>,
    progress: Mutex<Progress>,
    changed: Condvar,
    stdin: Mutex<Option<ChildStdin>>,
    streams: AtomicUsize,
    stderr: StderrTail,
}

struct Progress {
    /// Logical end of the output: bytes written since the child started.
    len: u64,
    /// Logical offsets at which the output files still on disk start, oldest first; the last one
    /// is the current `output.log` (`output.log.<n>` starts at `starts[starts.len() - 1 - n]`).
    starts: VecDeque<u64>,
    exit: Option<ExitRecord>,
}

/// Second copy: run the child, record its output and exit, serve the socket.
fn run_daemon(dir: &Path) -> io::Result<()> {
    daemon(dir, || {
        println!("{READY}");
        io::stdout().flush()
    })
}

/// The daemon's work; `ready` is called once the child runs and the socket serves.
fn daemon(dir: &Path, ready: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
    let spec = dir.join(SPEC);
    let read = fs::read(&spec).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", spec.display())))?;
    let ShimSpec { plan, rotation, .. } = serde_json::from_slice(&read)?;
    let sock = dir.join(SOCKET);
    let _ = fs::remove_file(&sock);
    let _ = fs::remove_file(dir.join(EXIT));
    let listener = UnixListener::bind(&sock)?;
    // A new run: its output starts at logical offset 0 in a fresh log.
    for entry in fs::read_dir(dir)?.flatten() {
        let name = entry.file_name();
        let rotated = name.to_str().and_then(|n| n.strip_prefix(OUTPUT)?.strip_prefix('.'));
        if rotated.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            let _ = fs::remove_file(entry.path());
        }
    }
    let log = OpenOptions::new().create(true).write(true).truncate(true).open(dir.join(OUTPUT))?;
    atomic::write_file(&dir.join(OUTPUT_BASE), b"0\n")?;
    let mut cmd = plan.std_command()?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let state = ShimState { shim_pid: std::process::id(), child_pid: child.id(), started_at: Utc::now() };
    atomic::write_file(&dir.join(STATE), &serde_json::to_vec(&state)?)?;
    let d = Arc::new(Daemon {
        dir: dir.to_path_buf(),
        state,
        rotation,
        log: Mutex::new(log),
        progress: Mutex::new(Progress { len: 0, starts: VecDeque::from([0]), exit: None }),
        changed: Condvar::new(),
        stdin: Mutex::new(child.stdin.take()),
        streams: AtomicUsize::new(0),
        stderr: StderrTail::default(),
    });
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let pipes: Vec<(Box<dyn Read + Send>, bool)> = vec![
        (Box::new(child.stdout.take().expect("piped")), false),
        (Box::new(child.stderr.take().expect("piped")), true),
    ];
    for (pipe, is_stderr) in pipes {
        let (d, done) = (d.clone(), done_tx.clone());
        std::thread::spawn(move || {
            d.copy_output(pipe, is_stderr);
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
    ready()?;

    let status = child.wait().ok();
    let _ = kill_group(d.state.child_pid, rustix::process::Signal::KILL);
    for _ in 0..2 {
        let _ = done_rx.recv_timeout(Duration::from_secs(5));
    }
    let info = plan.exit_info(status);
    plan.release_memory_limit();
    let exit = ExitRecord {
        code: info.code,
        signal: info.signal,
        memory_limit_hit: info.memory_limit_hit,
        ended_at: Utc::now(),
        stderr_tail: d.stderr.lines(),
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
    /// Appends a pipe's lines to the log; a stderr pipe's lines are kept for the exit record too.
    fn copy_output(&self, mut pipe: Box<dyn Read + Send>, is_stderr: bool) {
        let mut split = LineSplitter::new(MAX_LINE);
        let mut buf = vec![0u8; 64 * 1024];
        let mut write = |line: &str| {
            if is_stderr {
                self.stderr.push(line);
            }
            let mut log = self.log.lock().unwrap();
            let mut progress = self.progress.lock().unwrap();
            let bytes = line.len() as u64 + 1;
            if let Err(e) = self.rotate_if_full(&mut log, &mut progress, bytes) {
                eprintln!("shim: rotating {OUTPUT}: {e}");
            }
            if log.write_all(format!("{line}\n").as_bytes()).is_ok() {
                progress.len += bytes;
            }
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

    /// Starts a new `output.log` when `next` more bytes would take the current one past the
    /// maximum. Called with both locks held, so writers and readers see the switch at once.
    fn rotate_if_full(&self, log: &mut File, p: &mut Progress, next: u64) -> io::Result<()> {
        let base = *p.starts.back().expect("the current log has a start");
        let size = p.len - base;
        let max = self.rotation.max_bytes;
        if max == 0 || size == 0 || size + next <= max {
            return Ok(());
        }
        let keep = self.rotation.keep;
        let path = |n| output_path(&self.dir, n);
        // The new file first, so a failure leaves the current one in place.
        let fresh_path = self.dir.join(format!("{OUTPUT}.new"));
        let fresh = OpenOptions::new().create(true).write(true).truncate(true).open(&fresh_path)?;
        for n in (1..keep).rev() {
            match fs::rename(path(n), path(n + 1)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        if keep == 0 {
            fs::remove_file(path(0))?;
        } else {
            fs::rename(path(0), path(1))?;
        }
        fs::rename(&fresh_path, path(0))?;
        *log = fresh;
        p.starts.push_back(p.len);
        while p.starts.len() > keep + 1 {
            p.starts.pop_front();
        }
        atomic::write_file(&self.dir.join(OUTPUT_BASE), format!("{}\n", p.len).as_bytes())
    }

    /// Opens the output file holding logical offset `pos`, or the oldest one still on disk when
    /// `pos` is older; returns it positioned, with its logical start and the position served.
    fn open_at(&self, p: &Progress, pos: u64) -> io::Result<(File, u64, u64)> {
        let i = p.starts.iter().rposition(|&s| s <= pos).unwrap_or(0);
        let start = p.starts[i];
        let pos = pos.max(start);
        let mut file = File::open(output_path(&self.dir, p.starts.len() - 1 - i))?;
        file.seek(SeekFrom::Start(pos - start))?;
        Ok((file, start, pos))
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
                let status = ShimStatus { state: self.state.clone(), exit: self.progress.lock().unwrap().exit.clone() };
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
            let (mut file, mut start, mut pos) = {
                let p = self.progress.lock().unwrap();
                self.open_at(&p, offset.min(p.len))?
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // Up to where the open file can be read now, and whether that is the very end.
                let (len, ended) = {
                    let mut p = self.progress.lock().unwrap();
                    loop {
                        if p.starts.back().is_some_and(|&current| current > start) {
                            // Rotated away, so complete: finish it, then go on in the next file
                            // (or the oldest one left, if the next is gone already).
                            let end = start + file.metadata()?.len();
                            if pos < end {
                                break (end, false);
                            }
                            (file, start, pos) = self.open_at(&p, pos)?;
                            continue;
                        }
                        if p.len > pos || p.exit.is_some() {
                            break (p.len, p.exit.is_some());
                        }
                        p = self.changed.wait_timeout(p, Duration::from_millis(500)).unwrap().0;
                    }
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
#[derive(Debug, Clone)]
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

    /// Output from logical byte `offset` (bytes since the child started; an offset no longer on
    /// disk starts at the oldest byte that is), live, until the child has ended.
    pub async fn output(&self, offset: u64) -> io::Result<UnixStream> {
        Ok(self.request(&format!("OUTPUT {offset}")).await?.into_inner())
    }
}

/// What a state dir held when a supervisor looked.
pub(crate) enum Adopted {
    Running(Run),
    /// The child ended while no agent watched; its exit and how long it had run.
    EndedUnwatched(Ended, Option<Instant>),
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
            // Replay recent output for context, from a line start. The base is read first: if
            // the log rotates in between, the offset is only older (more context), never ahead.
            let base = read_base(dir);
            let len = fs::metadata(dir.join(OUTPUT)).map(|m| m.len()).unwrap_or(0);
            let offset = base + replay_offset(&dir.join(OUTPUT), len);
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
                        let mut lines = hub.line_buf();
                        LineSplitter::new(max_line).feed(&text[start..], |l| lines.push(l));
                        hub.push_batch(lines);
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

/// Writes the plan, runs the shim command and attaches to the new shim. `stop_grace` is recorded
/// for [`stop_grace`].
pub(crate) async fn launch(
    cfg: &ShimConfig,
    plan: &LaunchPlan,
    stop_grace: Duration,
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
    let stop_grace_ms = Some(u64::try_from(stop_grace.as_millis()).unwrap_or(u64::MAX));
    let spec_json = ShimSpec { plan: plan.clone(), rotation: OutputRotation::default(), stop_grace_ms };
    let json = serde_json::to_vec_pretty(&spec_json).map_err(|e| SupervisorError::Other(e.to_string()))?;
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
        pump_lines(output, hub, matcher, max_line, None).await;
        // The stream ends when the child has ended (exit.json is written first) or the shim died.
        let exit = read_json::<ExitRecord>(&dir.join(EXIT));
        if exit.is_none() {
            warn!(dir = %dir.display(), "shim went away without an exit status");
        }
        consume(&dir);
        let _ = exit_tx.send(exit.map(Ended::from).unwrap_or_default());
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

/// `output.log.<n>`: the current log for 0, else the `n`th newest rotated one.
fn output_path(dir: &Path, n: usize) -> PathBuf {
    if n == 0 {
        dir.join(OUTPUT)
    } else {
        dir.join(format!("{OUTPUT}.{n}"))
    }
}

/// The logical offset at which the current `output.log` starts.
fn read_base(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(OUTPUT_BASE)).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// Forgets a finished run: its exit has been taken into account.
fn consume(dir: &Path) {
    let _ = fs::remove_file(dir.join(EXIT));
    let _ = fs::remove_file(dir.join(STATE));
}

#[cfg(test)]
mod tests {
    use std::thread::JoinHandle;

    use super::super::process::MemoryLimit;
    use super::*;

    /// Padding so a few hundred lines fill a small log.
    const PAD: &str = "0123456789abcdef0123456789abcdef0123456789abcdef";
    const SMALL: OutputRotation = OutputRotation { max_bytes: 64 * 1024, keep: 2 };

    /// Runs the daemon in a thread (it serves the same socket as the real shim) and returns once
    /// it is ready.
    fn start(script: &str, rotation: OutputRotation) -> (tempfile::TempDir, JoinHandle<io::Result<()>>) {
        let dir = tempfile::tempdir().unwrap();
        let plan = LaunchPlan {
            command: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: BTreeMap::from([("PATH".into(), "/usr/bin:/bin".into())]),
            cwd: std::env::temp_dir(),
            uid: None,
            gid: None,
            memory: MemoryLimit::None,
        };
        let spec = serde_json::to_vec(&ShimSpec { plan, rotation, stop_grace_ms: None }).unwrap();
        atomic::write_file(&dir.path().join(SPEC), &spec).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = dir.path().to_path_buf();
        let daemon = std::thread::spawn(move || {
            daemon(&path, move || {
                let _ = tx.send(());
                Ok(())
            })
        });
        if rx.recv().is_err() {
            panic!("the daemon failed: {:?}", daemon.join().unwrap());
        }
        (dir, daemon)
    }

    fn connect(dir: &Path, request: &str) -> BufReader<StdUnixStream> {
        let mut s = StdUnixStream::connect(dir.join(SOCKET)).unwrap();
        // Only a guard against a hang; nothing waits for it to pass.
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        s.write_all(format!("{request}\n").as_bytes()).unwrap();
        BufReader::new(s)
    }

    fn stdin(dir: &Path) -> StdUnixStream {
        let mut conn = connect(dir, "STDIN");
        let mut ok = String::new();
        conn.read_line(&mut ok).unwrap();
        assert_eq!(ok, "OK\n");
        conn.into_inner()
    }

    /// The sequence number of a `<seq> <pad>` line, checking the line is whole.
    fn seq(line: &str) -> u64 {
        let (n, pad) = line.split_once(' ').unwrap_or_else(|| panic!("not a sequence line: {line:?}"));
        assert_eq!(pad, PAD, "a whole line");
        n.parse().unwrap()
    }

    /// `output.log*` files and their sizes.
    fn logs(dir: &Path) -> BTreeMap<String, u64> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(OUTPUT))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len()))
            .collect()
    }

    /// Emits lines `<from>..<to>` (the shell's `$i` runs on).
    fn emit(count: &str) -> String {
        format!("n=0; while [ $n -lt {count} ]; do echo \"$i {PAD}\"; i=$((i+1)); n=$((n+1)); done")
    }

    #[test]
    fn spec_without_rotation_fields_takes_the_defaults() {
        let plan = LaunchPlan {
            command: "/bin/true".into(),
            args: vec![],
            env: BTreeMap::new(),
            cwd: "/".into(),
            uid: None,
            gid: None,
            memory: MemoryLimit::None,
        };
        let spec: ShimSpec = serde_json::from_slice(&serde_json::to_vec(&plan).unwrap()).unwrap();
        assert_eq!((spec.plan, spec.rotation), (plan.clone(), OutputRotation::default()));
        let json = serde_json::to_vec(&ShimSpec { plan, rotation: SMALL, stop_grace_ms: None }).unwrap();
        assert_eq!(serde_json::from_slice::<ShimSpec>(&json).unwrap().rotation, SMALL);
    }

    #[test]
    fn flood_rotates_and_disk_use_stays_bounded() {
        const LINES: u64 = 20_000;
        let (dir, daemon) = start(&format!("i=0; {}", emit(&LINES.to_string())), SMALL);
        let dir = dir.path();
        // A follower from the start: it may fall behind the retained window under the flood and
        // skip, but never sees a line twice, out of order or cut.
        let mut last = None;
        for line in connect(dir, "OUTPUT 0").lines() {
            let n = seq(&line.unwrap());
            assert!(last.is_none_or(|l| n > l), "{n} after {last:?}");
            last = Some(n);
        }
        assert_eq!(last, Some(LINES - 1), "the follower reaches the end");
        daemon.join().unwrap().unwrap();

        let total: u64 = (0..LINES).map(|i| format!("{i} {PAD}\n").len() as u64).sum();
        let files = logs(dir);
        let names: Vec<&str> = files.keys().map(String::as_str).collect();
        assert_eq!(names, ["output.log", "output.log.1", "output.log.2"], "rotated, two old logs kept");
        let disk: u64 = files.values().sum();
        assert!(disk <= 3 * SMALL.max_bytes, "{disk} bytes on disk");
        assert!(files.values().all(|&len| len <= SMALL.max_bytes));
        assert_eq!(read_base(dir) + files["output.log"], total, "the base is the logical start");
        // What is retained is one contiguous stretch up to the last line.
        let kept: Vec<u64> = ["output.log.2", "output.log.1", "output.log"]
            .iter()
            .flat_map(|f| fs::read_to_string(dir.join(f)).unwrap().lines().map(seq).collect::<Vec<_>>())
            .collect();
        assert!(kept[0] > 0);
        assert_eq!(kept, (kept[0]..LINES).collect::<Vec<_>>());
    }

    #[test]
    fn follower_continues_across_rotations() {
        // Each batch (~10 KiB) is asked for once the follower has seen the previous one, so it
        // never falls behind the retained window and must see every line exactly once.
        const BATCHES: u64 = 60;
        const PER_BATCH: u64 = 200;
        let script = format!(
            "i=0; while read go; do [ \"$go\" = quit ] && exit 0; {}; echo \"batch $i\"; done",
            emit(&PER_BATCH.to_string())
        );
        let (dir, daemon) = start(&script, SMALL);
        let dir = dir.path();
        let mut input = stdin(dir);
        let mut output = connect(dir, "OUTPUT 0").lines();
        let mut seen = Vec::new();
        for _ in 0..BATCHES {
            input.write_all(b"go\n").unwrap();
            loop {
                let line = output.next().expect("output continues").unwrap();
                if line.starts_with("batch ") {
                    break;
                }
                seen.push(seq(&line));
            }
        }
        assert!(read_base(dir) > 0 && dir.join("output.log.2").exists(), "it rotated: {:?}", logs(dir));
        input.write_all(b"quit\n").unwrap();
        assert!(output.next().is_none(), "the stream ends with the child");
        assert_eq!(seen, (0..BATCHES * PER_BATCH).collect::<Vec<_>>(), "no gap, no duplicate");
        daemon.join().unwrap().unwrap();
    }

    #[test]
    fn old_offset_serves_the_oldest_retained_output() {
        const LINES: u64 = 5_000;
        let script = format!("i=0; {}; echo done; read x", emit(&LINES.to_string()));
        let (dir, daemon) = start(&script, SMALL);
        let dir = dir.path();
        let mut input = stdin(dir);
        let mut follower = connect(dir, "OUTPUT 0").lines();
        while follower.next().expect("output continues").unwrap() != "done" {}
        assert!(read_base(dir) > 0, "it rotated: {:?}", logs(dir));

        // Offset 0 and an offset inside what was rotated away both start at the oldest byte
        // still on disk, then run on to the end without a gap or a duplicate.
        let oldest = fs::read_to_string(dir.join("output.log.2")).unwrap();
        let first = seq(oldest.lines().next().unwrap());
        assert!(first > 0, "the beginning was rotated away");
        let mut readers = [connect(dir, "OUTPUT 0").lines(), connect(dir, "OUTPUT 10").lines()];
        // An offset past the end is the end: nothing more comes.
        let mut past_end = connect(dir, &format!("OUTPUT {}", u64::MAX)).lines();
        input.write_all(b"x\n").unwrap();
        for reader in &mut readers {
            let lines: Vec<String> = reader.by_ref().map(Result::unwrap).collect();
            let (last, numbered) = lines.split_last().unwrap();
            assert_eq!(last, "done");
            let numbered: Vec<u64> = numbered.iter().map(|l| seq(l)).collect();
            assert_eq!(numbered, (first..LINES).collect::<Vec<_>>());
        }
        assert!(past_end.next().is_none());
        assert!(follower.next().is_none());
        daemon.join().unwrap().unwrap();
    }
}
