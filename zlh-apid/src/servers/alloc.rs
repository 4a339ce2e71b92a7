//! vmid and port allocation: a lease row per number, taken by a unique insert, so two requests
//! (or two API replicas) racing for the same number cannot both win; the loser tries the next
//! free one. Game servers get vmids 5000–5999, dev containers 6000–6999.

use std::ops::RangeInclusive;

use sqlx::Row;

use crate::db::{is_unique_violation, Db, DbError};

pub const GAME_VMIDS: RangeInclusive<u32> = 5000..=5999;
pub const DEV_VMIDS: RangeInclusive<u32> = 6000..=6999;

/// Attempts before giving up under heavy contention (each lost race moves on to another number).
const ATTEMPTS: usize = 200;

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("no free {what} left in {from}..={to}")]
    Exhausted { what: &'static str, from: u32, to: u32 },
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for AllocError {
    fn from(e: sqlx::Error) -> Self {
        AllocError::Db(DbError::Sql(e))
    }
}

/// One kind of leased number: its table and column.
struct Leases {
    table: &'static str,
    column: &'static str,
    what: &'static str,
}

const VMID: Leases = Leases { table: "vmid_leases", column: "vmid", what: "vmid" };
const PORT: Leases = Leases { table: "port_leases", column: "port", what: "port" };

/// Leases the lowest free vmid in `range` for `server_id`.
pub async fn allocate_vmid(db: &Db, range: RangeInclusive<u32>, server_id: &str) -> Result<u32, AllocError> {
    allocate(db, &VMID, range, server_id).await
}

/// Leases the lowest free port in `range` for `server_id`.
pub async fn allocate_port(db: &Db, range: RangeInclusive<u32>, server_id: &str) -> Result<u32, AllocError> {
    allocate(db, &PORT, range, server_id).await
}

/// Gives back every vmid and port of a server.
pub async fn release_all(db: &Db, server_id: &str) -> Result<(), AllocError> {
    for l in [&VMID, &PORT] {
        sqlx::query(&format!("DELETE FROM {} WHERE server_id = $1", l.table))
            .bind(server_id)
            .execute(db.pool())
            .await?;
    }
    Ok(())
}

async fn allocate(db: &Db, l: &Leases, range: RangeInclusive<u32>, server_id: &str) -> Result<u32, AllocError> {
    let (from, to) = (*range.start(), *range.end());
    let mut skip = 0usize;
    for _ in 0..ATTEMPTS {
        // The free numbers, lowest first; after a lost race, further along so racers spread out.
        let taken: Vec<i64> = sqlx::query(&format!(
            "SELECT {c} FROM {t} WHERE {c} BETWEEN $1 AND $2 ORDER BY {c}",
            c = l.column,
            t = l.table
        ))
        .bind(from as i64)
        .bind(to as i64)
        .fetch_all(db.pool())
        .await?
        .iter()
        .map(|r| r.get::<i64, _>(0))
        .collect();
        let taken: std::collections::HashSet<i64> = taken.into_iter().collect();
        let free: Vec<u32> = range.clone().filter(|n| !taken.contains(&(*n as i64))).take(skip + 1).collect();
        let Some(&candidate) = free.get(skip.min(free.len().saturating_sub(1))) else {
            return Err(AllocError::Exhausted { what: l.what, from, to });
        };
        let inserted = sqlx::query(&format!("INSERT INTO {} ({}, server_id) VALUES ($1, $2)", l.table, l.column))
            .bind(candidate as i64)
            .bind(server_id)
            .execute(db.pool())
            .await;
        match inserted {
            Ok(_) => return Ok(candidate),
            Err(e) if is_unique_violation(&e) => skip = (skip + 1 + random_below(4)) % 64,
            Err(e) => return Err(e.into()),
        }
    }
    Err(AllocError::Exhausted { what: l.what, from, to })
}

fn random_below(n: usize) -> usize {
    let mut b = [0u8; 1];
    let _ = getrandom::fill(&mut b);
    b[0] as usize % n.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::testing;

    #[tokio::test]
    async fn lowest_free_first_and_released_numbers_come_back() {
        for (name, t) in testing::both().await {
            let db = &t.db;
            assert_eq!(allocate_vmid(db, 5000..=5002, "a").await.unwrap(), 5000, "{name}");
            assert_eq!(allocate_vmid(db, 5000..=5002, "b").await.unwrap(), 5001);
            assert_eq!(allocate_vmid(db, 5000..=5002, "c").await.unwrap(), 5002);
            assert!(matches!(allocate_vmid(db, 5000..=5002, "d").await, Err(AllocError::Exhausted { .. })));
            release_all(db, "b").await.unwrap();
            assert_eq!(allocate_vmid(db, 5000..=5002, "d").await.unwrap(), 5001, "{name}");
            assert_eq!(allocate_port(db, 30000..=30010, "d").await.unwrap(), 30000);
        }
    }
}
