//! The admin API over the apps' data (`/v1/apps/{app}/data...`): what an app keeps, a bucket's
//! keys, one value read, written or deleted by hand, and every session of an app ended. The
//! apps themselves reach their data from the front-ends, not through here.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use paddock_api::{DataKeys, DataSummary};
use paddock_core::data::{SESSION_BUCKET, Scope, bucket_problem, key_problem, value_problem};
use serde::{Deserialize, Serialize};

use crate::api::{Failure, audit_change, unknown_app};
use crate::extract::{Json, Path, Query};
use crate::{Controller, now_ms};

type Answer<T> = Result<Json<T>, Failure>;

/// An app's data is reachable here once the app exists (it may have none yet).
async fn known_app(c: &Controller, app: &str) -> Result<(), Failure> {
    if c.store.versions(app).await?.is_empty() {
        return Err(unknown_app(app));
    }
    Ok(())
}

/// A bucket name the API takes: any an app may open, except `session`, which names the user's
/// session in an app, not a bucket (sessions are reached here only as a whole).
fn check_bucket(bucket: &str) -> Result<(), Failure> {
    if bucket == SESSION_BUCKET {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "bad_bucket",
            "\"session\" is each user's session in an app, not a bucket: sessions are not reached by key here (`paddock data end-sessions APP` ends them all)",
        ));
    }
    match bucket_problem(bucket) {
        Some(problem) => Err(Failure::new(StatusCode::BAD_REQUEST, "bad_bucket", problem)),
        None => Ok(()),
    }
}

pub(crate) async fn summary(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
) -> Answer<DataSummary> {
    known_app(&c, &app).await?;
    Ok(Json(c.data.data_summary(&app, now_ms()).await?))
}

#[derive(Deserialize)]
pub(crate) struct KeysQuery {
    /// The bucket (`""`, the default bucket, when absent).
    #[serde(default)]
    bucket: String,
    after: Option<String>,
    limit: Option<u64>,
}

pub(crate) async fn keys(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
    Query(q): Query<KeysQuery>,
) -> Answer<DataKeys> {
    known_app(&c, &app).await?;
    check_bucket(&q.bucket)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let mut keys = c
        .data
        .data_keys(
            &app,
            Scope::Bucket(&q.bucket),
            q.after.as_deref(),
            limit + 1,
        )
        .await?;
    let more = keys.len() as u64 > limit;
    keys.truncate(limit as usize);
    Ok(Json(DataKeys { keys, more }))
}

#[derive(Deserialize)]
pub(crate) struct KeyQuery {
    #[serde(default)]
    bucket: String,
    key: String,
}

impl KeyQuery {
    fn check(&self) -> Result<(), Failure> {
        check_bucket(&self.bucket)?;
        match key_problem(&self.key) {
            Some(problem) => Err(Failure::new(StatusCode::BAD_REQUEST, "bad_key", problem)),
            None => Ok(()),
        }
    }
}

/// The value's bytes as they are (`application/octet-stream`), or 404.
pub(crate) async fn get_value(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Result<Response, Failure> {
    known_app(&c, &app).await?;
    q.check()?;
    match c
        .data
        .data_get(&app, Scope::Bucket(&q.bucket), &q.key)
        .await?
    {
        Some(value) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], value).into_response())
        }
        None => Err(Failure::new(
            StatusCode::NOT_FOUND,
            "unknown_key",
            format!(
                "{app} has no key {:?} in its bucket {:?}; `paddock data keys {app}` lists them",
                q.key, q.bucket
            ),
        )),
    }
}

pub(crate) async fn put_value(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
    Query(q): Query<KeyQuery>,
    body: Bytes,
) -> Result<StatusCode, Failure> {
    known_app(&c, &app).await?;
    q.check()?;
    if let Some(problem) = value_problem(&q.key, body.len()) {
        return Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "value_too_large",
            problem,
        ));
    }
    c.data
        .data_set(&app, Scope::Bucket(&q.bucket), &q.key, &body)
        .await?;
    let detail = format!(
        "{app} bucket {:?} key {:?} ({} bytes)",
        q.bucket,
        q.key,
        body.len()
    );
    audit_change(&c, "data-set", &detail).await;
    Ok(StatusCode::NO_CONTENT)
}

pub(crate) async fn delete_value(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
    Query(q): Query<KeyQuery>,
) -> Result<StatusCode, Failure> {
    known_app(&c, &app).await?;
    q.check()?;
    c.data
        .data_delete(&app, Scope::Bucket(&q.bucket), &q.key)
        .await?;
    let detail = format!("{app} bucket {:?} key {:?}", q.bucket, q.key);
    audit_change(&c, "data-delete", &detail).await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, Deserialize)]
pub struct SessionsEnded {
    pub app: String,
    /// Live sessions ended (expired ones not swept yet went too, uncounted).
    pub ended: u64,
}

/// Ends every session of the app: each of its users starts a new one at their next request.
pub(crate) async fn end_sessions(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
) -> Answer<SessionsEnded> {
    known_app(&c, &app).await?;
    let ended = c.data.end_sessions(&app, now_ms()).await?;
    audit_change(&c, "sessions-end", &format!("{app}: {ended} session(s)")).await;
    Ok(Json(SessionsEnded { app, ended }))
}
