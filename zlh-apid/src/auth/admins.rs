//! Who is an admin, as the operator decides it: `zlh-apid admin grant|revoke|list` on the
//! configured database. Registration never makes an admin (nobody verified the address).

use super::users::{self, Role};
use crate::db::Db;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    InvalidEmail(#[from] users::UserError),
    #[error("no account is registered with {0}: the operator registers first, then is granted admin")]
    NoSuchAccount(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// Whether the call changed anything (granting an admin again is not an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Changed,
    AlreadySo,
}

/// Makes the account registered with `email` (any case) an admin.
pub async fn grant(db: &Db, email: &str) -> Result<Change, AdminError> {
    set(db, email, Role::Admin).await
}

/// Makes the account registered with `email` a plain user again; applies to its next request.
pub async fn revoke(db: &Db, email: &str) -> Result<Change, AdminError> {
    set(db, email, Role::User).await
}

async fn set(db: &Db, email: &str, role: Role) -> Result<Change, AdminError> {
    let email = users::normalize_email(email)?;
    let user = users::find_by_identifier(db, &email).await?.ok_or_else(|| AdminError::NoSuchAccount(email.clone()))?;
    if user.role == role {
        return Ok(Change::AlreadySo);
    }
    users::set_role(db, &user.id, role).await?;
    Ok(Change::Changed)
}

/// The e-mail of every admin, sorted.
pub async fn list(db: &Db) -> Result<Vec<String>, sqlx::Error> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT email FROM users WHERE role = $1 ORDER BY email")
        .bind(Role::Admin.as_str())
        .fetch_all(db.pool())
        .await?;
    Ok(rows.into_iter().map(|(email,)| email).collect())
}
