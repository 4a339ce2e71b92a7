//! Servers: ownership, vmid and port allocation, provisioning and deletion as persisted jobs.

pub mod alloc;
pub mod jobs;
pub mod repo;
