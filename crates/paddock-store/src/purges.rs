//! The purge log (`cache_purges`): what the front-ends read to drop cached responses farm-wide.
//!
//! Invariant: ids become visible in increasing order, so that a reader that has applied every
//! row up to id N and reads `id > N` never misses one. SQLite has one writer at a time; on
//! PostgreSQL, a writer takes a transaction-scoped advisory lock before its ids are drawn and
//! keeps it until they are committed.

use paddock_api::CachePurge;
use sqlx::Row as _;

use crate::{Dialect, Result, SqlStore};

/// The advisory lock that orders the writers of the purge log on PostgreSQL.
const PURGE_LOG_LOCK: i64 = 0x7061_6464_6f63_6b01;

/// How long the log keeps a purge. A front-end that could not read the log for longer than
/// its blind time has stopped serving from its cache and empties it when it reads again.
pub const PURGE_LOG_KEEP_MS: i64 = 3_600_000;

impl SqlStore {
    /// The database's clock, in milliseconds since the Unix epoch: rows of the log are dated
    /// and forgotten by one clock, whichever machine wrote them.
    fn now_ms_sql(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)",
            Dialect::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
        }
    }

    /// Appends a purge of `app`'s cached responses: one row per tag, or one row with no tag for
    /// all of them. Returns the ids written, in order.
    pub async fn cache_purge_add(
        &self,
        app: &str,
        tags: &[String],
        source: &str,
    ) -> Result<Vec<i64>> {
        let _turn = self.data_write_turn().await;
        let mut tx = self.pool.begin().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PURGE_LOG_LOCK)
                .execute(&mut *tx)
                .await?;
        }
        let insert = self.sql(&format!(
            "INSERT INTO cache_purges (app, tag, at_ms, source) VALUES ($1, $2, {}, $3) RETURNING id",
            self.now_ms_sql()
        ))
        .into_owned();
        let all = [None];
        let tags: Vec<Option<&str>> = if tags.is_empty() {
            all.to_vec()
        } else {
            tags.iter().map(|t| Some(t.as_str())).collect()
        };
        let mut ids = Vec::with_capacity(tags.len());
        for tag in tags {
            let row = sqlx::query(&insert)
                .bind(app)
                .bind(tag)
                .bind(source)
                .fetch_one(&mut *tx)
                .await?;
            ids.push(row.try_get::<i64, _>(0)?);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// The newest purge's id (0 when the log is empty): where a reader starting now begins.
    pub async fn cache_purge_last(&self) -> Result<i64> {
        let row = sqlx::query("SELECT MAX(id) FROM cache_purges")
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0))
    }

    /// The purges after `id`, oldest first, at most `limit`.
    pub async fn cache_purges_after(&self, id: i64, limit: u32) -> Result<Vec<CachePurge>> {
        let rows = sqlx::query(&self.sql(&format!(
            "SELECT id, app, tag, at_ms, source FROM cache_purges WHERE id > $1 ORDER BY id LIMIT {limit}"
        )))
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(CachePurge {
                    id: row.try_get("id")?,
                    app: row.try_get("app")?,
                    tag: row.try_get("tag")?,
                    at_ms: row.try_get("at_ms")?,
                    source: row.try_get("source")?,
                })
            })
            .collect()
    }

    /// Forgets the purges older than `keep_ms`, by the database's clock. Returns how many.
    pub async fn cache_purges_forget(&self, keep_ms: i64) -> Result<u64> {
        let _turn = self.data_write_turn().await;
        let sql = format!(
            "DELETE FROM cache_purges WHERE at_ms < {} - $1",
            self.now_ms_sql()
        );
        Ok(sqlx::query(&self.sql(&sql))
            .bind(keep_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }
}
