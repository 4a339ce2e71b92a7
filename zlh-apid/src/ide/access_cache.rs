//! A short memo of IDE authorisation answers, so a page load's hundred requests cost one database
//! read instead of a hundred.
//!
//! An answer ("session S may reach vmid V at address A") is kept for at most the configured time
//! (`ide_access_cache_ms`, 1 s by default; 0 turns the memo off). Changes this process makes —
//! a stop, a delete, a suspension, a moved code-server — forget the vmid's answers at once
//! ([`AccessCache::forget`]), so they take effect on the very next request. Changes made
//! elsewhere (another replica, an operator in the database) take effect within that time.
//! A logout on this replica applies at once (the cookie's revocation is checked on every
//! request); one on another replica within that time, as it is part of the memoised answer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;
use std::time::Duration;

use tokio::time::Instant;

/// Bounds memory: past this many vmids, expired answers are dropped, then all of them.
const MAX_VMIDS: usize = 16_384;

#[derive(Debug)]
struct Answer {
    session_id: Box<str>,
    admins: bool,
    target: SocketAddr,
    until: Instant,
}

#[derive(Debug)]
pub struct AccessCache {
    ttl: Duration,
    by_vmid: RwLock<HashMap<u32, Vec<Answer>>>,
}

impl AccessCache {
    pub fn new(ttl: Duration) -> Self {
        Self { ttl, by_vmid: RwLock::new(HashMap::new()) }
    }

    /// The remembered target for `session_id` on `vmid` (with `admins` as asked), if still fresh.
    pub fn get(&self, session_id: &str, vmid: u32, admins: bool) -> Option<SocketAddr> {
        if self.ttl.is_zero() {
            return None;
        }
        let now = Instant::now();
        let map = self.by_vmid.read().expect("access cache lock");
        map.get(&vmid)?
            .iter()
            .find(|a| a.admins == admins && &*a.session_id == session_id && now < a.until)
            .map(|a| a.target)
    }

    /// Remembers that `session_id` may reach `vmid` at `target`.
    pub fn put(&self, session_id: &str, vmid: u32, admins: bool, target: SocketAddr) {
        if self.ttl.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut map = self.by_vmid.write().expect("access cache lock");
        if map.len() >= MAX_VMIDS && !map.contains_key(&vmid) {
            map.retain(|_, answers| {
                answers.retain(|a| now < a.until);
                !answers.is_empty()
            });
            if map.len() >= MAX_VMIDS {
                map.clear();
            }
        }
        let answers = map.entry(vmid).or_default();
        answers.retain(|a| now < a.until && !(a.admins == admins && &*a.session_id == session_id));
        answers.push(Answer { session_id: session_id.into(), admins, target, until: now + self.ttl });
    }

    /// Forgets every answer about `vmid`: its access just changed here.
    pub fn forget(&self, vmid: u32) {
        self.by_vmid.write().expect("access cache lock").remove(&vmid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[tokio::test(start_paused = true)]
    async fn answers_last_the_configured_time_and_no_longer() {
        let cache = AccessCache::new(Duration::from_secs(1));
        cache.put("alice", 6001, true, addr(7000));
        assert_eq!(cache.get("alice", 6001, true), Some(addr(7000)));
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(cache.get("alice", 6001, true), Some(addr(7000)));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cache.get("alice", 6001, true), None, "a stale answer must be asked again");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_is_only_for_its_user_vmid_and_admin_flag() {
        let cache = AccessCache::new(Duration::from_secs(1));
        cache.put("alice", 6001, true, addr(7000));
        assert_eq!(cache.get("bob", 6001, true), None);
        assert_eq!(cache.get("alice", 6002, true), None);
        // Allowed as an admin on the hosted IDE says nothing about the owner-only path proxy.
        assert_eq!(cache.get("alice", 6001, false), None);
        assert_eq!(cache.get("alic", 6001, true), None);
    }

    #[tokio::test(start_paused = true)]
    async fn forgetting_a_vmid_takes_effect_at_once_and_spares_others() {
        let cache = AccessCache::new(Duration::from_secs(1));
        cache.put("alice", 6001, true, addr(7000));
        cache.put("bob", 6001, true, addr(7000));
        cache.put("bob", 6002, true, addr(7001));
        cache.forget(6001);
        assert_eq!(cache.get("alice", 6001, true), None);
        assert_eq!(cache.get("bob", 6001, true), None);
        assert_eq!(cache.get("bob", 6002, true), Some(addr(7001)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_time_turns_the_memo_off() {
        let cache = AccessCache::new(Duration::ZERO);
        cache.put("alice", 6001, true, addr(7000));
        assert_eq!(cache.get("alice", 6001, true), None);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_bounded_however_many_vmids_are_seen() {
        let cache = AccessCache::new(Duration::from_secs(1));
        for vmid in 0..(MAX_VMIDS as u32 * 3) {
            cache.put("alice", vmid, true, addr(7000));
        }
        assert!(cache.by_vmid.read().unwrap().len() <= MAX_VMIDS);
        let last = MAX_VMIDS as u32 * 3 - 1;
        assert_eq!(cache.get("alice", last, true), Some(addr(7000)), "the newest answer is kept");
    }
}
