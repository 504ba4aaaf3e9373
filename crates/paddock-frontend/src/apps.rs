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

/// What one [`Apps::install`] did.
#[derive(Debug, Default)]
pub struct Installed {
    /// Each new version now served, with the version of its app it replaced.
    pub deployed: Vec<(Arc<AppVersion>, Option<Arc<AppVersion>>)>,
    /// The new versions not served, and why.
    pub refused: Vec<(Arc<AppVersion>, DeployError)>,
    /// The versions of the apps no longer served.
    pub undeployed: Vec<Arc<AppVersion>>,
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
        let name = version.spec().name.clone();
        let replaced = replaced.filter(|r| *r != name);
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (table, mut done) = plan(&self.table.load_full(), vec![version], |app| {
            Some(app) != replaced
        });
        // All or nothing: a refused version leaves the app it would replace served.
        if let Some((_, e)) = done.refused.pop() {
            return Err(e);
        }
        self.table.store(Arc::new(table));
        Ok(done.deployed.pop().and_then(|(_, previous)| previous))
    }

    /// Makes each of `versions` the one serving its app and stops serving every other app
    /// `keep` says no to, all in one table update: apps can swap routes, or take over the route
    /// of an app removed in the same step, without a moment where a route is served by neither
    /// or refused. A new version whose route another app still holds afterwards (its current
    /// version, kept because its own new version was refused or not given) is refused and its
    /// app keeps what it serves.
    pub fn install(
        &self,
        versions: Vec<Arc<AppVersion>>,
        keep: impl Fn(&str) -> bool,
    ) -> Installed {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let (table, done) = plan(&self.table.load_full(), versions, keep);
        self.table.store(Arc::new(table));
        done
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
                    config_digest: Some(paddock_api::config_digest(&s.config)),
                }
            })
            .collect();
        apps.sort_by(|a, b| a.name.cmp(&b.name));
        apps
    }
}

/// The table [`Apps::install`] stores, and what it does: `current` with `versions` in and the
/// apps `keep` says no to out, minus the versions refused (see there).
fn plan(
    current: &RouteTable,
    versions: Vec<Arc<AppVersion>>,
    keep: impl Fn(&str) -> bool,
) -> (RouteTable, Installed) {
    let mut accepted = versions;
    let mut refused = Vec::new();
    // Refusing a version puts its app's current one back, which may hold the route of a
    // version accepted so far: repeat until nothing clashes (each round refuses one).
    loop {
        let kept: Vec<&AppVersion> = current
            .entries
            .iter()
            .map(|r| &*r.version)
            .filter(|v| {
                keep(&v.spec().name) && !accepted.iter().any(|a| a.spec().name == v.spec().name)
            })
            .collect();
        let clash = accepted.iter().enumerate().find_map(|(i, v)| {
            let s = v.spec();
            let other = kept
                .iter()
                .map(|k| k.spec())
                .chain(
                    accepted
                        .iter()
                        .map(|a| a.spec())
                        .filter(|o| o.name < s.name),
                )
                .find(|o| o.route == s.route && o.name != s.name)?;
            Some((i, other.name.clone()))
        });
        let Some((i, other)) = clash else { break };
        let version = accepted.remove(i);
        let route = version.spec().route.clone();
        refused.push((version, DeployError::RouteTaken { route, other }));
    }
    let is_new = |name: &str| accepted.iter().any(|a| a.spec().name == name);
    let mut entries = Vec::with_capacity(current.entries.len() + accepted.len());
    let mut undeployed = Vec::new();
    for route in &current.entries {
        let name = &route.version.spec().name;
        if is_new(name) {
            continue;
        }
        if keep(name) {
            entries.push(route.clone());
        } else {
            undeployed.push(route.version.clone());
        }
    }
    let deployed: Vec<_> = accepted
        .into_iter()
        .map(|version| {
            let previous = current
                .entries
                .iter()
                .find(|r| r.version.spec().name == version.spec().name)
                .map(|r| r.version.clone());
            entries.push(Route::new(version.clone()));
            (version, previous)
        })
        .collect();
    entries.sort_by(|a, b| {
        let (a, b) = (&a.version.spec().route, &b.version.spec().route);
        b.len().cmp(&a.len()).then_with(|| a.cmp(b))
    });
    (
        RouteTable { entries },
        Installed {
            deployed,
            refused,
            undeployed,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use paddock_runtime::{AppSpec, RuntimeConfig};

    const HELLO: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/apps/packages/hello-v1/hello.wasm"
    );

    /// Makes versions of any name and route from one compiled component.
    struct Maker {
        runtime: Arc<Runtime>,
        artifact: paddock_runtime::Artifact,
        sha256: String,
    }

    impl Maker {
        fn new() -> Maker {
            let runtime = Arc::new(
                Runtime::new(&RuntimeConfig {
                    max_instances: 4,
                    ..RuntimeConfig::default()
                })
                .unwrap(),
            );
            let component = std::fs::read(HELLO).unwrap();
            let artifact = runtime.compile(&component).unwrap();
            Maker {
                runtime,
                artifact,
                sha256: paddock_runtime::sha256_hex(&component),
            }
        }

        fn version(&self, name: &str, version: &str, route: &str) -> Arc<AppVersion> {
            let spec = AppSpec {
                name: name.into(),
                version: version.into(),
                route: route.into(),
                component_sha256: self.sha256.clone(),
                limits: Default::default(),
                config: Default::default(),
            };
            self.runtime.load(spec, self.artifact.as_bytes()).unwrap()
        }
    }

    /// Every served (route, app, version), longest route first.
    fn served(apps: &Apps) -> Vec<(String, String, String)> {
        apps.table()
            .entries
            .iter()
            .map(|r| {
                let s = r.version.spec();
                (s.route.clone(), s.name.clone(), s.version.clone())
            })
            .collect()
    }

    fn row(route: &str, name: &str, version: &str) -> (String, String, String) {
        (route.into(), name.into(), version.into())
    }

    fn names(versions: &[Arc<AppVersion>]) -> Vec<&str> {
        versions.iter().map(|v| v.spec().name.as_str()).collect()
    }

    #[test]
    fn two_apps_swap_routes_in_one_step() {
        let m = Maker::new();
        let apps = Apps::new(m.runtime.clone());
        apps.deploy(m.version("a", "v1", "/x")).unwrap();
        apps.deploy(m.version("b", "v1", "/y")).unwrap();
        // One at a time cannot work: each new version meets the other app at its route.
        assert_eq!(
            apps.deploy(m.version("a", "v2", "/y")).unwrap_err(),
            DeployError::RouteTaken {
                route: "/y".into(),
                other: "b".into()
            }
        );
        let done = apps.install(
            vec![m.version("a", "v2", "/y"), m.version("b", "v2", "/x")],
            |_| true,
        );
        assert!(done.refused.is_empty(), "{:?}", done.refused);
        assert_eq!(done.deployed.len(), 2);
        assert!(done.deployed.iter().all(|(_, p)| p.is_some()));
        assert_eq!(served(&apps), [row("/x", "b", "v2"), row("/y", "a", "v2")]);
        assert_eq!(
            apps.table().lookup("/x/1").unwrap().version.spec().name,
            "b"
        );
    }

    #[test]
    fn a_refused_rename_leaves_the_app_it_would_replace_served() {
        let m = Maker::new();
        let apps = Apps::new(m.runtime.clone());
        apps.deploy(m.version("old", "v1", "/old")).unwrap();
        apps.deploy(m.version("other", "v1", "/other")).unwrap();
        let e = apps
            .deploy_instead_of(m.version("new", "v1", "/other"), Some("old"))
            .unwrap_err();
        assert_eq!(
            e,
            DeployError::RouteTaken {
                route: "/other".into(),
                other: "other".into()
            }
        );
        assert_eq!(
            served(&apps),
            [row("/other", "other", "v1"), row("/old", "old", "v1")]
        );
        // Renamed onto a free route (or its own), it replaces the old app in one step.
        apps.deploy_instead_of(m.version("new", "v1", "/old"), Some("old"))
            .unwrap();
        assert_eq!(
            served(&apps),
            [row("/other", "other", "v1"), row("/old", "new", "v1")]
        );
    }

    #[test]
    fn an_app_takes_the_route_of_one_removed_in_the_same_step() {
        let m = Maker::new();
        let apps = Apps::new(m.runtime.clone());
        apps.deploy(m.version("old", "v1", "/shop")).unwrap();
        apps.deploy(m.version("other", "v1", "/other")).unwrap();
        let done = apps.install(vec![m.version("new", "v1", "/shop")], |name| name != "old");
        assert!(done.refused.is_empty(), "{:?}", done.refused);
        assert_eq!(names(&done.undeployed), ["old"]);
        assert_eq!(
            served(&apps),
            [row("/other", "other", "v1"), row("/shop", "new", "v1")]
        );
    }

    #[test]
    fn a_version_meeting_an_app_kept_at_its_route_is_refused_and_so_is_what_relied_on_it() {
        let m = Maker::new();
        let apps = Apps::new(m.runtime.clone());
        apps.deploy(m.version("a", "v1", "/a")).unwrap();
        apps.deploy(m.version("b", "v1", "/b")).unwrap();
        apps.deploy(m.version("k", "v1", "/k")).unwrap();
        // a moves onto k's route, which k keeps (no new version of k came): a is refused, keeps
        // /a, and c, which would have taken /a, is refused in turn. b is unaffected.
        let done = apps.install(
            vec![
                m.version("a", "v2", "/k"),
                m.version("b", "v2", "/b"),
                m.version("c", "v1", "/a"),
            ],
            |_| true,
        );
        let refused: Vec<(&str, &DeployError)> = done
            .refused
            .iter()
            .map(|(v, e)| (v.spec().name.as_str(), e))
            .collect();
        assert_eq!(
            refused,
            [
                (
                    "a",
                    &DeployError::RouteTaken {
                        route: "/k".into(),
                        other: "k".into()
                    }
                ),
                (
                    "c",
                    &DeployError::RouteTaken {
                        route: "/a".into(),
                        other: "a".into()
                    }
                ),
            ]
        );
        assert_eq!(
            served(&apps),
            [
                row("/a", "a", "v1"),
                row("/b", "b", "v2"),
                row("/k", "k", "v1")
            ]
        );
    }
}
