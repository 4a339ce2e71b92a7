//! The payment provider's webhook: Stripe-compatible signatures, replayed events, and the
//! subscription status each event leads to, on SQLite and PostgreSQL.

mod billing_support;

use std::sync::Arc;

use billing_support::*;
use serde_json::{json, Value};
use zlh_apid::billing::webhook::{handle_event, verify_signature, Outcome, SignatureError};
use zlh_apid::billing::{subscriptions, PlanId, Status};

const BODY: &[u8] = br#"{"id":"evt_1","type":"invoice.paid","data":{"object":{}}}"#;

#[test]
fn signature_vectors() {
    let now = 1_700_000_000;
    let secret = WEBHOOK_SECRET.as_bytes();
    let good = hmac_hex(WEBHOOK_SECRET, &now.to_string(), BODY);
    let check = |header: &str, body: &[u8], now_secs: i64| verify_signature(header, body, secret, now_secs);

    // Valid, and valid among other schemes and spacing.
    assert_eq!(check(&format!("t={now},v1={good}"), BODY, now), Ok(()));
    assert_eq!(check(&format!("t={now}, v0=abcd, v1={good}"), BODY, now), Ok(()));
    // Two v1 entries (a secret being rolled): either order, one wrong, accepted.
    let wrong = hmac_hex("whsec_other", &now.to_string(), BODY);
    assert_eq!(check(&format!("t={now},v1={wrong},v1={good}"), BODY, now), Ok(()));
    assert_eq!(check(&format!("t={now},v1={good},v1={wrong}"), BODY, now), Ok(()));
    assert_eq!(check(&format!("t={now},v1=not-hex,v1={good}"), BODY, now), Ok(()));
    // Wrong secret.
    assert_eq!(check(&format!("t={now},v1={wrong}"), BODY, now), Err(SignatureError::Invalid));
    // Body modified after signing (one byte).
    let modified = BODY.iter().map(|b| if *b == b'1' { b'2' } else { *b }).collect::<Vec<_>>();
    assert_eq!(check(&format!("t={now},v1={good}"), &modified, now), Err(SignatureError::Invalid));
    // Timestamp changed after signing.
    assert_eq!(check(&format!("t={},v1={good}", now + 1), BODY, now), Err(SignatureError::Invalid));
    // Only a v0 signature (the test-mode scheme), or no signature at all.
    assert_eq!(check(&format!("t={now},v0={good}"), BODY, now), Err(SignatureError::Invalid));
    assert_eq!(check(&format!("t={now}"), BODY, now), Err(SignatureError::Invalid));

    // Stale: signed 301 s ago; 300 s is still inside the window.
    let old = now - 301;
    let stale = format!("t={old},v1={}", hmac_hex(WEBHOOK_SECRET, &old.to_string(), BODY));
    assert_eq!(check(&stale, BODY, now), Err(SignatureError::Stale));
    let edge = now - 300;
    let edge = format!("t={edge},v1={}", hmac_hex(WEBHOOK_SECRET, &edge.to_string(), BODY));
    assert_eq!(check(&edge, BODY, now), Ok(()));
    // From the future beyond the tolerance.
    let ahead = now + 301;
    let future = format!("t={ahead},v1={}", hmac_hex(WEBHOOK_SECRET, &ahead.to_string(), BODY));
    assert_eq!(check(&future, BODY, now), Err(SignatureError::Stale));

    // Malformed headers.
    for header in ["", "garbage", &format!("v1={good}"), &format!("t=yesterday,v1={good}"), "t=1,v1"] {
        assert_eq!(check(header, BODY, now), Err(SignatureError::Malformed), "{header:?}");
    }
}

async fn post(base: &str, body: &[u8], signature: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new()
        .post(format!("{base}/api/billing/webhook"))
        .header("content-type", "application/json")
        .body(body.to_vec());
    if let Some(s) = signature {
        req = req.header("Stripe-Signature", s);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap())
}

fn paid(id: &str, user: &str) -> Vec<u8> {
    event(
        id,
        "checkout.session.completed",
        json!({
            "id": "cs_1", "object": "checkout.session", "mode": "subscription", "payment_status": "paid",
            "client_reference_id": user, "customer": format!("cus_{user}"), "subscription": format!("sub_{user}"),
            "metadata": { "plan": "standard", "user_id": user },
        }),
    )
}

#[tokio::test]
async fn webhook_over_http_checks_signatures_and_ignores_replays() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        insert_user(db, "alice").await;
        let actions = Arc::new(RecordingActions::default());
        let base = serve(db, config(), billing(&config(), db, actions.clone())).await;
        let body = paid("evt_checkout", "alice");

        let (status, reply) = post(&base, &body, None).await;
        assert_eq!((status, reply), (400, json!({ "error": "missing Stripe-Signature header" })), "{name}");
        let (status, reply) = post(&base, &body, Some(&sign("whsec_wrong", now_secs(), &body))).await;
        assert_eq!((status, reply), (400, json!({ "error": "invalid signature" })), "{name}");
        let (status, reply) = post(&base, &body, Some(&sign(WEBHOOK_SECRET, now_secs() - 301, &body))).await;
        assert_eq!((status, reply), (400, json!({ "error": "timestamp outside tolerance" })), "{name}");
        let (status, reply) = post(&base, &body, Some("t=abc")).await;
        assert_eq!((status, reply), (400, json!({ "error": "malformed Stripe-Signature header" })), "{name}");
        assert!(subscriptions::get(db, "alice").await.unwrap().is_none(), "{name}: refused calls change nothing");

        let (status, reply) = post(&base, &body, Some(&sign(WEBHOOK_SECRET, now_secs(), &body))).await;
        assert_eq!((status, reply), (200, json!({ "ok": true })), "{name}");
        let sub = subscriptions::get(db, "alice").await.unwrap().unwrap();
        assert_eq!((sub.status, sub.plan), (Status::Active, PlanId::Standard), "{name}");
        assert_eq!(sub.customer_id.as_deref(), Some("cus_alice"), "{name}");
        assert_eq!(sub.subscription_id.as_deref(), Some("sub_alice"), "{name}");

        // Meanwhile the user falls behind; a redelivery of the old checkout must not undo that.
        let failed = event(
            "evt_failed",
            "invoice.payment_failed",
            json!({ "customer": "cus_alice", "subscription": "sub_alice" }),
        );
        assert_eq!(post(&base, &failed, Some(&sign(WEBHOOK_SECRET, now_secs(), &failed))).await.0, 200);
        let (status, reply) = post(&base, &body, Some(&sign(WEBHOOK_SECRET, now_secs(), &body))).await;
        assert_eq!((status, reply), (200, json!({ "ok": true, "duplicate": true })), "{name}");
        let sub = subscriptions::get(db, "alice").await.unwrap().unwrap();
        assert_eq!(sub.status, Status::PastDue, "{name}: the replay had no effect");

        // An event type we do not act on is acknowledged and recorded nowhere.
        let other = event("evt_other", "customer.created", json!({ "id": "cus_x" }));
        let (status, reply) = post(&base, &other, Some(&sign(WEBHOOK_SECRET, now_secs(), &other))).await;
        assert_eq!((status, reply), (200, json!({ "ok": true, "ignored": true })), "{name}");
        // A signed body that is not an event.
        let junk = b"not json";
        let (status, _) = post(&base, junk, Some(&sign(WEBHOOK_SECRET, now_secs(), junk))).await;
        assert_eq!(status, 400, "{name}");
        assert!(actions.suspended().is_empty() && actions.resumed().is_empty(), "{name}");
    }
}

#[tokio::test]
async fn webhook_without_a_secret_refuses_everything() {
    let t = zlh_apid::db::testing::sqlite().await;
    let mut cfg = config();
    cfg.stripe_webhook_secret = None;
    let base = serve(&t.db, cfg.clone(), billing(&cfg, &t.db, Arc::default())).await;
    let body = paid("evt_1", "alice");
    let (status, reply) = post(&base, &body, Some(&sign(WEBHOOK_SECRET, now_secs(), &body))).await;
    assert_eq!((status, reply), (404, json!({ "error": zlh_apid::billing::webhook::WEBHOOK_OFF })));
}

#[tokio::test]
async fn events_move_the_subscription_through_its_statuses() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        insert_user(db, "bob").await;
        let actions = Arc::new(RecordingActions::default());
        let b = billing(&config(), db, actions.clone());
        let mut n = 0;
        let mut send = |kind: &str, object: Value, at: i64| {
            n += 1;
            let body = event(&format!("evt_{n}"), kind, object);
            let (db, b) = (db.clone(), b.clone());
            async move { handle_event(&db, &b, &body, at).await.unwrap() }
        };
        let sub = |db| async move { subscriptions::get(db, "bob").await.unwrap().unwrap() };
        let day = 24 * 3600 * 1000;
        let t0 = 1_700_000_000_000;

        // An update that arrives before its checkout starts the row from what it says.
        let object = json!({ "id": "sub_bob", "customer": "cus_bob", "status": "incomplete",
            "metadata": { "user_id": "bob", "plan": "basic" }, "items": { "data": [{ "price": { "id": "price_basic" } }] } });
        assert_eq!(send("customer.subscription.updated", object, t0).await, Outcome::Handled, "{name}");
        let s = sub(db).await;
        assert_eq!((s.status, s.plan), (Status::Inactive, PlanId::Basic), "{name}");

        let checkout = json!({ "mode": "subscription", "payment_status": "paid", "client_reference_id": "bob",
            "customer": "cus_bob", "subscription": "sub_bob", "metadata": { "plan": "basic" } });
        send("checkout.session.completed", checkout, t0).await;
        assert_eq!(sub(db).await.status, Status::Active, "{name}");

        // A plan change in the portal: the price says pro, the metadata still says basic.
        let upgraded = json!({ "id": "sub_bob", "customer": "cus_bob", "status": "active",
            "metadata": { "user_id": "bob", "plan": "basic" }, "items": { "data": [{ "price": { "id": "price_pro" } }] } });
        send("customer.subscription.updated", upgraded, t0).await;
        let s = sub(db).await;
        assert_eq!((s.status, s.plan), (Status::Active, PlanId::Pro), "{name}");

        let invoice = json!({ "customer": "cus_bob", "subscription": "sub_bob" });
        send("invoice.payment_failed", invoice.clone(), t0 + day).await;
        let s = sub(db).await;
        assert_eq!((s.status, s.past_due_since), (Status::PastDue, Some(t0 + day)), "{name}");
        // Further failures and Stripe's own past_due/unpaid keep the first time.
        send("invoice.payment_failed", invoice.clone(), t0 + 2 * day).await;
        let unpaid = json!({ "id": "sub_bob", "customer": "cus_bob", "status": "unpaid" });
        send("customer.subscription.updated", unpaid, t0 + 3 * day).await;
        let s = sub(db).await;
        assert_eq!((s.status, s.past_due_since), (Status::PastDue, Some(t0 + day)), "{name}");

        send("invoice.paid", invoice.clone(), t0 + 4 * day).await;
        let s = sub(db).await;
        assert_eq!((s.status, s.past_due_since, s.plan), (Status::Active, None, PlanId::Pro), "{name}");
        assert!(actions.resumed().is_empty(), "{name}: nothing was suspended, nothing to resume");

        // Invoices and updates about another (old) subscription of the customer change nothing.
        let old = json!({ "customer": "cus_bob", "subscription": "sub_old" });
        assert_eq!(send("invoice.payment_failed", old, t0).await, Outcome::Ignored, "{name}");
        let old = json!({ "id": "sub_old", "customer": "cus_bob", "status": "canceled" });
        assert_eq!(send("customer.subscription.deleted", old, t0).await, Outcome::Ignored, "{name}");
        assert_eq!(sub(db).await.status, Status::Active, "{name}");

        let trialing = json!({ "id": "sub_bob", "customer": "cus_bob", "status": "trialing" });
        send("customer.subscription.updated", trialing, t0).await;
        assert_eq!(sub(db).await.status, Status::Active, "{name}");
        let expired = json!({ "id": "sub_bob", "customer": "cus_bob", "status": "incomplete_expired" });
        send("customer.subscription.updated", expired, t0).await;
        assert_eq!(sub(db).await.status, Status::Inactive, "{name}");
        let deleted = json!({ "id": "sub_bob", "customer": "cus_bob", "status": "canceled" });
        send("customer.subscription.deleted", deleted, t0 + 5 * day).await;
        let s = sub(db).await;
        assert_eq!((s.status, s.past_due_since), (Status::Canceled, None), "{name}");

        // Checkout for someone we do not know, and an invoice for a customer we do not know.
        let stranger =
            json!({ "mode": "subscription", "client_reference_id": "nobody", "metadata": { "plan": "pro" } });
        assert_eq!(send("checkout.session.completed", stranger, t0).await, Outcome::Ignored, "{name}");
        let stranger = json!({ "customer": "cus_nobody", "subscription": "sub_nobody" });
        assert_eq!(send("invoice.paid", stranger, t0).await, Outcome::Ignored, "{name}");
        assert!(subscriptions::get(db, "nobody").await.unwrap().is_none(), "{name}");
    }
}

#[tokio::test]
async fn unpaid_checkout_waits_for_its_invoice() {
    for (name, t) in zlh_apid::db::testing::both().await {
        let db = &t.db;
        insert_user(db, "carol").await;
        let b = billing(&config(), db, Arc::default());
        let checkout = event(
            "evt_c",
            "checkout.session.completed",
            json!({ "mode": "subscription",
            "payment_status": "unpaid", "client_reference_id": "carol", "customer": "cus_carol",
            "subscription": "sub_carol", "metadata": { "plan": "pro" } }),
        );
        handle_event(db, &b, &checkout, 1).await.unwrap();
        let s = subscriptions::get(db, "carol").await.unwrap().unwrap();
        assert_eq!((s.status, s.plan), (Status::Inactive, PlanId::Pro), "{name}");
        // Newer API versions name the subscription under parent.subscription_details.
        let paid = event(
            "evt_p",
            "invoice.paid",
            json!({ "customer": "cus_carol",
            "parent": { "subscription_details": { "subscription": "sub_carol" } } }),
        );
        handle_event(db, &b, &paid, 2).await.unwrap();
        assert_eq!(subscriptions::get(db, "carol").await.unwrap().unwrap().status, Status::Active, "{name}");
    }
}
