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
    /// Who is an admin, on the configured database (the same config as `serve`).
    #[command(subcommand)]
    Admin(AdminAction),
}

/// Each takes the config flags `serve` does (`--config`, `--data-dir`, `--database-url`).
#[derive(Subcommand)]
enum AdminAction {
    /// Make the account registered with this e-mail an admin.
    Grant {
        email: String,
        #[command(flatten)]
        config: zlh_apid::config::ServeArgs,
    },
    /// Make that account a plain user again (applies to its next request).
    Revoke {
        email: String,
        #[command(flatten)]
        config: zlh_apid::config::ServeArgs,
    },
    /// Print every admin's e-mail, one a line.
    List {
        #[command(flatten)]
        config: zlh_apid::config::ServeArgs,
    },
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
        Command::Admin(action) => admin(action).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn admin(action: AdminAction) -> anyhow::Result<()> {
    use anyhow::Context;
    use zlh_apid::auth::admins::{self, Change};
    let (AdminAction::Grant { config, .. } | AdminAction::Revoke { config, .. } | AdminAction::List { config }) =
        &action;
    let config = zlh_apid::config::ApiConfig::load(config)?;
    if config.database_url.is_none() {
        config.create_data_dir()?;
    }
    let db = zlh_apid::db::Db::connect(&config.database_url()).await.context("opening the database")?;
    let said = |email: &str, change: Change, now: &str| {
        let email = zlh_apid::auth::users::normalize_email(email).unwrap_or_else(|_| email.to_owned());
        match change {
            Change::Changed => println!("{email} is {now}"),
            Change::AlreadySo => println!("{email} was already {now}"),
        }
    };
    match action {
        AdminAction::Grant { email, .. } => said(&email, admins::grant(&db, &email).await?, "an admin"),
        AdminAction::Revoke { email, .. } => said(&email, admins::revoke(&db, &email).await?, "not an admin"),
        AdminAction::List { .. } => {
            for email in admins::list(&db).await? {
                println!("{email}");
            }
        }
    }
    Ok(())
}
