//! Active health checks: `GET /_paddock/health` on each front-end every interval, on a connection
//! of its own. 200 with a health report passes (and says which apps the server serves); anything
//! else, or no answer within the timeout, fails.

use std::sync::{Arc, Weak};

use bytes::Bytes;
use http::{Request, StatusCode, header};
use http_body_util::{BodyExt as _, Either, Empty};
use hyper::client::conn::http1::SendRequest;
use paddock_api::HealthReport;

use crate::proxy::UpBody;
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
pub async fn check(
    upstream: &Arc<Upstream>,
    config: &HealthConfig,
    conn: &mut Option<SendRequest<UpBody>>,
) {
    match tokio::time::timeout(config.timeout, probe(upstream, conn)).await {
        Ok(Ok(apps)) => upstream.check_passed(apps, config.rise),
        Ok(Err(why)) => {
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

async fn probe(
    upstream: &Upstream,
    conn: &mut Option<SendRequest<UpBody>>,
) -> Result<Vec<String>, String> {
    let reusable = conn
        .as_ref()
        .is_some_and(|c| c.is_ready() && !c.is_closed());
    if !reusable {
        *conn = Some(upstream.connect().await.map_err(|e| e.to_string())?);
    }
    let Some(sender) = conn.as_mut() else {
        return Err("no connection".into());
    };
    let request = Request::get(HEALTH_PATH)
        .header(header::HOST, &upstream.address)
        .header(header::USER_AGENT, "paddock-balancer")
        .body(Either::Right(Empty::<Bytes>::new()))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("health check failed: {e}"))?;
    let status = response.status();
    let body = http_body_util::Limited::new(response.into_body(), MAX_REPORT)
        .collect()
        .await
        .map_err(|e| format!("reading the health report: {e}"))?
        .to_bytes();
    if status != StatusCode::OK {
        let state = serde_json::from_slice::<HealthReport>(&body)
            .map(|r| format!(" ({:?})", r.state).to_lowercase())
            .unwrap_or_default();
        return Err(format!("health answered {status}{state}"));
    }
    let report: HealthReport = serde_json::from_slice(&body)
        .map_err(|e| format!("the health answer is not a health report: {e}"))?;
    Ok(report.apps.into_iter().map(|a| a.name).collect())
}
