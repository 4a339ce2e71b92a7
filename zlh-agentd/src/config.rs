//! Agent configuration: built-in defaults, then a TOML file, then environment variables and flags
//! (the `serve` arguments, which clap fills from `ZLH_*` variables). The bearer token comes from
//! `ZLH_AGENT_TOKEN` or a `token_file`, never from a flag, so it does not show in `ps`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The shortest bearer token accepted; shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 32;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub listen: IpAddr,
    pub port: u16,
    /// Prefix of every filesystem location (`/` in a container; a temp dir in tests).
    pub root: PathBuf,
    /// This container's vmid; when set, a `/config` payload for another vmid is refused.
    pub vmid: Option<u32>,
    #[serde(skip)]
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// Artifact store URL (`file://`, `https://`, `s3://`, `r2://`).
    pub store: Option<String>,
    pub catalog_key: String,
    /// minisign public key file the catalog must be signed with.
    pub trusted_key: Option<PathBuf>,
    pub dev: DevConfig,
    pub game: GameConfig,
    pub files: FilesConfig,
    /// `[connections]`: caps per client address and in all, request-head and idle deadlines.
    /// Env `ZLH_AGENT_MAX_CONNECTIONS`, `ZLH_AGENT_MAX_CONNECTIONS_PER_ADDRESS`,
    /// `ZLH_AGENT_HEAD_TIMEOUT_MS`, `ZLH_AGENT_IDLE_TIMEOUT_MS`.
    pub connections: zlh_core::net::ConnectionLimits,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DevConfig {
    /// The user the console, code-server and workspace belong to.
    pub user: String,
    /// Create `user` when the agent runs as root and it does not exist; otherwise the agent's own
    /// user is the dev user.
    pub create_user: bool,
    /// Where code-server listens (`0.0.0.0:6000` in a container; each local container gets its own port).
    pub code_server_bind: String,
    /// The console shell and its arguments (a login shell, so the profile scripts apply).
    pub shell: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GameConfig {
    /// On agent shutdown, stop the game server gracefully instead of leaving it running for the
    /// next agent to adopt.
    pub stop_on_shutdown: bool,
    /// Run the server as this user (default: the agent's user).
    pub user: Option<String>,
    #[serde(with = "secs")]
    pub stop_command_timeout: Duration,
    #[serde(with = "secs")]
    pub stop_term_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Largest single file an upload may create.
    pub max_file_bytes: u64,
    /// Bytes the server or workspace tree may hold, open uploads included (0: no quota).
    pub quota_bytes: u64,
    /// Largest body of a one-shot `PUT /files/write`; bigger files use resumable uploads.
    pub write_body_max: u64,
    /// An upload idle this long is dropped.
    #[serde(with = "secs")]
    pub upload_ttl: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            listen: IpAddr::from([0, 0, 0, 0]),
            port: 18888,
            root: PathBuf::from("/"),
            vmid: None,
            token: None,
            token_file: None,
            store: None,
            catalog_key: "catalog.json".into(),
            trusted_key: None,
            dev: DevConfig::default(),
            game: GameConfig::default(),
            files: FilesConfig::default(),
            connections: Default::default(),
        }
    }
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            user: "dev".into(),
            create_user: true,
            code_server_bind: "0.0.0.0:6000".into(),
            shell: vec!["/bin/bash".into(), "-l".into()],
        }
    }
}

impl Default for GameConfig {
    fn default() -> Self {
        Self {
            stop_on_shutdown: false,
            user: None,
            stop_command_timeout: Duration::from_secs(60),
            stop_term_timeout: Duration::from_secs(30),
        }
    }
}

impl Default for FilesConfig {
    fn default() -> Self {
        Self {
            max_file_bytes: 8 << 30,
            quota_bytes: 0,
            write_body_max: 64 << 20,
            upload_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// Overrides from flags and the environment (clap reads both); `None` leaves the file's value.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (default: `<root>/etc/zlh/agent.toml` when it exists).
    #[arg(long, env = "ZLH_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, env = "ZLH_AGENT_LISTEN")]
    pub listen: Option<IpAddr>,
    /// Port to listen on (default 18888).
    #[arg(long, env = "ZLH_AGENT_PORT")]
    pub port: Option<u16>,
    /// Prefix of every filesystem location (default `/`).
    #[arg(long, env = "ZLH_AGENT_ROOT")]
    pub root: Option<PathBuf>,
    /// This container's vmid.
    #[arg(long, env = "ZLH_VMID")]
    pub vmid: Option<u32>,
    /// Artifact store URL.
    #[arg(long, env = "ZLH_STORE")]
    pub store: Option<String>,
    /// Key of the catalog in the store (default `catalog.json`).
    #[arg(long = "catalog", env = "ZLH_CATALOG_KEY")]
    pub catalog_key: Option<String>,
    /// minisign public key file the catalog must be signed with.
    #[arg(long, env = "ZLH_TRUSTED_KEY")]
    pub trusted_key: Option<PathBuf>,
    /// Where code-server listens (default `0.0.0.0:6000`).
    #[arg(long, env = "ZLH_CODE_SERVER_BIND")]
    pub code_server_bind: Option<String>,
    /// The dev user's name (default `dev`).
    #[arg(long, env = "ZLH_DEV_USER")]
    pub dev_user: Option<String>,
    /// Stop the game server on agent shutdown instead of leaving it for the next agent.
    #[arg(long, env = "ZLH_STOP_GAME_ON_SHUTDOWN")]
    pub stop_game_on_shutdown: Option<bool>,
}

impl AgentConfig {
    /// Defaults, then the TOML file, then `args` (flags and env), then the token; validated.
    pub fn load(args: &ServeArgs, token_env: Option<String>) -> anyhow::Result<Self> {
        let root = args.root.clone().unwrap_or_else(|| PathBuf::from("/"));
        let file = args.config.clone().or_else(|| {
            let default = root.join("etc/zlh/agent.toml");
            default.exists().then_some(default)
        });
        let mut cfg = match &file {
            Some(path) => Self::from_toml_file(path)?,
            None => Self::default(),
        };
        if let Some(v) = args.listen {
            cfg.listen = v;
        }
        if let Some(v) = args.port {
            cfg.port = v;
        }
        if let Some(v) = &args.root {
            cfg.root = v.clone();
        }
        if let Some(v) = args.vmid {
            cfg.vmid = Some(v);
        }
        if let Some(v) = &args.store {
            cfg.store = Some(v.clone());
        }
        if let Some(v) = &args.catalog_key {
            cfg.catalog_key = v.clone();
        }
        if let Some(v) = &args.trusted_key {
            cfg.trusted_key = Some(v.clone());
        }
        if let Some(v) = &args.code_server_bind {
            cfg.dev.code_server_bind = v.clone();
        }
        if let Some(v) = &args.dev_user {
            cfg.dev.user = v.clone();
        }
        if let Some(v) = args.stop_game_on_shutdown {
            cfg.game.stop_on_shutdown = v;
        }
        cfg.connections.apply_env("ZLH_AGENT_", |k| std::env::var(k).ok())?;
        cfg.token = match (token_env.filter(|t| !t.is_empty()), &cfg.token_file) {
            (Some(t), _) => Some(t),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading token_file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_toml_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))
    }

    fn validate(&self) -> anyhow::Result<()> {
        match &self.token {
            None => bail!("no agent token: set ZLH_AGENT_TOKEN or token_file (every route but /health needs it)"),
            Some(t) if t.len() < MIN_TOKEN_LEN => bail!("agent token is shorter than {MIN_TOKEN_LEN} characters"),
            Some(_) => {}
        }
        if self.store.is_none() {
            bail!("no artifact store: set ZLH_STORE or store (file:///…, https://…, s3://…, r2://…)");
        }
        if self.trusted_key.is_none() {
            bail!("no trusted catalog key: set ZLH_TRUSTED_KEY or trusted_key (a minisign public key file)");
        }
        if !self.root.is_absolute() {
            bail!("root {} must be an absolute path", self.root.display());
        }
        if self.dev.shell.is_empty() {
            bail!("dev.shell must name a program");
        }
        if self.dev.user.is_empty() || self.dev.user.contains(['/', ':', '\n']) {
            bail!("dev.user {:?} is not a valid user name", self.dev.user);
        }
        self.dev
            .code_server_bind
            .parse::<std::net::SocketAddr>()
            .with_context(|| format!("code_server_bind {:?} is not host:port", self.dev.code_server_bind))?;
        Ok(())
    }

    /// The bearer token (validated present by `load`).
    pub fn token(&self) -> &str {
        self.token.as_deref().unwrap_or_default()
    }
}

/// Durations in TOML as whole seconds.
mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Option<String> {
        Some("0123456789abcdef0123456789abcdef".into())
    }

    /// Store and key are required; the tests give them as flags would.
    fn base() -> ServeArgs {
        ServeArgs { store: Some("memory://".into()), trusted_key: Some("/k.pub".into()), ..Default::default() }
    }

    #[test]
    fn defaults_then_file_then_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "port = 19000\nvmid = 6001\n[dev]\nuser = \"coder\"\n[game]\nstop_term_timeout = 5\n")
            .unwrap();
        let args = ServeArgs { config: Some(file.clone()), ..base() };
        let cfg = AgentConfig::load(&args, token()).unwrap();
        assert_eq!((cfg.port, cfg.vmid, cfg.dev.user.as_str()), (19000, Some(6001), "coder"));
        assert_eq!(cfg.game.stop_term_timeout, Duration::from_secs(5));
        assert_eq!(cfg.catalog_key, "catalog.json");

        let args = ServeArgs { config: Some(file), port: Some(20000), ..base() };
        assert_eq!(AgentConfig::load(&args, token()).unwrap().port, 20000);
    }

    #[test]
    fn refuses_missing_or_short_token_and_unknown_keys() {
        let err = AgentConfig::load(&base(), None).unwrap_err().to_string();
        assert!(err.contains("ZLH_AGENT_TOKEN"), "{err}");
        let err = AgentConfig::load(&base(), Some("short".into())).unwrap_err().to_string();
        assert!(err.contains("shorter"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "prot = 1\n").unwrap();
        let err = AgentConfig::load(&ServeArgs { config: Some(file), ..base() }, token()).unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("token");
        std::fs::write(&tok, "abcdefghijklmnopqrstuvwxyz0123456789\n").unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, format!("token_file = {:?}\n", tok.display().to_string())).unwrap();
        let cfg = AgentConfig::load(&ServeArgs { config: Some(file), ..base() }, None).unwrap();
        assert_eq!(cfg.token(), "abcdefghijklmnopqrstuvwxyz0123456789");
    }
}
