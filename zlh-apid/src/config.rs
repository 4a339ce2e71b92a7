//! API configuration: defaults that run the whole platform on one machine, then a TOML file,
//! then environment variables (`ZLH_API_LISTEN`, `ZLH_DATA_DIR`, `ZLH_DATABASE_URL`, …).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://…` (default: `<data_dir>/zlh.db`) or `postgres://…`.
    pub database_url: Option<String>,
    /// How long a login session lasts.
    #[serde(with = "secs")]
    pub session_ttl: Duration,
    /// Failed logins allowed per (client address, account) and per client address in
    /// `login_window`; past 3 failures each further one of an address at an account waits 1 s,
    /// doubled per failure.
    pub login_attempts: u32,
    /// Failed logins of one account, from all addresses, in `login_window` beyond which an
    /// address that already failed at it waits from its first failure on. Never a lockout: an
    /// address that has not failed there (the owner's) still signs in at once.
    pub login_account_ceiling: u32,
    #[serde(with = "secs")]
    pub login_window: Duration,
    /// Registrations allowed per client address (IPv6: per /64) in `register_window`.
    pub register_attempts: u32,
    #[serde(with = "secs")]
    pub register_window: Duration,

    // --- platform
    /// The master secret everything is derived from (≥ 32 characters); default: a random one kept
    /// in `<data_dir>/secret.key`. Env `ZLH_API_SECRET`.
    pub secret: Option<String>,
    /// Artifact store URL and the catalog's minisign public key; default: a local store under the
    /// data dir, seeded with a signed demo catalog.
    pub store: Option<String>,
    pub trusted_key: Option<PathBuf>,
    pub catalog_key: String,
    /// `auto` (the default: `oci` where it can run, else `process` with a warning), `oci`
    /// (isolated containers under runc with their own CNI network; needs root), `process`
    /// (zlh-agentd processes on this machine without isolation, for development; `local` is the
    /// same), `proxmox` or `mock`.
    pub container_host: String,
    /// The `zlh-agentd` binary for the local host (default: beside this binary, else on PATH).
    pub agent_binary: Option<PathBuf>,
    pub proxmox: Option<ProxmoxSection>,
    /// Game ports handed out, one per game server.
    pub game_ports: std::ops::RangeInclusive<u32>,
    /// Agent status polling period.
    #[serde(with = "secs")]
    pub poll_interval: Duration,
    /// Bearer token Prometheus scrapes `/metrics` with (admins' sessions work too). Env
    /// `ZLH_METRICS_TOKEN`.
    pub metrics_token: Option<String>,

    // ---- billing (src/billing) ----
    /// Payment provider: `local` (the embedded default: checkout activates the chosen plan at
    /// once and nothing is charged) or `stripe`.
    pub billing_provider: crate::billing::BillingProviderKind,
    /// Whether provisioning needs an active subscription. Unset: yes with `stripe`; no with
    /// `local`, where a user without one provisions within the basic plan.
    pub billing_require_subscription: Option<bool>,
    /// Stripe API secret key (`sk_…`); never logged.
    pub stripe_secret_key: Option<crate::billing::Secret>,
    /// Stripe webhook signing secret (`whsec_…`); without it the webhook refuses every call.
    pub stripe_webhook_secret: Option<crate::billing::Secret>,
    /// Where the Stripe REST API lives (a stand-in in tests).
    pub stripe_api_base: String,
    /// Stripe price id per plan (`[stripe_prices] basic = "price_…"`).
    pub stripe_prices: std::collections::BTreeMap<crate::billing::PlanId, String>,
    /// The portal page checkout and the billing portal return to. Stripe needs it absolute.
    pub billing_return_url: String,
    /// How long a subscription may stay past due before its servers are stopped and suspended.
    #[serde(with = "secs")]
    pub past_due_grace: Duration,
    /// How often subscriptions are checked for servers to stop: past due beyond `past_due_grace`,
    /// or ended (a stop that failed when the cancellation came in is retried then).
    #[serde(with = "secs")]
    pub billing_enforce_every: Duration,
    // --- auth ---
    // Admins are made by the operator (`zlh-apid admin grant <email>`), never by the config:
    // an e-mail named here could be registered, unverified, by anyone.
    /// Take the client address for login rate limits from `X-Forwarded-For` (its last entry, the
    /// one the nearest proxy saw). Only behind a proxy that sets it: otherwise clients choose
    /// their own address and escape the per-address limit.
    pub trust_forwarded_for: bool,
    /// The proxies in front (CIDR ranges or addresses, e.g. `["10.0.0.1/32"]`) whose
    /// `X-Forwarded-For` and `X-Real-IP` the IDE proxy passes on to code-server, appending the
    /// peer. Anyone else's are replaced by the peer's address. Env `ZLH_TRUSTED_PROXIES`
    /// (comma-separated). Default: none.
    pub trusted_proxies: Vec<String>,

    // ---- IDE (src/ide.rs) ----
    /// Hosted IDEs live at `dev-<vmid>.<ide_domain>`. Env `ZLH_IDE_DOMAIN`. The default works on
    /// one machine without DNS: browsers resolve `*.localhost` to loopback.
    pub ide_domain: String,
    /// `http` or `https` in hosted IDE URLs. Unset: `http` for `localhost`, else `https`.
    /// Env `ZLH_IDE_SCHEME`.
    pub ide_scheme: Option<String>,
    /// The port in hosted IDE URLs. Unset: the API's own port with `http`, none with `https`.
    /// Env `ZLH_IDE_PUBLIC_PORT`.
    pub ide_public_port: Option<u16>,
    /// How long an IDE session cookie lasts.
    #[serde(with = "secs")]
    pub ide_session_ttl: Duration,
    /// Session cookies without `Secure`, for plain-HTTP local use. Unset: when the scheme is
    /// `http`. Env `ZLH_IDE_INSECURE_COOKIES`.
    pub ide_insecure_cookies: Option<bool>,
    /// Largest request body through the IDE proxy, in bytes.
    pub ide_body_limit: u64,
    /// How long code-server may take to start answering a proxied request.
    #[serde(with = "secs")]
    pub ide_response_timeout: Duration,
    /// How often open IDE WebSockets re-check access (ownership, state) in the database (at least
    /// every 0.1 s).
    #[serde(with = "secs")]
    pub ide_recheck_every: Duration,
    /// How long an IDE authorisation answer from the database is reused (TOML
    /// `ide_access_cache_ms`, env `ZLH_IDE_ACCESS_CACHE_MS`; 0 asks the database on every
    /// request; at most 10 s). Changes this replica makes apply at once; others within this time.
    #[serde(rename = "ide_access_cache_ms", with = "millis")]
    pub ide_access_cache: Duration,
    /// Serve the legacy path proxy `/__ide/<vmid>/…` on the API host. Its pages share the API's
    /// origin; turn it off where the hosted IDE is reachable.
    pub ide_path_proxy: bool,

    // ---- relays (src/relay.rs) ----
    /// How long a relayed body may go without a byte, the client's request or the agent's
    /// answer (TOML `relay_body_idle_timeout_ms`, env `ZLH_RELAY_BODY_IDLE_TIMEOUT_MS`). A client
    /// that vanished mid-upload without closing is cut there, so the agent keeps what arrived and
    /// the upload resumes from it.
    #[serde(rename = "relay_body_idle_timeout_ms", with = "millis")]
    pub relay_body_idle_timeout: Duration,
    /// How long the agent may take to answer once a relayed request's body was sent (TOML
    /// `relay_answer_timeout_ms`, env `ZLH_RELAY_ANSWER_TIMEOUT_MS`). Sending the body takes as
    /// long as it takes, as long as it keeps moving.
    #[serde(rename = "relay_answer_timeout_ms", with = "millis")]
    pub relay_answer_timeout: Duration,

    // ---- connections ----
    /// `[connections]`: caps per client address and in all, request-head and idle deadlines.
    /// Env `ZLH_API_MAX_CONNECTIONS`, `ZLH_API_MAX_CONNECTIONS_PER_ADDRESS`,
    /// `ZLH_API_HEAD_TIMEOUT_MS`, `ZLH_API_IDLE_TIMEOUT_MS`.
    pub connections: zlh_core::net::ConnectionLimits,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            session_ttl: Duration::from_secs(7 * 24 * 3600),
            login_attempts: 10,
            login_account_ceiling: 100,
            login_window: Duration::from_secs(15 * 60),
            register_attempts: 20,
            register_window: Duration::from_secs(3600),
            secret: None,
            store: None,
            trusted_key: None,
            catalog_key: "catalog.json".into(),
            container_host: "auto".into(),
            agent_binary: None,
            proxmox: None,
            game_ports: 30000..=39999,
            poll_interval: Duration::from_secs(5),
            metrics_token: None,

            // ---- billing (src/billing) ----
            billing_provider: crate::billing::BillingProviderKind::Local,
            billing_require_subscription: None,
            stripe_secret_key: None,
            stripe_webhook_secret: None,
            stripe_api_base: "https://api.stripe.com".into(),
            stripe_prices: Default::default(),
            billing_return_url: "/billing".into(),
            past_due_grace: Duration::from_secs(7 * 24 * 3600),
            billing_enforce_every: Duration::from_secs(10 * 60),

            // --- auth ---
            trust_forwarded_for: false,
            trusted_proxies: Vec::new(),

            // ---- IDE (src/ide.rs) ----
            ide_domain: "localhost".into(),
            ide_scheme: None,
            ide_public_port: None,
            ide_session_ttl: Duration::from_secs(12 * 3600),
            ide_insecure_cookies: None,
            ide_body_limit: 100 * 1024 * 1024,
            ide_response_timeout: Duration::from_secs(30),
            ide_recheck_every: Duration::from_secs(10),
            ide_access_cache: Duration::from_secs(1),
            ide_path_proxy: true,

            relay_body_idle_timeout: Duration::from_secs(30),
            relay_answer_timeout: Duration::from_secs(120),

            connections: Default::default(),
        }
    }
}

/// `[proxmox]` in the config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxSection {
    pub base_url: url::Url,
    pub node: String,
    pub token_id: String,
    pub token_secret: String,
    pub game_template: u32,
    pub dev_template: u32,
    pub storage: String,
    pub bridge: String,
    /// SHA-256 fingerprint of the node's certificate (`AB:CD:…`, as Proxmox shows it): trust
    /// exactly that certificate. The way to talk to a self-signed Proxmox VE.
    #[serde(default)]
    pub tls_fingerprint: Option<zlh_core::tls::Fingerprint>,
    /// Trust any certificate: anyone on the path sees the API token. Prefer `tls_fingerprint`.
    #[serde(default)]
    pub danger_accept_invalid_certs: bool,
}

impl ProxmoxSection {
    /// The core host's config; agent tokens derive from `agent_master` on both sides.
    pub fn host_config(&self, agent_master: &[u8]) -> zlh_core::container::proxmox::ProxmoxConfig {
        let mut c = zlh_core::container::proxmox::ProxmoxConfig::new(
            self.base_url.clone(),
            &self.node,
            &self.token_id,
            &self.token_secret,
            zlh_core::container::proxmox::Templates { game: self.game_template, dev: self.dev_template },
            &self.storage,
            &self.bridge,
        );
        c.tls_fingerprint = self.tls_fingerprint;
        c.danger_accept_invalid_certs = self.danger_accept_invalid_certs;
        c.agent_token_master = Some(agent_master.to_vec());
        c
    }
}

/// Overrides from flags and the environment (clap reads both).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (default: `<data_dir>/zlh-apid.toml` when it exists).
    #[arg(long, env = "ZLH_API_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:4000).
    #[arg(long, env = "ZLH_API_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data dir: SQLite file, local store, local containers (default ./data).
    #[arg(long, env = "ZLH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// `sqlite://…` or `postgres://…` (default: SQLite in the data dir).
    #[arg(long, env = "ZLH_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Artifact store URL (default: a local store in the data dir).
    #[arg(long, env = "ZLH_STORE")]
    pub store: Option<String>,
    /// minisign public key of the catalog (with --store).
    #[arg(long, env = "ZLH_TRUSTED_KEY")]
    pub trusted_key: Option<PathBuf>,
    /// `auto` (default), `oci` (runc + CNI, needs root), `process` (no isolation), `proxmox` or `mock`.
    #[arg(long, env = "ZLH_CONTAINER_HOST")]
    pub container_host: Option<String>,
    /// The zlh-agentd binary for local containers.
    #[arg(long, env = "ZLH_AGENT_BINARY")]
    pub agent_binary: Option<PathBuf>,
}

impl ApiConfig {
    /// Defaults, then the TOML file, then flags and environment; secrets only from env or file.
    pub fn load(args: &ServeArgs) -> anyhow::Result<Self> {
        Self::load_with_env(args, |k| std::env::var(k).ok())
    }

    /// [`ApiConfig::load`] with the environment given as a lookup (tests pass their own).
    pub fn load_with_env(args: &ServeArgs, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        use anyhow::Context;
        let data_dir = args.data_dir.clone().unwrap_or_else(|| PathBuf::from("./data"));
        let file = args.config.clone().or_else(|| {
            let default = data_dir.join("zlh-apid.toml");
            default.exists().then_some(default)
        });
        let mut c: ApiConfig = match &file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                refuse_removed_keys(&text).with_context(|| format!("config {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("config {}", path.display()))?
            }
            None => ApiConfig::default(),
        };
        if let Some(v) = args.listen {
            c.listen = v;
        }
        if let Some(v) = &args.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &args.database_url {
            c.database_url = Some(v.clone());
        }
        if let Some(v) = &args.store {
            c.store = Some(v.clone());
        }
        if let Some(v) = &args.trusted_key {
            c.trusted_key = Some(v.clone());
        }
        if let Some(v) = &args.container_host {
            c.container_host = v.clone();
        }
        if let Some(v) = &args.agent_binary {
            c.agent_binary = Some(v.clone());
        }
        let env = |k: &str| env(k).filter(|v| !v.is_empty());
        if let Some(v) = env("ZLH_API_SECRET") {
            c.secret = Some(v);
        }
        if let Some(v) = env("ZLH_METRICS_TOKEN") {
            c.metrics_token = Some(v);
        }
        if let Some(v) = env("ZLH_STRIPE_SECRET_KEY") {
            c.stripe_secret_key = Some(crate::billing::Secret::new(v));
        }
        if let Some(v) = env("ZLH_STRIPE_WEBHOOK_SECRET") {
            c.stripe_webhook_secret = Some(crate::billing::Secret::new(v));
        }
        if let Some(v) = env("ZLH_IDE_DOMAIN") {
            c.ide_domain = v;
        }
        if let Some(v) = env("ZLH_IDE_SCHEME") {
            c.ide_scheme = Some(v);
        }
        if let Some(v) = env("ZLH_IDE_PUBLIC_PORT") {
            c.ide_public_port = Some(v.parse().context("ZLH_IDE_PUBLIC_PORT must be a port number")?);
        }
        if let Some(v) = env("ZLH_IDE_INSECURE_COOKIES") {
            c.ide_insecure_cookies = Some(v.parse().context("ZLH_IDE_INSECURE_COOKIES must be true or false")?);
        }
        if let Some(v) = env("ZLH_IDE_ACCESS_CACHE_MS") {
            c.ide_access_cache =
                Duration::from_millis(v.parse().context("ZLH_IDE_ACCESS_CACHE_MS must be a number of milliseconds")?);
        }
        for (var, value) in [
            ("ZLH_RELAY_BODY_IDLE_TIMEOUT_MS", &mut c.relay_body_idle_timeout),
            ("ZLH_RELAY_ANSWER_TIMEOUT_MS", &mut c.relay_answer_timeout),
        ] {
            if let Some(v) = env(var) {
                *value = Duration::from_millis(
                    v.parse().with_context(|| format!("{var} must be a number of milliseconds"))?,
                );
            }
        }
        if c.relay_body_idle_timeout.is_zero() || c.relay_answer_timeout.is_zero() {
            anyhow::bail!("relay_body_idle_timeout_ms and relay_answer_timeout_ms must be more than 0");
        }
        if let Some(v) = env("ZLH_TRUSTED_PROXIES") {
            c.trusted_proxies = v.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_owned).collect();
        }
        zlh_core::ide::forwarding::TrustedProxies::parse(&c.trusted_proxies)
            .map_err(|e| anyhow::anyhow!("trusted_proxies: {e}"))?;
        if c.ide_access_cache > MAX_IDE_ACCESS_CACHE {
            anyhow::bail!(
                "ide_access_cache_ms is at most {} (a longer memo would keep a user who lost access in)",
                MAX_IDE_ACCESS_CACHE.as_millis()
            );
        }
        c.connections.apply_env("ZLH_API_", env)?;
        if c.store.is_some() != c.trusted_key.is_some() {
            anyhow::bail!("store and trusted_key go together (ZLH_STORE, ZLH_TRUSTED_KEY)");
        }
        Ok(c)
    }

    /// Creates the data dir (owner-only: it holds the database, the secret key and signing keys)
    /// if missing; its canonical path.
    pub fn create_data_dir(&self) -> anyhow::Result<PathBuf> {
        use anyhow::Context;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.data_dir)
            .with_context(|| format!("creating the data dir {}", self.data_dir.display()))?;
        Ok(self.data_dir.canonicalize()?)
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}?mode=rwc", self.data_dir.join("zlh.db").display()))
    }
}

/// Keys that once meant something and would now be silently dangerous to ignore.
fn refuse_removed_keys(text: &str) -> anyhow::Result<()> {
    let Ok(table) = toml::from_str::<toml::Table>(text) else { return Ok(()) };
    if table.contains_key("admin_emails") {
        anyhow::bail!(
            "admin_emails no longer makes anyone an admin (an address could be registered by anyone): \
             remove it and run `zlh-apid admin grant <email>` for each operator"
        );
    }
    Ok(())
}

/// The longest `ide_access_cache_ms` accepted.
const MAX_IDE_ACCESS_CACHE: Duration = Duration::from_secs(10);

/// Durations in TOML as milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
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

    fn load(file: Option<&str>, vars: &[(&str, &str)]) -> anyhow::Result<ApiConfig> {
        let dir = tempfile::tempdir().unwrap();
        let mut args = ServeArgs { data_dir: Some(dir.path().to_owned()), ..Default::default() };
        if let Some(text) = file {
            let path = dir.path().join("zlh-apid.toml");
            std::fs::write(&path, text).unwrap();
            args.config = Some(path);
        }
        let vars: Vec<(String, String)> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        ApiConfig::load_with_env(&args, |k| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
    }

    #[test]
    fn the_ide_access_memo_is_one_second_unless_configured_and_never_over_ten() {
        assert_eq!(load(None, &[]).unwrap().ide_access_cache, Duration::from_secs(1));
        assert_eq!(load(Some("ide_access_cache_ms = 250"), &[]).unwrap().ide_access_cache, Duration::from_millis(250));
        let env = load(Some("ide_access_cache_ms = 250"), &[("ZLH_IDE_ACCESS_CACHE_MS", "0")]).unwrap();
        assert_eq!(env.ide_access_cache, Duration::ZERO, "the environment wins; 0 turns the memo off");
        let too_long = load(None, &[("ZLH_IDE_ACCESS_CACHE_MS", "60000")]).unwrap_err();
        assert!(too_long.to_string().contains("at most 10000"), "{too_long}");
        assert!(load(Some("ide_access_cache_ms = 10001"), &[]).is_err());
        assert!(load(None, &[("ZLH_IDE_ACCESS_CACHE_MS", "1s")]).is_err());
    }

    #[test]
    fn relay_timeouts_come_from_the_file_then_the_environment_and_zero_is_refused() {
        let c = load(None, &[]).unwrap();
        assert_eq!(
            (c.relay_body_idle_timeout, c.relay_answer_timeout),
            (Duration::from_secs(30), Duration::from_secs(120))
        );
        let c = load(Some("relay_body_idle_timeout_ms = 500\nrelay_answer_timeout_ms = 900\n"), &[]).unwrap();
        assert_eq!(
            (c.relay_body_idle_timeout, c.relay_answer_timeout),
            (Duration::from_millis(500), Duration::from_millis(900))
        );
        let c = load(Some("relay_body_idle_timeout_ms = 500\n"), &[("ZLH_RELAY_BODY_IDLE_TIMEOUT_MS", "300")]).unwrap();
        assert_eq!(c.relay_body_idle_timeout, Duration::from_millis(300), "the environment wins");
        assert!(load(None, &[("ZLH_RELAY_BODY_IDLE_TIMEOUT_MS", "0")]).is_err());
        assert!(load(Some("relay_answer_timeout_ms = 0\n"), &[]).is_err());
        let err = load(None, &[("ZLH_RELAY_ANSWER_TIMEOUT_MS", "2s")]).unwrap_err();
        assert!(format!("{err:#}").contains("ZLH_RELAY_ANSWER_TIMEOUT_MS"), "{err:#}");
    }

    #[test]
    fn admin_emails_is_refused_with_a_pointer_to_admin_grant() {
        let err = load(Some("admin_emails = [\"ops@example.com\"]"), &[]).unwrap_err();
        let shown = format!("{err:#}");
        assert!(shown.contains("zlh-apid admin grant"), "{shown}");
        assert!(load(Some("login_attempts = 5"), &[]).is_ok());
    }

    #[test]
    fn trusted_proxies_come_from_the_file_or_the_environment_and_bad_ones_are_refused() {
        assert!(load(None, &[]).unwrap().trusted_proxies.is_empty(), "nobody is trusted by default");
        let file = load(Some(r#"trusted_proxies = ["10.0.0.1/32", "fd00::/8"]"#), &[]).unwrap();
        assert_eq!(file.trusted_proxies, ["10.0.0.1/32", "fd00::/8"]);
        let env =
            load(Some(r#"trusted_proxies = ["10.0.0.1/32"]"#), &[("ZLH_TRUSTED_PROXIES", "10.1.0.0/16, 10.2.0.7")]);
        assert_eq!(env.unwrap().trusted_proxies, ["10.1.0.0/16", "10.2.0.7"], "the environment wins");
        let err = load(None, &[("ZLH_TRUSTED_PROXIES", "10.0.0.0/99")]).unwrap_err();
        assert!(err.to_string().contains("trusted_proxies") && err.to_string().contains("10.0.0.0/99"), "{err}");
        assert!(load(Some(r#"trusted_proxies = ["proxy.example"]"#), &[]).is_err());
    }

    #[test]
    fn connection_limits_come_from_the_file_then_the_environment_and_bad_ones_are_refused() {
        let c = load(Some("[connections]\nper_address = 64\nhead_timeout_ms = 2000\n"), &[]).unwrap();
        assert_eq!((c.connections.per_address, c.connections.head_timeout), (64, Duration::from_secs(2)));
        let c = load(Some("[connections]\nper_address = 64\n"), &[("ZLH_API_MAX_CONNECTIONS_PER_ADDRESS", "20")]);
        assert_eq!(c.unwrap().connections.per_address, 20);
        let err = load(None, &[("ZLH_API_HEAD_TIMEOUT_MS", "0")]).unwrap_err();
        assert!(err.to_string().contains("head_timeout_ms"), "{err}");
        assert!(load(Some("[connections]\nper_address = 0\n"), &[]).is_err());
    }

    const PROXMOX: &str = r#"
[proxmox]
base_url = "https://pve.example:8006/"
node = "pve"
token_id = "zlh@pve!apid"
token_secret = "secret"
game_template = 9000
dev_template = 9001
storage = "fast"
bridge = "vmbr1"
"#;

    #[test]
    fn a_proxmox_certificate_is_pinned_by_its_fingerprint_and_a_malformed_one_is_refused() {
        let fp = "AB:".repeat(31) + "CD";
        let config = load(Some(&format!("{PROXMOX}tls_fingerprint = \"{fp}\"\n")), &[]).unwrap();
        let host = config.proxmox.unwrap().host_config(&[1; 32]);
        assert_eq!(host.tls_fingerprint.unwrap().to_string(), fp);
        assert!(!host.danger_accept_invalid_certs);
        assert!(load(Some(PROXMOX), &[]).unwrap().proxmox.unwrap().tls_fingerprint.is_none());
        let err = load(Some(&format!("{PROXMOX}tls_fingerprint = \"AB:CD\"\n")), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("64 digits"), "{err:#}");
    }
}
