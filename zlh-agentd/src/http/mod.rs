//! The agent's HTTP surface: one sub-router per concept, composed here behind authentication.

pub mod error;
pub mod files;

pub use error::{ApiError, ApiResult};
