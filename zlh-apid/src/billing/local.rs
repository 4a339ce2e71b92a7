//! The embedded default provider: nothing is charged. Checkout activates the chosen plan at
//! once and sends the browser straight back to the billing page; the portal is that page.

use std::sync::Arc;

use async_trait::async_trait;

use crate::db::{now_ms, Db};

use super::plans::Plan;
use super::provider::{with_query, BillingCustomer, PaymentProvider, ProviderError};
use super::suspension::{activate_and_resume, ServerActions};

pub struct LocalProvider {
    db: Db,
    /// Resumes servers stopped for non-payment when their owner picks a plan again.
    actions: Arc<dyn ServerActions>,
}

impl LocalProvider {
    pub fn new(db: Db, actions: Arc<dyn ServerActions>) -> Self {
        Self { db, actions }
    }

    /// The customer id the local provider gives a user, so the portal works as with Stripe.
    pub fn customer_id(user_id: &str) -> String {
        format!("local_{user_id}")
    }
}

#[async_trait]
impl PaymentProvider for LocalProvider {
    async fn checkout(
        &self,
        customer: &BillingCustomer,
        plan: &Plan,
        return_url: &str,
    ) -> Result<String, ProviderError> {
        let customer_id = Self::customer_id(&customer.user_id);
        activate_and_resume(
            &self.db,
            &*self.actions,
            &customer.user_id,
            Some(plan.id),
            Some(&customer_id),
            None,
            now_ms(),
        )
        .await
        .map_err(|e| match e {
            super::suspension::ActivateError::Db(e) => ProviderError::Db(e),
            e => ProviderError::Unreachable(e.to_string()),
        })?;
        tracing::info!(user = %customer.user_id, plan = %plan.id, "local checkout activated the plan");
        Ok(with_query(return_url, &format!("checkout=success&plan={}", plan.id)))
    }

    async fn portal(&self, _customer_id: &str, return_url: &str) -> Result<String, ProviderError> {
        Ok(with_query(return_url, "portal=local"))
    }
}
