//! Databases for tests: a SQLite file in a temp dir, and a fresh schema in the machine's
//! PostgreSQL (`ZLH_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/test`), so
//! the same test runs against both and tests never see each other's rows.

use super::{new_id, Db};

pub const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A database that lives as long as this value (the SQLite temp dir is removed on drop; the
/// PostgreSQL schema stays, named `zlh_test_<id>`, and is cheap).
pub struct TestDb {
    pub db: Db,
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

pub async fn sqlite() -> TestDb {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("zlh.db").display());
    let db = Db::connect(&url).await.expect("sqlite test database");
    TestDb { db, url, _dir: Some(dir) }
}

/// Panics when PostgreSQL is not reachable: the suite is meant to run against both.
pub async fn postgres() -> TestDb {
    let base = std::env::var("ZLH_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into());
    let schema = format!("zlh_test_{}", &new_id()[..16]);
    {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let mut conn = sqlx::AnyConnection::connect(&base).await.unwrap_or_else(|e| {
            panic!("PostgreSQL at {base} is needed for the tests (set ZLH_TEST_POSTGRES_URL): {e}")
        });
        sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await.expect("create test schema");
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let db = Db::connect(&url).await.expect("postgres test database");
    TestDb { db, url, _dir: None }
}

/// Both backends, for tests that must hold on each.
pub async fn both() -> Vec<(&'static str, TestDb)> {
    vec![("sqlite", sqlite().await), ("postgres", postgres().await)]
}
