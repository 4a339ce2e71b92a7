//! Install progress on stderr: a progress bar on a terminal, nothing otherwise (logs carry it).

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::broadcast;
use zlh_core::runtime::{InstallProgress, InstallStep};

/// Draws the installer's progress events until the install finishes; returns the drawing task.
pub fn show(mut events: broadcast::Receiver<InstallProgress>) -> Option<tokio::task::JoinHandle<()>> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    Some(tokio::spawn(async move {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{msg:>24} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        loop {
            match events.recv().await {
                Ok(p) => {
                    bar.set_length(p.bytes_total);
                    bar.set_position(p.bytes_done);
                    bar.set_message(format!("{} {} {}", p.id, p.version, step_name(p.step)));
                    if matches!(p.step, InstallStep::Done | InstallStep::Failed) {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
        bar.finish_and_clear();
    }))
}

fn step_name(step: InstallStep) -> &'static str {
    match step {
        InstallStep::Downloading => "downloading",
        InstallStep::Verifying => "verifying",
        InstallStep::Committing => "committing",
        InstallStep::Activating => "activating",
        InstallStep::Done => "done",
        InstallStep::Failed => "failed",
    }
}
