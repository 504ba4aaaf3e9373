//! Paddock's controller: the farm's single writer of desired state.
//!
//! It accepts app packages, validates and compiles each component once per engine, keeps every
//! version, records which version each zone should run, and tells front-ends about it through the
//! control channel, where they long-poll on the store's **generation**. Every admin action lands
//! in the audit log.
//!
//! - [`api`]: the admin API (`/v1/...`, admin token) and the control channel (`/control/v1/...`,
//!   join token), on axum.
//! - [`routing`]: the balancers' routing table, and the facts operations wait on (every live
//!   balancer acknowledged a generation; a front-end is drained).
//! - [`tokens`]: the two bearer tokens, generated at first start in the data folder.
//! - [`failover`]: active and passive front-ends; activating a standby when one dies.
//!
//! Deliberately absent: SQL (the store crate), wasmtime beyond `Runtime::compile` (the runtime
//! crate), and any IO towards front-ends: they come to the controller, never the other way round.

pub mod api;
mod cache;
pub mod config;
mod console;
pub mod data;
mod extract;
pub mod failover;
pub mod ops;
pub mod platform;
pub mod routing;
pub mod standby;
pub mod timers;
pub mod tokens;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use paddock_runtime::{Runtime, RuntimeConfig};
use paddock_store::{SqlStore, Store};
use tokio::sync::watch;

/// Everything `paddock controller` is configured with, resolved.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    /// `sqlite://PATH` or `postgres://...`.
    pub db_url: String,
    /// Tokens live here.
    pub data_dir: PathBuf,
    /// Largest package upload accepted, in bytes.
    pub max_upload_bytes: usize,
    /// Activate a passive front-end when an active one in rotation has been silent this long
    /// (`None`: never).
    pub failover_after: Option<std::time::Duration>,
    /// Wait for the controller role while another controller holds the database, rather than
    /// exiting; take over when it stops or dies.
    pub standby: bool,
    /// A socket already listening at `listen`, handed over by the process this one replaced
    /// (a platform upgrade); taken instead of binding once the role is held.
    pub listener: Arc<std::sync::Mutex<Option<std::net::TcpListener>>>,
    /// Take platform builds (native executables run on every server) and upgrade to them.
    pub platform_upgrades: bool,
    /// A standby's link to the controller holding the role: it reports there while it stands by
    /// and installs the builds it names.
    pub follow: Option<standby::Follow>,
}

type Incarnation = Arc<tokio::sync::Mutex<Option<String>>>;

/// How a controller's `run` ended.
#[derive(Debug)]
pub enum Exit {
    /// Stopped by a signal.
    Stopped,
    /// A platform upgrade installed a build over `exe`: start it in this process's place,
    /// handing over `listener`; it resumes the operation where its journal stands. A standby
    /// has no listener: it stands by again.
    Restart {
        exe: PathBuf,
        build: String,
        listener: Option<std::net::TcpListener>,
    },
}

/// What every request handler shares.
pub struct Controller {
    pub store: Arc<dyn Store>,
    /// The same database, for the apps' data (not part of `Store`: front-ends use it too).
    pub data: Arc<SqlStore>,
    pub runtime: Arc<Runtime>,
    pub tokens: tokens::Tokens,
    pub max_upload_bytes: usize,
    /// Where the tokens and the platform builds are kept.
    pub data_dir: std::path::PathBuf,
    /// The executable this process was started from (a platform upgrade installs over it), or
    /// why it is not known.
    pub exe: Result<std::path::PathBuf, String>,
    /// Whether platform builds are taken (`--platform-upgrades`).
    pub platform_upgrades: bool,
    /// The newest generation this controller wrote; long-polls wait on it.
    generation: watch::Sender<i64>,
    /// Counts reports from front-ends and balancers (and operation changes): operations waiting
    /// for a fact look again when it moves.
    facts: watch::Sender<u64>,
    /// The operations a task of this controller drives now.
    driving: std::sync::Mutex<HashSet<i64>>,
    /// For smoke tests.
    http: reqwest::Client,
    /// Serializes `timers::sync`.
    timer_sync: tokio::sync::Mutex<()>,
    /// Held by a manual change from its check that no operation holds the zone to its write,
    /// by a balanced deployment from its plan to its zone locks, by an abort from its check to
    /// its request, and by an operation from reading its journal to journaling the next step:
    /// none of them acts on a state another one is changing. (One controller per farm.)
    pub(crate) zone_gate: tokio::sync::Mutex<()>,
    /// The platform build this process runs, when known (see [`platform::own_build`]).
    pub(crate) build: tokio::sync::Mutex<Option<String>>,
    /// Each server's process that registered last, held while a heartbeat of that server is
    /// checked and written: a heartbeat of another process (the one a restart on a new build
    /// replaced, whose last report is late) is not taken, and one already being written when
    /// the new process registers is written before the registration.
    incarnations: std::sync::Mutex<std::collections::HashMap<String, Incarnation>>,
    /// Set once a platform build was installed over the executable: the process is about to
    /// be replaced, and no operation is driven meanwhile.
    pub(crate) restarting: watch::Sender<Option<platform::Installed>>,
    /// The standbys' last reports, with when each arrived.
    pub(crate) standbys:
        std::sync::Mutex<std::collections::BTreeMap<String, (paddock_api::StandbyReport, i64)>>,
    /// The build a platform upgrade tells the standbys to run, with its generation.
    pub(crate) standby_target: std::sync::Mutex<Option<(paddock_api::PlatformBuild, i64)>>,
    /// When this process took the controller role.
    pub(crate) started: std::time::Instant,
    /// The build an upgrade started this process on (`BUILD_ENV`), if one did.
    pub(crate) started_on: Option<String>,
    /// Cutover and watch steps of plans with a watch running now: while there is one (and for a
    /// second after the last ended), balancers are asked to report sooner.
    pub(crate) watches: std::sync::atomic::AtomicUsize,
    pub(crate) watch_ended_ms: std::sync::atomic::AtomicI64,
    /// The answers counted from each cutover of a plan with a watch, by operation and zone, for
    /// its watch step.
    pub(crate) tallies: std::sync::Mutex<std::collections::HashMap<(i64, String), ops::Tally>>,
}

impl Controller {
    /// Tells waiting front-ends that desired state changed.
    pub fn announce(&self, generation: i64) {
        self.generation.send_if_modified(|current| {
            if generation > *current {
                *current = generation;
                true
            } else {
                false
            }
        });
    }

    pub fn watch_generation(&self) -> watch::Receiver<i64> {
        self.generation.subscribe()
    }

    /// Something an operation may be waiting for was reported.
    pub fn facts_changed(&self) {
        self.facts.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Waits for `change` at most [`api::LONG_POLL`], or until this process is about to be
    /// replaced by a new build (its clients ask the next one).
    pub async fn long_poll<F: std::future::Future>(&self, change: F) {
        let mut restarting = self.restarting.subscribe();
        tokio::select! {
            _ = tokio::time::timeout(api::LONG_POLL, change) => {}
            _ = restarting.wait_for(Option::is_some) => {}
        }
    }

    /// Server `name`'s process that registered last, locked.
    pub(crate) async fn incarnation(
        &self,
        name: &str,
    ) -> tokio::sync::OwnedMutexGuard<Option<String>> {
        let slot = self
            .incarnations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        slot.lock_owned().await
    }

    pub fn watch_facts(&self) -> watch::Receiver<u64> {
        self.facts.subscribe()
    }

    /// Whether an operation's cutover or watch step is counting the balancers' answers now (or
    /// one ended within the last second: the next may be starting).
    pub fn watching(&self) -> bool {
        self.watches.load(std::sync::atomic::Ordering::Relaxed) > 0
            || now_ms()
                - self
                    .watch_ended_ms
                    .load(std::sync::atomic::Ordering::Relaxed)
                < 1_000
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Runs a controller until `shutdown` resolves.
pub async fn run(
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Exit> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data folder {}", config.data_dir.display()))?;
    // The role first: a second controller started by mistake, even with this one's address,
    // is told which controller runs, and changes nothing.
    let holder = holder(config.listen);
    if config.standby {
        // A standby keeps no socket open while it waits for the role: connections to it would
        // wait for nobody. It binds once it holds the role.
        drop(
            config
                .listener
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }
    let (store, role, listener) = loop {
        let open = SqlStore::open_as_controller(&config.db_url, &holder, config.standby);
        let opened = match (&config.follow, config.standby) {
            (Some(follow), true) => {
                tokio::select! {
                    biased;
                    opened = open => opened,
                    installed = standby::follow(follow.clone()) => {
                        tracing::info!(build = %ops::short(&installed.build), "platform build installed; restarting on it, standing by");
                        return Ok(Exit::Restart {
                            exe: installed.exe,
                            build: installed.build,
                            listener: None,
                        });
                    }
                }
            }
            _ => open.await,
        };
        let (store, role) = opened
            .with_context(|| format!("opening the platform database {}", redact(&config.db_url)))?;
        let handed_over = config
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let listener = match handed_over {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(listener)?
            }
            None => match tokio::net::TcpListener::bind(config.listen).await {
                Ok(listener) => listener,
                // The controller that released the role still serves at this address: it
                // restarts on a new build, keeping its socket, and takes the role again.
                Err(e) if config.standby && e.kind() == std::io::ErrorKind::AddrInUse => {
                    tracing::warn!(
                        "holding the controller role, but {} is still in use (the controller that held it restarts on a new build?); standing by again",
                        config.listen
                    );
                    drop(role);
                    drop(store);
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    return Err(anyhow::Error::from(e)
                        .context(format!("cannot listen on {}", config.listen)));
                }
            },
        };
        break (Arc::new(store), role, listener);
    };
    // A second handle on the socket, handed over to the next process on a restart.
    let keep = Arc::new(std::sync::Mutex::new(Some(
        std::os::fd::AsFd::as_fd(&listener)
            .try_clone_to_owned()
            .map(std::net::TcpListener::from)
            .context("duplicating the listening socket")?,
    )));
    let tokens = tokens::Tokens::load_or_create(&config.data_dir)?;
    let runtime = Runtime::new(&RuntimeConfig {
        max_instances: 1,
        ..RuntimeConfig::default()
    })?;
    let generation = store.generation().await?;
    // Named by the upgrade that started this process, if one did.
    let started_on = std::env::var(platform::BUILD_ENV)
        .ok()
        .filter(|b| paddock_core::is_sha256(b));
    let controller = Arc::new(Controller {
        store: store.clone(),
        data: store.clone(),
        runtime: Arc::new(runtime),
        tokens,
        max_upload_bytes: config.max_upload_bytes,
        data_dir: config.data_dir.clone(),
        exe: std::env::current_exe()
            .map_err(|e| format!("cannot find this process's executable: {e}")),
        platform_upgrades: config.platform_upgrades,
        generation: watch::channel(generation).0,
        facts: watch::channel(0).0,
        driving: std::sync::Mutex::new(HashSet::new()),
        http: reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(3))
            .build()
            .context("building the HTTP client")?,
        timer_sync: tokio::sync::Mutex::new(()),
        zone_gate: tokio::sync::Mutex::new(()),
        build: tokio::sync::Mutex::new(started_on.clone()),
        restarting: watch::channel(None).0,
        incarnations: std::sync::Mutex::new(std::collections::HashMap::new()),
        standbys: std::sync::Mutex::new(std::collections::BTreeMap::new()),
        standby_target: std::sync::Mutex::new(None),
        started: std::time::Instant::now(),
        started_on,
        watches: std::sync::atomic::AtomicUsize::new(0),
        watch_ended_ms: std::sync::atomic::AtomicI64::new(0),
        tallies: std::sync::Mutex::default(),
    });
    tracing::info!(
        database = controller.store.backend(),
        engine = controller.runtime.engine_hash(),
        generation,
        "listening on http://{}",
        listener.local_addr()?
    );
    timers::sync(&controller)
        .await
        .context("reading the timers of the deployed versions")?;
    ops::resume_all(&controller)
        .await
        .context("reading the operations to resume")?;
    if let Some(after) = config.failover_after {
        tokio::spawn(failover::watch(controller.clone(), after));
    }
    tokio::spawn(SqlStore::sweep_sessions_every_minute(store.clone()));
    let mut restarting = controller.restarting.subscribe();
    let stop = {
        let keep = keep.clone();
        async move {
            tokio::select! {
                // Stopping for good: new connections are refused at once, not left waiting.
                () = shutdown => drop(keep.lock().unwrap_or_else(|e| e.into_inner()).take()),
                _ = restarting.wait_for(Option::is_some) => {}
            }
        }
    };
    let serve = axum::serve(listener, api::router(controller.clone())).with_graceful_shutdown(stop);
    let serve = std::future::IntoFuture::into_future(serve);
    tokio::pin!(serve);
    let mut installed = controller.restarting.subscribe();
    tokio::select! {
        served = &mut serve => {
            served.context("serving the admin API")?;
            Ok(Exit::Stopped)
        }
        seen = installed.wait_for(Option::is_some) => {
            let installed = seen.ok().and_then(|seen| seen.clone());
            // Requests in flight get a moment; long-polls do not hold the restart (their
            // clients ask again, of the next process).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(1), &mut serve).await;
            let listener = keep.lock().unwrap_or_else(|e| e.into_inner()).take();
            match (installed, listener) {
                (Some(platform::Installed { exe, build }), Some(listener)) => {
                    Ok(Exit::Restart { exe, build, listener: Some(listener) })
                }
                _ => anyhow::bail!("restarting on the installed platform build: the listening socket is gone"),
            }
        }
        lost = store.keep_controller_role(role, &holder) => {
            Err(anyhow::Error::from(lost).context(
                "stopping: this controller lost its database connection, and another one took the controller role meanwhile",
            ))
        }
    }
}

/// Who holds the controller role, for the error a second controller gets.
fn holder(listen: std::net::SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!(
        "paddock controller listening on {listen}, pid {} on {}",
        std::process::id(),
        match host.trim() {
            "" => "this machine",
            host => host,
        }
    )
}

/// A database URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}
