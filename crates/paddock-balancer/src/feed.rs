//! Where routing tables come from: the controller's long-poll (`/control/v1/routing`), with the
//! last table saved to the data folder so that a restart without the controller keeps routing;
//! or a file given at start. Reports go back to the controller every second and right after a
//! table is applied: they are the acknowledgement an operation waits for.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use paddock_api::{ApiError, BalancerOrders, BuildState, Controllers, PlatformBuild, RoutingTable};
use tokio::sync::Notify;

use crate::Balancer;

/// How often a balancer reports when nothing changes.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How often it reports while a front-end it no longer routes to has requests in flight.
pub const DRAINING_INTERVAL: Duration = Duration::from_millis(20);

#[derive(Clone)]
pub struct ControllerLink {
    /// The controller, or the active one and its standbys.
    pub controller: Arc<Controllers>,
    pub join_token: String,
    /// What runs this balancer and can install platform builds, if anything.
    pub platform: Option<Arc<dyn Platform>>,
}

impl std::fmt::Debug for ControllerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerLink")
            .field("controller", &self.controller)
            .field("platform", &self.platform.is_some())
            .finish_non_exhaustive()
    }
}

/// The platform builds a balancer runs: this crate only carries their state to the controller
/// in each report and the build the controller names back ([`PlatformOrders`]); installing one
/// and restarting on it is the program's business.
pub trait Platform: Send + Sync {
    /// What each report says of the build.
    fn state(&self) -> BuildState;
    /// The controller's answer to a report named this build (or none), set by `generation`.
    fn named(&self, build: Option<&PlatformBuild>, generation: i64);
    /// Notified when what `describe` says changed: the next report goes at once.
    fn changed(&self) -> Arc<Notify>;
}

/// Sends a request to the controller; one that cannot connect to it makes the next controller
/// of the list current (a standby that took over at an address of its own). A controller slow
/// to answer is not left for that.
async fn send(
    controllers: &Controllers,
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, reqwest::Error> {
    let at = controllers.current();
    let sent = request.send().await;
    if let Err(e) = &sent
        && e.is_connect()
        && let Some(next) = controllers.unreachable(at)
    {
        tracing::warn!("the controller cannot be reached ({e}); trying {next}");
    }
    sent
}

/// Reads a routing table file (the JSON of `GET /control/v1/routing`).
pub fn read_table(path: &Path) -> anyhow::Result<RoutingTable> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the routing table {}", path.display()))?;
    let mut table: RoutingTable = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a routing table (JSON as `GET /control/v1/routing` answers)",
            path.display()
        )
    })?;
    // Generation 0 means "no table yet" to the request path.
    table.generation = table.generation.max(1);
    Ok(table)
}

fn save_table(path: &Path, table: &RoutingTable) -> anyhow::Result<()> {
    use std::io::Write as _;
    let json = serde_json::to_vec_pretty(table)?;
    // Durably: a crash or a power loss leaves the previous table or this one, whole.
    let mut file = atomic_write_file::AtomicWriteFile::open(path)
        .with_context(|| format!("creating a file beside {}", path.display()))?;
    file.write_all(&json)
        .and_then(|()| file.commit())
        .with_context(|| format!("replacing {}", path.display()))
}

/// Follows the controller for ever: long-polls the table, applies each new one, saves it.
pub async fn follow(
    balancer: Arc<Balancer>,
    http: reqwest::Client,
    link: ControllerLink,
    saved: PathBuf,
    applied: Arc<Notify>,
) {
    let mut backoff = Duration::from_millis(200);
    let mut failing = false;
    loop {
        let current = balancer.generation();
        let base = link.controller.base().to_string();
        let url = if current > 0 {
            format!("{base}/control/v1/routing?after={current}")
        } else {
            format!("{base}/control/v1/routing")
        };
        let fetched = fetch(&http, &link, &url).await;
        match fetched {
            Ok(table) => {
                if failing {
                    tracing::info!("controller reachable again at {base}");
                    failing = false;
                }
                backoff = Duration::from_millis(200);
                if table.generation != current {
                    balancer.apply(&table).await;
                    applied.notify_one();
                    // Off the event loop: the save waits for the disk.
                    let (path, table) = (saved.clone(), table);
                    match tokio::task::spawn_blocking(move || save_table(&path, &table)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => tracing::warn!("cannot save the routing table: {e:#}"),
                        Err(e) => tracing::warn!("cannot save the routing table: {e}"),
                    }
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        "cannot get the routing table from {base}: {e:#}; routing by generation {current} meanwhile"
                    );
                    failing = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn fetch(
    http: &reqwest::Client,
    link: &ControllerLink,
    url: &str,
) -> anyhow::Result<RoutingTable> {
    let request = http
        .get(url)
        .bearer_auth(&link.join_token)
        .timeout(Duration::from_secs(40));
    let response = send(&link.controller, request).await?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&body) {
            Ok(e) => anyhow::bail!("{}", e.message),
            Err(_) => anyhow::bail!("the controller answered {status}: {body}"),
        }
    }
    Ok(response.json().await?)
}

/// Reports to the controller every second (more often while a front-end drains, or when the
/// controller asks) and whenever `applied` is notified.
pub async fn report(
    balancer: Arc<Balancer>,
    http: reqwest::Client,
    link: ControllerLink,
    applied: Arc<Notify>,
) {
    let path = format!("/control/v1/balancers/{}", balancer.name);
    let mut failing = false;
    // How soon the controller asked for the next report, if sooner than usual.
    let mut soon: Option<Duration> = None;
    let platform_changed = link.platform.as_ref().map(|p| p.changed());
    loop {
        // Read before the report: if it shows a draining front-end with requests in flight,
        // the next report must not wait a whole interval to say they ended.
        let draining = balancer.draining();
        let mut report = balancer.report();
        if let Some(platform) = &link.platform {
            report.platform = platform.state();
        }
        let request = http
            .post(link.controller.url(&path))
            .bearer_auth(&link.join_token)
            .json(&report)
            .timeout(Duration::from_secs(5));
        let sent = send(&link.controller, request).await;
        match sent {
            Ok(r) if r.status().is_success() => {
                failing = false;
                // A controller of an older release answers no orders at all. An answer not
                // read whole changes nothing (an installation under way goes on).
                let orders = match r.bytes().await {
                    Ok(body) if body.is_empty() => Some(BalancerOrders::default()),
                    Ok(body) => serde_json::from_slice::<BalancerOrders>(&body)
                        .inspect_err(|e| {
                            tracing::warn!(
                                "the controller's answer to a report is not understood: {e}"
                            );
                        })
                        .ok(),
                    Err(e) => {
                        tracing::debug!("cannot read the controller's answer to a report: {e}");
                        None
                    }
                };
                if let Some(orders) = orders {
                    if let Some(platform) = &link.platform {
                        platform.named(
                            orders.platform.platform.as_ref(),
                            orders.platform.platform_generation,
                        );
                    }
                    soon = orders.report_within_ms.map(|ms| {
                        Duration::from_millis(ms).clamp(DRAINING_INTERVAL, REPORT_INTERVAL)
                    });
                }
            }
            Ok(r) => {
                if !failing {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    let message = ApiError::message_of(body);
                    tracing::warn!(
                        "the controller refused this balancer's report ({status}): {message}"
                    );
                }
                failing = true;
                soon = None;
            }
            Err(e) => {
                if !failing {
                    tracing::debug!("cannot report to the controller: {e}");
                }
                failing = true;
                soon = None;
            }
        }
        // While a drained front-end still has requests in flight, report often: the
        // operation waiting for it learns that it drained within DRAINING_INTERVAL. While an
        // operation watches the answers, as soon as the controller asks.
        let period = if draining || balancer.draining() {
            DRAINING_INTERVAL
        } else {
            soon.unwrap_or(REPORT_INTERVAL)
        };
        let platform_changed = async {
            match &platform_changed {
                Some(changed) => changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = applied.notified() => {}
            _ = platform_changed => {}
        }
    }
}
