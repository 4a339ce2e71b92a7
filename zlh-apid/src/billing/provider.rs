//! The seam to whoever takes the money: a hosted checkout page to subscribe and a portal to
//! manage payment methods, each handed to the browser as a URL. Stripe in production; the
//! local provider for the embedded default.

use async_trait::async_trait;

use super::plans::Plan;

/// Who is paying: our user, and their customer at the provider once they have one.
#[derive(Debug, Clone)]
pub struct BillingCustomer {
    pub user_id: String,
    pub email: String,
    pub customer_id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider answered with an error of its own (its message, which never holds our key).
    #[error("payment provider refused: {0}")]
    Refused(String),
    /// The provider could not be reached or answered something unreadable.
    #[error("payment provider unreachable: {0}")]
    Unreachable(String),
    /// Something the operator has to configure (a price id for the plan, a key).
    #[error("billing is not configured: {0}")]
    NotConfigured(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Our side failed after the provider's part (resuming the user's servers).
    #[error("{0}")]
    Internal(String),
}

#[async_trait]
pub trait PaymentProvider: Send + Sync {
    /// A page where `customer` subscribes to `plan`; the browser comes back to `return_url`.
    async fn checkout(
        &self,
        customer: &BillingCustomer,
        plan: &Plan,
        return_url: &str,
    ) -> Result<String, ProviderError>;

    /// A page where an existing customer manages payment methods, invoices and the plan.
    async fn portal(&self, customer_id: &str, return_url: &str) -> Result<String, ProviderError>;
}

/// `url` with `query` (already encoded) appended, whether or not it has a query yet.
pub(crate) fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}
