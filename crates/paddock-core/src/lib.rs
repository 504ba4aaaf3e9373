//! Paddock's vocabulary: the app manifest (`paddock.toml`), names, routes and limits, and the
//! states a server can be in.
//!
//! Everything here is pure: parsing and validation of text, no IO, no async. Every other crate
//! speaks these types, so a manifest is validated once, here, into a [`Manifest`] that the rest of
//! Paddock can trust.

pub mod cache;
pub mod data;
pub mod manifest;
pub mod request_id;
pub mod route;

pub use manifest::{Limits, Manifest, ManifestError, Timer, TimerSchedule};
pub use route::route_matches;

use serde::{Deserialize, Serialize};

/// Whether `s` is a sha256 in lowercase hex, as Paddock writes them. Checked wherever a hash
/// arrives from outside before it names a file or a row.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where a server stands towards traffic. Reported by `/_paddock/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServerState {
    /// Accepting and serving requests.
    Serving,
    /// Still answering requests but asking load balancers to send no new ones.
    Draining,
    /// Shutting down: no new connections, in-flight requests finishing.
    Stopping,
}

impl ServerState {
    /// Whether a load balancer should send new requests to a server in this state.
    pub fn is_routable(self) -> bool {
        matches!(self, ServerState::Serving)
    }
}
