//! Agent status for every server, from real reachability: the core `StatusPoller` polls all
//! agents concurrently (bounded, never overlapping itself, one hung agent costs only its own
//! timeout) and results are written in batches, one transaction per batch.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use zlh_core::agent_client::{PollResult, PollTarget, PollerConfig, StatusPoller, TargetSource};
use zlh_core::container::AgentEndpoint;

use super::repo;
use crate::state::AppState;

/// Results buffered before writes catch up; beyond it the newest wait (the poller is bounded too).
const QUEUE: usize = 20_000;
const BATCH: usize = 500;

struct Targets(Arc<AppState>);

#[async_trait]
impl TargetSource for Targets {
    async fn targets(&self) -> Vec<PollTarget> {
        let app = &self.0;
        match repo::list_with_agents(&app.db).await {
            Ok(servers) => servers
                .into_iter()
                .filter_map(|s| {
                    let vmid = s.vmid?;
                    let agent_url = url::Url::parse(s.agent_url.as_deref()?).ok()?;
                    let code_server = s.code_server_addr.as_deref().and_then(|a| a.parse().ok());
                    Some(PollTarget {
                        vmid,
                        endpoint: AgentEndpoint { agent_url, code_server },
                        token: app.agent_token(vmid),
                    })
                })
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "listing agents to poll failed");
                Vec::new()
            }
        }
    }
}

pub fn spawn(app: Arc<AppState>, interval: Duration, shutdown: CancellationToken) {
    let (tx, rx) = mpsc::channel::<PollResult>(QUEUE);
    let sink = Arc::new(move |r: PollResult| {
        let _ = tx.try_send(r);
    });
    let config = PollerConfig { interval, ..PollerConfig::default() };
    let poller = StatusPoller::new(&app.agents, config, Arc::new(Targets(app.clone())), sink);
    tokio::spawn(poller.run(shutdown));
    tokio::spawn(write_results(app, rx));
}

async fn write_results(app: Arc<AppState>, mut rx: mpsc::Receiver<PollResult>) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        if let Err(e) = write_batch(&app, &batch).await {
            tracing::warn!(error = %e, n = batch.len(), "recording agent status failed");
        }
        batch.clear();
    }
}

async fn write_batch(app: &AppState, batch: &[PollResult]) -> sqlx::Result<()> {
    let mut tx = app.db.pool().begin().await?;
    for r in batch {
        let status = r.status.as_ref().and_then(|s| serde_json::to_string(s).ok());
        if r.online {
            sqlx::query(
                "UPDATE servers SET agent_status = 'online', agent_last_seen = $1, \
                 last_status = COALESCE($2, last_status) WHERE vmid = $3 AND deleted_at IS NULL",
            )
            .bind(r.last_seen.map(|t| t.timestamp_millis()).unwrap_or_else(crate::db::now_ms))
            .bind(status)
            .bind(r.vmid as i64)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query("UPDATE servers SET agent_status = 'offline' WHERE vmid = $1 AND deleted_at IS NULL")
                .bind(r.vmid as i64)
                .execute(&mut *tx)
                .await?;
        }
    }
    tx.commit().await
}
