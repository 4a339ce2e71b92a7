-- Billing: whether a user's servers are stopped for non-payment, apart from the subscription's
-- status (a suspended subscription may be canceled at the provider; its servers stay stopped
-- until the user pays again). Keep in step with migrations/postgres/0003_billing.sql.

ALTER TABLE subscriptions ADD COLUMN servers_suspended_at BIGINT;
CREATE INDEX subscriptions_customer ON subscriptions(customer_id);
CREATE INDEX subscriptions_subscription ON subscriptions(subscription_id);
