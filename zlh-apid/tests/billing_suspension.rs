//! Non-payment: servers of a subscription past due beyond the grace period are stopped and the
//! subscription suspended; servers of a subscription that ended are stopped at once; a payment
//! resumes them. On SQLite and PostgreSQL.

mod billing_support;

use std::sync::Arc;
use std::time::Duration;

use billing_support::*;
use serde_json::json;
use zlh_apid::billing::webhook::handle_event;
use zlh_apid::billing::{enforce_unpaid, spawn_enforcer, subscriptions, PlanId, Status, Suspension};
use zlh_apid::db::Db;
use zlh_apid::servers::repo::{self, state, Kind};

const DAY_MS: i64 = 24 * 3600 * 1000;
const GRACE: Duration = Duration::from_secs(7 * 24 * 3600);
const T0: i64 = 1_700_000_000_000;

/// An active Stripe-style subscription that went past due at `since`.
async fn past_due_user(db: &Db, user: &str, since: i64) {
    insert_user(db, user).await;
    let (customer, sub) = (format!("cus_{user}"), format!("sub_{user}"));
    subscriptions::activate(db, user, Some(PlanId::Standard), Some(&customer), Some(&sub), since - DAY_MS)
        .await
        .unwrap();
    assert!(subscriptions::set_status(db, user, Status::PastDue, since).await.unwrap());
}

async fn status(db: &Db, user: &str) -> (Status, Option<i64>) {
    let s = subscriptions::get(db, user).await.unwrap().unwrap();
    (s.status, s.past_due_since)
}

#[tokio::test]
async fn past_due_beyond_grace_suspends_once_and_payment_resumes() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        past_due_user(db, "late", T0).await;
        past_due_user(db, "recent", T0 + DAY_MS).await;
        let actions = Arc::new(RecordingActions::default());

        // Exactly at the end of the grace period nothing happens yet.
        let suspended = enforce_unpaid(db, T0 + 7 * DAY_MS, GRACE, &*actions).await.unwrap();
        assert!(suspended.is_empty(), "{name}");
        assert_eq!(status(db, "late").await, (Status::PastDue, Some(T0)), "{name}");

        // 7 days + 1 s: the late user is suspended; the one past due for 6 days is not.
        let now = T0 + 7 * DAY_MS + 1000;
        let suspended = enforce_unpaid(db, now, GRACE, &*actions).await.unwrap();
        assert_eq!(suspended, vec!["late".to_string()], "{name}");
        assert_eq!(actions.suspended(), vec!["late".to_string()], "{name}");
        assert_eq!(actions.reasons(), vec![Suspension::PastDue], "{name}");
        assert_eq!(status(db, "late").await, (Status::Suspended, Some(T0)), "{name}");
        assert_eq!(status(db, "recent").await, (Status::PastDue, Some(T0 + DAY_MS)), "{name}");
        // A second sweep does not stop the servers again.
        assert!(enforce_unpaid(db, now + 1000, GRACE, &*actions).await.unwrap().is_empty(), "{name}");
        assert_eq!(actions.suspended().len(), 1, "{name}");
        // Further failure notices keep it suspended: only a payment lifts it.
        let b = billing(&config(), db, actions.clone());
        let failed =
            event("evt_f", "invoice.payment_failed", json!({ "customer": "cus_late", "subscription": "sub_late" }));
        handle_event(db, &b, &failed, now + 2000).await.unwrap();
        assert_eq!(status(db, "late").await, (Status::Suspended, Some(T0)), "{name}");

        let paid = event("evt_p", "invoice.paid", json!({ "customer": "cus_late", "subscription": "sub_late" }));
        handle_event(db, &b, &paid, now + 3000).await.unwrap();
        assert_eq!(status(db, "late").await, (Status::Active, None), "{name}");
        assert_eq!(actions.resumed(), vec!["late".to_string()], "{name}");
        // The provider's redelivery of the payment resumes nothing a second time.
        handle_event(db, &b, &paid, now + 4000).await.unwrap();
        assert_eq!(actions.resumed().len(), 1, "{name}");
    }
}

#[tokio::test]
async fn failed_server_actions_are_retried() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        past_due_user(db, "dora", T0).await;
        let actions = Arc::new(RecordingActions::default());
        let now = T0 + 8 * DAY_MS;

        // The host is down: the subscription stays past due and the next sweep tries again.
        *actions.fail_suspend.lock().unwrap() = true;
        assert!(enforce_unpaid(db, now, GRACE, &*actions).await.unwrap().is_empty(), "{name}");
        assert_eq!(status(db, "dora").await, (Status::PastDue, Some(T0)), "{name}");
        *actions.fail_suspend.lock().unwrap() = false;
        assert_eq!(enforce_unpaid(db, now + 1, GRACE, &*actions).await.unwrap(), vec!["dora".to_string()]);
        assert_eq!(status(db, "dora").await, (Status::Suspended, Some(T0)), "{name}");

        // Paid, but the servers cannot be started: the event fails (the provider retries it) and
        // the subscription is still suspended; the retry resumes.
        let b = billing(&config(), db, actions.clone());
        let paid = event("evt_paid", "invoice.paid", json!({ "customer": "cus_dora", "subscription": "sub_dora" }));
        *actions.fail_resume.lock().unwrap() = true;
        assert!(handle_event(db, &b, &paid, now + 2).await.is_err(), "{name}");
        assert_eq!(status(db, "dora").await, (Status::Suspended, Some(T0)), "{name}");
        *actions.fail_resume.lock().unwrap() = false;
        handle_event(db, &b, &paid, now + 3).await.unwrap();
        assert_eq!(status(db, "dora").await, (Status::Active, None), "{name}");
        assert_eq!(actions.resumed(), vec!["dora".to_string()], "{name}");
    }
}

#[tokio::test]
async fn servers_stay_stopped_through_cancellation_until_a_new_plan() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        past_due_user(db, "erin", T0).await;
        let actions = Arc::new(RecordingActions::default());
        enforce_unpaid(db, T0 + 8 * DAY_MS, GRACE, &*actions).await.unwrap();
        let b = billing(&config(), db, actions.clone());
        let deleted = event(
            "evt_d",
            "customer.subscription.deleted",
            json!({ "id": "sub_erin", "customer": "cus_erin", "status": "canceled" }),
        );
        handle_event(db, &b, &deleted, T0 + 9 * DAY_MS).await.unwrap();
        assert_eq!(status(db, "erin").await, (Status::Canceled, None), "{name}");
        assert!(actions.resumed().is_empty(), "{name}");

        // Subscribing again (here through the local provider) starts the servers again.
        let customer = zlh_apid::billing::BillingCustomer {
            user_id: "erin".into(),
            email: "erin@example.com".into(),
            customer_id: None,
        };
        b.provider.checkout(&customer, PlanId::Basic.plan(), "/billing").await.unwrap();
        assert_eq!(status(db, "erin").await, (Status::Active, None), "{name}");
        assert_eq!(actions.resumed(), vec!["erin".to_string()], "{name}");
    }
}

/// An active Stripe-style subscription, never late, and a running server.
async fn paying_user(db: &Db, user: &str) {
    insert_user(db, user).await;
    let (customer, sub) = (format!("cus_{user}"), format!("sub_{user}"));
    subscriptions::activate(db, user, Some(PlanId::Basic), Some(&customer), Some(&sub), T0).await.unwrap();
    let s = repo::insert(db, user, Kind::Game, "world", "basic", &json!({})).await.unwrap();
    repo::set_state(db, &s.id, state::RUNNING, None).await.unwrap();
}

#[tokio::test]
async fn a_canceled_subscription_stops_its_servers_at_once_until_a_new_one() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        paying_user(db, "gus").await;
        let actions = Arc::new(RecordingActions::default());
        let b = billing(&config(), db, actions.clone());
        let deleted = event(
            "evt_gus_deleted",
            "customer.subscription.deleted",
            json!({ "id": "sub_gus", "customer": "cus_gus", "status": "canceled" }),
        );
        handle_event(db, &b, &deleted, T0 + DAY_MS).await.unwrap();
        assert_eq!(status(db, "gus").await, (Status::Canceled, None), "{name}");
        assert_eq!(actions.suspended(), vec!["gus".to_string()], "{name}: no grace after the end");
        assert_eq!(actions.reasons(), vec![Suspension::Ended], "{name}");
        let row = subscriptions::get(db, "gus").await.unwrap().unwrap();
        assert_eq!(row.servers_suspended_at, Some(T0 + DAY_MS), "{name}");

        // The provider's redelivery and later sweeps stop nothing a second time.
        handle_event(db, &b, &deleted, T0 + DAY_MS + 1).await.unwrap();
        assert!(enforce_unpaid(db, T0 + 30 * DAY_MS, GRACE, &*actions).await.unwrap().is_empty(), "{name}");
        assert_eq!(actions.suspended().len(), 1, "{name}");
        assert!(actions.resumed().is_empty(), "{name}");

        // Subscribing again starts them.
        let customer = zlh_apid::billing::BillingCustomer {
            user_id: "gus".into(),
            email: "gus@example.com".into(),
            customer_id: None,
        };
        b.provider.checkout(&customer, PlanId::Basic.plan(), "/billing").await.unwrap();
        assert_eq!(status(db, "gus").await, (Status::Active, None), "{name}");
        assert_eq!(actions.resumed(), vec!["gus".to_string()], "{name}");
        assert_eq!(subscriptions::get(db, "gus").await.unwrap().unwrap().servers_suspended_at, None, "{name}");
    }
}

#[tokio::test]
async fn a_paused_subscription_stops_its_servers_and_a_failed_stop_is_swept_later() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        paying_user(db, "hana").await;
        let actions = Arc::new(RecordingActions::default());
        let b = billing(&config(), db, actions.clone());

        // The host is down when the subscription lapses: the event is still taken (its status
        // change stands) and the servers keep running for now.
        *actions.fail_suspend.lock().unwrap() = true;
        let paused = event(
            "evt_hana_paused",
            "customer.subscription.updated",
            json!({ "id": "sub_hana", "customer": "cus_hana", "status": "paused" }),
        );
        handle_event(db, &b, &paused, T0 + DAY_MS).await.unwrap();
        assert_eq!(status(db, "hana").await, (Status::Inactive, None), "{name}");
        assert_eq!(subscriptions::get(db, "hana").await.unwrap().unwrap().servers_suspended_at, None, "{name}");
        assert!(actions.suspended().is_empty(), "{name}");

        // A checkout still pending (inactive, no server yet) is nobody's business.
        insert_user(db, "ivo").await;
        subscriptions::record_pending(db, "ivo", PlanId::Basic, Some("cus_ivo"), Some("sub_ivo"), T0).await.unwrap();

        // The next sweep stops them, with no grace period to wait out.
        *actions.fail_suspend.lock().unwrap() = false;
        let swept = enforce_unpaid(db, T0 + DAY_MS + 1000, GRACE, &*actions).await.unwrap();
        assert_eq!(swept, vec!["hana".to_string()], "{name}");
        assert_eq!(actions.reasons(), vec![Suspension::Ended], "{name}");
        assert_eq!(status(db, "hana").await, (Status::Inactive, None), "{name}");

        // Paying again (the subscription resumes) starts them.
        let active = event(
            "evt_hana_active",
            "customer.subscription.updated",
            json!({ "id": "sub_hana", "customer": "cus_hana", "status": "active" }),
        );
        handle_event(db, &b, &active, T0 + 2 * DAY_MS).await.unwrap();
        assert_eq!(status(db, "hana").await, (Status::Active, None), "{name}");
        assert_eq!(actions.resumed(), vec!["hana".to_string()], "{name}");
    }
}

#[tokio::test]
async fn the_enforcer_sweeps_on_its_own() {
    let t = zlh_apid::db::testing::sqlite().await;
    let now = zlh_apid::db::now_ms();
    past_due_user(&t.db, "finn", now - 7 * DAY_MS - 1000).await;
    let actions = Arc::new(RecordingActions::default());
    let changed = actions.changed.notified();
    let task = spawn_enforcer(t.db.clone(), billing(&config(), &t.db, actions.clone()), Duration::from_secs(3600));
    tokio::time::timeout(Duration::from_secs(10), changed).await.expect("the first sweep runs at once");
    assert_eq!(actions.suspended(), vec!["finn".to_string()]);
    assert_eq!(status(&t.db, "finn").await.0, Status::Suspended);
    task.abort();
}
