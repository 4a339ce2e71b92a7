//! The login rate limit's core on both backends, with time given explicitly: the window, the
//! Retry-After it computes, what a success clears, pruning, and parallel guesses.

use std::net::IpAddr;
use std::time::Duration;

use zlh_apid::auth::ratelimit::{self, Admission, Attempt, Limits, LoginKeys};
use zlh_apid::db::testing;
use zlh_apid::db::Db;

const T0: i64 = 1_800_000_000_000;

fn keys(identifier: &str, ip: &str) -> LoginKeys {
    LoginKeys::new(identifier, Some(ip.parse::<IpAddr>().unwrap()))
}

async fn allowed(db: &Db, k: &LoginKeys, limits: Limits, now: i64) -> Attempt {
    match ratelimit::begin(db, k, limits, now).await.unwrap() {
        Admission::Allowed(a) => a,
        Admission::Limited { retry_after } => {
            panic!("{:?}: {k:?} limited at {now}, retry after {retry_after:?}", db.kind())
        }
    }
}

async fn limited(db: &Db, k: &LoginKeys, limits: Limits, now: i64) -> Duration {
    match ratelimit::begin(db, k, limits, now).await.unwrap() {
        Admission::Limited { retry_after } => retry_after,
        Admission::Allowed(_) => panic!("{:?}: {k:?} allowed at {now}", db.kind()),
    }
}

async fn rows(db: &Db) -> i64 {
    sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM login_attempts").fetch_one(db.pool()).await.unwrap().0
}

#[tokio::test]
async fn failures_expire_with_the_window_and_refusals_do_not_extend_it() {
    let limits = Limits { max_failures: 3, window: Duration::from_secs(60) };
    for (name, t) in testing::both().await {
        let db = &t.db;
        let k = keys("alice", "192.0.2.1");
        for i in 0..3 {
            ratelimit::failed(allowed(db, &k, limits, T0 + i * 1000).await);
        }
        // The oldest of the three must leave the window (at T0 + 60 s) before a fourth may try.
        assert_eq!(limited(db, &k, limits, T0 + 10_000).await, Duration::from_secs(50), "{name}");
        assert_eq!(limited(db, &k, limits, T0 + 59_500).await, Duration::from_secs(1), "{name}");
        // Refused attempts were not recorded: the window still ends at the same time.
        ratelimit::failed(allowed(db, &k, limits, T0 + 60_000).await);
        assert_eq!(limited(db, &k, limits, T0 + 60_500).await, Duration::from_secs(1), "{name}: until the 2nd ages");
        ratelimit::failed(allowed(db, &k, limits, T0 + 61_000).await);
        // Long after, everything has aged out and been pruned.
        let later = T0 + 3_600_000;
        let a = allowed(db, &k, limits, later).await;
        assert_eq!(rows(db).await, 2, "{name}: only this attempt's two reservations remain");
        ratelimit::succeeded(db, a).await.unwrap();
    }
}

#[tokio::test]
async fn either_key_limits_and_success_clears_only_the_account() {
    let limits = Limits { max_failures: 2, window: Duration::from_secs(900) };
    for (_, t) in testing::both().await {
        let db = &t.db;
        // Per account, across addresses.
        ratelimit::failed(allowed(db, &keys("alice", "192.0.2.1"), limits, T0).await);
        ratelimit::failed(allowed(db, &keys("ALICE", "192.0.2.2"), limits, T0 + 1).await);
        limited(db, &keys("alice", "192.0.2.3"), limits, T0 + 2).await;
        // Per address (IPv6 by /64), across accounts.
        ratelimit::failed(allowed(db, &keys("x", "2001:db8::1"), limits, T0).await);
        ratelimit::failed(allowed(db, &keys("y", "2001:db8::2"), limits, T0 + 1).await);
        limited(db, &keys("z", "2001:db8::ffff"), limits, T0 + 2).await;
        ratelimit::failed(allowed(db, &keys("z", "2001:db8:0:1::1"), limits, T0 + 3).await);

        // A success clears the account's failures but not the address's.
        ratelimit::failed(allowed(db, &keys("bob", "198.51.100.1"), limits, T0).await);
        ratelimit::succeeded(db, allowed(db, &keys("bob", "198.51.100.1"), limits, T0 + 1).await).await.unwrap();
        ratelimit::failed(allowed(db, &keys("bob", "198.51.100.2"), limits, T0 + 2).await);
        ratelimit::failed(allowed(db, &keys("bob", "198.51.100.3"), limits, T0 + 3).await);
        limited(db, &keys("bob", "198.51.100.4"), limits, T0 + 4).await;
        ratelimit::failed(allowed(db, &keys("carol", "198.51.100.1"), limits, T0 + 5).await);
        limited(db, &keys("dave", "198.51.100.1"), limits, T0 + 6).await;
    }
}

#[tokio::test]
async fn parallel_guesses_cannot_overrun_the_limit() {
    let limits = Limits { max_failures: 5, window: Duration::from_secs(900) };
    for (name, t) in testing::both().await {
        let k = keys("alice", "192.0.2.1");
        let burst = (0..30).map(|i| {
            let (db, k) = (t.db.clone(), k.clone());
            tokio::spawn(async move { ratelimit::begin(&db, &k, limits, T0 + i).await.unwrap() })
        });
        let outcomes = futures::future::join_all(burst).await;
        let passed = outcomes.iter().filter(|o| matches!(o.as_ref().unwrap(), Admission::Allowed(_))).count();
        // All may be refused (every one counted the others' reservations), never more than 5 pass.
        assert!(passed <= 5, "{name}: {passed} of 30 got to check a password");
        drop(outcomes);
        // Refused attempts left nothing behind: the remaining allowance is intact.
        for i in passed..5 {
            ratelimit::failed(allowed(&t.db, &k, limits, T0 + 100 + i as i64).await);
        }
        limited(&t.db, &k, limits, T0 + 200).await;
        assert_eq!(rows(&t.db).await, 10, "{name}: five failures under each key");
    }
}
