//! The agent's HTTP surface: one sub-router per concept, composed here behind authentication.

pub mod error;
pub mod metrics;
pub mod mods;
pub mod runtimes;

pub use error::{ApiError, ApiResult};
