//! Servers: ownership, vmid and port allocation, provisioning and deletion as persisted jobs,
//! agent status polling, and what billing does to them.

pub mod actions;
pub mod alloc;
pub mod jobs;
pub mod poll;
pub mod provision;
pub mod quota;
pub mod repo;
pub mod routes;
