//! zlh-apid: the control plane. A library so other Rust services can embed it; the binary
//! (`main.rs`) only parses arguments and serves.

pub mod auth;
pub mod billing;
pub mod catalog;
pub mod config;
pub mod db;
pub mod http;
pub mod ide;
pub mod relay;
pub mod serve;
pub mod servers;
pub mod state;
