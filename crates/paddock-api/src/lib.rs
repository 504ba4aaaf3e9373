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
