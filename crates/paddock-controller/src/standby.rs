//! Standby controllers and platform builds.
//!
//! A standby (`--standby --follow URL`) reports every second to the controller holding the role
//! ([`follow`]): its host, process and build. The answer names the build it should run
//! ([`PlatformOrders`]): the one a platform upgrade's `upgrade-standbys` step set
//! (`Controller::standby_target`), or else the build the active controller runs, when it was
//! started by an upgrade and keeps that build's file. The program running the standby installs
//! it ([`StandbyPlatform`]) and the standby then restarts on it, still standing by: it holds
//! no socket and no lock, so stopping changes nothing. So a standby is on the new release before
//! the active controller restarts on it and migrates the database, and one started later from
//! an older executable catches up.
//!
//! The controller holding the role keeps the reports in memory ([`report`], [`list`]): they are
//! facts about live processes, sent every second, like the balancers' acknowledgements.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use paddock_api::{
    ApiError, BuildState, Controllers, PlatformBuild, PlatformOrders, StandbyInfo, StandbyReport,
};
use paddock_core::manifest::is_valid_name;
use tokio::sync::Notify;

use crate::api::Failure;
use crate::platform::Installed;
use crate::{Controller, now_ms};

/// How often a standby reports.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// A standby counts as live when it reported within this long.
pub const ALIVE_WITHIN_MS: i64 = 3_000;

/// What runs a standby and installs platform builds: this crate carries the build's state to
/// the active controller and its answer back.
pub trait StandbyPlatform: Send + Sync {
    /// What each report says of the build.
    fn state(&self) -> BuildState;
    /// The active controller named this build (or none), set by `generation`.
    fn named(&self, build: Option<&PlatformBuild>, generation: i64);
    /// Notified when what `describe` says changed.
    fn changed(&self) -> Arc<Notify>;
    /// A build installed over the executable, to restart on.
    fn installed(&self) -> Option<Installed>;
}

/// A standby's link to the controller holding the role.
#[derive(Clone)]
pub struct Follow {
    /// The farm's controllers (the active one and its standbys, as front-ends are given them).
    pub controllers: Arc<Controllers>,
    /// This standby's name in the reports.
    pub name: String,
    /// The farm's join token (from the standby's copy of the tokens).
    pub join_token: String,
    pub platform: Arc<dyn StandbyPlatform>,
}

impl std::fmt::Debug for Follow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follow")
            .field("controllers", &self.controllers)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Reports to the controller holding the role until a build named by it was installed; returns
/// it. Run while standing by, and dropped once this controller takes the role.
pub async fn follow(follow: Follow) -> Installed {
    let path = format!("/control/v1/standbys/{}", follow.name);
    let changed = follow.platform.changed();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(http) => http,
        Err(e) => {
            tracing::error!("cannot follow the active controller: {e}");
            return std::future::pending().await;
        }
    };
    let mut failing = false;
    loop {
        if let Some(installed) = follow.platform.installed() {
            return installed;
        }
        let report = StandbyReport {
            name: follow.name.clone(),
            host: host.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            platform: follow.platform.state(),
        };
        let at = follow.controllers.current();
        let sent = http
            .post(follow.controllers.url(&path))
            .bearer_auth(&follow.join_token)
            .json(&report)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                if failing {
                    tracing::info!("reporting to the active controller again");
                }
                failing = false;
                match r.json::<PlatformOrders>().await {
                    Ok(orders) => follow
                        .platform
                        .named(orders.platform.as_ref(), orders.platform_generation),
                    Err(e) => tracing::debug!("the active controller's answer: {e}"),
                }
            }
            Ok(r) => {
                if !failing {
                    let status = r.status();
                    let body = r.text().await.unwrap_or_default();
                    let message = ApiError::message_of(body);
                    let hint = if status == reqwest::StatusCode::UNAUTHORIZED {
                        "; copy the active controller's join.token into this standby's --data folder"
                    } else {
                        ""
                    };
                    tracing::warn!(
                        "the active controller refused this standby's report ({status}): {message}{hint}"
                    );
                }
                failing = true;
            }
            Err(e) => {
                if e.is_connect()
                    && let Some(next) = follow.controllers.unreachable(at)
                {
                    tracing::debug!("the controller cannot be reached ({e}); trying {next}");
                }
                if !failing {
                    tracing::warn!(
                        "cannot report to the active controller: {e}; platform builds are not followed meanwhile"
                    );
                }
                failing = true;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REPORT_INTERVAL) => {}
            _ = changed.notified() => {}
        }
    }
}

/// `POST /control/v1/standbys/{name}`: a standby's report; answers the build it should run.
pub async fn report(
    State(c): State<Arc<Controller>>,
    Path(name): Path<String>,
    Json(report): Json<StandbyReport>,
) -> Result<Json<PlatformOrders>, Failure> {
    if report.name != name || !is_valid_name(&name) {
        return Err(Failure::bad_request(
            "bad_report",
            format!(
                "a report for {name:?} names standby {:?}; a standby reports for itself, under a name of 1 to 63 of a-z, 0-9 and '-' (--name)",
                report.name
            ),
        ));
    }
    let now = now_ms();
    {
        let mut standbys = c.standbys.lock().unwrap_or_else(|e| e.into_inner());
        // Two standbys under one name (`ctl-<host>` on two machines with one host name) would
        // pass for one in the upgrade's facts.
        if let Some((other, at)) = standbys.get(&name)
            && (other.host != report.host || other.pid != report.pid)
            && now - at <= ALIVE_WITHIN_MS
        {
            return Err(Failure::new(
                axum::http::StatusCode::CONFLICT,
                "standby_name_taken",
                format!(
                    "standby {name} reports from process {} on {} already; give this one another --name",
                    other.pid, other.host
                ),
            ));
        }
        standbys.insert(name, (report.clone(), now));
    }
    c.facts_changed();
    Ok(Json(orders(&c, &report).await?))
}

/// The build `standby` should run: the one an upgrade named, or the one this controller runs
/// when an upgrade started it and it keeps the build's file; never a release older than the
/// standby's own.
async fn orders(c: &Controller, standby: &StandbyReport) -> Result<PlatformOrders, Failure> {
    if !c.platform_upgrades {
        return Ok(PlatformOrders::default());
    }
    if let Some((build, generation)) = c
        .standby_target
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        return Ok(PlatformOrders {
            platform: Some(build),
            platform_generation: generation,
        });
    }
    let Some(own) = &c.started_on else {
        return Ok(PlatformOrders::default());
    };
    let kept = c.store.platform_build(own).await?;
    Ok(match kept {
        Some(build)
            if crate::platform::build_path(c, own).is_file()
                && !crate::platform::older(&build.version, &standby.version) =>
        {
            PlatformOrders {
                platform: Some(build),
                platform_generation: 0,
            }
        }
        _ => PlatformOrders::default(),
    })
}

/// The standbys that reported since this controller took the role, by name.
pub fn standbys(c: &Controller) -> Vec<StandbyInfo> {
    let now = now_ms();
    let reports: BTreeMap<String, (StandbyReport, i64)> =
        c.standbys.lock().unwrap_or_else(|e| e.into_inner()).clone();
    reports
        .into_values()
        .map(|(report, at)| StandbyInfo {
            report,
            heartbeat_ms: at,
            alive: now - at <= ALIVE_WITHIN_MS,
        })
        .collect()
}

/// `GET /v1/standbys`.
pub async fn list(State(c): State<Arc<Controller>>) -> Json<Vec<StandbyInfo>> {
    Json(standbys(&c))
}
