//! zlh-apid: the control plane daemon. `serve` runs it; with no config at all it runs the whole
//! platform on this machine (SQLite, a local artifact store, local containers).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The IDE proxy makes many small allocations per request; glibc's allocator spent about half of
// its user time there (benches/ide_proxy.rs).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "zlh-apid", version, about = "zlh control plane: users, servers, provisioning, billing")]
struct Cli {
    /// Log format on stderr: JSON lines for Loki (default) or text.
    #[arg(long, global = true, value_enum, env = "ZLH_LOG_FORMAT", default_value = "json")]
    log_format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the API (default 127.0.0.1:4000; config: TOML file, then ZLH_* env).
    Serve(zlh_apid::config::ServeArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match cli.log_format {
        Format::Text => zlh_core::logging::LogFormat::Text,
        Format::Json => zlh_core::logging::LogFormat::Json,
    };
    zlh_core::logging::init(format, "zlh-apid", "info");
    let result = match cli.command {
        Command::Serve(args) => match zlh_apid::config::ApiConfig::load(&args) {
            Ok(config) => zlh_apid::serve::run(config).await,
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
