//! Console tickets are single use: the agent remembers the id (`jti`) of every ticket it accepted
//! until the ticket would have expired anyway, so a ticket that leaked (a proxy log, a browser
//! extension, a shared screen) opens nothing more than the one console it was minted for.
//!
//! Memory is bounded: an entry lives at most a ticket's lifetime (60 s) and expired entries are
//! dropped on every use; if [`MAX_REMEMBERED`] live tickets are remembered, new tickets are
//! refused rather than forgotten, since forgetting one would let it be replayed.

use std::collections::{BTreeSet, HashSet};

use zlh_core::token::LEEWAY_SECS;

/// Live tickets remembered at most: far more consoles than one container opens in a minute.
pub const MAX_REMEMBERED: usize = 4096;

/// Why a ticket was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// This ticket already opened a console.
    Replayed,
    /// Too many live tickets are remembered to take another one.
    Full,
}

/// Ids of accepted tickets that have not expired yet.
#[derive(Debug, Default)]
pub struct UsedTickets {
    ids: HashSet<String>,
    /// (expiry, id), oldest first, so pruning only looks at what has expired.
    by_expiry: BTreeSet<(i64, String)>,
}

impl UsedTickets {
    /// Accepts the ticket `jti` expiring at `exp` (unix seconds) once; `now` is unix seconds.
    pub fn use_once(&mut self, jti: &str, exp: i64, now: i64) -> Result<(), Refused> {
        self.prune(now);
        if self.ids.contains(jti) {
            return Err(Refused::Replayed);
        }
        if self.ids.len() >= MAX_REMEMBERED {
            return Err(Refused::Full);
        }
        // Kept as long as the verifier would still take the ticket, skew included.
        let forget_at = exp.saturating_add(LEEWAY_SECS);
        self.ids.insert(jti.to_owned());
        self.by_expiry.insert((forget_at, jti.to_owned()));
        Ok(())
    }

    /// Tickets remembered right now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    fn prune(&mut self, now: i64) {
        while let Some((forget_at, _)) = self.by_expiry.first() {
            if *forget_at > now {
                break;
            }
            let (_, jti) = self.by_expiry.pop_first().expect("first exists");
            self.ids.remove(&jti);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_is_taken_once_until_it_expires() {
        let mut used = UsedTickets::default();
        assert_eq!(used.use_once("a", 160, 100), Ok(()));
        assert_eq!(used.use_once("a", 160, 101), Err(Refused::Replayed));
        assert_eq!(used.use_once("b", 160, 101), Ok(()));
        // Still remembered while the verifier would take it (expiry plus skew) ...
        assert_eq!(used.use_once("a", 160, 160 + LEEWAY_SECS - 1), Err(Refused::Replayed));
        // ... and forgotten after, when the verifier refuses it as expired anyway.
        assert_eq!(used.use_once("c", 200, 160 + LEEWAY_SECS), Ok(()));
        assert_eq!(used.len(), 1, "a and b were pruned");
    }

    #[test]
    fn memory_is_bounded_and_full_refuses_instead_of_forgetting() {
        let mut used = UsedTickets::default();
        for i in 0..MAX_REMEMBERED {
            used.use_once(&format!("t{i}"), 160, 100).unwrap();
        }
        assert_eq!(used.use_once("one-more", 160, 100), Err(Refused::Full));
        assert_eq!(used.use_once("t0", 160, 100), Err(Refused::Replayed), "nothing was forgotten");
        // Once those expire there is room again.
        assert_eq!(used.use_once("later", 300, 160 + LEEWAY_SECS), Ok(()));
        assert_eq!(used.len(), 1);
    }
}
