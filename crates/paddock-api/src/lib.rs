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
