//! OCI containers run by runc.

pub mod network;
