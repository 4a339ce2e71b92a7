//! zlh-agentd: the agent inside every zlh container.
//!
//! Today it carries the operator CLI: `runtime …` installs and manages runtimes from the signed
//! catalog, `publish …` uploads artifacts and edits the catalog an operator then signs with
//! minisign. Each command prints one clear error line and exits non-zero on failure.

mod cli;

use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging(args.log_format);
    match cli::run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, outermost first.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
