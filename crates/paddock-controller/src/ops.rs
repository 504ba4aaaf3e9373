//! Operations: the farm procedures of the operations guides as journaled state machines.
//!
//! A balanced deployment ([`plan`], then [`start`]) is a [`DeployPlan`] fixed when it starts
//! (which servers update first, which keep serving, every flag as it was) and a journal of
//! steps in the store. The journal *is* the state: [`next`] reads it and says which step runs
//! now, so a controller that dies at any point and starts again ([`resume_all`]) picks up where
//! the journal says and ends the same way. Every step is idempotent: it sets state (flags,
//! routing, desired versions) to values derived from the plan, then waits for facts that other
//! processes report: the balancers' acknowledgement of a routing generation, the front-ends'
//! in-flight counts and loaded versions, a smoke request's answer. A wait has a deadline and
//! fails naming what did not confirm. No wait is a sleep.
//!
//! Failure or abort before the point of no return (step 8, `deployment-on`, 9 with a watch step: when the loaded group takes the
//! new version) runs the restore steps: users back on the loaded group, old versions desired
//! again, every flag as before. A wait after the point of no return that misses its deadline
//! pauses the operation; `paddock op resume` retries it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use paddock_api::{
    AppTrafficCounts, BalancedDeployRequest, DeployPlan, LbState, OpState, OpStep, Operation,
    PlannedApp, PlannedStep, PlatformBuild, PlatformUpgradeRequest, Role, ServerBefore, ServerFlag,
    ServerInfo, Step, StepState, Watch, ZonePlan,
};
use paddock_store::{ServerChange, StepEnd, StoreError};

use crate::api::{ALIVE_WITHIN_MS, alive, silent_ms};
use crate::{Controller, now_ms};

/// How long each wait may take unless the request says otherwise.
pub const DEFAULT_TIMEOUT_MS: u64 = 120_000;
/// How often a wait looks again when no fact arrived (abort requests and deadlines).
const RECHECK: Duration = Duration::from_millis(250);
/// The failed answers an app needs before they fail a watch step before its time is up (one
/// transient error among the first answers does not).
const WATCH_EARLY_FAILURES: u64 = 5;
/// How soon balancers report while a watch step counts their answers (instead of every
/// second): failures are seen, and users put back, within about this long.
pub const WATCH_REPORT_MS: u64 = 100;
/// How long a server may be silent and still count as restarting on a new build, not dead.
const RESTART_GRACE_MS: i64 = 30_000;
/// How long one smoke request may take.
const SMOKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a balanced deployment cannot be planned. Nothing was changed.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(message: impl Into<String>) -> PlanError {
    PlanError::Invalid(message.into())
}

/// Decides the groups and steps of a balanced deployment from the farm as it is now.
pub async fn plan(
    c: &Controller,
    request: &BalancedDeployRequest,
) -> Result<DeployPlan, PlanError> {
    if request.apps.is_empty() {
        return Err(invalid(
            "name at least one app version to deploy, as APP@VERSION or a package folder",
        ));
    }
    let timeout_ms = request.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1_000..=3_600_000).contains(&timeout_ms) {
        return Err(invalid(format!(
            "timeout {timeout_ms} ms is out of range: use 1s to 1h"
        )));
    }
    let mut zones: BTreeMap<String, Vec<PlannedApp>> = BTreeMap::new();
    for wanted in &request.apps {
        let version = c.store.version(&wanted.app, &wanted.version).await?;
        if let Some(zone) = &request.zone
            && *zone != version.zone
        {
            return Err(invalid(format!(
                "{}@{} belongs to zone {}, not {zone}; leave out --zone or name apps of zone {zone}",
                version.app, version.version, version.zone
            )));
        }
        let apps = zones.entry(version.zone.clone()).or_default();
        if apps.iter().any(|a| a.app == version.app) {
            return Err(invalid(format!(
                "{} is named twice; deploy one version of each app",
                version.app
            )));
        }
        let current = c
            .store
            .desired(&version.zone)
            .await?
            .into_iter()
            .find(|v| v.app == version.app)
            .ok_or_else(|| {
                invalid(format!(
                    "{} was never deployed in zone {}: a balanced deployment moves users from one version to another; deploy its first version with `paddock deploy {} {}`",
                    version.app, version.zone, version.app, version.version
                ))
            })?;
        if current.manifest.route != version.manifest.route {
            return Err(invalid(format!(
                "{}@{} moves the app from route {} to {}: until the cutover the balancers would send the new route to servers that do not serve it; deploy it in place (`paddock deploy {}@{}`)",
                version.app,
                version.version,
                current.manifest.route,
                version.manifest.route,
                version.app,
                version.version
            )));
        }
        if current.version == version.version {
            return Err(invalid(format!(
                "zone {} already runs {}@{}; nothing to deploy",
                version.zone, version.app, version.version
            )));
        }
        apps.push(PlannedApp {
            app: version.app.clone(),
            from: current.version,
            to: version.version.clone(),
            smoke: version
                .manifest
                .smoke
                .clone()
                .unwrap_or_else(|| version.manifest.route.clone()),
        });
    }

    let watch = checked_watch(c, request.watch).await?;
    let zones: Vec<(String, Vec<PlannedApp>)> = zones.into_iter().collect();
    let plans = zone_plans(c, zones, &request.updating, false, watch.is_some()).await?;
    Ok(DeployPlan {
        parallel_zones: request.parallel_zones,
        timeout_ms,
        zones: plans,
        platform: None,
        watch,
    })
}

/// The longest watch step: an hour, like the longest wait.
const MAX_WATCH_MS: u64 = 3_600_000;

/// A watch the plan can keep: within bounds, and every live balancer counts answers per app
/// (one of an older release would look like a balancer without traffic).
async fn checked_watch(c: &Controller, watch: Option<Watch>) -> Result<Option<Watch>, PlanError> {
    let Some(watch) = watch else {
        return Ok(None);
    };
    let blind: Vec<String> = c
        .store
        .balancers(now_ms() - crate::routing::BALANCER_ALIVE_WITHIN_MS)
        .await?
        .into_iter()
        .filter(|b| b.alive && b.report.apps.is_none())
        .map(|b| b.report.name)
        .collect();
    if !blind.is_empty() {
        return Err(invalid(format!(
            "balancers {} run a release that does not count answers per app, so a watch would see nothing there; upgrade them (`paddock upgrade` without --watch) or leave out --watch",
            blind.join(", ")
        )));
    }
    if !(1_000..=MAX_WATCH_MS).contains(&watch.ms) {
        return Err(invalid(format!(
            "watch {} ms is out of range: use 1s to 1h",
            watch.ms
        )));
    }
    if watch.max_failed_permille > 1000 {
        return Err(invalid(format!(
            "a watch allows {} of answers to fail, more than all of them; give a share from 0% to 100%",
            watch.max_failed()
        )));
    }
    Ok(Some(watch))
}

/// Decides the groups and steps of a balanced platform upgrade: every zone with a serving
/// front-end (or the one named), each with the app versions it runs now.
pub async fn plan_upgrade(
    c: &Controller,
    request: &PlatformUpgradeRequest,
) -> Result<DeployPlan, PlanError> {
    let timeout_ms = request.timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS);
    if !(1_000..=3_600_000).contains(&timeout_ms) {
        return Err(invalid(format!(
            "timeout {timeout_ms} ms is out of range: use 1s to 1h"
        )));
    }
    let watch = checked_watch(c, request.watch).await?;
    if request.parallel_zones {
        return Err(invalid(
            "a platform upgrade runs its zones one after another (the controller goes last, once every zone is done); leave out --parallel-zones",
        ));
    }
    let build = c.store.platform_build(&request.sha256).await?.ok_or_else(|| {
        invalid(format!(
            "no platform build {} here; upload it first (`paddock upgrade PATH` does both), `paddock platform builds` lists them",
            request.sha256
        ))
    })?;
    let ours = env!("CARGO_PKG_VERSION");
    if crate::platform::older(&build.version, ours) {
        return Err(invalid(format!(
            "build {} is paddock {}, older than this controller's {ours}: an older release may not read the database a newer one migrated, and has no way back; upgrade to a release at least as new",
            short(&build.sha256),
            build.version
        )));
    }
    // The whole farm: the controller goes last. It checks now that it can, rather than fail
    // there, past the point of no return (unless it runs the build already: a standby that
    // took over from the controller the build was uploaded to keeps no file of it).
    let controller_behind = request.zone.is_none()
        && !crate::platform::own_build(c)
            .await
            .is_ok_and(|own| own == build.sha256);
    if controller_behind && let Err(e) = crate::platform::can_install_here(c, &build.sha256) {
        return Err(invalid(format!(
            "the controller could not install the build over its own executable: {e:#}"
        )));
    }
    let servers = c.store.servers().await?;
    let now = now_ms();
    let mut names: Vec<String> = servers
        .iter()
        .filter(|s| request.zone.as_ref().is_none_or(|z| *z == s.zone))
        .filter(|s| not_serving(s, now).is_none())
        .map(|s| s.zone.clone())
        .collect();
    names.dedup();
    if let Some(zone) = &request.zone
        && names.is_empty()
    {
        return Err(invalid(format!(
            "zone {zone} has no front-end serving users (alive, active, lb ready, deployment on); `paddock servers` shows why"
        )));
    }
    if names.is_empty() {
        return Err(invalid(
            "no front-end serves users (alive, active, lb ready, deployment on); `paddock servers` shows why",
        ));
    }
    let behind: Vec<&str> = servers
        .iter()
        .filter(|s| names.contains(&s.zone))
        .filter(|s| s.observed.as_ref().and_then(|o| o.build.as_deref()) != Some(&build.sha256))
        .map(|s| s.name.as_str())
        .collect();
    // Live balancers not known to run the build (one that never hashed its executable reports
    // none; the step has it check).
    let balancers_behind = request.zone.is_none()
        && c.store
            .balancers(now - crate::routing::BALANCER_ALIVE_WITHIN_MS)
            .await?
            .iter()
            .any(|b| b.alive && b.report.platform.build.as_deref() != Some(&build.sha256))
        || request.zone.is_none()
            && crate::standby::standbys(c)
                .iter()
                .any(|s| s.alive && s.report.platform.build.as_deref() != Some(&build.sha256));
    if behind.is_empty() {
        if !controller_behind && !balancers_behind {
            return Err(invalid(format!(
                "every front-end{} already runs build {} (paddock {}); nothing to upgrade",
                if request.zone.is_none() {
                    ", balancer and controller"
                } else {
                    ""
                },
                short(&build.sha256),
                build.version
            )));
        }
        // The front-ends were upgraded zone by zone (`--zone`): the balancers' and the
        // controller's turn alone.
        let zone = names.first().cloned().unwrap_or_default();
        return Ok(DeployPlan {
            parallel_zones: false,
            timeout_ms,
            zones: vec![ZonePlan {
                zone,
                apps: Vec::new(),
                updating: Vec::new(),
                loaded: Vec::new(),
                untouched: Vec::new(),
                in_place: false,
                before: Vec::new(),
                steps: farm_steps(),
            }],
            platform: Some(build),
            watch: None,
        });
    }
    let mut zones = Vec::new();
    for zone in names {
        let apps = c
            .store
            .desired(&zone)
            .await?
            .into_iter()
            .map(|v| PlannedApp {
                smoke: v
                    .manifest
                    .smoke
                    .clone()
                    .unwrap_or_else(|| v.manifest.route.clone()),
                app: v.app,
                from: v.version.clone(),
                to: v.version,
            })
            .collect();
        zones.push((zone, apps));
    }
    let mut plans = zone_plans(c, zones, &request.updating, true, watch.is_some()).await?;
    // The controller goes last, after every zone (they run one after another): a build that
    // fails on the front-ends is put back by a controller that works. Not for one zone.
    if request.zone.is_none()
        && let Some(last) = plans.last_mut()
    {
        last.steps.extend(farm_steps());
    }
    Ok(DeployPlan {
        parallel_zones: request.parallel_zones,
        timeout_ms,
        zones: plans,
        platform: Some(build),
        watch,
    })
}

/// The steps after the last zone of a whole-farm upgrade: the balancers, the standby
/// controllers, then the controller.
fn farm_steps() -> Vec<PlannedStep> {
    [
        Step::UpgradeBalancers,
        Step::UpgradeStandbys,
        Step::UpgradeController,
    ]
    .into_iter()
    .map(|step| PlannedStep {
        step,
        servers: Vec::new(),
    })
    .collect()
}

/// The first 12 hex digits of a sha256: enough to tell builds apart in a message.
pub fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}

/// Splits each zone's servers into the updating and loaded groups and lays out the steps.
async fn zone_plans(
    c: &Controller,
    zones: Vec<(String, Vec<PlannedApp>)>,
    chosen: &[String],
    upgrade: bool,
    watch: bool,
) -> Result<Vec<ZonePlan>, PlanError> {
    let servers = c.store.servers().await?;
    let now = now_ms();
    for name in chosen {
        let Some(server) = servers.iter().find(|s| s.name == *name) else {
            return Err(StoreError::UnknownServer(name.clone()).into());
        };
        if !zones.iter().any(|(z, _)| *z == server.zone) {
            return Err(invalid(if upgrade {
                format!(
                    "--updating names {name}, of zone {}, which this upgrade leaves alone",
                    server.zone
                )
            } else {
                format!(
                    "--updating names {name}, of zone {}, where none of these apps runs",
                    server.zone
                )
            }));
        }
        if let Some(reason) = not_serving(server, now) {
            return Err(invalid(format!(
                "--updating names {name}, which is {reason}; name servers that serve users now"
            )));
        }
    }
    let mut plans = Vec::new();
    for (zone, apps) in zones {
        let mut serving = Vec::new();
        // In rotation but not reporting: they join the loaded group, so that one coming back
        // mid-operation is drained at the cutover and takes the new version at step 8.
        let mut dormant = Vec::new();
        let mut untouched = Vec::new();
        for server in servers.iter().filter(|s| s.zone == zone) {
            let in_rotation = server.role == Role::Active && server.lb == LbState::Ready;
            if in_rotation && !server.deployment {
                return Err(invalid(format!(
                    "{} is in rotation with its deployment service off: it would keep serving what it has after the cutover; switch it on (`paddock server {} deployment on`) or take it out (`paddock server {} lb maint`)",
                    server.name, server.name, server.name
                )));
            }
            match not_serving(server, now) {
                None => serving.push(server),
                Some(_) if in_rotation => dormant.push(server),
                Some(reason) => untouched.push(format!("{} ({reason})", server.name)),
            }
        }
        if serving.is_empty() {
            return Err(invalid(format!(
                "zone {zone} has no front-end serving users (alive, active, lb ready, deployment on); `paddock servers` shows why"
            )));
        }
        let names: Vec<String> = serving.iter().map(|s| s.name.clone()).collect();
        let (updating, loaded, in_place) = if names.len() == 1 {
            untouched.extend(
                dormant
                    .drain(..)
                    .map(|s| format!("{} (not alive; takes the new version when back)", s.name)),
            );
            (names.clone(), Vec::new(), true)
        } else {
            let chosen: Vec<String> = names
                .iter()
                .filter(|n| chosen.contains(n))
                .cloned()
                .collect();
            let updating = if chosen.is_empty() {
                names[..names.len() / 2].to_vec()
            } else {
                chosen
            };
            if updating.len() == names.len() {
                return Err(invalid(format!(
                    "--updating names every serving front-end of zone {zone}; leave at least one to keep serving the old version"
                )));
            }
            let loaded = names
                .iter()
                .filter(|n| !updating.contains(n))
                .cloned()
                .chain(dormant.iter().map(|s| s.name.clone()))
                .collect();
            (updating, loaded, false)
        };
        // Every server of the zone: the scheduler goes off on all of them (step 1).
        let before = servers
            .iter()
            .filter(|s| s.zone == zone)
            .map(|s| ServerBefore {
                name: s.name.clone(),
                lb: s.lb,
                deployment: s.deployment,
                scheduler: s.scheduler,
            })
            .collect();
        let both: Vec<String> = updating.iter().chain(&loaded).cloned().collect();
        let everyone: Vec<String> = servers
            .iter()
            .filter(|s| s.zone == zone)
            .map(|s| s.name.clone())
            .collect();
        let not_updating: Vec<String> = everyone
            .iter()
            .filter(|n| !updating.contains(n))
            .cloned()
            .collect();
        let steps = forward_steps(in_place, upgrade)
            .iter()
            .flat_map(|&step| match step {
                Step::Cutover if watch => vec![Step::Cutover, Step::Watch],
                step => vec![step],
            })
            .map(|step| PlannedStep {
                step,
                servers: match step {
                    Step::SchedulerOff => everyone.clone(),
                    Step::SchedulerOnLoaded => not_updating.clone(),
                    Step::Cutover => both.clone(),
                    Step::DrainUpdating
                    | Step::LoadNew
                    | Step::Smoke
                    | Step::Watch
                    | Step::SchedulerOnUpdating
                    | Step::InPlace
                    | Step::UpgradeUpdating
                    | Step::UpgradeInPlace => updating.clone(),
                    _ => loaded.clone(),
                },
            })
            .collect();
        plans.push(ZonePlan {
            zone,
            apps,
            updating,
            loaded,
            untouched,
            in_place,
            before,
            steps,
        });
    }
    Ok(plans)
}

/// Why a server takes no part in a balanced deployment, or `None` if it serves users now.
fn not_serving(server: &ServerInfo, now: i64) -> Option<String> {
    if server.role != Role::Active {
        Some("passive".into())
    } else if !alive(server, now) {
        Some("not alive".into())
    } else if server.lb != LbState::Ready {
        Some(format!("lb {}", server.lb.as_str()))
    } else if !server.deployment {
        Some("deployment service off".into())
    } else {
        None
    }
}

fn forward_steps(in_place: bool, upgrade: bool) -> &'static [Step] {
    match (in_place, upgrade) {
        (true, false) => &[Step::InPlace],
        (false, false) => &Step::BALANCED,
        (true, true) => &Step::UPGRADE_IN_PLACE,
        (false, true) => &Step::UPGRADE,
    }
}

fn restore_steps(in_place: bool, upgrade: bool) -> &'static [Step] {
    match (in_place, upgrade) {
        (true, false) => &[Step::RestoreVersion],
        (false, false) => &Step::RESTORE,
        (true, true) => &[Step::RestorePlatform, Step::RestoreFlags],
        (false, true) => &Step::RESTORE_UPGRADE,
    }
}

/// From step 8 (9 with a watch step) on, the loaded group takes the new version: there is no old version left to go
/// back to, so the operation only goes forward.
pub fn past_point_of_no_return(step: Step) -> bool {
    matches!(
        step,
        Step::DeploymentOn
            | Step::UpgradeLoaded
            | Step::RouteAll
            | Step::SchedulerOnLoaded
            | Step::UpgradeBalancers
            | Step::UpgradeStandbys
            | Step::UpgradeController
    )
}

/// What a zone of an operation does next, as its journal says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Run(Step),
    /// Every step done.
    Done,
    /// The restore steps ran: everything is as before.
    Restored,
}

/// Reads the journal of one zone and says what runs now. A step journaled `running` runs again
/// (its controller died during it). A failed step before the point of no return, or an abort
/// request, leads to the restore steps; a failed step after it runs again (on resume).
pub fn next(op: &Operation, zone: &ZonePlan) -> Next {
    let journal: HashMap<Step, &OpStep> = op
        .steps
        .iter()
        .filter(|s| s.zone == zone.zone)
        .map(|s| (s.step, s))
        .collect();
    let upgrade = op.plan.platform.is_some();
    let restore = restore_steps(zone.in_place, upgrade);
    if journal.keys().any(|s| s.is_restore()) {
        for &step in restore {
            match journal.get(&step).map(|s| s.state) {
                None | Some(StepState::Running) => return Next::Run(step),
                Some(_) => continue,
            }
        }
        return Next::Restored;
    }
    // The steps the plan laid out (the last zone of a platform upgrade has one more).
    for step in zone.steps.iter().map(|s| s.step) {
        match journal.get(&step).map(|s| s.state) {
            Some(StepState::Done) => continue,
            Some(StepState::Failed) if !past_point_of_no_return(step) => {
                return Next::Run(restore[0]);
            }
            _ if op.abort_requested && !past_point_of_no_return(step) => {
                return Next::Run(restore[0]);
            }
            _ => return Next::Run(step),
        }
    }
    Next::Done
}

/// Records a new operation (refused if one of its zones is busy) and starts driving it.
pub async fn start(c: &Arc<Controller>, plan: &DeployPlan) -> Result<Operation, StoreError> {
    let warnings: Vec<String> = plan
        .zones
        .iter()
        .filter(|z| z.in_place)
        .map(|z| match &plan.platform {
            None => format!(
                "zone {} has one serving front-end ({}): deployed in place, without a cutover{}",
                z.zone,
                z.updating[0],
                if plan.watch.is_some() {
                    " or a watch"
                } else {
                    ""
                }
            ),
            Some(_) => format!(
                "zone {} has one serving front-end ({}): it restarts in place (requests wait for it meanwhile)",
                z.zone, z.updating[0]
            ),
        })
        .collect();
    let message = (!warnings.is_empty()).then(|| warnings.join("; "));
    let now = now_ms();
    let (kind, what) = match &plan.platform {
        None => (
            "balanced-deploy",
            plan.zones
                .iter()
                .flat_map(|z| z.apps.iter().map(|a| format!("{}@{}", a.app, a.to)))
                .collect::<Vec<String>>()
                .join(" "),
        ),
        Some(build) => (
            "platform-upgrade",
            format!("paddock {} (build {})", build.version, short(&build.sha256)),
        ),
    };
    let id = c
        .store
        .create_operation(kind, plan, message.as_deref(), now)
        .await?;
    c.store
        .audit("admin", kind, &format!("operation {id}: {what}"), now)
        .await?;
    tracing::info!(operation = id, kind, what = %what, "operation started");
    spawn(c.clone(), id);
    c.store.operation(id).await
}

/// Drives every operation the journal says is running: what a starting controller does.
///
/// It first lets every balancer report once more: while this controller was down their last
/// reports grew old, and a balancer not counted as live is not waited for.
pub async fn resume_all(c: &Arc<Controller>) -> Result<(), StoreError> {
    for id in c.store.running_operations().await? {
        tracing::info!(
            operation = id,
            "resuming the operation where its journal stands"
        );
        // A controller restarted by a platform upgrade goes on at once: that step only asks
        // which build this process runs, no balancer's report.
        let op = c.store.operation(id).await?;
        let grace = if op
            .plan
            .zones
            .iter()
            .any(|z| next(&op, z) == Next::Run(Step::UpgradeController))
        {
            Duration::ZERO
        } else {
            RESUME_GRACE
        };
        spawn_after(c.clone(), id, grace);
    }
    Ok(())
}

/// How long a starting controller waits before it resumes operations: the window in which a
/// balancer counts as live, so that every live one has reported to this controller.
const RESUME_GRACE: Duration =
    Duration::from_millis(crate::routing::BALANCER_ALIVE_WITHIN_MS as u64);

/// Drives the operation in a task of its own, unless one already does.
pub fn spawn(c: Arc<Controller>, id: i64) {
    spawn_after(c, id, Duration::ZERO)
}

fn spawn_after(c: Arc<Controller>, id: i64, grace: Duration) {
    if !c
        .driving
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id)
    {
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(grace).await;
        let mut failures = 0u32;
        loop {
            if c.restarting.borrow().is_some() {
                return;
            }
            match drive(&c, id).await {
                Ok(()) => {
                    // A resume that came while this task was ending found it still driving and
                    // left the operation to it: look once more before leaving.
                    c.driving
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                    match c.store.operation(id).await {
                        Ok(op)
                            if op.state == OpState::Running
                                && c.driving
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .insert(id) =>
                        {
                            continue;
                        }
                        _ => return,
                    }
                }
                Err(e) => {
                    // The database is unreachable or refused a write: the journal is where it
                    // was, so driving again later continues correctly.
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(operation = id, "operation interrupted, retrying: {e:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    });
}

/// How one zone of an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ZoneEnd {
    Done,
    Restored,
    Paused,
    /// The controller restarts on a new build mid-step; the next process resumes.
    Restarting,
}

/// How a zone's journal says it ended, once its driver stopped; `None` if it never started.
fn zone_end(op: &Operation, zone: &ZonePlan) -> Option<ZoneEnd> {
    if !op.steps.iter().any(|s| s.zone == zone.zone) {
        return None;
    }
    Some(match next(op, zone) {
        Next::Done => ZoneEnd::Done,
        Next::Restored => ZoneEnd::Restored,
        // Its driver stopped at a step from the point of no return on.
        Next::Run(_) => ZoneEnd::Paused,
    })
}

async fn drive(c: &Arc<Controller>, id: i64) -> anyhow::Result<()> {
    let op = c.store.operation(id).await?;
    if op.state != OpState::Running {
        return Ok(());
    }
    let _tallies = DropTallies(c, id);
    let plan = op.plan.clone();
    if plan.parallel_zones {
        let mut zones = tokio::task::JoinSet::new();
        for index in 0..plan.zones.len() {
            let c = c.clone();
            zones.spawn(async move { drive_zone(&c, id, index).await });
        }
        while let Some(end) = zones.join_next().await {
            end.context("a zone's task panicked")??;
        }
    } else {
        for index in 0..plan.zones.len() {
            if drive_zone(c, id, index).await? != ZoneEnd::Done {
                break;
            }
        }
    }
    if c.restarting.borrow().is_some() {
        // The next process resumes the operation where its journal stands.
        return Ok(());
    }
    // How each zone ended, as its journal says (`None`: never started).
    let op = c.store.operation(id).await?;
    let ends: Vec<Option<ZoneEnd>> = plan.zones.iter().map(|z| zone_end(&op, z)).collect();
    let failures = |restore: bool| -> Vec<String> {
        op.steps
            .iter()
            .filter(|s| s.state == StepState::Failed && s.step.is_restore() == restore)
            .map(|s| {
                format!(
                    "zone {}, {}: {}",
                    s.zone,
                    s.step.as_str(),
                    s.message.as_deref().unwrap_or("failed")
                )
            })
            .collect()
    };
    let per_zone = if plan.zones.len() > 1 {
        let zones: Vec<String> = plan
            .zones
            .iter()
            .zip(&ends)
            .map(|(z, end)| {
                let end = match end {
                    Some(ZoneEnd::Done) => "done",
                    Some(ZoneEnd::Restarting) => "restarting",
                    Some(ZoneEnd::Restored) => "restored",
                    Some(ZoneEnd::Paused) => "paused",
                    None => "not started",
                };
                format!("zone {} {end}", z.zone)
            })
            .collect();
        format!(" ({})", zones.join(", "))
    } else {
        String::new()
    };
    let (state, message) = if ends.contains(&Some(ZoneEnd::Paused)) {
        (
            OpState::Paused,
            format!(
                "{}; users are on the new {}; `paddock op resume {id}` retries{per_zone}",
                failures(false).last().cloned().unwrap_or_default(),
                if plan.platform.is_some() {
                    "build"
                } else {
                    "version"
                }
            ),
        )
    } else if ends.iter().all(|e| *e == Some(ZoneEnd::Done)) {
        (OpState::Succeeded, String::new())
    } else {
        let cause = if op.abort_requested {
            "aborted by the operator".to_string()
        } else {
            failures(false)
                .first()
                .cloned()
                .unwrap_or_else(|| "failed".into())
        };
        let unconfirmed = failures(true);
        let after = if unconfirmed.is_empty() {
            match plan.platform {
                None => format!(
                    "every user of the restored zones stayed on or went back to the old version; flags and routing there are as before{per_zone}"
                ),
                Some(_) => format!(
                    "users of the restored zones are served by the servers that served them before; flags and routing there are as before{per_zone}"
                ),
            }
        } else {
            format!(
                "restored, except what did not confirm: {}",
                unconfirmed.join("; ")
            )
        };
        let state = if op.abort_requested {
            OpState::Aborted
        } else {
            OpState::Failed
        };
        (state, format!("{cause}; {after}"))
    };
    let now = now_ms();
    let message = (!message.is_empty()).then_some(message);
    c.store
        .set_operation_state(id, state, message.as_deref(), now)
        .await?;
    c.store
        .audit(
            "controller",
            "operation-end",
            &format!(
                "operation {id} {}{}",
                state.as_str(),
                message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
            now,
        )
        .await?;
    tracing::info!(
        operation = id,
        state = state.as_str(),
        message = message.as_deref().unwrap_or(""),
        "operation ended"
    );
    c.facts_changed();
    Ok(())
}

async fn drive_zone(c: &Arc<Controller>, id: i64, index: usize) -> anyhow::Result<ZoneEnd> {
    loop {
        // An abort is either seen here or refused because this step has started.
        let gate = c.zone_gate.lock().await;
        if c.restarting.borrow().is_some() {
            return Ok(ZoneEnd::Restarting);
        }
        let op = c.store.operation(id).await?;
        let zone = op
            .plan
            .zones
            .get(index)
            .context("the plan lost a zone")?
            .clone();
        let step = match next(&op, &zone) {
            Next::Done => return Ok(ZoneEnd::Done),
            Next::Restored => return Ok(ZoneEnd::Restored),
            Next::Run(step) => step,
        };
        let servers = zone
            .steps
            .iter()
            .find(|s| s.step == step)
            .map(|s| s.servers.clone())
            .unwrap_or_else(|| zone.updating.iter().chain(&zone.loaded).cloned().collect());
        let started = now_ms();
        c.store
            .step_started(id, &zone.zone, step, &servers, started)
            .await?;
        drop(gate);
        c.facts_changed();
        tracing::info!(operation = id, zone = %zone.zone, step = step.as_str(), servers = %servers.join(","), "step started");
        let run = Run {
            c,
            id,
            plan: &op.plan,
            zone: &zone,
            timeout: Duration::from_millis(op.plan.timeout_ms),
            started_ms: started,
        };
        let outcome = run.step(step).await;
        let (state, facts, message) = match outcome {
            Ok(facts) => (StepState::Done, facts, None),
            Err(StepError::Failed(message)) => (StepState::Failed, Vec::new(), Some(message)),
            Err(StepError::Store(e)) => return Err(e),
            Err(StepError::Restarting) => return Ok(ZoneEnd::Restarting),
        };
        c.store
            .step_ended(
                id,
                &zone.zone,
                step,
                StepEnd {
                    state,
                    facts: &facts,
                    message: message.as_deref(),
                },
                now_ms(),
            )
            .await?;
        c.facts_changed();
        tracing::info!(
            operation = id,
            zone = %zone.zone,
            step = step.as_str(),
            outcome = state.as_str(),
            ms = now_ms() - started,
            message = message.as_deref().unwrap_or(""),
            "step ended"
        );
        if state == StepState::Failed && past_point_of_no_return(step) {
            return Ok(ZoneEnd::Paused);
        }
    }
}

/// Why a step did not complete.
enum StepError {
    /// It failed: the message names what did not confirm.
    Failed(String),
    /// This process is being replaced by a new build, which runs the step again.
    Restarting,
    /// The store could not be reached: drive again later.
    Store(anyhow::Error),
}

impl From<StoreError> for StepError {
    fn from(e: StoreError) -> StepError {
        match e {
            // Someone removed a server or a version the plan names: retrying cannot help.
            StoreError::UnknownServer(_)
            | StoreError::UnknownBalancer(_)
            | StoreError::UnknownVersion { .. }
            | StoreError::RouteTaken { .. } => StepError::Failed(e.to_string()),
            e => StepError::Store(e.into()),
        }
    }
}

/// What a wait saw: confirmed, with the facts, or not yet, with what is missing.
enum Check {
    Done(Vec<String>),
    Pending(String),
}

/// One step of one zone being run.
struct Run<'a> {
    c: &'a Arc<Controller>,
    id: i64,
    plan: &'a DeployPlan,
    zone: &'a ZonePlan,
    timeout: Duration,
    started_ms: i64,
}

impl Run<'_> {
    async fn step(&self, step: Step) -> Result<Vec<String>, StepError> {
        let z = self.zone;
        match step {
            Step::SchedulerOff => {
                let servers: Vec<String> = z.before.iter().map(|b| b.name.clone()).collect();
                let g = self
                    .set(servers.iter().map(|n| ServerChange {
                        name: n.clone(),
                        scheduler: Some(false),
                        ..ServerChange::default()
                    }))
                    .await?;
                let mut facts = vec![format!(
                    "scheduler off on {} (generation {g}): no new tick is claimed there",
                    join(&servers)
                )];
                facts.extend(self.wait_timers_ended(&servers).await?);
                Ok(facts)
            }
            Step::DrainUpdating => {
                let g = self
                    .set(z.updating.iter().map(|n| lb(n, LbState::Drain)))
                    .await?;
                self.wait_drained(g, &z.updating).await
            }
            Step::DeploymentOff => {
                let g = self
                    .set(z.loaded.iter().map(|n| ServerChange {
                        name: n.clone(),
                        deployment: Some(false),
                        ..ServerChange::default()
                    }))
                    .await?;
                Ok(vec![format!(
                    "deployment service off on {} (generation {g})",
                    join(&z.loaded)
                )])
            }
            Step::LoadNew | Step::InPlace => {
                self.desire(|a| &a.to).await?;
                self.wait_serving(&z.updating, |a| &a.to, Mode::Forward)
                    .await
            }
            Step::Smoke => self.smoke().await,
            Step::Cutover => {
                // The balancers that acknowledge the cutover already report as often as the
                // watch step after it wants, and the answers it judges are counted from here.
                let _watching = self.plan.watch.map(|_| Watching::new(self.c));
                if self.plan.watch.is_some() {
                    let mut tally = Tally::default();
                    self.observe(&mut tally).await?;
                    self.c
                        .tallies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert((self.id, z.zone.clone()), tally);
                }
                let changes = z
                    .updating
                    .iter()
                    .map(|n| lb(n, LbState::Ready))
                    .chain(z.loaded.iter().map(|n| lb(n, LbState::Drain)));
                let g = self.set(changes).await?;
                self.wait_drained(g, &z.loaded).await
            }
            Step::Watch => match self.plan.watch {
                Some(watch) => self.watch(watch).await,
                None => Ok(vec!["no watch in the plan".into()]),
            },
            Step::SchedulerOnUpdating => {
                self.restore_flag(&z.updating, ServerFlag::Scheduler).await
            }
            Step::DeploymentOn => {
                self.restore_flag(&z.loaded, ServerFlag::Deployment).await?;
                self.wait_serving(&z.loaded, |a| &a.to, Mode::NoReturn)
                    .await
            }
            Step::RouteAll => {
                let g = self
                    .set(z.loaded.iter().map(|n| lb(n, self.before(n).lb)))
                    .await?;
                self.wait_applied(g, &format!("{} back in rotation", join(&z.loaded)))
                    .await
            }
            Step::SchedulerOnLoaded => {
                let rest: Vec<String> = z
                    .before
                    .iter()
                    .filter(|b| !z.updating.contains(&b.name))
                    .map(|b| b.name.clone())
                    .collect();
                self.restore_flag(&rest, ServerFlag::Scheduler).await
            }
            Step::RestoreRouting => {
                // Users go back to the loaded group, which never left the old version.
                let changes = z
                    .loaded
                    .iter()
                    .map(|n| lb(n, self.before(n).lb))
                    .chain(z.updating.iter().map(|n| lb(n, LbState::Drain)));
                let g = self.set(changes).await?;
                self.wait_applied(
                    g,
                    &format!("users routed to {} (old version) only", join(&z.loaded)),
                )
                .await
            }
            Step::RestoreVersion => {
                self.desire(|a| &a.from).await?;
                self.wait_serving(&z.updating, |a| &a.from, Mode::NoReturn)
                    .await
            }
            Step::RestoreFlags => self.restore_all_flags().await,
            Step::UpgradeUpdating | Step::UpgradeInPlace => {
                let build = self.build()?;
                // In place, the zone's other servers (passive, or not alive now) are told too:
                // each installs the build whenever it is up. Only the serving one is waited for.
                let told = if step == Step::UpgradeInPlace {
                    self.zone_servers().await?
                } else {
                    z.updating.clone()
                };
                let (g, told) = self.tell_build(&told, build).await?;
                let mut facts = vec![told];
                facts.extend(self.wait_upgraded(&z.updating, g, Mode::Forward).await?);
                // Users reach them at the cutover (or now, in place): only through balancers
                // whose health checks found them up again after the restart.
                facts.extend(self.wait_balancers_see_up(&z.updating, now_ms()).await?);
                Ok(facts)
            }
            Step::UpgradeLoaded => {
                // Every other server of the zone too (passive ones, ones not alive now): each
                // installs the build whenever it is up; only the loaded group is waited for.
                let build = self.build()?;
                let rest: Vec<String> = self
                    .zone_servers()
                    .await?
                    .into_iter()
                    .filter(|name| !z.updating.contains(name))
                    .collect();
                let (g, told) = self.tell_build(&rest, build).await?;
                let mut facts = vec![told];
                facts.extend(self.wait_upgraded(&z.loaded, g, Mode::NoReturn).await?);
                Ok(facts)
            }
            Step::UpgradeBalancers => {
                let build = self.build()?;
                let all = self
                    .c
                    .store
                    .balancers(now_ms() - crate::routing::BALANCER_ALIVE_WITHIN_MS)
                    .await?;
                let mut facts = Vec::new();
                // Not reporting now: told, not waited for; each installs the build when back.
                let silent: Vec<String> = all
                    .iter()
                    .filter(|b| {
                        !b.alive && b.report.platform.build.as_deref() != Some(&build.sha256)
                    })
                    .filter(|b| b.platform_target.as_deref() != Some(&build.sha256))
                    .map(|b| b.report.name.clone())
                    .collect();
                if !silent.is_empty() {
                    let g = self.tell_balancers(&silent, build).await?;
                    facts.push(format!(
                        "{} not reporting: told to run build {} (generation {g}), installed when back",
                        join(&silent),
                        short(&build.sha256)
                    ));
                }
                let live: Vec<&str> = all
                    .iter()
                    .filter(|b| b.alive)
                    .map(|b| b.report.name.as_str())
                    .collect();
                if live.is_empty() {
                    facts.push("no live balancer to upgrade".into());
                }
                // One at a time: a build that does not come up stops the step with the others
                // still routing.
                for name in live {
                    facts.extend(self.upgrade_balancer(name, build).await?);
                }
                Ok(facts)
            }
            Step::UpgradeStandbys => self.upgrade_standbys().await,
            Step::UpgradeController => {
                let build = self.build()?;
                let own = crate::platform::own_build(self.c)
                    .await
                    .map_err(|e| StepError::Failed(format!("{e:#}")))?;
                if own == build.sha256 {
                    return Ok(vec![format!(
                        "the controller runs build {} (paddock {}) as process {}",
                        short(&build.sha256),
                        build.version,
                        std::process::id()
                    )]);
                }
                crate::platform::install_here(self.c, build)
                    .await
                    .map_err(|e| StepError::Failed(format!("{e:#}")))?;
                // Journaled as running: the new process runs this step again, and finds
                // itself on the build.
                Err(StepError::Restarting)
            }
            Step::RestorePlatform => {
                let build = self.build()?;
                // Who the failed step told, from the plan: the same when this step runs again.
                let told: Vec<String> = if z.in_place {
                    self.zone_servers().await?
                } else {
                    z.updating.clone()
                };
                let still_told: Vec<String> = self
                    .c
                    .store
                    .servers()
                    .await?
                    .into_iter()
                    .filter(|s| {
                        told.contains(&s.name)
                            && s.platform_target.as_deref() == Some(&build.sha256)
                    })
                    .map(|s| s.name)
                    .collect();
                let g = self.set(still_told.iter().map(|n| target(n, None))).await?;
                // One that was installing when the target went stops before it replaces its
                // executable, or restarts on the build: wait to know which, so that the flags
                // restored next keep a server on the build out of rotation.
                let settled = self
                    .wait(false, || async {
                        let now = now_ms();
                        let busy: Vec<String> = self
                            .c
                            .store
                            .servers()
                            .await?
                            .into_iter()
                            .filter(|s| told.contains(&s.name) && alive(s, now))
                            .filter(|s| {
                                s.heartbeat_ms.unwrap_or(0) < self.started_ms
                                    || s.observed.as_ref().is_some_and(|o| o.installing.is_some())
                            })
                            .map(|s| s.name)
                            .collect();
                        if busy.is_empty() {
                            Ok(Check::Done(Vec::new()))
                        } else {
                            Ok(Check::Pending(format!(
                                "{} still installing the build",
                                join(&busy)
                            )))
                        }
                    })
                    .await?;
                let servers = self.c.store.servers().await?;
                let (kept, stopped): (Vec<&ServerInfo>, Vec<&ServerInfo>) = servers
                    .iter()
                    .filter(|s| told.contains(&s.name))
                    .partition(|s| runs(s, &build.sha256));
                let mut facts = settled;
                if !stopped.is_empty() {
                    let stopped: Vec<&str> = stopped.iter().map(|s| s.name.as_str()).collect();
                    facts.push(format!(
                        "{} no longer told to install build {} (generation {g})",
                        join(&stopped),
                        short(&build.sha256)
                    ));
                }
                if !kept.is_empty() {
                    let kept: Vec<&str> = kept.iter().map(|s| s.name.as_str()).collect();
                    facts.push(format!(
                        "{} run build {} and keep it (the old executable was replaced); kept out of rotation next",
                        join(&kept),
                        short(&build.sha256)
                    ));
                }
                Ok(facts)
            }
        }
    }

    /// Tells `servers` to run `build`, in one generation; returns it, with the fact.
    async fn tell_build(
        &self,
        servers: &[String],
        build: &PlatformBuild,
    ) -> Result<(i64, String), StepError> {
        let g = self
            .set(
                servers
                    .iter()
                    .map(|n| target(n, Some(build.sha256.clone()))),
            )
            .await?;
        Ok((
            g,
            format!(
                "{} told to run build {} (generation {g})",
                join(servers),
                short(&build.sha256)
            ),
        ))
    }

    /// Tells every standby controller reporting now to run the plan's build and waits until
    /// each reports running it (it restarts on it, standing by). A report that it cannot install
    /// the build fails the step, and so does silence for [`RESTART_GRACE_MS`] (a resume then
    /// leaves out one that stays silent).
    async fn upgrade_standbys(&self) -> Result<Vec<String>, StepError> {
        let build = self.build()?;
        // Reports live in memory: a controller that just took the role waits until every
        // standby had the time to report to it.
        let settled = self.c.started
            + Duration::from_millis(crate::standby::ALIVE_WITHIN_MS as u64)
            + crate::standby::REPORT_INTERVAL;
        tokio::time::sleep_until(settled.into()).await;
        let known: Vec<String> = crate::standby::standbys(self.c)
            .into_iter()
            .filter(|s| s.alive)
            .map(|s| s.report.name)
            .collect();
        // A new generation each run: a standby whose installation failed tries again at once.
        let g = now_ms();
        *self
            .c
            .standby_target
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((build.clone(), g));
        if known.is_empty() {
            return Ok(vec![
                "no standby controller reports to this controller".to_string(),
            ]);
        }
        let told = format!(
            "standbys {} told to run build {}",
            join(&known),
            short(&build.sha256)
        );
        let since = now_ms();
        let ran = self
            .wait(false, || async {
                let all = crate::standby::standbys(self.c);
                let now = now_ms();
                let (mut facts, mut missing) = (Vec::new(), Vec::new());
                for name in &known {
                    let Some(s) = all.iter().find(|s| s.report.name == *name) else {
                        missing.push(format!("{name} has not reported"));
                        continue;
                    };
                    let r = &s.report;
                    if let Some(failure) = r
                        .platform.upgrade_error
                        .as_ref()
                        .filter(|f| f.build == build.sha256 && f.generation >= g)
                    {
                        return Err(StepError::Failed(format!(
                            "standby {name} (on {}) cannot install build {}: {}",
                            r.host,
                            short(&build.sha256),
                            failure.error
                        )));
                    }
                    let silent = now - s.heartbeat_ms;
                    if !s.alive && now - since.max(s.heartbeat_ms) > RESTART_GRACE_MS {
                        return Err(StepError::Failed(format!(
                            "standby {name} (on {}) stopped reporting after it was told to run build {} (no report for {} s): see its log; once it stands by again, or is stopped for good, `paddock op resume`",
                            r.host,
                            short(&build.sha256),
                            silent / 1000
                        )));
                    }
                    if r.platform.build.as_deref() != Some(&build.sha256) {
                        if !s.alive {
                            missing.push(format!("{name} is restarting (no report for {} s)", silent / 1000));
                        } else if r.platform.installing.is_some() {
                            missing.push(format!("{name} is installing build {}", short(&build.sha256)));
                        } else {
                            missing.push(format!("{name} does not run build {} yet", short(&build.sha256)));
                        }
                        continue;
                    }
                    if !s.alive {
                        missing.push(format!("{name} stopped reporting"));
                        continue;
                    }
                    facts.push(format!(
                        "{name} on {} runs build {} (paddock {}) as process {}, standing by ({} ms)",
                        r.host,
                        short(&build.sha256),
                        r.version,
                        r.pid,
                        now - since
                    ));
                }
                if missing.is_empty() {
                    Ok(Check::Done(facts))
                } else {
                    Ok(Check::Pending(missing.join("; ")))
                }
            })
            .await?;
        Ok(std::iter::once(told).chain(ran).collect())
    }

    /// Tells `balancers` to run `build`, in one generation, and announces it (the balancers'
    /// long-polls answer with it); returns it.
    async fn tell_balancers(
        &self,
        balancers: &[String],
        build: &PlatformBuild,
    ) -> Result<i64, StepError> {
        let g = self
            .c
            .store
            .set_balancer_targets(balancers, Some(&build.sha256))
            .await?;
        self.c.announce(g);
        Ok(g)
    }

    /// Tells balancer `name` to run `build` (unless it does, or a run of this step before a
    /// controller restart told it already) and waits until it reports running it, routing by
    /// the table of that generation or newer. A report that it cannot install the build fails
    /// the step, and so does silence for [`RESTART_GRACE_MS`] (the build does not come up
    /// there), before the next balancer is told.
    async fn upgrade_balancer(
        &self,
        name: &str,
        build: &PlatformBuild,
    ) -> Result<Vec<String>, StepError> {
        let balancer = |all: Vec<paddock_api::BalancerInfo>| {
            all.into_iter()
                .find(|b| b.report.name == name)
                .ok_or_else(|| StepError::Failed(format!("balancer {name} is no longer known")))
        };
        let alive_since = || now_ms() - crate::routing::BALANCER_ALIVE_WITHIN_MS;
        let info = balancer(self.c.store.balancers(alive_since()).await?)?;
        if info.report.platform.build.as_deref() == Some(&build.sha256) {
            return Ok(vec![format!(
                "{name} runs build {} already",
                short(&build.sha256)
            )]);
        }
        // Told by a run of this step before a controller restart: the same generation. Told,
        // and it failed (this is a resume): a new one, which it tries at once.
        let failed_at = |g: i64| {
            info.report
                .platform
                .upgrade_error
                .as_ref()
                .is_some_and(|f| f.build == build.sha256 && f.generation >= g)
        };
        let g = match info.platform_target_generation {
            Some(g) if info.platform_target.as_deref() == Some(&build.sha256) && !failed_at(g) => g,
            _ => self.tell_balancers(&[name.to_string()], build).await?,
        };
        let told = format!(
            "{name} told to run build {} (generation {g})",
            short(&build.sha256)
        );
        let since = now_ms();
        let ran = self
            .wait(false, || async {
                let b = balancer(self.c.store.balancers(alive_since()).await?)?;
                if let Some(failure) = b
                    .report
                    .platform.upgrade_error
                    .as_ref()
                    .filter(|f| f.build == build.sha256 && f.generation >= g)
                {
                    return Err(StepError::Failed(format!(
                        "balancer {name} cannot install build {}: {}",
                        short(&build.sha256),
                        failure.error
                    )));
                }
                let silent = now_ms() - b.heartbeat_ms;
                // It was reporting when told: silence past a restart's time is a build that
                // does not come up there. The step stops, the other balancers still routing.
                if !b.alive && now_ms() - since.max(b.heartbeat_ms) > RESTART_GRACE_MS {
                    return Err(StepError::Failed(format!(
                        "balancer {name} stopped reporting after it was told to run build {} (no report for {} s): see its log; the executable it replaced is kept beside it as paddock.previous; once it routes again, `paddock op resume`",
                        short(&build.sha256),
                        silent / 1000
                    )));
                }
                if b.report.platform.build.as_deref() != Some(&build.sha256) {
                    return Ok(Check::Pending(if !b.alive {
                        format!("{name} is restarting (no report for {} s)", silent / 1000)
                    } else if b.report.platform.installing.is_some() {
                        format!("{name} is installing build {}", short(&build.sha256))
                    } else {
                        format!("{name} does not run build {} yet", short(&build.sha256))
                    }));
                }
                if b.report.generation < g {
                    return Ok(Check::Pending(format!(
                        "{name} routes by generation {}, not {g} yet",
                        b.report.generation
                    )));
                }
                if !b.alive {
                    return Ok(Check::Pending(format!("{name} stopped reporting")));
                }
                Ok(Check::Done(vec![format!(
                    "{name} runs build {} (paddock {}), routing by generation {} ({} ms)",
                    short(&build.sha256),
                    build.version,
                    b.report.generation,
                    now_ms() - since
                )]))
            })
            .await?;
        Ok(std::iter::once(told).chain(ran).collect())
    }

    /// Every server of the zone now.
    async fn zone_servers(&self) -> Result<Vec<String>, StepError> {
        Ok(self
            .c
            .store
            .servers()
            .await?
            .into_iter()
            .filter(|s| s.zone == self.zone.zone)
            .map(|s| s.name)
            .collect())
    }

    /// The build a platform upgrade installs.
    fn build(&self) -> Result<&PlatformBuild, StepError> {
        self.plan
            .platform
            .as_ref()
            .ok_or_else(|| StepError::Failed("this operation installs no platform build".into()))
    }

    /// Waits until every live balancer reported, at `since_ms` or later, that its health
    /// checks pass for each of `servers`.
    async fn wait_balancers_see_up(
        &self,
        servers: &[String],
        since_ms: i64,
    ) -> Result<Vec<String>, StepError> {
        self.wait(true, || async {
            let balancers: Vec<_> = self
                .c
                .store
                .balancers(now_ms() - crate::routing::BALANCER_ALIVE_WITHIN_MS)
                .await?
                .into_iter()
                .filter(|b| b.alive)
                .collect();
            let mut missing = Vec::new();
            for b in &balancers {
                if b.heartbeat_ms < since_ms {
                    missing.push(format!("{} has not reported since", b.report.name));
                    continue;
                }
                let down: Vec<&str> = servers
                    .iter()
                    .filter(|name| !b.report.upstreams.iter().any(|u| u.name == **name && u.up))
                    .map(String::as_str)
                    .collect();
                if !down.is_empty() {
                    missing.push(format!(
                        "{} does not see {} up yet",
                        b.report.name,
                        down.join(", ")
                    ));
                }
            }
            if !missing.is_empty() {
                return Ok(Check::Pending(missing.join("; ")));
            }
            let names: Vec<&str> = balancers.iter().map(|b| b.report.name.as_str()).collect();
            Ok(Check::Done(vec![if names.is_empty() {
                "no live balancer to wait for".to_string()
            } else {
                format!(
                    "balancers {} see {} up ({} ms)",
                    names.join(", "),
                    join(servers),
                    now_ms() - self.started_ms
                )
            }]))
        })
        .await
    }

    /// Waits until each of `servers` runs the plan's build and serves the zone's versions,
    /// healthy, in a heartbeat sent after this step started. In [`Mode::Forward`] a server that
    /// reports it cannot install the build fails the step at once.
    async fn wait_upgraded(
        &self,
        servers: &[String],
        generation: i64,
        mode: Mode,
    ) -> Result<Vec<String>, StepError> {
        let build = self.build()?;
        let forward = mode == Mode::Forward;
        let since = now_ms();
        let facts = self
            .wait(forward, || async {
                let all = self.c.store.servers().await?;
                let now = now_ms();
                let mut missing = Vec::new();
                let mut dead = Vec::new();
                for name in servers {
                    let Some(server) = all.iter().find(|s| s.name == *name) else {
                        missing.push(format!("{name} is no longer registered"));
                        continue;
                    };
                    if let Some(failure) = server
                        .observed
                        .as_ref()
                        .and_then(|o| o.upgrade_error.as_ref())
                        .filter(|f| f.build == build.sha256 && f.generation >= generation)
                    {
                        let failed = format!(
                            "{name} cannot install build {}: {}",
                            short(&build.sha256),
                            failure.error
                        );
                        if forward {
                            return Err(StepError::Failed(failed));
                        }
                        missing.push(format!("{failed} (it retries)"));
                        continue;
                    }
                    // Silent longer than a restart takes, since it was told: the build does
                    // not come up there. Before the point of no return, users go back.
                    let silent = silent_ms(server, now).min(now - since);
                    if forward && !alive(server, now) && silent > RESTART_GRACE_MS {
                        return Err(StepError::Failed(format!(
                            "{name} stopped reporting after it was told to run build {} (no heartbeat for {} s): see its log; the executable it replaced is kept beside it as paddock.previous",
                            short(&build.sha256),
                            silent_ms(server, now) / 1000
                        )));
                    }
                    if !forward && !alive(server, now) && silent_ms(server, now) > RESTART_GRACE_MS
                    {
                        // Past the point of no return a dead server installs the build when it
                        // is back (its target stays); it does not hold the operation.
                        dead.push(name.clone());
                        continue;
                    }
                    if !runs(server, &build.sha256) {
                        missing.push(if alive(server, now) {
                            format!("{name} does not run build {} yet", short(&build.sha256))
                        } else {
                            format!(
                                "{name} is restarting (no heartbeat for {} s)",
                                silent_ms(server, now) / 1000
                            )
                        });
                        continue;
                    }
                    if !alive(server, now) {
                        missing.push(format!("{name} stopped reporting"));
                    }
                }
                if !missing.is_empty() {
                    return Ok(Check::Pending(missing.join("; ")));
                }
                let running: Vec<&String> = servers.iter().filter(|n| !dead.contains(n)).collect();
                let mut facts = vec![format!(
                    "{} {} build {} (paddock {}) ({} ms)",
                    join(&running),
                    if running.len() == 1 { "runs" } else { "run" },
                    short(&build.sha256),
                    build.version,
                    now_ms() - self.started_ms
                )];
                if !dead.is_empty() {
                    facts.push(format!(
                        "{} not alive: installs the build when it comes back",
                        dead.join(", ")
                    ));
                }
                Ok(Check::Done(facts))
            })
            .await?;
        let mut all = facts;
        all.extend(self.wait_serving(servers, |a| &a.to, mode).await?);
        Ok(all)
    }

    fn before(&self, name: &str) -> ServerBefore {
        self.zone
            .before
            .iter()
            .find(|b| b.name == name)
            .cloned()
            .unwrap_or(ServerBefore {
                name: name.to_string(),
                lb: LbState::Ready,
                deployment: true,
                scheduler: true,
            })
    }

    /// Writes server changes in one generation and wakes the long-polls.
    async fn set(&self, changes: impl Iterator<Item = ServerChange>) -> Result<i64, StepError> {
        let changes: Vec<ServerChange> = changes.collect();
        if changes.is_empty() {
            return Ok(self.c.store.generation().await?);
        }
        let g = self.c.store.set_servers(&changes).await?;
        self.c.announce(g);
        Ok(g)
    }

    /// Makes the plan's `from` or `to` versions desired, in one generation.
    async fn desire(&self, pick: fn(&PlannedApp) -> &String) -> Result<i64, StepError> {
        let versions: Vec<(&str, &str, &str)> = self
            .zone
            .apps
            .iter()
            .map(|a| (a.app.as_str(), self.zone.zone.as_str(), pick(a).as_str()))
            .collect();
        let g = self.c.store.set_desired_many(&versions, now_ms()).await?;
        crate::timers::sync(self.c).await?;
        self.c.announce(g);
        Ok(g)
    }

    async fn restore_flag(
        &self,
        servers: &[String],
        flag: ServerFlag,
    ) -> Result<Vec<String>, StepError> {
        let g = self
            .set(servers.iter().map(|n| {
                let before = self.before(n);
                ServerChange {
                    name: n.clone(),
                    deployment: (flag == ServerFlag::Deployment).then_some(before.deployment),
                    scheduler: (flag == ServerFlag::Scheduler).then_some(before.scheduler),
                    ..ServerChange::default()
                }
            }))
            .await?;
        Ok(vec![format!(
            "{} service back as before on {} (generation {g})",
            match flag {
                ServerFlag::Deployment => "deployment",
                ServerFlag::Scheduler => "scheduler",
            },
            join(servers)
        )])
    }

    /// Every flag as before; an updating server that does not serve the old version yet stays
    /// drained, so that no user reaches a version the operation was meant to take back.
    async fn restore_all_flags(&self) -> Result<Vec<String>, StepError> {
        let servers = self.c.store.servers().await?;
        let now = now_ms();
        let mut kept_out = Vec::new();
        let mut changes = Vec::new();
        for before in &self.zone.before {
            let mut lb = before.lb;
            // A dead updating server would serve its saved state (the new version) when it
            // comes back, before it reaches this controller: it stays drained.
            let server = servers.iter().find(|s| s.name == before.name);
            // Any server of the zone (in place, every one was told) that installed the build
            // of a platform upgrade that failed runs what the operation put back: it stays
            // drained too.
            let on_new_build = server.is_some_and(|server| {
                self.plan
                    .platform
                    .as_ref()
                    .is_some_and(|b| runs(server, &b.sha256))
            });
            if on_new_build
                || self.zone.updating.contains(&before.name)
                    && server.is_none_or(|server| {
                        !alive(server, now)
                            || self
                                .zone
                                .apps
                                .iter()
                                .any(|a| serving_version(server, &a.app) != Some(a.from.as_str()))
                    })
            {
                lb = LbState::Drain;
                kept_out.push(before.name.clone());
            }
            changes.push(ServerChange {
                name: before.name.clone(),
                lb: Some(lb),
                deployment: Some(before.deployment),
                scheduler: Some(before.scheduler),
                platform_target: None,
            });
        }
        let g = self.set(changes.into_iter()).await?;
        let facts = self
            .wait_applied(g, "every flag as before the operation")
            .await?;
        if !kept_out.is_empty() {
            return Err(StepError::Failed(format!(
                "{} kept in drain: not serving the old version, or on the build the operation did not complete, or not alive; `paddock server NAME lb ready` once it serves as before (or upgrade again)",
                kept_out.join(", ")
            )));
        }
        Ok(facts)
    }

    /// Waits until no timer runs on `servers` (a run holds an unexpired lease until it ends).
    async fn wait_timers_ended(&self, servers: &[String]) -> Result<Vec<String>, StepError> {
        let waited_for = std::sync::Mutex::new(std::collections::BTreeSet::new());
        self.wait(true, || {
            let waited_for = &waited_for;
            async move {
                let now = now_ms();
                let running: Vec<String> = self
                    .c
                    .store
                    .timers()
                    .await?
                    .into_iter()
                    .filter(|t| {
                        t.running_on.as_ref().is_some_and(|s| servers.contains(s))
                            && t.lease_until_ms.is_some_and(|until| until >= now)
                    })
                    .map(|t| {
                        format!(
                            "{}/{} on {}",
                            t.app,
                            t.timer,
                            t.running_on.unwrap_or_default()
                        )
                    })
                    .collect();
                if running.is_empty() {
                    let waited_for = waited_for.lock().unwrap_or_else(|e| e.into_inner());
                    return Ok(Check::Done(vec![if waited_for.is_empty() {
                        "no timer was running".to_string()
                    } else {
                        format!(
                            "timer runs ended: {} ({} ms)",
                            waited_for.iter().cloned().collect::<Vec<_>>().join(", "),
                            now - self.started_ms
                        )
                    }]));
                }
                waited_for
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(running.iter().cloned());
                Ok(Check::Pending(format!(
                    "timers still running: {}",
                    running.join(", ")
                )))
            }
        })
        .await
    }

    /// The routing status once every live balancer routes by generation `g`, or what is
    /// still pending.
    async fn routing_at(
        &self,
        g: i64,
    ) -> Result<Result<crate::routing::RoutingStatus, Check>, StepError> {
        let status =
            crate::routing::status(self.c.store.as_ref(), Some(g), now_ms(), ALIVE_WITHIN_MS)
                .await?;
        if !status.applied {
            return Ok(Err(Check::Pending(format!(
                "balancers {} have not applied generation {g}",
                status.pending.join(", ")
            ))));
        }
        Ok(Ok(status))
    }

    /// Waits until every live balancer routes by generation `g`.
    async fn wait_applied(&self, g: i64, what: &str) -> Result<Vec<String>, StepError> {
        self.wait(false, || async {
            let status = match self.routing_at(g).await? {
                Ok(status) => status,
                Err(pending) => return Ok(pending),
            };
            Ok(Check::Done(vec![
                format!("{what} (generation {g})"),
                acks(&status, g),
            ]))
        })
        .await
    }

    /// Waits until every live balancer routes by generation `g` and `servers` are drained.
    async fn wait_drained(&self, g: i64, servers: &[String]) -> Result<Vec<String>, StepError> {
        self.wait(true, || async {
            let status = match self.routing_at(g).await? {
                Ok(status) => status,
                Err(pending) => return Ok(pending),
            };
            let busy: Vec<String> = status
                .servers
                .iter()
                .filter(|s| servers.contains(&s.name) && !s.drained)
                .map(|s| {
                    format!(
                        "{} ({} in flight on the front-end, {} from balancers)",
                        s.name,
                        s.in_flight.map(|n| n.to_string()).unwrap_or("?".into()),
                        s.balancer_in_flight
                    )
                })
                .collect();
            if !busy.is_empty() {
                return Ok(Check::Pending(format!("not drained: {}", busy.join(", "))));
            }
            Ok(Check::Done(vec![
                acks(&status, g),
                format!(
                    "{} drained: no request in flight ({} ms)",
                    join(servers),
                    now_ms() - self.started_ms
                ),
            ]))
        })
        .await
    }

    /// Waits until each of `servers` reports the picked version of every app of the zone,
    /// healthy, in a heartbeat sent after this step started.
    ///
    /// In [`Mode::Forward`] a server that stops reporting fails the step at once, and an abort
    /// request ends the wait. Otherwise a dead server counts as confirmed (it takes the desired
    /// version when it comes back) and the wait cannot be aborted.
    async fn wait_serving(
        &self,
        servers: &[String],
        pick: fn(&PlannedApp) -> &String,
        mode: Mode,
    ) -> Result<Vec<String>, StepError> {
        let forward = mode == Mode::Forward;
        self.wait(forward, || async {
            let all = self.c.store.servers().await?;
            let mut missing = Vec::new();
            let mut dead = Vec::new();
            for name in servers {
                let Some(server) = all.iter().find(|s| s.name == *name) else {
                    missing.push(format!("{name} is no longer registered"));
                    continue;
                };
                if !alive(server, now_ms()) {
                    if forward {
                        return Err(StepError::Failed(format!(
                            "{name} stopped reporting (no heartbeat for {} s)",
                            ALIVE_WITHIN_MS / 1000
                        )));
                    }
                    dead.push(name.clone());
                    continue;
                }
                if server.heartbeat_ms.unwrap_or(0) < self.started_ms {
                    missing.push(format!("{name} has not reported since the step started"));
                    continue;
                }
                let state = server.observed.as_ref().map(|o| o.state);
                if state != Some(paddock_api::ServerState::Serving) {
                    missing.push(format!("{name} is not healthy ({state:?})"));
                    continue;
                }
                for app in &self.zone.apps {
                    let want = pick(app);
                    let failure = server.observed.as_ref().and_then(|o| {
                        o.failed
                            .iter()
                            .find(|f| f.name == app.app && f.version == *want)
                    });
                    if let Some(f) = failure {
                        let failed = format!("{name} cannot load {}@{want}: {}", app.app, f.error);
                        if forward {
                            return Err(StepError::Failed(failed));
                        }
                        // Past the point of no return the server's retries may still succeed:
                        // the wait goes on, and names the reason if it times out.
                        missing.push(format!("{failed} (it retries)"));
                        continue;
                    }
                    match serving_version(server, &app.app) {
                        Some(v) if v == want => {}
                        Some(v) => {
                            missing.push(format!("{name} serves {}@{v}, not {want}", app.app))
                        }
                        None => missing.push(format!("{name} does not serve {}", app.app)),
                    }
                }
            }
            if !missing.is_empty() {
                return Ok(Check::Pending(missing.join("; ")));
            }
            let versions: Vec<String> = self
                .zone
                .apps
                .iter()
                .map(|a| format!("{}@{}", a.app, pick(a)))
                .collect();
            let mut facts = vec![format!(
                "{} {} {}, healthy ({} ms)",
                join(servers),
                if servers.len() == 1 {
                    "serves"
                } else {
                    "serve"
                },
                versions.join(" "),
                now_ms() - self.started_ms
            )];
            if !dead.is_empty() {
                facts.push(format!(
                    "{} not alive: takes the desired version when it comes back",
                    dead.join(", ")
                ));
            }
            Ok(Check::Done(facts))
        })
        .await
    }

    /// The live balancers' counts for the zone's apps, into `tally`; the balancers that
    /// reported, with when each did.
    async fn observe(&self, tally: &mut Tally) -> Result<Vec<(String, i64)>, StepError> {
        let balancers = self
            .c
            .store
            .balancers(now_ms() - crate::routing::BALANCER_ALIVE_WITHIN_MS)
            .await?;
        let mut live = Vec::new();
        for b in balancers.iter().filter(|b| b.alive) {
            let reported = b.report.apps.as_deref().unwrap_or_default();
            let counts = self
                .zone
                .apps
                .iter()
                .map(|a| {
                    reported
                        .iter()
                        .find(|t| t.app == a.app)
                        .map_or_else(AppTrafficCounts::default, |t| t.counts)
                })
                .collect();
            tally.observe(&b.report.name, b.report.started_ms, counts);
            live.push((b.report.name.clone(), b.heartbeat_ms));
        }
        Ok(live)
    }

    /// The watch step: judges the zone's apps by what the live balancers answered users since
    /// the cutover (the tally the cutover step began; one begun now when this process did not
    /// run it) until each balancer's first report after the watch's time is up. An app whose
    /// failed answers pass the share the watch allows fails the step, which puts users back on
    /// the old versions: as soon as at least [`WATCH_EARLY_FAILURES`] failed, or at the end
    /// over any number. Looks every [`WATCH_REPORT_MS`], as often as balancers report.
    async fn watch(&self, watch: Watch) -> Result<Vec<String>, StepError> {
        let apps = &self.zone.apps;
        if apps.is_empty() {
            return Ok(vec![format!(
                "zone {} runs no app: nothing to watch",
                self.zone.zone
            )]);
        }
        let _watching = Watching::new(self.c);
        let started = now_ms();
        let end = started + i64::try_from(watch.ms).unwrap_or(i64::MAX);
        let mut tally = self
            .c
            .tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(self.id, self.zone.zone.clone()))
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(watch.ms) + self.timeout;
        loop {
            let live = self.observe(&mut tally).await?;
            let now = now_ms();
            let totals = tally.totals(apps.len());
            let seconds = (now - started) as f64 / 1000.0;
            let through = match tally.balancers() {
                names if names.is_empty() => "no balancer".to_string(),
                names => join(&names),
            };
            let over = |t: &AppTrafficCounts, whole: bool| {
                watch.exceeded(*t) && (whole || t.failed >= WATCH_EARLY_FAILURES)
            };
            let late: Vec<&str> = live
                .iter()
                .filter(|(_, heartbeat)| *heartbeat < end)
                .map(|(name, _)| name.as_str())
                .collect();
            // Whole: the time is up and every live balancer has reported since.
            let whole = now >= end && late.is_empty();
            if let Some((app, counts)) = apps.iter().zip(&totals).find(|(_, t)| over(t, whole)) {
                let back = match &self.plan.platform {
                    None => app.from.clone(),
                    Some(_) => "the servers on the old build".to_string(),
                };
                return Err(StepError::Failed(format!(
                    "{} {}: {} of {} answers through {through} failed (5xx) since the cutover, more than the {} allowed: users go back to {back}",
                    app.app,
                    app.to,
                    counts.failed,
                    counts.answered,
                    watch.max_failed(),
                )));
            }
            if whole {
                return Ok(apps
                    .iter()
                    .zip(&totals)
                    .map(|(app, t)| match t.answered {
                        0 => format!(
                            "{} {}: no answer through {through} in {seconds:.1} s, nothing to judge",
                            app.app, app.to
                        ),
                        n => format!(
                            "{} {}: {n} answers through {through} since the cutover ({seconds:.1} s watched), {} failed (5xx; at most {} may)",
                            app.app,
                            app.to,
                            t.failed,
                            watch.max_failed()
                        ),
                    })
                    .collect());
            }
            let missing = if now < end {
                format!("watching until {} s have passed", watch.ms / 1000)
            } else {
                format!(
                    "balancers {} have not reported since the watch ended",
                    late.join(", ")
                )
            };
            if self.c.store.operation(self.id).await?.abort_requested {
                return Err(StepError::Failed(format!(
                    "aborted by the operator while watching ({missing})"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "not confirmed within {} s after the watch: {missing}",
                    self.timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(WATCH_REPORT_MS)).await;
        }
    }

    /// Requests each app's smoke path on each updating server directly (not through a
    /// balancer): it must answer 2xx with the new version.
    async fn smoke(&self) -> Result<Vec<String>, StepError> {
        let servers = self.c.store.servers().await?;
        let mut requests = Vec::new();
        for name in &self.zone.updating {
            let address = servers
                .iter()
                .find(|s| s.name == *name)
                .map(|s| s.address.clone())
                .ok_or_else(|| StepError::Failed(format!("{name} is no longer registered")))?;
            for app in &self.zone.apps {
                requests.push(smoke_one(
                    self.c.http.clone(),
                    name.clone(),
                    address.clone(),
                    app.clone(),
                ));
            }
        }
        let results = join_all(requests).await;
        let (passed, failed): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
        if !failed.is_empty() {
            return Err(StepError::Failed(format!(
                "smoke test failed: {}",
                failed
                    .into_iter()
                    .filter_map(Result::err)
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        Ok(passed.into_iter().filter_map(Result::ok).collect())
    }

    /// Runs `check` until it confirms, on every fact reported and at least every 250 ms, until
    /// the deadline (or an abort request, when `abortable`).
    async fn wait<F, Fut>(&self, abortable: bool, mut check: F) -> Result<Vec<String>, StepError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Check, StepError>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut facts = self.c.watch_facts();
        loop {
            facts.mark_unchanged();
            let missing = match check().await? {
                Check::Done(found) => return Ok(found),
                Check::Pending(missing) => missing,
            };
            if abortable && self.c.store.operation(self.id).await?.abort_requested {
                return Err(StepError::Failed(format!(
                    "aborted by the operator while waiting ({missing})"
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StepError::Failed(format!(
                    "not confirmed within {} s: {missing}",
                    self.timeout.as_secs()
                )));
            }
            tokio::select! {
                _ = facts.changed() => {}
                _ = tokio::time::sleep(RECHECK) => {}
            }
        }
    }
}

/// Drops, however `drive` ends, the answer counts its cutovers began for watch steps that never
/// ran (the drain failed, an abort): a watch run later begins its own.
struct DropTallies<'a>(&'a Controller, i64);

impl Drop for DropTallies<'_> {
    fn drop(&mut self) {
        let DropTallies(c, id) = self;
        c.tallies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(op, _), _| op != id);
    }
}

/// Counts a running cutover or watch step of a plan with a watch in [`Controller::watches`]
/// while it lives; the end is remembered, so that the moment between the two steps does not
/// count as no watch.
struct Watching<'a>(&'a Controller);

impl<'a> Watching<'a> {
    fn new(c: &'a Controller) -> Watching<'a> {
        c.watches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Watching(c)
    }
}

impl Drop for Watching<'_> {
    fn drop(&mut self) {
        let c = self.0;
        c.watch_ended_ms
            .store(now_ms(), std::sync::atomic::Ordering::Relaxed);
        c.watches.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What the balancers answered for a zone's apps since a tally began, from their successive
/// reports: each balancer's growth between reports of one run, and all of a new run's counts
/// (a restarted balancer counts from zero). A report older than one already seen (late, or of
/// an earlier run) changes nothing.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    seen: BTreeMap<String, Seen>,
}

#[derive(Debug)]
struct Seen {
    /// The run of the last report taken (`started_ms`) and its counts.
    run: i64,
    last: Vec<AppTrafficCounts>,
    /// What it counted since the tally began, per app.
    since: Vec<AppTrafficCounts>,
}

impl Tally {
    /// Takes balancer `name`'s report of run `run` with `counts` (one per app). The first one of
    /// a balancer is where its tally begins.
    fn observe(&mut self, name: &str, run: i64, counts: Vec<AppTrafficCounts>) {
        let Some(seen) = self.seen.get_mut(name) else {
            let since = vec![AppTrafficCounts::default(); counts.len()];
            self.seen.insert(
                name.to_string(),
                Seen {
                    run,
                    last: counts,
                    since,
                },
            );
            return;
        };
        let grown = |from: &[AppTrafficCounts]| {
            counts
                .iter()
                .zip(from)
                .all(|(now, before)| now.answered >= before.answered && now.failed >= before.failed)
        };
        let base: Vec<AppTrafficCounts> = if run == seen.run && grown(&seen.last) {
            seen.last.clone()
        } else if run > seen.run {
            vec![AppTrafficCounts::default(); counts.len()]
        } else {
            return;
        };
        for ((since, now), before) in seen.since.iter_mut().zip(&counts).zip(&base) {
            since.answered += now.answered - before.answered;
            since.failed += now.failed - before.failed;
        }
        seen.run = run;
        seen.last = counts;
    }

    /// What every balancer counted since the tally began, per app.
    fn totals(&self, apps: usize) -> Vec<AppTrafficCounts> {
        (0..apps)
            .map(|i| {
                self.seen
                    .values()
                    .filter_map(|seen| seen.since.get(i))
                    .fold(AppTrafficCounts::default(), |sum, c| AppTrafficCounts {
                        answered: sum.answered + c.answered,
                        failed: sum.failed + c.failed,
                    })
            })
            .collect()
    }

    /// The balancers it counts, by name.
    fn balancers(&self) -> Vec<&str> {
        self.seen.keys().map(String::as_str).collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the point of no return, on servers that were alive at the plan.
    Forward,
    /// From the point of no return, or restoring: only forward, whoever is missing.
    NoReturn,
}

/// Whether `server` reported running build `sha256`.
fn runs(server: &ServerInfo, sha256: &str) -> bool {
    server.observed.as_ref().and_then(|o| o.build.as_deref()) == Some(sha256)
}

fn target(name: &str, sha256: Option<String>) -> ServerChange {
    ServerChange {
        name: name.to_string(),
        platform_target: Some(sha256),
        ..ServerChange::default()
    }
}

fn lb(name: &str, state: LbState) -> ServerChange {
    ServerChange {
        name: name.to_string(),
        lb: Some(state),
        ..ServerChange::default()
    }
}

fn join<S: AsRef<str>>(names: &[S]) -> String {
    if names.is_empty() {
        return "no server".into();
    }
    names
        .iter()
        .map(|n| n.as_ref())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The version of `app` a server reported serving.
fn serving_version<'a>(server: &'a ServerInfo, app: &str) -> Option<&'a str> {
    server
        .observed
        .as_ref()?
        .apps
        .iter()
        .find(|a| a.name == app)
        .map(|a| a.version.as_str())
}

fn acks(status: &crate::routing::RoutingStatus, g: i64) -> String {
    let live: Vec<&str> = status
        .balancers
        .iter()
        .filter(|b| b.alive)
        .map(|b| b.report.name.as_str())
        .collect();
    if live.is_empty() {
        "no live balancer to acknowledge".into()
    } else {
        format!("generation {g} acknowledged by {}", live.join(", "))
    }
}

/// Runs futures side by side; their results in order.
async fn join_all<T: Send + 'static>(
    futures: Vec<impl std::future::Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.into_iter().enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut results: Vec<(usize, T)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        if let Ok(r) = joined {
            results.push(r);
        }
    }
    results.sort_by_key(|(i, _)| *i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// One smoke request; `Ok` with the fact, or `Err` naming the server and what it answered.
async fn smoke_one(
    http: reqwest::Client,
    server: String,
    address: String,
    app: PlannedApp,
) -> Result<String, String> {
    let url = format!("http://{address}{}", app.smoke);
    let started = std::time::Instant::now();
    let mut response = http
        .get(&url)
        .timeout(SMOKE_TIMEOUT)
        .send()
        .await
        .map_err(|e| format!("{server}: GET {} did not answer: {e}", app.smoke))?;
    let status = response.status();
    let version = response
        .headers()
        .get("x-paddock-version")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    // The start of the body is enough to say what went wrong; the rest is not read.
    let mut start = Vec::new();
    while start.len() < 1024 {
        match response.chunk().await {
            Ok(Some(chunk)) => start.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    let body: String = String::from_utf8_lossy(&start)
        .trim()
        .chars()
        .take(200)
        .collect();
    if !status.is_success() {
        return Err(format!(
            "{server}: GET {} answered {status} ({}@{version}): {body}",
            app.smoke, app.app
        ));
    }
    if version != app.to {
        return Err(format!(
            "{server}: GET {} answered with version {version:?}, expected {}",
            app.smoke, app.to
        ));
    }
    Ok(format!(
        "{server}: GET {} → {} with {}@{version} ({} ms)",
        app.smoke,
        status.as_u16(),
        app.app,
        started.elapsed().as_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(answered: u64, failed: u64) -> Vec<AppTrafficCounts> {
        vec![AppTrafficCounts { answered, failed }]
    }

    #[test]
    fn a_tally_counts_growth_across_restarts_and_ignores_late_reports() {
        let mut tally = Tally::default();
        tally.observe("lb1", 1, counts(100, 2));
        assert_eq!(
            tally.totals(1),
            counts(0, 0),
            "the first report is the start"
        );
        tally.observe("lb1", 1, counts(150, 3));
        assert_eq!(tally.totals(1), counts(50, 1));
        // A report sent before the last one, arriving late: nothing changes.
        tally.observe("lb1", 1, counts(120, 2));
        assert_eq!(tally.totals(1), counts(50, 1));
        // Restarted (a new run): what it counts now is all new, added to what came before.
        tally.observe("lb1", 2, counts(30, 5));
        assert_eq!(tally.totals(1), counts(80, 6));
        tally.observe("lb1", 2, counts(40, 5));
        assert_eq!(tally.totals(1), counts(90, 6));
        // A late report of the earlier run changes nothing either.
        tally.observe("lb1", 1, counts(900, 90));
        assert_eq!(tally.totals(1), counts(90, 6));
        // Another balancer's counts add up with it.
        tally.observe("lb2", 7, counts(1000, 10));
        tally.observe("lb2", 7, counts(1010, 10));
        assert_eq!(tally.totals(1), counts(100, 6));
        assert_eq!(tally.balancers(), ["lb1", "lb2"]);
    }
}
