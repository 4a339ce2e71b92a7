//! Storage: one `sqlx` Any pool over SQLite (the embedded default, a file in the data dir) or
//! PostgreSQL (for several API replicas), with embedded migrations per backend. Queries are
//! written once in the SQL both accept (`$1` parameters, BIGINT unix-millisecond times, TEXT ids).

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::AnyPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL {0:?} is neither sqlite:// nor postgres://")]
    UnknownScheme(String),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

#[derive(Clone)]
pub struct Db {
    pool: AnyPool,
    kind: DbKind,
}

static SQLITE: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");
static POSTGRES: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

impl Db {
    /// Connects and brings the schema up to date. A SQLite file is created if missing; SQLite runs
    /// in WAL mode with a busy timeout so concurrent writers wait instead of failing.
    pub async fn connect(url: &str) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            DbKind::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            DbKind::Postgres
        } else {
            return Err(DbError::UnknownScheme(url.split(':').next().unwrap_or_default().into()));
        };
        if kind == DbKind::Sqlite {
            create_private_sqlite_file(url)?;
        }
        let options = AnyConnectOptions::from_str(url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if kind == DbKind::Sqlite { 8 } else { 16 })
            .acquire_timeout(Duration::from_secs(10))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if kind == DbKind::Sqlite {
                        use sqlx::Executor;
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        let db = Self { pool, kind };
        match kind {
            DbKind::Sqlite => SQLITE.run(&db.pool).await?,
            DbKind::Postgres => POSTGRES.run(&db.pool).await?,
        }
        Ok(db)
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kind(&self) -> DbKind {
        self.kind
    }
}

/// Creates a missing SQLite file readable by its owner only, before SQLite would create it with
/// the umask's mode (0644): it holds password hashes and sessions. A file an earlier version left
/// readable by others is narrowed to the owner. SQLite gives its `-wal` and `-shm` files the
/// database file's mode.
fn create_private_sqlite_file(url: &str) -> Result<(), DbError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let options = sqlx::sqlite::SqliteConnectOptions::from_str(url)?;
    let path = options.get_filename();
    if path.as_os_str().is_empty() || path == std::path::Path::new(":memory:") || url.contains("mode=memory") {
        return Ok(());
    }
    // Not creatable here (a missing directory, say): SQLite opens it or says why.
    let _ = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
                Ok(()) => {
                    tracing::warn!(path = %path.display(), "the database file was readable by others; now owner-only")
                }
                Err(e) => tracing::warn!(path = %path.display(), error = %e, "the database file is readable by others"),
            }
        }
    }
    Ok(())
}

/// Now, in the unit every table stores.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// A fresh 128-bit random id, hex.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    hex::encode(bytes)
}

/// Whether an error is a unique-constraint violation (an allocation race lost, a duplicate name).
pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.is_unique_violation()
                || d.message().contains("UNIQUE constraint failed")
                || d.code().as_deref() == Some("23505")
        }
        _ => false,
    }
}

pub mod testing;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[tokio::test]
    async fn a_sqlite_file_is_the_owners_alone_new_or_left_wider_by_an_earlier_version() {
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let new = dir.path().join("new.db");
        Db::connect(&format!("sqlite://{}?mode=rwc", new.display())).await.unwrap();
        assert_eq!(mode(&new), 0o600);
        let old = dir.path().join("old.db");
        std::fs::write(&old, b"").unwrap();
        std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o644)).unwrap();
        Db::connect(&format!("sqlite://{}?mode=rwc", old.display())).await.unwrap();
        assert_eq!(mode(&old), 0o600);
    }
}
