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
}

/// One app version loaded on a front-end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadedApp {
    pub name: String,
    pub version: String,
    pub route: String,
    /// sha256 of the component, hex.
    pub component_sha256: String,
}

/// A server's role: `active` servers take traffic and timers; `passive` ones stand by, deployed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
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
}

/// One app version a server should serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredApp {
    pub name: String,
    pub version: String,
    pub route: String,
    pub component_sha256: String,
    pub limits: paddock_core::Limits,
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
