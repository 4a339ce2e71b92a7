//! What every route can reach: the database, the config and the keys.

use zlh_core::token::TokenKey;

use crate::config::ApiConfig;
use crate::db::Db;

pub struct AppState {
    pub db: Db,
    pub config: ApiConfig,
    /// Signs session tokens (and, derived from the same secret, IDE tokens and agent tokens).
    pub session_key: TokenKey,
}
