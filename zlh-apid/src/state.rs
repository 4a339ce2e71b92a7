//! What every route can reach: the database, the config, the keys, the container host, the agent
//! client and billing.

use std::sync::{Arc, OnceLock, Weak};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zlh_core::agent_client::AgentClient;
use zlh_core::catalog::CatalogSource;
use zlh_core::container::ContainerHost;
use zlh_core::token::TokenKey;

use crate::billing::BillingState;
use crate::config::ApiConfig;
use crate::db::Db;
use crate::servers::actions::ContainerActions;

pub struct AppState {
    pub db: Db,
    pub config: ApiConfig,
    /// Signs session tokens.
    pub session_key: TokenKey,
    /// Derives each agent's bearer token (`agent_token_for(agent_master, vmid)`).
    agent_master: Vec<u8>,
    /// Names this replica as a job lease owner.
    pub instance_id: String,
    pub host: Arc<dyn ContainerHost>,
    /// Short calls to agents (status, power, config).
    pub agents: AgentClient,
    /// Relayed requests (uploads can run long: no total timeout; the relay bounds stalled bodies
    /// and the wait for an answer).
    pub relay_http: reqwest::Client,
    pub catalog: Option<Arc<CatalogSource>>,
    pub billing: Arc<BillingState>,
    /// The IDE router, once serving (routes close at once when a server stops or goes away).
    pub ide: OnceLock<Arc<crate::ide::IdeState>>,
    /// What `/metrics` reports: API requests and dev-host (IDE) traffic.
    pub metrics: Arc<crate::http::metrics::Metrics>,
}

/// Derives a purpose-bound key from the API's one master secret.
pub fn derive(master: &[u8], purpose: &str) -> Vec<u8> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master).expect("HMAC takes keys of any length");
    mac.update(purpose.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

impl AppState {
    /// Builds the state; billing's actions on servers get a handle back to it.
    pub fn build(
        db: Db,
        config: ApiConfig,
        master_secret: &[u8],
        host: Arc<dyn ContainerHost>,
        catalog: Option<Arc<CatalogSource>>,
    ) -> anyhow::Result<Arc<Self>> {
        let actions = Arc::new(ContainerActions { app: OnceLock::new() });
        let billing = Arc::new(BillingState::from_config(&config, db.clone(), actions.clone())?);
        let session_key = TokenKey::new(&derive(master_secret, "zlh session key v1"))?;
        let relay_http = reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(5)).build()?;
        let app = Arc::new(Self {
            db,
            config,
            session_key,
            agent_master: derive(master_secret, "zlh agent master v1"),
            instance_id: crate::db::new_id(),
            host,
            agents: AgentClient::new(Default::default())?,
            relay_http,
            catalog,
            billing,
            ide: OnceLock::new(),
            metrics: Default::default(),
        });
        let _ = actions.app.set(Arc::downgrade(&app) as Weak<AppState>);
        Ok(app)
    }

    /// Tells the IDE router a server's code-server went away (closes open IDE connections).
    pub async fn ide_stopped(&self, vmid: Option<u32>) {
        if let (Some(ide), Some(vmid)) = (self.ide.get(), vmid) {
            ide.server_stopped(vmid).await;
        }
    }

    /// The bearer token of agent `vmid`.
    pub fn agent_token(&self, vmid: u32) -> String {
        zlh_core::agent_client::agent_token_for(&self.agent_master, vmid)
    }

    /// The plan a new server of `user` gets, refusing (402) what the plan does not allow.
    pub async fn plan_for(
        &self,
        user: &crate::auth::CurrentUser,
        memory_mb: u32,
    ) -> Result<&'static crate::billing::Plan, crate::http::ApiError> {
        let plan = crate::billing::admit_new_server(&self.db, &self.billing, &user.id, memory_mb, 0).await?;
        Ok(plan)
    }
}

/// A state for tests: an in-memory container host, no catalog, a fixed secret.
pub fn for_tests(db: Db, config: ApiConfig) -> Arc<AppState> {
    let host = Arc::new(zlh_core::container::mock::MockHost::default());
    AppState::build(db, config, &[7u8; 32], host, None).expect("test state")
}
