//! App data: the values apps keep through `wasi:keyvalue` (their buckets and their users'
//! sessions) and the sessions' expiry. Front-ends read and write these rows directly, so that an
//! app's data outlives any one front-end and does not depend on the controller being up.

use paddock_core::data::Scope;
use sqlx::Row as _;

use crate::{Result, SqlStore, StoreError};

/// The `scope` column: `b:` and a bucket name, or `s:` and a session id.
fn scope_column(scope: Scope<'_>) -> String {
    match scope {
        Scope::Bucket(name) => format!("b:{name}"),
        Scope::Session(id) => format!("s:{id}"),
    }
}

impl SqlStore {
    /// Opens the database of a farm for its app data, as a front-end does: no migration (the
    /// controller migrates), but a clear error when the tables are not there yet.
    pub async fn open_data(url: &str) -> Result<SqlStore> {
        let store = SqlStore::connect(url).await?;
        let probe = sqlx::query("SELECT 1 FROM app_values WHERE app = '' LIMIT 1")
            .fetch_optional(&store.pool)
            .await;
        match probe {
            Ok(_) => Ok(store),
            Err(sqlx::Error::Database(e)) => Err(StoreError::NoAppData(e.message().to_string())),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn data_get(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
    ) -> Result<Option<Vec<u8>>> {
        let row = sqlx::query(
            &self.sql("SELECT value FROM app_values WHERE app = $1 AND scope = $2 AND key = $3"),
        )
        .bind(app)
        .bind(scope_column(scope))
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
        sqlx::query(&self.sql(
            "INSERT INTO app_values (app, scope, key, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (app, scope, key) DO UPDATE SET value = excluded.value",
        ))
        .bind(app)
        .bind(scope_column(scope))
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn data_delete(&self, app: &str, scope: Scope<'_>, key: &str) -> Result<()> {
        sqlx::query(&self.sql("DELETE FROM app_values WHERE app = $1 AND scope = $2 AND key = $3"))
            .bind(app)
            .bind(scope_column(scope))
            .bind(key)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Up to `limit` keys of a scope in key order, from the `offset`th on.
    pub async fn data_keys(
        &self,
        app: &str,
        scope: Scope<'_>,
        offset: u64,
        limit: u64,
    ) -> Result<Vec<String>> {
        let rows = sqlx::query(&self.sql(
            "SELECT key FROM app_values WHERE app = $1 AND scope = $2 ORDER BY key LIMIT $3 OFFSET $4",
        ))
        .bind(app)
        .bind(scope_column(scope))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| row.try_get(0).map_err(StoreError::from))
            .collect()
    }

    /// Adds `delta` to the decimal number stored at `key` (0 when there is none), atomically
    /// across the farm, and returns the sum.
    pub async fn data_increment(
        &self,
        app: &str,
        scope: Scope<'_>,
        key: &str,
        delta: u64,
    ) -> Result<u64> {
        let scope = scope_column(scope);
        let mut tx = self.pool.begin().await?;
        // A write first: it takes the row lock (PostgreSQL) or the write lock (SQLite) before
        // the value is read, so that no other increment comes in between.
        let row = sqlx::query(&self.sql(
            "INSERT INTO app_values (app, scope, key, value) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (app, scope, key) DO UPDATE SET value = app_values.value RETURNING value",
        ))
        .bind(app)
        .bind(&scope)
        .bind(key)
        .bind(b"0".as_slice())
        .fetch_one(&mut *tx)
        .await?;
        let current: Vec<u8> = row.try_get(0)?;
        let current = std::str::from_utf8(&current)
            .ok()
            .and_then(|text| text.parse::<u64>().ok())
            .ok_or_else(|| {
                StoreError::DataValue(format!(
                    "the value of {key:?} is not a decimal number, which increment needs"
                ))
            })?;
        let sum = current.checked_add(delta).ok_or_else(|| {
            StoreError::DataValue(format!("incrementing {key:?} by {delta} overflows a u64"))
        })?;
        sqlx::query(
            &self
                .sql("UPDATE app_values SET value = $1 WHERE app = $2 AND scope = $3 AND key = $4"),
        )
        .bind(sum.to_string().into_bytes())
        .bind(app)
        .bind(&scope)
        .bind(key)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(sum)
    }

    /// Extends a session that has not expired to `now_ms + idle_ms`; false when there is no
    /// such session (never was, or expired).
    pub async fn session_touch(
        &self,
        app: &str,
        id: &str,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<bool> {
        let done = sqlx::query(&self.sql(
            "UPDATE app_sessions SET expires_ms = $1 WHERE app = $2 AND id = $3 AND expires_ms > $4",
        ))
        .bind(now_ms.saturating_add(idle_ms))
        .bind(app)
        .bind(id)
        .bind(now_ms)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a new session, unused until `now_ms + idle_ms`.
    pub async fn session_create(
        &self,
        app: &str,
        id: &str,
        now_ms: i64,
        idle_ms: i64,
    ) -> Result<()> {
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

    /// Forgets the sessions that expired by `now_ms`, and their values. Returns how many.
    pub async fn sweep_sessions(&self, now_ms: i64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query(&self.sql("DELETE FROM app_sessions WHERE expires_ms <= $1"))
            .bind(now_ms)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(
            "DELETE FROM app_values WHERE scope LIKE 's:%' AND NOT EXISTS \
             (SELECT 1 FROM app_sessions s WHERE s.app = app_values.app AND app_values.scope = 's:' || s.id)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(gone)
    }
}
