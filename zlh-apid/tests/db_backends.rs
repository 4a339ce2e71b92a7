//! The schema migrates and behaves the same on SQLite and PostgreSQL.

use zlh_apid::db::{is_unique_violation, new_id, now_ms, testing};

#[tokio::test]
async fn migrations_run_and_unique_leases_hold_on_both_backends() {
    for (name, t) in testing::both().await {
        let pool = t.db.pool();
        let uid = new_id();
        sqlx::query("INSERT INTO users (id, email, username, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)")
            .bind(&uid)
            .bind("a@example.com")
            .bind("alice")
            .bind("x")
            .bind(now_ms())
            .execute(pool)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let (email,): (String,) =
            sqlx::query_as("SELECT email FROM users WHERE id = $1").bind(&uid).fetch_one(pool).await.unwrap();
        assert_eq!(email, "a@example.com", "{name}");
        sqlx::query("INSERT INTO vmid_leases (vmid, server_id) VALUES ($1, $2)")
            .bind(5000i64)
            .bind("s1")
            .execute(pool)
            .await
            .unwrap();
        let dup = sqlx::query("INSERT INTO vmid_leases (vmid, server_id) VALUES ($1, $2)")
            .bind(5000i64)
            .bind("s2")
            .execute(pool)
            .await
            .unwrap_err();
        assert!(is_unique_violation(&dup), "{name}: {dup}");
        // Migrating again is a no-op.
        zlh_apid::db::Db::connect(&t.url).await.unwrap_or_else(|e| panic!("{name} re-migrate: {e}"));
    }
}
