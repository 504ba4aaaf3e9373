//! Active health checks: `GET /_paddock/health` on each front-end every interval, on a connection
//! of its own. 200 with a health report passes (and says which apps the server serves); anything
//! else, or no answer within the timeout, fails.

use std::sync::{Arc, Weak};

use http::StatusCode;
use paddock_api::HealthReport;

use crate::h1::Connection;
use crate::upstream::{HealthConfig, Upstream};

const HEALTH_PATH: &str = "/_paddock/health";
/// Largest health report read.
const MAX_REPORT: usize = 1024 * 1024;

/// Checks `upstream` every interval for as long as a routing table holds it.
pub async fn watch(upstream: Weak<Upstream>, config: HealthConfig) {
    let mut conn = None;
    loop {
        tokio::time::sleep(config.interval).await;
        let Some(upstream) = upstream.upgrade() else {
            return;
        };
        if upstream.maint.load(std::sync::atomic::Ordering::Acquire) {
            conn = None;
            continue;
        }
        check(&upstream, &config, &mut conn).await;
    }
}

/// One check; `conn` keeps the checker's connection between checks.
pub async fn check(upstream: &Arc<Upstream>, config: &HealthConfig, conn: &mut Option<Connection>) {
    match tokio::time::timeout(config.timeout, probe(upstream, conn)).await {
        Ok(Ok(apps)) => upstream.check_passed(apps, config.rise),
        // No connection for want of something on this machine: the check did not happen, and
        // counts neither way (what is short was said, at most every 5 s).
        Ok(Err(Probe::Shortage)) => {
            tracing::debug!(upstream = %upstream.name, "health check skipped: no connection could be opened");
        }
        Ok(Err(Probe::Failed(why))) => {
            *conn = None;
            upstream.check_failed(&why, config.fall);
        }
        Err(_) => {
            *conn = None;
            upstream.check_failed(
                &format!("health check took longer than {:?}", config.timeout),
                config.fall,
            );
        }
    }
}

/// Why a probe gave no health report.
enum Probe {
    /// Its connection could not be opened for a want on this machine (see
    /// [`crate::upstream::shortage`]).
    Shortage,
    Failed(String),
}

impl From<String> for Probe {
    fn from(why: String) -> Probe {
        Probe::Failed(why)
    }
}

async fn probe(upstream: &Upstream, conn: &mut Option<Connection>) -> Result<Vec<String>, Probe> {
    let mut connection = match conn.take() {
        Some(c) if c.is_open() => c,
        _ => match upstream.connect(None).await {
            Ok(c) => c,
            Err(e) => match crate::upstream::shortage(&e) {
                Some(hint) => {
                    crate::upstream::warn_shortage(&e, hint);
                    return Err(Probe::Shortage);
                }
                None => return Err(format!("connect failed: {e}").into()),
            },
        },
    };
    let request = format!(
        "GET {HEALTH_PATH} HTTP/1.1\r\nhost: {}\r\nuser-agent: paddock-balancer\r\n\r\n",
        upstream.address
    );
    connection
        .write_head(request.as_bytes())
        .await
        .map_err(|e| format!("health check failed: {e}"))?;
    let (parts, body) = connection
        .read_response(false)
        .await
        .map_err(|e| format!("health check failed: {e}"))?;
    let (body, reusable) = body
        .collect(MAX_REPORT)
        .await
        .map_err(|e| format!("reading the health report: {e}"))?;
    *conn = reusable;
    let status = parts.status;
    if status != StatusCode::OK {
        let state = serde_json::from_slice::<HealthReport>(&body)
            .map(|r| format!(" ({:?})", r.state).to_lowercase())
            .unwrap_or_default();
        return Err(format!("health answered {status}{state}").into());
    }
    let report: HealthReport = serde_json::from_slice(&body)
        .map_err(|e| format!("the health answer is not a health report: {e}"))?;
    Ok(report.apps.into_iter().map(|a| a.name).collect())
}
