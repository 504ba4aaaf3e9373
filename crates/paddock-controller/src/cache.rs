//! The admin API over the front-ends' response caches: `POST /v1/apps/{app}/cache/purge`
//! writes a purge to the farm's purge log, which every front-end follows on its own (so that
//! purges from apps reach the farm while the controller is down too). The answer's id is what
//! the front-ends report (`cache.purged` in their heartbeat) once they applied it.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use paddock_api::{PurgeAnswer, PurgeRequest};
use paddock_core::cache::{ADMIN_SOURCE, tag_problem};

use crate::api::{Failure, audit_change, unknown_app};
use crate::extract::{Json, Path};
use crate::{Controller, now_ms};

/// The most tags one purge names.
const MAX_TAGS: usize = 64;

pub(crate) async fn purge(
    State(c): State<Arc<Controller>>,
    Path(app): Path<String>,
    Json(request): Json<PurgeRequest>,
) -> Result<Json<PurgeAnswer>, Failure> {
    if c.store.versions(&app).await?.is_empty() {
        return Err(unknown_app(&app));
    }
    if request.tags.len() > MAX_TAGS {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "bad_tag",
            format!(
                "{} tags in one purge; at most {MAX_TAGS}: purge in several calls, or the whole app without --tag",
                request.tags.len()
            ),
        ));
    }
    if let Some(problem) = request.tags.iter().find_map(|t| tag_problem(t)) {
        return Err(Failure::new(StatusCode::BAD_REQUEST, "bad_tag", problem));
    }
    let mut tags = request.tags;
    tags.sort();
    tags.dedup();
    let ids = c.data.cache_purge_add(&app, &tags, ADMIN_SOURCE).await?;
    let purge = ids.last().copied().unwrap_or_default();
    let what = if tags.is_empty() {
        "every cached response".to_string()
    } else {
        format!("tags {}", tags.join(", "))
    };
    audit_change(&c, "cache-purge", &format!("{app}: {what} (purge {purge})")).await;
    tracing::info!(app, purge, "cache purge: {what}");
    Ok(Json(PurgeAnswer {
        app,
        tags,
        purge,
        at_ms: now_ms(),
    }))
}
