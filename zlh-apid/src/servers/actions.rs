//! What billing does to a user's servers: suspension (past due, or the subscription ended) stops
//! their containers and marks them `suspended`; payment starts them again. Both are safe to
//! repeat.

use std::sync::{Arc, OnceLock, Weak};

use async_trait::async_trait;

use super::repo::{self, state};
use crate::billing::{ServerActions, Suspension};
use crate::state::AppState;

/// Holds the app weakly (set once it is built): the app holds billing, which holds this.
pub struct ContainerActions {
    pub app: OnceLock<Weak<AppState>>,
}

impl ContainerActions {
    fn app(&self) -> anyhow::Result<Arc<AppState>> {
        self.app.get().and_then(Weak::upgrade).ok_or_else(|| anyhow::anyhow!("the API is not running"))
    }
}

#[async_trait]
impl ServerActions for ContainerActions {
    async fn suspend_user_servers(&self, user_id: &str, why: Suspension) -> anyhow::Result<()> {
        let app = self.app()?;
        for s in repo::list_for_user(&app.db, user_id).await? {
            if s.state != state::RUNNING && s.state != state::SUSPENDED {
                continue;
            }
            app.ide_stopped(s.vmid).await;
            if let Some(vmid) = s.vmid {
                app.host.stop(vmid).await?;
            }
            repo::set_state(&app.db, &s.id, state::SUSPENDED, Some(why.reason())).await?;
            // Again now the row says so: an IDE request between the two may have memoised access.
            app.ide_stopped(s.vmid).await;
            tracing::info!(server = %s.id, user = user_id, "server suspended");
        }
        Ok(())
    }

    async fn resume_user_servers(&self, user_id: &str) -> anyhow::Result<()> {
        let app = self.app()?;
        for s in repo::list_for_user(&app.db, user_id).await? {
            if s.state != state::SUSPENDED {
                continue;
            }
            if let Some(vmid) = s.vmid {
                app.host.start(vmid).await?;
            }
            repo::set_state(&app.db, &s.id, state::RUNNING, None).await?;
            tracing::info!(server = %s.id, user = user_id, "server resumed");
        }
        Ok(())
    }
}
