//! The agent's HTTP surface: one sub-router per concept, composed here behind authentication.

pub mod auth;
pub mod console;
pub mod error;

pub use error::{ApiError, ApiResult};
