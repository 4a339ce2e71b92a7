//! The login rate limit's core on both backends, with time given explicitly: strangers cannot
//! lock an owner out, one address guessing one account is slowed exponentially, one address
//! guessing many accounts is limited, a success clears only its own pair, parallel guesses, and
//! pruning.

use std::net::IpAddr;
use std::time::Duration;

use zlh_apid::auth::ratelimit::{self, Admission, Attempt, LoginKeys, LoginLimits, FREE_FAILURES};
use zlh_apid::db::testing;
use zlh_apid::db::Db;

const T0: i64 = 1_800_000_000_000;
const SECOND: i64 = 1000;

fn keys(identifier: &str, ip: &str) -> LoginKeys {
    LoginKeys::new(identifier, Some(ip.parse::<IpAddr>().unwrap()))
}

fn limits(max_failures: u32, account_ceiling: u32) -> LoginLimits {
    LoginLimits { max_failures, account_ceiling, window: Duration::from_secs(900), base_delay: Duration::from_secs(1) }
}

async fn allowed(db: &Db, k: &LoginKeys, limits: LoginLimits, now: i64) -> Attempt {
    match ratelimit::begin(db, k, limits, now).await.unwrap() {
        Admission::Allowed(a) => a,
        Admission::Limited { retry_after } => {
            panic!("{:?}: {k:?} limited at {}, retry after {retry_after:?}", db.kind(), now - T0)
        }
    }
}

async fn limited(db: &Db, k: &LoginKeys, limits: LoginLimits, now: i64) -> Duration {
    match ratelimit::begin(db, k, limits, now).await.unwrap() {
        Admission::Limited { retry_after } => retry_after,
        Admission::Allowed(_) => panic!("{:?}: {k:?} allowed at {}", db.kind(), now - T0),
    }
}

async fn rows(db: &Db) -> i64 {
    sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM login_attempts").fetch_one(db.pool()).await.unwrap().0
}

#[tokio::test]
async fn strangers_failing_from_other_addresses_never_lock_the_owner_out() {
    let limits = limits(10, 100);
    for (name, t) in testing::both().await {
        let db = &t.db;
        // The reported attack: ten wrong passwords for alice from two addresses, as fast as the
        // limit lets them (the old limit locked alice out for 15 minutes here).
        let mut now = T0;
        for i in 0..10 {
            let from = ["192.0.2.1", "192.0.2.2"][i % 2];
            ratelimit::failed(allowed(db, &keys("alice", from), limits, now).await);
            now += 5 * SECOND;
        }
        // Alice, from her own address, signs in at once.
        let owner = keys("alice", "198.51.100.7");
        ratelimit::succeeded(db, allowed(db, &owner, limits, now).await).await.unwrap();

        // A botnet: 150 addresses, one guess each, within a second, past the account's ceiling.
        for i in 0..150 {
            let from = format!("10.0.{}.{}", i / 250, i % 250 + 1);
            ratelimit::failed(allowed(db, &keys("alice", &from), limits, now + i).await);
        }
        now += SECOND;
        // Past the ceiling, an address that already failed has no free guesses left: it waits.
        let wait = limited(db, &keys("alice", "10.0.0.1"), limits, now).await;
        assert!((1..=2).contains(&wait.as_secs()), "{name}: {wait:?}");
        // The owner's clean address still goes straight through, and a typo only slows her.
        ratelimit::succeeded(db, allowed(db, &owner, limits, now).await).await.unwrap();
        ratelimit::failed(allowed(db, &owner, limits, now + 1).await);
        assert_eq!(limited(db, &owner, limits, now + 2).await, Duration::from_secs(2), "{name}");
        ratelimit::succeeded(db, allowed(db, &owner, limits, now + 1 + 2 * SECOND).await).await.unwrap();
        // The same address that waited gets its turn too: slowed, never shut out.
        ratelimit::failed(allowed(db, &keys("alice", "10.0.0.1"), limits, now + 2 * SECOND).await);
    }
}

#[tokio::test]
async fn one_address_guessing_one_account_is_slowed_exponentially_then_stopped() {
    let limits = limits(10, 100);
    for (name, t) in testing::both().await {
        let db = &t.db;
        let k = keys("bob", "192.0.2.9");
        for i in 0..i64::from(FREE_FAILURES) {
            ratelimit::failed(allowed(db, &k, limits, T0 + i).await);
        }
        // Each further guess waits 1 s, 2 s, 4 s … after the one before.
        let mut last = T0 + i64::from(FREE_FAILURES) - 1;
        let mut delay = SECOND;
        for failures in FREE_FAILURES..10 {
            assert_eq!(limited(db, &k, limits, last + 1).await.as_millis() as i64, delay, "{name}: after {failures}");
            assert!(matches!(
                ratelimit::begin(db, &k, limits, last + delay - 1).await.unwrap(),
                Admission::Limited { .. }
            ));
            last += delay;
            ratelimit::failed(allowed(db, &k, limits, last).await);
            delay *= 2;
        }
        // Ten failures: no more from this address at bob until the first leaves the window.
        let wait = limited(db, &k, limits, last + delay).await;
        assert_eq!(wait.as_secs() as i64, (T0 + 900 * SECOND - (last + delay)).div_euclid(SECOND) + 1, "{name}");
        // Another address is not slowed by this one's guesses.
        ratelimit::succeeded(db, allowed(db, &keys("bob", "192.0.2.10"), limits, last + 1).await).await.unwrap();
        // Refusals were not recorded: once the window has passed, the address starts afresh.
        let later = T0 + 3_600 * SECOND;
        let a = allowed(db, &k, limits, later).await;
        assert_eq!(rows(db).await, 3, "{name}: only this attempt's three reservations remain");
        ratelimit::succeeded(db, a).await.unwrap();
    }
}

#[tokio::test]
async fn one_address_guessing_many_accounts_is_limited_and_a_success_clears_only_its_pair() {
    let limits = limits(5, 100);
    for (name, t) in testing::both().await {
        let db = &t.db;
        // IPv6 by /64: one client owns them all.
        for (i, who) in ["x", "y", "z", "u", "v"].into_iter().enumerate() {
            ratelimit::failed(allowed(db, &keys(who, &format!("2001:db8::{i}")), limits, T0).await);
        }
        limited(db, &keys("w", "2001:db8::ffff"), limits, T0 + 1).await;
        ratelimit::failed(allowed(db, &keys("w", "2001:db8:0:1::1"), limits, T0 + 1).await);

        // Carol mistypes three times, then gets it right: her next typo is free again.
        let carol = keys("carol", "198.51.100.1");
        for i in 0..3 {
            ratelimit::failed(allowed(db, &carol, limits, T0 + i).await);
        }
        ratelimit::succeeded(db, allowed(db, &carol, limits, T0 + 3 + SECOND).await).await.unwrap();
        ratelimit::failed(allowed(db, &carol, limits, T0 + 4 + SECOND).await);
        // But the address keeps its count: five failures, whatever the account.
        ratelimit::failed(allowed(db, &keys("dave", "198.51.100.1"), limits, T0 + 5 + SECOND).await);
        limited(db, &keys("erin", "198.51.100.1"), limits, T0 + 6 + SECOND).await;
        limited(db, &carol, limits, T0 + 7 + 10 * SECOND).await;
        assert!(
            matches!(
                ratelimit::begin(db, &keys("erin", "198.51.100.2"), limits, T0).await.unwrap(),
                Admission::Allowed(_)
            ),
            "{name}"
        );
    }
}

#[tokio::test]
async fn parallel_guesses_cannot_overrun_the_free_failures() {
    let limits = limits(5, 100);
    for (name, t) in testing::both().await {
        let k = keys("alice", "192.0.2.1");
        let burst = (0..30).map(|i| {
            let (db, k) = (t.db.clone(), k.clone());
            tokio::spawn(async move { ratelimit::begin(&db, &k, limits, T0 + i).await.unwrap() })
        });
        let outcomes = futures::future::join_all(burst).await;
        let passed = outcomes.iter().filter(|o| matches!(o.as_ref().unwrap(), Admission::Allowed(_))).count();
        // All may be refused (each counted the others' reservations); never more than the free ones.
        assert!(passed <= FREE_FAILURES as usize, "{name}: {passed} of 30 got to check a password");
        drop(outcomes);
        // Refused attempts left nothing behind: three rows (pair, address, account) per failure.
        assert_eq!(rows(&t.db).await, 3 * passed as i64, "{name}");
    }
}
