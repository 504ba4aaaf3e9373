//! The route table: which app version answers which path prefix, swapped atomically.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderValue;
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
    entries: Vec<Route>,
}

/// One app version in the table, with the response headers that name it, made once at deploy
/// time rather than on every request.
#[derive(Clone)]
pub struct Route {
    pub version: Arc<AppVersion>,
    /// `x-paddock-app` and `x-paddock-version` (names and versions are validated to be header-safe).
    pub headers: Option<(HeaderValue, HeaderValue)>,
}

impl Route {
    fn new(version: Arc<AppVersion>) -> Route {
        let spec = version.spec();
        let headers = HeaderValue::from_str(&spec.name)
            .ok()
            .zip(HeaderValue::from_str(&spec.version).ok());
        Route { version, headers }
    }
}

impl RouteTable {
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        self.entries
            .iter()
            .find(|r| route_matches(&r.version.spec().route, path))
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
            .find(|r| r.version.spec().name == name)
            .map(|r| r.version.clone())
    }

    /// Makes `version` the one serving its app, replacing the app's previous version in one step.
    /// Requests already running keep the version they started on.
    pub fn deploy(&self, version: Arc<AppVersion>) -> Result<Option<Arc<AppVersion>>, DeployError> {
        self.deploy_instead_of(version, None)
    }

    /// Like [`Apps::deploy`], and in the same step stops serving app `replaced` (a package
    /// renamed to another app), whose route the new version may take over.
    pub fn deploy_instead_of(
        &self,
        version: Arc<AppVersion>,
        replaced: Option<&str>,
    ) -> Result<Option<Arc<AppVersion>>, DeployError> {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.table.load_full();
        let spec = version.spec();
        let replaced = replaced.filter(|r| *r != spec.name);
        let gone = |name: &str| replaced == Some(name);
        if let Some(other) = current.entries.iter().find(|r| {
            let s = r.version.spec();
            s.route == spec.route && s.name != spec.name && !gone(&s.name)
        }) {
            return Err(DeployError::RouteTaken {
                route: spec.route.clone(),
                other: other.version.spec().name.clone(),
            });
        }
        let mut entries = Vec::with_capacity(current.entries.len() + 1);
        let mut previous = None;
        for route in &current.entries {
            let name = &route.version.spec().name;
            if *name == spec.name {
                previous = Some(route.version.clone());
            } else if !gone(name) {
                entries.push(route.clone());
            }
        }
        entries.push(Route::new(version));
        entries.sort_by(|a, b| {
            let (a, b) = (&a.version.spec().route, &b.version.spec().route);
            b.len().cmp(&a.len()).then_with(|| a.cmp(b))
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
            .find(|r| r.version.spec().name == name)
            .map(|r| r.version.clone())?;
        let entries = current
            .entries
            .iter()
            .filter(|r| r.version.spec().name != name)
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
            .map(|r| {
                let s = r.version.spec();
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
