//! zlh-agentd: the agent inside every zlh container.
//!
//! `serve` runs the daemon (HTTP API on port 18888: provisioning, status, power, console, files,
//! mods, runtimes, metrics). The operator CLI: `runtime …` installs and manages runtimes from the
//! signed catalog, `publish …` uploads artifacts and edits the catalog an operator then signs with
//! minisign. Each command prints one clear error line and exits non-zero on failure.

mod agent;
mod cli;
mod config;
mod console;
mod http;
mod metrics;
mod mods;
mod paths;
mod serve;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(&args);
    match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, outermost first. Library errors already quote their
/// source in their message, so a cause whose text is already there is not repeated.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
