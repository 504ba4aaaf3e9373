//! The platform builds of a process that follows a controller but is no front-end: a balancer,
//! a standby controller. Its reports say which build it runs; a build the controller names is
//! installed over the executable by the front-ends' [`Upgrader`], and the process then restarts
//! on it (each in its own way, from the `Installed` the channel of [`Builds::new`] carries).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use paddock_api::{BuildState, Controllers, PlatformBuild};
use paddock_frontend::upgrade::{BuildStatus, Installed, Upgrader};
use tokio::sync::{Notify, mpsc};

pub struct Builds {
    upgrader: Arc<Upgrader>,
    status: Arc<BuildStatus>,
    changed: Arc<Notify>,
    /// For a standby, which polls it: the build installed, once it is.
    installed: Mutex<Option<mpsc::Receiver<Installed>>>,
}

impl Builds {
    /// Builds are downloaded from `controllers` with the farm's `join_token`. The receiver
    /// carries a build once it is installed over the executable (a balancer takes it; a
    /// standby leaves it to [`Builds::standby`]).
    pub fn new(
        controllers: &Arc<Controllers>,
        join_token: &str,
    ) -> anyhow::Result<(Builds, mpsc::Receiver<Installed>)> {
        let status = Arc::new(BuildStatus::default());
        let changed = Arc::new(Notify::new());
        let (restart, restarts) = mpsc::channel::<Installed>(1);
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("starting the HTTP client")?;
        let upgrader = Upgrader::new(
            controllers.clone(),
            join_token.to_string(),
            http,
            status.clone(),
            restart,
            changed.clone(),
        )?;
        let builds = Builds {
            upgrader: Arc::new(upgrader),
            status,
            changed,
            installed: Mutex::new(None),
        };
        Ok((builds, restarts))
    }

    /// The process could not restart on the build installed (`error`: why): reported as a
    /// failed installation, tried again later.
    pub fn restart_failed(&self, error: &str) {
        self.upgrader.restart_failed(error);
    }

    /// For a standby controller: the installed build is read by polling.
    pub fn standby(controllers: &Arc<Controllers>, join_token: &str) -> anyhow::Result<Builds> {
        let (builds, restarts) = Builds::new(controllers, join_token)?;
        *builds.installed.lock().unwrap_or_else(|e| e.into_inner()) = Some(restarts);
        Ok(builds)
    }
}

impl paddock_balancer::feed::Platform for Builds {
    fn state(&self) -> BuildState {
        self.status.state()
    }

    fn named(&self, build: Option<&PlatformBuild>, generation: i64) {
        self.upgrader.check(build, generation);
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }
}

impl paddock_controller::standby::StandbyPlatform for Builds {
    fn state(&self) -> BuildState {
        self.status.state()
    }

    fn named(&self, build: Option<&PlatformBuild>, generation: i64) {
        self.upgrader.check(build, generation);
    }

    fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    fn installed(&self) -> Option<paddock_controller::platform::Installed> {
        let mut installed = self.installed.lock().unwrap_or_else(|e| e.into_inner());
        let build = installed.as_mut()?.try_recv().ok()?;
        Some(paddock_controller::platform::Installed {
            exe: build.exe,
            build: build.build,
        })
    }
}
