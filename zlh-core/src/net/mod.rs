//! What every daemon's listening socket needs against clients that only open connections:
//! caps per client address and in all ([`admission`]), deadlines for a connection's request
//! heads, a health lane beyond the total cap ([`health_lane`]), and as many descriptors as the system allows ([`open_files`]).

pub mod admission;
pub mod health_lane;
pub mod open_files;

pub use admission::{Admitted, AdmittingListener, ConnectionLimits, FirstRequest, Refusal};
