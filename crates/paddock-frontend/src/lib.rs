//! Paddock's front-end server: many apps behind one listener, each app one current version that
//! can be swapped while requests run.
//!
//! - [`apps::Apps`] holds the route table (`arc-swap`): a request takes the `Arc` of the version
//!   its path routes to and keeps it until its response ends, so a swap never disturbs a request
//!   already running, and the old version is freed when its last request ends.
//! - [`server`] accepts connections, routes, adds the `x-paddock-*` headers, answers
//!   `/_paddock/health`, counts requests in flight and shuts down gracefully.
//! - [`folder`] deploys the app packages found in a folder and redeploys one when it changes.
//! - [`cache`] keeps compiled artifacts on disk so that a restart does not compile again.
//!
//! Deliberately absent: wasmtime (the runtime crate owns it), SQL, and any decision about *which*
//! version should run — that is given to the front-end (by its folder today, by the controller).

pub mod apps;
pub mod cache;
pub mod data;
pub mod deployer;
pub mod folder;
pub mod responses;
pub mod scheduler;
pub mod server;
pub mod upgrade;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use paddock_runtime::{Runtime, RuntimeConfig};

pub use apps::{Apps, DeployError};
pub use server::{Server, Stop};
pub use upgrade::Exit;

/// Everything `paddock frontend` is configured with, resolved.
#[derive(Debug, Clone)]
pub struct FrontendConfig {
    /// The server's name in the farm; sent in `x-paddock-server` and the health report.
    pub name: String,
    pub listen: SocketAddr,
    /// A socket already listening at `listen`, handed over by the process this one replaced
    /// (a platform upgrade); the server takes it instead of binding.
    pub listener: Arc<std::sync::Mutex<Option<std::net::TcpListener>>>,
    /// The folder of app packages to deploy and watch, if any.
    pub apps_dir: Option<PathBuf>,
    /// The controller whose desired state this front-end follows, if any.
    pub controller: Option<deployer::ControllerLink>,
    /// Where the artifact cache lives.
    pub data_dir: PathBuf,
    /// The farm's database, where apps keep their data (`wasi:keyvalue`) and sessions.
    pub db: Option<String>,
    /// Session cookies get `Secure`: users reach the farm over HTTPS (TLS ends before it).
    pub secure_cookies: bool,
    /// How often the apps folder is looked at.
    pub scan_interval: Duration,
    /// The most the response cache keeps, in bytes; 0 keeps nothing.
    pub cache_bytes: usize,
    /// How often the farm's purge log is read.
    pub purge_poll: Duration,
    /// How long the server keeps serving, reporting `stopping`, after a shutdown signal.
    pub drain_delay: Duration,
    /// How long in-flight requests may take to finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    pub runtime: RuntimeConfig,
}

/// Runs a front-end until `shutdown` resolves, then drains it; or until a platform upgrade
/// installed a new build, which the caller then starts in this process's place.
pub async fn run(
    config: FrontendConfig,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> anyhow::Result<Exit> {
    let runtime = Arc::new(Runtime::new(&config.runtime)?);
    let cache = cache::ArtifactCache::open(&config.data_dir.join("artifacts"), runtime.clone())
        .with_context(|| {
            format!(
                "opening the artifact cache in {}",
                config.data_dir.display()
            )
        })?;
    let apps = Arc::new(Apps::new(runtime.clone()));
    let store = match &config.db {
        Some(url) => Some(data::open(url, config.controller.is_none()).await?),
        None => None,
    };
    let app_data = store.clone().map(data::app_data);
    let responses = match (config.cache_bytes, &store, &config.controller) {
        (0, _, _) => None,
        (_, None, Some(_)) => {
            tracing::info!(
                "response cache off: a front-end of a farm reads purges from the farm's database (give --db)"
            );
            None
        }
        (bytes, Some(_), _) => Some(Arc::new(responses::ResponseCache::following(bytes))),
        (bytes, None, _) => Some(Arc::new(responses::ResponseCache::new(bytes))),
    };

    let watcher = match &config.apps_dir {
        Some(dir) => {
            let mut folder = folder::AppFolder::new(dir.clone(), apps.clone(), cache.clone());
            folder.scan(true).await;
            Some(tokio::spawn(folder.watch(config.scan_interval)))
        }
        None => None,
    };

    let vitals = Arc::new(server::Vitals::new(&config.name));
    if let Some(responses) = &responses {
        vitals.set_cache(responses.clone());
    }
    // Bound before the deployment service starts, so that it can advertise the real port.
    let server = Server::bind(
        &config,
        apps.clone(),
        vitals.clone(),
        server::Data {
            app_data: app_data.clone(),
            cache: responses.clone(),
            purge_log: store.clone(),
        },
    )
    .await?;
    // The controller refusing this server for good stops it, saying why.
    let (refused_tx, refused_rx) = tokio::sync::oneshot::channel::<anyhow::Error>();
    // A platform build installed: the server stops and its new build starts.
    let (restart_tx, mut restart_rx) = tokio::sync::mpsc::channel::<upgrade::Installed>(1);
    let deployer = match &config.controller {
        Some(link) => {
            let mut link = link.clone();
            if link.advertise.is_none() {
                link.advertise = Some(server.local_addr().to_string());
            }
            let deployer = deployer::Deployer::new(
                link.clone(),
                config.name.clone(),
                apps.clone(),
                vitals.clone(),
                cache.clone(),
                &config.data_dir,
            )?;
            // Without its own executable's path a server cannot be upgraded, but it serves.
            let deployer = match upgrade::Upgrader::new(
                link.controller.clone(),
                link.join_token.clone(),
                deployer.http(),
                vitals.platform().clone(),
                restart_tx,
                deployer.changed.clone(),
            ) {
                Ok(upgrader) => deployer.with_upgrader(Arc::new(upgrader)),
                Err(e) => {
                    tracing::warn!("platform upgrades off for this server: {e:#}");
                    deployer
                }
            };
            let deployer = Arc::new(deployer);
            let generation = deployer.restore().await;
            let scheduler = Arc::new(scheduler::Scheduler::new(
                link,
                config.name.clone(),
                apps.clone(),
                deployer.scheduler_on.clone(),
                app_data.clone(),
            )?);
            Some((
                tokio::spawn({
                    let deployer = deployer.clone();
                    async move {
                        if let Err(e) = deployer.run(generation).await {
                            let _ = refused_tx.send(e);
                        }
                    }
                }),
                deployer,
                scheduler.clone(),
                tokio::spawn(scheduler.run()),
            ))
        }
        None => None,
    };

    // Purges reach this front-end's cache through the farm's purge log.
    let following = match (&responses, &store) {
        (Some(responses), Some(store)) => {
            let applied = deployer.as_ref().map_or_else(
                || Arc::new(tokio::sync::Notify::new()),
                |(_, deployer, _, _)| deployer.changed.clone(),
            );
            let log: Arc<dyn responses::PurgeLog> = store.clone();
            Some(tokio::spawn(responses.clone().follow(
                log,
                config.purge_poll,
                applied,
            )))
        }
        _ => None,
    };

    tracing::info!(
        server = %config.name,
        engine = runtime.engine_hash(),
        "listening on http://{}",
        server.local_addr()
    );
    // No timer tick is claimed once the signal has come, drain delay included.
    let claimer = deployer
        .as_ref()
        .map(|(_, _, scheduler, _)| scheduler.clone());
    let refusal = Arc::new(std::sync::Mutex::new(None));
    let installed = Arc::new(std::sync::Mutex::new(None));
    let shutdown = {
        let refusal = refusal.clone();
        let installed = installed.clone();
        let stop = Stop {
            drain_delay: config.drain_delay,
            hand_over: false,
        };
        async move {
            let stop = tokio::select! {
                () = shutdown => stop,
                Ok(e) = refused_rx => {
                    tracing::error!("stopping: {e:#}");
                    *refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    stop
                }
                Some(build) = restart_rx.recv() => {
                    *installed.lock().unwrap_or_else(|e| e.into_inner()) = Some(build);
                    // No drain delay: the socket stays open for the new process, so a
                    // connection arriving meanwhile waits for it instead of being refused, and
                    // health answering 503 for a while would only make the balancers route
                    // around it (to nowhere, in a zone with one server).
                    Stop {
                        drain_delay: Duration::ZERO,
                        hand_over: true,
                    }
                }
            };
            if let Some(scheduler) = claimer {
                scheduler.stop_claiming();
            }
            stop
        }
    };
    let result = server.serve(shutdown, config.shutdown_timeout).await;
    let (deploying, deployer, scheduler, scheduling) = match deployer {
        Some((t, d, s, u)) => (Some(t), Some(d), Some(s), Some(u)),
        None => (None, None, None, None),
    };
    if let Some(scheduler) = scheduler {
        scheduler.stop(config.shutdown_timeout).await;
    }
    if let Some(deployer) = deployer {
        deployer.farewell().await;
    }
    for task in [watcher, deploying, scheduling, following]
        .into_iter()
        .flatten()
    {
        task.abort();
    }
    if let Some(refusal) = refusal.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(refusal);
    }
    let listener = result?;
    let installed = installed.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(match installed {
        Some(upgrade::Installed { exe, build }) => Exit::Restart {
            exe,
            build,
            listener,
        },
        None => Exit::Stopped,
    })
}
