//! Command-line interface: argument parsing and dispatch. Each subcommand lives in its own module.

mod progress;
mod publish;
mod runtime;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "zlh-agentd", version, about = "zlh container agent and operator CLI")]
pub struct Cli {
    /// Log format on stderr: human-readable text, or JSON lines for Loki (default: json for
    /// `serve`, text otherwise).
    #[arg(long, global = true, value_enum, env = "ZLH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Show logs on stderr: -v info, -vv debug (commands other than `serve` log nothing
    /// otherwise; ZLH_LOG sets the filter explicitly).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon: the HTTP API on port 18888 (config: TOML file, then ZLH_* env).
    Serve(crate::config::ServeArgs),
    /// Install and manage language runtimes and addons from the signed catalog.
    Runtime(runtime::RuntimeArgs),
    /// Upload artifacts, edit the catalog and push a signed catalog (operator side).
    Publish(publish::PublishArgs),
    /// Run as an OCI container's first process: start `zlh-agentd <ARGS>` (normally `serve …`),
    /// start it again when it dies, reap orphans, and on SIGTERM stop every process in the container.
    Init {
        /// After SIGTERM, seconds the container's processes get before SIGKILL.
        #[arg(long, default_value_t = 10)]
        stop_grace_secs: u64,
        /// Bind the agent's address here and hand the socket to every agent started.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// The agent's arguments.
        #[arg(last = true, required = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Internal: keep one supervised process alive across agent restarts (started by the agent).
    #[command(hide = true)]
    Shim {
        /// The supervisor's state dir for this process.
        state_dir: PathBuf,
    },
}

/// Where artifacts and the catalog come from: one set of flags, accepted by every `runtime`
/// subcommand (global there) and by `publish push`. Commands that read the store check that it
/// is given ([`StoreArgs::url`], [`StoreArgs::trusted_key`]); the others ignore it.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// Artifact store URL: file:///srv/artifacts, https://host/base, s3://bucket?endpoint=…, r2://account/bucket.
    #[arg(long, env = "ZLH_STORE", global = true)]
    store: Option<String>,
    /// Key of the catalog in the store.
    #[arg(long = "catalog", env = "ZLH_CATALOG_KEY", default_value = "catalog.json", global = true)]
    pub catalog_key: String,
    /// minisign public key file that catalogs must be signed with.
    #[arg(long = "trusted-key", env = "ZLH_TRUSTED_KEY", global = true)]
    trusted_key: Option<PathBuf>,
}

impl StoreArgs {
    pub fn url(&self) -> anyhow::Result<&str> {
        self.store.as_deref().context("no artifact store: pass --store URL or set ZLH_STORE")
    }

    pub fn trusted_key(&self) -> anyhow::Result<&std::path::Path> {
        self.trusted_key.as_deref().context("no trusted key: pass --trusted-key FILE.pub or set ZLH_TRUSTED_KEY")
    }
}

/// The daemon logs JSON at `info` by default. Other commands print their result and at most one
/// `error:` line, so they log nothing unless asked to (`-v`, or a `ZLH_LOG` filter).
pub fn init_logging(cli: &Cli) {
    use zlh_core::logging::{self, LogFormat as Format};
    let serving = matches!(cli.command, Command::Serve(_));
    let format = match cli.log_format {
        Some(LogFormat::Json) => Format::Json,
        Some(LogFormat::Text) => Format::Text,
        None if serving => Format::Json,
        None => Format::Text,
    };
    let filter = match (serving, cli.verbose) {
        (_, 2..) => "debug",
        (true, _) | (false, 1) => "info",
        (false, 0) => "off",
    };
    logging::init(format, "zlh-agentd", filter);
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => crate::serve::run(args).await,
        Command::Runtime(args) => runtime::run(args).await,
        Command::Publish(args) => publish::run(args).await,
        Command::Shim { state_dir } => zlh_core::supervisor::shim::run_shim(&state_dir),
        Command::Init { stop_grace_secs, listen, args } => {
            let options = zlh_core::container::oci::init::InitOptions {
                program: std::env::current_exe()?,
                args,
                stop_grace: std::time::Duration::from_secs(stop_grace_secs),
                listen,
                restart: Default::default(),
            };
            let code = zlh_core::container::oci::init::run(options).await?;
            std::process::exit(code)
        }
    }
}
