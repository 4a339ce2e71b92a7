//! The open-files limit: daemons holding a connection per client (and one per agent polled)
//! start by lifting their soft limit to the hard one, and size their connection cap by it.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Taken as the limit when the system sets none (`RLIM_INFINITY`).
const UNLIMITED: u64 = 1 << 20;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns the soft limit now in force.
pub fn raise_to_hard_limit() -> std::io::Result<u64> {
    let limit = getrlimit(Resource::Nofile);
    let below = match (limit.current, limit.maximum) {
        (Some(soft), Some(hard)) => soft < hard,
        (Some(_), None) => true,
        (None, _) => false,
    };
    if below {
        setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum })?;
    }
    Ok(soft_limit())
}

/// The soft `RLIMIT_NOFILE`: how many descriptors this process may have open.
pub fn soft_limit() -> u64 {
    getrlimit(Resource::Nofile).current.unwrap_or(UNLIMITED)
}
