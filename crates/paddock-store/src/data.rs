//! App data: the values apps keep through `wasi:keyvalue` (their buckets and their users'
//! sessions) and the sessions' expiry. Front-ends read and write these rows directly, so that an
//! app's data outlives any one front-end and does not depend on the controller being up.
//!
//! A bucket's values are in `app_values (app, bucket, key)`; a session's in `session_values
//! (app, session, key)`, whose foreign key to `app_sessions` deletes them with their session (and
//! refuses a write to a session already swept).

use paddock_api::{BucketSummary, DataSummary};
use paddock_core::data::{Scope, SessionFound};
use sqlx::Row as _;

use crate::{Dialect, Result, SqlStore, StoreError};

/// The table and column that hold a scope's values, and the column's value.
fn place(scope: Scope<'_>) -> (&'static str, &'static str, &str) {
    match scope {
        Scope::Bucket(name) => ("app_values", "bucket", name),
        Scope::Session(id) => ("session_values", "session", id),
    }
}

/// How many expired sessions one statement of the sweep deletes: the write lock is let go
/// between batches, so that front-ends and the controller write meanwhile.
const SWEEP_BATCH: u64 = 500;

impl SqlStore {
    /// Waits for this process's turn to write app data, on SQLite (see `data_writes`).
    pub(crate) async fn data_write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.dialect {
            Dialect::Sqlite => Some(self.data_writes.lock().await),
            Dialect::Postgres => None,
        }
    }

    /// Opens the database of a farm for its app data, as a front-end does: no migration (the
    /// controller migrates) and no new SQLite file, but a clear error when the tables are not
    /// there yet.
    pub async fn open_data(url: &str) -> Result<SqlStore> {
        let store = SqlStore::connect(url, false).await?;
        let probe = sqlx::query("SELECT 1 FROM session_values WHERE app = '' LIMIT 1")
            .fetch_optional(&store.pool)
            .await;
        match probe {
            Ok(_) => Ok(store),
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("42P01")
                    || e.message().contains("no such table") =>
            {
                Err(StoreError::NoAppData(e.message().to_string()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub async fn data_get(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        let (table, column, owner) = place(scope);
        let row = sqlx::query(&self.sql(&format!(
            "SELECT value FROM {table} WHERE app = $1 AND {column} = $2 AND key = $3"
        )))
        .bind(app)
        .bind(owner)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => Some(row.try_get(0)?),
            None => None,
        })
    }

    pub async fn data_set(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
        value: &[u8],
    ) -> Result<()> {
        let _turn = self.data_write_turn().await;
        let (table, column, owner) = place(scope);
        sqlx::query(&self.sql(&format!(
            "INSERT INTO {table} (app, {column}, key, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (app, {column}, key) DO UPDATE SET value = excluded.value"
        )))
        .bind(app)
        .bind(owner)
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn data_delete(&self, app: &str, scope: Scope<'_>, key: &str) -> Result<()> {
        let _turn = self.data_write_turn().await;
        let (table, column, owner) = place(scope);
        sqlx::query(&self.sql(&format!(
            "DELETE FROM {table} WHERE app = $1 AND {column} = $2 AND key = $3"
        )))
        .bind(app)
        .bind(owner)
        .bind(key)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Up to `limit` keys of a scope in key order, after `after` (from the first without it).
    /// Keys written or deleted between two pages move no other key in or out of the next one.
    pub async fn data_keys(
        &self,
        app: &str,
        scope: Scope<'_>,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<String>> {
        let (table, column, owner) = place(scope);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = match after {
            Some(_) => format!(
                "SELECT key FROM {table} WHERE app = $1 AND {column} = $2 AND key > $3 \
                 ORDER BY key LIMIT $4"
            ),
            None => format!(
                "SELECT key FROM {table} WHERE app = $1 AND {column} = $2 ORDER BY key LIMIT $3"
            ),
        };
        let sql = self.sql(&query);
        let query = sqlx::query(&sql).bind(app).bind(owner);
        let query = match after {
            Some(after) => query.bind(after).bind(limit),
            None => query.bind(limit),
        };
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .collect()
    }

    /// Adds `delta` to the decimal number stored at `key` (0 when there is none), atomically
    /// across the farm, and returns the sum. A value that is not a decimal number, or a sum past
    /// `i64::MAX`, is refused with [`StoreError::DataValue`] and changes nothing.
    pub async fn data_increment(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
        delta: u64,
    ) -> Result<u64> {
        let _turn = self.data_write_turn().await;
        let refused = || {
            StoreError::DataValue(format!(
                "cannot increment {key:?} by {delta}: its value must be a decimal number, and the sum at most {}",
                i64::MAX
            ))
        };
        let delta_i64 = i64::try_from(delta).map_err(|_| refused())?;
        let (table, column, owner) = place(scope);
        // One statement, so that the row (PostgreSQL) or the write lock (SQLite) is held for no
        // round trip: other increments of the key wait the shortest time (on SQLite they would
        // sleep in its busy handler). A value that is no decimal number, or a sum past
        // i64::MAX, makes the new value NULL, which the NOT NULL constraint refuses: nothing
        // changes.
        let sql = match self.dialect {
            Dialect::Sqlite => format!(
                "INSERT INTO {table} (app, {column}, key, value) \
                 VALUES (?1, ?2, ?3, CAST(CAST(?4 AS TEXT) AS BLOB)) \
                 ON CONFLICT (app, {column}, key) DO UPDATE SET value = CASE \
                   WHEN CAST({table}.value AS TEXT) GLOB '[0-9]*' \
                    AND CAST({table}.value AS TEXT) NOT GLOB '*[^0-9]*' \
                    AND length({table}.value) <= 19 \
                    AND CAST(CAST({table}.value AS TEXT) AS INTEGER) <= 9223372036854775807 - ?4 \
                   THEN CAST(CAST(CAST(CAST({table}.value AS TEXT) AS INTEGER) + ?4 AS TEXT) AS BLOB) \
                   ELSE NULL END \
                 RETURNING value"
            ),
            // `encode(.., 'escape')` reads any bytes as text without failing (a value that is
            // not UTF-8 is simply no number); the cast to numeric is in a CASE of its own, so
            // that it never runs on what the pattern refused (an AND's order is not fixed).
            Dialect::Postgres => format!(
                "INSERT INTO {table} (app, {column}, key, value) \
                 VALUES ($1, $2, $3, convert_to($4::text, 'UTF8')) \
                 ON CONFLICT (app, {column}, key) DO UPDATE SET value = CASE \
                   WHEN encode({table}.value, 'escape') ~ '^[0-9]{{1,19}}$' THEN CASE \
                     WHEN encode({table}.value, 'escape')::numeric + $4 <= 9223372036854775807 \
                     THEN convert_to((encode({table}.value, 'escape')::numeric + $4)::text, 'UTF8') \
                   END END \
                 RETURNING value"
            ),
        };
        let rows = sqlx::query(&sql)
            .bind(app)
            .bind(owner)
            .bind(key)
            .bind(delta_i64)
            // All rows, so that the statement runs to its end and (SQLite) its implicit
            // transaction commits now, not when the statement is reset.
            .fetch_all(&self.pool)
            .await;
        let sum: Vec<u8> = match rows {
            Ok(rows) => match rows.first() {
                Some(row) => row.try_get(0)?,
                None => return Err(StoreError::Corrupt("increment returned nothing".into())),
            },
            // SQLite says "NOT NULL constraint failed"; PostgreSQL's code is 23502.
            Err(sqlx::Error::Database(e))
                if e.code().as_deref() == Some("23502") || e.message().contains("NOT NULL") =>
            {
                return Err(refused());
            }
            Err(e) => return Err(e.into()),
        };
        std::str::from_utf8(&sum)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| {
                StoreError::Corrupt(format!("the sum stored at {key:?} is not a number"))
            })
    }

    /// Uses a session: a live one is extended to `now_ms + idle_ms` once a tenth of `idle_ms`
    /// has passed since it last was (so that a user's every request is not a write), or at once
    /// if it would live longer than that (`idle_ms` was lowered). With `may_extend` false (the
    /// cookie could not go with the extension), it is only looked at.
    pub async fn session_touch(
        &self,
        app: &str,
        id: &str,
        now_ms: i64,
        idle_ms: i64,
        may_extend: bool,
    ) -> Result<SessionFound> {
        let row = sqlx::query(&self.sql(
            "SELECT expires_ms FROM app_sessions WHERE app = $1 AND id = $2 AND expires_ms > $3",
        ))
        .bind(app)
        .bind(id)
        .bind(now_ms)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(SessionFound::Missing);
        };
        let expires_ms: i64 = row.try_get(0)?;
        let extended_ms = now_ms.saturating_add(idle_ms);
        let recent = expires_ms <= extended_ms && extended_ms - expires_ms < idle_ms / 10;
        if recent || !may_extend {
            return Ok(SessionFound::Live);
        }
        let _turn = self.data_write_turn().await;
        let done = sqlx::query(&self.sql(
            "UPDATE app_sessions SET expires_ms = $1 WHERE app = $2 AND id = $3 AND expires_ms > $4",
        ))
        .bind(extended_ms)
        .bind(app)
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(if done.rows_affected() == 1 {
            SessionFound::Extended
        } else {
            SessionFound::Missing
        })
    }

    /// Records a new session, unused until `now_ms + idle_ms`.
    pub async fn session_create(
        &self,
        app: &str,
        id: &str,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<()> {
        let _turn = self.data_write_turn().await;
        sqlx::query(&self.sql(
            "INSERT INTO app_sessions (app, id, created_ms, expires_ms) VALUES ($1, $2, $3, $4)",
        ))
        .bind(app)
        .bind(id)
        .bind(now_ms)
        .bind(now_ms.saturating_add(idle_ms))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What an app keeps: its buckets' sizes and its sessions, as of `now_ms`.
    pub async fn data_summary(&self, app: &str, now_ms: i64) -> Result<DataSummary> {
        let rows = sqlx::query(&self.sql(
            "SELECT bucket, COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM app_values \
             WHERE app = $1 GROUP BY bucket ORDER BY bucket",
        ))
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let buckets = rows
            .iter()
            .map(|row| {
                Ok(BucketSummary {
                    name: row.try_get(0)?,
                    keys: row.try_get(1)?,
                    bytes: row.try_get(2)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let sessions = sqlx::query(&self.sql(
            "SELECT COALESCE(SUM(CASE WHEN expires_ms > $2 THEN 1 ELSE 0 END), 0), COUNT(*) \
             FROM app_sessions WHERE app = $1",
        ))
        .bind(app)
        .bind(now_ms)
        .fetch_one(&self.pool)
        .await?;
        let (live_sessions, all_sessions): (i64, i64) =
            (sessions.try_get(0)?, sessions.try_get(1)?);
        let values = sqlx::query(&self.sql(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(value)), 0) FROM session_values WHERE app = $1",
        ))
        .bind(app)
        .fetch_one(&self.pool)
        .await?;
        Ok(DataSummary {
            app: app.to_string(),
            buckets,
            live_sessions,
            expired_sessions: all_sessions - live_sessions,
            session_keys: values.try_get(0)?,
            session_bytes: values.try_get(1)?,
        })
    }

    /// Ends every session of an app, with its values (every user of the app starts anew).
    /// Returns how many were live at `now_ms`.
    pub async fn end_sessions(&self, app: &str, now_ms: i64) -> Result<u64> {
        let _turn = self.data_write_turn().await;
        let ended =
            sqlx::query(&self.sql("DELETE FROM app_sessions WHERE app = $1 RETURNING expires_ms"))
                .bind(app)
                .fetch_all(&self.pool)
                .await?;
        let mut live = 0;
        for row in &ended {
            if row.try_get::<i64, _>(0)? > now_ms {
                live += 1;
            }
        }
        Ok(live)
    }

    /// Runs [`SqlStore::sweep_sessions`] every minute, for ever, and forgets the cache purges
    /// older than [`crate::PURGE_LOG_KEEP_MS`]: the controller does, or a front-end running
    /// alone. Front-ends never use an expired session, swept or not: this only frees the space.
    pub async fn sweep_sessions_every_minute(store: std::sync::Arc<SqlStore>) {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
        loop {
            every.tick().await;
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            match store.sweep_sessions(now_ms).await {
                Ok(0) => {}
                Ok(gone) => tracing::debug!(gone, "expired sessions forgotten"),
                Err(e) => {
                    tracing::warn!("forgetting expired sessions failed (next try in a minute): {e}")
                }
            }
            match store.cache_purges_forget(crate::PURGE_LOG_KEEP_MS).await {
                Ok(0) => {}
                Ok(gone) => tracing::debug!(gone, "old cache purges forgotten"),
                Err(e) => {
                    tracing::warn!("forgetting old cache purges failed (next try in a minute): {e}")
                }
            }
        }
    }

    /// Forgets the sessions that expired by `now_ms`, with their values, a batch at a time.
    /// Returns how many.
    pub async fn sweep_sessions(&self, now_ms: i64) -> Result<u64> {
        let mut gone = 0;
        loop {
            let batch = sqlx::query(&self.sql(&format!(
                "DELETE FROM app_sessions WHERE (app, id) IN \
                 (SELECT app, id FROM app_sessions WHERE expires_ms <= $1 LIMIT {SWEEP_BATCH})"
            )))
            .bind(now_ms)
            .execute(&self.pool)
            .await?
            .rows_affected();
            gone += batch;
            if batch < SWEEP_BATCH {
                return Ok(gone);
            }
        }
    }
}
