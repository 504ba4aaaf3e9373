//! The route table: which app version answers which path prefix, swapped atomically.

use std::sync::Arc;

use arc_swap::ArcSwap;
use paddock_api::LoadedApp;
use paddock_core::route_matches;
use paddock_runtime::{AppVersion, Runtime};

/// The apps a front-end serves. Readers (requests) never lock; writers (deployments) are
/// serialized by a mutex and publish a whole new table at once.
pub struct Apps {
    runtime: Arc<Runtime>,
    table: ArcSwap<RouteTable>,
    writer: std::sync::Mutex<()>,
}

/// App versions, longest route first, so the first match is the longest prefix.
#[derive(Default)]
pub struct RouteTable {
    entries: Vec<Arc<AppVersion>>,
}

impl RouteTable {
    pub fn lookup(&self, path: &str) -> Option<&Arc<AppVersion>> {
        self.entries
            .iter()
            .find(|app| route_matches(&app.spec().route, path))
    }

    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppVersion>> {
        self.entries.iter()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DeployError {
    #[error("route {route} is already served by app {other}; give one of them another `route`")]
    RouteTaken { route: String, other: String },
}

impl Apps {
    pub fn new(runtime: Arc<Runtime>) -> Apps {
        Apps {
            runtime,
            table: ArcSwap::from_pointee(RouteTable::default()),
            writer: std::sync::Mutex::new(()),
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// The current table. Requests hold what they looked up, not the table.
    pub fn table(&self) -> arc_swap::Guard<Arc<RouteTable>> {
        self.table.load()
    }

    /// The version of `name` being served now, if any.
    pub fn current(&self, name: &str) -> Option<Arc<AppVersion>> {
        self.table
            .load()
            .entries
            .iter()
            .find(|a| a.spec().name == name)
            .cloned()
    }

    /// Makes `version` the one serving its app, replacing the app's previous version in one step.
    /// Requests already running keep the version they started on.
    pub fn deploy(&self, version: Arc<AppVersion>) -> Result<Option<Arc<AppVersion>>, DeployError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        let spec = version.spec();
        if let Some(other) = current
            .entries
            .iter()
            .find(|a| a.spec().route == spec.route && a.spec().name != spec.name)
        {
            return Err(DeployError::RouteTaken {
                route: spec.route.clone(),
                other: other.spec().name.clone(),
            });
        }
        let mut entries = Vec::with_capacity(current.entries.len() + 1);
        let mut previous = None;
        for app in &current.entries {
            if app.spec().name == spec.name {
                previous = Some(app.clone());
            } else {
                entries.push(app.clone());
            }
        }
        entries.push(version);
        entries.sort_by(|a, b| {
            b.spec()
                .route
                .len()
                .cmp(&a.spec().route.len())
                .then_with(|| a.spec().route.cmp(&b.spec().route))
        });
        self.table.store(Arc::new(RouteTable { entries }));
        Ok(previous)
    }

    /// Stops serving `name`; returns the version that was served.
    pub fn undeploy(&self, name: &str) -> Option<Arc<AppVersion>> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        let removed = current
            .entries
            .iter()
            .find(|a| a.spec().name == name)
            .cloned()?;
        let entries = current
            .entries
            .iter()
            .filter(|a| a.spec().name != name)
            .cloned()
            .collect();
        self.table.store(Arc::new(RouteTable { entries }));
        Some(removed)
    }

    /// What the health report lists.
    pub fn loaded(&self) -> Vec<LoadedApp> {
        let mut apps: Vec<LoadedApp> = self
            .table
            .load()
            .entries
            .iter()
            .map(|a| {
                let s = a.spec();
                LoadedApp {
                    name: s.name.clone(),
                    version: s.version.clone(),
                    route: s.route.clone(),
                    component_sha256: s.component_sha256.clone(),
                }
            })
            .collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        apps
    }
}
