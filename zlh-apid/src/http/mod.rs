//! The API's HTTP surface: one sub-router per concept, composed in [`app`].

pub mod error;

pub use error::{ApiError, ApiResult};
