//! The apps folder (`paddock frontend --apps DIR`): every subfolder holding a `paddock.toml` and
//! its component is an app package; it is deployed at start, redeployed when it changes, and
//! undeployed when it is removed — the auto-deploy folder of Tomcat's `webapps`.
//!
//! The folder is looked at every `scan_interval`. A package is acted on once it has stayed the
//! same for one whole interval, so a package still being copied is not deployed half-written.
//! A package that fails (bad manifest, malformed component, route taken) is logged with the reason
//! and changes nothing: the version served before keeps serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use paddock_core::Manifest;
use paddock_runtime::{AppSpec, sha256_hex};

use crate::apps::Apps;
use crate::cache::ArtifactCache;

/// What a package folder looked like: each file's name, size and modification time.
type Fingerprint = Vec<(String, u64, Option<SystemTime>)>;

struct Package {
    /// The fingerprint acted on last (deployed or refused).
    acted_on: Option<Fingerprint>,
    /// The fingerprint seen at the previous scan.
    seen: Fingerprint,
    /// The app this package deployed, if it did.
    deployed: Option<String>,
}

pub struct AppFolder {
    dir: PathBuf,
    apps: Arc<Apps>,
    cache: ArtifactCache,
    packages: BTreeMap<PathBuf, Package>,
}

impl AppFolder {
    pub fn new(dir: PathBuf, apps: Arc<Apps>, cache: ArtifactCache) -> AppFolder {
        AppFolder {
            dir,
            apps,
            cache,
            packages: BTreeMap::new(),
        }
    }

    pub async fn watch(mut self, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            self.scan(false).await;
        }
    }

    /// Looks at the folder once. With `immediately`, packages are acted on without waiting for
    /// them to be stable (used for the first scan at start).
    pub async fn scan(&mut self, immediately: bool) {
        let found = match package_dirs(&self.dir) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), "cannot read the apps folder: {e:#}");
                return;
            }
        };

        let gone: Vec<PathBuf> = self
            .packages
            .keys()
            .filter(|p| !found.contains_key(*p))
            .cloned()
            .collect();
        for path in gone {
            let Some(package) = self.packages.remove(&path) else {
                continue;
            };
            if let Some(name) = package.deployed
                && let Some(version) = self.apps.undeploy(&name)
            {
                tracing::info!(
                    package = %path.display(),
                    app = %name,
                    version = %version.spec().version,
                    "package removed: app undeployed"
                );
            }
        }

        for (path, fingerprint) in found {
            let package = self.packages.entry(path.clone()).or_insert(Package {
                acted_on: None,
                seen: Vec::new(),
                deployed: None,
            });
            let stable = immediately || package.seen == fingerprint;
            package.seen = fingerprint.clone();
            if !stable || package.acted_on.as_ref() == Some(&fingerprint) {
                continue;
            }
            package.acted_on = Some(fingerprint);
            let served = package.deployed.clone();
            let others: Vec<(PathBuf, String)> = self
                .packages
                .iter()
                .filter(|(p, _)| **p != path)
                .filter_map(|(p, other)| Some((p.clone(), other.deployed.clone()?)))
                .collect();
            match self.deploy(&path, &others, served.as_deref()).await {
                Ok(name) => {
                    if let Some(package) = self.packages.get_mut(&path) {
                        package.deployed = Some(name);
                    }
                }
                Err(e) => tracing::error!(
                    package = %path.display(),
                    "package refused, nothing changed: {e:#}"
                ),
            }
        }
    }

    /// Deploys the package at `path`; `served` is the app it served until now, replaced in the
    /// same step when the package names another app now.
    async fn deploy(
        &self,
        path: &Path,
        others: &[(PathBuf, String)],
        served: Option<&str>,
    ) -> anyhow::Result<String> {
        let (manifest, component) = read_package(path)?;
        if let Some((other, _)) = others.iter().find(|(_, name)| *name == manifest.name) {
            anyhow::bail!(
                "app {} is already deployed from {}; keep one package per app",
                manifest.name,
                other.display()
            );
        }
        let component_sha256 = sha256_hex(&component);
        let version = manifest.version_for(&component_sha256);
        if let Some(current) = self.apps.current(&manifest.name)
            && current.spec().component_sha256 == component_sha256
            && current.spec().version == version
            && current.spec().route == manifest.route
            && current.spec().limits == manifest.limits
            && current.spec().config == manifest.config
        {
            return Ok(manifest.name);
        }
        let spec = AppSpec {
            name: manifest.name.clone(),
            version,
            route: manifest.route.clone(),
            component_sha256,
            limits: manifest.limits,
            config: manifest.config.clone(),
        };
        let cache = self.cache.clone();
        let started = std::time::Instant::now();
        let loaded = tokio::task::spawn_blocking(move || cache.load_component(spec, &component))
            .await
            .context("loading task failed")?
            .with_context(|| manifest.component.clone())?;
        let previous = self.apps.deploy_instead_of(loaded.clone(), served)?;
        if let Some(old) = served.filter(|old| *old != manifest.name) {
            tracing::info!(
                package = %path.display(),
                app = %old,
                "package renamed to {}: app {old} undeployed",
                manifest.name
            );
        }
        tracing::info!(
            package = %path.display(),
            app = %manifest.name,
            version = %loaded.spec().version,
            route = %loaded.spec().route,
            previous = previous.as_ref().map(|p| p.spec().version.as_str()).unwrap_or("none"),
            load_ms = started.elapsed().as_millis() as u64,
            "app deployed"
        );
        Ok(manifest.name)
    }
}

/// Reads and validates a package folder: its manifest and the component it names.
pub fn read_package(path: &Path) -> anyhow::Result<(Manifest, Vec<u8>)> {
    let manifest_path = path.join("paddock.toml");
    let text = std::fs::read_to_string(&manifest_path)
        .with_context(|| format!("reading {}", manifest_path.display()))?;
    let manifest = Manifest::from_toml(&text)?;
    let component_path = path.join(&manifest.component);
    let component = std::fs::read(&component_path).with_context(|| {
        format!(
            "reading the component {} named by paddock.toml",
            component_path.display()
        )
    })?;
    Ok((manifest, component))
}

fn package_dirs(dir: &Path) -> anyhow::Result<BTreeMap<PathBuf, Fingerprint>> {
    let mut found = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if !path.join("paddock.toml").is_file() {
            continue;
        }
        let mut fingerprint = Vec::new();
        for file in std::fs::read_dir(&path)? {
            let file = file?;
            let meta = file.metadata()?;
            if meta.is_file() {
                fingerprint.push((
                    file.file_name().to_string_lossy().into_owned(),
                    meta.len(),
                    meta.modified().ok(),
                ));
            }
        }
        fingerprint.sort();
        found.insert(path, fingerprint);
    }
    Ok(found)
}
