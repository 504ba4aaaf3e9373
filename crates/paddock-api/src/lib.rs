//! Wire types that Paddock processes and outside tools exchange. The only place they live, so that
//! a change to what crosses a process boundary shows up in one diff.
//!
//! Serde only; no IO. Unknown fields are accepted when reading, so that an older reader keeps
//! working against a newer writer during a rolling platform upgrade.

use serde::{Deserialize, Serialize};

pub use paddock_core::ServerState;

/// What `GET /_paddock/health` on a front-end answers (200 when `state` is `serving`, else 503).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    /// The server's name, as given by `--name`.
    pub server: String,
    pub state: ServerState,
    /// The app versions this server serves now.
    pub apps: Vec<LoadedApp>,
    /// Requests received and not yet answered completely (body included), over all apps.
    pub in_flight: u64,
    /// Desired app versions that this server could not load, with the reason (it keeps serving
    /// what it had and retries).
    #[serde(default)]
    pub failed: Vec<LoadFailure>,
    /// sha256 of the `paddock` executable it runs, when known: the build a platform upgrade
    /// installed, or its own file hashed when a target build was named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Why the platform build it was told to run is not installed yet (it retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_error: Option<UpgradeFailure>,
    /// The platform build it is installing now (downloading, checking, or restarting on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installing: Option<String>,
    /// The process that sent it, as in its [`Registration`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
    /// Its response cache, when it keeps one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheReport>,
}

/// A front-end's response cache, as its health report tells it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheReport {
    /// The last purge of the farm's purge log it has applied (every purge up to it).
    pub purged: i64,
    pub entries: u64,
    pub bytes: u64,
    /// The most it keeps.
    pub max_bytes: u64,
    /// Answers sent from the cache.
    pub hits: u64,
    /// Cacheable answers that were not in the cache (the app ran; they are kept if whole).
    pub misses: u64,
    /// Why it serves nothing from its cache now (it cannot read the purge log), if so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off: Option<String>,
}

/// One purge of the farm's purge log: an app's cached responses with a tag, or all of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachePurge {
    pub id: i64,
    pub app: String,
    /// `None`: every cached response of the app.
    pub tag: Option<String>,
    pub at_ms: i64,
    /// Who asked: `admin`, or `server NAME` (an app's answer there named the tags).
    pub source: String,
}

/// `POST /v1/apps/{app}/cache/purge`: the tags to purge, none for all of the app's responses.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeRequest {
    #[serde(default)]
    pub tags: Vec<String>,
}

/// The answer to a purge: the id the front-ends report once they applied it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgeAnswer {
    pub app: String,
    pub tags: Vec<String>,
    pub purge: i64,
    /// When it was written (the controller's clock): a front-end's report counts for it only
    /// if the controller received it later.
    pub at_ms: i64,
}

/// A front-end's last failed attempt to install a platform build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeFailure {
    /// The build it tried to install.
    pub build: String,
    /// The generation that named the build for this server (`platform_generation`): an
    /// operation only counts failures of attempts made for what it asked.
    pub generation: i64,
    pub error: String,
}

/// A desired app version a front-end could not load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadFailure {
    pub name: String,
    pub version: String,
    pub error: String,
}

/// One app version loaded on a front-end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedApp {
    pub name: String,
    pub version: String,
    pub route: String,
    /// sha256 of the component, hex.
    pub component_sha256: String,
    /// [`config_digest`] of the `[config]` it runs with (overrides included), so that a config
    /// change can be confirmed like a version. Absent from older front-ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<String>,
}

/// A short fingerprint of an app's config (FNV-1a, 64 bits, over each key and value with a NUL
/// after each, in key order): what a front-end reports and the controller compares. Not for
/// security: it only tells a front-end's config from the desired one.
pub fn config_digest(config: &std::collections::BTreeMap<String, String>) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (key, value) in config {
        for byte in key.bytes().chain([0]).chain(value.bytes()).chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{hash:016x}")
}

/// A server's role: `active` servers take traffic and timers; `passive` ones stand by, deployed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Active,
    Passive,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Passive => "passive",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "active" => Some(Role::Active),
            "passive" => Some(Role::Passive),
            _ => None,
        }
    }
}

/// What a front-end tells the controller when it starts (`POST /control/v1/register`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    pub zone: String,
    /// Where the front-end serves apps, `host:port`.
    pub address: String,
    pub platform_version: String,
    /// The engine hash of its runtime: which artifacts it can load.
    pub engine: String,
    /// Names this process (a restart on a new build keeps the PID, not this): the controller
    /// takes heartbeats only from the process that registered last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incarnation: Option<String>,
}

/// A server as the controller knows it: what it registered, its flags, what it last reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerInfo {
    pub name: String,
    pub zone: String,
    pub address: String,
    pub platform_version: String,
    pub engine: String,
    pub role: Role,
    /// Whether its deployment service takes new versions.
    pub deployment: bool,
    /// Whether its scheduler service runs timers.
    pub scheduler: bool,
    pub registered_ms: i64,
    pub heartbeat_ms: Option<i64>,
    /// Its last heartbeat.
    pub observed: Option<HealthReport>,
    /// How the balancers route it.
    #[serde(default)]
    pub lb: LbState,
    /// Its share of its zone's traffic under the `ratio` policy.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// The platform build (sha256 of the `paddock` executable) it is told to run, set by a
    /// platform upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_target: Option<String>,
    /// The generation that set `platform_target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_target_generation: Option<i64>,
}

fn default_weight() -> u32 {
    1
}

/// How the balancers treat a front-end (`paddock server NAME lb ready|drain|maint`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbState {
    /// Takes new requests.
    #[default]
    Ready,
    /// Takes no new request; the requests in flight finish.
    Drain,
    /// Takes no traffic at all, health checks included.
    Maint,
}

impl LbState {
    pub fn as_str(self) -> &'static str {
        match self {
            LbState::Ready => "ready",
            LbState::Drain => "drain",
            LbState::Maint => "maint",
        }
    }

    pub fn parse(s: &str) -> Option<LbState> {
        match s {
            "ready" => Some(LbState::Ready),
            "drain" => Some(LbState::Drain),
            "maint" => Some(LbState::Maint),
            _ => None,
        }
    }
}

/// How a balancer picks a front-end among the routable ones of a zone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Each in turn.
    #[default]
    RoundRobin,
    /// The one with the fewest requests in flight from this balancer (ties in turn).
    LeastConnections,
    /// In turn, in proportion to the front-ends' weights.
    Ratio,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConnections => "least-connections",
            Policy::Ratio => "ratio",
        }
    }

    pub fn parse(s: &str) -> Option<Policy> {
        match s {
            "round-robin" => Some(Policy::RoundRobin),
            "least-connections" => Some(Policy::LeastConnections),
            "ratio" => Some(Policy::Ratio),
            _ => None,
        }
    }
}

/// What balancers route by (`GET /control/v1/routing`). The controller publishes it; each
/// balancer applies it whole and acknowledges its generation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoutingTable {
    /// The farm's generation this table was read at.
    pub generation: i64,
    pub zones: Vec<ZoneRouting>,
    /// Path prefixes and the app and zone they lead to.
    pub routes: Vec<RouteEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZoneRouting {
    pub zone: String,
    #[serde(default)]
    pub policy: Policy,
    pub upstreams: Vec<Upstream>,
}

/// A front-end as the balancers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub name: String,
    /// `host:port`.
    pub address: String,
    #[serde(default)]
    pub state: LbState,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteEntry {
    /// A path prefix, matched on whole segments.
    pub prefix: String,
    pub app: String,
    pub zone: String,
}

/// What a balancer tells the controller every second and right after applying a table
/// (`POST /control/v1/balancers/{name}`): the acknowledgement of the generation it routes by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancerReport {
    pub name: String,
    /// Where it takes client traffic.
    pub listen: String,
    /// Where it serves `/metrics`, if anywhere.
    pub admin: Option<String>,
    /// The generation of the table it routes by now.
    pub generation: i64,
    pub upstreams: Vec<UpstreamReport>,
    /// Its platform build (`build`, `upgrade_error`, `installing` beside the other fields).
    #[serde(flatten)]
    pub platform: BuildState,
    /// What it answered for each app it routes, counted since `started_ms`: what a
    /// deployment's watch step judges the new versions by. `None` from a balancer of a release
    /// that does not count them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apps: Option<Vec<AppTraffic>>,
    /// When the run whose counts these are began (ms since the epoch): the counts start from
    /// zero again with each run (a restart in place is a new one).
    #[serde(default)]
    pub started_ms: i64,
}

/// A balancer's answers for one app since it started, its own included (a 503 when no
/// front-end could take the request).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppTrafficCounts {
    /// Responses sent to clients.
    pub answered: u64,
    /// Of those, with a 5xx status.
    pub failed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppTraffic {
    pub app: String,
    #[serde(flatten)]
    pub counts: AppTrafficCounts,
}

/// What a balancer or a standby controller says of its platform build, as a front-end's
/// [`HealthReport`] does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildState {
    /// sha256 of the `paddock` executable it runs, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// Why the platform build it was told to run is not installed yet (it retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_error: Option<UpgradeFailure>,
    /// The platform build it is installing now (downloading, checking, or restarting on it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installing: Option<String>,
}

/// The controller's answer to a balancer's or a standby controller's report: the platform
/// build it should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformOrders {
    /// The platform build it should run: when it runs another one, it downloads this one,
    /// installs it over its executable and restarts on it in the same process (a balancer
    /// keeping its listening sockets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformBuild>,
    /// The generation that named `platform`, as for a front-end: a failed installation is
    /// retried at once for a new one, and reported with it.
    #[serde(default)]
    pub platform_generation: i64,
}

/// The controller's answer to a balancer's report (`POST /control/v1/balancers/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancerOrders {
    /// The platform build it should run (`platform`, `platform_generation`).
    #[serde(flatten)]
    pub platform: PlatformOrders,
    /// Report again within this many milliseconds instead of the usual second: set while an
    /// operation's watch step counts the balancers' answers, so that it learns of failures
    /// sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_within_ms: Option<u64>,
}

/// A standby controller's report to the controller holding the role
/// (`POST /control/v1/standbys/{name}`), every second while it stands by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyReport {
    pub name: String,
    /// The host it runs on, and its process id: which one it is, for a person.
    pub host: String,
    pub pid: u32,
    /// The release it runs (`paddock --version`).
    pub version: String,
    #[serde(flatten)]
    pub platform: BuildState,
}

/// A standby controller as the controller holding the role knows it (`GET /v1/standbys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandbyInfo {
    pub report: StandbyReport,
    pub heartbeat_ms: i64,
    /// Whether it reported within 3 s.
    pub alive: bool,
}

/// One front-end as a balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamReport {
    pub name: String,
    /// Whether its health checks pass.
    pub up: bool,
    /// Requests this balancer has sent to it and not yet finished relaying.
    pub in_flight: u64,
}

/// A balancer as the controller knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BalancerInfo {
    pub report: BalancerReport,
    /// When its applied generation last changed.
    pub applied_ms: i64,
    pub heartbeat_ms: i64,
    /// Whether it reported recently; only live balancers are waited for.
    pub alive: bool,
    /// The platform build it is told to run, set by a platform upgrade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_target: Option<String>,
    /// The generation that set `platform_target`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_target_generation: Option<i64>,
}

/// A server flag an admin can switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerFlag {
    Deployment,
    Scheduler,
}

/// A stored app version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub app: String,
    pub version: String,
    pub zone: String,
    pub component_sha256: String,
    pub created_ms: i64,
    pub manifest: paddock_core::Manifest,
}

/// One app of the farm with its newest and its desired version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSummary {
    pub name: String,
    pub zone: String,
    pub versions: u64,
    pub latest: String,
    /// The version front-ends of the app's zone should serve, if it was ever deployed.
    pub desired: Option<String>,
}

/// The desired state of one server (`GET /control/v1/desired`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Grows on every change of desired state or server flags; the long-poll waits past it.
    pub generation: i64,
    /// When false the server keeps what it has and takes nothing new.
    pub deployment: bool,
    pub apps: Vec<DesiredApp>,
    /// How the balancers treat this server. While it is not `ready` it heartbeats faster, so
    /// that "drained" is confirmed close to when its last request ends.
    #[serde(default)]
    pub lb: LbState,
    /// Whether its scheduler service claims timer ticks.
    #[serde(default)]
    pub scheduler: bool,
    /// The platform build this server should run: when it runs another one, it downloads this
    /// one, installs it over its executable and restarts on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformBuild>,
    /// The generation that named `platform` for this server: a failed installation is retried
    /// at once when a new one names it again, and reported with it.
    #[serde(default)]
    pub platform_generation: i64,
}

/// Set for a process that a platform upgrade started on its new build: the build's sha256.
pub const BUILD_ENV: &str = "PADDOCK_BUILD";

/// A build of the `paddock` executable the controller keeps for platform upgrades
/// (`POST /v1/platform/builds`; front-ends download it from `GET /control/v1/platform/{sha256}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformBuild {
    /// sha256 of the executable, hex: the build's identity.
    pub sha256: String,
    /// What it says of itself (`paddock --version`), e.g. `0.1.0`.
    pub version: String,
    pub size: u64,
    pub uploaded_ms: i64,
}

/// `POST /v1/operations/platform-upgrade`: install a platform build on every front-end,
/// balanced like a deployment, so that users never meet a server that is restarting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlatformUpgradeRequest {
    /// The build, as uploaded.
    pub sha256: String,
    /// Only this zone (default: every zone).
    #[serde(default)]
    pub zone: Option<String>,
    /// The servers to upgrade first (default: the first half of each zone's ready servers).
    #[serde(default)]
    pub updating: Vec<String>,
    #[serde(default)]
    pub parallel_zones: bool,
    #[serde(default)]
    pub plan_only: bool,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// As for a balanced deployment: the apps' answers watched after each zone's cutover.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Watch>,
}

/// One app version a server should serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredApp {
    pub name: String,
    pub version: String,
    pub route: String,
    pub component_sha256: String,
    pub limits: paddock_core::Limits,
    /// The manifest's `[config]`, the app's environment variables.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
}

/// One admin action, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub detail: String,
}

/// The body of every error answer of the admin API and the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable machine-readable kind, e.g. `unknown_server`.
    pub error: String,
    /// What went wrong and what to do, for a person.
    pub message: String,
}

impl ApiError {
    /// The message of an error answer's body, or the body itself when it is no `ApiError`.
    pub fn message_of(body: String) -> String {
        serde_json::from_str::<ApiError>(&body)
            .map(|e| e.message)
            .unwrap_or(body)
    }
}

// ---- operations ------------------------------------------------------------------------------

/// An app version named on the command line: `APP@VERSION`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppVersionRef {
    pub app: String,
    pub version: String,
}

/// `POST /v1/operations/balanced-deploy`: deploy app versions without downtime.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalancedDeployRequest {
    pub apps: Vec<AppVersionRef>,
    /// Refuse apps outside this zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// The servers to update first (default: the first half of each zone's ready servers).
    #[serde(default)]
    pub updating: Vec<String>,
    /// Run the zones side by side instead of one after another.
    #[serde(default)]
    pub parallel_zones: bool,
    /// Only answer the plan; change nothing.
    #[serde(default)]
    pub plan_only: bool,
    /// How long each wait of the operation may take before it fails (default 2 minutes).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Watch users' answers after the cutover, and put them back on the old versions when too
    /// many fail (default: no watch step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Watch>,
}

/// The watch step of a balanced deployment or platform upgrade: for `ms` after the cutover,
/// the balancers' answers for each app of the zone are counted; more than `max_failed_permille`
/// of them with a 5xx status fails the step, which puts users back on the old versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Watch {
    pub ms: u64,
    /// The share of answers that may fail, in thousandths (10 = 1 %).
    pub max_failed_permille: u32,
}

impl Watch {
    /// The share of failed answers allowed when none is named: 1 %.
    pub const DEFAULT_MAX_FAILED_PERMILLE: u32 = 10;

    /// Whether `counts` fail more than this watch allows.
    pub fn exceeded(&self, counts: AppTrafficCounts) -> bool {
        u128::from(counts.failed) * 1000
            > u128::from(self.max_failed_permille) * u128::from(counts.answered)
    }

    /// The share of answers that may fail, as a person writes it: `1%`, `0.5%`.
    pub fn max_failed(&self) -> String {
        match self.max_failed_permille % 10 {
            0 => format!("{}%", self.max_failed_permille / 10),
            tenth => format!("{}.{tenth}%", self.max_failed_permille / 10),
        }
    }

    /// Reads a share written `1%`, `0.5%` or `2` (percent, to a tenth) as thousandths.
    pub fn parse_percent(text: &str) -> Option<u32> {
        let number = text.trim().trim_end_matches('%').trim();
        let (whole, tenth) = match number.split_once('.') {
            Some((whole, tenth)) if tenth.len() == 1 => (whole, tenth),
            Some(_) => return None,
            None => (number, "0"),
        };
        let whole: u32 = whole.parse().ok()?;
        let tenth: u32 = tenth.parse().ok()?;
        let permille = whole.checked_mul(10)?.checked_add(tenth)?;
        (permille <= 1000).then_some(permille)
    }
}

/// What a balanced deployment will do, with the real server names, decided when it starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployPlan {
    pub parallel_zones: bool,
    /// The deadline of each wait, in milliseconds.
    pub timeout_ms: u64,
    pub zones: Vec<ZonePlan>,
    /// Set for a platform upgrade: the build every front-end ends up running. Its zones'
    /// `apps` are the versions they run (from = to), which each upgraded server must serve
    /// again and answer the smoke path with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<PlatformBuild>,
    /// The watch step after each zone's cutover, when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch: Option<Watch>,
}

/// One zone of a [`DeployPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZonePlan {
    pub zone: String,
    pub apps: Vec<PlannedApp>,
    /// Taken out of the balancer, updated and smoke-tested first.
    pub updating: Vec<String>,
    /// Keep serving the old version until the cutover, updated after it.
    pub loaded: Vec<String>,
    /// Servers of the zone the operation leaves alone, with the reason.
    pub untouched: Vec<String>,
    /// A zone with one serving front-end is deployed in place (no balancing possible).
    pub in_place: bool,
    /// The flags of `updating` and `loaded` before the operation: what a failure restores.
    pub before: Vec<ServerBefore>,
    /// The steps, in order.
    pub steps: Vec<PlannedStep>,
}

/// One app of a zone plan: from the version its zone runs to the new one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedApp {
    pub app: String,
    pub from: String,
    pub to: String,
    /// The path the smoke test requests on each updating server.
    pub smoke: String,
}

/// A server's flags as they were before an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerBefore {
    pub name: String,
    pub lb: LbState,
    pub deployment: bool,
    pub scheduler: bool,
}

/// One step of a zone plan, with the servers it acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStep {
    pub step: Step,
    pub servers: Vec<String>,
}

/// The steps of a balanced deployment (DESIGN "Balanced application deployment"), and the ones
/// that put everything back after a failure or an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// 1. Scheduler off on every server of the zone; wait for timer executions to end.
    SchedulerOff,
    /// 2. Route the zone to the loaded group only; wait for the acks and the updating group to drain.
    DrainUpdating,
    /// 3. Deployment service off on the loaded group.
    DeploymentOff,
    /// 4. The new versions on the updating group; wait until each serves them.
    LoadNew,
    /// 5. Each updating server answers the smoke path directly, with the new version.
    Smoke,
    /// 6. Route the zone to the updating group only; wait for the acks and the loaded group to drain.
    Cutover,
    /// 6b, when the plan has a [`Watch`]: count the balancers' answers for the zone's apps for a
    /// while; too many failures fail the step, and users go back to the old versions.
    Watch,
    /// 7. Scheduler back on for the updating group.
    SchedulerOnUpdating,
    /// 8. Deployment service back on for the loaded group; wait until each serves the new versions.
    DeploymentOn,
    /// 9. Route the zone to all its servers again.
    RouteAll,
    /// 10. Scheduler back on for the loaded group.
    SchedulerOnLoaded,
    /// A zone with one server: the new versions in place.
    InPlace,
    /// After a failure: users back on the loaded group, which still runs the old versions.
    RestoreRouting,
    /// After a failure: the old versions desired again; wait until the updating group serves them.
    RestoreVersion,
    /// After a failure: every flag as it was before the operation.
    RestoreFlags,
    /// Platform upgrade: the updating group installs the new build and restarts on it; wait
    /// until each runs it, serving its apps, healthy.
    UpgradeUpdating,
    /// Platform upgrade: the same for the loaded group (and every other server of the zone,
    /// which installs it whenever it is up).
    UpgradeLoaded,
    /// Platform upgrade of a zone with one serving front-end: it restarts in place.
    UpgradeInPlace,
    /// After a failed platform upgrade: servers that did not install the new build stop
    /// trying (one that did keeps it: the old executable is gone).
    RestorePlatform,
    /// Platform upgrade, after the last zone: each live balancer in turn installs the build and
    /// restarts on it in place (same process, same sockets); wait until it runs it and routes
    /// by the current table. Balancers not reporting install it when they are back.
    UpgradeBalancers,
    /// Platform upgrade, after the balancers: each standby controller installs the build and
    /// restarts on it, still standing by; wait until each reports it runs it. The standbys are
    /// on the build before the controller's new release migrates the database.
    UpgradeStandbys,
    /// Platform upgrade, last step of the last zone: the controller installs the build over
    /// its executable and restarts on it; the new process resumes the operation here.
    UpgradeController,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::SchedulerOff => "scheduler-off",
            Step::DrainUpdating => "drain-updating",
            Step::DeploymentOff => "deployment-off",
            Step::LoadNew => "load-new",
            Step::Smoke => "smoke",
            Step::Cutover => "cutover",
            Step::Watch => "watch",
            Step::SchedulerOnUpdating => "scheduler-on-updating",
            Step::DeploymentOn => "deployment-on",
            Step::RouteAll => "route-all",
            Step::SchedulerOnLoaded => "scheduler-on-loaded",
            Step::InPlace => "in-place",
            Step::RestoreRouting => "restore-routing",
            Step::RestoreVersion => "restore-version",
            Step::RestoreFlags => "restore-flags",
            Step::UpgradeUpdating => "upgrade-updating",
            Step::UpgradeLoaded => "upgrade-loaded",
            Step::UpgradeInPlace => "upgrade-in-place",
            Step::RestorePlatform => "restore-platform",
            Step::UpgradeBalancers => "upgrade-balancers",
            Step::UpgradeStandbys => "upgrade-standbys",
            Step::UpgradeController => "upgrade-controller",
        }
    }

    pub fn parse(s: &str) -> Option<Step> {
        Step::all().find(|step| step.as_str() == s)
    }

    /// The steps of a balanced deployment of a zone, in order.
    pub const BALANCED: [Step; 10] = [
        Step::SchedulerOff,
        Step::DrainUpdating,
        Step::DeploymentOff,
        Step::LoadNew,
        Step::Smoke,
        Step::Cutover,
        Step::SchedulerOnUpdating,
        Step::DeploymentOn,
        Step::RouteAll,
        Step::SchedulerOnLoaded,
    ];

    /// The steps that put a zone back after a failure or an abort, in order.
    pub const RESTORE: [Step; 3] = [
        Step::RestoreRouting,
        Step::RestoreVersion,
        Step::RestoreFlags,
    ];

    /// The steps of a balanced platform upgrade of a zone, in order (seed 002).
    pub const UPGRADE: [Step; 9] = [
        Step::SchedulerOff,
        Step::DrainUpdating,
        Step::UpgradeUpdating,
        Step::Smoke,
        Step::Cutover,
        Step::SchedulerOnUpdating,
        Step::UpgradeLoaded,
        Step::RouteAll,
        Step::SchedulerOnLoaded,
    ];

    /// The steps of a platform upgrade of a zone with one serving front-end.
    pub const UPGRADE_IN_PLACE: [Step; 4] = [
        Step::SchedulerOff,
        Step::UpgradeInPlace,
        Step::SchedulerOnUpdating,
        Step::SchedulerOnLoaded,
    ];

    /// The steps that put a zone back after a failed platform upgrade, in order.
    pub const RESTORE_UPGRADE: [Step; 3] = [
        Step::RestoreRouting,
        Step::RestorePlatform,
        Step::RestoreFlags,
    ];

    /// Every step, in the order a journal lists steps that started together.
    pub fn all() -> impl Iterator<Item = Step> {
        Step::BALANCED
            .into_iter()
            .chain([Step::Watch, Step::InPlace])
            .chain(Step::RESTORE)
            .chain([
                Step::UpgradeUpdating,
                Step::UpgradeLoaded,
                Step::UpgradeInPlace,
                Step::RestorePlatform,
                Step::UpgradeBalancers,
                Step::UpgradeStandbys,
                Step::UpgradeController,
            ])
    }

    /// What the step does, for a person.
    pub fn describe(self) -> &'static str {
        match self {
            Step::SchedulerOff => "scheduler off; wait for running timer executions",
            Step::DrainUpdating => "route to the loaded group only; wait for acks and drain",
            Step::DeploymentOff => "deployment service off on the loaded group",
            Step::LoadNew => "new version on the updating group; wait until loaded and healthy",
            Step::Smoke => "smoke test each updating server directly",
            Step::Cutover => "route to the updating group only; wait for acks and drain",
            Step::Watch => "count users' answers; too many 5xx put them back on the old version",
            Step::SchedulerOnUpdating => "scheduler on for the updating group",
            Step::DeploymentOn => {
                "deployment service on for the loaded group; wait for the new version"
            }
            Step::RouteAll => "route to every server of the zone",
            Step::SchedulerOnLoaded => "scheduler on for the loaded group",
            Step::InPlace => "one server: hot deploy in place; wait until loaded",
            Step::RestoreRouting => "route users back to the loaded group (old version)",
            Step::RestoreVersion => "old version desired again; wait for the updating group",
            Step::RestoreFlags => "every flag as before the operation",
            Step::UpgradeUpdating => {
                "updating group installs the new build and restarts; wait until it serves again"
            }
            Step::UpgradeLoaded => {
                "loaded group installs the new build and restarts; wait until it serves again"
            }
            Step::UpgradeInPlace => "one server: installs the new build and restarts in place",
            Step::RestorePlatform => "servers without the new build stop installing it",
            Step::UpgradeBalancers => {
                "each balancer in turn installs the new build and restarts in place"
            }
            Step::UpgradeStandbys => {
                "each standby controller installs the new build and restarts, standing by"
            }
            Step::UpgradeController => {
                "the controller installs the new build and restarts; it resumes the operation"
            }
        }
    }

    /// Whether the step puts things back after a failure.
    pub fn is_restore(self) -> bool {
        matches!(
            self,
            Step::RestoreRouting
                | Step::RestoreVersion
                | Step::RestoreFlags
                | Step::RestorePlatform
        )
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OpState {
    Running,
    /// A wait after the point of no return missed its deadline; `paddock op resume` retries it.
    Paused,
    Succeeded,
    /// Failed before the point of no return: everything is as it was before.
    Failed,
    /// Aborted by an operator: everything is as it was before.
    Aborted,
}

impl OpState {
    pub fn as_str(self) -> &'static str {
        match self {
            OpState::Running => "running",
            OpState::Paused => "paused",
            OpState::Succeeded => "succeeded",
            OpState::Failed => "failed",
            OpState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> Option<OpState> {
        [
            OpState::Running,
            OpState::Paused,
            OpState::Succeeded,
            OpState::Failed,
            OpState::Aborted,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            OpState::Succeeded | OpState::Failed | OpState::Aborted
        )
    }
}

/// A journaled operation (`GET /v1/operations/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: i64,
    /// `balanced-deploy`.
    pub kind: String,
    pub state: OpState,
    pub zones: Vec<String>,
    pub plan: DeployPlan,
    pub abort_requested: bool,
    /// Why it failed, was aborted or paused; or a warning.
    pub message: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub ended_ms: Option<i64>,
    /// The journal, in the order the steps started.
    pub steps: Vec<OpStep>,
}

/// One step as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpStep {
    pub zone: String,
    pub step: Step,
    pub servers: Vec<String>,
    pub state: StepState,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// How many times it was started (more than 1 after a controller restart or a resume).
    pub attempts: i64,
    /// The facts it waited for, as observed.
    pub facts: Vec<String>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepState {
    Running,
    Done,
    Failed,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Running => "running",
            StepState::Done => "done",
            StepState::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<StepState> {
        match s {
            "running" => Some(StepState::Running),
            "done" => Some(StepState::Done),
            "failed" => Some(StepState::Failed),
            _ => None,
        }
    }
}

// ---- timers ----------------------------------------------------------------------------------

/// A tick a front-end's scheduler service claimed (`POST /control/v1/timers/{server}/claim`):
/// it invokes `path` on its own copy of the app, renews the lease while the run lasts, and
/// reports the end with the fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerClaim {
    pub app: String,
    pub timer: String,
    /// The app version whose manifest declares the timer.
    pub version: String,
    pub path: String,
    /// The scheduled time of the tick, in milliseconds since the Unix epoch.
    pub tick_ms: i64,
    /// Grows with every claim of this timer; only the holder of the newest one may end the run.
    pub fencing: i64,
    /// A run of a tick whose previous run lost its lease (its server stopped renewing).
    pub retry: bool,
    pub lease_until_ms: i64,
}

/// A run a scheduler service holds: what it renews and ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerLease {
    pub app: String,
    pub timer: String,
    pub fencing: i64,
}

/// The end of a run (`POST /control/v1/timers/{server}/finish`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerFinish {
    pub lease: TimerLease,
    pub ok: bool,
    /// The status the app answered, or why it did not.
    pub detail: String,
}

/// A timer of the farm (`GET /v1/timers`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerInfo {
    pub app: String,
    pub timer: String,
    pub zone: String,
    pub version: String,
    pub schedule: paddock_core::manifest::TimerSchedule,
    pub path: String,
    pub next_ms: i64,
    /// The server running it now, if any, and until when its lease holds.
    pub running_on: Option<String>,
    pub lease_until_ms: Option<i64>,
}

/// One run of a timer (`GET /v1/timers/{app}/{timer}/runs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerRun {
    pub id: i64,
    pub app: String,
    pub timer: String,
    pub server: String,
    pub tick_ms: i64,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    /// `running`, `ok`, `failed`, or `lost` (its server stopped renewing the lease).
    pub outcome: String,
    pub retry: bool,
    pub detail: Option<String>,
}

/// What an app keeps in the farm's database (`GET /v1/apps/{app}/data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataSummary {
    pub app: String,
    /// Its buckets, by name (`""` is the default bucket).
    pub buckets: Vec<BucketSummary>,
    /// Sessions not expired.
    pub live_sessions: i64,
    /// Sessions expired but not swept yet (within a minute).
    pub expired_sessions: i64,
    /// Keys and bytes of all sessions' values together.
    pub session_keys: i64,
    pub session_bytes: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketSummary {
    pub name: String,
    pub keys: i64,
    /// The values' bytes together.
    pub bytes: i64,
}

/// A page of a bucket's keys (`GET /v1/apps/{app}/data/keys`), in key order; with `more`, the
/// next page starts after the last key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataKeys {
    pub keys: Vec<String>,
    pub more: bool,
}

/// Where the controller is: one URL, or several (the active controller and its standbys, each
/// at an address of its own, as `--controller http://a:7070,http://b:7070`). Requests go to the
/// current one; when it cannot be reached, the next one in the list becomes current, so that a
/// standby that took over is found without reconfiguring anything. Only the controller holding
/// the role listens, so at most one of them answers.
#[derive(Debug)]
pub struct Controllers {
    urls: Vec<String>,
    current: std::sync::atomic::AtomicUsize,
}

impl Controllers {
    /// Parses a comma-separated list of `http://` or `https://` URLs.
    pub fn parse(list: &str) -> Result<Controllers, String> {
        let urls: Vec<String> = list
            .split(',')
            .map(|url| url.trim().trim_end_matches('/').to_string())
            .filter(|url| !url.is_empty())
            .collect();
        if urls.is_empty() {
            return Err("no controller URL given: write http://HOST:PORT".into());
        }
        if let Some(bad) = urls
            .iter()
            .find(|url| !(url.starts_with("http://") || url.starts_with("https://")))
        {
            return Err(format!(
                "{bad:?} is not a controller URL: write http://HOST:PORT (several, for standbys, separated by commas)"
            ));
        }
        Ok(Controllers {
            urls,
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// The URL of the controller requests go to now.
    pub fn base(&self) -> &str {
        &self.urls[self.current() % self.urls.len()]
    }

    /// Which of the list is current: give it back to [`Controllers::unreachable`] when a request
    /// sent then could not reach its controller.
    pub fn current(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Acquire)
    }

    /// `path` (`/control/v1/...`) at the current controller.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }

    /// Every URL, as given.
    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// A request sent while `at` was current (see [`Controllers::current`]) could not reach
    /// its controller. If `at` is still current, the next one of the list becomes current, and
    /// is returned (for the log); if another request moved on meanwhile, nothing changes. With
    /// one URL, nothing changes either.
    pub fn unreachable(&self, at: usize) -> Option<&str> {
        use std::sync::atomic::Ordering;
        if self.urls.len() < 2 {
            return None;
        }
        let next = (at + 1) % self.urls.len();
        self.current
            .compare_exchange(at, next, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| self.urls[next].as_str())
    }
}

#[cfg(test)]
mod controllers_tests {
    use super::Controllers;

    #[test]
    fn the_next_controller_takes_over_when_one_is_unreachable() {
        let c = Controllers::parse("http://a:7070/, http://b:7070").unwrap();
        assert_eq!(
            c.url("/control/v1/routing"),
            "http://a:7070/control/v1/routing"
        );
        let first = c.current();
        assert_eq!(c.unreachable(first), Some("http://b:7070"));
        assert_eq!(c.base(), "http://b:7070");
        // Another request sent to the first one fails too: it moved on already.
        assert_eq!(c.unreachable(first), None);
        assert_eq!(c.base(), "http://b:7070");
        assert_eq!(c.unreachable(c.current()), Some("http://a:7070"));
        let one = Controllers::parse("http://a:7070").unwrap();
        assert_eq!(one.unreachable(one.current()), None);
        assert!(Controllers::parse("").is_err());
        assert!(
            Controllers::parse("a:7070")
                .unwrap_err()
                .contains("not a controller URL")
        );
    }
}

#[cfg(test)]
mod watch_tests {
    use super::{AppTrafficCounts, Watch};

    #[test]
    fn a_watch_allows_its_share_of_failed_answers_and_not_one_more() {
        let watch = Watch {
            ms: 5_000,
            max_failed_permille: Watch::DEFAULT_MAX_FAILED_PERMILLE,
        };
        let counts = |answered, failed| AppTrafficCounts { answered, failed };
        assert!(!watch.exceeded(counts(0, 0)));
        assert!(!watch.exceeded(counts(100, 1)));
        assert!(watch.exceeded(counts(100, 2)));
        assert!(watch.exceeded(counts(3, 1)));
        let none = Watch {
            max_failed_permille: 0,
            ..watch
        };
        assert!(!none.exceeded(counts(1_000_000, 0)));
        assert!(none.exceeded(counts(1_000_000, 1)));
        assert!(
            !Watch {
                max_failed_permille: 1000,
                ..watch
            }
            .exceeded(counts(5, 5))
        );
    }

    #[test]
    fn shares_are_read_and_written_to_a_tenth_of_a_percent() {
        assert_eq!(Watch::parse_percent("1%"), Some(10));
        assert_eq!(Watch::parse_percent("0.5%"), Some(5));
        assert_eq!(Watch::parse_percent("2"), Some(20));
        assert_eq!(Watch::parse_percent("100%"), Some(1000));
        for bad in ["", "%", "0.25%", "101%", "-1%", "one", "1.%"] {
            assert_eq!(Watch::parse_percent(bad), None, "{bad:?}");
        }
        let watch = |p| Watch {
            ms: 1_000,
            max_failed_permille: p,
        };
        assert_eq!(watch(10).max_failed(), "1%");
        assert_eq!(watch(5).max_failed(), "0.5%");
        assert_eq!(watch(0).max_failed(), "0%");
    }
}
