//! The OCI runtime's command line (`runc`, or `crun`, which takes the same commands): what we
//! ask of it, with its own error text in ours.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::Deserialize;
use tokio::process::Command;

use crate::container::ContainerError;

/// One runtime binary with its own state directory (`--root`), so our containers are apart from
/// any others on the machine.
#[derive(Debug, Clone)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
}

/// What `runc state` says of a container.
#[derive(Debug, Clone, Deserialize)]
pub struct RuncState {
    pub id: String,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    pub pid: Option<u32>,
}

impl Runc {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root).stdin(Stdio::null()).kill_on_drop(true);
        cmd
    }

    async fn run(&self, args: &[&str]) -> Result<Vec<u8>, ContainerError> {
        let out = self
            .command()
            .args(args)
            .output()
            .await
            .map_err(|e| ContainerError::backend(format!("running {}: {e}", self.binary.display())))?;
        if out.status.success() {
            return Ok(out.stdout);
        }
        Err(ContainerError::backend(format!(
            "{} {}: {}",
            self.binary.display(),
            args.first().copied().unwrap_or_default(),
            runc_message(&out.stderr)
        )))
    }

    /// Creates and starts the container from `bundle`, detached. The container's stdout and
    /// stderr go to `log` (it keeps them open, so no pipe of ours may be among them); runc's own
    /// errors go to `runc.log` in the bundle, where the error text is read from.
    pub async fn run_detached(&self, id: &str, bundle: &Path, log: &Path) -> Result<(), ContainerError> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let runc_log = bundle.join("runc.log");
        let _ = std::fs::remove_file(&runc_log);
        let status = Command::new(&self.binary)
            .arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&runc_log)
            .args(["run", "--detach", "--bundle"])
            .arg(bundle)
            .arg(id)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .status()
            .await
            .map_err(|e| ContainerError::backend(format!("running {}: {e}", self.binary.display())))?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read(&runc_log).unwrap_or_default();
        Err(ContainerError::backend(format!("{} run {id}: {}", self.binary.display(), runc_message(&text))))
    }

    /// The container's state, `None` when the runtime does not know it.
    pub async fn state(&self, id: &str) -> Result<Option<RuncState>, ContainerError> {
        let out = self
            .command()
            .args(["state", id])
            .output()
            .await
            .map_err(|e| ContainerError::backend(format!("running {}: {e}", self.binary.display())))?;
        if !out.status.success() {
            let message = runc_message(&out.stderr);
            if message.contains("does not exist") || message.contains("not exist") {
                return Ok(None);
            }
            return Err(ContainerError::backend(format!("{} state {id}: {message}", self.binary.display())));
        }
        serde_json::from_slice(&out.stdout).map(Some).map_err(|e| {
            ContainerError::backend(format!("{} state {id}: unreadable answer: {e}", self.binary.display()))
        })
    }

    /// Sends `signal` (`TERM`, `KILL`) to the first process, or with `all` to every process.
    pub async fn kill(&self, id: &str, signal: &str, all: bool) -> Result<(), ContainerError> {
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.extend([id, signal]);
        match self.run(&args).await {
            Ok(_) => Ok(()),
            // Already gone: what a kill wanted.
            Err(e) if e.to_string().contains("not running") || e.to_string().contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes the container (killing what is left); a missing one is fine.
    pub async fn delete(&self, id: &str) -> Result<(), ContainerError> {
        match self.run(&["delete", "--force", id]).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Every container id the runtime has in our state directory.
    pub async fn list(&self) -> Result<Vec<String>, ContainerError> {
        let out = self.run(&["list", "--format", "json"]).await?;
        // `null` when there are none.
        let states: Option<Vec<RuncState>> = serde_json::from_slice(&out)
            .map_err(|e| ContainerError::backend(format!("{} list: unreadable answer: {e}", self.binary.display())))?;
        Ok(states.unwrap_or_default().into_iter().map(|s| s.id).collect())
    }
}

/// The `msg` of runc's first fatal log line, else of its last line (`level=error msg="…"`),
/// else its whole last line: the first fatal one says what went wrong, the rest how it ended.
fn runc_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let last = text
        .lines()
        .find(|l| l.contains("level=fatal"))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))
        .unwrap_or_default();
    match last.split_once("msg=\"") {
        Some((_, rest)) => rest.trim_end().trim_end_matches('"').replace("\\\"", "\""),
        None => last.trim().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_taken_from_runcs_log_line() {
        let err = b"time=\"2026-12-04T18:26:52Z\" level=error msg=\"container does not exist\"\n";
        assert_eq!(runc_message(err), "container does not exist");
        assert_eq!(runc_message(b"plain failure\n\n"), "plain failure");
        let log = b"level=fatal msg=\"failed to open mount source /x: No such file\"\nlevel=error msg=\"can't get final child's PID\"\n";
        assert_eq!(runc_message(log), "failed to open mount source /x: No such file");
    }
}
