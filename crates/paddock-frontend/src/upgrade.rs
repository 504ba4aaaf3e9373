//! Installing a platform build: a front-end's or a balancer's side of a platform upgrade.
//!
//! When the desired state names a build ([`paddock_api::PlatformBuild`]) other than the one
//! this process runs, [`Upgrader::check`] installs it in a task of its own: download from the
//! controller into a file beside the executable, check its sha256, check that it runs and says
//! it is that version, then rename it over the executable (so that whatever restarts the server
//! later — systemd, an operator — starts the new build too) and ask the server to restart.
//! [`crate::run`] then stops like for a signal, minus the drain delay (the operation drained
//! this server through the balancers first), and returns [`Exit::Restart`]: `paddock frontend`
//! replaces its process with the new executable, same arguments, same PID. `paddock balancer`
//! uses the same [`Upgrader`], fed by the controller's answers to its reports, and restarts in
//! place the way SIGUSR2 makes it.
//!
//! Which build runs is known without reading the executable when this process was started by
//! an upgrade ([`BUILD_ENV`]); otherwise the executable is hashed once, the first time a build
//! is named, so that a server already on it does not install it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use paddock_api::{PlatformBuild, UpgradeFailure};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;

use paddock_api::Controllers;

use crate::deployer::SendToController as _;

pub use paddock_api::BUILD_ENV;
/// How long the new executable may take to print its version.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// The first wait before trying a failed installation again; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// How long the download may go without a byte.
const CHUNK_TIMEOUT: Duration = Duration::from_secs(30);

/// How a front-end's `run` ended.
#[derive(Debug)]
pub enum Exit {
    /// Stopped by a signal.
    Stopped,
    /// A platform build was installed over `exe`: start it in this process's place, handing
    /// over `listener`.
    Restart {
        exe: PathBuf,
        build: String,
        listener: Option<std::net::TcpListener>,
    },
}

/// A platform build installed over the executable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub exe: PathBuf,
    pub build: String,
}

/// What a process reports about its platform build: changed by the [`Upgrader`], read by the
/// heartbeat or report.
#[derive(Debug, Default)]
pub struct BuildStatus {
    /// The platform build this process runs, when known.
    build: std::sync::Mutex<Option<String>>,
    /// Why the named platform build is not installed yet.
    upgrade_error: std::sync::Mutex<Option<UpgradeFailure>>,
    /// The platform build being installed.
    installing: std::sync::Mutex<Option<String>>,
}

impl BuildStatus {
    pub fn build(&self) -> Option<String> {
        self.build.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_build(&self, build: Option<String>) {
        *self.build.lock().unwrap_or_else(|e| e.into_inner()) = build;
    }

    pub fn upgrade_error(&self) -> Option<UpgradeFailure> {
        self.upgrade_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_upgrade_error(&self, error: Option<UpgradeFailure>) {
        *self.upgrade_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    pub fn installing(&self) -> Option<String> {
        self.installing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_installing(&self, build: Option<String>) {
        *self.installing.lock().unwrap_or_else(|e| e.into_inner()) = build;
    }

    /// All three, for a report.
    pub fn state(&self) -> paddock_api::BuildState {
        paddock_api::BuildState {
            build: self.build(),
            upgrade_error: self.upgrade_error(),
            installing: self.installing(),
        }
    }
}

pub struct Upgrader {
    controller: Arc<Controllers>,
    join_token: String,
    http: reqwest::Client,
    status: Arc<BuildStatus>,
    /// The executable this process was started from.
    exe: PathBuf,
    /// An installation is running.
    busy: Arc<AtomicBool>,
    /// The build the desired state names now: an installation no longer wanted stops before
    /// it replaces anything.
    wanted: std::sync::Mutex<Option<String>>,
    /// After a failed installation: of which build, for which generation, not before when, and
    /// the next wait.
    retry: std::sync::Mutex<Option<Retry>>,
    restart: tokio::sync::mpsc::Sender<Installed>,
    /// The build installed and handed over to restart on, and the generation that named it,
    /// until the process is replaced or [`Upgrader::restart_failed`].
    restarting: std::sync::Mutex<Option<(String, i64)>>,
    /// Wakes the heartbeat, so that the controller learns of a failure at once.
    changed: Arc<tokio::sync::Notify>,
}

struct Retry {
    build: String,
    generation: i64,
    at: Instant,
    next: Duration,
}

/// Clears the busy flag, and the build reported as being installed, when an installation
/// task ends, however it ends (but by restarting on the build).
struct NotBusy(Arc<AtomicBool>, Arc<BuildStatus>);

impl Drop for NotBusy {
    fn drop(&mut self) {
        self.1.set_installing(None);
        self.0.store(false, Ordering::Release);
    }
}

impl Upgrader {
    /// `controller` and `join_token`: where builds are downloaded from, and the farm's join
    /// token; `status`: where this process's build status is reported from.
    pub fn new(
        controller: Arc<Controllers>,
        join_token: String,
        http: reqwest::Client,
        status: Arc<BuildStatus>,
        restart: tokio::sync::mpsc::Sender<Installed>,
        changed: Arc<tokio::sync::Notify>,
    ) -> anyhow::Result<Upgrader> {
        let exe = std::env::current_exe().context("finding this process's executable")?;
        if let Ok(build) = std::env::var(BUILD_ENV)
            && paddock_core::is_sha256(&build)
        {
            status.set_build(Some(build));
        }
        Ok(Upgrader {
            controller,
            join_token,
            http,
            status,
            exe,
            busy: Arc::new(AtomicBool::new(false)),
            wanted: std::sync::Mutex::new(None),
            retry: std::sync::Mutex::new(None),
            restart,
            restarting: std::sync::Mutex::new(None),
            changed,
        })
    }

    /// The process could not restart on the build it installed (`error` says why: a program
    /// that would not start, certificate files that would not load): the installation is
    /// reported failed, with that error, and is tried again after the waits of a failed one
    /// (the build is on disk by then, so that try is the restart alone).
    pub fn restart_failed(&self, error: &str) {
        let Some((build, generation)) = self
            .restarting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        self.failed(
            &build,
            generation,
            format!("installed, not restarting on it: {error}"),
        );
        // What `NotBusy` would have done had the restart not been expected to replace us.
        self.status.set_installing(None);
        self.busy.store(false, Ordering::Release);
        self.changed.notify_one();
    }

    /// Records a failed installation of `build`, named by `generation`, and when to try again.
    fn failed(&self, build: &str, generation: i64, error: String) {
        let mut retry = self.retry.lock().unwrap_or_else(|e| e.into_inner());
        let wait = match &*retry {
            Some(r) if r.build == build && r.generation == generation => r.next,
            _ => FIRST_RETRY,
        };
        *retry = Some(Retry {
            build: build.to_string(),
            generation,
            at: Instant::now() + wait,
            next: (wait * 2).min(MAX_RETRY),
        });
        drop(retry);
        tracing::error!(build = %short(build), "cannot install the platform build, retrying in {} s: {error}", wait.as_secs());
        self.status.set_upgrade_error(Some(UpgradeFailure {
            build: build.to_string(),
            generation,
            error,
        }));
    }

    /// Installs `target`, named by the desired state of `generation`, unless this process runs
    /// it, an installation is running, or the last one failed too recently (a new generation
    /// naming it tries again at once). `None`: no build is named; an old failure is forgotten.
    pub fn check(self: &Arc<Self>, target: Option<&PlatformBuild>, generation: i64) {
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = target.map(|t| t.sha256.clone());
        let Some(target) = target else {
            self.status.set_upgrade_error(None);
            *self.retry.lock().unwrap_or_else(|e| e.into_inner()) = None;
            return;
        };
        let failed = {
            let build = target.sha256.clone();
            move |error: String| UpgradeFailure {
                build: build.clone(),
                generation,
                error,
            }
        };
        if !paddock_core::is_sha256(&target.sha256) {
            self.status.set_upgrade_error(Some(failed(format!(
                "the controller names build {:?}, which is no sha256",
                target.sha256
            ))));
            return;
        }
        if self.status.build().as_deref() == Some(target.sha256.as_str()) {
            return;
        }
        if let Some(retry) = &*self.retry.lock().unwrap_or_else(|e| e.into_inner())
            && retry.build == target.sha256
            && retry.generation == generation
            && Instant::now() < retry.at
        {
            return;
        }
        if self.busy.swap(true, Ordering::AcqRel) {
            return;
        }
        let not_busy = NotBusy(self.busy.clone(), self.status.clone());
        // This attempt's outcome replaces the last one's.
        self.status.set_upgrade_error(None);
        self.status.set_installing(Some(target.sha256.clone()));
        let upgrader = self.clone();
        let target = target.clone();
        tokio::spawn(async move {
            match upgrader.install(&target).await {
                Ok(Some(installed)) => {
                    tracing::info!(build = %short(&target.sha256), version = %target.version, exe = %upgrader.exe.display(), "platform build installed; restarting on it");
                    *upgrader
                        .restarting
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) =
                        Some((target.sha256.clone(), generation));
                    let _ = upgrader.restart.send(installed).await;
                    // Whoever polls for it (a standby) looks at once.
                    upgrader.changed.notify_one();
                    // Busy until the process is replaced: nothing installs twice.
                    std::mem::forget(not_busy);
                }
                Ok(None) => {
                    drop(not_busy);
                    upgrader.changed.notify_one();
                }
                Err(e) => {
                    upgrader.failed(&target.sha256, generation, format!("{e:#}"));
                    drop(not_busy);
                    upgrader.changed.notify_one();
                }
            }
        });
    }

    fn still_wanted(&self, target: &PlatformBuild) -> bool {
        self.wanted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_deref()
            == Some(target.sha256.as_str())
    }

    /// Installs `target` over the executable; `None` when this process runs that build, or it
    /// is no longer wanted.
    async fn install(&self, target: &PlatformBuild) -> anyhow::Result<Option<Installed>> {
        if self.status.build().is_none() {
            // What this process runs, even when its file was replaced meanwhile.
            let own = tokio::task::spawn_blocking(paddock_runtime::sha256_of_this_executable)
                .await
                .context("hashing the executable")?
                .context("hashing the executable")?;
            self.status.set_build(Some(own.clone()));
            if own == target.sha256 {
                tracing::info!(build = %short(&target.sha256), "this server runs the named platform build already");
                self.changed.notify_one();
                return Ok(None);
            }
        }
        let installed = Installed {
            exe: self.exe.clone(),
            build: target.sha256.clone(),
        };
        // Another process started from the same file (`paddock up`) may have installed it.
        let exe = self.exe.clone();
        if let Ok(Ok(on_disk)) =
            tokio::task::spawn_blocking(move || paddock_runtime::sha256_file(&exe)).await
            && on_disk == target.sha256
        {
            return Ok(self.still_wanted(target).then_some(installed));
        }
        let temp = self.exe.with_file_name(format!(
            ".paddock-upgrade-{}-{}",
            short(&target.sha256),
            std::process::id()
        ));
        let result = async {
            let fetched = self.fetch(target, &temp).await?;
            if !fetched || !self.still_wanted(target) {
                tracing::info!(build = %short(&target.sha256), "the platform build is no longer wanted; not installed");
                anyhow::Ok(false)
            } else {
                if let Err(e) = paddock_runtime::keep_previous(&self.exe) {
                    tracing::warn!("the executable being replaced is not kept: {e}");
                }
                tokio::fs::rename(&temp, &self.exe).await.with_context(|| {
                    format!(
                        "cannot replace {} (the user running paddock must be able to write its folder)",
                        self.exe.display()
                    )
                })?;
                Ok(true)
            }
        }
        .await;
        if !matches!(result, Ok(true)) {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        if !result? {
            return Ok(None);
        }
        if let Some(dir) = self.exe.parent()
            && let Ok(folder) = tokio::fs::File::open(dir).await
        {
            let _ = folder.sync_all().await;
        }
        Ok(Some(installed))
    }

    /// Downloads `target` into `temp`, checks its hash and that it runs as that version.
    /// `false` when the build stopped being wanted during the download.
    async fn fetch(&self, target: &PlatformBuild, temp: &Path) -> anyhow::Result<bool> {
        let mut file = tokio::fs::File::create(temp).await.with_context(|| {
            format!(
                "cannot write {} beside the executable (the user running paddock must be able to write its folder)",
                temp.display()
            )
        })?;
        let mut response = self
            .http
            .get(
                self.controller
                    .url(&format!("/control/v1/platform/{}", target.sha256)),
            )
            .bearer_auth(&self.join_token)
            .send_to(&self.controller)
            .await
            .context("downloading the build from the controller")?;
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("the controller answered {status} for the build: {body}");
        }
        let mut hash = Sha256::new();
        while let Some(chunk) = tokio::time::timeout(CHUNK_TIMEOUT, response.chunk())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the download from the controller stalled for {} s",
                    CHUNK_TIMEOUT.as_secs()
                )
            })?
            .context("downloading the build from the controller")?
        {
            if !self.still_wanted(target) {
                return Ok(false);
            }
            hash.update(&chunk);
            file.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", temp.display()))?;
        }
        file.sync_all()
            .await
            .with_context(|| format!("writing {}", temp.display()))?;
        drop(file);
        let got = hex::encode(hash.finalize());
        if got != target.sha256 {
            anyhow::bail!(
                "the download has sha256 {got}, not {}: not installed",
                target.sha256
            );
        }
        let said = paddock_runtime::build::paddock_version_of(temp, VERSION_TIMEOUT)
            .await
            .map_err(|e| anyhow::anyhow!("the new build {e}: not installed"))?;
        if said != target.version {
            anyhow::bail!(
                "the new build says it is paddock {said}, not {}: not installed",
                target.version
            );
        }
        Ok(true)
    }
}

fn short(sha256: &str) -> &str {
    sha256.get(..12).unwrap_or(sha256)
}
