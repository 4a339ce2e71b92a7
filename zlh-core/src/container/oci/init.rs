//! The first process of an OCI container (`zlh-agentd init -- serve …`).
//!
//! An agent restart must not end the container: the game server and code-server live on under
//! their shims, and the next agent adopts them. So the agent is not pid 1. This small init is:
//! it starts the agent, starts it again when it dies (after [`RestartBackoff`]), reaps every
//! orphan (the shims are double-forked, so they end up here), and on SIGTERM (`runc kill`) passes
//! the signal to every process in the container, waits for them up to a grace, then kills what
//! is left and exits.
//!
//! It reaps with `waitpid(-1)` itself, so it spawns with `std::process` (tokio's child reaper
//! would race it for the exit statuses).
//!
//! It binds the agent's port once, before anything else runs in the container, and hands the
//! listening socket to every agent it starts ([`LISTEN_FD_ENV`]): the port is never free, so no
//! tenant process can bind it while the agent restarts and receive the API's token.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd};

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use rustix::process::WaitOptions;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::container::local::RestartBackoff;

/// What the init runs and how long it waits for everything to stop.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The agent executable (normally the running one).
    pub program: PathBuf,
    /// Its arguments (`serve --config …`).
    pub args: Vec<OsString>,
    /// After SIGTERM, how long processes get before SIGKILL.
    pub stop_grace: Duration,
    /// The agent's address, bound here and inherited by every agent.
    pub listen: Option<SocketAddr>,
    pub restart: RestartBackoff,
}

/// Runs until SIGTERM or SIGINT, then stops everything in the container; returns the exit code.
/// Refuses to run as anything but pid 1: stopping signals every process it can see.
pub async fn run(options: InitOptions) -> std::io::Result<i32> {
    if std::process::id() != 1 {
        return Err(std::io::Error::other("init runs only as a container's first process (pid 1)"));
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut child = signal(SignalKind::child())?;
    let held = match options.listen {
        Some(addr) => {
            let listener = std::net::TcpListener::bind(addr)?;
            // Inherited across exec by the agents (and only by them: they clear it again).
            rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::empty())?;
            Some(listener)
        }
        None => None,
    };
    let mut delay: Option<Duration> = None;
    loop {
        let started = Instant::now();
        let mut command = Command::new(&options.program);
        command.args(&options.args);
        if let Some(listener) = &held {
            command.env(LISTEN_FD_ENV, listener.as_raw_fd().to_string());
        }
        let agent = match command.spawn() {
            Ok(c) => Some(c.id()),
            Err(e) => {
                warn!(program = %options.program.display(), error = %e, "cannot start the agent");
                None
            }
        };
        info!(pid = agent, "agent started");
        // Until the agent has exited (or could not start) or we are told to stop.
        let stopping = loop {
            if agent.is_none() || reap_all().contains(&agent.unwrap_or_default()) {
                break false;
            }
            tokio::select! {
                _ = child.recv() => {}
                _ = term.recv() => break true,
                _ = int.recv() => break true,
            }
        };
        if stopping {
            return Ok(stop_all(options.stop_grace, &mut child).await);
        }
        let next = options.restart.next(delay, started.elapsed());
        delay = Some(next);
        warn!(?next, "agent exited; starting it again");
        let wake = tokio::time::sleep(next);
        tokio::pin!(wake);
        loop {
            tokio::select! {
                _ = &mut wake => break,
                _ = child.recv() => { reap_all(); }
                _ = term.recv() => return Ok(stop_all(options.stop_grace, &mut child).await),
                _ = int.recv() => return Ok(stop_all(options.stop_grace, &mut child).await),
            }
        }
    }
}

/// The environment variable naming the listening socket an agent inherits from the init.
pub const LISTEN_FD_ENV: &str = "ZLH_LISTEN_FD";

/// The listening socket the init handed over, if any (and not to the agent's own children).
pub fn inherited_listener() -> std::io::Result<Option<std::net::TcpListener>> {
    let Some(fd) = std::env::var(LISTEN_FD_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else {
        return Ok(None);
    };
    // SAFETY: the init passed this descriptor for exactly this use; nothing else owns it here.
    let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
    listener.local_addr()?;
    rustix::io::fcntl_setfd(&listener, rustix::io::FdFlags::CLOEXEC)?;
    listener.set_nonblocking(true)?;
    // SAFETY: removing our own variable before any thread of ours reads the environment again.
    unsafe { std::env::remove_var(LISTEN_FD_ENV) };
    Ok(Some(listener))
}

/// Reaps every child that has exited; returns their pids.
fn reap_all() -> Vec<u32> {
    let mut reaped = Vec::new();
    while let Ok(Some((pid, _))) = rustix::process::wait(WaitOptions::NOHANG) {
        reaped.push(pid.as_raw_nonzero().get() as u32);
    }
    reaped
}

/// SIGTERM to every process in the container, SIGKILL after `grace`; returns 0.
async fn stop_all(grace: Duration, child: &mut tokio::signal::unix::Signal) -> i32 {
    info!("stopping every process in the container");
    signal_all(libc::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        reap_all();
        if !others_alive() {
            return 0;
        }
        tokio::select! {
            _ = child.recv() => {}
            _ = tokio::time::sleep_until(deadline) => break,
            // Processes that are not our children (reparented elsewhere) send no SIGCHLD: look
            // again now and then.
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    warn!(?grace, "processes still running after the grace; killing them");
    signal_all(libc::SIGKILL);
    reap_all();
    0
}

/// Sends `sig` to every process in the pid namespace but this one (kill(2) with pid -1).
fn signal_all(sig: i32) {
    // SAFETY: kill(2) takes no pointers.
    unsafe { libc::kill(-1, sig) };
}

/// Whether a process other than this one still runs in the pid namespace.
fn others_alive() -> bool {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries.flatten().any(|e| {
                e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()).is_some_and(|pid| pid != me && !zombie(pid))
            })
        })
        .unwrap_or(false)
}

fn zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}
